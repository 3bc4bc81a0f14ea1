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

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moracl.continual.batches import derive_seed, materialize
from moracl.continual.checkpoint import Checkpoint, save_checkpoint
from moracl.continual.config import STRATEGIES, RunConfig, Setting, check_routing
from moracl.continual.evaluation import Evaluation, evaluate
from moracl.continual.factory import StreamInfo, build_model
from moracl.continual.metrics import AccuracyMatrix, RoutingDiagnostics, RunResults
from moracl.continual.parallel import DataParallelPlugin
from moracl.continual.run_folder import finished_run, open_run_folder
from moracl.continual.run_progress import (
    EpochLog,
    NoLogger,
    ValidationLog,
    progress_line,
    progress_text,
)
from moracl.continual.run_state import (
    ContinualStream,
    RunState,
    StrategyProgress,
    check_eval_losses,
    fill_results,
    frozen_ids,
    plugin_states,
    plugin_tensors,
    restore_strategy,
    trained_state,
)
from moracl.continual.splits import split_stream
from moracl.continual.stopping import EarlyStoppingPlugin
from moracl.continual.strategies import build_strategy, strategy_entry
from moracl.continual.strategy import MoRAStrategy
from moracl.continual.transfer import adopt_newer_routes
from moracl.distributed import barrier, init_distributed, shard_backbone
from moracl.guard import assert_finite
from moracl.parse_fields import to_dict
from moracl.preflight import check_common
from moracl.report import RunLogger, write_report, write_run_manifest
from moracl.runlock import lock_run_folder

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
    frozen = frozen_ids(encoder)
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
            restore_strategy(
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
        epochs = EpochLog(state.logger, bar, label, i, began - p.train_seconds)
        strategy.epoch_listener = epochs
        if p.stopper is not None:
            p.stopper.watch(state.validation if p.entry.trains_once else [state.validation[i]], i)
            p.stopper.epoch_listener = ValidationLog(state.logger, label, i)
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
            plugin_tensors(plugin_states(strategy)),
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
            check_eval_losses(label, i, ev_val.losses, "validation split")
            p.validation = p.validation.set_row(i, ev_val.accuracies)
            for j, (acc, loss) in enumerate(zip(ev_val.accuracies, ev_val.losses)):
                state.logger.log_validation(
                    label, after_experience=i, eval_experience=j, accuracy=acc, loss=loss
                )
        if ev is not None and p.matrix is not None:
            check_eval_losses(label, i, ev.losses, "test experience")
            p.matrix = p.matrix.set_row(i, ev.accuracies)
            for j, (acc, loss) in enumerate(zip(ev.accuracies, ev.losses)):
                state.logger.log_eval(
                    label, after_experience=i, eval_experience=j, accuracy=acc, loss=loss
                )
        stopped = p.stopper.last if p.stopper is not None else None
        progress_line(bar, state, i, label, epochs.losses, stopped, ev_val, ev, began)
        ev = ev if ev is not None else ev_val  # routing diagnostics: test, else validation
        if ev is not None and ev.experts_per_token is not None:
            p.experts_per_token = ev.experts_per_token
            p.routing = RoutingDiagnostics(
                expert_usage=ev.expert_usage, task_inference_accuracy=ev.task_inference
            )
        bar.update()
    fill_results(state)


def _adopts_newer(config: RunConfig) -> bool:
    """Whether moracl's routing lets old tasks adopt newer routing rows (``adopt_newer``)."""
    return bool(getattr(config.experts.routing, "adopt_newer", False))


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
        tensors[name] = {**trained_state(strategy.model, state.frozen), **plugin_tensors(plugins)}
    if state.main:
        save_checkpoint(state.run_dir, i, tensors, values, {"results": state.results.to_dict()})
        state.results.save(state.run_dir)
        write_run_manifest(state.run_dir)  # the run folder's outputs so far
    barrier()


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
    ckpt, saved = open_run_folder(run_dir, config, resume, evaluate_test)
    if ckpt is not None and saved is not None and ckpt.experience + 1 >= len(saved.experiences):
        return finished_run(run_dir, saved)
    env = init_distributed(config.distributed.backend, device)
    state = _setup(config, stream, encoder, env.device, ckpt, saved, env.world_size, evaluate_test)
    state.main = env.is_main
    state.logger = RunLogger(run_dir, resume_after=state.start - 1) if env.is_main else NoLogger()
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
