"""Parameter groups from a model: LoRA+ learning rates, routers, experts, weight-decay exclusions.

Group names (the ``"name"`` key of each group) and what goes in them:

========== ================================================================================
``lora_a``  role ``A`` (LoRA's down projection)                       lr × scale
``lora_b``  role ``B`` (LoRA's up projection)                         lr × scale × LoRA+ ratio
``expert``  other adapter roles: ``SQUARE`` (MoRA), ``MAGNITUDE`` (DoRA), ``SCALE`` (VeRA)
``router``  role ``ROUTER``
``head``    role ``HEAD``
``other``   trainable parameters no module tags (e.g. a classification head)
========== ================================================================================

A parameter excluded from weight decay goes to ``<name>_no_decay`` (weight decay 0, ``lars``
off).  By default those are tensors with ``ndim <= 1`` (biases, norm weights), names ending in
``bias``, and the roles ``MAGNITUDE`` and ``SCALE``.  Empty groups are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.optim._foreach import check_nonneg

__all__ = ["GROUP_KINDS", "NoDecayFn", "build_param_groups", "default_no_decay"]

GROUP_KINDS: tuple[str, ...] = ("lora_a", "lora_b", "expert", "router", "head", "other")

_KIND_OF_ROLE: dict[ParamRole, str] = {
    ParamRole.A: "lora_a",
    ParamRole.B: "lora_b",
    ParamRole.SQUARE: "expert",
    ParamRole.MAGNITUDE: "expert",
    ParamRole.SCALE: "expert",
    ParamRole.ROUTER: "router",
    ParamRole.HEAD: "head",
}

NoDecayFn = Callable[[str, nn.Parameter, "ParamRole | None"], bool]


def default_no_decay(name: str, param: nn.Parameter, role: ParamRole | None) -> bool:
    """Whether ``param`` is excluded from weight decay by default."""
    return (
        param.ndim <= 1 or name.endswith("bias") or role in (ParamRole.MAGNITUDE, ParamRole.SCALE)
    )


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    loraplus_ratio: float = 1.0,
    lr_scales: Mapping[str, float] | None = None,
    no_decay: NoDecayFn = default_no_decay,
) -> list[dict[str, Any]]:
    """Named parameter groups over the trainable parameters of ``model``.

    Args:
        model: any module; tagged parameters come from :func:`iter_param_roles`.
        lr: base learning rate (>= 0).
        weight_decay: weight decay of the decayed groups (>= 0).
        loraplus_ratio: LoRA+ ratio λ > 0: ``lora_b`` gets λ × the learning rate.
        lr_scales: learning-rate multipliers by group kind (keys from :data:`GROUP_KINDS`).
        no_decay: ``(name, param, role or None) -> bool``, True to exclude from weight decay.

    Each group has ``params``, ``name``, ``lr``, ``weight_decay`` and ``lars``.
    """
    check_nonneg("lr", lr)
    check_nonneg("weight_decay", weight_decay)
    check_nonneg("loraplus_ratio", loraplus_ratio)
    if loraplus_ratio <= 0:
        raise ValueError(f"loraplus_ratio must be > 0, got {loraplus_ratio!r}")
    scales = {kind: 1.0 for kind in GROUP_KINDS}
    for kind, value in (lr_scales or {}).items():
        if kind not in scales:
            raise ValueError(
                f"unknown group kind {kind!r} in lr_scales; valid: {list(GROUP_KINDS)}"
            )
        scales[kind] = check_nonneg(f"lr_scales[{kind!r}]", value)
    scales["lora_b"] *= float(loraplus_ratio)

    roles: dict[int, ParamRole] = {}
    for _, tagged, tagged_role in iter_param_roles(model):
        roles.setdefault(id(tagged), tagged_role)

    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        role = roles.get(id(p))
        kind = _KIND_OF_ROLE[role] if role is not None else "other"
        excluded = no_decay(name, p, role)
        key = f"{kind}_no_decay" if excluded else kind
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "params": [],
                "name": key,
                "lr": lr * scales[kind],
                "weight_decay": 0.0 if excluded else float(weight_decay),
                "lars": not excluded,
            }
        group["params"].append(p)
    order = [k for kind in GROUP_KINDS for k in (kind, f"{kind}_no_decay")]
    return [groups[k] for k in order if k in groups]
