"""moracl's Avalanche strategy (growing, freezing and masking adapter experts) and the
baselines, all on one lean training template.

Fields of the Avalanche strategy read and written here: ``model``, ``optimizer``,
``experience``, ``adapted_dataset``, ``dataloader``, ``mb_output``, ``mb_y``, ``loss``,
``clock``, ``train_mb_size``, ``eval_mb_size``, ``is_training``. Plugins of Avalanche (EWC,
LwF, Replay, the evaluation plugin and its loggers) work unchanged on top.

Both strategies take Avalanche's usual arguments: ``MoRAStrategy(model=..., optimizer=...,
criterion=..., train_mb_size=..., train_epochs=..., eval_mb_size=..., device=...,
plugins=..., evaluator=...)``, keyword-only as Avalanche 0.6's own strategies; so
``MoRAStrategy(model, optimizer, ...)`` works as ``Naive(model, optimizer, ...)`` does
(Avalanche maps the positional arguments, with its deprecation warning). The optimiser is
either a torch optimiser (kept, and updated before each experience as Avalanche updates any
strategy's optimiser: see :meth:`FastTemplate.make_optimizer`) or an ``optimizer_factory``
building a fresh one per experience (moracl's own runs). Without ``evaluator`` Avalanche's
default evaluation plugin (accuracy and loss, printed by its interactive logger) reports;
moracl's runs pass :func:`quiet_evaluator`.

Every training step is guarded (:class:`~moracl.guard.StepGuard`): before the optimiser
steps, the full loss (with every plugin's penalty) and the gradients are checked in one host
sync; a non-finite value stops training with :class:`~moracl.guard.NonFiniteError` naming the
strategy, experience, epoch and step, or (``on_nonfinite="skip"``) drops the step. Each epoch
ends with an :class:`EpochRecord` (mean loss, global step, learning rate, skipped steps).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.optim import Optimizer

from moracl.adapters.adalora.bank import AdaLoRABank
from moracl.adapters.adalora.budget import RankAllocator
from moracl.adapters.adalora.module import orth_loss, rank_budget_modules
from moracl.adapters.base import AdapterConfig
from moracl.continual.batches import TensorBatches, derive_seed, materialize
from moracl.continual.model import ContinualClassifier
from moracl.continual.parallel import DataParallelPlugin
from moracl.distributed import all_reduce_sum, world_size
from moracl.experts.mixture import Mixture
from moracl.experts.routers.base import LogitRouter
from moracl.experts.routers.task import TaskRouter
from moracl.guard import OnNonFinite, StepGuard, assert_finite
from moracl.model import MoRAModel
from moracl.train import EpochRecord

__all__ = [
    "EpochRecord",
    "FastTemplate",
    "GrowthConfig",
    "MoRAStrategy",
    "TensorBatches",
    "check_classifier",
    "check_optimizer",
    "default_growth",
    "derive_seed",
    "expert_experience",
    "grow_experts",
    "materialize",
    "quiet_evaluator",
    "routing_supervision_loss",
    "set_experience_masks",
]

OptimizerFactory = Callable[[nn.Module], Optimizer]


def quiet_evaluator() -> Any:
    """An Avalanche evaluation plugin with no metrics and no loggers, which moracl's runs pass
    (they compute their accuracy matrix directly); a strategy built without ``evaluator``
    reports with Avalanche's default one instead."""
    import warnings

    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin(loggers=[])


def check_optimizer(
    optimizer: Optimizer | None, optimizer_factory: OptimizerFactory | None, strategy: str
) -> None:
    """Check that a strategy got exactly one of a torch optimiser and an optimiser factory.

    Raises:
        TypeError: neither, or ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: both.
    """
    if optimizer is not None and optimizer_factory is not None:
        raise ValueError(
            f"{strategy} takes an optimizer or an optimizer_factory, not both; got "
            f"{type(optimizer).__name__} and {optimizer_factory!r}"
        )
    if optimizer is None and optimizer_factory is None:
        raise TypeError(
            f"{strategy} needs an optimizer: pass a torch optimizer over the model's "
            f"parameters ({strategy}(model, torch.optim.SGD(model.parameters(), lr=0.01), "
            f"...)) or optimizer_factory=<function of the model returning one>"
        )
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        hint = (
            " (a function building one goes to optimizer_factory=)" if callable(optimizer) else ""
        )
        raise TypeError(
            f"{strategy}'s optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}{hint}"
        )


class FastTemplate(SupervisedTemplate):
    """A ``SupervisedTemplate`` with in-memory mini-batches and a guarded step (see the module
    docstring), training with a torch optimiser or a fresh one per experience.

    With ``optimizer_factory``, each experience gets a fresh optimiser over the parameters
    that train now: no optimiser state crosses an experience boundary, so a checkpoint
    between experiences needs none (moracl's runs). With an ``optimizer`` instance, that
    optimiser trains throughout and is updated before each experience as Avalanche does
    (:meth:`make_optimizer`).

    Args:
        model: the model.
        optimizer: a torch optimiser over the model's parameters (Avalanche's usual form);
            exclusive with ``optimizer_factory``.
        optimizer_factory: builds the optimiser over the parameters that train now, once
            per experience.
        loader_seed: seeds the mini-batch order of each experience.
        name: the strategy's name in messages and logs.
        job: what runs it, prefixed to messages (``"moracl run"``; empty: nothing).
        on_nonfinite: stop (raise) or skip the step at a non-finite loss or gradient.
        kwargs: ``SupervisedTemplate`` arguments (``criterion``, ``train_mb_size``,
            ``train_epochs``, ``eval_mb_size``, ``device``, ``plugins``, ``evaluator``, ...);
            without ``evaluator``, Avalanche's default one.

    Raises:
        TypeError: no optimiser, or ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: both ``optimizer`` and ``optimizer_factory``.

    Attributes:
        step_guard: the step check; ``step_guard.steps`` and ``step_guard.skipped`` count
            every step and every skipped step since the strategy was built (a resumed run
            restores them).
        epoch_listener: called with the :class:`EpochRecord` of each epoch as it ends.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        loader_seed: int = 0,
        name: str | None = None,
        job: str = "",
        on_nonfinite: OnNonFinite | str = OnNonFinite.STOP,
        **kwargs: Any,
    ) -> None:
        check_optimizer(optimizer, optimizer_factory, type(self).__name__)
        self.optimizer_factory = optimizer_factory
        self.loader_seed = loader_seed
        self.name = name or type(self).__name__
        self.job = job
        # the choice's name in messages: the config key in moracl's runs, else the argument
        setting = "train.on_nonfinite" if job else "on_nonfinite"
        self.step_guard = StepGuard(on_nonfinite, setting=setting)
        self.epoch_listener: Callable[[EpochRecord], None] | None = None
        self._epoch_losses: list[tuple[int, float]] = []
        self._tensor_cache: dict[int, tuple[Any, tuple[Tensor, Tensor, Tensor]]] = {}
        if optimizer_factory is not None:
            optimizer = optimizer_factory(model)
        super().__init__(model=model, optimizer=optimizer, **kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        """Before each experience (after the model grew): with ``optimizer_factory``, a fresh
        optimiser over the parameters that train now.

        With an optimiser instance, Avalanche's update
        (:func:`avalanche.models.dynamic_optimizers.update_optimizer`): the instance stays
        (learning-rate schedulers bound to it keep working) with its state; a parameter the
        model replaced takes its predecessor's place, a new one (new experts) joins the
        parameter group of its parent module's parameters (Avalanche raises where those span
        several groups: pass ``optimizer_factory`` then). Parameters frozen since (old
        experts) stay in the optimiser but get no gradient, so it never moves them.
        """
        if self.optimizer_factory is None:
            super().make_optimizer(**kwargs)
            return
        self.optimizer = self.optimizer_factory(self.model)
        self.optimized_param_id: dict[str, Any] | None = {}

    def _tensors(self, dataset: Any) -> tuple[Tensor, Tensor, Tensor]:
        key = id(dataset)
        hit = self._tensor_cache.get(key)
        if hit is None or hit[0] is not dataset:
            hit = (dataset, materialize(dataset))
            self._tensor_cache = {key: hit}  # keep one: the current experience's
        return hit[1]

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        seed = derive_seed(self.loader_seed, self.experience.current_experience)
        self.dataloader = TensorBatches(
            self._tensors(self.adapted_dataset), self.train_mb_size, shuffle=shuffle, seed=seed
        )

    def make_eval_dataloader(self, **kwargs: Any) -> None:
        data = materialize(self.adapted_dataset)
        self.dataloader = TensorBatches(data, self.eval_mb_size, shuffle=False)

    # -- the guarded step -------------------------------------------------------------------

    def experience_label(self) -> str:
        """The experience being trained, for messages (``"experience 2"``)."""
        return f"experience {self.experience.current_experience}"

    def where(self) -> str:
        """The strategy and experience, for messages: ``"moracl run: strategy 'Naive',
        experience 1"``."""
        prefix = f"{self.job}: " if self.job else ""
        return f"{prefix}strategy {self.name!r}, {self.experience_label()}"

    def _step_where(self) -> str:
        return (
            f"{self.where()}, epoch {self.clock.train_exp_epochs}, step "
            f"{self.clock.train_epoch_iterations} (global step {self.step_guard.steps})"
        )

    def optimizer_step(self) -> None:
        """Step the optimiser if the loss and every gradient are finite (see the module).

        Under data parallelism the loss checked (and logged) is the global batch's: each
        process's mean loss weighted by its share of the rows (the weights its gradients are
        summed with), so every process decides alike and logs the one-process value."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        loss = self.loss
        if world_size() > 1:
            share = next((p.share for p in self.plugins if isinstance(p, DataParallelPlugin)), None)
            if share is None:
                raise ValueError(
                    "a data-parallel strategy needs moracl's DataParallelPlugin (it splits each "
                    "global batch and sums the gradients)"
                )
            loss = all_reduce_sum(loss.detach().float() * share)
        value = self.step_guard.check(
            loss, params, self._step_where, named=self.model.named_parameters
        )
        if value is None:
            return  # skipped: no update (the next iteration zeroes the gradients)
        super().optimizer_step()
        self._epoch_losses.append((self.step_guard.steps, value))

    def training_epoch(self, **kwargs: Any) -> None:
        """One epoch of Avalanche's loop, then its :class:`EpochRecord`."""
        self._epoch_losses = []
        steps, skipped = self.step_guard.steps, self.step_guard.skipped
        super().training_epoch(**kwargs)
        losses = [v for _, v in self._epoch_losses]
        record = EpochRecord(
            epoch=int(self.clock.train_exp_epochs),
            step=self.step_guard.steps,
            loss=math.fsum(losses) / len(losses) if losses else None,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            steps=self.step_guard.steps - steps,
            skipped=self.step_guard.skipped - skipped,
            step_losses=self._epoch_losses,
            finished=time.perf_counter(),
        )
        self._epoch_losses = []
        self.step_guard.warn_skipped(skipped, record.steps, f"{self.where()}, epoch {record.epoch}")
        if self.epoch_listener is not None:
            self.epoch_listener(record)

    def _after_training_exp(self, **kwargs: Any) -> None:
        super()._after_training_exp(**kwargs)  # plugins (a head fine-tuning) run here
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        assert_finite(trainable, f"{self.where()}: the parameters after training")


@dataclass(frozen=True)
class GrowthConfig:
    """How moracl's strategy grows for each new experience.

    Attributes:
        adapter: the configuration of each new expert.
        experts: experts added per experience.
        reuse_old: task routing only: a new task may also use the frozen experts of earlier
            tasks (with learned weights), for forward transfer; old tasks never see new ones.
        freeze_heads: freeze the heads of finished tasks (multi-head models).
        warm_start: new experts start as copies of the newest (now frozen) ones, so an
            experience starts from what the last one learned, as one fine-tuned adapter would;
            the copies then train alone and their sources never change.
        new_expert_logit: task routing with ``reuse_old``: the new task's initial gate logit
            of its own experts (the reused old ones start at 0), so that its own experts carry
            most of the gate from the first step (4.0: 93 % of it next to four old experts)
            instead of ``1 / experts``, which would scale their updates down.
    """

    adapter: AdapterConfig
    experts: int = 1
    reuse_old: bool = True
    freeze_heads: bool = True
    warm_start: bool = True
    new_expert_logit: float = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.experts, int) or self.experts <= 0:
            raise ValueError(
                f"experts per experience must be a positive integer, got {self.experts!r}"
            )


def expert_experience(mixture: Mixture) -> Tensor:
    """``(e,)`` the experience each expert of ``mixture`` was grown for (its bank's index:
    experience 0 has the initial bank, every growth adds one)."""
    owners = [torch.full((b.num_experts,), i) for i, b in enumerate(mixture.expert_banks())]
    return torch.cat(owners)


def grow_experts(model: ContinualClassifier, experience: int, growth: GrowthConfig) -> None:
    """Prepare ``model`` for training experience ``experience`` (> 0): freeze every existing
    expert, add ``growth.experts`` new ones to each mixture (copies of the newest ones with
    ``growth.warm_start``), give a task router a mask row (and initial gate logits) for the
    new task, and freeze the heads of the earlier tasks.

    Old tasks' router rows get ``False`` for the new experts, so their outputs stay
    bit-identical (see :meth:`moracl.experts.routers.base.Router.grow`).
    """
    encoder = model.encoder
    mixtures = list(encoder.mixtures()) if isinstance(encoder, MoRAModel) else []
    if not mixtures:
        raise ValueError("grow_experts needs an encoder with mixtures of experts (a MoRAModel)")
    for _, mixture in mixtures:
        old = mixture.num_experts
        mixture.freeze_experts()
        newest = mixture.expert_banks()[-1]
        bank = mixture.grow(growth.adapter, growth.experts)
        same = type(bank) is type(newest) and bank.config == newest.config
        if growth.warm_start and same and bank.num_experts == newest.num_experts:
            bank.load_state_dict(newest.state_dict())  # same shapes: a copy
            if isinstance(bank, AdaLoRABank):
                bank.reset_ranks()  # the copies' triplets all enter this experience's budget
        router = mixture.router
        if isinstance(router, TaskRouter):
            mask = torch.zeros(mixture.num_experts, dtype=torch.bool)
            mask[old:] = True
            if growth.reuse_old:
                mask[:old] = True
            router.set_expert_mask(experience, mask)
            if growth.reuse_old and router.task_logits is not None:
                with torch.no_grad():  # the new task's row only: old tasks stay bit-identical
                    router.task_logits[experience, old:] = growth.new_expert_logit
    if model.multi_head and growth.freeze_heads:
        for head in model.heads[:experience]:
            head.requires_grad_(False)


def routing_supervision_loss(encoder: MoRAModel, row_experience: Tensor) -> Tensor:
    """How far each mixture's router is from sending a row to the experts of the row's
    experience (its class's, or the one it was trained in): ``-log`` of the probability mass
    the router's softmax
    (over the experts its global mask allows) puts on that experience's experts, averaged
    over the router's inputs (tokens, or rows for a router per sample), then over mixtures
    (a scalar; zero when no mixture kept its input).

    The router's clean logits are computed here from the inputs the encoder kept
    (``encoder.record_router_inputs``), so the loss holds whether or not the forward routed
    by the routers (see ``MoRAStrategy``'s ``teacher_forcing``); its gradient reaches the
    routers and, through their inputs, the trainable layers below them.

    Args:
        encoder: the model after its forward (its :attr:`~MoRAModel.last_router_inputs`).
        row_experience: ``(b,)`` the experience of each batch row; a mixture whose router read
            ``n`` inputs takes the ``n / b`` of a row to be consecutive, in batch order (an
            encoder that regroups rows, such as :class:`~moracl.backbones.MiniLMTop` with
            ``length_buckets > 1``, must not).

    Raises:
        ValueError: a router without learned logits, or one that read a number of inputs
            that is not a multiple of ``b``.
    """
    b = row_experience.shape[0]
    terms = []
    for path, mixture in encoder.mixtures():
        x = encoder.last_router_inputs.get(path)
        if x is None:
            continue
        router = mixture.router
        if not isinstance(router, LogitRouter):
            raise ValueError(
                f"routing supervision teaches a router with learned logits; {path} has a "
                f"{router.config.type!r} router"
            )
        if x.shape[0] % b:
            raise ValueError(
                f"{path} routed {x.shape[0]} tokens for {b} rows: routing supervision needs "
                f"every row's tokens, rows in batch order (with MiniLMTop set length_buckets=1)"
            )
        logits = F.linear(x, router.weight.to(x.dtype)).float()  # (n, e) clean logits
        allowed = router.global_mask.to(logits.device)  # (e,)
        owner = expert_experience(mixture).to(logits.device)  # (e,)
        target = row_experience.to(logits.device).repeat_interleave(x.shape[0] // b)  # (n,)
        own = (owner[None, :] == target[:, None]) & allowed  # (n, e)
        lowest = torch.finfo(logits.dtype).min
        total = torch.logsumexp(logits.masked_fill(~allowed, lowest), dim=-1)  # (n,)
        mass = torch.logsumexp(logits.masked_fill(~own, lowest), dim=-1)  # (n,) log of it
        terms.append((total - mass).mean())
    if not terms:
        return row_experience.new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()


def set_experience_masks(model: ContinualClassifier, experiences: int) -> None:
    """Give every mixture's learned router one expert-mask row per experience ``0 ..
    experiences - 1``: the experts grown for it, so that task ids equal to a row's
    experience route it to them (teacher forcing). Without task ids routing is unchanged."""
    encoder = model.encoder
    if not isinstance(encoder, MoRAModel):
        return
    for _, mixture in encoder.mixtures():
        router = mixture.router
        if not isinstance(router, LogitRouter):
            continue
        owner = expert_experience(mixture).to(router.global_mask.device)
        for e in range(experiences):
            router.set_expert_mask(e, owner == e)


def check_classifier(model: Any, strategy: str) -> ContinualClassifier:
    """``model`` if it is a :class:`ContinualClassifier` over a ``MoRAModel`` with mixtures of
    experts (what :class:`MoRAStrategy` grows).

    Raises:
        TypeError: another model, with how to build the one expected.
        ValueError: an encoder without mixtures of experts.
    """
    build = (
        "ContinualClassifier(MoRAModel(encoder, MixtureConfig(...), target_modules=[...]), "
        "feature_dim, experience_classes, multi_head=False) (from moracl.continual import "
        "ContinualClassifier; from moracl import MoRAModel, MixtureConfig), where encoder maps "
        "x to (b, feature_dim) features and experience_classes lists each experience's class "
        "ids ([e.classes_in_this_experience for e in benchmark.train_stream])"
    )
    if not isinstance(model, ContinualClassifier):
        what = "a MoRAModel" if isinstance(model, MoRAModel) else type(model).__name__
        raise TypeError(f"{strategy} trains a ContinualClassifier, got {what}; build one: {build}")
    encoder = model.encoder
    if not isinstance(encoder, MoRAModel):
        raise TypeError(
            f"{strategy} grows the experts of a MoRAModel encoder, got a "
            f"{type(encoder).__name__} encoder; build the classifier as {build}"
        )
    if not any(True for _ in encoder.mixtures()):
        raise ValueError(
            f"{strategy} grows mixtures of experts, but the MoRAModel encoder has none: build "
            f"it with a MixtureConfig adapter (MoRAModel(encoder, MixtureConfig(kind='lora', "
            f"rank=4, experts=1, router=TopKRouterConfig(k=1)), ...), from moracl import "
            f"MixtureConfig; from moracl.experts import TopKRouterConfig), or train its single "
            f"adapter with FastTemplate"
        )
    return model


def default_growth(model: ContinualClassifier) -> GrowthConfig:
    """Grow as the model started: per experience, as many experts as the newest bank of its
    first mixture holds, configured alike (the other fields at :class:`GrowthConfig`'s
    defaults)."""
    encoder = cast(MoRAModel, check_classifier(model, "default_growth").encoder)
    _, mixture = next(iter(encoder.mixtures()))
    newest = mixture.expert_banks()[-1]
    return GrowthConfig(adapter=newest.config, experts=newest.num_experts)


class MoRAStrategy(FastTemplate):
    """Mixture-of-adapter-experts continual learning on a :class:`ContinualClassifier`.

    Before each experience after the first, :func:`grow_experts` adds and masks experts; the
    loss adds the routers' weighted auxiliary losses to ``criterion``'s loss (cross-entropy by
    default).

    AdaLoRA experts (``adapter.kind: adalora``): each experience's training allocates a rank
    budget (:class:`~moracl.adapters.adalora.RankAllocator`) over the experts that train now
    (the earlier ones are frozen, outside it), from their initial rank to ``target_rank`` per
    layer and expert on average, over that experience's optimiser steps (``train_epochs ×``
    its batches; a skipped step is not counted), and the loss adds their orthogonality
    regulariser. The allocation is final at the experience's end at the latest (early
    stopping, skipped steps: :meth:`RankAllocator.finalize`), so each expert keeps its
    ``rank_mask`` from then on; nothing of the budget crosses an experience boundary, so a
    checkpoint between experiences (the masks are buffers of the model) resumes exactly.

    In Avalanche's usual form::

        strategy = MoRAStrategy(model=model,
                                optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                train_mb_size=32, train_epochs=1, eval_mb_size=64)
        for experience in benchmark.train_stream:
            strategy.train(experience)
            results = strategy.eval(benchmark.test_stream)

    Args:
        model: the classifier; its encoder is a ``MoRAModel`` with mixtures
            (:func:`check_classifier`).
        optimizer: a torch optimiser over the model's parameters (see
            :meth:`FastTemplate.make_optimizer` for how new experts join it); exclusive with
            ``optimizer_factory``.
        optimizer_factory: builds the optimiser over the parameters that train now, once per
            experience.
        growth: what to add per experience; ``None``: :func:`default_growth` (as many experts
            as the model started with, configured alike).
        route_supervision: weight of :func:`routing_supervision_loss` (0: none); needs
            ``class_experience``.
        class_experience: ``(c,)`` the experience each class of the stream is learned in
            (classes unique to one experience, as in class-incremental streams).
        experience_labels: for streams where a class is in several experiences
            (domain-incremental): train on each experience with its rows' task labels set to
            the experience's index (:meth:`training_experience`; replayed rows keep theirs), so
            that a row's experience is its task label; needs no ``class_experience``.
        teacher_forcing: while training, route every row to the experts of its experience
            (:func:`set_experience_masks`) instead of by the routers, which then learn from
            ``route_supervision``'s loss alone; evaluation routes by the routers. Needs
            ``route_supervision > 0``.
        kwargs: ``SupervisedTemplate`` arguments (``train_mb_size``, ``train_epochs``,
            ``eval_mb_size``, ``device``, ``plugins``, ``evaluator``, ...).
    """

    def __init__(
        self,
        *,
        model: ContinualClassifier,
        optimizer: Optimizer | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        growth: GrowthConfig | None = None,
        route_supervision: float = 0.0,
        class_experience: Tensor | None = None,
        experience_labels: bool = False,
        teacher_forcing: bool = False,
        **kwargs: Any,
    ) -> None:
        check_classifier(model, type(self).__name__)
        check_optimizer(optimizer, optimizer_factory, type(self).__name__)
        if growth is not None and not isinstance(growth, GrowthConfig):
            raise TypeError(f"growth must be a GrowthConfig or None, got {type(growth).__name__}")
        known = class_experience is not None or experience_labels
        if route_supervision < 0 or (route_supervision > 0 and not known):
            raise ValueError(
                f"route_supervision must be >= 0 and, when > 0, come with class_experience or "
                f"experience_labels; got {route_supervision!r}, {class_experience!r} and "
                f"{experience_labels!r}"
            )
        if teacher_forcing and not route_supervision:
            raise ValueError(
                "teacher_forcing routes training rows by their experience, so the routers learn "
                "only from route_supervision's loss: set route_supervision > 0 (got 0)"
            )
        self.growth = growth if growth is not None else default_growth(model)
        self.route_supervision = route_supervision
        self.class_experience = class_experience
        self.experience_labels = experience_labels
        self.teacher_forcing = teacher_forcing
        self.experiences_prepared = 1  # the initial experts serve experience 0
        self.rank_allocator: RankAllocator | None = None  # while an experience trains
        self._budget_hook: Any = None
        self._budget_steps = 0
        super().__init__(
            model=model, optimizer=optimizer, optimizer_factory=optimizer_factory, **kwargs
        )
        if route_supervision and isinstance(model.encoder, MoRAModel):
            model.encoder.record_router_inputs = True

    def prepare(self, experience: int) -> None:
        """Grow the model until it has the experts of ``experience`` (idempotent)."""
        model = check_classifier(self.model, type(self).__name__)
        while self.experiences_prepared <= experience:
            grow_experts(model, self.experiences_prepared, self.growth)
            self.experiences_prepared += 1
        model.route_tasks(experience + 1)
        if self.teacher_forcing:
            set_experience_masks(model, experience + 1)

    def training_experience(self, experience: Any) -> Any:
        """``experience`` as this strategy trains on it: with ``experience_labels`` a copy
        whose rows' task labels are its index (the replay buffer stores those rows, so
        replayed rows keep the experience they came from); else ``experience`` itself."""
        if not self.experience_labels:
            return experience
        import copy

        data = experience.dataset
        labelled = copy.copy(experience)
        index = [int(experience.current_experience)] * len(data)
        labelled._dataset = data.update_data_attribute("targets_task_labels", index)
        return labelled

    def train(self, experiences: Any, eval_streams: Any = None, **kwargs: Any) -> Any:
        if isinstance(experiences, (list, tuple)):
            experiences = [self.training_experience(e) for e in experiences]
        else:
            experiences = self.training_experience(experiences)
        return super().train(experiences, eval_streams, **kwargs)

    def row_experience(self) -> Tensor:
        """``(b,)`` the experience of each row of the current mini-batch: its class's, or
        with ``experience_labels`` its task label."""
        if self.class_experience is not None:
            return self.class_experience.to(self.mb_y.device)[self.mb_y]
        if not self.experience_labels:
            raise ValueError("a row's experience needs class_experience or experience_labels")
        return self.mb_task_id.long()

    def forward(self) -> Any:
        if not (self.is_training and self.teacher_forcing):
            return super().forward()
        model = self.model
        if not isinstance(model, ContinualClassifier):  # replaced since __init__'s check
            raise TypeError(
                f"MoRAStrategy trains a ContinualClassifier, got {type(model).__name__}"
            )
        with model.forced_routes(self.row_experience()):  # (b,)
            return super().forward()

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        if self.is_training:
            self.prepare(self.experience.current_experience)
        return super().model_adaptation(model)

    def _before_training_exp(self, **kwargs: Any) -> None:
        super()._before_training_exp(**kwargs)  # data, growth, optimiser, plugins' loaders
        encoder = self.model.encoder
        if not rank_budget_modules(encoder):
            return
        steps = int(self.train_epochs) * len(self.dataloader)
        try:
            self.rank_allocator = RankAllocator(encoder, total_steps=steps)
        except ValueError as e:
            raise ValueError(f"{self.where()}: {e}") from None
        self._budget_steps = 0
        self._budget_hook = self.optimizer.register_step_post_hook(self._allocate_rank)

    def _allocate_rank(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """After each completed optimiser step (its gradients not yet cleared)."""
        if self.rank_allocator is not None:
            self.rank_allocator.update_and_allocate(self._budget_steps)
            self._budget_steps += 1

    def _after_training_exp(self, **kwargs: Any) -> None:
        allocator = self.rank_allocator
        if allocator is not None:
            self._budget_hook.remove()
            self.rank_allocator, self._budget_hook = None, None
            if not allocator.finalize():
                warnings.warn(
                    f"{self.where()}: no optimiser step completed, so the rank budget made no "
                    "allocation; the new adalora experts keep their initial rank",
                    stacklevel=2,
                )
        super()._after_training_exp(**kwargs)

    def criterion(self) -> Tensor:
        loss: Tensor = self._criterion(self.mb_output, self.mb_y)
        encoder = self.model.encoder
        if self.is_training and isinstance(encoder, MoRAModel):
            loss = loss + encoder.aux_loss()
            if self.rank_allocator is not None:  # AdaLoRA experts: their orthogonality loss
                loss = loss + orth_loss(encoder)
            if self.route_supervision:
                rows = self.row_experience()  # (b,)
                loss = loss + self.route_supervision * routing_supervision_loss(encoder, rows)
        return loss


def trainable_names(model: nn.Module) -> Sequence[str]:
    """Names of the parameters that train now."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
