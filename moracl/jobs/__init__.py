"""The jobs behind the ``moracl`` command: each checks its config against the data it names,
builds that data and calls the library (:mod:`moracl.jobs.continual` for ``moracl run``,
:mod:`moracl.jobs.finetune` and :mod:`moracl.jobs.meta`).

:func:`check_config` is what ``moracl validate`` runs, and what every job runs before any
work: the fields and the output folder and device (:func:`moracl.preflight.check_common`),
then the job's own checks (scenario, options, setting, backbone).
"""

from __future__ import annotations

from typing import Any

import torch

from moracl.config import FinetuneConfig, MetaConfig
from moracl.continual.config import RunConfig
from moracl.extras import require
from moracl.parse_fields import from_dict, to_dict
from moracl.preflight import check_common

__all__ = ["check_config"]

#: each job's config, module (imported when a config is checked: ``moracl run``'s needs
#: Avalanche, the others do not) and command
_JOBS: tuple[tuple[type, str, str], ...] = (
    (RunConfig, "moracl.jobs.continual", "moracl run"),
    (FinetuneConfig, "moracl.jobs.finetune", "moracl finetune"),
    (MetaConfig, "moracl.jobs.meta", "moracl meta"),
)


def check_config(config: Any, *, device: str | torch.device | None = None) -> None:
    """Check ``config`` (a run, finetune or meta config) as its job does before any work,
    reading no data and building no model.

    Args:
        config: a :class:`~moracl.continual.config.RunConfig`,
            :class:`~moracl.config.FinetuneConfig` or :class:`~moracl.config.MetaConfig`.
        device: the device the job will use (``cpu``, ``cuda``, ``cuda:N``); ``None``: not
            checked.

    Raises:
        ValueError: the first problem found, naming the key, the value and what is allowed.
        TypeError: ``config`` is not one of the job configs.
        ModuleNotFoundError: the job needs a package of an extra that is not installed
            (``moracl run``: Avalanche), naming it and the ``pip`` command.
    """
    if not isinstance(config, (RunConfig, FinetuneConfig, MetaConfig)):
        raise TypeError(
            f"expected a RunConfig, FinetuneConfig or MetaConfig, got {type(config).__name__}"
        )
    # every field again: a config built or changed in Python meets the YAML rules
    from_dict(type(config), to_dict(config))
    module, job = next((m, j) for kind, m, j in _JOBS if isinstance(config, kind))
    require(module, job).check(config)
    check_common(config, device=device)
