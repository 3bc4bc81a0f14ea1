"""``MoRAOptimizer``: named parameter groups over a registered base, with optional LARS and SAM.

    opt = MoRAOptimizer(model, base="adamw", lr=2e-4, lars=True,
                        sam=SAMConfig(rho=0.05), loraplus_ratio=16)
    loss = opt.step(closure)          # SAM: two forward/backward passes inside

The chain is ``base`` → LARS (the :class:`~moracl.optim.lars.Lars` optimiser for ``sgd``, the
:class:`~moracl.optim.lars.LarsWrapper` otherwise) → :class:`~moracl.optim.sam.SAM`; every
link shares the same ``param_groups``, so a scheduler changes them all at once and
``state_dict`` is the base optimiser's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.optim import Optimizer

from moracl.optim._foreach import check_nonneg
from moracl.optim.groups import build_param_groups
from moracl.optim.lamb import Lamb
from moracl.optim.lars import Lars, LarsWrapper
from moracl.optim.sam import SAM, SAMConfig
from moracl.optim.wrapper import OptimizerWrapper
from moracl.registry import Registry

__all__ = [
    "BASE_OPTIMIZERS",
    "BaseOptimizerFactory",
    "LarsConfig",
    "MoRAOptimizer",
    "register_base_optimizer",
]


@dataclass(frozen=True)
class LarsConfig:
    """LARS settings (see :mod:`moracl.optim.lars`).

    Args:
        trust_coeff: η of the trust ratio (>= 0).
        eps: ε of the trust ratio (>= 0).
        trust_clip: LARC clipping ``min(ratio / lr, 1)``.
        exclude_1d: leave tensors with ``ndim <= 1`` unadapted.
    """

    trust_coeff: float = 0.001
    eps: float = 1e-8
    trust_clip: bool = False
    exclude_1d: bool = True

    def __post_init__(self) -> None:
        check_nonneg("trust_coeff", self.trust_coeff)
        check_nonneg("eps", self.eps)


class BaseOptimizerFactory(Protocol):
    """Builds a base optimiser over ``params``, with LARS applied when ``lars`` is given."""

    def __call__(
        self,
        params: list[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float,
        lars: LarsConfig | None,
        **kwargs: Any,
    ) -> Optimizer: ...


BASE_OPTIMIZERS: Registry[BaseOptimizerFactory] = Registry("base optimizer")


def register_base_optimizer(name: str) -> Callable[[BaseOptimizerFactory], BaseOptimizerFactory]:
    """Decorator registering a base-optimiser factory under ``name``."""
    return BASE_OPTIMIZERS.register(name)


def _lars_wrap(opt: Optimizer, lars: LarsConfig | None) -> Optimizer:
    if lars is None:
        return opt
    return LarsWrapper(
        opt,
        trust_coeff=lars.trust_coeff,
        trust_eps=lars.eps,
        trust_clip=lars.trust_clip,
        exclude_1d=lars.exclude_1d,
    )


@register_base_optimizer("adamw")
def _adamw(
    params: list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    lars: LarsConfig | None,
    **kwargs: Any,
) -> Optimizer:
    """``torch.optim.AdamW`` (``foreach=True`` unless ``fused`` or ``foreach`` is given)."""
    if "fused" not in kwargs:
        kwargs.setdefault("foreach", True)
    return _lars_wrap(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs), lars)


@register_base_optimizer("sgd")
def _sgd(
    params: list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    lars: LarsConfig | None,
    **kwargs: Any,
) -> Optimizer:
    """``torch.optim.SGD`` (momentum 0.9 by default), or :class:`Lars` with ``lars``."""
    kwargs.setdefault("momentum", 0.9)
    if lars is None:
        if "fused" not in kwargs:
            kwargs.setdefault("foreach", True)
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kwargs)
    return Lars(
        params,
        lr=lr,
        weight_decay=weight_decay,
        trust_coeff=lars.trust_coeff,
        trust_eps=lars.eps,
        trust_clip=lars.trust_clip,
        exclude_1d=lars.exclude_1d,
        **kwargs,
    )


@register_base_optimizer("lamb")
def _lamb(
    params: list[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    lars: LarsConfig | None,
    **kwargs: Any,
) -> Optimizer:
    """:class:`Lamb`, optionally under the LARS wrapper."""
    return _lars_wrap(Lamb(params, lr=lr, weight_decay=weight_decay, **kwargs), lars)


ParamsLike = nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]]


class MoRAOptimizer(OptimizerWrapper):
    """The optimiser of a moracl run: groups, base, LARS and SAM in one object.

    Args:
        params: a model (groups are built by :func:`build_param_groups`: ``lora_a``,
            ``lora_b``, ``expert``, ``router``, ``head``, ``other`` and their ``_no_decay``
            variants), or parameters, or parameter-group dicts (used as given, copied; a group
            without ``"name"`` is named ``group<i>``).
        base: registered base optimiser: ``adamw``, ``sgd`` or ``lamb``.
        lr: base learning rate (>= 0).
        weight_decay: weight decay of the decayed groups (>= 0).
        loraplus_ratio: LoRA+ λ > 0 (``lora_b`` lr = λ × ``lora_a`` lr); needs a model.
        lr_scales: learning-rate multipliers by group kind; needs a model.
        lars: ``True`` or a :class:`LarsConfig` to add LARS.
        sam: a :class:`SAMConfig` to add SAM / ASAM.
        model: the module the closure runs (for DDP ``no_sync`` and BatchNorm in SAM's two
            passes); defaults to ``params`` when that is a module.
        **base_kwargs: passed to the base optimiser (``betas``, ``eps``, ``momentum``, ...).

    ``step(closure)`` evaluates ``closure`` (forward and ``backward()``, returning the loss)
    after zeroing the gradients, then steps; with SAM it runs both passes
    (:meth:`SAM.step`).  It returns the (first) loss.  Without a closure it is a plain step
    (SAM then needs :meth:`first_step` / :meth:`second_step`).
    """

    def __init__(
        self,
        params: ParamsLike,
        *,
        base: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        loraplus_ratio: float = 1.0,
        lr_scales: Mapping[str, float] | None = None,
        lars: bool | LarsConfig = False,
        sam: SAMConfig | None = None,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        factory = BASE_OPTIMIZERS.get(base)
        check_nonneg("lr", lr)
        check_nonneg("weight_decay", weight_decay)
        check_nonneg("loraplus_ratio", loraplus_ratio)
        if loraplus_ratio <= 0:
            raise ValueError(f"loraplus_ratio must be > 0, got {loraplus_ratio!r}")
        if sam is not None and not isinstance(sam, SAMConfig):
            raise TypeError(f"sam must be a SAMConfig or None, got {type(sam).__name__}")
        lars_cfg = LarsConfig() if lars is True else (lars or None)
        if lars_cfg is not None and not isinstance(lars_cfg, LarsConfig):
            raise TypeError(f"lars must be a bool or a LarsConfig, got {type(lars).__name__}")

        if isinstance(params, nn.Module):
            groups = build_param_groups(
                params,
                lr=lr,
                weight_decay=weight_decay,
                loraplus_ratio=loraplus_ratio,
                lr_scales=lr_scales,
            )
            if not groups:
                raise ValueError(f"{type(params).__name__} has no trainable parameters")
            model = params if model is None else model
        else:
            if loraplus_ratio != 1.0 or lr_scales:
                raise ValueError(
                    "loraplus_ratio and lr_scales need a model to find the groups; got "
                    f"loraplus_ratio={loraplus_ratio!r}, lr_scales={lr_scales!r} with explicit "
                    "parameters (build groups with moracl.optim.build_param_groups instead)"
                )
            groups = _copy_groups(params)

        chain = factory(groups, lr=lr, weight_decay=weight_decay, lars=lars_cfg, **base_kwargs)
        self.sam: SAM | None = None
        if sam is not None:
            chain = self.sam = SAM(
                chain, rho=sam.rho, adaptive=sam.adaptive, eta=sam.eta, model=model
            )
        self.base_name = base
        self.lars_config = lars_cfg
        self.sam_config = sam
        super().__init__(chain, {})

    # -- groups ---------------------------------------------------------------------------
    def group(self, name: str) -> dict[str, Any]:
        """The parameter group called ``name``."""
        for group in self.param_groups:
            if group.get("name") == name:
                return group
        names = [g.get("name") for g in self.param_groups]
        raise KeyError(f"no parameter group named {name!r}; groups: {names}")

    # -- stepping -------------------------------------------------------------------------
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        grad_scaler: GradScaler | None = None,
    ) -> Tensor | None:
        """One training step; see the class docstring for the closure convention."""
        if self.sam is not None:
            if closure is None:
                raise ValueError(
                    "with SAM, step() needs a closure (forward + backward, returning the "
                    "loss), or use first_step() / second_step()"
                )
            return self.sam.step(closure, grad_scaler=grad_scaler)
        loss = None
        if closure is not None:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        if grad_scaler is not None and grad_scaler.is_enabled():
            grad_scaler.step(self)  # unscales (once), skips on inf/NaN, else calls step()
        else:
            self.base_optimizer.step()
        return loss

    def first_step(self, zero_grad: bool = True, *, grad_scaler: GradScaler | None = None) -> bool:
        """SAM's ascent step (see :meth:`SAM.first_step`)."""
        return self._need_sam("first_step").first_step(zero_grad, grad_scaler=grad_scaler)

    def second_step(
        self, zero_grad: bool = False, *, grad_scaler: GradScaler | None = None
    ) -> bool:
        """SAM's descent step (see :meth:`SAM.second_step`)."""
        return self._need_sam("second_step").second_step(zero_grad, grad_scaler=grad_scaler)

    def _need_sam(self, what: str) -> SAM:
        if self.sam is None:
            raise RuntimeError(f"{what}() needs SAM: build the optimiser with sam=SAMConfig(...)")
        return self.sam

    def __repr__(self) -> str:
        names = [g.get("name") for g in self.param_groups]
        return (
            f"MoRAOptimizer(base={self.base_name!r}, lars={self.lars_config!r}, "
            f"sam={self.sam_config!r}, groups={names})"
        )


def _copy_groups(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups as fresh dicts (the caller's are not mutated), each with a name."""
    items = list(params)
    if not items:
        raise ValueError("MoRAOptimizer got an empty parameter list")
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for i, g in enumerate(items):
        if not isinstance(g, dict):
            raise TypeError(f"expected parameter-group dicts, got {type(g).__name__} at {i}")
        group = dict(g)
        params_i = group["params"]
        group["params"] = [params_i] if isinstance(params_i, Tensor) else list(params_i)
        group.setdefault("name", f"group{i}")
        groups.append(group)
    return groups
