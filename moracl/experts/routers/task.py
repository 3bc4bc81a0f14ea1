"""Routing by task id: each task owns a set of experts, optionally with learned weights.

Shape legend: ``n`` tokens, ``d`` features, ``e`` experts, ``t`` tasks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moracl.experts.route_ops import RouteOp, TaskRouteOp
from moracl.experts.routers.base import Router, zero_padded
from moracl.experts.routers.config import RouterConfig
from moracl.experts.routing import RoutingResult, mask_logits, routing_dtype

__all__ = ["TaskRouter"]


class TaskRouter(Router):
    """Every token goes to the experts its task owns: ``expert_masks[t]`` is task ``t``'s
    ownership (by default the experts split into ``t`` contiguous blocks of near-equal size;
    change it with ``set_expert_mask``).  Batches may mix tasks row by row, in training and in
    inference; ``task_ids`` are required.

    Gates are uniform over the owned experts, or with ``config.task_weights`` a softmax of the
    learned ``task_logits (t × e)`` (zero at the start) over them.  The router reads no logits
    from ``x`` (``num_logits == 0``) and has no auxiliary losses.
    """

    task_logits: nn.Parameter | None
    _no_weights: Tensor  # (0, d)

    def __init__(self, config: RouterConfig, in_features: int, num_experts: int) -> None:
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

    @classmethod
    def check_config(cls, config: RouterConfig) -> None:
        super().check_config(config)
        if config.num_tasks < 1:
            raise ValueError(
                f"the task router needs num_tasks >= 1, got num_tasks={config.num_tasks}"
            )
        if config.per != "token":
            raise ValueError(
                f"per={config.per!r}: the task router reads no input, it routes by task id "
                f"(one per batch row or per token); per applies to routers with learned logits"
            )

    @property
    def num_logits(self) -> int:
        return 0

    def logit_weights(self) -> Tensor:
        return self._no_weights  # (0, d)

    def route_op(self, task_ids: Tensor | None = None) -> RouteOp:
        """Routing by task inside the fused node (see
        :class:`~moracl.experts.route_ops.TaskRouteOp`)."""
        return TaskRouteOp(self, task_ids)

    def allowed_experts(self, task_ids: Tensor | None) -> Tensor:
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
        task_ids: Tensor | None = None,
        active: Tensor | None = None,
    ) -> RoutingResult:
        n, e = logits.shape[0], self.num_experts
        dtype = routing_dtype(logits.dtype)
        if self.task_logits is None:
            scores = logits.new_zeros(n, e, dtype=dtype)  # (n, e) uniform
        else:
            if task_ids is None:
                raise ValueError("the task router with task_weights needs task_ids")
            scores = self.task_logits[task_ids].to(dtype)  # (n, e)
        gates = mask_logits(scores, allowed).softmax(-1) * allowed  # (n, e)
        chosen = allowed.expand(n, -1)  # (n, e)
        return self._result(gates, gates, chosen, None, {})

    def _grow_experts(self, n_new: int) -> None:
        if self.task_logits is not None:
            self.task_logits = zero_padded(self.task_logits, n_new, dim=1)

    def _add_task(self) -> None:
        if self.task_logits is not None:
            self.task_logits = zero_padded(self.task_logits, 1, dim=0)
