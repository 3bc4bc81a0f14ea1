"""The router interface, the router registry, and per-task expert masks.

Shape legend: ``n`` tokens, ``d`` features, ``e`` experts, ``t`` tasks, ``l`` logit columns
(the rows of :meth:`Router.logit_weights`).

Every router computes its scores as ``x @ logit_weights().T`` and routes them with
:meth:`Router.route`, so a mixture may fold the router's matmul into the experts' down
projection: concatenate ``logit_weights()`` to the stacked down-projection rows, split the
output, and pass the router's columns to :meth:`Router.route_logits`.

Masks.  A router holds ``expert_masks (t, e)``, one row per task, and ``global_mask (e,)``.
With ``task_ids`` each token uses its task's row; without them (or when the router has no task
rows) the global mask.  Masked experts can't be chosen and get zero gates.  Growth appends
experts: parameters get zero rows (old rows unchanged), old tasks' rows get ``False`` for the
new experts (a task keeps the experts it was trained with) and the global mask ``True``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.adapters.base import ParamRole
from moracl.cuda_graphs import capturing
from moracl.experts.backend import RoutingBackend
from moracl.experts.gating import Gating, ReplayGating
from moracl.experts.routers.config import LogitRouterConfig, RouterConfig, type_name
from moracl.experts.routing import RoutingResult, routing_dtype

__all__ = [
    "LogitRouter",
    "Router",
    "TaskIds",
    "as_task_ids",
    "check_active",
    "check_task_ids",
    "noisy_scores",
    "zero_padded",
]

#: Standard deviation of a fresh router weight: small, so routing starts near uniform.
INIT_STD = 1e-2


@dataclass(frozen=True)
class TaskIds:
    """Task ids of ``n`` tokens, checked once: ``ids (n,)`` integers >= 0 and ``high`` the
    largest (``None`` where it was not read back: while ``torch.compile`` traces or a CUDA
    graph is captured).  Build one with :meth:`of`; the routers of every layer of a forward
    then compare ``high`` to their task count without another host sync (the mixtures' shared
    :class:`~moracl.experts.mixture.RoutingContext` makes one per input shape)."""

    ids: Tensor
    high: int | None

    @classmethod
    def of(cls, task_ids: Tensor | TaskIds) -> TaskIds:
        """``task_ids`` checked (an integer ``(n,)`` tensor, no id below 0).

        The range check reads two numbers back from the device, so eager mode on an
        accelerator pays one host sync; it is skipped while ``torch.compile`` traces and
        while a CUDA graph is captured (see :mod:`moracl.cuda_graphs`).
        """
        if isinstance(task_ids, TaskIds):
            return task_ids
        if not isinstance(task_ids, Tensor):
            raise TypeError(f"task_ids must be a tensor, got {type(task_ids).__name__}")
        if task_ids.dtype == torch.bool or task_ids.is_floating_point() or task_ids.is_complex():
            raise TypeError(f"task_ids must be an integer tensor, got dtype {task_ids.dtype}")
        if task_ids.ndim != 1:
            raise ValueError(
                f"task_ids must have shape (n,), one task id per token, got {tuple(task_ids.shape)}"
            )
        if torch.compiler.is_compiling() or task_ids.numel() == 0 or capturing():
            return cls(task_ids, None)
        lo, hi = torch.stack([task_ids.min(), task_ids.max()]).tolist()
        if lo < 0:
            raise ValueError(f"task id {lo} out of range; expected 0 <= task id")
        return cls(task_ids, int(hi))

    def check(self, num_tasks: int) -> None:
        """``ValueError`` unless every id is below ``num_tasks`` (no host sync)."""
        if self.high is not None and self.high >= num_tasks:
            raise ValueError(
                f"task id {self.high} out of range; expected 0 <= task id < {num_tasks} "
                f"(the router has expert masks for {num_tasks} task(s))"
            )

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def as_task_ids(task_ids: Tensor | TaskIds | None) -> TaskIds | None:
    """``task_ids`` as a checked :class:`TaskIds` (``None`` passes through)."""
    return None if task_ids is None else TaskIds.of(task_ids)


def check_task_ids(task_ids: Tensor | TaskIds, num_tasks: int) -> TaskIds:
    """Raise unless ``task_ids`` is an integer ``(n,)`` tensor with values in ``[0, t)``;
    returns them checked (see :meth:`TaskIds.of`)."""
    checked = TaskIds.of(task_ids)
    checked.check(num_tasks)
    return checked


def check_active(active: Tensor | None, n: int) -> None:
    """Raise unless ``active`` is ``None`` or a bool ``(n,)`` tensor."""
    if active is None:
        return
    if not isinstance(active, Tensor) or active.dtype != torch.bool or active.shape != (n,):
        got = (
            f"{active.dtype} of shape {tuple(active.shape)}"
            if isinstance(active, Tensor)
            else type(active).__name__
        )
        raise ValueError(f"active must be a bool tensor of shape ({n},), one per token; got {got}")


class Router(nn.Module, ABC):
    """Decides, for ``n`` tokens, gates over ``e`` experts; returns a :class:`RoutingResult`.

    Subclasses implement :attr:`num_logits`, :meth:`logit_weights` and :meth:`route`, and
    may validate their config in :meth:`check_config`.  Nothing is stored during ``forward``.
    """

    expert_masks: Tensor  # (t, e) bool
    global_mask: Tensor  # (e,) bool

    def __init__(self, config: RouterConfig, in_features: int, num_experts: int) -> None:
        super().__init__()
        if not isinstance(config, RouterConfig):
            raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
        for name, value in (("in_features", in_features), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.config = config
        self.in_features = in_features
        self.num_experts = num_experts
        self.register_buffer(
            "expert_masks", torch.ones(config.num_tasks, num_experts, dtype=torch.bool)
        )
        self.register_buffer("global_mask", torch.ones(num_experts, dtype=torch.bool))

    # -- the interface -------------------------------------------------------------------
    @property
    @abstractmethod
    def num_logits(self) -> int:
        """``l``: the number of logit columns this router reads (rows of ``logit_weights``)."""

    @abstractmethod
    def logit_weights(self) -> Tensor:
        """``(l, d)``: the rows whose products with ``x`` are this router's logits."""

    def logit_parts(self) -> tuple[Tensor, ...]:
        """The row blocks of :meth:`logit_weights` in order (``(l_j, d)`` each, ``Σ l_j =
        l``), as this router holds them: a fused node stacks them beside its own rows in one
        copy, without concatenating them first (an operation and its backward less a
        layer)."""
        return (self.logit_weights(),)

    @abstractmethod
    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        """Route given the experts each token may use.

        Args:
            logits: ``(n, l)`` the columns of ``x @ logit_weights().T``.
            allowed: ``(n|1, e)`` bool, the experts each token may use (already combining
                this router's masks, see :meth:`allowed_experts`, with any the caller adds).
            task_ids: ``(n,)`` task id per token, for routers that read them.
            active: ``(n,)`` bool tokens the auxiliary losses count (``None``: all).
        """

    def loss_weights(self) -> dict[str, float]:
        """The auxiliary losses this router returns: name -> weight (in their order)."""
        return self.config.loss_weights

    @property
    def aux_names(self) -> tuple[str, ...]:
        """The names of the auxiliary losses this router returns."""
        return tuple(self.loss_weights())

    # -- calling ---------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        """Route ``x (n, d)``; ``task_ids (n,)`` picks each token's expert mask, ``active
        (n,)`` bool the tokens the auxiliary losses count (``None``: all; padding is not)."""
        if x.ndim != 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"router input must have shape (n, {self.in_features}), got {tuple(x.shape)}"
            )
        logits = F.linear(x, self.logit_weights())  # (n, d) -> (n, l)
        return self.route_logits(logits, task_ids=task_ids, active=active)

    def route_logits(
        self,
        logits: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        """Route precomputed ``logits (n, l)`` = ``x @ logit_weights().T`` under this router's
        masks (for a mixture that computes them in its own matmul); ``active (n,)`` bool:
        the tokens the auxiliary losses count."""
        if logits.ndim != 2 or logits.shape[-1] != self.num_logits:
            raise ValueError(
                f"router logits must have shape (n, {self.num_logits}), got {tuple(logits.shape)}"
            )
        tids = as_task_ids(task_ids)
        if tids is not None and len(tids) != logits.shape[0]:
            raise ValueError(
                f"task_ids must have one entry per token ({logits.shape[0]}), "
                f"got shape {tuple(tids.ids.shape)}"
            )
        check_active(active, logits.shape[0])
        return self.route(logits, self.allowed_experts(tids), task_ids=tids, active=active)

    def gating(
        self, task_ids: TaskIds | None, backend: RoutingBackend, active: Tensor | None = None
    ) -> Gating:
        """This router's routing of one forward inside a fused node that computes the logits
        ``x @ logit_weights().T`` itself (see :mod:`moracl.experts.gating`), for a concrete
        ``backend``, its auxiliary losses over the ``active (n,)`` tokens (``None``: all):
        by default its :meth:`route_logits` replayed under autograd; router kinds with a
        closed form or kernels override it."""
        params = tuple(p for p in self.parameters() if p.requires_grad)

        def route(logits: Tensor) -> RoutingResult:
            return self.route_logits(logits, task_ids=task_ids, active=active)

        return ReplayGating(route, self.aux_names, params)

    def allowed_experts(self, task_ids: Tensor | TaskIds | None) -> Tensor:
        """``(n, e)`` each token's task mask, or ``(1, e)`` the global mask when there are no
        task ids or no task rows (task ids are then ignored)."""
        if task_ids is None or self.num_tasks == 0:
            return self.global_mask[None]  # (1, e)
        tids = check_task_ids(task_ids, self.num_tasks)
        return self.expert_masks[tids.ids.to(self.expert_masks.device)]  # (n, e)

    # -- masks and growth -------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """``t``: rows of ``expert_masks``."""
        return self.expert_masks.shape[0]

    def set_expert_mask(self, task_id: int | None, mask: Tensor | Sequence[bool]) -> None:
        """Restrict task ``task_id`` (``None``: tokens without task ids) to ``mask (e,)``.

        ``task_id == num_tasks`` appends a row for a new task.  The mask must be boolean with
        at least one ``True``.
        """
        m = torch.as_tensor(mask, device=self.global_mask.device)
        if m.dtype != torch.bool:
            raise TypeError(f"an expert mask must be boolean, got dtype {m.dtype}")
        if tuple(m.shape) != (self.num_experts,):
            raise ValueError(
                f"an expert mask must have shape ({self.num_experts},), one entry per expert, "
                f"got {tuple(m.shape)}"
            )
        if not bool(m.any()):
            raise ValueError("an expert mask must allow at least one expert, got all False")
        if task_id is None:
            self.global_mask.copy_(m)
            return
        t = self.num_tasks
        if not isinstance(task_id, int) or isinstance(task_id, bool) or not 0 <= task_id <= t:
            raise ValueError(
                f"task_id must be an integer in [0, {t}] ({t} appends a task) or None, "
                f"got {task_id!r}"
            )
        if task_id == t:
            self._add_task()
            row = self.expert_masks.new_ones(1, self.num_experts)
            self.expert_masks = torch.cat([self.expert_masks, row])  # (t + 1, e)
        self.expert_masks[task_id] = m

    @torch.no_grad()
    def grow(self, n_new: int) -> None:
        """Append ``n_new`` experts: zero parameter rows, old rows bit-identical; old tasks'
        masks get ``False`` for them, the global mask ``True``."""
        if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new <= 0:
            raise ValueError(f"n_new must be a positive integer, got {n_new!r}")
        self._grow_experts(n_new)
        pad = self.expert_masks.new_zeros(self.num_tasks, n_new)
        self.expert_masks = torch.cat([self.expert_masks, pad], dim=1)  # (t, e + n_new)
        self.global_mask = torch.cat([self.global_mask, self.global_mask.new_ones(n_new)])
        self.num_experts += n_new

    def _grow_experts(self, n_new: int) -> None:
        """Grow the subclass's parameters by ``n_new`` experts (validate before changing)."""

    def _add_task(self) -> None:
        """Grow per-task parameters by one task (``set_expert_mask`` appending one)."""

    # -- helpers -----------------------------------------------------------------------------
    def param_roles(self) -> dict[str, ParamRole]:
        """This module's own parameters (not its sub-routers'), all ``ParamRole.ROUTER``."""
        return {name: ParamRole.ROUTER for name, _ in self.named_parameters(recurse=False)}

    def result(
        self,
        gates: Tensor,
        probs: Tensor,
        chosen: Tensor,
        indices: Tensor | None,
        aux_losses: dict[str, Tensor],
    ) -> RoutingResult:
        """A :class:`RoutingResult` with this router's loss weights."""
        weights = self.loss_weights()
        return RoutingResult(
            gates=gates,
            probs=probs,
            chosen=chosen,
            indices=indices,
            aux_losses=aux_losses,
            aux_weights={name: weights[name] for name in aux_losses},
        )

    def extra_repr(self) -> str:
        return (
            f"type={type_name(self.config.type)!r}, in_features={self.in_features}, "
            f"experts={self.num_experts}, tasks={self.num_tasks}"
        )


class LogitRouter(Router):
    """A router with learned logits: ``weight (e × d)``, and, for the kinds that select
    (``uses_noise``) with ``config.noise``, ``noise_weight (e × d)``.

    The logits are ``x Wᵀ``; while training, the selection uses ``x Wᵀ + ε · softplus(x W_nᵀ)``
    with ``ε ~ N(0, 1)`` (Shazeer et al. 2017).  ``logit_weights()`` is ``W`` followed by
    ``W_n``: ``(e or 2e) × d``.  ``W`` starts small, ``W_n`` at zero.
    """

    uses_noise: ClassVar[bool] = False
    noise_weight: nn.Parameter | None

    config: LogitRouterConfig

    def __init__(self, config: LogitRouterConfig, in_features: int, num_experts: int) -> None:
        super().__init__(config, in_features, num_experts)
        self.weight = nn.Parameter(torch.randn(num_experts, in_features) * INIT_STD)  # (e, d)
        if self.uses_noise and getattr(config, "noise", False):
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, in_features))  # (e, d)
        else:
            self.register_parameter("noise_weight", None)

    @property
    def num_logits(self) -> int:
        return self.num_experts * (1 if self.noise_weight is None else 2)

    def logit_weights(self) -> Tensor:
        if self.noise_weight is None:
            return self.weight
        return torch.cat([self.weight, self.noise_weight])  # (2e, d)

    def logit_parts(self) -> tuple[Tensor, ...]:
        if self.noise_weight is None:
            return (self.weight,)
        return (self.weight, self.noise_weight)

    def noise(self, logits: Tensor) -> Tensor | None:
        """``(n, e)`` standard normal draws for the noisy selection while training (in the
        routing dtype), or ``None`` when this router adds no noise now."""
        if self.noise_weight is None or not self.training:
            return None
        n, dtype = logits.shape[0], routing_dtype(logits.dtype)
        return torch.randn(n, self.num_experts, device=logits.device, dtype=dtype)

    def scores(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(clean, used)``, both ``(n, e)`` in the routing dtype: the noise-free logits and
        the ones the selection uses (noisy while training)."""
        return noisy_scores(logits, self.num_experts, self.noise(logits))

    def _grow_experts(self, n_new: int) -> None:
        self.weight = zero_padded(self.weight, n_new)
        if self.noise_weight is not None:
            self.noise_weight = zero_padded(self.noise_weight, n_new)


def noisy_scores(logits: Tensor, e: int, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(clean, used)``, both ``(n, e)`` in the routing dtype, from ``logits (n, e|2e)``:
    ``used = clean + noise · softplus(noise-scale logits)`` when ``noise (n, e)`` is given
    (any leading dimensions: ``(n, b, e|2e)`` gives ``(n, b, e)``)."""
    logits = logits.to(routing_dtype(logits.dtype))
    clean = logits[..., :e]
    if noise is None:
        return clean, clean
    return clean, clean + noise * F.softplus(logits[..., e:])


def zero_padded(p: nn.Parameter, n_new: int, dim: int = 0) -> nn.Parameter:
    """``p`` with ``n_new`` zero slices appended along ``dim``, as a new parameter."""
    shape = list(p.shape)
    shape[dim] = n_new
    data = torch.cat([p.detach(), p.new_zeros(shape)], dim=dim)
    return nn.Parameter(data, requires_grad=p.requires_grad)
