"""MoRAScheduler: closed-form values at chosen steps, ρ tied to the lr, exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.optim import MoRAOptimizer, MoRAScheduler, SAMConfig
from tests.test_optim import TinyAdapterModel, regression_data


def _opt(lr: float = 0.1, sam: SAMConfig | None = None) -> MoRAOptimizer:
    return MoRAOptimizer(TinyAdapterModel(), base="adamw", lr=lr, loraplus_ratio=16, sam=sam)


# W = 10, T = 110, r = 0.1: the decay phase is 100 steps long.
COSINE = {
    0: 0.0,
    5: 0.5,
    10: 1.0,
    35: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)),
    60: 0.55,
    110: 0.1,
    500: 0.1,
}
LINEAR = {0: 0.0, 4: 0.4, 10: 1.0, 35: 0.775, 60: 0.55, 110: 0.1, 111: 0.1}
CONSTANT = {0: 0.0, 3: 0.3, 10: 1.0, 60: 1.0, 1000: 1.0}


@pytest.mark.parametrize(
    ("schedule", "table"),
    [("cosine", COSINE), ("linear", LINEAR), ("constant", CONSTANT)],
)
def test_values_at_chosen_steps_equal_closed_forms(schedule: str, table: dict[int, float]) -> None:
    opt = _opt(lr=0.2)
    sched = MoRAScheduler(
        opt, warmup_steps=10, total_steps=110, schedule=schedule, min_lr_ratio=0.1
    )
    for step, factor in table.items():
        sched.step(step)
        assert sched.factor(step) == pytest.approx(factor, abs=1e-12)
        assert opt.group("lora_a")["lr"] == pytest.approx(0.2 * factor, abs=1e-12)
        assert opt.group("lora_b")["lr"] == pytest.approx(16 * 0.2 * factor, abs=1e-12)
        assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_warmup_start_ratio_and_no_warmup() -> None:
    opt = _opt(lr=1.0)
    sched = MoRAScheduler(opt, warmup_steps=4, total_steps=8, warmup_start_ratio=0.2)
    assert [sched.factor(t) for t in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    sched = MoRAScheduler(opt, warmup_steps=0, total_steps=8, schedule="linear")
    assert sched.factor(0) == 1.0 and sched.factor(2) == pytest.approx(0.75)
    sched = MoRAScheduler(opt, warmup_steps=8, total_steps=8, min_lr_ratio=0.3)
    assert sched.factor(7) == pytest.approx(7 / 8)
    assert sched.factor(8) == sched.factor(9) == pytest.approx(0.3)  # empty decay: at its end


def test_scheduler_sets_values_at_construction_and_keeps_initial_lr() -> None:
    opt = _opt(lr=0.3)
    MoRAScheduler(opt, warmup_steps=10, total_steps=100)
    assert opt.group("lora_a")["lr"] == 0.0
    assert opt.group("lora_a")["initial_lr"] == pytest.approx(0.3)
    assert opt.group("lora_b")["initial_lr"] == pytest.approx(4.8)


def test_single_steps_equal_an_explicit_jump() -> None:
    a, b = _opt(), _opt()
    sa = MoRAScheduler(a, warmup_steps=3, total_steps=20, schedule="cosine")
    sb = MoRAScheduler(b, warmup_steps=3, total_steps=20, schedule="cosine")
    for _ in range(13):
        sa.step()
    sb.step(13)
    assert sa.last_step == sb.last_step == 13
    assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]


@pytest.mark.parametrize("min_rho_ratio", [0.0, 0.25])
def test_rho_tied_to_learning_rate(min_rho_ratio: float) -> None:
    opt = _opt(lr=0.1, sam=SAMConfig(rho=0.08))
    sched = MoRAScheduler(
        opt,
        warmup_steps=5,
        total_steps=25,
        schedule="linear",
        rho_schedule="lr",
        min_rho_ratio=min_rho_ratio,
    )
    for step in (0, 2, 5, 15, 25):
        sched.step(step)
        f = sched.factor(step)
        for g in opt.param_groups:
            assert g["sam_rho"] == pytest.approx(0.08 * (min_rho_ratio + (1 - min_rho_ratio) * f))
            assert g["initial_rho"] == 0.08
    constant = MoRAScheduler(_opt(sam=SAMConfig(rho=0.08)), total_steps=10)
    constant.step(7)
    assert all(g["sam_rho"] == 0.08 for g in constant.optimizer.param_groups)
    assert constant.rho_at(3) == [0.08] * len(constant.optimizer.param_groups)


def test_works_with_a_plain_torch_optimizer() -> None:
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = MoRAScheduler(opt, warmup_steps=0, total_steps=4, schedule="linear")
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.75)
    assert sched.rho_at(1) == [None]


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"total_steps": 0}, "0"),
        ({"total_steps": -5}, "-5"),
        ({"total_steps": 10, "warmup_steps": 11}, "11"),
        ({"total_steps": 10, "warmup_steps": -1}, "-1"),
        ({"total_steps": 10, "schedule": "cosin"}, "cosin"),
        ({"total_steps": 10, "rho_schedule": "step"}, "step"),
        ({"total_steps": 10, "min_lr_ratio": 1.5}, "1.5"),
        ({"total_steps": 10, "min_rho_ratio": -0.1}, "-0.1"),
        ({"total_steps": 10.5}, "10.5"),
    ],
)
def test_invalid_settings_raise_naming_the_value(kwargs: dict, shown: str) -> None:
    with pytest.raises(ValueError) as err:
        MoRAScheduler(_opt(), **kwargs)
    assert shown in str(err.value)


def test_load_state_dict_rejects_foreign_state() -> None:
    sched = MoRAScheduler(_opt(), total_steps=10)
    with pytest.raises(ValueError, match="last_epoch"):
        sched.load_state_dict({"last_epoch": 3})
    with pytest.raises(ValueError, match="step"):
        sched.step(-1)


@pytest.mark.parametrize("base", ["adamw", "sgd", "lamb"])
def test_resume_mid_schedule_is_bit_exact(base: str) -> None:
    """Save at step 7 of 20, resume in fresh objects: same weights, lrs and ρ at every step."""
    x, y = regression_data()

    def build(seed: int) -> tuple[nn.Module, MoRAOptimizer, MoRAScheduler]:
        torch.manual_seed(seed)
        model = TinyAdapterModel(router=False)
        opt = MoRAOptimizer(
            model,
            base=base,
            lr=0.02,
            weight_decay=0.01,
            loraplus_ratio=8,
            lars=True,
            sam=SAMConfig(rho=0.05),
        )
        sched = MoRAScheduler(
            opt,
            warmup_steps=4,
            total_steps=20,
            schedule="cosine",
            rho_schedule="lr",
            min_lr_ratio=0.05,
        )
        return model, opt, sched

    def run(model: nn.Module, opt: MoRAOptimizer, sched: MoRAScheduler, steps: int) -> list:
        trace = []

        def closure() -> Tensor:
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(steps):
            loss = opt.step(closure)
            sched.step()
            trace.append(
                (
                    loss.detach().clone(),
                    [p.detach().clone() for p in model.parameters()],
                    [(g["lr"], g["sam_rho"]) for g in opt.param_groups],
                )
            )
        return trace

    model, opt, sched = build(0)
    run(model, opt, sched, 7)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    uninterrupted = run(model, opt, sched, 13)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, sched2 = build(1)  # different initial weights, overwritten by the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.last_step == 7
    resumed = run(model2, opt2, sched2, 13)

    for (la, pa, ga), (lb, pb, gb) in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(la, lb)
        assert ga == gb
        for a, b in zip(pa, pb, strict=True):
            assert torch.equal(a, b)
    assert sched2.last_step == 20 and sched2.factor(20) == pytest.approx(0.05)


class _RecordingBudget:
    """A rank budget that records the steps it is given and keeps them as its state."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def update_and_allocate(self, step: int) -> int:
        self.steps.append(step)
        return 0

    def state_dict(self) -> dict[str, list[int]]:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state_dict: dict[str, list[int]]) -> None:
        self.steps = list(state_dict["steps"])


def test_rank_budget_gets_each_step_just_taken_and_resumes_with_the_scheduler() -> None:
    budget = _RecordingBudget()
    sched = MoRAScheduler(_opt(), warmup_steps=2, total_steps=10, rank_allocator=budget)
    for _ in range(4):
        sched.step()
    assert budget.steps == [0, 1, 2, 3]  # the optimiser step just taken, 0 first
    assert sched.last_step == 4
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * sched.factor(4))
    state = sched.state_dict()
    assert state["rank_allocator"] == {"steps": [0, 1, 2, 3]}

    other = _RecordingBudget()
    resumed = MoRAScheduler(_opt(), warmup_steps=2, total_steps=10, rank_allocator=other)
    resumed.load_state_dict(state)
    resumed.step()
    assert other.steps == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="one optimiser step at a time"):
        resumed.step(9)
    assert "rank_allocator" not in MoRAScheduler(_opt(), total_steps=10).state_dict()
