"""Plugins: Python modules imported before a job runs, so that what they register (scenarios,
encoders, adapter kinds, routers, ...) can be named in a config.

A plugin is an ordinary module that registers its components when imported, e.g.::

    # my_streams.py
    from moracl_scenarios.streams import SCENARIOS

    @SCENARIOS.register("my-stream")
    def my_stream(*, setting=None, seed=0, size=100): ...

Three ways to load one:

- ``moracl --plugin my_streams run config.yaml`` (repeatable; on any subcommand), or
  :func:`load_plugins` from Python;
- the environment variable ``MORACL_PLUGINS`` (module names separated by commas). Loading a
  plugin with :func:`load_plugins` adds it there, so processes started afterwards (the
  workers of ``moracl sweep --jobs N``) load it too;
- an installed distribution's entry point in the group ``moracl.plugins``, e.g. in its
  ``pyproject.toml``::

      [project.entry-points."moracl.plugins"]
      my_streams = "my_streams"

  An entry point naming a module imports it; one naming a function (``"pkg.mod:setup"``)
  also calls it with no argument. Entry points load by themselves (:func:`load_installed`,
  run by ``moracl`` and by ``import moracl_scenarios``), unless
  ``MORACL_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

__all__ = [
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "load_installed",
    "load_plugin",
    "load_plugins",
]

ENTRY_POINT_GROUP = "moracl.plugins"
PLUGINS_ENV = "MORACL_PLUGINS"
DISABLE_AUTOLOAD_ENV = "MORACL_DISABLE_PLUGIN_AUTOLOAD"
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_loaded_entry_points: set[str] = set()


def load_plugin(name: str) -> ModuleType:
    """Import the plugin module ``name`` (a dotted module name, as for ``import``).

    Raises:
        ValueError: ``name`` is not a dotted module name.
        ImportError: the module cannot be found, or importing it raised (the message names
            the plugin; the original error is chained).
    """
    if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
        raise ValueError(f"plugin {name!r} must be a dotted module name, e.g. 'my_pkg.streams'")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.startswith(err.name):
            raise ImportError(
                f"plugin {name!r} not found: no module {err.name!r} on the Python path "
                f"(install it, or add its folder to PYTHONPATH)",
                name=name,
            ) from err
        raise ImportError(f"plugin {name!r} failed to import: {err}", name=name) from err
    except Exception as err:
        raise ImportError(
            f"plugin {name!r} failed to import: {type(err).__name__}: {err}", name=name
        ) from err


def _env_plugins() -> list[str]:
    return [p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()]


def load_plugins(names: Sequence[str] = (), *, export: bool = True) -> list[str]:
    """Import the plugin modules ``names``, then the installed ones (:func:`load_installed`).

    Args:
        names: dotted module names, in the order to import them.
        export: add ``names`` to ``MORACL_PLUGINS`` so that child processes load them too.

    Returns:
        The names of every plugin loaded so far by this call: ``names``, then the others.

    Raises:
        ValueError, ImportError: as :func:`load_plugin`, naming the plugin.
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of module names, got a single str")
    for name in names:
        load_plugin(name)
    if export and names:
        known = _env_plugins()
        os.environ[PLUGINS_ENV] = ",".join([*known, *(n for n in names if n not in known)])
    return [*names, *(n for n in load_installed() if n not in names)]


def _load_entry_point(ep: EntryPoint) -> None:
    try:
        loaded = ep.load()
        if not isinstance(loaded, ModuleType) and callable(loaded):
            loaded()
    except Exception as err:
        dist = getattr(ep, "dist", None)
        where = f" of {dist.name}" if dist is not None else ""
        raise ImportError(
            f"the moracl plugin {ep.name!r} ({ep.value}){where} failed to load: "
            f"{type(err).__name__}: {err}; set {DISABLE_AUTOLOAD_ENV}=1 to skip installed "
            f"plugins",
            name=ep.value,
        ) from err


def load_installed() -> list[str]:
    """Load the plugins of ``MORACL_PLUGINS`` and of the entry point group
    ``moracl.plugins`` (each once per process; none when ``MORACL_DISABLE_PLUGIN_AUTOLOAD``
    is set). Returns their names (module names, then entry point names).

    Raises:
        ImportError: a plugin that fails to import (names it and how to skip them).
    """
    names = _env_plugins()
    for name in names:
        load_plugin(name)
    if os.environ.get(DISABLE_AUTOLOAD_ENV):
        return names
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"{ep.name}={ep.value}"
        if key not in _loaded_entry_points:
            _load_entry_point(ep)
            _loaded_entry_points.add(key)
        names.append(ep.name)
    return names
