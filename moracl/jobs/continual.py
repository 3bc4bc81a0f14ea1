"""The continual job (``moracl run``): checks a run config against the scenario registry,
builds the stream and the encoder it names (:mod:`moracl_scenarios`), and runs the library
loop (:func:`moracl.continual.run.run_continual`) on them; and the config to resume a run
folder with (:func:`resume_config`).

    results = run(load_config("configs/split_fashion.yaml"))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moracl.config import apply_overrides, from_dict, load_config, to_dict
from moracl.continual.checkpoint import load_checkpoint
from moracl.continual.config import RunConfig, Setting, check_routing
from moracl.continual.metrics import RunResults
from moracl.continual.resume import (
    ConfigChange,
    ResumeConfigError,
    ResumePlan,
    config_changes,
    progress_of,
    saved_config,
)
from moracl.continual.run import run_continual
from moracl.experts.banks import BANKS
from moracl.preflight import check_common

__all__ = ["build_stream", "check", "resume_config", "run"]


def check(config: RunConfig) -> None:
    """Check what the config's own parsing cannot, reading no data: that moracl's experts can
    be of the adapter's kind, and against the scenario registry the scenario's name, its
    options and its setting (one the scenario supports; its default when none is given),
    and moracl's routing against that setting.

    Raises:
        ValueError: naming the key, the value and what is allowed.
        TypeError: ``config`` is not a :class:`RunConfig`.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"expected a RunConfig, got {type(config).__name__}")
    kind = config.adapter.kind
    if "moracl" in config.strategies and kind not in BANKS:  # moracl's experts are a bank
        raise ValueError(
            f"adapter kind {kind!r} cannot be a mixture expert; expected one of {sorted(BANKS)} "
            f"(or leave moracl out of strategies)"
        )
    if "olora" in config.strategies and kind != "lora":
        raise ValueError(
            f"strategy olora trains one LoRA per experience: adapter.kind must be 'lora', got "
            f"{kind!r} (or leave olora out of strategies)"
        )
    import moracl_scenarios  # noqa: F401  (registers the streams)
    from moracl_scenarios.streams import check_scenario

    sc = config.scenario
    setting = sc.setting.value if sc.setting is not None else None
    try:
        found = check_scenario(sc.name, setting, sc.options)
    except ValueError as e:
        raise ValueError(f"scenario: {e}") from None
    if found is not None:  # (a scenario without a spec: its builder decides)
        check_routing(config, task_aware=Setting(found.value) is Setting.TASK)


def build_stream(config: RunConfig) -> tuple[Any, nn.Module]:
    """The stream ``config.scenario`` names (seeded by ``train.seed``) and its encoder."""
    import moracl_scenarios  # noqa: F401  (registers the streams and encoders)
    from moracl_scenarios.streams import build_stream as build
    from moracl_scenarios.streams import load_encoder

    sc = config.scenario
    torch.manual_seed(config.train.seed)
    setting = sc.setting.value if sc.setting is not None else None
    stream = build(sc.name, setting=setting, seed=config.train.seed, **sc.options)
    return stream, load_encoder(stream.info)


def run(
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
    evaluate_test: bool = True,
) -> RunResults:
    """Check ``config`` (as ``moracl validate`` does), build its stream and encoder, and run
    it (:func:`~moracl.continual.run.run_continual`, whose arguments these are).

    ``evaluate_test=False`` is a run for model selection: the stream's test experiences are
    never read (the builder still makes them; the run does not touch them), and the results
    hold validation matrices only."""
    from_dict(RunConfig, to_dict(config))  # the checks of moracl validate, in its order
    check(config)
    check_common(config, device=device)
    stream, encoder = build_stream(config)
    return run_continual(
        config,
        stream=stream,
        encoder=encoder,
        resume=resume,
        progress=progress,
        stop_after=stop_after,
        device=device,
        evaluate_test=evaluate_test,
    )


def resume_config(
    run_dir: str | os.PathLike[str],
    config_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> ResumePlan:
    """How to resume ``run_dir``: its saved config, checked against a ``config_file`` and
    dotted ``overrides`` given along (overrides apply to the file when one is given, else
    to the saved config).

    Raises:
        FileNotFoundError: ``run_dir`` has no checkpoint.
        CheckpointError: the checkpoint cannot be trusted (nothing is modified).
        ResumeConfigError: a given value differs from the saved one on a key that a resumed
            run cannot change (every such key is named, with both values).
        ValueError: the config file is not a run config, or an override is malformed.
    """
    folder = Path(run_dir)
    ckpt = load_checkpoint(folder, tensors=False)
    saved = saved_config(ckpt, folder)
    done, total = progress_of(ckpt)
    changes: list[ConfigChange] = []
    if config_file is not None or overrides:
        if config_file is not None:
            given = load_config(Path(config_file), overrides)
            if not isinstance(given, RunConfig):
                raise ValueError(f"{config_file} is a {given.job!r} config, not a 'run' one")
        else:
            given = from_dict(RunConfig, apply_overrides(to_dict(saved), overrides))
        if Path(given.output_dir).resolve() != folder.resolve():
            changes.append(ConfigChange("output_dir", str(folder), given.output_dir))
    else:
        given = saved
    changes += config_changes(saved, given)
    refused = [c for c in changes if not c.safe]
    if refused:
        raise ResumeConfigError(folder, refused)
    return ResumePlan(replace(given, output_dir=str(folder)), changes, done, total)
