"""DER++: the buffer holds the logits the model gave each row when it was stored and replays
them unchanged, masked columns never enter the loss, the loss is CE + alpha * MSE + beta * CE
computed by hand, reservoir sampling is algorithm R, and runs resume exactly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("avalanche")

from avalanche.core import SupervisedPlugin

from moracl import AdapterConfig, MoRAModel
from moracl.continual.derpp import DERBuffer, DERPlusPlusPlugin, masked_logit_mse
from moracl.continual.model import ContinualClassifier
from moracl.continual.stateful import PluginState, StatefulPlugin
from moracl.continual.strategy import FastTemplate
from tests.offline_data import needs_fashion_mnist

CLASSES = [[0, 1], [2, 3], [4, 5]]


def _stream(multi_head: bool = False) -> list[Any]:
    from moracl_scenarios.streams import tensor_benchmark

    g = torch.Generator().manual_seed(0)

    def part(classes: list[int], n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(classes).repeat(n // 2)
        return torch.randn(n, 6, generator=g, dtype=torch.float64) + y[:, None], y

    tasks = [0, 1, 2] if multi_head else None
    bench = tensor_benchmark(
        [part(c) for c in CLASSES], [part(c, 4) for c in CLASSES], task_labels=tasks
    )
    return list(bench.train_stream)


def _strategy(plugins: list[Any], multi_head: bool = False) -> FastTemplate:
    """float64: a frozen MLP with LoRA on both layers, then heads; SGD."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False)
    encoder = MoRAModel(base, AdapterConfig(kind="lora", rank=2), target_modules=["0", "2"])
    model = ContinualClassifier(encoder, 5, CLASSES, multi_head=multi_head).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    return FastTemplate(
        model=model,
        optimizer_factory=lambda m: torch.optim.SGD(
            [p for p in m.parameters() if p.requires_grad], lr=0.05
        ),
        train_mb_size=8,
        train_epochs=1,
        plugins=plugins,
        loader_seed=1,
    )


class _Snapshots(SupervisedPlugin):
    """Records each step's rows and what a copy of the model before the step gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        before = copy.deepcopy(strategy.model)
        with torch.no_grad():
            out = before(strategy.mb_x, strategy.mb_task_id)
        self.rows.extend(zip(strategy.mb_x.clone(), out))

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = [o for r, o in self.rows if torch.equal(r, x)]  # each row offered once
        return out


@pytest.mark.parametrize("multi_head", [False, True], ids=["shared-head", "multi-head"])
def test_the_buffer_holds_the_logits_given_at_insertion_and_keeps_them(multi_head: bool) -> None:
    exps = _stream(multi_head)
    derpp, snaps = DERPlusPlusPlugin(10, seed=3), _Snapshots()
    strategy = _strategy([snaps, derpp], multi_head)
    lowest = torch.finfo(torch.float64).min
    held: dict[int, dict[str, torch.Tensor]] = {}
    for i in (0, 1):
        torch.manual_seed(i)
        strategy.train(exps[i])
        buf = derpp.buffer
        assert len(buf) == 10 and buf.seen == 24 * (i + 1)
        held[i] = {k: v.clone() for k, v in buf.tensors.items()}
        for r in range(10):
            x, z, valid = buf.tensors["x"][r], buf.tensors["logits"][r], buf.tensors["valid"][r]
            out = snaps.logits_of(x)
            assert torch.equal(valid, out > lowest)  # the columns the model predicted then
            assert torch.equal(z[valid], out[valid]) and not z[~valid].any()
    # experience 0's rows still held after experience 1: the same logits, over its classes only
    first = {tuple(x.tolist()): r for r, x in enumerate(held[0]["x"])}
    kept = [(first[tuple(x.tolist())], r) for r, x in enumerate(held[1]["x"])
            if tuple(x.tolist()) in first]  # fmt: skip
    assert 0 < len(kept) < 10  # some survived, some were replaced by experience 1's rows
    for a, b in kept:
        for k in ("logits", "valid", "y", "t"):
            assert torch.equal(held[0][k][a], held[1][k][b]), k
        assert held[1]["valid"][b].nonzero().flatten().tolist() == [0, 1]


class _Recorded(DERPlusPlusPlugin):
    """DER++ keeping each step's penalty (float64 here) and its generator's state before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.penalties: list[torch.Tensor | None] = []
        self.states: list[torch.Tensor] = []

    def penalty(self, strategy: Any) -> torch.Tensor | None:
        self.states.append(self.generator.get_state())
        value = super().penalty(strategy)
        self.penalties.append(value)
        return value


class _ExpectedLoss(SupervisedPlugin):
    """After DER++'s ``before_backward``: the step's loss by hand, from the buffer and a copy
    of DER++'s generator taken before the step."""

    def __init__(self, derpp: _Recorded, alpha: float, beta: float) -> None:
        super().__init__()
        self.derpp, self.alpha, self.beta = derpp, alpha, beta
        self.steps: list[tuple[float, float, torch.Tensor | None, torch.Tensor | None]] = []

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        buf, model = self.derpp.buffer, strategy.model
        expected = None
        with torch.no_grad():
            ce = F.cross_entropy(model(strategy.mb_x, strategy.mb_task_id), strategy.mb_y)
            if len(buf):
                g = torch.Generator().set_state(self.derpp.states[-1])
                n = strategy.train_mb_size
                one = torch.randperm(len(buf), generator=g)[:n]
                two = torch.randperm(len(buf), generator=g)[:n]
                t = buf.tensors
                out = model(t["x"][one], t["t"][one])
                valid = t["valid"][one]
                mse = F.mse_loss(out[valid], t["logits"][one][valid])
                out = model(t["x"][two], t["t"][two])
                expected = self.alpha * mse + self.beta * F.cross_entropy(out, t["y"][two])
        total = ce + (expected if expected is not None else 0.0)
        got = self.derpp.penalties[-1]
        self.steps.append((float(strategy.loss.detach()), float(total), got, expected))


def test_the_loss_is_ce_plus_alpha_mse_plus_beta_ce_by_hand() -> None:
    exps = _stream()
    derpp = _Recorded(10, alpha=0.3, beta=0.7, seed=1)
    check = _ExpectedLoss(derpp, 0.3, 0.7)
    strategy = _strategy([derpp, check])
    for i in (0, 1):
        torch.manual_seed(i)
        strategy.train(exps[i])
    assert len(check.steps) == 6  # 3 steps per experience
    for n, (loss, total, got, expected) in enumerate(check.steps):
        # Avalanche accumulates the step's loss in a float32 zero
        assert abs(loss - total) <= 1e-6 * max(1.0, abs(total))
        if n < 3:  # experience 0's first step has an empty buffer; later steps replay
            assert (got is None) == (n == 0)
        if n >= 3 or got is not None:
            assert got is not None and expected is not None and got.dtype == torch.float64
            assert abs(got.item() - expected.item()) <= 1e-12 * max(1.0, abs(expected.item()))
            assert got.item() > 0


def test_masked_columns_never_enter_the_logit_loss() -> None:
    lowest = torch.finfo(torch.float32).min
    stored = torch.tensor([[1.0, -2.0, lowest, lowest], [0.5, 3.0, lowest, lowest]])
    valid = stored > lowest
    target = torch.where(valid, stored, 0.0)
    # the model predicts classes 2 and 3 now; a plain MSE against the stored row overflows
    out = torch.tensor([[1.5, -1.0, 4.0, -3.0], [0.0, 2.0, 1.0, 2.0]], requires_grad=True)
    assert not torch.isfinite(F.mse_loss(out, stored))
    loss = masked_logit_mse(out, target, valid)
    expected = F.mse_loss(out.detach()[valid], stored[valid])
    assert torch.isfinite(loss) and torch.allclose(loss, expected, rtol=0, atol=1e-7)
    loss.backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()
    assert not out.grad[~valid].any()
    # a column masked in the output too (lowest there) adds neither value nor gradient
    masked_out = out.detach().masked_fill(~valid, lowest).requires_grad_(True)
    again = masked_logit_mse(masked_out, target, valid)
    again.backward()
    assert torch.equal(again, loss.detach()) and masked_out.grad is not None
    assert torch.isfinite(masked_out.grad).all()


def _plain_reservoir(ids: list[int], size: int, g: torch.Generator) -> list[int]:
    held: list[int] = []
    for n, i in enumerate(ids):
        if n < size:
            held.append(i)
        else:
            j = int(torch.randint(n + 1, (1,), generator=g))
            if j < size:
                held[j] = i
    return held


def _offer(buffer: DERBuffer, ids: list[int], batches: list[int], g: torch.Generator) -> None:
    start = 0
    for b in batches:
        x = torch.tensor(ids[start : start + b], dtype=torch.float64)[:, None]  # (b, 1)
        y = torch.zeros(b, dtype=torch.long)
        buffer.add(x, y, torch.zeros(b, 3), y, g)
        start += b


def test_reservoir_sampling_is_algorithm_r_and_keeps_each_row_with_size_over_n() -> None:
    ids = list(range(100, 126))  # 26 rows in batches of several sizes
    batches = [5, 3, 8, 1, 9]
    for seed in range(20):
        buffer = DERBuffer(7)
        _offer(buffer, ids, batches, torch.Generator().manual_seed(seed))
        expected = _plain_reservoir(ids, 7, torch.Generator().manual_seed(seed))
        assert buffer.tensors["x"][:, 0].long().tolist() == expected
        assert buffer.seen == 26 and len(buffer) == 7
    # each row is held with probability 7 / 26 (seeded draws: a fixed outcome)
    trials, counts = 3000, torch.zeros(26)
    for seed in range(trials):
        held = _plain_reservoir(list(range(26)), 7, torch.Generator().manual_seed(seed))
        counts[held] += 1
    p = 7 / 26
    sd = (p * (1 - p) / trials) ** 0.5
    assert ((counts / trials - p).abs() < 5 * sd).all()


def test_a_strategy_restored_from_the_buffer_state_trains_on_exactly() -> None:
    exps = _stream()
    original = _strategy([DERPlusPlusPlugin(10, seed=4)])
    for i in (0, 1):
        torch.manual_seed(10 + i)
        original.train(exps[i])
    (plugin,) = [p for p in original.plugins if isinstance(p, StatefulPlugin)]
    state = plugin.state_dict()
    assert sorted(state.tensors) == ["logits", "t", "valid", "x", "y"]
    assert state.values == {"seen": 48, "filled": 10}
    restored = _strategy([DERPlusPlusPlugin(10, seed=4)])
    restored.model.load_state_dict(original.model.state_dict())
    (again,) = [p for p in restored.plugins if isinstance(p, StatefulPlugin)]
    again.load_state_dict(
        PluginState({k: v.clone() for k, v in state.tensors.items()}, dict(state.values)),
        strategy=restored,
        trained=exps[:2],
    )
    for s in (original, restored):
        torch.manual_seed(12)
        s.train(exps[2])
    for (name, a), (_, b) in zip(
        original.model.state_dict().items(), restored.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    after = [p.state_dict() for p in (plugin, again)]
    assert after[0].values == after[1].values
    assert all(torch.equal(after[0].tensors[k], after[1].tensors[k]) for k in after[0].tensors)


def test_bad_settings_and_states_are_refused() -> None:
    from moracl.config import from_dict
    from moracl.continual.config import RunConfig

    with pytest.raises(ValueError, match=r"DER\+\+ buffer size=0; expected an integer > 0"):
        DERPlusPlusPlugin(0)
    with pytest.raises(ValueError, match=r"DER\+\+ alpha=-1.0; expected a number >= 0"):
        DERPlusPlusPlugin(5, alpha=-1.0)
    with pytest.raises(ValueError, match=r"baselines.derpp_beta"):
        from_dict(RunConfig, {"strategies": ["derpp"], "baselines": {"derpp_beta": -0.5}})
    strategy = _strategy([])
    with pytest.raises(ValueError, match=r"derpp.filled=3; expected min\(seen, size\) = 5"):
        DERPlusPlusPlugin(5).load_state_dict(
            PluginState(values={"seen": 9, "filled": 3}), strategy=strategy, trained=[]
        )
    with pytest.raises(ValueError, match=r"derpp state tensors \['x'\]"):
        DERPlusPlusPlugin(5).load_state_dict(
            PluginState({"x": torch.zeros(2, 1)}, {"seen": 2, "filled": 2}),
            strategy=strategy,
            trained=[],
        )


def _run_config(out: Path) -> Any:
    from moracl.config import from_dict
    from moracl.continual.config import RunConfig

    data = {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": "class",
            "options": {"per_class": 20, "test_per_class": 10},
        },
        "strategies": ["derpp"],
        "baselines": {"replay_size": 20},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "head_lr": 1e-2},
        "output_dir": str(out),
    }
    return from_dict(RunConfig, data)


@needs_fashion_mnist
@pytest.mark.slow
def test_a_derpp_run_interrupted_after_experience_1_resumes_exactly(tmp_path: Path) -> None:
    from moracl.continual.checkpoint import load_checkpoint, tensors_equal
    from moracl.jobs.continual import run as run_continual

    full = run_continual(_run_config(tmp_path / "full"), progress=False)
    out = tmp_path / "resumed"
    run_continual(_run_config(out), progress=False, stop_after=1)
    middle = load_checkpoint(out).tensors["derpp"]
    assert middle["plugins.derpp.x"].shape[0] == 20  # the buffer is checkpointed
    resumed = run_continual(_run_config(out), progress=False, resume=True)
    assert resumed.strategies["derpp"].matrix == full.strategies["derpp"].matrix
    a, b = load_checkpoint(tmp_path / "full").tensors, load_checkpoint(out).tensors
    assert tensors_equal(a["derpp"], b["derpp"])
