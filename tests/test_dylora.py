"""DyLoRA: every truncation is a LoRA of the leading rows and columns; seeded, resumable
draws; the frozen (``last``) and ``all`` update rules; save, load and merge."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

from moracl import AdapterConfig, MoRALinear, MoRAModel
from moracl.adapters.dylora import DyLoRA, DyLoRAConfig, DyLoRAUpdate, draw_rank, set_rank
from moracl.adapters.fused import plain_autograd
from tests.numerics import assert_close_to_scale

from .conftest import mlp, randomize_adapters

R = 6
SHAPES = [(10, 7), (7, 10), (3, 12)]


def _dylora_layer(shape: tuple[int, int], **options: object) -> MoRALinear:
    base = nn.Linear(*shape).double()
    layer = MoRALinear(base, AdapterConfig(kind="dylora", rank=R, alpha=3.0, **options)).double()
    randomize_adapters(layer)
    return layer


def _lora_of_leading(layer: MoRALinear, b: int) -> MoRALinear:
    """A rank-``b`` LoRA on the same base made of the first ``b`` rows of A / columns of B
    (an rsLoRA when the DyLoRA scales by ``alpha / sqrt(b)``)."""
    dy = layer.adapters["default"]
    cfg = dy.config
    alpha = 3.0  # a fixed scale is the full rank's: alpha·b/r (alpha·sqrt(b/r) for rsLoRA)
    if cfg.fixed_scale:
        alpha *= (b / R) ** 0.5 if cfg.rslora else b / R
    config = AdapterConfig(kind="lora", rank=b, alpha=alpha, rslora=cfg.rslora)
    lora = MoRALinear(layer.base_layer, config).double()
    with torch.no_grad():
        lora.adapters["default"].lora_A.copy_(dy.lora_A[:b])
        lora.adapters["default"].lora_B.copy_(dy.lora_B[:, :b])
    return lora


SCALES = [(False, False), (True, False), (False, True), (True, True)]
SCALE_IDS = ["alpha/b", "alpha/sqrt(b)", "alpha/r", "alpha/sqrt(r)"]


@pytest.mark.parametrize(("rslora", "fixed"), SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_each_truncation_equals_a_lora_of_the_leading_rows(
    shape: tuple[int, int], rslora: bool, fixed: bool
) -> None:
    layer = _dylora_layer(shape, rslora=rslora, fixed_scale=fixed).eval()
    dy = layer.adapters["default"]
    x = torch.randn(4, 5, shape[0], dtype=torch.float64)
    for b in range(1, R + 1):
        dy.set_rank(b)
        lora = _lora_of_leading(layer, b).eval()
        ref = lora.adapters["default"]
        kept = R if fixed else b  # the rank whose factor scales the update
        assert ref.scaling == pytest.approx(3.0 / kept**0.5 if rslora else 3.0 / kept, rel=1e-15)
        torch.testing.assert_close(layer(x), lora(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(dy.delta_weight(), ref.delta_weight(), rtol=0, atol=1e-12)
        torch.testing.assert_close(dy.delta(x), ref.delta(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("rslora", "fixed"), SCALES, ids=SCALE_IDS)
@pytest.mark.parametrize("update", ["last", "all"])
def test_a_training_call_is_the_lora_of_the_rank_it_draws(
    update: str, rslora: bool, fixed: bool
) -> None:
    layer = _dylora_layer((9, 8), update=update, rslora=rslora, fixed_scale=fixed).train()
    dy = layer.adapters["default"]
    x = torch.randn(5, 9, dtype=torch.float64)
    seen = set()
    for step in range(12):
        b = dy.next_rank()
        seen.add(b)
        out = layer(x)
        assert int(dy.draws) == step + 1
        torch.testing.assert_close(out, _lora_of_leading(layer, b)(x), rtol=0, atol=1e-12)
    assert len(seen) > 2  # the draws really vary


@pytest.mark.parametrize("update", list(DyLoRAUpdate))
def test_the_update_rule_decides_which_rows_get_a_gradient(update: DyLoRAUpdate) -> None:
    layer = _dylora_layer((9, 8), update=update.value).train()
    dy = layer.adapters["default"]
    x = torch.randn(5, 9, dtype=torch.float64)
    for _ in range(8):
        b = dy.next_rank()
        dy.zero_grad()
        layer(x).square().sum().backward()
        assert dy.lora_A.grad is not None and dy.lora_B.grad is not None
        rows_a = dy.lora_A.grad.abs().sum(1) > 0  # (r,)
        cols_b = dy.lora_B.grad.abs().sum(0) > 0  # (r,)
        first = b - 1 if update is DyLoRAUpdate.LAST else 0
        expected = torch.zeros(R, dtype=torch.bool)
        expected[first:b] = True
        assert torch.equal(rows_a, expected) and torch.equal(cols_b, expected)
        # and the gradient that flows is the rank-b LoRA's
        lora = _lora_of_leading(layer, b)
        lora(x).square().sum().backward()
        ref = lora.adapters["default"]
        assert ref.lora_A.grad is not None and ref.lora_B.grad is not None
        torch.testing.assert_close(
            dy.lora_A.grad[b - 1], ref.lora_A.grad[b - 1], atol=1e-12, rtol=0
        )
        torch.testing.assert_close(
            dy.lora_B.grad[:, b - 1], ref.lora_B.grad[:, b - 1], atol=1e-12, rtol=0
        )


def test_every_rank_gives_finite_outputs() -> None:
    model = MoRAModel(mlp(), AdapterConfig(kind="dylora", rank=R, min_rank=2))
    randomize_adapters(model, scale=3.0)
    x = torch.randn(16, 24)
    model.train()
    for _ in range(10):
        assert torch.isfinite(model(x)).all()
    model.eval()
    outs = []
    for b in range(1, R + 1):
        set_rank(model, b)
        outs.append(model(x))
        assert torch.isfinite(outs[-1]).all()
    assert all(not torch.allclose(p, q) for p, q in pairwise(outs))  # each rank differs


def test_draws_cover_the_range_uniformly_and_depend_on_the_seed() -> None:
    draws = torch.arange(40_000)
    counts = torch.bincount(draw_rank(0, draws, 3, 8), minlength=9)[3:]
    assert counts.min() > 0.95 * 40_000 / 6 and counts.max() < 1.05 * 40_000 / 6
    assert int(draw_rank(0, draws, 3, 8).min()) == 3 and int(draw_rank(0, draws, 3, 8).max()) == 8
    assert not torch.equal(draw_rank(0, draws[:50], 1, 8), draw_rank(1, draws[:50], 1, 8))


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_a_full_rank_share_draws_the_full_rank_that_often_and_the_rest_uniformly(
    share: float,
) -> None:
    """``full_rank_share``: the full rank with probability ``share``, else the uniform draw;
    the draws it leaves uniform are the uniform sampler's own (a share of 0 changes none)."""
    draws = torch.arange(60_000)
    uniform = draw_rank(0, draws, 3, 8)
    mixed = draw_rank(0, draws, 3, 8, share)
    changed = mixed != uniform
    assert torch.equal(mixed[changed], torch.full_like(mixed[changed], 8))
    full = float((mixed == 8).double().mean())
    assert abs(full - (share + (1 - share) / 6)) < 0.01  # drawn, or the uniform draw's 8
    counts = torch.bincount(mixed, minlength=9)[3:8]  # 3..7: each (1 - share) / 6
    want = 60_000 * (1 - share) / 6
    assert counts.min() > 0.94 * want and counts.max() < 1.06 * want
    assert torch.equal(draw_rank(0, draws, 3, 8, 0.0), uniform)
    layer = DyLoRA(5, 4, DyLoRAConfig(rank=4, full_rank_share=share))
    x = torch.randn(2, 5)
    ranks = _sequence(layer, x, 400)
    assert ranks == draw_rank(0, torch.arange(400), 1, 4, share).tolist()


def _sequence(adapter: DyLoRA, x: torch.Tensor, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(adapter.next_rank())
        adapter.delta(x)  # a training call: draws
    return out


def test_draws_are_seeded_and_resume_exactly_from_the_state_dict() -> None:
    x = torch.randn(3, 10)
    cfg = DyLoRAConfig(rank=8, seed=5)
    one, two = DyLoRA(10, 6, cfg).train(), DyLoRA(10, 6, cfg).train()
    assert _sequence(one, x, 20) == _sequence(two, x, 20)  # same seed, same draws
    other = DyLoRA(10, 6, cfg.replace(seed=6)).train()
    assert _sequence(other, x, 20) != _sequence(DyLoRA(10, 6, cfg).train(), x, 20)

    saved = one.state_dict()
    assert int(saved["draws"]) == 20
    resumed = DyLoRA(10, 6, cfg).train()
    resumed.load_state_dict(saved)
    assert _sequence(resumed, x, 15) == _sequence(one, x, 15)  # continues where it stopped


def test_all_layers_draw_the_same_rank_at_each_step() -> None:
    model = MoRAModel(mlp(), AdapterConfig(kind="dylora", rank=R, seed=3)).train()
    adapters = [m for m in model.modules() if isinstance(m, DyLoRA)]
    assert len(adapters) == 2
    for _ in range(6):
        assert len({a.next_rank() for a in adapters}) == 1
        model(torch.randn(4, 24)).sum().backward()


def test_set_rank_over_a_model_and_its_errors() -> None:
    model = MoRAModel(mlp(), AdapterConfig(kind="dylora", rank=R))
    assert set_rank(model, 2) == 2
    assert all(m.eval_rank == 2 for m in model.modules() if isinstance(m, DyLoRA))
    for bad in (0, R + 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"integer in \[1, {R}\], got {bad!r}"):
            set_rank(model, bad)  # type: ignore[arg-type]
    assert all(m.eval_rank == 2 for m in model.modules() if isinstance(m, DyLoRA))
    with pytest.raises(ValueError, match="no DyLoRA adapter"):
        set_rank(MoRAModel(mlp(), AdapterConfig(kind="lora")), 1)
    model.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        set_rank(model, 3)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="min_rank must be in \\[1, 4\\], got 5"):
        AdapterConfig(kind="dylora", rank=4, min_rank=5)
    with pytest.raises(ValueError, match="unknown DyLoRA update 'some'"):
        AdapterConfig(kind="dylora", update="some")
    with pytest.raises(ValueError, match="rslora must be true or false, got 'yes'"):
        AdapterConfig(kind="dylora", rslora="yes")
    cfg = AdapterConfig.from_dict(
        {"kind": "dylora", "rank": 4, "update": "all", "seed": 2, "rslora": True}
    )
    assert isinstance(cfg, DyLoRAConfig) and cfg.update is DyLoRAUpdate.ALL and cfg.rslora
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert DyLoRAConfig().update is DyLoRAUpdate.LAST
    with pytest.raises(
        ValueError, match=r"full_rank_share must be a finite number in \[0, 1\), got 1"
    ):
        AdapterConfig(kind="dylora", full_rank_share=1)


def test_save_load_and_merge_round_trip(tmp_path: Path) -> None:
    net = mlp()
    model = MoRAModel(net, AdapterConfig(kind="dylora", rank=R, min_rank=2))
    randomize_adapters(model)
    model.train()
    for _ in range(3):  # advance the sampler
        model(torch.randn(4, 24)).sum().backward()
    model.eval()
    set_rank(model, 3)
    x = torch.randn(8, 24)
    expected = model(x)
    model.merge()
    assert_close_to_scale(model(x), expected, 1e-5)  # merged: float32 rounding
    model.unmerge()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    loaded = MoRAModel.from_pretrained(net, tmp_path).eval()
    state = loaded.adapter_state_dict()
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(state[key], value), key
    assert all(int(m.draws) == 3 for m in loaded.modules() if isinstance(m, DyLoRA))
    set_rank(loaded, 3)  # the evaluation rank is a choice at use, not saved
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_a_call_without_gradients_uses_the_evaluation_rank_and_draws_nothing() -> None:
    layer = _dylora_layer((9, 8)).train()
    dy = layer.adapters["default"]
    dy.set_rank(2)
    x = torch.randn(5, 9, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    assert int(dy.draws) == 0
    torch.testing.assert_close(out, _lora_of_leading(layer, 2)(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("update", ["last", "all"])
def test_a_training_step_runs_in_the_fused_node_and_equals_plain_autograd(update: str) -> None:
    layer = _dylora_layer((9, 8), update=update).train()
    dy = layer.adapters["default"]
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 8, dtype=torch.float64)
    inputs = [x, dy.lora_A, dy.lora_B]
    for _ in range(6):
        draws = dy.draws.clone()
        out = layer(x)
        assert type(out.grad_fn).__name__ == "_LoRALinearBackward"
        got = torch.autograd.grad(out, inputs, g)
        dy.draws.copy_(draws)  # the same rank again, through plain autograd
        with plain_autograd():
            ref = layer(x)
        assert type(ref.grad_fn).__name__ != "_LoRALinearBackward"
        want = torch.autograd.grad(ref, inputs, g)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("full_share", "rslora", "fixed"),
    [(0.0, False, None), (0.0, True, None), (0.3, False, None), (0.0, False, 0.75)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_compiled_rank_draw_on_cuda_equals_the_plain_one_bitwise(
    full_share: float, rslora: bool, fixed: float | None, dtype: torch.dtype
) -> None:
    """On CUDA a training call draws its rank and scales through one compiled kernel; every
    draw gives the same rank, scales and last channel as the plain operations on the CPU."""
    from moracl.adapters.dylora.module import _channels_for, rank_channels

    fast = _channels_for(torch.device("cuda"))
    assert fast is not rank_channels  # compiled
    for draw in range(300):
        args = (dtype, 11, 2, 8, full_share, 4.0, rslora, fixed)
        got = fast(torch.tensor(draw, device="cuda"), *args)
        want = rank_channels(torch.tensor(draw), *args)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        b = int(draw_rank(11, torch.tensor(draw), 2, 8, full_share))
        assert int(want[1].nonzero()) == b - 1 and int((want[0] != 0).sum()) == b
