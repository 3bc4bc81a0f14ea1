"""NF4 dequantisation as one Triton kernel, and the frozen linear layer of a QLoRA base.

torchao's ``NF4Tensor.get_original_weight`` unpacks a weight in about a dozen launches, two
of them widening every code to int64; a QLoRA step dequantises each base weight twice (the
forward and the input gradient), so on a GPU that unpacking, not the matmul, set the step's
cost.  :func:`dequantize_nf4` does the same arithmetic in one pass that reads the packed
codes and block scales once and writes the dense weight once:

    scale[b]  = dtype(dtype(q[b] / factor[b // scaler_block]) + mean)   # double quantisation
    w[2k]     = dtype(nf4[codes[k] >> 4] * scale[2k // block])           # high nibble first
    w[2k + 1] = dtype(nf4[codes[k] & 15] * scale[(2k + 1) // block])

with every operation rounded to the weight's dtype as torch's element-wise kernels round
them (float32 arithmetic, IEEE division), so its output equals torchao's bit for bit
(``tests/test_nf4_kernel.py``, in Triton's interpreter on the CPU and compiled on CUDA).

:func:`nf4_linear` is the frozen output ``x W^T + b`` over an NF4 weight: the weight is
dequantised for the matmul and again for the input gradient, never kept dense between the
two (as torchao's ``linear_nf4``).  On CUDA with Triton installed it dequantises with the
kernel; elsewhere with torchao's own method.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NF4Linear", "dequantize_nf4", "frozen_linear", "is_nf4", "nf4_linear"]


def is_nf4(tensor: object) -> bool:
    """True for torchao's ``NF4Tensor`` (a parameter holding one included); never imports
    torchao (no NF4 tensor exists before it is imported)."""
    nf4 = getattr(sys.modules.get("torchao.quantization"), "NF4Tensor", None)
    return nf4 is not None and isinstance(tensor, nf4)


def _triton_on(device: torch.device) -> bool:
    from moracl.experts.backend import triton_runs_on

    return triton_runs_on(device)


def dequantize_nf4(weight: Any, *, use_triton: bool | None = None) -> Tensor:
    """The dense ``(o, i)`` weight (in the NF4 tensor's dtype) of torchao's ``NF4Tensor``
    ``weight``.

    Args:
        weight: an ``NF4Tensor`` (``to_nf4``'s layout: packed codes, int8 block scales, their
            float factors and mean, the 16-value table).
        use_triton: ``True``: the Triton kernel (on CUDA, or the CPU under
            ``TRITON_INTERPRET=1``); ``False``: torchao's ``get_original_weight``; ``None``: the
            kernel where it runs compiled (CUDA with Triton installed) once the process's
            first weight of that device and dtype came out of it equal to torchao's.
    """
    if use_triton is None:
        use_triton = weight.device.type == "cuda" and _triton_on(weight.device)
        use_triton = use_triton and _kernel_checked(weight)
    if not use_triton:
        dense: Tensor = weight.get_original_weight()
        return dense
    return _kernel(weight)


#: (device, dtype) -> whether the kernel gave torchao's weight there (checked once)
_CHECKED: dict[tuple[str, torch.dtype], bool] = {}


def _kernel_checked(weight: Any) -> bool:
    """Whether the kernel may dequantise ``weight``: the first weight of each device and dtype
    is dequantised both ways and compared bit for bit; a mismatch or an error warns once and
    sends that device and dtype to torchao's method for the rest of the process."""
    key = (str(weight.device), weight.dtype)
    if key not in _CHECKED:
        try:
            ok = bool(torch.equal(_kernel(weight), weight.get_original_weight()))
            problem = "its output differs from torchao's"
        except Exception as e:  # a Triton or driver failure: fall back, never stop a run
            ok, problem = False, f"it failed ({type(e).__name__}: {e})"
        if not ok:
            warnings.warn(
                f"moracl's NF4 dequantisation kernel is off on {key[0]} for {key[1]}: "
                f"{problem}; using torchao's get_original_weight (slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        _CHECKED[key] = ok
    return _CHECKED[key]


def _kernel(weight: Any) -> Tensor:
    from moracl.nf4_triton import dequantize_packed

    return dequantize_packed(
        weight.quantized_data,
        weight.quantized_scalers,
        weight.quantization_factor,
        weight.scaler_mean,
        weight.nf4,
        block_size=weight.block_size,
        scaler_block_size=weight.scaler_block_size,
        shape=tuple(weight.shape),
        dtype=weight.dtype,
    )


class _NF4Linear(torch.autograd.Function):
    """``x (..., i), W (o, i) NF4, b (o,) | None -> (..., o)``; ``W`` gets no gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Any, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)  # the 4-bit tensor: nothing dense outlives the forward
        w = dequantize_nf4(weight)  # (o, i) in the NF4 dtype
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)  # autocast casts both itself
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:  # type: ignore[override]
        grad_x = None
        if ctx.needs_input_grad[0]:
            (weight,) = ctx.saved_tensors
            grad_x = grad @ dequantize_nf4(weight).to(grad.dtype)  # (..., o) @ (o, i)
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)  # (o,)
        return grad_x, None, grad_b


def nf4_linear(x: Tensor, weight: Any, bias: Tensor | None = None) -> Tensor:
    """``x (..., i) -> (..., o)``: ``x W^T + b`` over the NF4 weight ``W (o, i)``."""
    out: Tensor = _NF4Linear.apply(x, weight, bias)
    return out


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through :func:`nf4_linear` where ``weight`` is an NF4 tensor."""
    if type(weight) is not nn.Parameter and type(weight) is not Tensor and is_nf4(weight):
        return nf4_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class NF4Linear(nn.Linear):
    """An ``nn.Linear`` whose weight may be an NF4 tensor (:func:`moracl.quant.quantize_base`
    builds them); its forward is :func:`frozen_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., i) -> (..., o)``."""
        return frozen_linear(x, self.weight, self.bias)
