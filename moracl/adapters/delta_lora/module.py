"""Delta-LoRA: LoRA plus the accumulated change of the frozen weight.

Shapes: ``x (..., i)``, ``A (r × i)``, ``B (o × r)``, ``D (o × i)``.

The layer's frozen weight ``W`` is shared with the model the user passed (``MoRAModel``
works on a structural copy that shares tensors), so it is never written to.  The adapter
keeps ``D``, the sum of every step's ``λ · Δ(s · B A)``, in its own buffer: the layer computes
with ``W + D``, ``delta_weight() = D + s · B A`` merges it, and ``D`` is saved and loaded
with the adapter.  Extra memory: one ``(o × i)`` buffer per adapted layer in the adapter's
dtype (float32 on a half-precision base, where small updates would otherwise round away),
plus, during each optimiser step, a copy of ``A`` and ``B``.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from moracl.adapters.base import Adapter, ParamRole, linear
from moracl.adapters.delta_lora.config import DeltaLoRAConfig
from moracl.adapters.fused import lora_linear

__all__ = ["DeltaLoRA", "DeltaLoRAUpdater", "delta_lora_buffers"]


class DeltaLoRA(Adapter):
    """LoRA (``B`` starts at zero) whose ``base_delta`` ``D`` carries the frozen weight's
    updates; ``steps`` counts the optimiser steps applied (:meth:`apply_step`)."""

    config: DeltaLoRAConfig
    base_delta: Tensor
    steps: Tensor

    def __init__(self, in_features: int, out_features: int, config: DeltaLoRAConfig) -> None:
        super().__init__(in_features, out_features, config)
        r = config.rank
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # (r, i)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # (o, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's initialisation
        self.register_buffer("base_delta", torch.zeros(out_features, in_features))  # (o, i)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.scaling = config.scaling

    def updated_weight(self, weight: Tensor) -> Tensor:
        """The frozen weight as Delta-LoRA has moved it: ``W + D`` ``(o × i)``, ``W``'s dtype."""
        return weight + self.base_delta.to(weight.dtype)

    def fused_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return lora_linear(
            x, self.updated_weight(weight), bias, self.lora_A, self.lora_B, self.scaling
        )

    def delta(self, x: Tensor, *, weight: Tensor | None = None) -> Tensor:
        x = self._input(x, self.lora_A.dtype)
        z = linear(x, self.lora_A) * self.scaling  # (..., r)
        return linear(x, self.base_delta) + linear(z, self.lora_B)  # (..., o)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        return self.base_delta + (self.lora_B @ self.lora_A) * self.scaling  # (o, i)

    @torch.no_grad()
    def apply_step(self, a_before: Tensor, b_before: Tensor) -> None:
        """Count one optimiser step that moved ``A`` from ``a_before (r × i)`` and ``B`` from
        ``b_before (o × r)``; from step ``start_step + 1`` on add ``λ · s · (B A − B₀ A₀)`` to
        ``D``.  No value is read back from the device."""
        self.steps.add_(1)
        gate = (self.steps > self.config.start_step).to(self.base_delta.dtype)  # () 0 or 1
        ups = torch.cat([self.lora_B, -b_before.to(self.lora_B.dtype)], dim=1)  # (o, 2r)
        downs = torch.cat([self.lora_A, a_before.to(self.lora_A.dtype)], dim=0)  # (2r, i)
        change = (ups @ downs).to(self.base_delta.dtype)  # B A − B₀ A₀: (o, i)
        self.base_delta.add_(change * (gate * (self.config.update_ratio * self.scaling)))

    def param_roles(self) -> dict[str, ParamRole]:
        return {"lora_A": ParamRole.A, "lora_B": ParamRole.B}

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, update_ratio={c.update_ratio}, start_step={c.start_step}"


def delta_lora_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Every Delta-LoRA adapter's ``base_delta`` and ``steps`` under ``model``, by their
    ``model.state_dict()`` names (not copied): what a snapshot of the trained state (early
    stopping's best epoch) needs besides the trainable parameters."""
    out: dict[str, Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, DeltaLoRA):
            for name in ("base_delta", "steps"):
                out[f"{path}.{name}" if path else name] = getattr(m, name).detach()
    return out


class DeltaLoRAUpdater:
    """Applies Delta-LoRA's update of the frozen weights after every step of ``optimizer``.

    It registers a step pre-hook (copying each adapter's ``A`` and ``B``) and a step post-hook
    (:meth:`DeltaLoRA.apply_step`) on ``optimizer``; the training loop stays as it is, steps
    an AMP ``GradScaler`` skips are not counted, and :meth:`remove` (or leaving a ``with``
    block) takes the hooks off.  Register it on the optimiser whose ``step()`` moves ``A`` and
    ``B`` once per training step.

        optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
        with DeltaLoRAUpdater(model, optimizer):
            for batch in batches:
                loss(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad()

    Raises ``ValueError`` when ``model`` has no Delta-LoRA adapter, or none whose ``A`` or
    ``B`` is in ``optimizer``'s ``param_groups``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"DeltaLoRAUpdater needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        found = [m for m in model.modules() if isinstance(m, DeltaLoRA)]
        if not found:
            raise ValueError(f"{type(model).__name__} has no Delta-LoRA adapter to update")
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.adapters = [a for a in found if {id(a.lora_A), id(a.lora_B)} & stepped]
        if not self.adapters:
            raise ValueError(
                f"none of the {len(found)} Delta-LoRA adapters has A or B in the optimizer's "
                "param_groups; build the optimizer over the trainable parameters"
            )
        self._before: list[tuple[Tensor, Tensor]] | None = None
        self._handles: list[RemovableHandle] = [
            optimizer.register_step_pre_hook(self._copy),
            optimizer.register_step_post_hook(self._update),
        ]

    @classmethod
    def attach(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> DeltaLoRAUpdater | None:
        """An updater when ``model`` has Delta-LoRA adapters, else ``None`` (nothing to do)."""
        if not any(isinstance(m, DeltaLoRA) for m in model.modules()):
            return None
        return cls(model, optimizer)

    def _copy(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before = [
            (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for a in self.adapters
        ]

    def _update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        before, self._before = self._before, None
        if before is None:
            raise RuntimeError("Delta-LoRA: an optimiser step ended that its pre-hook never saw")
        for adapter, (a0, b0) in zip(self.adapters, before):
            adapter.apply_step(a0, b0)

    def remove(self) -> None:
        """Take the hooks off the optimiser (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before = None

    def __enter__(self) -> DeltaLoRAUpdater:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
