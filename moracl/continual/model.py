"""The classifier every continual strategy trains: a frozen encoder with adapters, and heads.

Shape legend: ``b`` batch rows, ``d`` features, ``c`` classes of the whole stream.

Task-incremental streams get one head per task (its columns are the task's classes; the other
columns are filled with the lowest float, so the softmax is over the task's classes);
class- and domain-incremental streams share one head, with the classes not yet trained on
masked out. Logits always span the stream's global class ids, so Avalanche's metrics and
losses apply unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from torch import Tensor, nn

from moracl.continual.inference import GaussianTaskInference, input_features
from moracl.model import MoRAModel

__all__ = ["ContinualClassifier"]


class ContinualClassifier(MultiTaskModule):
    """``encoder`` (typically a :class:`~moracl.MoRAModel` over a frozen feature encoder) and
    linear heads over the stream's global classes.

    Args:
        encoder: maps ``x`` to features ``(b, d)``; called with ``task_ids`` when
            ``route_by_task`` (a MoRAModel routing its mixtures by task).
        feature_dim: ``d``.
        experience_classes: the global class ids of each experience.
        multi_head: one head per task (task-incremental) instead of one shared head.
        route_by_task: pass the task labels to the encoder as ``task_ids``.
        task_inference: with ``route_by_task``, infers each row's task in evaluation mode
            from what the encoder's first adapted layer reads (:func:`input_features`), in
            place of the task labels given (class- and domain-incremental streams, whose
            test rows carry none); training routes by the labels given.
    """

    class_task: Tensor  # (c,) the task owning each class (multi-head), else -1
    seen: Tensor  # (c,) bool, classes trained on so far (shared head)

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        experience_classes: Sequence[Sequence[int]],
        *,
        multi_head: bool,
        route_by_task: bool = False,
        task_inference: GaussianTaskInference | None = None,
    ) -> None:
        super().__init__()
        if task_inference is not None and not (route_by_task and isinstance(encoder, MoRAModel)):
            raise ValueError(
                "task_inference picks the task ids a MoRAModel encoder routes by: it needs "
                "route_by_task=True and a MoRAModel encoder"
            )
        self.encoder = encoder
        self.multi_head = multi_head
        self.route_by_task = route_by_task
        self.experience_classes = [list(c) for c in experience_classes]
        num_classes = 1 + max(c for classes in experience_classes for c in classes)
        self.num_classes = num_classes
        self.max_class_label = num_classes
        owner = torch.full((num_classes,), -1, dtype=torch.long)
        if multi_head:
            self.heads = nn.ModuleList(nn.Linear(feature_dim, len(c)) for c in experience_classes)
            for t, classes in enumerate(experience_classes):
                owner[list(classes)] = t
            self.task_classes = [list(c) for c in experience_classes]
        else:
            self.heads = nn.ModuleList([nn.Linear(feature_dim, num_classes)])
            self.task_classes = [list(range(num_classes))]
        self._routed_tasks = 1  # tasks with experts; later task ids borrow the newest one's
        self._forced_routes: Tensor | None = None  # see :meth:`forced_routes`
        self._given_tasks = False  # see :meth:`given_tasks`
        self.task_inference = task_inference
        self._last_inferred: Tensor | None = None  # see :meth:`take_inferred`
        self.register_buffer("class_task", owner)
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def routed_tasks(self) -> int:
        """Tasks with experts of their own; a later task id borrows the newest one's."""
        return self._routed_tasks

    def route_tasks(self, tasks: int) -> None:
        """Route task ids ``0 .. tasks - 1`` to their own experts (the count never shrinks).

        Raises:
            ValueError: ``tasks`` is not a positive integer.
        """
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ValueError(f"tasks must be a positive integer, got {tasks!r}")
        self._routed_tasks = max(self._routed_tasks, tasks)

    @contextmanager
    def forced_routes(self, experiences: Tensor | None) -> Iterator[None]:
        """Inside the block, route every row through the experts of its experience
        ``experiences (b,)`` (passed to the encoder as task ids; its routers hold one expert
        mask per experience), as training under teacher forcing does; ``None``: unchanged."""
        before = self._forced_routes
        self._forced_routes = experiences
        try:
            yield
        finally:
            self._forced_routes = before

    @contextmanager
    def given_tasks(self) -> Iterator[None]:
        """Inside the block, route by the task labels given, in evaluation mode too (no
        :attr:`task_inference`): a row labelled with its experience runs through that
        experience's experts, as in training."""
        before = self._given_tasks
        self._given_tasks = True
        try:
            yield
        finally:
            self._given_tasks = before

    def take_inferred(self) -> Tensor | None:
        """``(b,)`` the tasks inferred by the last forward that inferred them, or ``None``;
        cleared by the call."""
        inferred, self._last_inferred = self._last_inferred, None
        return inferred

    def class_experience(self) -> Tensor:
        """``(c,)`` the experience each class is learned in.

        Raises:
            ValueError: a class belongs to several experiences (domain-incremental streams).
        """
        owner = torch.full((self.num_classes,), -1, dtype=torch.long)
        for t, classes in enumerate(self.experience_classes):
            for c in classes:
                if owner[c] >= 0:
                    raise ValueError(
                        f"class {c} is learned in experiences {int(owner[c])} and {t}: routing "
                        f"by a class's experience needs each class in one experience"
                    )
                owner[c] = t
        return owner

    def adaptation(self, experience: Any) -> None:
        """Mark the experience's classes as seen when training (Avalanche calls this before
        each experience)."""
        super().adaptation(experience)
        if self.training:
            self.seen[list(experience.classes_in_this_experience)] = True

    def features(
        self, x: Tensor, task_labels: Tensor | None = None, *, infer: bool | None = None
    ) -> Tensor:
        """``(b, d)`` encoder features (routed by ``task_labels (b,)`` when configured, or by
        the experiences given to :meth:`forced_routes`). ``infer`` routes by the tasks
        :attr:`task_inference` infers instead of ``task_labels``; by default it does so in
        evaluation mode once it has statistics."""
        if self._forced_routes is not None and isinstance(self.encoder, MoRAModel):
            forced: Tensor = self.encoder(x, task_ids=self._forced_routes)
            return forced
        if self.route_by_task and isinstance(self.encoder, MoRAModel):
            if infer is None:
                ti = self.task_inference
                infer = ti is not None and ti.ready and not self.training and not self._given_tasks
            if infer:
                task_labels = self.infer_tasks(x)
            if task_labels is None:
                raise ValueError("this model routes by task: pass task_labels, one per row")
            # a task not trained yet (evaluated for forward transfer) borrows the experts of
            # the newest trained task; its head is untrained
            tid = task_labels.clamp_max(self._routed_tasks - 1)
            out: Tensor = self.encoder(x, task_ids=tid)
            return out
        feats: Tensor = self.encoder(x)
        return feats

    def infer_tasks(self, x: Tensor) -> Tensor:
        """``(b,)`` each row's task by :attr:`task_inference` (kept for :meth:`take_inferred`).

        Raises:
            ValueError: the model has no task inference.
        """
        if self.task_inference is None or not isinstance(self.encoder, MoRAModel):
            raise ValueError("this model has no task_inference")
        inferred = self.task_inference(input_features(self.encoder, x)).to(x.device)
        self._last_inferred = inferred
        return inferred

    def forward(self, x: Tensor, task_labels: Tensor | int | None = None) -> Any:
        """Logits ``(b, c)`` over the stream's classes.

        With ``task_labels=None`` the model returns ``{task: logits (b, c)}`` for every task
        (Avalanche's ``MultiTaskModule`` convention, used by LwF; task 0 for a shared head).
        """
        if isinstance(task_labels, int):
            task_labels = torch.full((x.shape[0],), task_labels, dtype=torch.long, device=x.device)
        if task_labels is None:
            return {t: self.forward_single_task(x, t) for t in range(len(self.heads))}
        f = self.features(x, task_labels)  # (b, d)
        lowest = torch.finfo(f.dtype).min
        if not self.multi_head:
            logits = self.heads[0](f)  # (b, c)
            return logits.masked_fill(~self.seen[None], lowest)
        assert task_labels is not None
        logits = f.new_full((f.shape[0], self.num_classes), lowest)  # (b, c)
        for t, head in enumerate(self.heads):
            logits[:, self.task_classes[t]] = head(f)
        own = self.class_task[None, :] == task_labels[:, None]  # (b, c)
        return logits.masked_fill(~own, lowest)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        """Logits ``(b, c)`` of every row as task ``task_label``."""
        labels = torch.full((x.shape[0],), task_label, dtype=torch.long, device=x.device)
        out: Tensor = self.forward(x, labels)
        return out
