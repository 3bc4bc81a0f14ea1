"""InfLoRA (Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual
Learning", CVPR 2024) as a continual strategy: ``strategies: [inflora]``.

Every adapted layer gets one LoRA branch per experience, ``ΔW = s · Σ_t B_t A_t``. The
down-projection ``A_t (r × d)`` is *designed*, not trained: before experience ``t`` trains,
the layer's inputs on the experience's rows are projected off the stored subspace ``M`` of
the earlier experiences' inputs, and the top-``r`` principal directions of what is left become
``A_t``'s rows (:func:`~moracl.continual.inflora_subspace.design_rows`); ``A_t`` then stays
fixed and only ``B_t`` (zero at first) trains. After the experience, ``M`` grows by the
directions of its inputs it does not yet capture, up to an energy threshold
(:func:`~moracl.continual.inflora_subspace.grow_basis`). Earlier branches are frozen, and
prediction sums every branch: no task id is needed. As in the reference code, where each
task trains only its own classifier, training's cross-entropy spans the current experience's
classes (:class:`InfLoRAStrategy`); prediction spans every class seen. (The paper names
the designed matrix ``B_t`` and the trained one ``A_t``; here they follow LoRA's ``A`` down,
``B`` up. It merges each finished branch into the weight; summing the branches computes the
same function.)

Defaults, from the paper's reference code (github.com/liangyanshuo/InfLoRA,
``configs/cifar100_inflora.json`` and ``configs/domainnet_inflora.json``): rank ``r = 10``
(CIFAR-100 and ImageNet-R; 30 on DomainNet), an energy threshold rising from ``0.95`` to
``1.0`` over the stream (``lamb``, ``lame``; ImageNet-R starts at 0.98), and the designed rows
scaled by ``1/√3`` (here LoRA's scaling ``s``, so the stored ``A_t`` rows are orthonormal).

Where this follows the paper's equations rather than its code: the rows of ``A_t`` are the
eigenvectors of the projected inputs' second moment ``Ĥ Ĥᵀ`` (the code takes the left
singular vectors of the one-sided product ``(I - M Mᵀ) C``); the energy criterion is GPM's
on the inputs' squared singular values, the same rule after every experience (the code
applies it to the covariance's eigenvalues, and keeps one direction fewer after the first
experience); ``M`` is always stored as a basis of the subspace itself (DualGPM stores the
complement once it is the smaller: the same projection, in less memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from moracl.adapters.base import AdapterConfig
from moracl.continual.batches import materialize
from moracl.continual.inflora_subspace import (
    design_rows,
    energy_threshold,
    grow_basis,
    second_moment,
)
from moracl.continual.model import ContinualClassifier
from moracl.continual.stateful import PluginState
from moracl.continual.strategy import FastTemplate
from moracl.experts.per_sample import current_token_mask
from moracl.guard import check_int, check_number
from moracl.model import MoRAModel

__all__ = [
    "DESIGNED_SCALE",
    "InfLoRAPlugin",
    "InfLoRAStrategy",
    "branch_count",
    "branch_name",
    "inflora_classifier",
    "layer_second_moments",
    "set_branches",
]

#: the scale of the designed rows (the reference code divides them by √3)
DESIGNED_SCALE = 1 / math.sqrt(3)


def branch_name(task: int) -> str:
    """The adapter name of experience ``task``'s branch (``"task0"``)."""
    return f"task{task}"


def inflora_classifier(
    encoder: nn.Module,
    experience_classes: Sequence[Sequence[int]],
    *,
    targets: Sequence[str],
    rank: int,
    multi_head: bool,
) -> ContinualClassifier:
    """InfLoRA's classifier over ``encoder``: a :class:`~moracl.MoRAModel` with one LoRA
    branch per experience on every layer of ``targets`` (``A`` frozen, both factors zero
    until :class:`InfLoRAPlugin` designs them; no branch active yet), and heads.

    Args:
        encoder: maps ``x`` to ``(b, feature_dim)`` features (its ``feature_dim``).
        experience_classes: the global class ids of each experience (one branch each).
        targets: the layers to adapt.
        rank: ``r`` of every branch.
        multi_head: one head per task (task-incremental).

    Raises:
        ValueError: a rank that does not fit a layer, or no experience.
    """
    check_int("baselines.inflora_rank", rank, gt=0)
    tasks = len(experience_classes)
    if tasks < 1:
        raise ValueError(f"InfLoRA needs at least one experience, got {list(experience_classes)}")
    branch = AdapterConfig(  # type: ignore[call-arg]
        kind="lora", rank=rank, alpha=rank * DESIGNED_SCALE, freeze_a=True
    )
    wrapped = MoRAModel(encoder, branch, target_modules=list(targets), adapter_name=branch_name(0))
    for t in range(1, tasks):
        wrapped.add_adapter(branch_name(t), branch, target_modules=list(targets))
    with torch.no_grad():
        for _, layer in wrapped.adapted_layers():
            for name in layer.adapters:
                for p in layer.adapter(name).parameters():
                    p.zero_()
    set_branches(wrapped, 0, training=None)
    return ContinualClassifier(
        wrapped,
        int(getattr(encoder, "feature_dim")),  # noqa: B009
        experience_classes,
        multi_head=multi_head,
    )


def _encoder(model: nn.Module) -> MoRAModel:
    """The InfLoRA encoder of ``model`` (a classifier from :func:`inflora_classifier`)."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, MoRAModel) or branch_name(0) not in encoder.adapter_configs:
        raise TypeError(
            f"InfLoRA trains a ContinualClassifier built by inflora_classifier(...), got "
            f"{type(model).__name__} with a {type(encoder).__name__} encoder"
        )
    return encoder


def branch_count(encoder: MoRAModel) -> int:
    """How many experiences ``encoder`` has branches for."""
    count = 0
    while branch_name(count) in encoder.adapter_configs:
        count += 1
    return count


def set_branches(encoder: MoRAModel, designed: int, *, training: int | None) -> None:
    """Run the branches of experiences ``0 .. designed - 1`` (summed); only ``B`` of
    experience ``training`` trains (``None``: none), every ``A`` stays frozen.

    Raises:
        ValueError: ``designed`` or ``training`` out of range.
    """
    tasks = branch_count(encoder)
    check_int("designed", designed, ge=0, le=tasks)
    if training is not None and not 0 <= training < designed:
        raise ValueError(f"training must be a designed branch in [0, {designed}), got {training}")
    encoder.set_adapter([branch_name(t) for t in range(designed)])
    for _, layer in encoder.adapted_layers():
        for t in range(tasks):
            adapter = layer.adapter(branch_name(t))
            for pname, p in adapter.named_parameters():
                p.requires_grad_(pname == "lora_B" and t == training)


@torch.no_grad()
def layer_second_moments(encoder: MoRAModel, x: Tensor, *, batch_size: int) -> dict[str, Tensor]:
    """``{layer path: (d, d)}`` float64 ``Σ x xᵀ`` of every adapted layer's inputs as
    ``encoder`` (in evaluation mode) runs on ``x (n, ...)``, batch by batch in order; every
    token of a row is a row (padding left out where the model declares
    :func:`~moracl.experts.token_mask`)."""
    check_int("batch_size", batch_size, gt=0)
    sums: dict[str, Tensor] = {}
    hooks = []

    def capture(path: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            h: Tensor = inputs[0]  # (b, ..., d)
            rows = h.reshape(-1, h.shape[-1])  # (b·t, d)
            mask = current_token_mask()
            if mask is not None and tuple(mask.shape) == tuple(h.shape[:-1]):
                rows = rows[mask.reshape(-1) != 0]
            moment = second_moment(rows)  # (d, d)
            sums[path] = sums[path] + moment if path in sums else moment

        return hook

    for path, layer in encoder.adapted_layers():
        hooks.append(layer.register_forward_pre_hook(capture(path)))
    was_training = encoder.training
    device = next(encoder.parameters()).device
    encoder.eval()
    try:
        for start in range(0, len(x), batch_size):
            encoder(x[start : start + batch_size].to(device))
    finally:
        encoder.train(was_training)
        for h in hooks:
            h.remove()
    return sums


class InfLoRAPlugin(SupervisedPlugin):  # type: ignore[misc]
    """Designs each experience's branch before it trains and grows the stored subspace after
    it (see the module docstring); its state (the basis of every layer, tensors
    ``basis.<layer path>``, and the experiences designed) is checkpointed.

    Reads ``strategy.model`` (a classifier from :func:`inflora_classifier`) and
    ``strategy.adapted_dataset`` (the experience's training rows); sets which parameters of
    the model train before the strategy builds its optimiser.

    Args:
        threshold: the energy threshold after the first experience, in ``(0, 1]``.
        threshold_end: the value it rises toward over the stream, in ``[threshold, 1]``.
        batch_size: rows per forward when reading the layers' inputs.
    """

    state_key = "inflora"

    def __init__(
        self, *, threshold: float = 0.95, threshold_end: float = 1.0, batch_size: int = 256
    ) -> None:
        super().__init__()
        self.threshold = check_number("baselines.inflora_threshold", threshold, gt=0, le=1)
        self.threshold_end = check_number(
            "baselines.inflora_threshold_end", threshold_end, ge=self.threshold, le=1
        )
        self.batch_size = check_int("batch_size", batch_size, gt=0)
        #: per layer path, the ``(d, k)`` float64 orthonormal basis of the earlier inputs
        self.bases: dict[str, Tensor] = {}
        #: experiences whose branches are designed
        self.designed = 0

    def _basis(self, path: str, d: int) -> Tensor:
        return self.bases.get(path, torch.zeros(d, 0, dtype=torch.float64))

    def _moments(self, strategy: Any) -> dict[str, Tensor]:
        x, _, _ = materialize(strategy.adapted_dataset)
        return layer_second_moments(_encoder(strategy.model), x, batch_size=self.batch_size)

    def after_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        """Design the new experience's ``A`` on every layer and train its ``B`` alone."""
        encoder = _encoder(strategy.model)
        t = self.designed
        if t >= branch_count(encoder):
            raise ValueError(
                f"InfLoRA's model has branches for {branch_count(encoder)} experiences; a "
                f"further experience ({t}) has none: build it with every experience's classes"
            )
        moments = self._moments(strategy)
        layers = dict(encoder.adapted_layers())
        with torch.no_grad():
            for path, cov in moments.items():
                a = layers[path].adapter(branch_name(t)).get_parameter("lora_A")  # (r, d)
                rows = design_rows(cov.cpu(), self._basis(path, cov.shape[0]), a.shape[0])
                a.copy_(rows.to(a.device, a.dtype))
        self.designed = t + 1
        set_branches(encoder, self.designed, training=t)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """Grow every layer's basis with the trained experience's inputs; freeze its branch."""
        t = self.designed - 1
        encoder = _encoder(strategy.model)
        eps = energy_threshold(t, branch_count(encoder), self.threshold, self.threshold_end)
        for path, cov in self._moments(strategy).items():
            self.bases[path] = grow_basis(cov.cpu(), self._basis(path, cov.shape[0]), eps)
        set_branches(encoder, self.designed, training=None)

    def state_dict(self) -> PluginState:
        tensors = {f"basis.{p}": b.detach().clone().contiguous() for p, b in self.bases.items()}
        return PluginState(tensors=tensors, values={"designed": self.designed})

    def load_state_dict(self, state: PluginState, *, strategy: Any, trained: Sequence[Any]) -> None:
        designed = state.values.get("designed")
        if isinstance(designed, bool) or not isinstance(designed, int) or designed < 0:
            raise ValueError(f"inflora.designed={designed!r}; expected an integer >= 0")
        encoder = _encoder(strategy.model)
        paths = {p for p, _ in encoder.adapted_layers()}
        bases: dict[str, Tensor] = {}
        for key, value in state.tensors.items():
            path = key.removeprefix("basis.")
            if not key.startswith("basis.") or path not in paths or value.ndim != 2:
                raise ValueError(
                    f"InfLoRA state tensor {key!r}: expected basis.<adapted layer path> holding "
                    f"a (d, k) basis; the layers are {sorted(paths)}"
                )
            bases[path] = value.to("cpu", torch.float64).clone()
        self.bases = bases
        self.designed = designed
        set_branches(encoder, designed, training=None)


class InfLoRAStrategy(FastTemplate):
    """The lean template with InfLoRA's training loss: while training, the cross-entropy's
    softmax spans only the classes of the current experience (the reference code trains
    each task's own classifier on its own classes), so a shared head's rows of earlier
    classes get no gradient; evaluation scores every class seen. Task-incremental heads
    already span their task's classes; domain-incremental experiences share theirs.

    Takes :class:`FastTemplate`'s arguments; pass an :class:`InfLoRAPlugin` in ``plugins``
    (the moracl run's ``inflora`` strategy does).
    """

    def criterion(self) -> Tensor:
        logits: Tensor = self.mb_output  # (b, c)
        if not self.is_training:
            out: Tensor = self._criterion(logits, self.mb_y)
            return out
        own = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # (c,)
        own[list(self.experience.classes_in_this_experience)] = True
        lowest = torch.finfo(logits.dtype).min
        loss: Tensor = self._criterion(logits.masked_fill(~own, lowest), self.mb_y)
        return loss
