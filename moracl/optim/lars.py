"""LARS: layer-wise adaptive rate scaling, as an optimiser and as a wrapper.

For every parameter tensor ``w`` with gradient ``g`` the trust ratio is

    ratio = η ‖w‖ / (‖g‖ + β ‖w‖ + ε)        (η ``trust_coeff``, β the weight decay)

and ``ratio = 1`` where ``‖w‖ = 0`` or ``‖g‖ = 0``, so a zero-initialised tensor (LoRA's ``B``)
still takes a plain step.  With ``trust_clip`` the ratio is ``min(ratio / lr, 1)`` (LARC's clip
mode).  Tensors with at most one dimension (biases, norm weights, DoRA magnitudes) and groups with
``lars=False`` are excluded and get the plain update.

All norms of a group are taken by one ``_foreach_norm`` over parameters and gradients together;
the ratios of all groups are read back to the host once per step and applied with one
``_foreach_mul_`` per group: no per-parameter Python loop of kernels.

Per-group options (also the constructor arguments): ``lars`` (bool), ``trust_coeff``,
``trust_eps``, ``trust_clip``, ``exclude_1d``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from moracl.optim._foreach import buckets, check_nonneg, norms, to_host
from moracl.optim.wrapper import OptimizerWrapper

__all__ = ["Lars", "LarsWrapper", "lars_defaults", "trust_ratio"]


def trust_ratio(
    weight_norm: Tensor,
    grad_norm: Tensor,
    *,
    trust_coeff: float,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    clip_lr: float | None = None,
) -> Tensor:
    """LARS trust ratios ``η‖w‖ / (‖g‖ + β‖w‖ + ε)`` for 1-d tensors of norms.

    Entries with ``‖w‖ = 0`` or ``‖g‖ = 0`` get ratio 1.  With ``clip_lr`` the ratio becomes
    ``min(ratio / clip_lr, 1)`` where it applies.
    """
    ratio = trust_coeff * weight_norm / (grad_norm + weight_decay * weight_norm + eps)
    if clip_lr is not None:
        ratio = torch.clamp(ratio / clip_lr, max=1.0)
    valid = (weight_norm > 0) & (grad_norm > 0)
    return torch.where(valid, ratio, torch.ones_like(ratio))


def lars_defaults(
    trust_coeff: float, trust_eps: float, trust_clip: bool, exclude_1d: bool
) -> dict[str, Any]:
    """Validated per-group LARS options."""
    check_nonneg("trust_coeff", trust_coeff)
    check_nonneg("trust_eps", trust_eps)
    return {
        "lars": True,
        "trust_coeff": float(trust_coeff),
        "trust_eps": float(trust_eps),
        "trust_clip": bool(trust_clip),
        "exclude_1d": bool(exclude_1d),
    }


def _adapted(group: dict[str, Any], params: list[Tensor]) -> list[int]:
    """Indices of ``params`` the trust ratio applies to in ``group``."""
    if not group.get("lars", True):
        return []
    if group.get("exclude_1d", True):
        return [i for i, p in enumerate(params) if p.ndim > 1]
    return list(range(len(params)))


def _ratios(group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> Tensor:
    n = len(params)
    both = norms(params + grads)  # one foreach call: (2n,)
    clip = group["lr"] if group["trust_clip"] else None
    if clip is not None and clip <= 0:
        clip = None
    return trust_ratio(
        both[:n],
        both[n:],
        trust_coeff=group["trust_coeff"],
        weight_decay=group.get("weight_decay", 0.0),
        eps=group["trust_eps"],
        clip_lr=clip,
    )


@dataclass
class _Bucket:
    """The parameters with gradients of one group, device and dtype."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    adapted: list[int]  # indices the trust ratio applies to
    ratios: list[float]  # their trust ratios, read back to the host


def _plan(param_groups: list[dict[str, Any]], what: str) -> list[_Bucket]:
    """Bucket every group and compute all trust ratios, with one read-back for the step."""
    plan: list[_Bucket] = []
    on_device: list[Tensor] = []
    for group in param_groups:
        with_grad = [p for p in group["params"] if p.grad is not None]
        for idx in buckets(with_grad):
            params = [with_grad[i] for i in idx]
            grads: list[Tensor] = []
            for p in params:
                if p.grad is None or p.grad.is_sparse:
                    raise RuntimeError(f"{what} does not support sparse gradients")
                grads.append(p.grad)
            adapted = _adapted(group, params)
            plan.append(_Bucket(group, params, grads, adapted, []))
            if adapted:
                chosen = [params[i] for i in adapted], [grads[i] for i in adapted]
                on_device.append(_ratios(group, *chosen))
    host = iter(to_host(on_device))
    for bucket in plan:
        if bucket.adapted:
            bucket.ratios = next(host)
    return plan


class Lars(Optimizer):
    """SGD with momentum and LARS trust ratios (You et al., 2017), as in timm's ``Lars``.

    Update of an adapted tensor: ``d = ratio · (g + β w)``; momentum ``buf = μ buf + (1 − τ) d``
    (``buf = d`` at the first step); ``w ← w − lr · buf`` (Nesterov: ``d + μ buf``).  Excluded
    tensors take the same update with ``ratio = 1``.  Gradients are never modified.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (>= 0).
        momentum: momentum factor μ (>= 0).
        dampening: dampening τ for momentum.
        weight_decay: L2 penalty β (>= 0), also the β of the trust ratio.
        nesterov: Nesterov momentum (needs momentum > 0 and zero dampening).
        trust_coeff: η (>= 0).
        trust_eps: ε in the ratio's denominator.
        trust_clip: LARC clipping ``min(ratio / lr, 1)``.
        exclude_1d: leave tensors with ``ndim <= 1`` (biases, norms) unadapted.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        trust_eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_1d: bool = True,
    ) -> None:
        check_nonneg("lr", lr)
        check_nonneg("momentum", momentum)
        check_nonneg("dampening", dampening)
        check_nonneg("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"nesterov needs momentum > 0 and dampening 0, got momentum={momentum!r}, "
                f"dampening={dampening!r}"
            )
        defaults = {
            "lr": float(lr),
            "momentum": float(momentum),
            "dampening": float(dampening),
            "weight_decay": float(weight_decay),
            "nesterov": bool(nesterov),
            **lars_defaults(trust_coeff, trust_eps, trust_clip, exclude_1d),
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in ("lr", "momentum", "dampening", "weight_decay", "trust_coeff", "trust_eps"):
            if key in param_group:
                check_nonneg(key, param_group[key])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One LARS step; ``closure`` (optional) re-evaluates the loss and calls ``backward``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket in _plan(self.param_groups, "Lars"):
            self._step_bucket(bucket)
        return loss

    def _step_bucket(self, bucket: _Bucket) -> None:
        group, params, grads, adapted = bucket.group, bucket.params, bucket.grads, bucket.adapted
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        # d = ratio · (g + β w) as new tensors: p.grad is left untouched.
        d_p = list(torch._foreach_add(grads, params, alpha=wd)) if wd != 0 else list(grads)
        if adapted:
            chosen = [d_p[i] for i in adapted]
            if wd != 0:
                torch._foreach_mul_(chosen, bucket.ratios)
            else:
                for i, t in zip(adapted, torch._foreach_mul(chosen, bucket.ratios)):
                    d_p[i] = t
        if mom != 0:
            bufs: list[Tensor] = []
            old_bufs: list[Tensor] = []
            old_d: list[Tensor] = []
            for p, d in zip(params, d_p):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:  # first step: buf = d
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    old_bufs.append(buf)
                    old_d.append(d)
                bufs.append(buf)
            if old_bufs:
                torch._foreach_mul_(old_bufs, mom)
                torch._foreach_add_(old_bufs, old_d, alpha=1.0 - group["dampening"])
            d_p = list(torch._foreach_add(d_p, bufs, alpha=mom)) if group["nesterov"] else bufs
        torch._foreach_add_(params, d_p, alpha=-lr)


class LarsWrapper(OptimizerWrapper):
    """LARS over any optimiser (NVIDIA apex's LARC): rescale gradients, then step the base.

    Before ``base_optimizer.step()`` every adapted gradient is multiplied in place by its trust
    ratio (β is the group's ``weight_decay``), so the base optimiser's update uses the rescaled
    gradient; for SGD this is LARS with decoupled weight decay.  As in apex, ``p.grad`` holds
    the rescaled gradient after the step: in place costs one pass over the gradients, where a
    rescaled copy would cost an allocation as well (measurable for large adapters on the CPU).

    With an adaptive base (AdamW, LAMB) the per-tensor factor rescales the moment estimates
    rather than the step size: Adam then runs on layer-normalised gradients.  For a trust ratio
    on Adam's *update* use LAMB.

    Args:
        base_optimizer: the inner optimiser; its ``param_groups`` are shared.
        trust_coeff, trust_eps, trust_clip, exclude_1d: as for :class:`Lars`.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        trust_coeff: float = 0.001,
        trust_eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_1d: bool = True,
    ) -> None:
        super().__init__(
            base_optimizer, lars_defaults(trust_coeff, trust_eps, trust_clip, exclude_1d)
        )

    def check_group(self, group: dict[str, Any]) -> None:
        check_nonneg("trust_coeff", group["trust_coeff"])
        check_nonneg("trust_eps", group["trust_eps"])

    @torch.no_grad()
    def rescale_grads_(self) -> None:
        """Multiply every adapted gradient by its trust ratio, in place."""
        for bucket in _plan(self.param_groups, "LarsWrapper"):
            if bucket.adapted:
                torch._foreach_mul_([bucket.grads[i] for i in bucket.adapted], bucket.ratios)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Evaluate ``closure`` (if any), rescale the gradients, step the base optimiser."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.rescale_grads_()
        self.base_optimizer.step()
        return loss
