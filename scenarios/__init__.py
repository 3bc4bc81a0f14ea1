"""Named stream and task-source builders over real data installed offline.

Every source comes from a Debian or PyPI package installed beforehand; a missing one raises an
error naming the package to install. Nothing here is imported by the ``moracl`` core.
"""

from scenarios.wordnet import LEXNAMES, load_wordnet_glosses, wordnet_classification

__all__ = ["LEXNAMES", "load_wordnet_glosses", "wordnet_classification"]
