"""Adapter kinds: exact updates, merging, MoRA's operators against the paper's definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moracl import AdapterConfig, MoRALinear
from moracl.adapters import ADAPTERS, Compression, square_size
from moracl.adapters.mora.module import MoRA
from moracl.adapters.mora.operators import Rotation
from tests.numerics import assert_close_to_scale

from .conftest import randomize_adapters

KINDS = [
    {"kind": "lora"},
    {"kind": "lora", "rslora": True, "alpha": 4.0},
    {"kind": "dora"},
    {"kind": "mora", "compression": "sharing"},
    {"kind": "mora", "compression": "rotation"},
    {"kind": "mora", "compression": "truncation"},
    {"kind": "vera"},
    {"kind": "adalora", "target_rank": 2},
    {"kind": "dylora", "min_rank": 4},  # min_rank = rank: training draws no other truncation
    {"kind": "delta_lora"},
]
SHAPES = [(24, 40), (40, 24), (6, 50), (50, 6), (32, 32)]  # includes d_in < r̂


def test_every_registered_kind_is_in_the_table() -> None:
    assert {k["kind"] for k in KINDS} == set(ADAPTERS.names())


def _layer(d_in: int, d_out: int, options: dict, dtype: torch.dtype, rank: int = 4) -> MoRALinear:
    base = nn.Linear(d_in, d_out).to(dtype)
    layer = MoRALinear(base, AdapterConfig(rank=rank, **options)).to(dtype)
    randomize_adapters(layer)
    return layer


@pytest.mark.parametrize("options", KINDS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_delta_equals_dense_update_in_float64(options: dict, shape: tuple[int, int]) -> None:
    layer = _layer(*shape, options, torch.float64)
    adapter = layer.adapters["default"]
    x = torch.randn(3, 5, shape[0], dtype=torch.float64)
    w = layer.weight
    dw = adapter.delta_weight(w)
    assert dw.shape == (shape[1], shape[0])
    assert dw.abs().max() > 1e-3  # the update is really non-zero
    torch.testing.assert_close(adapter.delta(x, weight=w), x @ dw.T, rtol=0, atol=1e-10)
    # the layer's fused forward gives the same update
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias) + x @ dw.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("options", KINDS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_merge_matches_unmerged_and_unmerge_restores(options: dict, shape: tuple[int, int]) -> None:
    layer = _layer(*shape, options, torch.float32)
    x = torch.randn(7, shape[0])
    w0 = layer.base_layer.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert_close_to_scale(layer(x), before, 1e-5)  # merged: float32 rounding
    assert not torch.equal(layer.base_layer.weight, w0)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_adapted_layer_starts_unchanged() -> None:
    for options in KINDS:
        base = nn.Linear(20, 30)
        layer = MoRALinear(base, AdapterConfig(rank=4, **options))
        x = torch.randn(4, 20)
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)


# -- MoRA -------------------------------------------------------------------------------


def _mora(d_in: int, d_out: int, rank: int, compression: str) -> MoRA:
    m = MoRA(d_in, d_out, AdapterConfig(kind="mora", rank=rank, compression=compression)).double()
    with torch.no_grad():
        m.M.copy_(torch.randn_like(m.M))
    return m


def test_square_size_follows_the_paper() -> None:
    assert square_size(4096, 4096, 8, Compression.SHARING) == math.isqrt(8192 * 8) == 256
    assert square_size(2048, 5632, 16, Compression.SHARING) == 350
    assert square_size(2048, 5632, 16, Compression.ROTATION) == 350
    assert square_size(100, 23, 3, Compression.ROTATION) == 18  # 19 rounded down to even


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96), (300, 200)])
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_mora_parameter_count_matches_lora(shape: tuple[int, int], rank: int) -> None:
    for comp in Compression:
        m = _mora(*shape, rank, comp.value)
        lora_count = (shape[0] + shape[1]) * rank
        step = 2 if comp is Compression.ROTATION else 1  # r̂ is rounded down (to even)
        assert m.num_parameters() <= lora_count < (m.r_hat + step) ** 2


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96), (130, 70)])
def test_mora_sharing_rank_is_r_hat(shape: tuple[int, int]) -> None:
    m = _mora(*shape, 4, "sharing")
    assert m.r_hat <= min(shape)
    assert torch.linalg.matrix_rank(m.delta_weight()).item() == m.r_hat


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96), (130, 70), (10, 90)])
def test_mora_rotation_rank_is_full(shape: tuple[int, int]) -> None:
    m = _mora(*shape, 4, "rotation")
    assert torch.linalg.matrix_rank(m.delta_weight()).item() == min(shape)


def _reference_mora(x: torch.Tensor, m: torch.Tensor, d_out: int, compression: str) -> torch.Tensor:
    """The paper's operators written out plainly: pad, reshape, sum / rotate, tile / truncate."""
    r = m.shape[0]
    d_in = x.shape[-1]
    if compression == "truncation":
        xin = torch.zeros(*x.shape[:-1], r, dtype=x.dtype)
        k = min(r, d_in)
        xin[..., :k] = x[..., :k]
        y = xin @ m.T
        out = torch.zeros(*x.shape[:-1], d_out, dtype=x.dtype)
        k = min(r, d_out)
        out[..., :k] = y[..., :k]
        return out
    groups = -(-d_in // r)
    pad = torch.cat([x] * (groups * r // d_in + 1), dim=-1)[..., : groups * r]  # cyclic padding
    blocks = pad.view(*x.shape[:-1], groups, r)
    if compression == "sharing":
        y = blocks.sum(-2) @ m.T  # (..., r)
        reps = -(-d_out // r)
        return torch.cat([y] * reps, dim=-1)[..., :d_out]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    freqs = torch.outer(torch.arange(groups, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    rot_half = torch.cat([-blocks[..., r // 2 :], blocks[..., : r // 2]], dim=-1)
    rotated = blocks * emb.cos() + rot_half * emb.sin()
    y = (rotated @ m.T).flatten(-2)  # (..., g·r)
    reps = -(-d_out // y.shape[-1])
    return torch.cat([y] * reps, dim=-1)[..., :d_out]


@pytest.mark.parametrize("compression", ["sharing", "rotation", "truncation"])
@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96), (130, 70), (6, 50), (50, 6)])
def test_mora_operators_equal_the_plain_definition(
    compression: str, shape: tuple[int, int]
) -> None:
    m = _mora(*shape, 4, compression)
    x = torch.randn(2, 3, shape[0], dtype=torch.float64)
    ref = _reference_mora(x, m.M, shape[1], compression)
    torch.testing.assert_close(m.delta(x), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("shape", "skips"), [((130, 70), True), ((200, 30), True), ((50, 6), True), ((40, 96), False)]
)
def test_mora_rotation_gradients_equal_the_plain_definition(
    shape: tuple[int, int], skips: bool
) -> None:
    """Including layers with ``i > o``, whose discarded output blocks are never computed."""
    m = _mora(*shape, 4, "rotation")
    assert isinstance(m.op, Rotation) and (m.op.used < m.op.groups) == skips
    x = torch.randn(2, 3, shape[0], dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, shape[1], dtype=torch.float64)
    got = torch.autograd.grad(m.delta(x), [x, m.M], g)
    want = torch.autograd.grad(_reference_mora(x, m.M, shape[1], "rotation"), [x, m.M], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_two_mora_adapters_of_different_size_on_one_layer() -> None:
    base = nn.Linear(40, 56).double()
    layer = MoRALinear(base)
    a = layer.add_adapter("a", AdapterConfig(kind="mora", rank=2, compression="rotation"))
    b = layer.add_adapter("b", AdapterConfig(kind="mora", rank=8, compression="rotation"))
    assert a.r_hat != b.r_hat
    layer.set_active(["a", "b"])
    randomize_adapters(layer)
    x = torch.randn(5, 40, dtype=torch.float64)
    expected = base(x) + x @ a.delta_weight().T + x @ b.delta_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


# -- LoRA details -------------------------------------------------------------------------


def test_lora_scaling_and_roles() -> None:
    plain = AdapterConfig(kind="lora", rank=16, alpha=32)
    rs = AdapterConfig(kind="lora", rank=16, alpha=32, rslora=True)
    assert plain.scaling == 2.0 and rs.scaling == 8.0
    layer = MoRALinear(nn.Linear(8, 8), AdapterConfig(kind="lora", rank=2, freeze_a=True))
    lora = layer.adapters["default"]
    assert not lora.lora_A.requires_grad and lora.lora_B.requires_grad
    assert torch.count_nonzero(lora.lora_B) == 0
    assert {r.value for r in lora.param_roles().values()} == {"a", "b"}


def test_lora_dropout_only_touches_the_update() -> None:
    base = nn.Linear(16, 16)
    layer = MoRALinear(base, AdapterConfig(kind="lora", rank=4, dropout=0.5)).train()
    randomize_adapters(layer)
    x = torch.randn(200, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + layer.adapters["default"].delta(x))


def test_vera_projections_are_shared_and_frozen() -> None:
    cfg = AdapterConfig(kind="vera", rank=8, projection_seed=3)
    one = MoRALinear(nn.Linear(16, 24), cfg).adapters["default"]
    two = MoRALinear(nn.Linear(16, 24), cfg).adapters["default"]
    assert torch.equal(one.vera_A, two.vera_A) and torch.equal(one.vera_B, two.vera_B)
    assert {n for n, p in one.named_parameters()} == {"lambda_d", "lambda_b"}


def test_conv1d_layers_are_adapted_with_their_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=20, nx=12).double()
    layer = MoRALinear(conv, AdapterConfig(kind="lora", rank=3)).double()
    randomize_adapters(layer)
    x = torch.randn(4, 12, dtype=torch.float64)
    dw = layer.adapters["default"].delta_weight()
    torch.testing.assert_close(layer(x), conv(x) + x @ dw.T, rtol=0, atol=1e-12)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
