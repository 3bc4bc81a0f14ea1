"""Named stream and task-source builders over real data installed offline, and over your own
files (``table``, ``image-folder``).

Every built-in source comes from a Debian or PyPI package installed beforehand; a missing one
raises an error naming the package to install. Nothing here is imported by the ``moracl``
core. Importing this package also loads the installed plugins (:mod:`moracl.plugins`), so
that the scenarios and encoders they register are known.
"""

from moracl_scenarios import encoders  # noqa: F401  (registers cnn-*, hf-text, tabular)
from moracl_scenarios._image import image_inputs
from moracl_scenarios.digits import digit_domains
from moracl_scenarios.fashion import split_fashion
from moracl_scenarios.fewshot import FEWSHOT, build_fewshot
from moracl_scenarios.image_folder import image_folder_stream
from moracl_scenarios.table import table_stream
from moracl_scenarios.wordnet import LEXNAMES, load_wordnet_glosses, wordnet_classification
from moracl_scenarios.wordnet_domains import wordnet_domains_stream  # also registers minilm

from moracl.plugins import load_installed

__all__ = [
    "FEWSHOT",
    "LEXNAMES",
    "build_fewshot",
    "digit_domains",
    "image_folder_stream",
    "image_inputs",
    "load_wordnet_glosses",
    "split_fashion",
    "table_stream",
    "wordnet_classification",
    "wordnet_domains_stream",
]

load_installed()  # last: a plugin may import anything above
