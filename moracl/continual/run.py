"""``moracl run``: moracl's strategy and the baselines on one stream, experience by experience,
with the accuracy matrix, checkpoints after every experience, logs and the report.

Order: for each experience ``i``, every strategy trains on it (Joint only once, on the whole
stream, at the last one) and is evaluated on every test experience, giving row ``i`` of its
accuracy matrix; then one checkpoint holds every strategy's state. Each (strategy,
experience) pair seeds its own random streams, so a resumed run ends exactly where an
uninterrupted one does.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from moracl.adapters.base import AdapterConfig
from moracl.continual.checkpoint import load_checkpoint, save_checkpoint
from moracl.continual.config import STRATEGIES, RunConfig, check_routing, router_kind
from moracl.continual.inference import GaussianTaskInference
from moracl.continual.metrics import (
    AccuracyMatrix,
    Cost,
    RoutingDiagnostics,
    RunResults,
    StrategyResult,
)
from moracl.continual.model import ContinualClassifier
from moracl.continual.parallel import DataParallelPlugin
from moracl.continual.strategy import (
    EpochRecord,
    FastTemplate,
    GrowthConfig,
    MoRAStrategy,
    TensorBatches,
    derive_seed,
    expert_experience,
    materialize,
)
from moracl.distributed import (
    all_reduce_sum,
    barrier,
    init_distributed,
    rank,
    shard_backbone,
    world_size,
)
from moracl.experts.mixture import MixtureConfig
from moracl.experts.routers.config import RouterConfig
from moracl.guard import NonFiniteError, assert_finite
from moracl.model import MoRAModel
from moracl.runlock import lock_run_folder, process_rank

__all__ = ["Evaluation", "build_strategy", "evaluate", "run_continual"]

LABELS = {
    "moracl": "moracl (experts)",
    "naive": "Naive",
    "ewc": "EWC",
    "lwf": "LwF",
    "replay": "Replay",
    "joint": "Joint",
}


# -- models and strategies ------------------------------------------------------------------


def _router(config: RunConfig, task_aware: bool) -> RouterConfig:
    # task or topk; refuses route_per with task routing and k > per_experience (as validate)
    if router_kind(config, task_aware=task_aware) == "task":
        return RouterConfig(type="task", num_tasks=1, task_weights=True)
    k = config.experts.k  # at most per_experience (router_kind)
    # top-1 gates renormalised over one expert are a constant 1: Switch's gate (the chosen
    # expert's probability) lets the task loss train the router
    return RouterConfig(
        type="topk", k=k, noise=False, normalize=k > 1, per=config.experts.route_per
    )


def expert_adapter(config: RunConfig, router: RouterConfig | None = None) -> AdapterConfig:
    """The configuration of each of moracl's experts: ``config.adapter`` at rank
    ``experts.rank`` (when set), with ``alpha`` scaled alike so that ``alpha / rank`` (LoRA's
    scaling) stays the adapter's.

    Under a ``router`` that picks ``k > 1`` experts with gates renormalised to sum to 1,
    ``alpha`` is also multiplied by ``k``: the ``k`` rank-``r`` experts of a token then add up
    to the scale of one adapter of rank ``k·r`` (with gates summing to 1 they would give half
    of it for ``k = 2``, and train at half its pace).
    """
    base = config.adapter
    rank = config.experts.rank or base.rank
    scale = rank / base.rank
    if router is not None and router.type == "topk" and router.normalize and router.k > 1:
        scale *= router.k
    if rank == base.rank and scale == 1:
        return base
    data = {**base.to_dict(), "rank": rank}
    if "alpha" in data:
        data["alpha"] = float(data["alpha"]) * scale
    return AdapterConfig.from_dict(data)


def build_model(name: str, config: RunConfig, encoder: nn.Module, info: Any) -> ContinualClassifier:
    """The classifier of strategy ``name``: moracl gets a mixture, baselines one adapter."""
    task_aware = info.setting.value == "task"
    default: Any = encoder.default_targets
    targets = list(config.target_modules) or list(default)
    adapter: AdapterConfig | MixtureConfig = config.adapter
    e = config.experts
    infer = name == "moracl" and e.task_inference == "gaussian" and not task_aware
    if name == "moracl":
        check_routing(config, task_aware=task_aware)  # what `moracl validate` checks too
        router = _router(config, task_aware)
        expert = expert_adapter(config, router)
        adapter = MixtureConfig(
            kind=expert.kind,
            experts=config.experts.per_experience,
            router=router,
            groups=(),
            rank=expert.rank,
            options={k: v for k, v in expert.to_dict().items() if k not in ("kind", "rank")},
        )
    wrapped = MoRAModel(encoder, adapter, target_modules=targets)
    route = name == "moracl" and _router(config, task_aware).type == "task"
    by_row = route or (
        name == "moracl" and (e.route_supervision > 0 or e.balance_router_epochs > 0)
    )
    if by_row and hasattr(wrapped.model, "length_buckets"):
        # per-row task ids and per-row routing targets need every layer's tokens in batch
        # order: no regrouping of the rows by length
        setattr(wrapped.model, "length_buckets", 1)  # noqa: B010
    inference = None
    if infer:  # (task-incremental rows carry their task: nothing to infer)
        classes = 1 + max(c for cs in info.experience_classes for c in cs)
        inference = GaussianTaskInference(
            len(info.experience_classes), classes, shrinkage=e.inference_shrinkage
        )
    return ContinualClassifier(
        wrapped,
        int(getattr(encoder, "feature_dim")),  # noqa: B009
        info.experience_classes,
        multi_head=task_aware,
        route_by_task=route,
        task_inference=inference,
    )


def _optimizer_factory(config: RunConfig) -> Callable[[nn.Module], torch.optim.Optimizer]:
    train = config.train

    def build(model: nn.Module) -> torch.optim.Optimizer:
        heads = [
            p for n, p in model.named_parameters() if p.requires_grad and n.startswith("heads.")
        ]
        rest = [
            p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")
        ]
        groups = [
            {"params": rest, "lr": train.lr},
            {"params": heads, "lr": train.head_lr},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], weight_decay=train.weight_decay, foreach=True
        )

    return build


def build_strategy(
    name: str, config: RunConfig, model: ContinualClassifier, device: torch.device
) -> FastTemplate:
    """The strategy ``name`` over ``model`` (Avalanche plugins for the baselines)."""
    from avalanche.training.plugins import EWCPlugin, LwFPlugin

    from moracl.continual.plugins import (
        BalancedHeadPlugin,
        SeededReplayPlugin,
        TaskStatisticsPlugin,
    )

    t = config.train
    seed = derive_seed(t.seed, name)
    common: dict[str, Any] = dict(
        train_mb_size=t.batch_size,
        train_epochs=t.epochs,
        eval_mb_size=t.eval_batch_size,
        device=device,
        criterion=nn.CrossEntropyLoss(),
        loader_seed=seed,
        name=LABELS.get(name, name),
        job="moracl run",
        on_nonfinite=t.on_nonfinite,
    )
    factory = _optimizer_factory(config)
    b = config.baselines
    if name == "moracl":
        check_routing(config, task_aware=model.multi_head)
        growth = GrowthConfig(
            adapter=expert_adapter(config, _router(config, task_aware=model.multi_head)),
            experts=config.experts.per_experience,
            reuse_old=config.experts.reuse_old,
            freeze_heads=config.experts.freeze_heads,
        )
        plugins: list[Any] = []
        e = config.experts
        if e.replay_size:
            replay = SeededReplayPlugin(e.replay_size, seed=seed)
            if e.balance_head_epochs or e.balance_router_epochs:
                # before replay: it reads the buffer of earlier experiences
                balance = BalancedHeadPlugin(
                    replay,
                    epochs=e.balance_head_epochs,
                    lr=e.balance_head_lr,
                    seed=seed,
                    router_epochs=e.balance_router_epochs,
                    router_lr=e.balance_router_lr,
                    force_routes=e.teacher_forcing,
                )
                plugins.append(balance)
            plugins.append(replay)
        class_experience = None
        experience_labels = False
        if e.route_supervision:
            try:  # class-incremental: a row's experience is its class's
                class_experience = model.class_experience()
            except ValueError:  # domain-incremental: moracl labels each experience's rows
                experience_labels = True
        if model.task_inference is not None:
            # trained through its experience's experts: a row's task label is its experience
            experience_labels = True
            plugins.insert(0, TaskStatisticsPlugin(batch_size=t.eval_batch_size))
        return MoRAStrategy(
            model=model,
            optimizer_factory=factory,
            growth=growth,
            route_supervision=e.route_supervision,
            class_experience=class_experience,
            experience_labels=experience_labels,
            teacher_forcing=e.teacher_forcing,
            plugins=plugins,
            **common,
        )
    if name == "naive":
        return FastTemplate(model=model, optimizer_factory=factory, **common)
    if name == "ewc":
        return FastTemplate(
            model=model, optimizer_factory=factory, plugins=[EWCPlugin(b.ewc_lambda)], **common
        )
    if name == "lwf":
        plugin = LwFPlugin(alpha=b.lwf_alpha, temperature=b.lwf_temperature)
        return FastTemplate(model=model, optimizer_factory=factory, plugins=[plugin], **common)
    if name == "replay":
        plugin = SeededReplayPlugin(b.replay_size, seed=seed)
        return FastTemplate(model=model, optimizer_factory=factory, plugins=[plugin], **common)
    if name == "joint":
        from moracl.continual.plugins import FastJoint

        return FastJoint(model=model, optimizer_factory=factory, **common)
    raise ValueError(f"unknown strategy {name!r}; expected one of {list(LABELS)}")


# -- evaluation -----------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Accuracy and mean cross-entropy per test experience, with routing diagnostics when
    the model has mixtures."""

    accuracies: list[float]
    expert_usage: list[list[float]]
    task_inference: float | None
    experts_per_token: float | None
    losses: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate(
    model: ContinualClassifier, tests: Sequence[tuple[Tensor, Tensor, Tensor]], batch_size: int
) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on each test experience ``(x, y, t)``;
    for mixtures also the mean expert usage per experience and, for task-agnostic routing,
    how often a token's top expert was grown for the sample's own experience (task-inference
    accuracy; with ``task_inference``, how often a row's inferred experience is its own).

    The cross-entropy is that of the logits as the model gives them, summed in float64: a
    class the model cannot predict yet (masked with the lowest float) costs about 3.4e38.

    Under data parallelism the batches (the same as in one process) are dealt to the
    processes in turn and the counts summed, so every process returns the one-process
    result."""
    was_training = model.training
    model.eval()
    encoder = model.encoder
    if not isinstance(encoder, MoRAModel):
        raise TypeError(f"expected a MoRAModel encoder, got {type(encoder).__name__}")
    mixtures = list(encoder.mixtures())
    world, me = world_size(), rank()
    corrects, uses, n_uses, loss_sums = [], [], [], []
    hits = total = 0.0
    epts = []
    for j, (x, y, t) in enumerate(tests):
        correct, use, n_use = 0, None, 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        for b, (xb, yb, tb) in enumerate(TensorBatches((x, y, t), batch_size, shuffle=False)):
            if b % world != me:
                continue
            model.last_inferred = None
            logits = model(xb, tb)
            correct += int((logits.argmax(-1) == yb).sum())
            ce = F.cross_entropy(logits.double(), yb.to(logits.device), reduction="sum")
            loss_sum = loss_sum + ce.cpu()
            if model.last_inferred is not None:  # rows routed by their inferred experience
                hits += float((model.last_inferred == j).sum())
                total += len(yb)
            for path, mixture in mixtures:
                result = encoder.last_routing.get(path)
                if result is None:
                    continue
                u = result.stats.usage.float()
                use = u if use is None or use.shape != u.shape else use + u
                n_use += 1
                epts.append(float(result.stats.experts_per_token))
                if result.indices is not None and not model.route_by_task:
                    owner = expert_experience(mixture)[result.indices[:, 0]]
                    hits += float((owner == j).sum())
                    total += owner.numel()
        corrects.append(correct)
        uses.append(use)
        n_uses.append(n_use)
        loss_sums.append(loss_sum)
    model.train(was_training)
    epts_sum, epts_n = sum(epts), len(epts)
    if world > 1:
        experts = mixtures[0][1].num_experts if mixtures else 0
        rows = [
            torch.cat(
                [
                    torch.tensor([float(c), float(n)]),
                    u.cpu().double()
                    if u is not None
                    else torch.zeros(experts, dtype=torch.float64),
                ]
            )
            for c, u, n in zip(corrects, uses, n_uses)
        ]
        tail = torch.tensor([hits, total, epts_sum, float(epts_n)], dtype=torch.float64)
        flat = all_reduce_sum(torch.cat([*rows, torch.stack(loss_sums), tail]))
        hits, total, epts_sum = (float(v) for v in flat[-4:-1])
        epts_n = round(float(flat[-1]))
        loss_sums = list(flat[-4 - len(tests) : -4])
        parts = flat[: -4 - len(tests)].split(2 + experts)
        corrects = [round(float(p[0])) for p in parts]
        n_uses = [round(float(p[1])) for p in parts]
        uses = [p[2:] if n else None for p, n in zip(parts, n_uses)]
    usage = [[] if u is None else (u / max(n, 1)).tolist() for u, n in zip(uses, n_uses)]
    return Evaluation(
        accuracies=[c / len(y) for c, (_, y, _) in zip(corrects, tests)],
        expert_usage=usage,
        task_inference=hits / total if total else None,
        experts_per_token=epts_sum / epts_n if epts_n else None,
        losses=[float(s) / len(y) for s, (_, y, _) in zip(loss_sums, tests)],
    )


# -- state ----------------------------------------------------------------------------------


def _frozen_ids(encoder: nn.Module) -> set[int]:
    return {id(p) for p in encoder.parameters()} | {id(b) for b in encoder.buffers()}


def trained_state(model: nn.Module, frozen: set[int]) -> dict[str, Tensor]:
    """The model's state without the tensors it shares with the pretrained encoder."""
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in frozen:
            out[name] = value.detach().clone()
    return out


def _count(model: nn.Module, frozen: set[int]) -> int:
    return sum(p.numel() for p in model.parameters() if id(p) not in frozen)


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


# -- the run --------------------------------------------------------------------------------


def run_continual(
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> RunResults:
    """Run ``config``; returns the results (also in ``RUN_DIR/metrics.json``).

    Args:
        config: the run.
        resume: continue from the newest checkpoint in ``config.output_dir``; ``config``
            must be the run's saved config (:func:`moracl.continual.resume.resume_config`
            gives it), up to the keys a resumed run may change. A finished run is not
            trained again: its results are returned (and its report rebuilt if missing).
        progress: show progress bars.
        stop_after: stop after this experience (as if interrupted), for tests and demos.
        device: where to train (``cuda``: each process of a ``torchrun`` launch takes
            ``cuda:LOCAL_RANK``).

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
        ValueError: the output folder already holds a run (or another job's results) and
            ``resume`` is off; a checkpoint that cannot be trusted or does not match
            ``config`` (left untouched, as every file of the folder); a log changed since
            the last checkpoint; a config that does not match the stream.
        FileNotFoundError: ``resume`` and the folder has no checkpoint.
    """
    from moracl.preflight import check_config

    check_config(config, device=device)  # what moracl validate checks, before any work
    with lock_run_folder(config.output_dir, "moracl run"):
        return _run_locked(
            config, resume=resume, progress=progress, stop_after=stop_after, device=device
        )


def _open_run_folder(run_dir: Path, config: RunConfig, resume: bool) -> tuple[Any, Any]:
    """Refuse a folder this run must not write, or a checkpoint it must not resume from;
    returns the verified checkpoint and its results so far (``(None, None)`` for a new run).
    """
    from moracl.continual.metrics import METRICS_FILE
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
    labels = {n: LABELS[n] for n in STRATEGIES if n in config.strategies}
    saved = check_resume(ckpt, config, labels)
    if process_rank() == 0:  # the logs a resumed run appends to must be the run's own
        verify_run_manifest(run_dir, append_only=True)
    ckpt.load_tensors()
    return ckpt, saved


def _finished(run_dir: Path, saved: RunResults) -> RunResults:
    """A resumed run whose checkpoint is after its last experience: nothing to train. Its
    ``metrics.json``, report and manifest are rewritten from the verified checkpoint only
    when they do not match it (a run interrupted after its last checkpoint)."""
    from moracl.continual.metrics import METRICS_FILE
    from moracl.report import write_report, write_run_manifest
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
    *,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    device: str | torch.device,
) -> RunResults:
    """:func:`run_continual` with its folder locked."""
    import moracl_scenarios  # noqa: F401  (registers the streams and encoders)
    from moracl_scenarios.streams import build_stream, load_encoder

    from moracl.report import RunLogger, write_report, write_run_manifest

    run_dir = Path(config.output_dir)
    ckpt, saved = _open_run_folder(run_dir, config, resume)
    if saved is not None and ckpt.experience + 1 >= len(saved.experiences):
        return _finished(run_dir, saved)
    env = init_distributed(config.distributed.backend, device)
    dev, main = env.device, env.is_main
    t = config.train
    torch.manual_seed(t.seed)
    sc = config.scenario
    stream = build_stream(sc.name, setting=sc.setting, seed=t.seed, **sc.options)
    info = stream.info
    if saved is not None and saved.experiences != list(info.experience_names):
        raise ValueError(
            f"{ckpt.folder}: the checkpoint's experiences {saved.experiences} are not the "
            f"stream's {list(info.experience_names)}; refusing to resume from it"
        )
    train_exps = list(stream.benchmark.train_stream)
    tests = [materialize(e.dataset) for e in stream.benchmark.test_stream]
    num_exp = len(train_exps)

    encoder = load_encoder(info).to(dev)
    frozen = _frozen_ids(encoder)
    backbone = sum(p.numel() for p in encoder.parameters())
    names: list[str] = [n for n in STRATEGIES if n in config.strategies]
    strategies: dict[str, FastTemplate] = {}
    for name in names:
        torch.manual_seed(derive_seed(t.seed, name, "init"))
        model = build_model(name, config, encoder, info).to(dev)
        if config.distributed.shard_backbone:
            frozen |= {id(p) for p in shard_backbone(model.encoder)}
        strategies[name] = build_strategy(name, config, model, dev)
        if env.world_size > 1:
            plugin = DataParallelPlugin(bucket_mb=config.distributed.bucket_mb)
            strategies[name].plugins.append(plugin)

    from moracl.config import to_dict

    results = RunResults(
        scenario=info.name,
        setting=info.setting.value,
        seed=t.seed,
        experiences=list(info.experience_names),
        config=to_dict(config),
    )
    matrices = {n: AccuracyMatrix.empty(num_exp) for n in names}
    seconds = {n: 0.0 for n in names}
    train_seconds = {n: 0.0 for n in names}
    routing: dict[str, RoutingDiagnostics] = {}
    epts: dict[str, float | None] = {n: None for n in names}
    start = 0
    if ckpt is not None:
        start = ckpt.experience + 1
        for n in names:
            r = saved.strategies[LABELS[n]]
            matrices[n] = r.matrix
            seconds[n] = r.cost.wall_seconds
            train_seconds[n] = r.cost.train_seconds
            if r.routing is not None:
                routing[n] = r.routing
            epts[n] = ckpt.state[n].get("experts_per_token")
            _restore(strategies[n], n, ckpt.tensors[n], ckpt.state[n], train_exps, ckpt.experience)
    else:
        for n, s in strategies.items():
            ev = evaluate(s.model, tests, t.eval_batch_size)  # type: ignore[arg-type]
            matrices[n] = matrices[n].set_initial(ev.accuracies)

    logger: Any = RunLogger(run_dir, resume_after=start - 1) if main else _NoLogger()
    bar = tqdm(
        total=(num_exp - start) * len(names), disable=not progress or not main, desc="moracl run"
    )
    try:
        for i in range(start, num_exp):
            for n, strategy in strategies.items():
                if n == "joint" and i < num_exp - 1:
                    bar.update()
                    continue
                torch.manual_seed(derive_seed(t.seed, n, i))
                bar.set_postfix_str(f"{LABELS[n]} on experience {i}")
                began = time.perf_counter()
                strategy.epoch_listener = _EpochLog(
                    logger, bar, LABELS[n], i, began - train_seconds[n]
                )
                try:
                    strategy.train(train_exps if n == "joint" else train_exps[i])
                finally:
                    strategy.epoch_listener = None
                # EWC's importances are squared gradients: finite steps can still overflow them
                assert_finite(
                    _plugin_tensors(strategy),
                    f"moracl run: strategy {LABELS[n]!r}, experience {i}: its plugin state "
                    f"overflowed (training diverged; lower the learning rate)",
                )
                trained = time.perf_counter()
                ev = evaluate(strategy.model, tests, t.eval_batch_size)  # type: ignore[arg-type]
                train_seconds[n] += trained - began
                seconds[n] += time.perf_counter() - began
                _check_eval_losses(LABELS[n], i, ev.losses)
                matrices[n] = matrices[n].set_row(i, ev.accuracies)
                for j, (acc, loss) in enumerate(zip(ev.accuracies, ev.losses)):
                    logger.log_eval(
                        LABELS[n], after_experience=i, eval_experience=j, accuracy=acc, loss=loss
                    )
                if ev.experts_per_token is not None:
                    epts[n] = ev.experts_per_token
                    routing[n] = RoutingDiagnostics(
                        expert_usage=ev.expert_usage, task_inference_accuracy=ev.task_inference
                    )
                bar.update()
            _fill(
                results,
                strategies,
                matrices,
                seconds,
                train_seconds,
                routing,
                epts,
                frozen,
                backbone,
            )
            state = {n: _plugin_state(s, epts[n]) for n, s in strategies.items()}
            tensors = {
                n: {**trained_state(s.model, frozen), **_plugin_tensors(s)}
                for n, s in strategies.items()
            }
            if main:  # one writer; the others wait until the checkpoint is complete
                save_checkpoint(run_dir, i, tensors, state, {"results": results.to_dict()})
                results.save(run_dir)
                write_run_manifest(run_dir)  # the run folder's outputs so far
            barrier()
            if stop_after is not None and i >= stop_after:
                break
    finally:
        bar.close()
        logger.close()
    if main:
        write_report(run_dir)
        write_run_manifest(run_dir)  # the outputs as the run leaves them
    barrier()
    return results


class _NoLogger:
    """The run logger of the processes other than rank 0: writes nothing."""

    def log_train(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_train_steps(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_eval(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


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
        loss = "all steps skipped" if record.loss is None else f"loss {record.loss:.4f}"
        skipped = f", {record.skipped} skipped" if record.skipped else ""
        self.bar.set_postfix_str(
            f"{self.label} on experience {self.experience}, epoch {record.epoch}: {loss}{skipped}"
        )


def _check_eval_losses(label: str, experience: int, losses: Sequence[float]) -> None:
    """Raise :class:`NonFiniteError` if an evaluation loss is not finite (the model's
    outputs are not: nothing of it may be logged or saved)."""
    for j, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"moracl run: strategy {label!r} after experience {experience}: the evaluation "
                f"loss on experience {j} is {loss}; the model's outputs are not finite"
            )


def _fill(
    results: RunResults,
    strategies: dict[str, FastTemplate],
    matrices: dict[str, AccuracyMatrix],
    seconds: dict[str, float],
    train_seconds: dict[str, float],
    routing: dict[str, RoutingDiagnostics],
    epts: dict[str, float | None],
    frozen: set[int],
    backbone: int,
) -> None:
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    for n, s in strategies.items():
        model = s.model
        assert isinstance(model, ContinualClassifier)
        cost = Cost(
            trainable_parameters=_count(model, frozen),
            backbone_parameters=backbone,
            active_parameters_per_token=_active_per_token(model, epts[n]),
            wall_seconds=seconds[n],
            train_seconds=train_seconds[n],
            peak_memory_bytes=peak,
        )
        results.strategies[LABELS[n]] = StrategyResult(
            name=LABELS[n],
            matrix=matrices[n],
            cost=cost,
            routing=routing.get(n),
            steps=s.step_guard.steps,
            skipped_steps=s.step_guard.skipped,
        )


# -- plugin state for checkpoints -------------------------------------------------------------


def _plugin_state(strategy: FastTemplate, experts_per_token: float | None) -> dict[str, Any]:
    from avalanche.training.plugins import LwFPlugin

    state: dict[str, Any] = {"experts_per_token": experts_per_token}
    state["steps"] = strategy.step_guard.steps  # the global step count of the logs
    state["skipped_steps"] = strategy.step_guard.skipped
    if isinstance(strategy, MoRAStrategy):
        state["experiences_prepared"] = strategy.experiences_prepared
    for p in strategy.plugins:
        if isinstance(p, LwFPlugin):
            state["lwf"] = {
                "expcount": p.lwf.expcount,
                "classes": {
                    str(k): sorted(int(c) for c in v) for k, v in p.lwf.prev_classes_by_task.items()
                },
            }
    return state


def _plugin_tensors(strategy: FastTemplate) -> dict[str, Tensor]:
    from avalanche.training.plugins import EWCPlugin

    out: dict[str, Tensor] = {}
    for p in strategy.plugins:
        if isinstance(p, EWCPlugin):
            for exp, params in p.saved_params.items():
                for k, v in params.items():
                    out[f"ewc.saved.{exp}.{k}"] = v.data.detach().clone()
            for exp, params in p.importances.items():
                for k, v in params.items():
                    out[f"ewc.importance.{exp}.{k}"] = v.data.detach().clone()
    return out


def _restore(
    strategy: FastTemplate,
    name: str,
    tensors: dict[str, Tensor],
    state: dict[str, Any],
    train_exps: list[Any],
    last: int,
) -> None:
    """Put a strategy back in the state it had after experience ``last``."""
    from avalanche.training.plugins import EWCPlugin, LwFPlugin
    from avalanche.training.utils import ParamData

    from moracl.continual.plugins import SeededReplayPlugin

    model = strategy.model
    assert isinstance(model, ContinualClassifier)
    if isinstance(strategy, MoRAStrategy):
        strategy.prepare(int(state["experiences_prepared"]) - 1)
    strategy.clock.train_exp_counter = last + 1  # EWC reads it
    strategy.step_guard.steps = int(state.get("steps", 0))  # absent from older checkpoints
    strategy.step_guard.skipped = int(state.get("skipped_steps", 0))
    own = {k: v for k, v in tensors.items() if not k.startswith("ewc.")}
    missing, unexpected = model.load_state_dict(own, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint of {name!r} has tensors the model lacks: {unexpected[:5]}")
    current = dict(model.state_dict(keep_vars=True))
    lost = [k for k in missing if current[k].requires_grad]
    if lost:
        raise ValueError(f"checkpoint of {name!r} lacks trainable tensors: {lost[:5]}")
    for p in strategy.plugins:
        if isinstance(p, EWCPlugin):
            for key, value in tensors.items():
                if key.startswith("ewc."):
                    _, kind, exp, pname = key.split(".", 3)
                    store = p.saved_params if kind == "saved" else p.importances
                    store[int(exp)][pname] = ParamData(pname, init_tensor=value.clone())
        if isinstance(p, LwFPlugin) and "lwf" in state:
            p.lwf.expcount = int(state["lwf"]["expcount"])
            p.lwf.prev_classes_by_task = {
                int(k): set(v) for k, v in state["lwf"]["classes"].items()
            }
            p.lwf.prev_model = copy.deepcopy(model)
        if isinstance(p, SeededReplayPlugin):
            p.rebuild(strategy, train_exps[: last + 1])
