"""``moracl run``'s loop: moracl's strategy and the baselines on one stream, experience by
experience, with the accuracy matrix, checkpoints after every experience, logs and the report.

The caller (the continual job, :mod:`moracl.jobs.continual`, or a user) gives the stream and
the encoder; :func:`run_continual` sets up a :class:`RunState` (new, or restored from the
run's checkpoint), trains one experience at a time (:func:`train_experience`) and
checkpoints after each (:func:`save_run_checkpoint`).

Validation: before anything trains, a seeded share of each training experience's rows
(``scenario.val_share``, per class) is held out (:mod:`moracl.continual.splits`); the
strategies and all their plugins see only the rest. With ``train.early_stopping`` each
strategy stops each experience's training on its validation split
(:mod:`moracl.continual.stopping`). Model selection reads the validation matrices only; with
``evaluate_test=False`` the stream's test experiences are never read.

Order: for each experience ``i``, every strategy trains on it (Joint only once, on the whole
stream, at the last one) and is evaluated on every validation split and every test
experience, giving row ``i`` of its validation and test accuracy matrices; then one checkpoint
holds every strategy's state. Each (strategy, experience) pair seeds its own random streams,
so a resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moracl.continual.batches import derive_seed, materialize
from moracl.continual.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from moracl.continual.config import STRATEGIES, RunConfig, Setting, check_routing
from moracl.continual.evaluation import Evaluation, evaluate
from moracl.continual.factory import StreamInfo, build_model
from moracl.continual.metrics import (
    METRICS_FILE,
    AccuracyMatrix,
    Cost,
    RoutingDiagnostics,
    RunResults,
    StoppingRecord,
    StrategyResult,
)
from moracl.continual.model import ContinualClassifier
from moracl.continual.parallel import DataParallelPlugin
from moracl.continual.splits import Split, split_stream
from moracl.continual.stateful import PluginState, StatefulPlugin
from moracl.continual.stopping import EarlyStoppingPlugin
from moracl.continual.strategies import StrategyEntry, build_strategy, strategy_entry
from moracl.continual.strategy import EpochRecord, FastTemplate, MoRAStrategy
from moracl.continual.transfer import adopt_newer_routes
from moracl.distributed import barrier, init_distributed, shard_backbone
from moracl.guard import NonFiniteError, assert_finite
from moracl.model import MoRAModel
from moracl.parse_fields import to_dict
from moracl.preflight import check_common
from moracl.report import RunLogger, write_report, write_run_manifest
from moracl.runlock import lock_run_folder, process_rank

__all__ = [
    "ContinualStream",
    "Evaluation",
    "RunState",
    "StrategyProgress",
    "evaluate",
    "progress_text",
    "run_continual",
    "save_run_checkpoint",
    "train_experience",
    "trained_state",
]

#: the prefix of a plugin's tensors in a strategy's checkpoint file
PLUGIN_PREFIX = "plugins."


class ContinualStream(Protocol):
    """A continual stream as the run reads it (``moracl_scenarios``' ``Stream`` is one): an
    Avalanche benchmark (``train_stream``, ``test_stream``; the latter is not read by a run
    with ``evaluate_test=False``) and its description."""

    @property
    def benchmark(self) -> Any: ...

    @property
    def info(self) -> StreamInfo: ...


# -- state ----------------------------------------------------------------------------------


@dataclass
class StrategyProgress:
    """One strategy of a run and what it measured so far: its test ``matrix`` (``None``
    when the run does not evaluate the test split), its ``validation`` matrix (``None``
    without a validation split), its early-stopping records and its early-stopping plugin
    (``None`` without ``train.early_stopping``)."""

    entry: StrategyEntry
    strategy: FastTemplate
    matrix: AccuracyMatrix | None
    validation: AccuracyMatrix | None = None
    seconds: float = 0.0
    train_seconds: float = 0.0
    routing: RoutingDiagnostics | None = None
    experts_per_token: float | None = None
    stopping: list[StoppingRecord] = field(default_factory=list)
    stopper: EarlyStoppingPlugin | None = None

    @property
    def model(self) -> ContinualClassifier:
        """The strategy's classifier."""
        model = self.strategy.model
        if not isinstance(model, ContinualClassifier):
            raise TypeError(f"expected a ContinualClassifier, got {type(model).__name__}")
        return model


@dataclass
class RunState:
    """A run between experiences: its strategies, data and results so far.

    Attributes:
        config: the run's config.
        run_dir: the run folder.
        train_exps: the stream's training experiences without their validation rows.
        tests: each test experience as ``(x, y, t)`` tensors (``None``: the run does not
            evaluate the test split, which it never reads).
        strategies: per strategy name (in the order runs report them), its progress.
        results: the results file's content, rebuilt after each experience.
        frozen: ids of the encoder's tensors (shared by every strategy, never saved).
        backbone_parameters: the encoder's parameter count.
        start: the first experience still to train.
        main: this process writes the run folder (rank 0).
        validation: each experience's validation split as ``(x, y, t)`` tensors (empty:
            ``scenario.val_share`` is 0).
    """

    config: RunConfig
    run_dir: Path
    train_exps: list[Any]
    tests: list[Split] | None
    strategies: dict[str, StrategyProgress]
    results: RunResults
    frozen: set[int]
    backbone_parameters: int
    start: int = 0
    main: bool = True
    logger: Any = field(default=None)
    validation: list[Split] = field(default_factory=list)

    @property
    def num_experiences(self) -> int:
        return len(self.train_exps)


def _frozen_ids(encoder: nn.Module) -> set[int]:
    return {id(p) for p in encoder.parameters()} | {id(b) for b in encoder.buffers()}


def trained_state(model: nn.Module, frozen: set[int]) -> dict[str, Tensor]:
    """The model's state without the tensors it shares with the pretrained encoder."""
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in frozen:
            out[name] = value.detach().clone()
    return out


def _stateful(strategy: FastTemplate) -> list[StatefulPlugin]:
    plugins = [p for p in strategy.plugins if isinstance(p, StatefulPlugin)]
    keys = [p.state_key for p in plugins]
    if len(set(keys)) != len(keys):
        raise ValueError(f"strategy {strategy.name!r} has plugins sharing a state key: {keys}")
    return plugins


def plugin_states(strategy: FastTemplate) -> dict[str, PluginState]:
    """Each checkpointed plugin's state, by its ``state_key``."""
    return {p.state_key: p.state_dict() for p in _stateful(strategy)}


def _plugin_tensors(states: dict[str, PluginState]) -> dict[str, Tensor]:
    return {
        f"{PLUGIN_PREFIX}{key}.{name}": t
        for key, s in states.items()
        for name, t in s.tensors.items()
    }


# -- setup ----------------------------------------------------------------------------------


def _check_stream(config: RunConfig, info: StreamInfo) -> None:
    """The config's scenario and routing against the stream it is given."""
    setting = Setting(getattr(info.setting, "value", info.setting))
    wanted = config.scenario.setting
    if wanted is not None and wanted is not setting:
        raise ValueError(
            f"scenario.setting={wanted.value!r} but the stream given is {setting.value!r}"
        )
    check_routing(config, task_aware=setting is Setting.TASK)


def _setup(
    config: RunConfig,
    stream: ContinualStream,
    encoder: nn.Module,
    dev: torch.device,
    ckpt: Checkpoint | None,
    saved: RunResults | None,
    world: int,
    evaluate_test: bool = True,
) -> RunState:
    """Hold out the validation splits and build every strategy; a resumed run restores
    them from ``ckpt``, a new one measures their initial accuracies (on the test
    experiences only with ``evaluate_test``, which otherwise are never read)."""
    info = stream.info
    if saved is not None and saved.experiences != list(info.experience_names):
        where = ckpt.folder if ckpt is not None else config.output_dir
        raise ValueError(
            f"{where}: the checkpoint's experiences {saved.experiences} are not the "
            f"stream's {list(info.experience_names)}; refusing to resume from it"
        )
    t = config.train
    held_out = split_stream(stream.benchmark.train_stream, config.scenario.val_share, t.seed)
    train_exps, validation = held_out.train, held_out.validation
    tests = None
    if evaluate_test:
        tests = [materialize(e.dataset) for e in stream.benchmark.test_stream]
    encoder = encoder.to(dev)
    frozen = _frozen_ids(encoder)
    backbone = sum(p.numel() for p in encoder.parameters())
    progress: dict[str, StrategyProgress] = {}
    for name in [n for n in STRATEGIES if n in config.strategies]:
        torch.manual_seed(derive_seed(t.seed, name, "init"))
        model = build_model(name, config, encoder, info).to(dev)
        if config.distributed.shard_backbone:
            frozen |= {id(p) for p in shard_backbone(model.encoder)}
        strategy = build_strategy(name, config, model, dev)
        if world > 1:
            strategy.plugins.append(DataParallelPlugin(bucket_mb=config.distributed.bucket_mb))
        stopper = None
        if t.early_stopping is not None:
            # first: the best weights are back before any other plugin's after_training_exp
            stopper = EarlyStoppingPlugin(t.early_stopping, batch_size=t.eval_batch_size)
            strategy.plugins.insert(0, stopper)
        empty = AccuracyMatrix.empty(len(train_exps))
        progress[name] = StrategyProgress(
            strategy_entry(name),
            strategy,
            matrix=empty if tests is not None else None,
            validation=empty if validation else None,
            stopper=stopper,
        )
    results = RunResults(
        scenario=info.name,
        setting=Setting(getattr(info.setting, "value", info.setting)).value,
        seed=t.seed,
        experiences=list(info.experience_names),
        config=to_dict(config),
        test_evaluated=tests is not None,
    )
    state = RunState(
        config, Path(config.output_dir), train_exps, tests, progress, results, frozen, backbone
    )
    state.validation = validation
    if ckpt is not None and saved is not None:
        state.start = ckpt.experience + 1
        for name, p in progress.items():
            r = saved.strategies[name]
            p.matrix, p.validation, p.routing = r.matrix, r.validation, r.routing
            p.stopping = list(r.early_stopping)
            p.seconds, p.train_seconds = r.cost.wall_seconds, r.cost.train_seconds
            p.experts_per_token = ckpt.state[name].get("experts_per_token")
            _restore(
                p.strategy, name, ckpt.tensors[name], ckpt.state[name], train_exps, ckpt.experience
            )
    else:
        for p in progress.values():
            if p.matrix is not None and tests is not None:
                p.matrix = p.matrix.set_initial(
                    evaluate(p.model, tests, t.eval_batch_size).accuracies
                )
            if p.validation is not None:
                ev = evaluate(p.model, validation, t.eval_batch_size)
                p.validation = p.validation.set_initial(ev.accuracies)
    return state


# -- one experience -------------------------------------------------------------------------


def train_experience(state: RunState, i: int, bar: Any) -> None:
    """Train every strategy on experience ``i`` (Joint on the whole stream at the last
    one), evaluate it on every validation split and test experience and log row ``i`` of
    its matrices."""
    t = state.config.train
    last = state.num_experiences - 1
    for name, p in state.strategies.items():
        label, strategy = p.entry.label, p.strategy
        if p.entry.trains_once and i < last:
            bar.update()
            continue
        torch.manual_seed(derive_seed(t.seed, name, i))
        bar.set_postfix_str(f"{label} on experience {i}")
        began = time.perf_counter()
        epochs = _EpochLog(state.logger, bar, label, i, began - p.train_seconds)
        strategy.epoch_listener = epochs
        if p.stopper is not None:
            p.stopper.watch(state.validation if p.entry.trains_once else [state.validation[i]], i)
            p.stopper.epoch_listener = _ValidationLog(state.logger, label, i)
        try:
            strategy.train(state.train_exps if p.entry.trains_once else state.train_exps[i])
        finally:
            strategy.epoch_listener = None
            if p.stopper is not None:
                p.stopper.epoch_listener = None
        if p.stopper is not None and p.stopper.last is not None:
            p.stopping.append(p.stopper.last)
            state.logger.log_early_stopping(label, p.stopper.last)
        if isinstance(strategy, MoRAStrategy) and _adopts_newer(state.config) and state.validation:
            adopt_newer_routes(p.model, i, state.validation, batch_size=t.eval_batch_size)
        # EWC's importances are squared gradients: finite steps can still overflow them
        assert_finite(
            _plugin_tensors(plugin_states(strategy)),
            f"moracl run: strategy {label!r}, experience {i}: its plugin state overflowed "
            f"(training diverged; lower the learning rate)",
        )
        trained = time.perf_counter()
        ev_val = ev = None
        if p.validation is not None:
            ev_val = evaluate(p.model, state.validation, t.eval_batch_size)
        if p.matrix is not None and state.tests is not None:
            ev = evaluate(p.model, state.tests, t.eval_batch_size)
        p.train_seconds += trained - began
        p.seconds += time.perf_counter() - began
        if ev_val is not None and p.validation is not None:
            _check_eval_losses(label, i, ev_val.losses, "validation split")
            p.validation = p.validation.set_row(i, ev_val.accuracies)
            for j, (acc, loss) in enumerate(zip(ev_val.accuracies, ev_val.losses)):
                state.logger.log_validation(
                    label, after_experience=i, eval_experience=j, accuracy=acc, loss=loss
                )
        if ev is not None and p.matrix is not None:
            _check_eval_losses(label, i, ev.losses, "test experience")
            p.matrix = p.matrix.set_row(i, ev.accuracies)
            for j, (acc, loss) in enumerate(zip(ev.accuracies, ev.losses)):
                state.logger.log_eval(
                    label, after_experience=i, eval_experience=j, accuracy=acc, loss=loss
                )
        stopped = p.stopper.last if p.stopper is not None else None
        _progress_line(bar, state, i, label, epochs.losses, stopped, ev_val, ev, began)
        ev = ev if ev is not None else ev_val  # routing diagnostics: test, else validation
        if ev is not None and ev.experts_per_token is not None:
            p.experts_per_token = ev.experts_per_token
            p.routing = RoutingDiagnostics(
                expert_usage=ev.expert_usage, task_inference_accuracy=ev.task_inference
            )
        bar.update()
    _fill_results(state)


def progress_text(
    experience: int,
    experiences: int,
    label: str,
    losses: Sequence[float | None],
    seen: dict[str, float],
    seconds: float,
    stopped: StoppingRecord | None = None,
) -> str:
    """One progress line of a strategy's experience, e.g. ``[moracl] exp 2/5 EWC: loss
    0.912 0.533 0.412 (3 epochs), seen acc val 81.0% test 78.5%, 12.3 s``.

    Args:
        experience: the experience trained (0-based; the line counts from 1).
        experiences: the experiences of the stream.
        label: the strategy's display name.
        losses: the mean training loss of each epoch (``None``: every step skipped).
        seen: split name -> mean accuracy over the experiences seen so far, in ``[0, 1]``.
        seconds: the strategy's time on this experience (training and evaluation).
        stopped: early stopping's record, when it watched this experience.
    """
    text = " ".join("skipped" if x is None else f"{x:.3f}" for x in losses) or "none"
    epochs = f"{len(losses)} epoch" + ("" if len(losses) == 1 else "s")
    if stopped is not None:
        epochs += f", kept epoch {stopped.best_epoch + 1}"
    line = f"[moracl] exp {experience + 1}/{experiences} {label}: loss {text} ({epochs})"
    if seen:
        line += ", seen acc " + " ".join(f"{k} {100 * v:.1f}%" for k, v in seen.items())
    return f"{line}, {seconds:.1f} s"


def _progress_line(
    bar: Any,
    state: RunState,
    i: int,
    label: str,
    losses: Sequence[float | None],
    stopped: StoppingRecord | None,
    ev_val: Evaluation | None,
    ev: Evaluation | None,
    began: float,
) -> None:
    """Write :func:`progress_text` above the progress bar (stderr) unless it is off."""
    if getattr(bar, "disable", True):  # --quiet, or not the main process
        return
    seen = {
        name: sum(e.accuracies[: i + 1]) / (i + 1)
        for name, e in (("val", ev_val), ("test", ev))
        if e is not None
    }
    line = progress_text(
        i, state.num_experiences, label, losses, seen, time.perf_counter() - began, stopped
    )
    bar.write(line, file=sys.stderr)


def _adopts_newer(config: RunConfig) -> bool:
    """Whether moracl's routing lets old tasks adopt newer routing rows (``adopt_newer``)."""
    return bool(getattr(config.experts.routing, "adopt_newer", False))


def _fill_results(state: RunState) -> None:
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    for p in state.strategies.values():
        model = p.model
        cost = Cost(
            trainable_parameters=sum(
                q.numel() for q in model.parameters() if id(q) not in state.frozen
            ),
            backbone_parameters=state.backbone_parameters,
            active_parameters_per_token=_active_per_token(model, p.experts_per_token),
            wall_seconds=p.seconds,
            train_seconds=p.train_seconds,
            peak_memory_bytes=peak,
        )
        state.results.strategies[p.entry.name] = StrategyResult(
            name=p.entry.name,
            label=p.entry.label,
            matrix=p.matrix,
            cost=cost,
            routing=p.routing,
            steps=p.strategy.step_guard.steps,
            skipped_steps=p.strategy.step_guard.skipped,
            validation=p.validation,
            early_stopping=list(p.stopping),
        )


def _active_per_token(model: ContinualClassifier, experts_per_token: float | None) -> float:
    """Adapter, router and head parameters one token's prediction uses: for mixtures the
    measured mean experts per token times an expert's size, plus the routers."""
    encoder = model.encoder
    total = 0.0
    head = sum(p.numel() for p in model.heads[-1].parameters())
    if isinstance(encoder, MoRAModel) and list(encoder.mixtures()):
        for _, m in encoder.mixtures():
            expert = sum(p.numel() for p in m.banks.parameters()) / m.num_experts
            total += expert * (experts_per_token or 1.0)
            total += sum(p.numel() for p in m.router.parameters())
    elif isinstance(encoder, MoRAModel):
        frozen = {id(p) for p in encoder.model.parameters() if not p.requires_grad}
        total += sum(p.numel() for p in encoder.parameters() if id(p) not in frozen)
    return total + head


def _check_eval_losses(
    label: str, experience: int, losses: Sequence[float], what: str = "experience"
) -> None:
    """Raise :class:`NonFiniteError` if an evaluation loss is not finite (the model's
    outputs are not: nothing of it may be logged or saved); ``what`` names the data."""
    for j, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"moracl run: strategy {label!r} after experience {experience}: the evaluation "
                f"loss on {what} {j} is {loss}; the model's outputs are not finite"
            )


# -- checkpoints ----------------------------------------------------------------------------


def save_run_checkpoint(state: RunState, i: int) -> None:
    """Checkpoint every strategy after experience ``i`` (rank 0 writes it, with the results
    and the manifest; the other processes wait until it is complete)."""
    values: dict[str, Any] = {}
    tensors: dict[str, dict[str, Tensor]] = {}
    for name, p in state.strategies.items():
        strategy = p.strategy
        plugins = plugin_states(strategy)
        entry: dict[str, Any] = {
            "experts_per_token": p.experts_per_token,
            "steps": strategy.step_guard.steps,  # the global step count of the logs
            "skipped_steps": strategy.step_guard.skipped,
            "plugins": {key: s.values for key, s in plugins.items()},
        }
        if isinstance(strategy, MoRAStrategy):
            entry["experiences_prepared"] = strategy.experiences_prepared
        values[name] = entry
        tensors[name] = {**trained_state(strategy.model, state.frozen), **_plugin_tensors(plugins)}
    if state.main:
        save_checkpoint(state.run_dir, i, tensors, values, {"results": state.results.to_dict()})
        state.results.save(state.run_dir)
        write_run_manifest(state.run_dir)  # the run folder's outputs so far
    barrier()


def _restore(
    strategy: FastTemplate,
    name: str,
    tensors: dict[str, Tensor],
    state: dict[str, Any],
    train_exps: list[Any],
    last: int,
) -> None:
    """Put a strategy back in the state it had after experience ``last``."""
    model = strategy.model
    if isinstance(strategy, MoRAStrategy):
        strategy.prepare(int(state["experiences_prepared"]) - 1)
    strategy.clock.train_exp_counter = last + 1  # EWC reads it
    strategy.step_guard.steps = int(state["steps"])
    strategy.step_guard.skipped = int(state["skipped_steps"])
    own = {k: v for k, v in tensors.items() if not k.startswith(PLUGIN_PREFIX)}
    missing, unexpected = model.load_state_dict(own, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint of {name!r} has tensors the model lacks: {unexpected[:5]}")
    current = dict(model.state_dict(keep_vars=True))
    lost = [k for k in missing if current[k].requires_grad]
    if lost:
        raise ValueError(f"checkpoint of {name!r} lacks trainable tensors: {lost[:5]}")
    saved_plugins = state.get("plugins", {})
    for plugin in _stateful(strategy):
        key = plugin.state_key
        prefix = f"{PLUGIN_PREFIX}{key}."
        plugin.load_state_dict(
            PluginState(
                tensors={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
                values=dict(saved_plugins.get(key, {})),
            ),
            strategy=strategy,
            trained=train_exps[: last + 1],
        )


# -- the run --------------------------------------------------------------------------------


def run_continual(
    config: RunConfig,
    *,
    stream: ContinualStream,
    encoder: nn.Module,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
    evaluate_test: bool = True,
) -> RunResults:
    """Run ``config`` on ``stream`` over ``encoder``; returns the results (also in
    ``RUN_DIR/metrics.json``).

    Args:
        config: the run.
        stream: the stream to learn (``config.scenario`` describes it; the continual job,
            :func:`moracl.jobs.continual.run`, builds it from there).
        encoder: the frozen feature encoder (``feature_dim``, ``default_targets``), shared
            by every strategy; moved to the run's device.
        resume: continue from the newest checkpoint in ``config.output_dir``; ``config``
            must be the run's saved config (:func:`moracl.jobs.continual.resume_config`
            gives it), up to the keys a resumed run may change. A finished run is not
            trained again: its results are returned (and its report rebuilt if missing).
        progress: show progress bars.
        stop_after: stop after this experience (as if interrupted), for tests and demos.
        device: where to train (``cuda``: each process of a ``torchrun`` launch takes
            ``cuda:LOCAL_RANK``).
        evaluate_test: evaluate every strategy on the test experiences; ``False`` never reads
            ``stream.benchmark.test_stream`` (a run for model selection: the initial
            accuracies and every row are measured on the validation splits only, every
            ``StrategyResult.matrix`` is ``None`` and ``RunResults.test_evaluated`` false).
            A resumed run must pass the value it was started with.

    The run folder is locked for the whole run (:mod:`moracl.runlock`): a second job writing
    there is refused at once, naming this one. Every output is covered by a checksum: the
    checkpoints by their own (:mod:`moracl.continual.checkpoint`), ``metrics.json``, the
    report, plots and logs by ``RUN_DIR/manifest.json``, rewritten after each checkpoint and
    at the end.

    Launched by ``torchrun`` with more than one process, the run is data-parallel
    (:mod:`moracl.distributed`, ``config.distributed``): every global mini-batch is split
    across the processes, evaluation batches are dealt to them, and only rank 0 writes the
    checkpoints, logs, metrics and report (and takes the lock). A checkpoint holds no trace
    of the number of processes, so ``resume`` works with any.

    Raises:
        RunFolderBusyError: another job holds the run folder.
        ValueError: a config that fails its checks or does not match the stream; the output
            folder already holds a run (or another job's results) and ``resume`` is off; a
            checkpoint that cannot be trusted or does not match ``config`` (left untouched,
            as every file of the folder); a log changed since the last checkpoint;
            ``evaluate_test=False`` with ``scenario.val_share=0`` (nothing would be
            measured); a resumed run whose ``evaluate_test`` differs from its start's.
        FileNotFoundError: ``resume`` and the folder has no checkpoint.
    """
    check_common(config, device=device)  # fields, output folder, device: before any work
    _check_stream(config, stream.info)
    if not isinstance(evaluate_test, bool):
        raise ValueError(f"evaluate_test={evaluate_test!r}; expected True or False")
    if not evaluate_test and config.scenario.val_share == 0:
        raise ValueError(
            "evaluate_test=False measures the run on its validation splits only, but "
            "scenario.val_share=0 holds none out: set scenario.val_share > 0 (e.g. 0.1)"
        )
    with lock_run_folder(config.output_dir, "moracl run"):
        return _run_locked(
            config,
            stream,
            encoder,
            resume=resume,
            progress=progress,
            stop_after=stop_after,
            device=device,
            evaluate_test=evaluate_test,
        )


def _labels(config: RunConfig) -> dict[str, str]:
    return {n: strategy_entry(n).label for n in STRATEGIES if n in config.strategies}


def _open_run_folder(
    run_dir: Path, config: RunConfig, resume: bool, evaluate_test: bool = True
) -> tuple[Checkpoint | None, RunResults | None]:
    """Refuse a folder this run must not write, or a checkpoint it must not resume from;
    returns the verified checkpoint and its results so far (``(None, None)`` for a new run).
    """
    from moracl.continual.resume import check_resume
    from moracl.report import MANIFEST_FILE, REPORT_FILE, verify_run_manifest
    from moracl.runlock import refuse_earlier_results

    if not resume:
        if os.path.lexists(run_dir / "checkpoints" / "latest.json"):
            raise ValueError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose "
                f"another output_dir"
            )
        refuse_earlier_results(run_dir, (METRICS_FILE, REPORT_FILE, MANIFEST_FILE), "moracl run")
        return None, None
    try:
        ckpt = load_checkpoint(run_dir, tensors=False)  # every file verified, none loaded
    except FileNotFoundError:
        raise FileNotFoundError(f"nothing to resume: {run_dir} has no checkpoint") from None
    saved = check_resume(ckpt, config, _labels(config))
    _check_test_evaluation(run_dir, saved, evaluate_test)
    if process_rank() == 0:  # the logs a resumed run appends to must be the run's own
        verify_run_manifest(run_dir, append_only=True)
    ckpt.load_tensors()
    return ckpt, saved


def _check_test_evaluation(run_dir: Path, saved: RunResults, evaluate_test: bool) -> None:
    """Refuse to resume a run with another ``evaluate_test`` than it was started with: its
    test matrices would have rows missing (or rows a run for selection must not have)."""
    if saved.test_evaluated == evaluate_test:
        return
    if evaluate_test:
        raise ValueError(
            f"{run_dir} was run with evaluate_test=False: it never read its test split, so "
            f"the test rows of the experiences it trained are missing; resume it with "
            f"evaluate_test=False, or run its config again in a new output_dir with the test "
            f"split evaluated"
        )
    raise ValueError(
        f"{run_dir} was run with the test split evaluated; resuming it with "
        f"evaluate_test=False would leave its later test rows missing: resume it with "
        f"evaluate_test=True"
    )


def _finished(run_dir: Path, saved: RunResults) -> RunResults:
    """A resumed run whose checkpoint is after its last experience: nothing to train. Its
    ``metrics.json``, report and manifest are rewritten from the verified checkpoint only
    when they do not match it (a run interrupted after its last checkpoint)."""
    from moracl.report.manifest import RunManifestError, verify_run_manifest

    if process_rank() != 0:
        return saved
    try:
        intact = (
            RunResults.load(run_dir / METRICS_FILE).to_dict() == saved.to_dict()
            and (run_dir / "report.md").is_file()
            and not verify_run_manifest(run_dir).derived_changed
            and (run_dir / "manifest.json").is_file()
        )
    except (FileNotFoundError, ValueError):  # RunManifestError included
        intact = False
    if not intact:
        metrics = run_dir / METRICS_FILE
        if metrics.exists():
            try:
                RunResults.load(metrics)
            except ValueError:
                raise RunManifestError(
                    f"{metrics} is not this run's results file; refusing to replace it"
                ) from None
        saved.save(run_dir)
        write_report(run_dir)
        write_run_manifest(run_dir)
    return saved


def _run_locked(
    config: RunConfig,
    stream: ContinualStream,
    encoder: nn.Module,
    *,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    device: str | torch.device,
    evaluate_test: bool = True,
) -> RunResults:
    """:func:`run_continual` with its folder locked."""
    run_dir = Path(config.output_dir)
    ckpt, saved = _open_run_folder(run_dir, config, resume, evaluate_test)
    if ckpt is not None and saved is not None and ckpt.experience + 1 >= len(saved.experiences):
        return _finished(run_dir, saved)
    env = init_distributed(config.distributed.backend, device)
    state = _setup(config, stream, encoder, env.device, ckpt, saved, env.world_size, evaluate_test)
    state.main = env.is_main
    state.logger = RunLogger(run_dir, resume_after=state.start - 1) if env.is_main else _NoLogger()
    names = len(state.strategies)
    bar = tqdm(
        total=(state.num_experiences - state.start) * names,
        disable=not progress or not env.is_main,
        desc="moracl run",
    )
    try:
        for i in range(state.start, state.num_experiences):
            train_experience(state, i, bar)
            save_run_checkpoint(state, i)
            if stop_after is not None and i >= stop_after:
                break
    finally:
        bar.close()
        state.logger.close()
    if env.is_main:
        write_report(run_dir)
        write_run_manifest(run_dir)  # the outputs as the run leaves them
    barrier()
    return state.results


class _NoLogger:
    """The run logger of the processes other than rank 0: writes nothing."""

    def log_train(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_train_steps(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_eval(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_validation(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_validation_epoch(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_early_stopping(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _ValidationLog:
    """Logs the validation loss and accuracy early stopping measures after each epoch
    (``logs/validation_epochs.csv``, TensorBoard)."""

    def __init__(self, logger: Any, label: str, experience: int) -> None:
        self.logger, self.label, self.experience = logger, label, experience

    def __call__(self, epoch: int, loss: float, accuracy: float) -> None:
        self.logger.log_validation_epoch(
            self.label, experience=self.experience, epoch=epoch, loss=loss, accuracy=accuracy
        )


class _EpochLog:
    """Logs each epoch a strategy ends (``logs/train.csv``, TensorBoard) and shows its loss
    in the progress bar.

    Args:
        logger: the run's logger.
        bar: the run's progress bar.
        label: the strategy's display name.
        experience: the run's experience being trained (Joint trains at the last one).
        origin: ``time.perf_counter()`` at which the strategy's training time would have
            started had it trained without a break (its train seconds so far subtracted).
    """

    def __init__(self, logger: Any, bar: Any, label: str, experience: int, origin: float):
        self.logger, self.bar, self.label = logger, bar, label
        self.experience, self.origin = experience, origin
        self.losses: list[float | None] = []  # each epoch's mean loss, for the progress line

    def __call__(self, record: EpochRecord) -> None:
        self.logger.log_train(
            self.label,
            experience=self.experience,
            epoch=record.epoch,
            step=record.step,
            loss=record.loss,
            lr=record.lr,
            seconds=max(record.finished - self.origin, 0.0),
        )
        self.logger.log_train_steps(self.label, record.step_losses)
        self.losses.append(record.loss)
        loss = "all steps skipped" if record.loss is None else f"loss {record.loss:.4f}"
        skipped = f", {record.skipped} skipped" if record.skipped else ""
        self.bar.set_postfix_str(
            f"{self.label} on experience {self.experience}, epoch {record.epoch}: {loss}{skipped}"
        )
