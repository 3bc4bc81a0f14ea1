"""Meta-train adapters on few-shot tasks and meta-test them on held-out classes beside two
baselines on the same episodes.

    shape = EpisodeShape(ways=5, shots=5, queries=15)
    model = build_meta_model(source, ways=shape.ways, adapter=LoRAConfig(rank=8))
    result = meta_learn(model, source, shape=shape, meta=MetaLearnConfig(),
                        optim=MetaOptimConfig(), test=MetaTestConfig())
    print(result.table())

``source`` is any :class:`FewShotSource`: the frozen top of a backbone (``make_body``) and
seeded episode samplers of its ``"train"``, ``"val"`` and ``"test"`` classes.

The model is the source's frozen body (adapters on ``target_modules``) and a linear head
``d -> N`` (a trained copy, ``modules_to_save``), wrapped in a :class:`moracl.MoRAModel`.
Meta-training runs the configured MAML variant with a :class:`moracl.MoRAOptimizer` as the
outer optimiser; every ``val_every`` steps it scores fixed meta-validation episodes and the
best parameters are kept. With ``zero_head`` the head's meta-initialisation stays at zero
(reset after each outer step), so every task starts from a head that favours no class.

Meta-test draws ``test.episodes`` seeded episodes from the test classes and scores, on exactly
these episodes (``meta_learn(..., evaluate_test=False)``, a run for model selection, skips it:
no test episode is drawn):

- ``meta``: the meta-trained adapters and head, adapted per episode by ``test_inner_steps``
  inner-loop steps (the algorithm's own update, e.g. Meta-SGD's learned step sizes);
- ``prototype``: no adaptation, a nearest-centroid classifier on the frozen backbone;
- ``finetune``: fresh adapters (the initialisation before meta-training, same seed) and a
  zero head fine-tuned per episode with Adam for ``finetune_steps`` steps.

Launched by ``torchrun`` with more than one process it is data-parallel: each process
meta-trains on its slice of every meta-batch's tasks (gradients summed, weighted by the
slices' sizes: the one-process step), and validation episodes and meta-test chunks are dealt
to the processes and gathered.

Shapes: ``t`` episodes, ``N`` ways.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from moracl.adapters.base import AdapterConfig, ParamRole, iter_param_roles
from moracl.distributed import (
    DataParallel,
    DistributedConfig,
    all_reduce_sum,
    gather_objects,
    local_rows,
    rank,
    world_size,
)
from moracl.experts.mixture import MixtureConfig
from moracl.guard import NonFiniteError, StepGuard, assert_finite
from moracl.meta.baselines import (
    Summary,
    adam_update,
    adapted_accuracy,
    prototype_accuracy,
    sgd_update,
    summarize,
)
from moracl.meta.config import MetaAlgorithm, MetaLearnConfig, MetaOptimConfig, MetaTestConfig
from moracl.meta.episodes import Episode
from moracl.meta.maml import ANIL, MAML, MetaSGD
from moracl.model import MoRAModel
from moracl.optim import MoRAOptimizer, SAMConfig
from moracl.train import guarded_step

__all__ = [
    "METHODS",
    "EpisodeBatches",
    "EpisodeShape",
    "FewShotClassifier",
    "FewShotSource",
    "MetaResult",
    "MetaTraining",
    "build_meta_model",
    "check_scores",
    "meta_algorithm",
    "meta_learn",
    "meta_test",
    "meta_train",
]

METHODS = ("meta", "prototype", "finetune")


class EpisodeBatches(Protocol):
    """Samples stacked episodes (an :class:`~moracl.meta.episodes.EpisodeSampler` is one)."""

    def sample_batch(self, tasks: int, generator: torch.Generator | None = None) -> Episode: ...


class FewShotSource(Protocol):
    """Where few-shot tasks come from (``moracl_scenarios.fewshot.FewShotData`` is one).

    ``make_body()`` builds the frozen top the adapters go on: a fresh module mapping an
    example ``(b, ...)`` to features ``(b, d)``, with ``feature_dim`` (``d``) and
    ``default_targets`` attributes. ``sampler(split, ...)`` samples episodes of the
    ``"train"``, ``"val"`` or ``"test"`` classes; ``describe()`` is a JSON-ready summary.
    """

    def make_body(self) -> nn.Module: ...

    def sampler(self, split: str, *, ways: int, shots: int, queries: int) -> EpisodeBatches: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EpisodeShape:
    """``ways`` classes per episode (``N``), ``shots`` support and ``queries`` query examples
    per class (``K``, ``Q``)."""

    ways: int
    shots: int
    queries: int

    def __post_init__(self) -> None:
        if self.ways < 2 or self.shots < 1 or self.queries < 1:
            raise ValueError(
                f"need ways >= 2, shots >= 1 and queries >= 1; got ways={self.ways!r}, "
                f"shots={self.shots!r}, queries={self.queries!r}"
            )

    def sampler(self, source: FewShotSource, split: str) -> EpisodeBatches:
        """``source``'s episodes of ``split`` in this shape."""
        return source.sampler(split, ways=self.ways, shots=self.shots, queries=self.queries)


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


def build_meta_model(
    source: FewShotSource,
    *,
    ways: int,
    adapter: AdapterConfig | MixtureConfig,
    target_modules: Sequence[str] = (),
    seed: int = 0,
) -> MoRAModel:
    """The adapted classifier over ``source.make_body()`` with a ``ways``-class head, seeded by
    ``seed``; ``target_modules`` empty: the body's ``default_targets``."""
    torch.manual_seed(seed)
    body = source.make_body()
    defaults: Sequence[str] = getattr(body, "default_targets", ())
    targets = list(target_modules) or [f"body.{t}" for t in defaults]
    classifier = FewShotClassifier(body, int(cast(Any, body).feature_dim), ways)
    return MoRAModel(classifier, adapter, target_modules=targets, modules_to_save=["head"])


def meta_algorithm(model: nn.Module, algorithm: MetaAlgorithm, inner_lr: float) -> MAML:
    """The MAML variant ``algorithm`` over ``model``'s trainable parameters."""
    algorithm = MetaAlgorithm(algorithm)
    if algorithm is MetaAlgorithm.MAML:
        return MAML(model, inner_lr)
    if algorithm is MetaAlgorithm.FOMAML:
        return MAML(model, inner_lr, first_order=True)
    if algorithm is MetaAlgorithm.METASGD:
        return MetaSGD(model, inner_lr)
    return ANIL(model, inner_lr)


@dataclass
class MetaResult:
    """What meta-learning measured (accuracies are fractions).

    Attributes:
        summaries, accuracies, paired: the meta-test of each of :data:`METHODS` (summary and
            per-episode accuracies) and the paired differences; empty when the test split
            was not evaluated (``evaluated_test`` false).
        validation: the meta-validation curve, ``{"step", "val_accuracy"}`` rows.
        selected_step: the outer step whose parameters were kept.
        best_validation_accuracy: the meta-validation accuracy of the parameters kept (the
            best of the curve); ``None`` without validation (``meta.val_every=0``: the last
            parameters are kept).
    """

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
    best_validation_accuracy: float | None = None
    evaluated_test: bool = True

    def table(self) -> str:
        """The meta-test results as a markdown table (a sentence when the test split was
        not evaluated)."""
        if not self.evaluated_test:
            best = self.best_validation_accuracy
            kept = "no validation" if best is None else f"{100 * best:.2f} %"
            return (
                f"meta-test not run: the test classes were not sampled (a run for model "
                f"selection); best meta-validation accuracy {kept} at step {self.selected_step}"
            )
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


class MetaTraining(NamedTuple):
    """What :func:`meta_train` did: the validation curve (``step``, ``val_accuracy``), the
    step whose parameters were kept (the best of the curve, the earliest among equals; the
    last step without validation), and the training record (``steps``, ``skipped_steps``
    and ``loss``: the mean meta-loss of the steps taken in each stretch of ``val_every``
    steps, or of a tenth of the steps without validation)."""

    validation: list[dict[str, float]]
    selected_step: int
    training: dict[str, Any]

    @property
    def best_accuracy(self) -> float | None:
        """The meta-validation accuracy of the parameters kept (``None`` without
        validation)."""
        kept = [row["val_accuracy"] for row in self.validation if row["step"] == self.selected_step]
        return kept[0] if kept else None


def _episodes(sampler: EpisodeBatches, n: int, seed: int) -> Episode:
    return sampler.sample_batch(n, generator=torch.Generator().manual_seed(seed))


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
    return adapted_accuracy(
        maml.functional_forward,
        maml.meta_parameters(),
        maml.inner_names,
        episodes,
        steps=steps,
        update=sgd_update(maml.step_sizes()),
        batch=batch,
    )


def check_scores(accuracies: Tensor, where: str) -> None:
    """Raise :class:`~moracl.guard.NonFiniteError` if a per-episode accuracy of
    ``accuracies (t,)`` is NaN (the adapted model's outputs were not finite: its adaptation
    diverged), naming ``where``."""
    bad = (~torch.isfinite(accuracies)).nonzero().flatten()
    if bad.numel():
        raise NonFiniteError(
            f"{where}: episode {int(bad[0])} (of {accuracies.numel()}; {bad.numel()} in all) "
            f"was scored from non-finite outputs: the per-episode adaptation diverged (lower "
            f"meta.inner_lr or test.finetune_lr)"
        )


def meta_train(
    maml: MAML,
    source: FewShotSource,
    *,
    shape: EpisodeShape,
    meta: MetaLearnConfig,
    optim: MetaOptimConfig,
    seed: int = 0,
    val_batch: int = 100,
    distributed: DistributedConfig | None = None,
    progress: bool = True,
) -> MetaTraining:
    """Meta-train ``maml``'s parameters in place for ``meta.steps`` outer steps of
    ``meta.meta_batch`` tasks drawn from ``source``'s ``"train"`` classes (seeded by
    ``seed``); with ``meta.val_every``, the parameters of the best meta-validation score
    (``meta.val_episodes`` episodes seeded by ``seed + 1``, scored in chunks of
    ``val_batch``) are kept.

    Every outer step is checked before the update (``meta.on_nonfinite``,
    :func:`moracl.train.guarded_step`): a non-finite meta-loss or meta-gradient (in either
    of SAM's passes) raises :class:`~moracl.guard.NonFiniteError` naming the step, or drops
    the step (the parameters and the optimiser's state stay as they were). A validation
    score from non-finite outputs, or non-finite parameters at the end, raise too.

    Raises:
        ValueError: more processes than tasks in a meta-batch.
    """
    m, o = meta, optim
    dist = distributed or DistributedConfig()
    train = shape.sampler(source, "train")
    val_eps = None
    if m.val_every:
        val_eps = _episodes(shape.sampler(source, "val"), m.val_episodes, seed + 1)
    world = world_size()
    if world > m.meta_batch:
        raise ValueError(
            f"meta.meta_batch={m.meta_batch} tasks cannot be split across {world} processes; "
            f"use at most {m.meta_batch} processes or a larger meta batch"
        )
    parallel = DataParallel(maml, bucket_mb=dist.bucket_mb)
    opt = MoRAOptimizer(
        maml,
        model=parallel if dist.sam_first_pass == "local" else maml,
        base=o.base,
        lr=o.lr,
        weight_decay=o.weight_decay,
        loraplus_ratio=o.loraplus_ratio,
        lars=o.lars,
        sam=SAMConfig(rho=o.sam_rho) if o.sam_rho > 0 else None,
    )
    heads = (
        [p for _, p, role in iter_param_roles(maml.module) if role is ParamRole.HEAD]
        if m.zero_head
        else []
    )
    params = [p for p in maml.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
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
        accs = _meta_accuracy(maml, val_eps, m.test_inner_steps, val_batch)
        check_scores(accs, f"moracl meta: validation at step {step}")
        acc = float(accs.mean())
        curve.append({"step": step, "val_accuracy": acc})
        if acc > best[0]:
            best = (acc, step, [p.detach().clone() for p in params])

    def zero_heads() -> None:
        with torch.no_grad():
            for h in heads:
                h.zero_()

    zero_heads()
    validate(0)
    bar = tqdm(range(1, m.steps + 1), desc="meta-training", disable=not progress, leave=False)
    for step in bar:
        batch = train.sample_batch(m.meta_batch, generator=gen)
        rows = local_rows(m.meta_batch)  # this process's tasks (all of them for one)
        share = (rows.stop - rows.start) / m.meta_batch

        def meta_loss(batch: Episode = batch, rows: slice = rows, share: float = share) -> Tensor:
            mine = [part[rows] for part in batch]
            loss = maml.meta_loss(mine, m.inner_steps, chunk_size=m.chunk_size)
            loss.backward()
            parallel.sync_gradients(share)
            # every process decides on the same numbers: the global loss, synced gradients
            return all_reduce_sum(loss.detach() * share) if world > 1 else loss

        value = guarded_step(
            meta_loss,
            optimizer=opt,
            params=params,
            guard=guard,
            where=f"moracl meta: meta-training step {step}",
            named=maml.named_parameters,
        )
        zero_heads()
        if value is not None:
            losses.append(value)  # the loss at w (SAM's first pass)
        shown = f"{value:.3f}" if value is not None else "skipped"
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
    return MetaTraining(curve, best[1] if val_eps is not None else m.steps, training)


def meta_test(
    maml: MAML,
    fresh: dict[str, Tensor],
    source: FewShotSource,
    *,
    shape: EpisodeShape,
    test: MetaTestConfig,
    inner_steps: int,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Per-episode accuracies ``(t,)`` of the :data:`METHODS` on the same ``test.episodes``
    episodes of ``source``'s ``"test"`` classes (seeded by ``test.seed``): ``maml`` adapted
    by ``inner_steps`` of its inner loop, the prototype classifier on a fresh body, and the
    parameters ``fresh`` (name -> tensor, the adapters before meta-training) fine-tuned by
    ``test.finetune_steps`` Adam steps."""
    t = test
    episodes = _episodes(shape.sampler(source, "test"), t.episodes, t.seed)
    body = source.make_body().eval()
    names = [n for n, p in maml.module.named_parameters() if p.requires_grad]
    out: dict[str, list[Tensor]] = {name: [] for name in METHODS}
    world, me = world_size(), rank()
    chunks = range(0, t.episodes, t.batch)
    mine = [c for i, c in enumerate(chunks) if i % world == me]  # chunks dealt in turn
    for start in tqdm(mine, desc="meta-test", disable=not progress, leave=False):
        ep = Episode(*(part[start : start + t.batch] for part in episodes))
        out["meta"].append(_meta_accuracy_here(maml, ep, inner_steps, t.batch))
        with torch.no_grad():
            fs, fq = body(ep.xs.flatten(0, 1)), body(ep.xq.flatten(0, 1))  # (t·n, d)
            fs, fq = fs.unflatten(0, ep.xs.shape[:2]), fq.unflatten(0, ep.xq.shape[:2])
        out["prototype"].append(prototype_accuracy(fs, ep.ys, fq, ep.yq, shape.ways))
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


def meta_learn(
    model: MoRAModel,
    source: FewShotSource,
    *,
    shape: EpisodeShape,
    meta: MetaLearnConfig,
    optim: MetaOptimConfig,
    test: MetaTestConfig,
    seed: int = 0,
    distributed: DistributedConfig | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
) -> MetaResult:
    """Meta-train ``model`` (from :func:`build_meta_model`) in place on ``source``
    (:func:`meta_train`), then meta-test it beside the baselines (:func:`meta_test`).

    ``evaluate_test=False`` (a run for model selection) stops after meta-training: no
    episode of ``source``'s ``"test"`` classes is drawn and the meta-test results are empty.

    Returns:
        The :class:`MetaResult`; its ``seconds`` hold ``meta-training`` and ``meta-test``
        (the latter only when the test split is evaluated).

    Raises:
        NonFiniteError: meta-training diverged (``meta.on_nonfinite=stop``), or an episode
            of any method was scored from non-finite outputs.
    """
    fresh = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    maml = meta_algorithm(model, meta.algorithm, meta.inner_lr)
    trainable = sum(p.numel() for p in maml.parameters() if p.requires_grad)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    trained = meta_train(
        maml,
        source,
        shape=shape,
        meta=meta,
        optim=optim,
        seed=seed,
        val_batch=test.batch,
        distributed=distributed,
        progress=progress,
    )
    seconds["meta-training"] = time.perf_counter() - start
    result = MetaResult(
        summaries={},
        accuracies={},
        paired={},
        validation=trained.validation,
        selected_step=trained.selected_step,
        trainable_parameters=trainable,
        seconds=seconds,
        scenario=source.describe(),
        training=trained.training,
        best_validation_accuracy=trained.best_accuracy,
        evaluated_test=evaluate_test,
    )
    if not evaluate_test:
        return result

    start = time.perf_counter()
    accs = meta_test(
        maml,
        fresh,
        source,
        shape=shape,
        test=test,
        inner_steps=meta.test_inner_steps,
        progress=progress,
    )
    seconds["meta-test"] = time.perf_counter() - start
    for name, a in accs.items():
        check_scores(a, f"moracl meta: meta-test of {name!r}")

    if test.episodes < 600:
        warnings.warn(
            f"test.episodes={test.episodes} is below the 600 episodes reports use",
            stacklevel=2,
        )
    result.labels = {
        "meta": f"meta-trained adapters ({meta.algorithm.value}, "
        f"{meta.test_inner_steps} inner steps)",
        "prototype": "prototype classifier on the frozen backbone",
        "finetune": f"fresh adapters fine-tuned per episode ({test.finetune_steps} Adam steps)",
    }
    result.summaries = {name: summarize(a) for name, a in accs.items()}
    result.accuracies = {name: a.tolist() for name, a in accs.items()}
    result.paired = {
        f"meta − {b}": summarize(accs["meta"] - accs[b]) for b in ("prototype", "finetune")
    }
    return result
