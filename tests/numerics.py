"""Comparisons of two computations of the same values whose rounding differs by machine.

Two float32 paths (merged against unmerged weights, a fused node against plain autograd) round
differently, and by how much depends on the CPU's kernels and thread count: the error grows
with the size of the values, so a fixed absolute tolerance that holds on one machine fails on
another. These helpers hold the difference to a tolerance relative to the values' scale.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["assert_close_to_scale"]


def assert_close_to_scale(actual: Tensor, expected: Tensor, tol: float, msg: str = "") -> None:
    """``max |actual - expected| <= tol · max(1, max |expected|)`` (shapes equal)."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape), msg)
    scale = expected.detach().abs().max().clamp(min=1.0)
    diff = (actual.detach() - expected.detach()).abs().max()
    assert diff <= tol * scale, f"{msg} max difference {diff:.3g} > {tol:g} × scale {scale:.3g}"
