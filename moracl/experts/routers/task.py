"""Routing by task id: each task owns a set of experts, optionally with learned weights.

Shape legend: ``n`` tokens, ``d`` features, ``e`` experts, ``t`` tasks, ``r`` rank per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from moracl.experts.backend import RoutingBackend
from moracl.experts.gating import Gating, ReplayGating, Routed, RouteGrads
from moracl.experts.routers.base import Router, TaskIds, as_task_ids, zero_padded
from moracl.experts.routers.config import RouterConfig, RouterType, check_bool, check_int
from moracl.experts.routers.registry import register_router
from moracl.experts.routing import RoutingResult, mask_logits, routing_dtype

__all__ = ["TaskGating", "TaskRouter", "TaskRouterConfig"]


@dataclass(frozen=True)
class TaskRouterConfig(RouterConfig):
    """Routing by task id.

    Args:
        num_tasks: the tasks (>= 1); each owns a block of experts at the start.
        task_weights: learn per-task weights over the task's experts (else uniform).
    """

    router_type: ClassVar[RouterType] = RouterType.TASK

    type: RouterType = RouterType.TASK
    num_tasks: int = 0
    task_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_tasks", self.num_tasks, 0)
        if self.num_tasks < 1:
            raise ValueError(
                f"the task router needs num_tasks >= 1, got num_tasks={self.num_tasks}"
            )
        check_bool("task_weights", self.task_weights)


class TaskKernelSaved(NamedTuple):
    """What the task kernel's backward reads."""

    za: Tensor  # (n, e·r)
    gates: Tensor  # (n, e) float32


class TaskGating(ReplayGating):
    """Routing by task id with fixed gates (no task weights that train now) under the
    ``triton`` backend: one Triton kernel gathers each row's task mask and weights, takes
    their softmax and gates the rank-space activations, one kernel is the backward
    (:func:`~moracl.experts.triton_route.task_gate_forward`); elsewhere, or with trainable
    task weights, the router's routing replayed under autograd (:class:`ReplayGating`)."""

    def __init__(self, router: TaskRouter, task_ids: TaskIds, backend: RoutingBackend) -> None:
        params = tuple(p for p in router.parameters() if p.requires_grad)

        def route(logits: Tensor) -> RoutingResult:
            return router.route_logits(logits, task_ids=task_ids)

        super().__init__(route, (), params)
        self.masks = router.expert_masks  # (t, e)
        self.weights = router.task_logits  # (t, e) or None
        self.task_ids = task_ids
        self.kernels = backend is RoutingBackend.TRITON and not (self._record and params)

    def forward(self, zl: Tensor, er: int) -> tuple[Tensor, Routed, Any]:
        if self.kernels:
            from moracl.experts import triton_route

            if triton_route.supports_task(zl, er, self.masks.shape[-1]):
                zg, gates, chosen = triton_route.task_gate_forward(
                    zl, er, self.task_ids.ids, self.masks, self.weights
                )
                return zg, Routed(gates, gates, chosen, None, ()), TaskKernelSaved(zl, gates)
        return super().forward(zl, er)

    def backward(
        self, saved: Any, grad_zg: Tensor | None, grads: RouteGrads
    ) -> tuple[Tensor, Tensor | None, tuple[Tensor | None, ...]]:
        if not isinstance(saved, TaskKernelSaved):
            return super().backward(saved, grad_zg, grads)
        nones = (None,) * len(self._params)
        if grad_zg is None:
            return torch.zeros_like(saved.za), None, nones
        from moracl.experts import triton_route

        grad_za, zg = triton_route.gate_apply_backward(grad_zg, saved.za, saved.gates)
        return grad_za, zg, nones


@register_router(RouterType.TASK, TaskRouterConfig)
class TaskRouter(Router):
    """Every token goes to the experts its task owns: ``expert_masks[t]`` is task ``t``'s
    ownership (by default the experts split into ``t`` contiguous blocks of near-equal size;
    change it with ``set_expert_mask``).  Batches may mix tasks row by row, in training and in
    inference; ``task_ids`` are required.

    Gates are uniform over the owned experts, or with ``config.task_weights`` a softmax of the
    learned ``task_logits (t × e)`` (zero at the start) over them.  The router reads no logits
    from ``x`` (``num_logits == 0``) and has no auxiliary losses.
    """

    config: TaskRouterConfig
    task_logits: nn.Parameter | None
    _no_weights: Tensor  # (0, d)

    def __init__(self, config: TaskRouterConfig, in_features: int, num_experts: int) -> None:
        t = config.num_tasks
        if isinstance(num_experts, int) and num_experts < t:
            raise ValueError(
                f"the task router needs at least one expert per task: got {num_experts} "
                f"expert(s) for num_tasks={t}"
            )
        super().__init__(config, in_features, num_experts)
        owner = torch.arange(num_experts) * t // num_experts  # (e,) the task owning each expert
        self.expert_masks.copy_(owner[None, :] == torch.arange(t)[:, None])  # (t, e)
        self.register_buffer("_no_weights", torch.zeros(0, in_features), persistent=False)
        if config.task_weights:
            self.task_logits = nn.Parameter(torch.zeros(t, num_experts))  # (t, e)
        else:
            self.register_parameter("task_logits", None)

    @property
    def num_logits(self) -> int:
        return 0

    def logit_weights(self) -> Tensor:
        return self._no_weights  # (0, d)

    def gating(
        self, task_ids: TaskIds | None, backend: RoutingBackend, active: Tensor | None = None
    ) -> Gating:
        """Routing by task inside the fused node (:class:`TaskGating`); ``active`` is
        unread: this router has no auxiliary losses."""
        if task_ids is None:
            self.allowed_experts(None)  # raises: the task router needs task ids
            raise AssertionError("unreachable")
        task_ids.check(self.num_tasks)
        return TaskGating(self, task_ids, backend)

    def allowed_experts(self, task_ids: Tensor | TaskIds | None) -> Tensor:
        if task_ids is None:
            raise ValueError(
                "the task router routes by task id: pass task_ids, one per token, "
                f"in [0, {self.num_tasks})"
            )
        return super().allowed_experts(task_ids)

    def route(
        self,
        logits: Tensor,
        allowed: Tensor,
        *,
        task_ids: Tensor | TaskIds | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        n, e = logits.shape[0], self.num_experts
        dtype = routing_dtype(logits.dtype)
        tids = as_task_ids(task_ids)
        if self.task_logits is None:
            scores = logits.new_zeros(n, e, dtype=dtype)  # (n, e) uniform
        else:
            if tids is None:
                raise ValueError("the task router with task_weights needs task_ids")
            scores = self.task_logits[tids.ids].to(dtype)  # (n, e)
        gates = mask_logits(scores, allowed).softmax(-1) * allowed  # (n, e)
        chosen = allowed.expand(n, -1)  # (n, e)
        return self.result(gates, gates, chosen, None, {})

    def _grow_experts(self, n_new: int) -> None:
        if self.task_logits is not None:
            self.task_logits = zero_padded(self.task_logits, n_new, dim=1)

    def _add_task(self) -> None:
        if self.task_logits is not None:
            self.task_logits = zero_padded(self.task_logits, 1, dim=0)
