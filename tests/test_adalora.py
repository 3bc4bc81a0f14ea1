"""AdaLoRA: parity with PEFT's AdaLoraModel (masks, budget, weights), the budget schedule,
exact resume through MoRAScheduler's state, pruned saving, merging, config checks."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl import MoRAModel, MoRAScheduler
from moracl.adapters import AdaLoRA, AdaLoRAConfig, AdapterConfig, RankAllocator, orth_loss
from moracl.layer import MoRALinear

peft = pytest.importorskip("peft")

T, TINIT, TFINAL, DELTA_T = 30, 5, 5, 2
LAYERS = ("fc1", "fc2", "fc3")
FACTORS = ("lora_A", "lora_E", "lora_B")


class Net(nn.Module):
    """A three-layer MLP returning ``logits`` and, given labels, ``loss`` (as transformers'
    models do, so PEFT's AdaLoraModel adds its orthogonality loss to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 4)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> SimpleNamespace:
        logits = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def _config(**changes: Any) -> AdaLoRAConfig:
    base: dict[str, Any] = dict(
        kind="adalora", rank=6, target_rank=2, alpha=8.0, tinit=TINIT, tfinal=TFINAL
    )
    base.update(delta_t=DELTA_T, orth_reg_weight=0.5)
    base.update(changes)
    cfg = AdapterConfig(**base)
    assert isinstance(cfg, AdaLoRAConfig)
    return cfg


def _batches(n: int = T) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (8,), generator=g),
        )
        for _ in range(n)
    ]


def _adapters(model: MoRAModel) -> dict[str, AdaLoRA]:
    out = {}
    for name in LAYERS:
        a = model.model.get_submodule(name).adapters["default"]
        assert isinstance(a, AdaLoRA)
        out[name] = a
    return out


def _moracl(net: nn.Module, **changes: Any) -> MoRAModel:
    return MoRAModel(net, _config(**changes), target_modules=list(LAYERS))


def _optimizer(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _peft_model(net: nn.Module) -> Any:
    cfg = peft.AdaLoraConfig(
        init_r=6,
        target_r=2,
        lora_alpha=8,
        tinit=TINIT,
        tfinal=TFINAL,
        deltaT=DELTA_T,
        total_step=T,
        orth_reg_weight=0.5,
        target_modules=list(LAYERS),
    )
    pm = peft.get_peft_model(copy.deepcopy(net), cfg).double()
    # PEFT documents ranknum as the fixed initial rank (never saved, restored as float(r)),
    # but set_adapter() leaves it requiring grad; frozen here, as PEFT intends it to be.
    for name, p in pm.named_parameters():
        if "ranknum" in name:
            p.requires_grad_(False)
    return pm


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _train_moracl(
    model: MoRAModel,
    opt: torch.optim.Optimizer,
    sched: MoRAScheduler,
    batches: list[tuple[Tensor, Tensor]],
    after: Callable[[int], None] | None = None,
) -> None:
    for x, y in batches:
        step = sched.last_step
        loss = model(x, labels=y).loss + orth_loss(model)
        loss.backward()
        opt.step()
        sched.step()  # the rank budget reads this step's gradients ...
        opt.zero_grad()  # ... so the gradients are cleared after it
        if after is not None:
            after(step)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_budget_and_weights_equal_peft_adalora(optimizer: str) -> None:
    torch.manual_seed(0)
    net = Net().double()
    pm = _peft_model(net)
    model = _moracl(net)
    peft_layers = {n: pm.base_model.model.get_submodule(n) for n in LAYERS}
    ours = _adapters(model)
    with torch.no_grad():  # PEFT's initial weights, shared
        for n in LAYERS:
            for k in FACTORS:
                getattr(ours[n], k).copy_(getattr(peft_layers[n], k)["default"])
    p_opt = _optimizer(optimizer, _trainable(pm))
    m_opt = _optimizer(optimizer, _trainable(model))
    p_sched = MoRAScheduler(p_opt, total_steps=T, warmup_steps=3)
    allocator = RankAllocator(model, total_steps=T)
    m_sched = MoRAScheduler(m_opt, total_steps=T, warmup_steps=3, rank_allocator=allocator)
    allocations = 0
    for step, (x, y) in enumerate(_batches()):
        p_loss = pm.base_model(x=x, labels=y).loss  # AdaLoraModel.forward adds orth. reg.
        p_loss.backward()
        p_opt.step()
        pm.base_model.update_and_allocate(step)
        p_sched.step()
        p_opt.zero_grad()
        m_loss = model(x, labels=y).loss + orth_loss(model)
        m_loss.backward()
        m_opt.step()
        m_sched.step()
        m_opt.zero_grad()

        assert abs(p_loss.item() - m_loss.item()) <= 1e-10
        budget, due = pm.base_model.rankallocator.budget_schedule(step)
        assert allocator.budget == budget
        allocations += due and step < T - TFINAL
        for n in LAYERS:
            for k in FACTORS:
                theirs = getattr(peft_layers[n], k)["default"]
                torch.testing.assert_close(getattr(ours[n], k), theirs, rtol=0, atol=1e-10)
            kept = (peft_layers[n].lora_E["default"] != 0).view(-1)
            assert torch.equal(ours[n].lora_E.detach().view(-1) != 0, kept)
    assert allocations >= 5  # several reallocations before the final one
    # the final allocation: PEFT's rank_pattern, and our masks that enforce it
    final = pm.peft_config["default"].rank_pattern
    for n in LAYERS:
        want = final[f"{n}.lora_E.default"]
        assert ours[n].rank_mask.tolist() == want
    assert sum(int(a.rank_mask.sum()) for a in ours.values()) <= 2 * len(LAYERS)


def test_budget_follows_peft_schedule_and_never_exceeds_it() -> None:
    torch.manual_seed(0)
    net = Net().double()
    pm = _peft_model(net)
    model = _moracl(net)
    allocator = RankAllocator(model, total_steps=T)
    reference = pm.base_model.rankallocator
    budgets = [allocator.budget_at(t)[0] for t in range(T + 3)]
    assert budgets == [reference.budget_schedule(t)[0] for t in range(T + 3)]
    assert [allocator.budget_at(t)[1] for t in range(T - TFINAL)] == [
        reference.budget_schedule(t)[1] for t in range(T - TFINAL)
    ]
    assert budgets[0] == 6 * 3 and budgets[-1] == 2 * 3
    assert all(a >= b for a, b in itertools.pairwise(budgets))  # never rises

    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    sched = MoRAScheduler(opt, total_steps=T, rank_allocator=allocator)

    def check(step: int) -> None:
        budget, due = allocator.budget_at(step)
        if due or step >= T - TFINAL:  # just allocated: at most the budget survives
            assert sum(allocator.kept().values()) <= budget
        assert allocator.budget == budget

    _train_moracl(model, opt, sched, _batches(), after=check)


@pytest.mark.parametrize("stop", [12, 26])  # while the budget falls; in final fine-tuning
def test_resume_from_state_dicts_ends_with_same_masks_and_weights(stop: int) -> None:
    batches = _batches()

    def fresh() -> tuple[MoRAModel, torch.optim.Optimizer, MoRAScheduler]:
        torch.manual_seed(0)
        model = _moracl(Net().double())
        opt = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.01)
        alloc = RankAllocator(model, total_steps=T)
        return model, opt, MoRAScheduler(opt, total_steps=T, warmup_steps=3, rank_allocator=alloc)

    full, full_opt, full_sched = fresh()
    _train_moracl(full, full_opt, full_sched, batches)

    first, opt, sched = fresh()
    _train_moracl(first, opt, sched, batches[:stop])
    saved = copy.deepcopy(
        {"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    resumed, r_opt, r_sched = fresh()
    resumed.load_state_dict(saved["model"])
    r_opt.load_state_dict(saved["opt"])
    r_sched.load_state_dict(saved["sched"])
    assert r_sched.last_step == stop
    _train_moracl(resumed, r_opt, r_sched, batches[stop:])

    a, b = _adapters(full), _adapters(resumed)
    for n in LAYERS:
        assert torch.equal(a[n].rank_mask, b[n].rank_mask)
        for k in FACTORS:
            assert torch.equal(getattr(a[n], k), getattr(b[n], k)), (n, k)


def test_scheduler_state_carries_the_allocator_and_rejects_a_foreign_one() -> None:
    model = _moracl(Net().double())
    opt = torch.optim.SGD(_trainable(model), lr=0.1)
    sched = MoRAScheduler(opt, total_steps=T, rank_allocator=RankAllocator(model, total_steps=T))
    _train_moracl(model, opt, sched, _batches(3))
    state = sched.state_dict()
    assert set(state["rank_allocator"]["exp_avg_ipt"]) == {
        f"model.{n}.adapters.default.{k}" for n in LAYERS for k in FACTORS
    }
    plain = MoRAScheduler(torch.optim.SGD(_trainable(model), lr=0.1), total_steps=T)
    with pytest.raises(ValueError, match="rank_allocator"):
        plain.load_state_dict(state)
    other = _moracl(Net().double(), rank=4)
    other_sched = MoRAScheduler(
        torch.optim.SGD(_trainable(other), lr=0.1),
        total_steps=T,
        rank_allocator=RankAllocator(other, total_steps=T),
    )
    with pytest.raises(ValueError, match="shape"):
        other_sched.load_state_dict(state)


def test_allocator_needs_gradients_and_one_step_at_a_time() -> None:
    model = _moracl(Net().double())
    opt = torch.optim.SGD(_trainable(model), lr=0.1)
    sched = MoRAScheduler(opt, total_steps=T, rank_allocator=RankAllocator(model, total_steps=T))
    x, y = _batches(1)[0]
    model(x, labels=y).loss.backward()
    opt.step()
    opt.zero_grad()  # too early: the allocator reads these gradients
    with pytest.raises(ValueError, match=r"no gradient.*before optimizer.zero_grad"):
        sched.step()
    with pytest.raises(ValueError, match="one optimiser step at a time"):
        sched.step(5)


def test_allocator_argument_checks() -> None:
    model = _moracl(Net().double())
    with pytest.raises(ValueError, match="no step to reduce the rank"):
        RankAllocator(model, total_steps=TINIT + TFINAL)
    with pytest.raises(ValueError, match="total_steps"):
        RankAllocator(model, total_steps=0)
    with pytest.raises(ValueError, match="no trained adalora adapter named 'other'"):
        RankAllocator(model, total_steps=T, adapter_name="other")
    with pytest.raises(TypeError, match="rank_allocator"):
        MoRAScheduler(
            torch.optim.SGD(_trainable(model), lr=0.1), total_steps=T, rank_allocator=object()
        )  # type: ignore[arg-type]


def _trained() -> tuple[nn.Module, MoRAModel, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    net = Net().double()
    model = _moracl(net)
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    sched = MoRAScheduler(opt, total_steps=T, rank_allocator=RankAllocator(model, total_steps=T))
    batches = _batches()
    _train_moracl(model, opt, sched, batches)
    return net, model, batches


def test_merge_equals_adapter_forward() -> None:
    _, model, batches = _trained()
    for a in _adapters(model).values():
        assert int(a.rank_mask.sum()) < a.rank  # some triplets are masked
        inp = torch.randn(5, a.in_features, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(a.delta(inp), inp @ a.delta_weight().T, rtol=0, atol=1e-12)
    x = batches[0][0]
    with torch.no_grad():
        want = model(x).logits
        got = model.merge_and_unload()(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_saved_state_keeps_only_surviving_triplets_and_reproduces_outputs() -> None:
    _, model, _ = _trained()
    config = model.adapter_configs["default"]
    assert isinstance(config, AdaLoRAConfig)
    adapters = _adapters(model)
    saved = config.saved(adapters)
    assert saved.rank_pattern == {n: int(a.rank_mask.sum()) for n, a in adapters.items()}
    assert AdapterConfig.from_dict(saved.to_dict()) == saved  # JSON round trip
    for n, a in adapters.items():
        state = a.saved_state()
        k = saved.layer_rank(n)
        assert k < a.rank
        assert state["lora_A"].shape == (k, a.in_features)
        assert state["lora_E"].shape == (k, 1)
        assert state["lora_B"].shape == (a.out_features, k)
        original = model.model.get_submodule(n)
        rebuilt = MoRALinear(copy.deepcopy(original.base_layer), saved.for_layer(n)).double()
        rebuilt.adapters["default"].load_state_dict(state)
        inp = torch.randn(5, a.in_features, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(inp), original(inp), rtol=0, atol=1e-12)


def test_save_pretrained_prunes_and_from_pretrained_reproduces(tmp_path: Path) -> None:
    net, model, batches = _trained()
    model.save_pretrained(tmp_path)
    loaded = MoRAModel.from_pretrained(net, tmp_path)
    for n, a in _adapters(loaded).items():
        assert a.rank == int(_adapters(model)[n].rank_mask.sum())
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-12)


def test_config_checks_and_round_trip() -> None:
    cfg = _config()
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert AdapterConfig.from_dict(_config(init="lora").to_dict()) == _config(init="lora")
    assert hash(cfg) == hash(_config())
    assert cfg.scaling == 8.0 / (6 + 1e-5)
    for bad, match in [
        ({"target_rank": 7}, "target_rank"),
        ({"target_rank": 0}, "target_rank"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": 0}, "beta2"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight"),
        ({"delta_t": 0}, "delta_t"),
        ({"tinit": -1}, "tinit"),
        ({"alpha": 0.0}, "alpha"),
        ({"rank_pattern": {"fc1": 9}}, "rank_pattern"),
        ({"rank_pattern": [1, 2]}, "rank_pattern"),
        ({"init": "kaiming"}, "unknown adalora init 'kaiming'"),
    ]:
        with pytest.raises(ValueError, match=match):
            _config(**bad)
    with pytest.raises(ValueError, match="not in this adalora config's rank_pattern"):
        _config(rank_pattern={"fc1": 2}).layer_rank("fc2")
    with pytest.raises(ValueError, match="unknown key"):
        AdapterConfig(kind="adalora", init_r=4)


@pytest.mark.parametrize("init", ["peft", "lora"])
def test_every_init_starts_at_zero_and_lora_init_trains_b_from_the_first_step(init: str) -> None:
    torch.manual_seed(0)
    a = AdaLoRA(16, 24, _config(init=init)).double()
    x = torch.randn(10, 16, dtype=torch.float64)
    g = torch.randn(10, 24, dtype=torch.float64)  # dLoss/dDelta
    delta = a.delta(x)
    assert torch.equal(delta, torch.zeros_like(delta))
    (delta * g).sum().backward()
    assert a.lora_B.grad is not None and a.lora_A.grad is not None
    if init == "peft":  # E = 0: nothing but E learns at first
        assert torch.equal(a.lora_E.detach(), torch.zeros(6, 1, dtype=torch.float64))
        assert torch.equal(a.lora_B.grad, torch.zeros_like(a.lora_B.grad))
        return
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(a.lora_A @ a.lora_A.T, eye, atol=1e-5, rtol=0)  # float32 QR
    assert torch.equal(a.lora_E.detach(), torch.ones(6, 1, dtype=torch.float64))
    # dL/dB = s · gᵀ (x Aᵀ) with E = 1, closed form in float64
    expected = a.scaling * g.T @ (x @ a.lora_A.detach().T)
    torch.testing.assert_close(a.lora_B.grad, expected, atol=1e-12, rtol=0)
    assert expected.abs().max() > 0


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(x)))


def test_finetune_loop_adds_orth_loss_and_allocates_the_budget() -> None:
    from moracl.config import TrainConfig, from_dict
    from moracl.jobs.finetune import train_model

    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))
    train = from_dict(TrainConfig, {"epochs": 2, "batch_size": 8, "lr": 1e-2})

    def run(weight: float) -> list[AdaLoRA]:
        torch.manual_seed(0)
        config = _config(tinit=2, tfinal=2, delta_t=1, orth_reg_weight=weight)
        model = MoRAModel(Classifier(), config, target_modules=["body", "head"])
        log = train_model(model, lambda idx: {"x": data[idx]}, labels, train)
        assert log.steps == 16
        return [m for m in model.modules() if isinstance(m, AdaLoRA)]

    adapters = run(0.1)
    assert sum(int(a.rank_mask.sum()) for a in adapters) <= 2 * len(adapters)  # final allocation
    for a in adapters:
        assert not a.lora_E.detach().view(-1)[~a.rank_mask].any()  # masked triplets stay off
    unregularized = run(0.0)
    with torch.no_grad():  # the orthogonality loss moved A and B towards orthonormal
        for a, u in zip(adapters, unregularized, strict=True):
            assert not torch.equal(a.lora_A, u.lora_A)
            assert sum(a.orth_penalty()) < sum(u.orth_penalty())
