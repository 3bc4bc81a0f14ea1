"""Skip markers for tests that read the offline data of a Debian package (DESIGN.md).

``.ci/setup.sh`` installs the Debian packages only when it runs as root; on a machine without
them the tests that read them are skipped with the command that installs the package, not
failed. (WordNet's tests skip through their own markers; the image tests need these.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.images import FASHION_ROOT

__all__ = ["needs_fashion_mnist"]


def _needs(path: Path, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not path.exists(),
        reason=f"needs the Debian package {package!r} ({path} is missing): "
        f"apt-get install --no-install-recommends {package}",
    )


#: split-fashion streams, and the ``cnn-fashion`` encoder of digit-domains (pretrained on it)
needs_fashion_mnist = _needs(FASHION_ROOT, "dataset-fashion-mnist")
