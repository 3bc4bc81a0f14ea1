"""The Triton kernel behind :func:`moracl.nf4_kernel.dequantize_nf4` (imported only where
Triton runs: CUDA, or the CPU under ``TRITON_INTERPRET=1``).

Shape legend: ``p`` packed bytes (two weights each), ``s`` block scales (one per
``block_size`` weights), ``f`` their factors (one per ``scaler_block_size`` scales).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["dequantize_packed"]

_BLOCK = 1024  # packed bytes per program
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round(x, OUT: tl.constexpr):  # type: ignore[no-untyped-def]
    """float32 ``x`` rounded to ``OUT`` to nearest, ties to even (as torch), as float32.

    bfloat16 is rounded on the bits: Triton's interpreter truncates a float32 cast to
    bfloat16 where CUDA rounds, and the value must not depend on where the kernel runs."""
    if tl.bfloat16 == OUT:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(OUT).to(tl.float32)


@triton.jit
def _dequant_kernel(  # type: ignore[no-untyped-def]
    codes_ptr, scales_ptr, factor_ptr, mean_ptr, table_ptr, out_ptr,
    p, HALF_BLOCK: tl.constexpr, SCALER_BLOCK: tl.constexpr, OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (B,) byte index
    mask = offs < p
    byte = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    blk = offs // HALF_BLOCK  # the block scale of both weights of the byte
    q = tl.load(scales_ptr + blk, mask=mask, other=0).to(tl.float32)
    f = tl.load(factor_ptr + blk // SCALER_BLOCK, mask=mask, other=1.0).to(tl.float32)
    mean = tl.load(mean_ptr).to(tl.float32)
    # torch rounds each element-wise op's float32 result to the tensor dtype: do the same
    scale = _round(tl.math.div_rn(q, f), OUT)
    scale = _round(scale + mean, OUT)
    hi = tl.load(table_ptr + (byte >> 4), mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(table_ptr + (byte & 15), mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + 2 * offs, _round(hi * scale, OUT).to(OUT), mask=mask)
    tl.store(out_ptr + 2 * offs + 1, _round(lo * scale, OUT).to(OUT), mask=mask)


def dequantize_packed(
    codes: Tensor,
    scales: Tensor,
    factor: Tensor,
    mean: Tensor,
    table: Tensor,
    *,
    block_size: int,
    scaler_block_size: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> Tensor:
    """Dense weights of ``shape`` in ``dtype`` from an NF4 tensor's parts.

    Args:
        codes: ``(p,)`` uint8, two 4-bit codes per byte (high nibble first).
        scales: ``(s,)`` int8 quantised block scales.
        factor: ``(f,)`` the scales' quantisation factors, in ``dtype``.
        mean: ``()`` the scales' mean, in ``dtype``.
        table: ``(16,)`` the NF4 levels, in ``dtype``.
        block_size: weights per block scale (even).
        scaler_block_size: block scales per factor.
        shape: the weight's shape (``2p`` numbers).
        dtype: float32, bfloat16 or float16.
    """
    if dtype not in _TL_DTYPES:
        raise ValueError(f"NF4 dequantisation supports {list(_TL_DTYPES)}, got {dtype}")
    p = codes.numel()
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    if p == 0:
        return out
    _dequant_kernel[(triton.cdiv(p, _BLOCK),)](
        codes.contiguous(),
        scales.contiguous(),
        factor.contiguous(),
        mean,
        table.contiguous(),
        out,
        p,
        HALF_BLOCK=block_size // 2,
        SCALER_BLOCK=scaler_block_size,
        OUT=_TL_DTYPES[dtype],
        BLOCK=_BLOCK,
    )
    return out
