"""The routing context of :meth:`MoRAModel.route <moracl.model.MoRAModel.route>`: one task id
per batch row, also routing the ``k·b`` rows ``generate`` makes of a batch of ``b``.

Shape legend: ``b`` batch rows given ids, ``k`` rows per id (beam search,
``num_return_sequences``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moracl.experts.context import sample_task_ids, token_task_ids
from moracl.experts.mixture import RoutingContext
from moracl.experts.routers.base import TaskIds
from moracl.experts.routing import RoutingResult

__all__ = ["RowsContext", "row_ids"]


def row_ids(task_ids: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """``(b,)`` integer task ids, one per batch row, on ``device``."""
    ids = task_ids if isinstance(task_ids, Tensor) else torch.as_tensor(list(task_ids))
    if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            "route() takes one integer task id per batch row (a 1-d tensor or a list), got "
            f"shape {tuple(ids.shape)} and dtype {ids.dtype}"
        )
    return ids.to(device)


@dataclasses.dataclass
class RowsContext(RoutingContext):
    """A routing context whose ``task_ids (b,)`` also route a batch of ``k·b`` rows, each id
    given to ``k`` consecutive rows (how ``generate`` expands a batch for beam search).

    ``keep_results=False`` keeps no routing (a context living through a whole ``generate``
    would otherwise keep every step's)."""

    keep_results: bool = True

    def record(self, mixture: nn.Module, result: RoutingResult) -> None:
        if self.keep_results:
            super().record(mixture, result)

    def token_ids(self, lead: torch.Size) -> TaskIds | None:
        key = ("token", tuple(lead))
        if key not in self._checked:
            self._checked[key] = TaskIds.of(token_task_ids(self._rows(lead), lead))
        return self._checked[key]

    def sample_ids(self, lead: torch.Size) -> TaskIds | None:
        key = ("sample", tuple(lead))
        if key not in self._checked:
            ids = sample_task_ids(self._rows(lead), lead)
            assert ids is not None  # _rows never returns None
            self._checked[key] = TaskIds.of(ids)
        return self._checked[key]

    def _rows(self, lead: torch.Size) -> Tensor:
        """``(rows,)``: the ids repeated to the ``rows = lead[0]`` of an input."""
        ids = self.task_ids
        assert ids is not None  # route() always gives ids
        b, rows = ids.shape[0], (lead[0] if len(lead) else 1)
        if rows == b:
            return ids
        if rows % b:
            raise ValueError(
                f"route() was given {b} task ids, which do not divide the {rows} rows of an "
                f"input with leading shape {tuple(lead)}; give one task id per batch row"
            )
        return ids.repeat_interleave(rows // b)  # row i's id on rows i·k ... i·k + k - 1
