"""Avalanche plugins and strategy variants moracl's runs need: replay whose buffer is a
function of a seed (so a resumed run rebuilds it exactly), class-balanced fine-tuning of a
shared head on the buffer, and joint training on the lean template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin
from avalanche.training.supervised import JointTraining

from moracl.continual.inference import input_features
from moracl.continual.model import ContinualClassifier
from moracl.continual.stateful import PluginState
from moracl.continual.strategy import (
    FastTemplate,
    derive_seed,
    materialize,
    routing_supervision_loss,
)
from moracl.guard import StepGuard
from moracl.model import MoRAModel
from moracl.train import guarded_epoch

__all__ = [
    "BalancedHeadPlugin",
    "FastJoint",
    "SeededReplayPlugin",
    "TaskStatisticsPlugin",
    "balanced_rows",
]


class SeededReplayPlugin(ReplayPlugin):
    """Avalanche's experience-balanced replay; the buffer update after experience ``i``
    draws from its own generator seeded by ``(seed, i)``, so the buffer after any experience
    can be rebuilt from the stream alone (:meth:`rebuild`).

    Reads ``strategy.experience``; writes ``strategy.dataloader`` (Avalanche's replay loader).
    """

    state_key = "replay"

    def __init__(self, mem_size: int, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(mem_size=mem_size, **kwargs)
        self.seed = seed
        self.updates = 0  # experiences added to the buffer

    def _update(self, strategy: Any, experience: Any) -> None:
        policy: Any = self.storage_policy
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "replay", experience.current_experience))
            policy.post_adapt(strategy, experience)
        self.updates += 1

    def state_dict(self) -> PluginState:
        """The number of experiences in the buffer (the buffer itself is rebuilt from them)."""
        return PluginState(values={"experiences": self.updates})

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        """Rebuild the buffer from the ``trained`` experiences (as many as the state says).

        Raises:
            ValueError: the state counts another number of experiences than ``trained``.
        """
        count = state.values.get("experiences")
        if isinstance(count, bool) or count != len(trained):
            raise ValueError(
                f"replay.experiences={count!r}; expected {len(trained)}, the experiences "
                f"trained so far"
            )
        self.rebuild(strategy, trained)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._update(strategy, strategy.experience)

    def rebuild(self, strategy: Any, experiences: Sequence[Any]) -> None:
        """The buffer as it was after training on ``experiences`` (in order)."""
        from avalanche.training.storage_policy import ExperienceBalancedBuffer

        self.storage_policy = ExperienceBalancedBuffer(max_size=self.mem_size, adaptive_size=True)
        self.updates = 0
        as_trained = getattr(strategy, "training_experience", lambda e: e)
        for exp in experiences:
            self._update(strategy, as_trained(exp))


def balanced_rows(
    buffer_y: torch.Tensor, new_y: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Indices into ``new_y (m,)`` drawing, for each class of ``new_y``, as many rows as the
    buffer ``buffer_y (n,)`` holds per class on average (all of a class when it has fewer),
    classes in increasing order, rows at random."""
    per_class = max(1, len(buffer_y) // max(int(buffer_y.unique().numel()), 1))
    picks = []
    for c in new_y.unique():  # sorted
        rows = (new_y == c).nonzero().flatten()
        picks.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(picks) if picks else new_y.new_zeros(0)


class BalancedHeadPlugin(SupervisedPlugin):
    """Class-balanced fine-tuning of a shared head after each experience (after the first).

    A shared head trained on a new experience next to a small replay buffer sees the new
    classes far more often than the old ones and favours them. After training, the head
    alone trains for ``epochs`` passes over the buffer plus the same number of rows per class
    from the experience just learned (balanced fine-tuning, Castro et al. 2018, "End-to-End
    Incremental Learning"), on features computed once by the frozen rest of the model. Its
    batches are drawn from a generator seeded by ``(seed, experience)``, so a resumed run
    repeats it exactly.

    Place it before ``replay`` in the plugin list: it reads the buffer as it was before the
    experience was added.

    Reads ``strategy.model`` (a :class:`ContinualClassifier` with one shared head),
    ``strategy.experience``, ``strategy.adapted_dataset``, ``strategy.train_mb_size`` and,
    on a :class:`FastTemplate`, its ``step_guard`` and ``where()`` (every step is checked
    like the strategy's own: stopped or skipped at a non-finite loss or gradient); writes the
    head's parameters.

    With ``router_epochs`` the routers of a task-agnostic mixture are rebalanced first, the
    same way: they alone train for ``router_epochs`` passes over the buffer, each row labelled
    with the experience it was stored from, plus as many rows of the experience just learned
    as the buffer holds per experience, on :func:`routing_supervision_loss`. A router trained
    next to a small buffer favours the newest experience's experts as the head favours its
    classes. With ``force_routes`` the rows run through their experience's experts meanwhile
    (as training under teacher forcing does).

    Args:
        replay: the plugin whose buffer holds the earlier experiences.
        epochs: passes over the balanced set for the head (0: the head is left as it is).
        lr: AdamW learning rate of the head.
        seed: seeds the row draws and the batch orders.
        router_epochs: passes over the experience-balanced set for the routers (0: none).
        router_lr: AdamW learning rate of the routers.
        force_routes: route each row to its experience's experts while the routers train.
    """

    def __init__(
        self,
        replay: ReplayPlugin,
        *,
        epochs: int,
        lr: float,
        seed: int = 0,
        router_epochs: int = 0,
        router_lr: float = 1e-2,
        force_routes: bool = False,
    ) -> None:
        super().__init__()
        if epochs < 0 or router_epochs < 0 or epochs + router_epochs == 0:
            raise ValueError(
                f"epochs and router_epochs must be >= 0, one of them > 0; got {epochs!r} and "
                f"{router_epochs!r}"
            )
        if not lr > 0 or not router_lr > 0:
            raise ValueError(f"lr and router_lr must be > 0, got {lr!r} and {router_lr!r}")
        self.replay = replay
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.router_epochs = router_epochs
        self.router_lr = router_lr
        self.force_routes = force_routes
        #: checks every step; :meth:`after_training_exp` takes the strategy's
        self.step_guard = StepGuard()
        #: names the strategy and experience in messages
        self.where = "balanced fine-tuning"

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        exp = strategy.experience.current_experience
        if not isinstance(model, ContinualClassifier) or model.multi_head or exp == 0:
            return
        groups = self.replay.storage_policy.buffer_groups  # experience -> its stored rows
        parts = [(e, materialize(g.buffer)) for e, g in groups.items() if len(g.buffer)]
        if not parts:
            return
        x_old = torch.cat([p[0] for _, p in parts])
        y_old = torch.cat([p[1] for _, p in parts])
        t_old = torch.cat([p[2] for _, p in parts])
        x_new, y_new, t_new = materialize(strategy.adapted_dataset)
        device = next(model.parameters()).device
        # the strategy's step check and counts, and its name in messages
        self.step_guard = getattr(strategy, "step_guard", None) or StepGuard()
        self.where = strategy.where() if isinstance(strategy, FastTemplate) else f"experience {exp}"
        if self.router_epochs:
            e_old = torch.cat([torch.full_like(p[1], e) for e, p in parts])
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "balance-routers", exp))
            take = torch.randperm(len(y_new), generator=gen)[: len(y_old) // len(parts)]
            x = torch.cat([x_old, x_new[take]])
            rows_exp = torch.cat([e_old, torch.full_like(take, exp)]).to(device)
            self.fit_routers(model, x, rows_exp, strategy.train_mb_size, gen)
        if self.epochs:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "balance", exp))
            rows = balanced_rows(y_old, y_new, generator)
            x = torch.cat([x_old, x_new[rows]])
            y = torch.cat([y_old, y_new[rows]]).to(device)
            tasks = torch.cat([t_old, t_new[rows]]).long()
            self.fit_head(model, x, y, strategy.train_mb_size, generator, tasks)

    def fit_routers(
        self,
        model: ContinualClassifier,
        x: torch.Tensor,
        experience: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        """Train the routers of ``model``'s mixtures alone on ``x (n, ...)`` to send each row
        to the experts of ``experience (n,)`` (:func:`routing_supervision_loss`); every step
        is checked by :attr:`step_guard`."""
        encoder = model.encoder
        if not isinstance(encoder, MoRAModel):
            return
        params = [
            p for _, m in encoder.mixtures() for p in m.router.parameters() if p.requires_grad
        ]
        if not params:
            return
        device = experience.device
        optimizer = torch.optim.AdamW(params, lr=self.router_lr, weight_decay=0.0)
        guard, where = self.step_guard, f"{self.where}, balanced router fine-tuning"
        named = [(f"{path}.router.{n}", p) for path, m in encoder.mixtures() for n, p in
                 m.router.named_parameters() if p.requires_grad]  # fmt: skip
        recording = encoder.record_router_inputs
        encoder.record_router_inputs = True
        forcing = self.force_routes

        def step(batch: torch.Tensor) -> torch.Tensor:
            forced = experience[batch] if forcing else None
            # inputs without a graph: the routers alone train
            with torch.no_grad(), model.forced_routes(forced):
                model.features(x[batch.cpu()].to(device))
            loss = routing_supervision_loss(encoder, experience[batch])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            return loss

        try:
            for epoch in range(self.router_epochs):
                order = torch.randperm(len(experience), generator=generator).to(device)
                batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
                guarded_epoch(
                    step,
                    batches,
                    optimizer=optimizer,
                    params=params,
                    guard=guard,
                    where=f"{where}, epoch {epoch}",
                    epoch=epoch,
                    named=lambda: named,
                )
        finally:
            encoder.record_router_inputs = recording
            for p in params:
                p.grad = None

    def fit_head(
        self,
        model: ContinualClassifier,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        tasks: torch.Tensor | None = None,
    ) -> None:
        """Train ``model.heads[0]`` on ``x (n, ...)``, ``y (n,)`` with the rest fixed; a
        model that infers tasks computes the features through the experts of the rows'
        ``tasks (n,)`` (their experiences, as in training); every step is checked by
        :attr:`step_guard`."""
        device = y.device
        was_training = model.training
        model.eval()
        by_task = model.task_inference is not None and tasks is not None

        def features(rows: slice) -> torch.Tensor:
            xb = x[rows].to(device)
            if by_task:
                assert tasks is not None
                return model.features(xb, tasks[rows].to(device), infer=False)
            return model.features(xb)

        with torch.no_grad():
            feats = torch.cat(
                [features(slice(i, i + 256)) for i in range(0, len(x), 256)]
            )  # (n, d)
        model.train(was_training)
        head = model.heads[0]
        params = list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        guard, where = self.step_guard, f"{self.where}, balanced head fine-tuning"
        lowest = torch.finfo(feats.dtype).min

        def step(batch: torch.Tensor) -> torch.Tensor:
            logits = head(feats[batch]).masked_fill(~model.seen[None], lowest)  # (b, c)
            loss = F.cross_entropy(logits, y[batch])
            loss.backward()
            return loss

        for epoch in range(self.epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            guarded_epoch(
                step,
                batches,
                optimizer=optimizer,
                params=params,
                guard=guard,
                where=f"{where}, epoch {epoch}",
                epoch=epoch,
                named=head.named_parameters,
            )


class TaskStatisticsPlugin(SupervisedPlugin):
    """Adds the rows of each experience just trained on to the model's
    :class:`~moracl.continual.inference.GaussianTaskInference` (features from
    :func:`~moracl.continual.inference.input_features`, which the experts do not change).

    Reads ``strategy.model`` (a :class:`ContinualClassifier` with ``task_inference``),
    ``strategy.experience`` and ``strategy.adapted_dataset`` (the experience's own rows, not
    the replayed ones); writes the statistics' buffers.

    Args:
        batch_size: rows per forward.
    """

    def __init__(self, *, batch_size: int = 256) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = batch_size

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        if not isinstance(model, ContinualClassifier) or model.task_inference is None:
            return
        encoder = model.encoder
        assert isinstance(encoder, MoRAModel)  # ContinualClassifier checks it
        x, y, _ = materialize(strategy.adapted_dataset)
        device = next(model.parameters()).device
        exp = int(strategy.experience.current_experience)
        for start in range(0, len(y), self.batch_size):
            xb = x[start : start + self.batch_size].to(device)
            feats = input_features(encoder, xb)  # (b, d)
            model.task_inference.update(feats, exp, y[start : start + self.batch_size])


class FastJoint(FastTemplate, JointTraining):  # type: ignore[misc]
    """Joint training (all experiences at once: the upper reference) on the lean template."""

    def experience_label(self) -> str:
        """``"experiences 0-4 (joint)"``: Joint trains once, on all of them."""
        exps = [int(e.current_experience) for e in getattr(self, "_experiences", [])]
        span = f"{min(exps)}-{max(exps)}" if exps else "all"
        return f"experiences {span} (joint)"
