"""O-LoRA (``strategies: [olora]``): its losses against float64 hand computations, earlier
tasks' LoRAs bit-identical through later tasks, task-agnostic evaluation summing every LoRA,
a resumed run ending where an uninterrupted one ends, and its config keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("avalanche")

from moracl import AdapterConfig
from moracl.config import from_dict
from moracl.continual.checkpoint import load_checkpoint, tensors_equal
from moracl.continual.config import RunConfig
from moracl.continual.model import ContinualClassifier
from moracl.continual.olora import (
    OLoRAStrategy,
    Orthogonality,
    l2_loss,
    olora_classifier,
    olora_encoder,
    orthogonality_loss,
    task_adapter,
    task_factors,
    use_tasks,
)
from moracl.continual.strategy import quiet_evaluator
from moracl.layer import MoRALayer
from moracl.model import MoRAModel
from tests.offline_data import needs_fashion_mnist

LORA = AdapterConfig(kind="lora", rank=2, alpha=4.0)  # type: ignore[call-arg]
CLASSES = [[0, 1], [2, 3], [4, 5]]


def _base() -> nn.Module:
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    base.feature_dim = 5  # type: ignore[assignment]
    return base.requires_grad_(False)


def _layers(model: MoRAModel) -> list[MoRALayer]:
    return [layer for _, layer in model.adapted_layers()]


def _randomise(model: MoRAModel) -> None:
    """Every LoRA factor random (``B`` starts at zero), so the overlaps are not trivial."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in _layers(model):
            for adapter in layer.adapters.values():
                for p in adapter.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("task", [0, 1, 2])
def test_the_losses_equal_a_float64_hand_computation(task: int) -> None:
    torch.manual_seed(0)
    model = olora_encoder(_base(), LORA, 3, target_modules=["0", "2"])
    _randomise(model)
    frobenius = l1 = l2 = 0.0
    for layer in _layers(model):
        new_a, new_b = (f.double().tolist() for f in task_factors(layer, task))
        for i in range(task):
            old_a = task_factors(layer, i)[0].double().tolist()
            for row in old_a:  # a row of A_i
                for col in new_a:  # a row of A_t: one entry of A_i A_tᵀ
                    entry = sum(x * y for x, y in zip(row, col))
                    frobenius += entry**2
                    l1 += abs(entry)
        for factor in (new_a, new_b):
            l2 += sum(x * x for row in factor for x in row) ** 0.5
    got = orthogonality_loss(model, task)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(frobenius, rel=1e-5, abs=1e-6)
    assert orthogonality_loss(model, task, form="l1").item() == pytest.approx(l1, rel=1e-5)
    assert l2_loss(model, task).item() == pytest.approx(l2, rel=1e-5)
    if task == 0:
        assert frobenius == 0.0 and got.item() == 0.0


def test_the_orthogonality_gradient_reaches_only_the_new_a() -> None:
    torch.manual_seed(0)
    model = olora_encoder(_base(), LORA, 3, target_modules=["0", "2"])
    _randomise(model)
    use_tasks(model, 2, train_newest=True)
    orthogonality_loss(model, 1).backward()
    for layer in _layers(model):
        a0, b0 = task_factors(layer, 0)
        a1, b1 = task_factors(layer, 1)
        assert a0.grad is None and b0.grad is None and b1.grad is None
        # d/dA_1 ‖A_0 A_1ᵀ‖² = 2 A_1 A_0ᵀ A_0
        expected = 2 * a1.detach().double() @ a0.detach().double().T @ a0.detach().double()
        torch.testing.assert_close(a1.grad.double(), expected, rtol=1e-5, atol=1e-5)


def _stream() -> list[Any]:
    from moracl_scenarios.streams import tensor_benchmark

    g = torch.Generator().manual_seed(0)

    def part(classes: tuple[int, int], n: int = 24) -> tuple[Tensor, Tensor]:
        y = torch.tensor(classes).repeat(n // 2)
        return torch.randn(n, 6, generator=g) + y[:, None], y

    parts = [part((0, 1)), part((2, 3)), part((4, 5))]
    return list(tensor_benchmark(parts, [part((0, 1), 4)] * 3).train_stream)


def _strategy(instance: bool, **kwargs: Any) -> OLoRAStrategy:
    torch.manual_seed(0)
    model = olora_classifier(_base(), LORA, CLASSES, target_modules=["0", "2"], multi_head=False)

    def factory(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], weight_decay=0.1)

    # weight decay would move any frozen LoRA an optimiser stepped
    optimizer: dict[str, Any] = (
        {"optimizer": torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)}
        if instance
        else {"optimizer_factory": factory}
    )
    return OLoRAStrategy(
        model=model,
        train_mb_size=8,
        train_epochs=2,
        loader_seed=1,
        evaluator=quiet_evaluator(),
        **optimizer,
        **kwargs,
    )


def _lora(model: ContinualClassifier, task: int) -> dict[str, Tensor]:
    name = f".adapters.{task_adapter(task)}."
    return {k: v.clone() for k, v in model.state_dict().items() if name in k}


@pytest.mark.parametrize("instance", [False, True], ids=["factory", "optimizer"])
def test_earlier_loras_stay_bit_identical_and_evaluation_sums_every_lora(instance: bool) -> None:
    strategy = _strategy(instance, lambda1=0.5, lambda2=0.1)
    model = strategy.model
    assert isinstance(model, ContinualClassifier) and isinstance(model.encoder, MoRAModel)
    encoder = model.encoder
    initial = [_lora(model, t) for t in range(3)]
    after_own: list[dict[str, Tensor]] = []
    for t, experience in enumerate(_stream()):
        strategy.train(experience)
        after_own.append(_lora(model, t))
        assert not tensors_equal(after_own[t], initial[t])  # the task's own LoRA trained
        for i in range(t):  # every earlier LoRA exactly as its own task left it
            assert tensors_equal(_lora(model, i), after_own[i]), (t, i)
        for later in range(t + 1, 3):  # later LoRAs untouched until their task
            assert tensors_equal(_lora(model, later), initial[later])
        assert encoder.active_adapters == tuple(task_adapter(i) for i in range(t + 1))
    # task-agnostic evaluation: h = W x + b + Σ_i s B_i A_i x over every trained LoRA
    model.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    for layer in _layers(encoder):
        xi = x if layer.in_features == 6 else torch.randn(5, layer.in_features).double()
        expected = xi @ layer.weight.double().T + layer.bias.double()
        for t in range(3):
            a, b = (f.double() for f in task_factors(layer, t))
            s = layer.adapter(task_adapter(t)).scaling
            expected = expected + s * (xi @ a.T) @ b.T
        with torch.no_grad():
            got = layer(xi.float())
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_strategy_loss_adds_the_weighted_penalties() -> None:
    strategy = _strategy(False, lambda1=0.3, lambda2=0.2, orthogonality="l1")
    experiences = _stream()
    strategy.train(experiences[0])
    strategy.train(experiences[1])
    encoder = strategy.model.encoder
    assert isinstance(encoder, MoRAModel)
    expected = 0.3 * orthogonality_loss(encoder, 1, form=Orthogonality.L1) + 0.2 * l2_loss(
        encoder, 1
    )
    assert strategy.task == 1
    torch.testing.assert_close(strategy.penalty(), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda1": -1.0}, r"lambda1 must be a finite number >= 0, got -1\.0"),
        ({"lambda2": float("nan")}, r"lambda2 must be a finite number >= 0, got nan"),
        ({"orthogonality": "l2"}, r"orthogonality must be one of \['frobenius', 'l1'\], got 'l2'"),
    ],
)
def test_bad_strategy_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _strategy(False, **kwargs)


def test_olora_needs_lora_adapters_and_its_own_classifier() -> None:
    dora = AdapterConfig(kind="dora", rank=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"adapter.kind must be 'lora', got 'dora'"):
        olora_encoder(_base(), dora, 2, target_modules=["0"])
    plain = ContinualClassifier(
        MoRAModel(_base(), LORA, target_modules=["0"]), 5, CLASSES, multi_head=False
    )
    with pytest.raises(ValueError, match=r"one LoRA per task, built by olora_encoder"):
        OLoRAStrategy(model=plain, optimizer_factory=lambda m: torch.optim.SGD(m.parameters()))
    model = olora_encoder(_base(), LORA, 3, target_modules=["0"])
    with pytest.raises(ValueError, match=r"tasks must be an integer in \[1, 3\]"):
        use_tasks(model, 4, train_newest=True)


# -- the run --------------------------------------------------------------------------------

RUN = Path(__file__).resolve().parents[1] / "configs" / "split_fashion.yaml"


def test_validate_accepts_olora_and_refuses_a_negative_lambda(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from moracl.cli import main

    out = f"output_dir={tmp_path / 'run'}"
    keys = ["strategies=[olora]", "baselines.olora_lambda1=0.25", "baselines.olora_lambda2=0.1"]
    assert main(["validate", str(RUN), *keys, out]) == 0
    assert "valid RunConfig" in capsys.readouterr().out
    for key in ("olora_lambda1", "olora_lambda2"):
        assert main(["validate", str(RUN), "strategies=[olora]", f"baselines.{key}=-0.5", out]) == 2
        err = capsys.readouterr().err
        assert f"baselines.{key} must be a finite number >= 0, got -0.5" in err
        with pytest.raises(ValueError, match=rf"baselines\.{key} must be a finite number >= 0"):
            from_dict(RunConfig, {"strategies": ["olora"], "baselines": {key: -0.5}})


def _config(out: Path) -> RunConfig:
    data = {
        "job": "run",
        "scenario": {
            "name": "split-fashion",
            "setting": "class",
            "options": {"per_class": 30, "test_per_class": 20},
        },
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "strategies": ["olora"],
        "baselines": {"olora_lambda2": 0.01},  # both penalties in play
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-2, "head_lr": 1e-2},
        "output_dir": str(out),
    }
    return from_dict(RunConfig, data)


@pytest.mark.slow
@needs_fashion_mnist
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path: Path) -> None:
    from moracl.cli import main
    from moracl.jobs.continual import run as run_continual

    full = tmp_path / "full"
    run_continual(_config(full), progress=False)
    out = tmp_path / "run"
    run_continual(_config(out), progress=False, stop_after=1)
    interrupted = load_checkpoint(out)
    assert interrupted.experience == 1
    assert interrupted.state["olora"]["plugins"]["olora"] == {"tasks": 2}
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(out)
    assert a.experience == b.experience == 4
    assert tensors_equal(a.tensors["olora"], b.tensors["olora"])
    # the LoRA of experience 0 never moved after it (interrupted run vs the end)
    first = {k: v for k, v in interrupted.tensors["olora"].items() if ".task0." in k}
    assert first and all(v.equal(a.tensors["olora"][k]) for k, v in first.items())
    metrics = [json.loads((d / "metrics.json").read_text())["strategies"] for d in (full, out)]
    assert metrics[0][0]["matrix"] == metrics[1][0]["matrix"]
    assert metrics[0][0]["validation"] == metrics[1][0]["validation"]
