"""``moracl meta``: meta-train adapters on few-shot tasks, meta-test them on held-out classes
beside two baselines on the same episodes, and write a report.

    result = meta_learn(load_config("configs/wordnet_fewshot.yaml"))
    print(result.table())

The model is the scenario's frozen backbone top (adapters on ``target_modules``) and a linear
head ``d -> N`` (a trained copy, ``modules_to_save``), wrapped in a :class:`moracl.MoRAModel`.
Meta-training runs the configured MAML variant with a :class:`moracl.MoRAOptimizer` as the
outer optimiser; every ``val_every`` steps it scores fixed meta-validation episodes and the
best parameters are kept. With ``zero_head`` the head's meta-initialisation stays at zero
(reset after each outer step), so every task starts from a head that favours no class.

Meta-test draws ``test.episodes`` seeded episodes from the test classes and scores, on exactly
these episodes:

- ``meta``: the meta-trained adapters and head, adapted per episode by ``test_inner_steps``
  inner-loop steps (the algorithm's own update, e.g. Meta-SGD's learned step sizes);
- ``prototype``: no adaptation, a nearest-centroid classifier on the frozen backbone;
- ``finetune``: fresh adapters (the initialisation before meta-training, same seed) and a
  zero head fine-tuned per episode with Adam for ``finetune_steps`` steps.

Outputs in ``output_dir``: ``report.md``, ``metrics.json`` (config, summaries, paired
differences, validation curve, timings), ``episodes.json`` (per-episode accuracies of each
method, in episode order) and ``adapter/`` (the meta-trained adapters and head).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.config import MetaAlgorithm, MetaConfig, to_dict
from moracl.distributed import (
    DataParallel,
    all_reduce_sum,
    barrier,
    gather_objects,
    init_distributed,
    is_main,
    local_rows,
    rank,
    world_size,
)
from moracl.files import write_atomic
from moracl.guard import NonFiniteError, StepGuard, assert_finite, finite_json
from moracl.meta.baselines import (
    Summary,
    adam_update,
    adapted_accuracy,
    prototype_accuracy,
    sgd_update,
    summarize,
)
from moracl.meta.episodes import Episode
from moracl.meta.maml import ANIL, MAML, MetaSGD
from moracl.model import MoRAModel
from moracl.optim import MoRAOptimizer, SAMConfig
from moracl.preflight import check_first
from moracl.runlock import exclusive_output_dir

__all__ = ["METHODS", "FewShotClassifier", "MetaResult", "build_meta_model", "meta_learn"]

METHODS = ("meta", "prototype", "finetune")
_BACKBONES = {"wordnet-fewshot": "minilm", "digits-fewshot": "cnn-fashion"}


class FewShotClassifier(nn.Module):
    """A frozen backbone top and a linear head: ``head(body(x))``, ``(b, ...) -> (b, N)``.

    The head starts at zero (every class scores 0), the usual start of MAML's inner loop on
    tasks whose labels are a random permutation of their classes."""

    def __init__(self, body: nn.Module, feature_dim: int, ways: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, ways)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # (b, ...) -> (b, d) -> (b, N)


def build_meta_model(config: MetaConfig, data: Any) -> MoRAModel:
    """The adapted classifier over ``data.make_body()`` (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    body = data.make_body()
    targets = list(config.target_modules) or [f"body.{t}" for t in body.default_targets]
    classifier = FewShotClassifier(body, body.feature_dim, config.data.ways)
    return MoRAModel(classifier, config.adapter, target_modules=targets, modules_to_save=["head"])


def _algorithm(config: MetaConfig, model: MoRAModel) -> MAML:
    m = config.meta
    if m.algorithm is MetaAlgorithm.MAML:
        return MAML(model, m.inner_lr)
    if m.algorithm is MetaAlgorithm.FOMAML:
        return MAML(model, m.inner_lr, first_order=True)
    if m.algorithm is MetaAlgorithm.METASGD:
        return MetaSGD(model, m.inner_lr)
    return ANIL(model, m.inner_lr)


@dataclass
class MetaResult:
    """What ``moracl meta`` measured (accuracies are fractions)."""

    summaries: dict[str, Summary]
    accuracies: dict[str, list[float]]
    paired: dict[str, Summary]
    validation: list[dict[str, float]]
    selected_step: int
    trainable_parameters: int
    seconds: dict[str, float]
    scenario: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    #: ``steps``, ``skipped_steps`` (``meta.on_nonfinite=skip``) and the meta-loss curve
    training: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The meta-test results as a markdown table."""
        rows = ["| method | accuracy | 95 % CI | episodes |", "|---|---|---|---|"]
        for name in METHODS:
            s = self.summaries[name]
            rows.append(
                f"| {self.labels.get(name, name)} | {100 * s.mean:.2f} % | "
                f"± {100 * s.ci95:.2f} | {s.episodes} |"
            )
        for name, s in self.paired.items():
            rows.append(
                f"| difference {name} (paired) | {100 * s.mean:+.2f} points | "
                f"± {100 * s.ci95:.2f} | {s.episodes} |"
            )
        return "\n".join(rows)


def _episodes(sampler: Any, n: int, seed: int) -> Episode:
    ep: Episode = sampler.sample_batch(n, generator=torch.Generator().manual_seed(seed))
    return ep


def _meta_accuracy(maml: MAML, episodes: Episode, steps: int, batch: int) -> Tensor:
    """``(t,)`` accuracy per episode; under data parallelism each process scores a slice of
    the episodes and every process gets them all, in order."""
    if world_size() > 1:
        rows = local_rows(len(episodes.xs))
        part = Episode(*(p[rows] for p in episodes))
        local = _meta_accuracy_here(maml, part, steps, batch)
        return torch.cat(gather_objects(local))
    return _meta_accuracy_here(maml, episodes, steps, batch)


def _meta_accuracy_here(maml: MAML, episodes: Episode, steps: int, batch: int) -> Tensor:
    params = maml.meta_parameters()
    return adapted_accuracy(
        maml.functional_forward,
        params,
        maml.inner_names,
        episodes,
        steps=steps,
        update=sgd_update(maml.step_sizes()),
        batch=batch,
    )


def _heads(model: nn.Module) -> list[Tensor]:
    return [p for _, p, role in iter_param_roles(model) if role is ParamRole.HEAD]


class _SkippedStep(Exception):
    """Raised by the meta-training closure to drop a step (``meta.on_nonfinite=skip``)."""


def _train(
    config: MetaConfig, maml: MAML, data: Any, progress: bool
) -> tuple[list[dict[str, float]], int, dict[str, Any]]:
    """Meta-train in place; returns the validation curve, the step kept and the training
    record (``steps``, ``skipped_steps`` and ``loss``: the mean meta-loss of the steps taken
    in each stretch of ``val_every`` steps, or of a tenth of the steps without validation).

    Every outer step is checked before the update (``meta.on_nonfinite``): a non-finite
    meta-loss or meta-gradient (in either of SAM's passes) raises
    :class:`~moracl.guard.NonFiniteError` naming the step, or drops the step (the
    parameters and the optimiser's state stay as they were). A validation score from
    non-finite outputs, or non-finite parameters at the end, raise too."""
    m, o = config.meta, config.optim
    d = config.data
    train = data.sampler("train", ways=d.ways, shots=d.shots, queries=d.queries)
    val_eps = None
    if m.val_every:
        val = data.sampler("val", ways=d.ways, shots=d.shots, queries=d.queries)
        val_eps = _episodes(val, m.val_episodes, config.seed + 1)
    world = world_size()
    if world > m.meta_batch:
        raise ValueError(
            f"meta.meta_batch={m.meta_batch} tasks cannot be split across {world} processes; "
            f"use at most {m.meta_batch} processes or a larger meta batch"
        )
    parallel = DataParallel(maml, bucket_mb=config.distributed.bucket_mb)
    local_sam = config.distributed.sam_first_pass == "local"
    opt = MoRAOptimizer(
        maml,
        model=parallel if local_sam else maml,
        base=o.base,
        lr=o.lr,
        weight_decay=o.weight_decay,
        loraplus_ratio=o.loraplus_ratio,
        lars=o.lars,
        sam=SAMConfig(rho=o.sam_rho) if o.sam_rho > 0 else None,
    )
    heads = _heads(maml.module) if m.zero_head else []
    params = [p for p in maml.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(config.seed)
    curve: list[dict[str, float]] = []
    best = (-1.0, 0, [p.detach().clone() for p in params])
    guard = StepGuard(
        m.on_nonfinite, setting="meta.on_nonfinite", advice="lower meta.inner_lr or optim.lr"
    )
    interval = m.val_every or max(1, m.steps // 10)
    losses: list[float] = []
    loss_curve: list[dict[str, Any]] = []

    def validate(step: int) -> None:
        nonlocal best
        if val_eps is None:
            return
        accs = _meta_accuracy(maml, val_eps, m.test_inner_steps, config.test.batch)
        _check_scores(accs, f"moracl meta: validation at step {step}")
        acc = float(accs.mean())
        curve.append({"step": step, "val_accuracy": acc})
        if acc > best[0]:
            best = (acc, step, [p.detach().clone() for p in params])

    with torch.no_grad():
        for h in heads:
            h.zero_()
    validate(0)
    bar = tqdm(range(1, m.steps + 1), desc="meta-training", disable=not progress, leave=False)
    for step in bar:
        batch = train.sample_batch(m.meta_batch, generator=gen)
        rows = local_rows(m.meta_batch)  # this process's tasks (all of them for one)
        share = (rows.stop - rows.start) / m.meta_batch
        passes: list[float] = []  # each pass's (global) meta-loss

        def closure(
            batch: Episode = batch,
            rows: slice = rows,
            share: float = share,
            step: int = step,
            passes: list[float] = passes,
        ) -> Tensor:
            mine = [part[rows] for part in batch]
            loss = maml.meta_loss(mine, m.inner_steps, chunk_size=m.chunk_size)
            loss.backward()
            parallel.sync_gradients(share)
            # every process decides on the same numbers: the global loss, synced gradients
            checked = all_reduce_sum(loss.detach() * share) if world > 1 else loss
            where = f"moracl meta: meta-training step {step}"
            if passes:
                where += " (SAM's second pass, at the perturbed weights)"
            value = guard.check(checked, params, where, named=maml.named_parameters)
            if value is None:
                raise _SkippedStep
            passes.append(value)
            return loss

        try:
            opt.step(closure)
            taken = True
        except (_SkippedStep, NonFiniteError) as error:
            opt.zero_grad(set_to_none=True)
            if passes and opt.sam is not None:  # SAM's second pass failed: undo its move
                opt.second_step()  # back to w; no gradients, so no update
            if isinstance(error, NonFiniteError):
                raise
            taken = False
        with torch.no_grad():
            for h in heads:
                h.zero_()
        if taken:
            losses.append(passes[0])  # the loss at w (SAM's first pass)
        shown = f"{passes[0]:.3f}" if taken else "skipped"
        bar.set_postfix(loss=shown)
        if step % interval == 0 or step == m.steps:
            mean = math.fsum(losses) / len(losses) if losses else None
            loss_curve.append({"step": step, "loss": mean})
            losses = []
        if m.val_every and (step % m.val_every == 0 or step == m.steps):
            validate(step)
            bar.set_postfix(loss=shown, val=f"{curve[-1]['val_accuracy']:.3f}")
    bar.close()
    guard.warn_skipped(0, m.steps, "moracl meta: meta-training")
    training = {"steps": m.steps, "skipped_steps": guard.skipped, "loss": loss_curve}
    if val_eps is not None:
        with torch.no_grad():
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
    names = {n: p for n, p in maml.named_parameters() if p.requires_grad}
    assert_finite(names, "moracl meta: the meta-trained parameters")
    return curve, best[1] if val_eps is not None else m.steps, training


def _check_scores(accuracies: Tensor, where: str) -> None:
    """Raise :class:`NonFiniteError` if a per-episode accuracy is NaN (the adapted model's
    outputs were not finite: its adaptation diverged)."""
    bad = (~torch.isfinite(accuracies)).nonzero().flatten()
    if bad.numel():
        raise NonFiniteError(
            f"{where}: episode {int(bad[0])} (of {accuracies.numel()}; {bad.numel()} in all) "
            f"was scored from non-finite outputs: the per-episode adaptation diverged (lower "
            f"meta.inner_lr or test.finetune_lr)"
        )


def _test(
    config: MetaConfig,
    maml: MAML,
    fresh: dict[str, Tensor],
    data: Any,
    progress: bool,
) -> dict[str, Tensor]:
    """Per-episode accuracies ``(t,)`` of the three methods on the same test episodes."""
    d, t = config.data, config.test
    sampler = data.sampler("test", ways=d.ways, shots=d.shots, queries=d.queries)
    episodes = _episodes(sampler, t.episodes, t.seed)
    body = data.make_body().eval()
    names = [n for n, p in maml.module.named_parameters() if p.requires_grad]
    out: dict[str, list[Tensor]] = {name: [] for name in METHODS}
    world, me = world_size(), rank()
    chunks = range(0, t.episodes, t.batch)
    mine = [c for i, c in enumerate(chunks) if i % world == me]  # chunks dealt in turn
    for start in tqdm(mine, desc="meta-test", disable=not progress, leave=False):
        ep = Episode(*(part[start : start + t.batch] for part in episodes))
        out["meta"].append(_meta_accuracy_here(maml, ep, config.meta.test_inner_steps, t.batch))
        with torch.no_grad():
            fs, fq = body(ep.xs.flatten(0, 1)), body(ep.xq.flatten(0, 1))  # (t·n, d)
            fs, fq = fs.unflatten(0, ep.xs.shape[:2]), fq.unflatten(0, ep.xq.shape[:2])
        out["prototype"].append(prototype_accuracy(fs, ep.ys, fq, ep.yq, d.ways))
        out["finetune"].append(
            adapted_accuracy(
                maml.functional_forward,
                {**maml.meta_parameters(), **fresh},
                names,
                ep,
                steps=t.finetune_steps,
                update=adam_update(t.finetune_lr),
                batch=t.batch,
            )
        )
    if world > 1:  # chunk i came from process i % world: put them back in order
        every = gather_objects(out)
        out = {
            name: [every[i % world][name][i // world] for i in range(len(chunks))]
            for name in METHODS
        }
    return {name: torch.cat(parts) for name, parts in out.items()}


def _json_text(path: Path, obj: Any) -> str:
    """``obj`` as the JSON text of ``path``; :class:`~moracl.guard.NonFiniteError` (naming
    the key) instead of a NaN or an infinity."""
    return finite_json(obj, f"moracl meta: {path}", indent=2) + "\n"


def _report(config: MetaConfig, result: MetaResult) -> str:
    d, m = config.data, config.meta
    s = result.scenario
    val = "\n".join(
        f"| {row['step']} | {100 * row['val_accuracy']:.2f} % |" for row in result.validation
    )
    note = ""
    if config.test.episodes < 600:
        note = f"\n**Only {config.test.episodes} test episodes (fewer than 600).**\n"
    return f"""# moracl meta: {s["name"]}, {d.ways}-way {d.shots}-shot

- backbone: {s["backbone"]}
- classes: {s["split"]}
- adapter: {config.adapter!r} on {config.target_modules or "the backbone's default targets"}
- meta-training: {m.algorithm.value}, {m.steps} outer steps of {m.meta_batch} tasks,
  {m.inner_steps} inner steps (lr {m.inner_lr}), outer optimiser {config.optim.base}
  (lr {config.optim.lr}); kept the parameters of step {result.selected_step}
- meta-test: {config.test.episodes} episodes (seed {config.test.seed}), {d.queries} queries
  per class; {m.test_inner_steps} inner steps for the meta-trained model,
  {config.test.finetune_steps} Adam steps (lr {config.test.finetune_lr}) for fresh adapters
- trainable parameters: {result.trainable_parameters:,}
- source: {s["source"]} ({s["licence"]})
{note}
## Meta-test accuracy (mean over episodes, 95 % CI = 1.96 · std / √n)

{result.table()}

The paired rows are the mean per-episode difference between two methods on the same episodes.

## Meta-validation

| step | accuracy |
|---|---|
{val}

## Time

{", ".join(f"{k}: {v:.1f} s" for k, v in result.seconds.items())}
"""


@check_first  # what moracl validate checks, before the folder is locked or anything runs
@exclusive_output_dir(
    "moracl meta", results=("metrics.json", "report.md", "episodes.json", "adapter")
)
def meta_learn(config: MetaConfig, *, progress: bool = True) -> MetaResult:
    """Run the job of ``config``; writes the report, metrics and adapter in ``output_dir``.

    Launched by ``torchrun`` with more than one process it is data-parallel: each process
    meta-trains on its slice of every meta-batch's tasks (gradients summed, weighted by the
    slices' sizes: the one-process step), validation episodes and meta-test chunks are dealt
    to the processes and gathered, and rank 0 writes the outputs."""
    from moracl_scenarios.fewshot import build_fewshot

    expected = _BACKBONES.get(config.data.scenario)
    if expected is not None and config.backbone != expected:
        raise ValueError(
            f"scenario {config.data.scenario!r} uses the backbone {expected!r}, "
            f"got backbone={config.backbone!r}"
        )
    init_distributed(config.distributed.backend, "cpu")
    progress = progress and is_main()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    data = build_fewshot(config.data.scenario, **config.data.options)
    seconds["data"] = time.perf_counter() - start

    model = build_meta_model(config, data)
    fresh = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    maml = _algorithm(config, model)
    trainable = sum(p.numel() for p in maml.parameters() if p.requires_grad)

    start = time.perf_counter()
    curve, kept, training = _train(config, maml, data, progress)
    seconds["meta-training"] = time.perf_counter() - start

    start = time.perf_counter()
    accs = _test(config, maml, fresh, data, progress)
    seconds["meta-test"] = time.perf_counter() - start
    for name, a in accs.items():
        _check_scores(a, f"moracl meta: meta-test of {name!r}")

    if config.test.episodes < 600:
        warnings.warn(
            f"test.episodes={config.test.episodes} is below the 600 episodes reports use",
            stacklevel=2,
        )
    labels = {
        "meta": f"meta-trained adapters ({config.meta.algorithm.value}, "
        f"{config.meta.test_inner_steps} inner steps)",
        "prototype": "prototype classifier on the frozen backbone",
        "finetune": f"fresh adapters fine-tuned per episode ({config.test.finetune_steps} "
        "Adam steps)",
    }
    result = MetaResult(
        summaries={name: summarize(a) for name, a in accs.items()},
        accuracies={name: a.tolist() for name, a in accs.items()},
        paired={
            f"meta − {b}": summarize(accs["meta"] - accs[b]) for b in ("prototype", "finetune")
        },
        validation=curve,
        selected_step=kept,
        trainable_parameters=trainable,
        seconds=seconds,
        scenario=data.describe(),
        labels=labels,
        training=training,
    )
    if not is_main():  # rank 0 writes the outputs
        barrier()
        return result
    out = Path(config.output_dir)
    episodes = _json_text(out / "episodes.json", {"seed": config.test.seed, **result.accuracies})
    metrics = _json_text(
        out / "metrics.json",
        {
            "config": to_dict(config),
            "scenario": result.scenario,
            "results": {
                k: {**v.as_dict(), "label": labels[k]} for k, v in result.summaries.items()
            },
            "paired_differences": {k: v.as_dict() for k, v in result.paired.items()},
            "validation": curve,
            "selected_step": kept,
            "training": training,
            "trainable_parameters": trainable,
            "seconds": seconds,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    )
    adapted = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert_finite(adapted, "moracl meta: the adapter about to be saved")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "adapter")
    write_atomic(out / "episodes.json", episodes)
    write_atomic(out / "metrics.json", metrics)
    write_atomic(out / "report.md", _report(config, result))
    barrier()
    return result
