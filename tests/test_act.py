"""Adaptive computation time against a per-token reference loop (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moracl.experts.act import AdaptiveComputation


def _act(max_steps: int, **kw: float) -> AdaptiveComputation:
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).double()
    act = AdaptiveComputation(block, features=6, max_steps=max_steps, **kw).double()
    with torch.no_grad():
        act.act_halt.weight.normal_(0, 1.0)
        act.act_halt.bias.fill_(-0.5)
    return act


def _reference(act: AdaptiveComputation, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Graves' definition, one token at a time: outputs and N + R."""
    outs, ponder = [], []
    for token in x:
        s, total, acc = token, 0.0, torch.zeros_like(token)
        for k in range(act.max_steps):
            s = act.block(s)
            h = 1.0 if k == act.max_steps - 1 else torch.sigmoid(act.act_halt(s)).item()
            if total + h > 1 - act.epsilon:
                acc = acc + (1 - total) * s
                ponder.append(k + 1 + (1 - total))
                break
            acc, total = acc + h * s, total + h
        outs.append(acc)
    return torch.stack(outs), torch.tensor(ponder, dtype=x.dtype)


@pytest.mark.parametrize("max_steps", [1, 2, 5])
def test_act_matches_the_definition(max_steps: int) -> None:
    act = _act(max_steps, tau=0.1).train()
    x = torch.randn(9, 6, dtype=torch.float64)
    res = act(x)
    ref_out, ref_ponder = _reference(act, x)
    torch.testing.assert_close(res.output, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.steps + res.remainders, ref_ponder, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.ponder_cost, 0.1 * ref_ponder.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.weights.sum(0), torch.ones(9, dtype=torch.float64))
    assert res.weights.shape == (max_steps, 9) and (res.weights >= 0).all()


def test_one_forced_step_is_the_block() -> None:
    act = _act(1)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(act(x).output, act.block(x), rtol=0, atol=0)
    assert torch.equal(act(x).steps, torch.ones(4, 3, dtype=torch.float64))


def test_early_exit_at_inference_equals_the_fixed_form() -> None:
    act = _act(6)
    with torch.no_grad():
        act.act_halt.bias.fill_(3.0)  # most tokens halt after one or two steps
    x = torch.randn(5, 6, dtype=torch.float64)
    fixed = act.train()(x)
    early = act.eval()(x)
    assert early.weights.shape[0] < fixed.weights.shape[0]
    torch.testing.assert_close(early.output, fixed.output, rtol=0, atol=1e-12)
    torch.testing.assert_close(early.ponder_cost, fixed.ponder_cost, rtol=0, atol=1e-12)


def test_trains_under_vmap_and_gradients_reach_the_halting_unit() -> None:
    act = _act(3).train()
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    out = torch.func.vmap(lambda t: act(t).output)(x)
    torch.testing.assert_close(out, act(x).output, rtol=0, atol=1e-12)
    res = act(x)
    (res.output.sum() + res.ponder_cost).backward()
    assert act.act_halt.weight.grad is not None and act.act_halt.weight.grad.abs().sum() > 0


def test_state_dict_keeps_the_block_keys() -> None:
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    act = AdaptiveComputation(block, features=6, max_steps=2)
    keys = set(act.state_dict())
    assert keys == set(block.state_dict()) | {"act_halt.weight", "act_halt.bias"}
    other = AdaptiveComputation(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), features=6, max_steps=2)
    other.load_state_dict(act.state_dict())
    assert torch.equal(other.block[0].weight, block[0].weight)
    with pytest.raises(ValueError, match="max_steps must be an integer >= 1, got 0"):
        AdaptiveComputation(block, features=6, max_steps=0)
