"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning", Findings of EMNLP 2023; code: github.com/cmnfriend/O-LoRA): one LoRA per task on
the same layers, the earlier tasks' LoRAs frozen, the new one kept orthogonal to them.

Shape legend: ``b`` batch rows, ``i`` a layer's input features, ``o`` its output features,
``r`` the rank of one task's LoRA, ``k`` the rank of the earlier tasks' LoRAs together.

While task ``t`` trains, the loss adds to the task loss

- ``λ₁ · Σ_layers Σ_{i<t} ‖A_i A_tᵀ‖²_F``: the paper's orthogonality loss (the squared entries
  of the overlap between the ``(r, i)`` down-projections; :attr:`Orthogonality.FROBENIUS`,
  the default). The authors' code sums the absolute entries instead
  (``torch.abs(torch.mm(lora_A, loranew_A.T)).sum()``): :attr:`Orthogonality.L1`;
- ``λ₂ · Σ_layers (‖A_t‖_F + ‖B_t‖_F)``: the L2 norm of the new LoRA's factors, not
  squared, as the authors' code computes it (``torch.norm(param, p=2)`` summed over the
  ``loranew_`` parameters, ``src/uie_trainer_lora.py``).

Defaults ``λ₁ = 0.5``, ``λ₂ = 0``: the authors' T5 scripts (``scripts/order_1.sh``,
``scripts/order_2.sh``: ``--lamda_1 0.5 --lamda_2 0`` for every task). Evaluation is
task-agnostic: every trained LoRA is summed, ``h = W x + Σ_i s · B_i A_i x``, with no task
ids.

All the stream's LoRAs are built with the classifier (one per experience, adapters
``task0``, ``task1``, ...; :func:`olora_encoder`), and only the first ``t + 1`` run while task
``t`` trains or after it (:func:`use_tasks`). The model's tensors therefore never change
shape: a run's checkpoint holds every LoRA, and a resumed run loads them into the same
structure, the count of tasks begun coming back through :class:`OLoRATasks`' state.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from moracl.adapters.base import AdapterConfig
from moracl.continual.model import ContinualClassifier
from moracl.continual.stateful import PluginState
from moracl.continual.strategy import FastTemplate
from moracl.guard import check_number
from moracl.layer import MoRALayer
from moracl.model import MoRAModel
from moracl.targets import TargetSpec

__all__ = [
    "OLoRAStrategy",
    "OLoRATasks",
    "Orthogonality",
    "l2_loss",
    "olora_classifier",
    "olora_encoder",
    "olora_tasks",
    "orthogonality_loss",
    "task_adapter",
    "task_factors",
    "use_tasks",
]


class Orthogonality(str, Enum):
    """How the orthogonality loss measures the overlap ``O = A_i A_tᵀ (r, r)``."""

    FROBENIUS = "frobenius"  # Σ O[j, k]²: the paper's loss
    L1 = "l1"  # Σ |O[j, k]|: the authors' code


def task_adapter(task: int) -> str:
    """The adapter name of task ``task``'s LoRA (``"task3"``)."""
    return f"task{task}"


def olora_encoder(
    encoder: nn.Module, adapter: AdapterConfig, tasks: int, *, target_modules: TargetSpec
) -> MoRAModel:
    """``encoder`` with ``tasks`` LoRAs of configuration ``adapter`` on every layer
    ``target_modules`` selects (adapters :func:`task_adapter` ``(0 .. tasks - 1)``), task 0's
    alone active and trainable.

    Raises:
        ValueError: ``adapter`` is not a LoRA, or ``tasks`` is not a positive integer.
    """
    if not isinstance(adapter, AdapterConfig) or adapter.kind != "lora":
        kind = getattr(adapter, "kind", type(adapter).__name__)
        raise ValueError(
            f"O-LoRA trains one LoRA per task: adapter.kind must be 'lora', got {kind!r}"
        )
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tasks must be a positive integer, got {tasks!r}")
    model = MoRAModel(encoder, adapter, target_modules=target_modules, adapter_name=task_adapter(0))
    for t in range(1, tasks):
        model.add_adapter(task_adapter(t), adapter, target_modules=target_modules)
    use_tasks(model, 1, train_newest=True)
    return model


def olora_classifier(
    encoder: nn.Module,
    adapter: AdapterConfig,
    experience_classes: Sequence[Sequence[int]],
    *,
    target_modules: TargetSpec,
    multi_head: bool,
) -> ContinualClassifier:
    """The classifier O-LoRA trains over ``encoder`` (which names its ``feature_dim``): one
    LoRA per experience (:func:`olora_encoder`) and the run's usual heads (one per task with
    ``multi_head``, else one shared)."""
    tasks = len(experience_classes)
    wrapped = olora_encoder(encoder, adapter, tasks, target_modules=target_modules)
    feature_dim = int(getattr(encoder, "feature_dim"))  # noqa: B009
    return ContinualClassifier(wrapped, feature_dim, experience_classes, multi_head=multi_head)


def olora_tasks(model: MoRAModel) -> int:
    """How many task LoRAs ``model`` holds (built by :func:`olora_encoder`).

    Raises:
        ValueError: ``model`` lacks the adapters ``task0``, ``task1``, ... in order.
    """
    names = list(model.adapter_configs)
    expected = [task_adapter(t) for t in range(len(names))]
    if not names or names != expected:
        raise ValueError(
            f"an O-LoRA encoder holds the adapters 'task0', 'task1', ... (one LoRA per task, "
            f"built by olora_encoder), got {names}"
        )
    return len(names)


def use_tasks(model: MoRAModel, tasks: int, *, train_newest: bool) -> None:
    """Run the LoRAs of tasks ``0 .. tasks - 1`` (summed); with ``train_newest`` the newest
    trains and every other is frozen, else all are frozen. Frozen LoRAs drop their
    gradients, so no optimiser can move them.

    Raises:
        ValueError: ``tasks`` is not in ``1 .. olora_tasks(model)``.
    """
    total = olora_tasks(model)
    if isinstance(tasks, bool) or not isinstance(tasks, int) or not 1 <= tasks <= total:
        raise ValueError(
            f"tasks must be an integer in [1, {total}] (the LoRAs built), got {tasks!r}"
        )
    model.set_adapter([task_adapter(t) for t in range(tasks)])
    newest = task_adapter(tasks - 1) if train_newest else None
    for _, layer in model.adapted_layers():
        for name, adapter in layer.adapters.items():
            if name == newest:
                continue
            for p in adapter.parameters():
                p.requires_grad_(False)
                p.grad = None


def task_factors(layer: MoRALayer, task: int) -> tuple[Tensor, Tensor]:
    """``(A (r, i), B (o, r))`` of task ``task``'s LoRA on ``layer``."""
    adapter = layer.adapter(task_adapter(task))
    a, b = getattr(adapter, "lora_A"), getattr(adapter, "lora_B")  # noqa: B009
    return a, b


def orthogonality_loss(
    model: MoRAModel, task: int, *, form: Orthogonality | str = Orthogonality.FROBENIUS
) -> Tensor:
    """``Σ_layers Σ_{i<task} ‖A_i A_taskᵀ‖²_F`` (``form="l1"``: the absolute entries summed), a
    scalar; zero for task 0. The earlier tasks' ``A`` are taken as constants (they are frozen).
    """
    form = Orthogonality(form)
    terms = []
    layers = [layer for _, layer in model.adapted_layers()] if task > 0 else []
    for layer in layers:
        new, _ = task_factors(layer, task)  # (r, i)
        old = torch.cat([task_factors(layer, i)[0].detach() for i in range(task)])  # (k, i)
        overlap = old @ new.T  # (k, r)
        square = form is Orthogonality.FROBENIUS
        terms.append(overlap.square().sum() if square else overlap.abs().sum())
    if not terms:
        return next(model.parameters()).new_zeros(())
    return torch.stack(terms).sum()


def l2_loss(model: MoRAModel, task: int) -> Tensor:
    """``Σ_layers (‖A_task‖_F + ‖B_task‖_F)``, a scalar: the L2 norm of each of the task's LoRA
    factors, summed (the authors' code)."""
    norms = [
        torch.linalg.vector_norm(f)
        for _, layer in model.adapted_layers()
        for f in task_factors(layer, task)
    ]
    return torch.stack(norms).sum()


class OLoRATasks(SupervisedPlugin):  # type: ignore[misc]
    """The count of O-LoRA tasks begun (value ``tasks``), checkpointed so that a restored
    strategy runs the same LoRAs as the saved one (:func:`use_tasks`, all frozen until the
    next experience starts). Reads ``strategy.model``; written by :class:`OLoRAStrategy`."""

    state_key = "olora"

    def __init__(self) -> None:
        super().__init__()
        self.tasks = 1

    def state_dict(self) -> PluginState:
        return PluginState(values={"tasks": self.tasks})

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        """Take back the count and run those LoRAs.

        Raises:
            ValueError: the count is not the number of experiences ``trained``.
        """
        tasks = state.values.get("tasks")
        if isinstance(tasks, bool) or tasks != len(trained):
            raise ValueError(
                f"olora.tasks={tasks!r}; expected {len(trained)}, the experiences trained so far"
            )
        use_tasks(_encoder(strategy.model), tasks, train_newest=False)
        self.tasks = tasks


def _encoder(model: Any) -> MoRAModel:
    encoder = getattr(model, "encoder", None)
    if not isinstance(model, ContinualClassifier) or not isinstance(encoder, MoRAModel):
        raise TypeError(
            f"O-LoRA trains a ContinualClassifier over a MoRAModel with one LoRA per task "
            f"(olora_classifier), got {type(model).__name__}"
        )
    olora_tasks(encoder)
    return encoder


class OLoRAStrategy(FastTemplate):
    """O-LoRA on a classifier built by :func:`olora_classifier`: before experience ``t`` its
    LoRA joins the earlier ones (which freeze), and the optimiser is rebuilt (or, for an
    optimiser instance, updated) over what trains now: the new LoRA and the heads.

    Args:
        model: the classifier (:func:`olora_classifier`).
        lambda1: weight of :func:`orthogonality_loss` (the paper's ``λ₁``; 0.5).
        lambda2: weight of :func:`l2_loss` on the new LoRA (the code's ``λ₂``; 0).
        orthogonality: the paper's squared overlap (``frobenius``) or the code's ``l1``.
        kwargs: :class:`FastTemplate`'s arguments (``optimizer`` or ``optimizer_factory``,
            ``train_mb_size``, ``plugins``, ...).

    Raises:
        ValueError: a negative or non-finite ``lambda1`` or ``lambda2``.
        TypeError: ``model`` is not an O-LoRA classifier.
    """

    def __init__(
        self,
        *,
        model: ContinualClassifier,
        lambda1: float = 0.5,
        lambda2: float = 0.0,
        orthogonality: Orthogonality | str = Orthogonality.FROBENIUS,
        **kwargs: Any,
    ) -> None:
        _encoder(model)
        self.lambda1 = check_number("lambda1", lambda1, ge=0)
        self.lambda2 = check_number("lambda2", lambda2, ge=0)
        try:
            self.orthogonality = Orthogonality(orthogonality)
        except ValueError:
            raise ValueError(
                f"orthogonality must be one of {[o.value for o in Orthogonality]}, "
                f"got {orthogonality!r}"
            ) from None
        self.task_state = OLoRATasks()
        plugins = [*(kwargs.pop("plugins", None) or []), self.task_state]
        super().__init__(model=model, plugins=plugins, **kwargs)

    @property
    def task(self) -> int:
        """The newest task begun (whose LoRA trains)."""
        return self.task_state.tasks - 1

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        if self.is_training:
            t = int(self.experience.current_experience)
            use_tasks(_encoder(self.model), t + 1, train_newest=True)
            self.task_state.tasks = t + 1
        return super().model_adaptation(model)

    def penalty(self) -> Tensor:
        """``λ₁ · orthogonality + λ₂ · l2`` of the task training now (a scalar)."""
        encoder = _encoder(self.model)
        loss = next(encoder.parameters()).new_zeros(())
        if self.lambda1:
            ortho = orthogonality_loss(encoder, self.task, form=self.orthogonality)
            loss = loss + self.lambda1 * ortho
        if self.lambda2:
            loss = loss + self.lambda2 * l2_loss(encoder, self.task)
        return loss

    def criterion(self) -> Tensor:
        loss: Tensor = self._criterion(self.mb_output, self.mb_y)
        if self.is_training:
            loss = loss + self.penalty()
        return loss
