"""The NF4 dequantisation kernel and the frozen NF4 linear (:mod:`moracl.nf4_kernel`).

References: torchao's ``NF4Tensor.get_original_weight()`` (bit for bit: the kernel rounds
each step as torch does), and ``F.linear`` over that dequantised weight for the outputs and
gradients.  Without a GPU the kernel runs in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); on a GPU it runs compiled.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moracl.experts.backend import triton_runs_on
from moracl.nf4_kernel import NF4Linear, dequantize_nf4, frozen_linear, nf4_linear
from moracl.quant import dequantize_base, is_nf4, quantize_base

if importlib.util.find_spec("torchao") is None:
    pytest.skip("needs torchao (pip install 'moracl[quant]')", allow_module_level=True)
from torchao.quantization import to_nf4

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not triton_runs_on(DEV), reason="Triton does not run here (no CUDA, interpreter off)"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "block", "scaler"), [((256, 128), 64, 256), ((96, 512), 64, 128), ((64, 96), 32, 6)]
)
def test_the_kernel_equals_torchao_bit_for_bit(
    dtype: torch.dtype, shape: tuple[int, int], block: int, scaler: int
) -> None:
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.3).to(DEV, dtype)
    w[0, :block] = 0.0  # a zero block: absmax 0 handled as torchao handles it
    q = to_nf4(w, block, scaler)
    got = dequantize_nf4(q, use_triton=True)
    want = q.get_original_weight()
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_without_the_kernel_it_is_torchao() -> None:
    q = to_nf4(torch.randn(64, 64), 64, 4)
    assert torch.equal(dequantize_nf4(q, use_triton=False), q.get_original_weight())


@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_equals_f_linear_over_the_dequantised_weight(bias: bool) -> None:
    """Float64 would hide nothing here: in float32 the two compute the same products."""
    torch.manual_seed(1)
    q = to_nf4(torch.randn(48, 64), 64, 4)
    dense = q.get_original_weight()
    b = torch.randn(48, requires_grad=True) if bias else None
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = nf4_linear(x, q, b)
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = None if b is None else b.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, dense, b2)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    if b is not None and b2 is not None:
        torch.testing.assert_close(b.grad, b2.grad, rtol=1e-6, atol=1e-6)


def test_frozen_linear_is_f_linear_on_dense_weights() -> None:
    w, x = torch.randn(8, 16), torch.randn(3, 16)
    assert torch.equal(frozen_linear(x, w), F.linear(x, w))


def test_quantised_layers_left_unadapted_compute_the_dequantised_model() -> None:
    """A quantised model without adapters (every layer an ``NF4Linear``) computes what its
    dequantised copy computes."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    q = quantize_base(net, scaler_block_size=4)
    assert all(isinstance(q[i], NF4Linear) and is_nf4(q[i].weight) for i in (0, 2))
    dense = dequantize_base(q)
    x = torch.randn(4, 64)
    torch.testing.assert_close(q(x), dense(x), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_nf4_linear_equals_the_dequantised_weight() -> None:
    """Under bf16 autocast, as QLoRA trains: output and input gradient equal ``F.linear``
    over torchao's dequantised weight (the same bf16 matmuls, so the weights the kernel made
    on CUDA are torchao's)."""
    torch.manual_seed(3)
    q = to_nf4(torch.randn(256, 512, device="cuda", dtype=torch.bfloat16))
    dense = q.get_original_weight()
    x = torch.randn(4, 33, 512, device="cuda", requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = nf4_linear(x, q)
        y2 = F.linear(x2, dense)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    # the same bf16 products; a bf16 rounding step of slack for a different cuBLAS algorithm
    torch.testing.assert_close(y, y2, rtol=1e-2, atol=1e-2)
    assert x.grad is not None and x2.grad is not None
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-2, atol=1e-2)


@needs_triton
def test_the_first_weight_checks_the_kernel_and_a_mismatch_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the kernel serves a device and dtype it must reproduce torchao's weight; a wrong
    or failing kernel warns once and torchao's method serves the rest of the process."""
    import moracl.nf4_kernel as nk

    q = to_nf4(torch.randn(64, 64, device=DEV), 64, 4)
    monkeypatch.setattr(nk, "_CHECKED", {})
    assert nk._kernel_checked(q)  # the real kernel agrees
    monkeypatch.setattr(nk, "_CHECKED", {})
    monkeypatch.setattr(nk, "_kernel", lambda w: w.get_original_weight() + 1)
    with pytest.warns(RuntimeWarning, match="differs from torchao"):
        assert not nk._kernel_checked(q)
    assert not nk._kernel_checked(q)  # decided once: no second warning, still off

    def broken(w: object) -> torch.Tensor:
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(nk, "_CHECKED", {})
    monkeypatch.setattr(nk, "_kernel", broken)
    with pytest.warns(RuntimeWarning, match="failed .RuntimeError: no kernel image"):
        assert not nk._kernel_checked(q)
