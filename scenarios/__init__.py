"""Named stream and task-source builders over real data installed offline.

Every source comes from a Debian or PyPI package installed beforehand; a missing one raises an
error naming the package to install. Nothing here is imported by the ``moracl`` core.
"""

from moracl_scenarios import encoders  # noqa: F401  (registers cnn-mnist, cnn-fashion)
from moracl_scenarios._image import image_inputs
from moracl_scenarios.digits import digit_domains
from moracl_scenarios.fashion import split_fashion
from moracl_scenarios.fewshot import FEWSHOT, build_fewshot
from moracl_scenarios.wordnet import LEXNAMES, load_wordnet_glosses, wordnet_classification
from moracl_scenarios.wordnet_domains import wordnet_domains_stream  # also registers minilm

__all__ = [
    "FEWSHOT",
    "LEXNAMES",
    "build_fewshot",
    "digit_domains",
    "image_inputs",
    "load_wordnet_glosses",
    "split_fashion",
    "wordnet_classification",
    "wordnet_domains_stream",
]
