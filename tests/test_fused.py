"""Fused training paths equal plain autograd over the dense definition (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moracl.adapters.fused as fused_nodes
from moracl import AdapterConfig, MoRALinear

from .conftest import randomize_adapters

FUSED = [
    {"kind": "lora"},
    {"kind": "lora", "freeze_a": True},
    {"kind": "dora"},
    {"kind": "dora", "freeze_a": True},
    {"kind": "mora", "compression": "sharing"},
    {"kind": "mora", "compression": "truncation"},
    {"kind": "mora", "compression": "rotation"},
]
SHAPES = [(24, 40), (40, 24), (6, 50), (50, 6), (64, 64), (100, 23)]


@pytest.mark.parametrize("options", FUSED, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("update_first", [False, True], ids=["frozen-first", "update-first"])
def test_fused_forward_and_gradients_match_reference(
    options: dict,
    shape: tuple[int, int],
    bias: bool,
    update_first: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In either order of the nodes' sums (the CPU's, or CUDA's: the update first and the
    frozen product added in the matmul's epilogue), on any device."""
    monkeypatch.setattr(fused_nodes, "update_first", lambda t: update_first)
    new_empty = torch.Tensor.new_empty

    def nan_filled(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = new_empty(self, *args, **kwargs)  # type: ignore[arg-type]
        return out.fill_(float("nan")) if out.is_floating_point() else out

    # an output written before the frozen product is added reads no uninitialised memory
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled)
    base = nn.Linear(*shape, bias=bias).double()
    layer = MoRALinear(base, AdapterConfig(rank=4, **options)).double()
    randomize_adapters(layer)
    adapter = layer.adapters["default"]
    x = torch.randn(3, 5, shape[0], dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, shape[1], dtype=torch.float64)
    params = [p for p in adapter.parameters() if p.requires_grad]

    out = layer(x)
    if options.get("compression") != "truncation":  # truncation has no node of its own
        assert "Linear" in type(out.grad_fn).__name__  # the fused node, not autograd's add
    grads = torch.autograd.grad(out, [x, *params], g)
    ref = base(x) + x @ adapter.delta_weight(layer.weight).T  # plain autograd, dense update
    ref_grads = torch.autograd.grad(ref, [x, *params], g)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "node"),
    [
        ({"kind": "lora"}, "_LoRALinearBackward"),
        ({"kind": "dora"}, "_DoRALinearBackward"),
        ({"kind": "mora"}, "_MoRASharingLinearBackward"),
        ({"kind": "mora", "compression": "rotation"}, "_MoRARotationLinearBackward"),
    ],
)
def test_fused_path_is_used_and_keeps_autocast_dtype(options: dict, node: str) -> None:
    layer = MoRALinear(nn.Linear(16, 8), AdapterConfig(rank=2, **options))
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert type(out.grad_fn).__name__ == node
    out.float().sum().backward()
    for p in layer.adapters["default"].parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "lora"},
        {"kind": "dora"},
        {"kind": "mora", "compression": "rotation"},
        {"kind": "vera"},
    ],
    ids=["lora", "dora", "mora-rotation", "vera"],
)
def test_every_kind_keeps_the_autocast_dtype_with_a_bias(options: dict) -> None:
    layer = MoRALinear(nn.Linear(16, 8), AdapterConfig(rank=2, **options))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize(("rows", "want"), [((128, 16), 144), ((128, 20), 152), ((10, 0), 16)])
def test_stacked_rows_pad_to_aligned_rows_with_zeros(rows: tuple[int, int], want: int) -> None:
    """The fused nodes' ``[A; R]``: the blocks stacked in the compute dtype, then zero rows
    up to a multiple of 8 (16-byte rows in half precision)."""
    from moracl.adapters.fused import ALIGN, aligned_size, stacked_rows

    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 6, generator=gen) for n in rows]
    out = stacked_rows(parts, torch.float64)
    assert out.shape == (want, 6) and out.dtype == torch.float64 and want % ALIGN == 0
    assert aligned_size(sum(rows)) == want
    torch.testing.assert_close(out[: sum(rows)], torch.cat(parts).double(), rtol=0, atol=0)
    assert not out[sum(rows) :].any()


@pytest.mark.parametrize("s", [1.0, 0.375, 2.0])
def test_scaled_down_is_the_scaled_product_and_ignores_its_placeholder(s: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 20, generator=gen, dtype=torch.float64)
    a = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fused_nodes.scaled_down(x, a, s), s * (x @ a.t()))


def test_product_in_gives_the_gradient_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    m1 = torch.randn(16, 40, generator=gen).to(torch.bfloat16)
    m2 = torch.randn(40, 8, generator=gen).to(torch.bfloat16)
    out = fused_nodes.product_in(m1, m2, torch.float32)  # the CPU: the product, then a cast
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (m1 @ m2).float(), rtol=0, atol=0)
    assert fused_nodes.product_in(m1, m2, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_product_in_on_cuda_gives_the_float32_accumulator_not_a_rounded_product() -> None:
    gen = torch.Generator().manual_seed(0)
    m1 = torch.randn(64, 4096, generator=gen).to("cuda", torch.bfloat16)
    m2 = torch.randn(4096, 16, generator=gen).to("cuda", torch.bfloat16)
    exact = m1.double() @ m2.double()  # (64, 16), entries of order 64
    out = fused_nodes.product_in(m1, m2, torch.float32)
    assert out.dtype == torch.float32
    err = (out.double() - exact).abs().max().item()
    rounded = ((m1 @ m2).double() - exact).abs().max().item()  # bf16 spacing at 64: 0.5
    assert err < 1e-2 < rounded, (err, rounded)
