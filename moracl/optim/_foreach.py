"""Small helpers over ``torch._foreach_*`` ops shared by the optimisers.

The optimisers bucket their tensors by device and dtype (:func:`buckets`), so each call is one
multi-tensor op on an accelerator.

Per-tensor factors (LARS and LAMB trust ratios) are computed on the device and read back with
:func:`to_host` once per step, all groups together: ATen's multi-tensor kernels take a list of
Python scalars but have no fast path for a list of 0-d device tensors (that falls back to one
kernel per tensor), so one small read-back is far cheaper than hundreds of launches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_nonneg(name: str, value: float) -> float:
    """``value`` as a float if it is finite and ``>= 0``; else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by ``(device, dtype)``, in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def norms(tensors: Sequence[Tensor]) -> Tensor:
    """The L2 norm of every tensor as one 1-d tensor (one ``_foreach_norm`` call).

    Norms of half-precision tensors accumulate in float32.
    """
    low = tensors[0].dtype not in (torch.float32, torch.float64)
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32 if low else None))


def to_host(factors: Sequence[Tensor]) -> list[list[float]]:
    """Several 1-d tensors as lists of Python floats, with one transfer per device."""
    out: list[list[float]] = [[] for _ in factors]
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(factors):
        by_device.setdefault(f.device, []).append(i)
    for idx in by_device.values():
        # float64 holds float32 and float64 values exactly
        flat = torch.cat([factors[i].reshape(-1).to(torch.float64) for i in idx]).tolist()
        start = 0
        for i in idx:
            n = factors[i].numel()
            out[i] = flat[start : start + n]
            start += n
    return out
