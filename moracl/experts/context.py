"""What the model wrapper hands its mixtures for one forward: :class:`RoutingContext`.

Shape legend: ``b`` batch rows, ``n`` tokens, ``i`` input features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moracl.experts.routers.base import TaskIds
from moracl.experts.routing import RoutingResult, concat_results

__all__ = ["RoutingContext", "SideMasks", "sample_task_ids", "token_task_ids"]


@dataclass
class SideMasks:
    """An encoder-decoder's token masks, ``(mask, strict)`` or ``None`` each: a mixture routes
    under the encoder's when it is inside the encoder or reads the encoder's output (the
    decoder's cross-attention keys and values), else under the decoder's.

    Attributes:
        encoder, decoder: each side's mask.
        encoder_mixtures: ``id`` of every mixture inside the encoder.
        encoder_states: the encoder's outputs of this call (filled as the encoder runs, or
            given when the call passes them).
    """

    encoder: tuple[Tensor, bool] | None
    decoder: tuple[Tensor, bool] | None
    encoder_mixtures: frozenset[int]
    encoder_states: list[Tensor] = field(default_factory=list)

    def mask_for(self, mixture: nn.Module, x: Tensor) -> tuple[Tensor, bool] | None:
        """The mask ``mixture`` routes its input ``x`` under."""
        reads_encoder = any(x.data_ptr() == s.data_ptr() for s in self.encoder_states)
        if id(mixture) in self.encoder_mixtures or reads_encoder:
            return self.encoder
        return self.decoder


@dataclass
class RoutingContext:
    """Per-call context of the mixtures of one forward.

    Task ids are checked once per forward: :meth:`token_ids` makes one checked
    :class:`~moracl.experts.routers.base.TaskIds` per input shape (one host sync), which every
    layer's router then compares to its task count without another.

    Attributes:
        task_ids: ``(b,)`` one task id per batch row (or ``(n,)`` per token), or ``None``.
        results: filled by each mixture with its :class:`RoutingResult` (see :meth:`record`).
        router_inputs: a dict to fill with each mixture's router input (see
            :meth:`keep_input`), or ``None`` to keep none.
    """

    task_ids: Tensor | None = None
    results: dict[nn.Module, RoutingResult] = field(default_factory=dict)
    router_inputs: dict[nn.Module, Tensor] | None = None
    _checked: dict[tuple[str, tuple[int, ...]], TaskIds] = field(default_factory=dict)
    #: the mixtures that recorded a routing computed without gradients
    without_grad: set[nn.Module] = field(default_factory=set)
    #: the token mask declared for the forward, ``(mask, strict)``
    #: (:func:`~moracl.experts.per_sample.token_mask`), for its recomputation
    padding: tuple[Tensor, bool] | None = None
    #: an encoder-decoder's two token masks, declared around each mixture's routing where no
    #: mask is declared for the whole forward
    sides: SideMasks | None = None

    def for_recompute(self) -> RoutingContext:
        """The same task ids and token mask (of the same type of context) without the routing
        kept: what a mixture reads when activation checkpointing recomputes it in the
        backward."""
        return dataclasses.replace(self, results={}, router_inputs=None, without_grad=set())

    def keep_input(self, mixture: nn.Module, routed: Tensor) -> None:
        """Keep what ``mixture``'s router read: ``(n, i)`` tokens, or ``(b, i)`` samples' means
        for a router per sample (calls concatenated in call order; in the graph, so a loss on
        them reaches the layers below); only when :attr:`router_inputs` is a dict
        (``MoRAModel.record_router_inputs``)."""
        if self.router_inputs is None:
            return
        old = self.router_inputs.get(mixture)
        self.router_inputs[mixture] = routed if old is None else torch.cat([old, routed])

    def record(self, mixture: nn.Module, result: RoutingResult) -> None:
        """Keep ``mixture``'s routing of this forward. A mixture called more than once (an
        encoder running groups of rows separately, a block repeated) gets the calls' tokens
        concatenated in call order (:func:`~moracl.experts.routing.concat_results`)."""
        old = self.results.get(mixture)
        self.results[mixture] = result if old is None else concat_results(old, result)
        if not torch.is_grad_enabled():
            self.without_grad.add(mixture)

    def token_ids(self, lead: torch.Size) -> TaskIds | None:
        """The checked task ids per token for an input with leading shape ``lead``; one per
        shape and forward, shared by every layer."""
        if self.task_ids is None:
            return None
        key = ("token", tuple(lead))
        if key not in self._checked:
            self._checked[key] = TaskIds.of(token_task_ids(self.task_ids, lead))
        return self._checked[key]

    def sample_ids(self, lead: torch.Size) -> TaskIds | None:
        """The checked task ids per batch row, for a router that routes per sample."""
        if self.task_ids is None:
            return None
        key = ("sample", tuple(lead))
        if key not in self._checked:
            ids = sample_task_ids(self.task_ids, lead)
            assert ids is not None
            self._checked[key] = TaskIds.of(ids)
        return self._checked[key]


def sample_task_ids(task_ids: Tensor | None, lead: torch.Size) -> Tensor | None:
    """Per-row ``(b,)`` task ids, checked against an input with leading shape ``lead``, for a
    router that routes per sample (``None`` passes through)."""
    if task_ids is None:
        return None
    b = lead[0] if len(lead) else 1
    if task_ids.ndim != 1 or task_ids.shape[0] != b:
        raise ValueError(
            f"per-sample routing needs one task id per batch row ({b}), got task_ids of shape "
            f"{tuple(task_ids.shape)} for an input with leading shape {tuple(lead)}"
        )
    return task_ids


def token_task_ids(task_ids: Tensor, lead: torch.Size) -> Tensor:
    """Per-row ``(b,)`` (or per-token) task ids -> one per token ``(n,)`` for input ``lead``."""
    n = lead.numel()
    if task_ids.ndim == 1 and task_ids.shape[0] == n:
        return task_ids
    if task_ids.ndim == 1 and len(lead) >= 1 and task_ids.shape[0] == lead[0]:
        return task_ids.view(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(n)
    raise ValueError(
        f"task_ids of shape {tuple(task_ids.shape)} fit neither the batch ({lead[0]} rows) nor "
        f"the tokens ({n}) of an input with leading shape {tuple(lead)}"
    )
