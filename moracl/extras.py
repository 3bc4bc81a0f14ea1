"""What the optional extras of ``pyproject.toml`` bring, and the error a missing one gives.

The library itself needs only torch, transformers, datasets, einops, safetensors, pyyaml,
tqdm and numpy; each extra adds the packages of one capability (``moracl run`` needs
Avalanche, plots need matplotlib, ...).  Code that needs an extra's package imports it
through :func:`require` (or re-raises a failed import with :func:`missing`), so that a base
install gets a message naming the capability, the package and the ``pip`` command, not a
bare ``No module named ...`` from deep inside a job.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "missing", "require"]

#: import name -> (distribution, the ``moracl[...]`` extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "avalanche": ("avalanche-lib==0.6.0", "continual"),
    "torchvision": ("torchvision", "continual"),
    "matplotlib": ("matplotlib", "continual"),
    "tensorboard": ("tensorboard", "continual"),
    "sklearn": ("scikit-learn", "data"),
    "learn2learn": ("learn2learn==0.2.0", "meta"),
    "peft": ("peft", "parity"),
    "torchao": ("torchao", "quant"),
}


def missing(error: ModuleNotFoundError, purpose: str) -> ModuleNotFoundError:
    """``error`` (a failed import) as the error to raise: for a package of an extra, one
    that says ``purpose`` needs it and how to install it; any other as it is."""
    root = (error.name or "").split(".")[0]
    if root not in EXTRAS:
        return error
    dist, extra = EXTRAS[root]
    return ModuleNotFoundError(
        f"{purpose} needs {dist}, which is not installed: pip install 'moracl[{extra}]' "
        f"(or pip install {dist})",
        name=error.name,
    )


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or :func:`missing`'s error naming ``purpose``
    (e.g. ``"moracl run"``) where an extra's package is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise missing(e, purpose) from e
