"""LAMB: Adam's update with a layer-wise trust ratio (You et al., 2019), vectorised.

For each tensor: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
``u = m̂ / (√v̂ + ε) + λw`` (bias-corrected moments, λ the weight decay),
``ratio = φ(‖w‖) / ‖u‖`` (1 where either is 0) and ``w ← w − lr · ratio · u``, with the
paper's ``φ(z) = min(max(z, γ_l), γ_u)`` (``trust_bounds``; no bounds by default).  A lower
bound ``γ_l > 0`` keeps tensors near zero (a zero-initialised LoRA ``B``, or weights crossing the
origin) from taking vanishing steps.
Tensors with ``ndim <= 1`` keep ``ratio = 1`` unless ``adapt_1d`` (as BERT's LAMB excludes
LayerNorm and bias from layer adaptation).  Every stage is one ``_foreach`` call per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from moracl.optim._foreach import buckets, check_nonneg, norms, to_host

__all__ = ["Lamb"]


class Lamb(Optimizer):
    """LAMB with decoupled weight decay inside the trust-ratio update.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (>= 0).
        betas: ``(β₁, β₂)``, each in ``[0, 1)``.
        eps: added to ``√v̂`` (> 0).
        weight_decay: λ (>= 0), added to the update before the trust ratio.
        bias_correction: divide the moments by ``1 − βᵗ``.
        adapt_1d: also apply the trust ratio to tensors with ``ndim <= 1``.
        trust_bounds: ``(γ_l, γ_u)`` with ``0 <= γ_l <= γ_u``, bounds on ``‖w‖`` in the ratio.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        adapt_1d: bool = False,
        trust_bounds: tuple[float, float] = (0.0, math.inf),
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bool(bias_correction),
            "adapt_1d": bool(adapt_1d),
            "trust_bounds": tuple(trust_bounds),
        }
        _check(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check(param_group)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One LAMB step; ``closure`` (optional) re-evaluates the loss and calls ``backward``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # 1) moments and updates of every bucket, trust ratios on the device
        pending: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[int]]] = []
        ratios: list[Tensor] = []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for idx in buckets(with_grad):
                params = [with_grad[i] for i in idx]
                update = self._update(group, params)
                adapted = [i for i, p in enumerate(params) if group["adapt_1d"] or p.ndim > 1]
                pending.append((group, params, update, adapted))
                if adapted:
                    ratios.append(_trust(group, params, update, adapted))
        # 2) one read-back of all ratios, 3) w ← w − lr · ratio · u
        host = iter(to_host(ratios))
        for group, params, update, adapted in pending:
            if adapted:
                torch._foreach_mul_([update[i] for i in adapted], next(host))
            torch._foreach_add_(params, update, alpha=-group["lr"])
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """Advance the moments of ``params``; return ``u = m̂ / (√v̂ + ε) + λw``."""
        beta1, beta2 = group["betas"]
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            if p.grad is None or p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)

        denom = torch._foreach_sqrt(exp_avg_sqs)
        if group["bias_correction"]:
            counts = [float(s.item()) for s in steps]  # CPU step counters: no device sync
            torch._foreach_div_(denom, [(1.0 - beta2**t) ** 0.5 for t in counts])
            torch._foreach_add_(denom, group["eps"])
            update = list(torch._foreach_div(exp_avgs, denom))
            torch._foreach_div_(update, [1.0 - beta1**t for t in counts])
        else:
            torch._foreach_add_(denom, group["eps"])
            update = list(torch._foreach_div(exp_avgs, denom))
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        return update


def _trust(
    group: dict[str, Any], params: list[Tensor], update: list[Tensor], adapted: list[int]
) -> Tensor:
    """``φ(‖w‖) / ‖u‖`` for the ``adapted`` tensors (1 where either is 0)."""
    n = len(adapted)
    both = norms([params[i] for i in adapted] + [update[i] for i in adapted])
    lo, hi = group["trust_bounds"]
    phi, u_norm = both[:n].clamp(min=lo, max=hi), both[n:]
    return torch.where(
        (phi > 0) & (u_norm > 0), phi / u_norm.clamp_min(1e-30), torch.ones_like(phi)
    )


def _check(group: dict[str, Any]) -> None:
    for key in ("lr", "weight_decay"):
        if key in group:
            check_nonneg(key, group[key])
    if "eps" in group and not check_nonneg("eps", group["eps"]) > 0:
        raise ValueError(f"eps must be > 0, got {group['eps']!r}")
    if "trust_bounds" in group:
        bounds = group["trust_bounds"]
        if len(bounds) != 2 or not 0.0 <= float(bounds[0]) <= float(bounds[1]):
            raise ValueError(
                f"trust_bounds must be (low, high) with 0 <= low <= high, got {bounds!r}"
            )
    if "betas" in group:
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
