"""AdaLoRA experts in mixtures: one rank budget over every expert's triplets (equal, in
float64, to separate single adapters under one budget), frozen experts outside it, every
router, and continual growth whose new experts each end at the budget's rank."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl import AdapterConfig, MoRAModel
from moracl.adapters.adalora import (
    AdaLoRA,
    AdaLoRABank,
    AdaLoRAConfig,
    RankAllocator,
    orth_loss,
    rank_budget_modules,
)
from moracl.experts.mixture import ExpertGroup, Mixture, MixtureConfig
from moracl.experts.routers import ROUTERS
from moracl.experts.routers.config import RouterConfig
from tests.offline_data import needs_fashion_mnist

T, TINIT, TFINAL, DELTA_T = 24, 4, 4, 2
LAYERS = ("0", "2", "4")
FACTORS = ("lora_A", "lora_E", "lora_B")
E = 3  # experts (and tasks)


def _config(**changes: Any) -> AdaLoRAConfig:
    base: dict[str, Any] = dict(kind="adalora", rank=5, target_rank=2, alpha=8.0)
    base.update(tinit=TINIT, tfinal=TFINAL, delta_t=DELTA_T, orth_reg_weight=0.5)
    base.update(changes)
    cfg = AdapterConfig.from_dict(base)
    assert isinstance(cfg, AdaLoRAConfig)
    return cfg


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)
    ).double()


def _mixture_model(net: nn.Module) -> MoRAModel:
    config = MixtureConfig(
        groups=(ExpertGroup(_config(), E),),
        router=RouterConfig(type="task", num_tasks=E),  # task t owns expert t
    )
    return MoRAModel(copy.deepcopy(net), config, target_modules=list(LAYERS)).double()


def _banks(model: MoRAModel) -> dict[str, AdaLoRABank]:
    out = {}
    for name in LAYERS:
        mixture = model.model.get_submodule(name).adapters["default"]
        assert isinstance(mixture, Mixture)
        bank = mixture.expert_banks()[-1]
        assert isinstance(bank, AdaLoRABank)
        out[name] = bank
    return out


def _separate_adapters(net: nn.Module, banks: dict[str, AdaLoRABank]) -> nn.ModuleList:
    """``E`` single-adapter models over copies of ``net`` (the frozen base is shared by
    value), adapter ``j`` of layer ``l`` starting as expert ``j`` of the bank of ``l``."""
    models = nn.ModuleList(
        MoRAModel(copy.deepcopy(net), _config(), target_modules=list(LAYERS)).double()
        for _ in range(E)
    )
    with torch.no_grad():
        for j, model in enumerate(models):
            for name, adapter in _adapters(model).items():
                bank = banks[name]
                adapter.lora_A.copy_(bank.lora_A[j])
                adapter.lora_E.copy_(bank.lora_E[j])
                adapter.lora_B.copy_(bank.lora_B[:, j])
    return models


def _adapters(model: nn.Module) -> dict[str, AdaLoRA]:
    out = {}
    for name in LAYERS:
        adapter = model.model.get_submodule(name).adapters["default"]  # type: ignore[operator]
        assert isinstance(adapter, AdaLoRA)
        out[name] = adapter
    return out


def _batches(n: int = T) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Batches of 12 rows, four of each task in a shuffled order."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        tasks = torch.arange(E).repeat(4)[torch.randperm(4 * E, generator=g)]
        x = torch.randn(4 * E, 12, generator=g, dtype=torch.float64)
        out.append((x, torch.randint(0, 4, (4 * E,), generator=g), tasks))
    return out


def _reference_logits(models: nn.ModuleList, x: Tensor, tasks: Tensor) -> Tensor:
    out = torch.empty(x.shape[0], 4, dtype=x.dtype)
    for j, model in enumerate(models):
        rows = tasks == j
        out[rows] = model(x[rows])
    return out


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_mixture_under_task_routing_equals_separate_adapters_under_one_budget(
    optimizer: str,
) -> None:
    net = _net()
    model = _mixture_model(net)
    banks = _banks(model)
    reference = _separate_adapters(net, banks)
    refs = [_adapters(m) for m in reference]

    def opt(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.5)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)

    m_opt, r_opt = opt(_trainable(model)), opt(_trainable(reference))
    alloc = RankAllocator(model, total_steps=T)
    ref_alloc = RankAllocator(reference, total_steps=T)
    # the same budget: E adapters per layer, each expert counting as one
    assert (alloc.init_budget, alloc.target_budget) == (5 * E * 3, 2 * E * 3)
    assert (ref_alloc.init_budget, ref_alloc.target_budget) == (5 * E * 3, 2 * E * 3)
    allocations = 0
    for step, (x, y, tasks) in enumerate(_batches()):
        m_loss = F.cross_entropy(model(x, task_ids=tasks), y) + orth_loss(model)
        r_loss = F.cross_entropy(_reference_logits(reference, x, tasks), y) + orth_loss(reference)
        assert abs(m_loss.item() - r_loss.item()) <= 1e-10
        for o, loss, a in ((m_opt, m_loss, alloc), (r_opt, r_loss, ref_alloc)):
            loss.backward()
            o.step()
            a.update_and_allocate(step)
            o.zero_grad()
        assert alloc.budget == ref_alloc.budget == alloc.budget_at(step)[0]
        allocations += alloc.budget_at(step)[1] and step < T - TFINAL
        for name, bank in banks.items():
            for j in range(E):
                theirs = refs[j][name]
                torch.testing.assert_close(bank.lora_A[j], theirs.lora_A, rtol=0, atol=1e-10)
                torch.testing.assert_close(bank.lora_E[j], theirs.lora_E, rtol=0, atol=1e-10)
                torch.testing.assert_close(bank.lora_B[:, j], theirs.lora_B, rtol=0, atol=1e-10)
                kept = theirs.lora_E.detach().view(-1) != 0
                assert torch.equal(bank.lora_E[j].detach().view(-1) != 0, kept), (step, name, j)
    assert allocations >= 4  # several reallocations before the final one
    ranks = []
    for name, bank in banks.items():
        for j in range(E):
            assert bank.rank_mask[j].tolist() == refs[j][name].rank_mask.tolist()
        ranks += bank.expert_ranks()
    assert sum(ranks) == 2 * E * 3  # the target budget exactly (no ties among the scores)
    assert len(set(ranks)) > 1  # experts (and layers) end at different ranks
    kept_per_expert = alloc.kept_per_expert()
    assert sorted(itertools.chain(*kept_per_expert.values())) == sorted(ranks)


def test_the_budget_never_exceeds_its_schedule_and_a_resumed_allocator_keeps_the_masks() -> None:
    batches = _batches()

    def fresh() -> tuple[MoRAModel, torch.optim.Optimizer, RankAllocator]:
        model = _mixture_model(_net())
        opt = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.01)
        return model, opt, RankAllocator(model, total_steps=T)

    def train(
        model: MoRAModel, opt: torch.optim.Optimizer, alloc: RankAllocator, steps: range
    ) -> None:
        for step in steps:
            x, y, tasks = batches[step]
            (F.cross_entropy(model(x, task_ids=tasks), y) + orth_loss(model)).backward()
            opt.step()
            alloc.update_and_allocate(step)
            opt.zero_grad()
            budget, due = alloc.budget_at(step)
            assert alloc.budget == budget
            if due or step >= T - TFINAL:  # just allocated: at most the budget survives
                assert sum(alloc.kept().values()) <= budget

    full, full_opt, full_alloc = fresh()
    train(full, full_opt, full_alloc, range(T))
    assert full_alloc.finished
    for stop in (10, 22):  # while the budget falls; after the final allocation
        first, opt, alloc = fresh()
        train(first, opt, alloc, range(stop))
        saved = copy.deepcopy(
            {"model": first.state_dict(), "opt": opt.state_dict(), "alloc": alloc.state_dict()}
        )
        resumed, r_opt, r_alloc = fresh()
        resumed.load_state_dict(saved["model"])
        r_opt.load_state_dict(saved["opt"])
        r_alloc.load_state_dict(saved["alloc"])
        for a, b in zip(_banks(first).values(), _banks(resumed).values()):
            assert torch.equal(a.rank_mask, b.rank_mask)
        train(resumed, r_opt, r_alloc, range(stop, T))
        for a, b in zip(_banks(full).values(), _banks(resumed).values()):
            assert torch.equal(a.rank_mask, b.rank_mask)
            for k in FACTORS:
                assert torch.equal(getattr(a, k), getattr(b, k)), (stop, k)


def test_frozen_experts_are_outside_the_budget_and_keep_their_ranks() -> None:
    model = _mixture_model(_net())
    mixtures = [m for _, m in model.mixtures()]
    for mixture in mixtures:
        old = mixture.expert_banks()[0]
        assert isinstance(old, AdaLoRABank)
        with torch.no_grad():  # a finished expert: some triplets pruned
            old.rank_mask[:, 3:] = False
            old.lora_E.normal_()
        mixture.freeze_experts()
        mixture.grow(_config(rank=4), 1)
        mixture.router.set_expert_mask(3, torch.tensor([False] * E + [True]))  # type: ignore[operator]
    frozen = {n: t.clone() for n, t in model.state_dict().items() if ".banks.0." in n}
    alloc = RankAllocator(model, total_steps=T)
    assert len(rank_budget_modules(model)) == 3 and all(".banks.1" in p for p in alloc.adapters)
    assert (alloc.init_budget, alloc.target_budget) == (4 * 3, 2 * 3)
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    for step, (x, y, _) in enumerate(_batches()):
        tasks = torch.full((x.shape[0],), 3)
        (F.cross_entropy(model(x, task_ids=tasks), y) + orth_loss(model)).backward()
        opt.step()
        alloc.update_and_allocate(step)
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    new = [m.expert_banks()[1] for m in mixtures]
    assert sum(sum(b.expert_ranks()) for b in new if isinstance(b, AdaLoRABank)) == 2 * 3


ROUTER_CONFIGS = {
    "topk": RouterConfig(type="topk", k=2),
    "dynamic": RouterConfig(type="dynamic", top_p=0.6, max_experts=3),
    "task": RouterConfig(type="task", num_tasks=2, task_weights=True),
    "soft": RouterConfig(type="soft"),
    "hierarchical": RouterConfig(type="hierarchical", groups=2, k=1),
}


def test_every_router_is_covered() -> None:
    # moracl's own routers (other tests register routers of their own in the same registry)
    builtin = [n for n in ROUTERS.names() if ROUTERS.get(n).__module__.startswith("moracl.")]
    assert sorted(ROUTER_CONFIGS) == sorted(builtin)


@pytest.mark.parametrize("router", sorted(ROUTER_CONFIGS))
def test_adalora_experts_under_every_router_equal_the_per_expert_loop(router: str) -> None:
    torch.manual_seed(0)
    config = MixtureConfig(kind="adalora", rank=8, experts=4, router=ROUTER_CONFIGS[router])
    mix = Mixture.from_config(20, 28, config).double().train()
    (bank,) = mix.expert_banks()
    assert isinstance(bank, AdaLoRABank)
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        bank.rank_mask[1, 2:] = False  # experts of different ranks
        bank.rank_mask[3, 5:] = False
    x = torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True)
    result = mix.route(x, torch.tensor([0, 1]) if router == "task" else None)
    gates = result.gates.detach()
    params = [x, *mix.banks.parameters()]
    out = mix.mix(x, gates)
    ref = mix.naive_delta(x, gates)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # each expert's dense update, and its exported factors (only the kept triplets)
    x2 = x.detach().reshape(-1, 20)
    for j in range(4):
        w = bank.expert_weight(j)
        torch.testing.assert_close(bank.expert_delta(x2, j), x2 @ w.T, rtol=0, atol=1e-10)
        down, up = bank.expert_factors(j)
        assert down.shape[0] == bank.expert_ranks()[j]
        torch.testing.assert_close(up @ down, w, rtol=0, atol=1e-10)


def test_orthogonality_terms_are_each_experts_and_a_bank_refuses_a_pruned_config() -> None:
    torch.manual_seed(0)
    bank = AdaLoRABank(10, 6, _config(), 3).double()
    single = AdaLoRA(10, 6, _config()).double()
    terms = bank.orth_penalty()
    assert len(terms) == 2 * 3
    with torch.no_grad():
        for j in range(3):
            single.lora_A.copy_(bank.lora_A[j])
            single.lora_B.copy_(bank.lora_B[:, j])
            a, b = single.orth_penalty()
            torch.testing.assert_close(terms[2 * j], a, rtol=0, atol=1e-12)
            torch.testing.assert_close(terms[2 * j + 1], b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="rank_pattern"):
        AdaLoRABank(10, 6, _config(rank_pattern={"fc": 3}), 2)
    with pytest.raises(ValueError, match=r"kind='adalora', rank=4\): target_rank"):
        MixtureConfig(kind="adalora", rank=4, experts=2)  # target_rank 8 > rank 4


def test_lora_init_gives_each_expert_a_lora_start() -> None:
    torch.manual_seed(0)
    bank = AdaLoRABank(10, 6, _config(init="lora"), 3).double()
    eye = torch.eye(bank.rank, dtype=torch.float64)
    for j in range(3):  # each expert's right singular vectors orthonormal on their own
        a = bank.lora_A[j].detach()
        torch.testing.assert_close(a @ a.T, eye, atol=1e-5, rtol=0)  # float32 QR (LAPACK)
    assert not torch.allclose(bank.lora_A[0], bank.lora_A[1])
    assert torch.equal(bank.lora_E.detach(), torch.ones_like(bank.lora_E))
    assert torch.equal(bank.lora_B.detach(), torch.zeros_like(bank.lora_B))
    for j in range(3):
        assert torch.equal(bank.expert_weight(j), torch.zeros(6, 10, dtype=torch.float64))


def test_a_warm_started_copy_gets_a_budget_of_its_own() -> None:
    torch.manual_seed(0)
    bank = AdaLoRABank(10, 6, _config(), 2).double()
    with torch.no_grad():
        bank.lora_E.normal_()
        bank.rank_mask[:, 2:] = False
    x = torch.randn(7, 10, dtype=torch.float64)
    gates = torch.rand(7, 2, dtype=torch.float64)
    before = bank.delta(x, gates)
    bank.reset_ranks()
    assert bank.rank_mask.all() and bank.expert_ranks() == [5, 5]
    torch.testing.assert_close(bank.delta(x, gates), before, rtol=0, atol=0)


# -- continual growth ----------------------------------------------------------------------
CLASSES = ((0, 1), (2, 3), (4, 5))


def _stream() -> Any:
    from moracl_scenarios.streams import tensor_benchmark

    g = torch.Generator().manual_seed(0)

    def part(classes: tuple[int, int], n: int) -> tuple[Tensor, Tensor]:
        y = torch.tensor(classes).repeat(n // 2)
        return 0.5 * torch.randn(n, 8, generator=g) + F.one_hot(y, 8).float(), y

    return tensor_benchmark(
        [part(c, 20) for c in CLASSES], [part(c, 6) for c in CLASSES], task_labels=[0, 1, 2]
    )


def _classifier(expert: AdaLoRAConfig) -> Any:
    from moracl.continual.model import ContinualClassifier
    from moracl.experts.routers.task import TaskRouterConfig

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)).requires_grad_(False)
    mixture = MixtureConfig(
        groups=(ExpertGroup(expert, 1),), router=TaskRouterConfig(num_tasks=1, task_weights=True)
    )
    encoder = MoRAModel(base, mixture, target_modules=["0", "2"])
    return ContinualClassifier(encoder, 16, CLASSES, multi_head=True, route_by_task=True)


def test_each_experience_budgets_its_new_experts_down_to_the_target_rank() -> None:
    pytest.importorskip("avalanche")
    from avalanche.core import SupervisedPlugin

    from moracl.continual.strategy import GrowthConfig, MoRAStrategy, quiet_evaluator

    class Watch(SupervisedPlugin):  # type: ignore[misc]
        """Each step's budget and the allocator's plan, as the strategy runs it."""

        def __init__(self) -> None:
            super().__init__()
            self.budgets: list[tuple[int, int, int]] = []
            self.plans: list[tuple[int, int, int]] = []

        def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
            a = strategy.rank_allocator
            self.plans.append((a.total_steps, a.init_budget, a.target_budget))

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            a = strategy.rank_allocator
            self.budgets.append((strategy._budget_steps - 1, a.budget, a.total_steps))

    first = _config(rank=6, tinit=1, tfinal=1, delta_t=1)
    grown = first.replace(rank=4)  # new experts start smaller (experts.growth_rank)
    model = _classifier(first)
    watch = Watch()
    strategy = MoRAStrategy(
        model=model,
        optimizer_factory=lambda m: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad], lr=1e-2
        ),
        growth=GrowthConfig(adapter=grown, experts=1, reuse_old=False),
        train_mb_size=8,
        train_epochs=2,
        eval_mb_size=16,
        plugins=[watch],
        evaluator=quiet_evaluator(),
    )
    bench = _stream()
    snapshots: list[dict[str, Tensor]] = []
    for k, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        assert strategy.rank_allocator is None  # the budget ends with its experience
        state = {n: t.clone() for n, t in model.state_dict().items() if ".banks." in n}
        for old, snap in enumerate(snapshots):  # earlier experts: bit-identical
            keys = [n for n in snap if f".banks.{old}." in n]
            assert keys and all(torch.equal(snap[n], state[n]) for n in keys)
        snapshots.append(state)
        banks = [m.expert_banks()[k] for _, m in model.encoder.mixtures()]
        assert all(isinstance(b, AdaLoRABank) for b in banks)
        assert [b.rank for b in banks] == [6 if k == 0 else 4] * 2
        # each finished expert: target_rank per layer on average, summed over its layers
        assert sum(b.expert_ranks()[0] for b in banks) == 2 * 2
    steps = 2 * 3  # epochs x batches (20 rows, batches of 8)
    assert watch.plans[::2] == [(steps, 6 * 2, 2 * 2), (steps, 4 * 2, 2 * 2), (steps, 4 * 2, 2 * 2)]
    reference = RankAllocator(model, total_steps=steps)  # the schedule of the last experience
    assert [(t, b) for t, b, _ in watch.budgets[-steps:]] == [
        (t, reference.budget_at(t)[0]) for t in range(steps)
    ]


def test_skipped_steps_are_not_counted_and_the_allocation_is_made_at_the_end() -> None:
    pytest.importorskip("avalanche")
    from avalanche.core import SupervisedPlugin

    from moracl.continual.strategy import MoRAStrategy, quiet_evaluator

    class Poison(SupervisedPlugin):  # type: ignore[misc]
        """A non-finite loss at two of the six steps: the guard skips them."""

        def __init__(self) -> None:
            super().__init__()
            self.iteration = 0
            self.counted: list[int] = []

        def before_backward(self, strategy: Any, **kwargs: Any) -> None:
            if self.iteration in (1, 4):
                strategy.loss = strategy.loss * float("nan")
            self.iteration += 1

        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            self.counted.append(strategy._budget_steps)

    # six planned steps, the final allocation due at step 5: with two skipped it never comes
    model = _classifier(_config(rank=6, tinit=1, tfinal=0, delta_t=1))
    poison = Poison()
    strategy = MoRAStrategy(
        model=model,
        optimizer_factory=lambda m: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad], lr=1e-2
        ),
        train_mb_size=8,
        train_epochs=2,
        plugins=[poison],
        evaluator=quiet_evaluator(),
        on_nonfinite="skip",
    )
    with pytest.warns(RuntimeWarning, match="skipped 1 of 3 steps"):
        strategy.train(_stream().train_stream[0])
    assert poison.counted == [1, 1, 2, 3, 3, 4]  # the allocator saw the four steps taken
    assert strategy.step_guard.skipped == 2
    banks = [m.expert_banks()[0] for _, m in model.encoder.mixtures()]
    assert sum(b.expert_ranks()[0] for b in banks if isinstance(b, AdaLoRABank)) == 2 * 2


def test_growth_rank_config_and_expert_adapter() -> None:
    from moracl.config import load_config
    from moracl.continual.factory import expert_adapter

    configs = Path(__file__).resolve().parents[1] / "configs"
    adalora = "adapter={kind: adalora, rank: 8, target_rank: 2, alpha: 16.0}"
    cfg = load_config(configs / "split_fashion.yaml", [adalora, "experts.growth_rank=4"])
    first, grown = expert_adapter(cfg), expert_adapter(cfg, grown=True)
    assert isinstance(grown, AdaLoRAConfig) and isinstance(first, AdaLoRAConfig)
    assert (first.rank, first.alpha) == (8, 16.0)
    assert (grown.rank, grown.alpha, grown.target_rank) == (4, 8.0, 2)  # alpha / rank kept
    same = load_config(configs / "split_fashion.yaml", [adalora])
    assert expert_adapter(same, grown=True) == same.adapter
    with pytest.raises(ValueError, match=r"experts.growth_rank=1 with the adapter: target_rank"):
        load_config(configs / "split_fashion.yaml", [adalora, "experts.growth_rank=1"])
    with pytest.raises(ValueError, match=r"growth_rank must be >= 0"):
        load_config(configs / "split_fashion.yaml", ["experts.growth_rank=-1"])


@pytest.mark.slow
@needs_fashion_mnist
def test_a_run_with_adalora_experts_ends_each_at_the_target_rank_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    pytest.importorskip("avalanche")
    from moracl.config import from_dict
    from moracl.continual.checkpoint import load_checkpoint
    from moracl.continual.config import RunConfig
    from moracl.jobs.continual import run

    def config(out: Path) -> RunConfig:
        data = {
            "job": "run",
            "scenario": {
                "name": "split-fashion",
                "setting": "task",
                "options": {"per_class": 20, "test_per_class": 10},
            },
            # 40 rows per experience in batches of 16: 3 steps, the last one final
            "adapter": {"kind": "adalora", "rank": 4, "target_rank": 2, "alpha": 8.0, "tfinal": 1},
            "strategies": ["moracl"],
            "train": {"epochs": 1, "batch_size": 16, "lr": 2e-2, "head_lr": 2e-2},
            "output_dir": str(out),
        }
        return from_dict(RunConfig, data)

    run(config(tmp_path / "full"), progress=False, stop_after=2)
    full = load_checkpoint(tmp_path / "full").tensors["moracl"]
    out = tmp_path / "resumed"
    run(config(out), progress=False, stop_after=0)
    after = [load_checkpoint(out).tensors["moracl"]]
    for k in (1, 2):
        run(config(out), progress=False, resume=True, stop_after=k)
        after.append(load_checkpoint(out).tensors["moracl"])
    assert after[-1].keys() == full.keys()
    assert all(torch.equal(after[-1][n], full[n]) for n in full)  # resumed exactly
    for k, state in enumerate(after):
        masks = [t for n, t in state.items() if n.endswith(f".banks.{k}.rank_mask")]
        assert masks and all(tuple(m.shape) == (1, 4) for m in masks)
        assert sum(int(m.sum()) for m in masks) == 2 * len(masks)  # target_rank x layers
        mine = [n for n in state if f".banks.{k}." in n]
        assert all(torch.equal(state[n], full[n]) for n in mine)  # bit-identical since
