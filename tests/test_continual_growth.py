"""Expert growth between experiences: warm-started experts, the new task's initial gates, and
old tasks' outputs left bit-identical."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("avalanche")

from moracl import AdapterConfig, MoRAModel
from moracl.continual.model import ContinualClassifier
from moracl.continual.strategy import GrowthConfig, grow_experts
from moracl.experts.mixture import ExpertGroup, MixtureConfig
from moracl.experts.routers.config import RouterConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _model(router: RouterConfig) -> ContinualClassifier:
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False)
    expert = AdapterConfig(kind="lora", rank=2, alpha=4.0)  # type: ignore[call-arg]
    mixture = MixtureConfig(router=router, groups=(ExpertGroup(expert, 1),))
    encoder = MoRAModel(base, mixture, target_modules=["0", "2"])
    return ContinualClassifier(
        encoder,
        5,
        [[0, 1], [2, 3], [4, 5]],
        multi_head=True,
        route_by_task=router.type == "task",
    )


def _train_a_little(model: ContinualClassifier) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("warm", [True, False])
def test_new_experts_start_as_copies_of_the_newest_ones(warm: bool) -> None:
    model = _model(RouterConfig(type="task", num_tasks=1, task_weights=True))
    _train_a_little(model)
    growth = GrowthConfig(adapter=AdapterConfig(kind="lora", rank=2, alpha=4.0), warm_start=warm)  # type: ignore[call-arg]
    x = torch.randn(7, 6)
    task0 = torch.zeros(7, dtype=torch.long)
    before = model(x, task0)
    grow_experts(model, 1, growth)
    model.route_tasks(2)
    assert torch.equal(model(x, task0), before)  # old task: bit-identical
    assert isinstance(model.encoder, MoRAModel)
    for _, mixture in model.encoder.mixtures():
        old, new = mixture.expert_banks()
        assert all(not p.requires_grad for p in old.parameters())
        pairs = zip(old.state_dict().values(), new.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs) == warm
        router = mixture.router
        gates = router.task_logits[1].detach().softmax(-1)  # type: ignore[index]
        # the new task's own expert carries most of the gate from the start
        assert float(gates[1]) == pytest.approx(math.exp(4.0) / (1.0 + math.exp(4.0)))
        assert float(router.task_logits.detach()[0, 1]) == 0.0  # type: ignore[index]  (old task: masked)


def test_expert_rank_overrides_the_adapter_rank_at_the_same_scaling() -> None:
    from moracl.config import load_config
    from moracl.continual.factory import expert_adapter, moracl_router

    cfg = load_config(CONFIGS / "digit_domains.yaml", ["experts.rank=2", "adapter.rank=4"])
    expert = expert_adapter(cfg)
    assert (expert.rank, expert.alpha) == (2, 4.0)  # alpha / rank kept at 8 / 4
    same = load_config(CONFIGS / "digit_domains.yaml", ["experts.rank=0"])
    assert expert_adapter(same) == same.adapter
    with pytest.raises(ValueError, match=r"experts: rank must be >= 0 \(0: adapter.rank\), got -1"):
        load_config(CONFIGS / "digit_domains.yaml", ["experts.rank=-1"])
    # top-1 routing without task labels uses Switch gates, so the task loss trains the router
    one = load_config(
        CONFIGS / "digit_domains.yaml", ["experts.routing.k=1", "experts.per_experience=1"]
    )
    assert moracl_router(one, task_aware=False).normalize is False
    assert moracl_router(cfg, task_aware=False).normalize is True
    # k = 2 renormalised gates: alpha doubles, so two rank-2 experts add up to one rank-4 LoRA
    top2 = moracl_router(cfg, task_aware=False)
    assert top2.k == 2 and expert_adapter(cfg, top2).alpha == 8.0
    switch = moracl_router(one, task_aware=False)
    assert expert_adapter(one, switch) == expert_adapter(one)  # Switch gates: no k factor
    auto = load_config(CONFIGS / "digit_domains.yaml", ["experts.routing={mode: auto}"])
    by_task = moracl_router(auto, task_aware=True)
    assert by_task.type == "task" and expert_adapter(auto, by_task).alpha == 4.0


def test_two_evenly_gated_experts_equal_one_lora_of_their_joint_rank() -> None:
    """What the k factor of ``expert_adapter`` buys: top-2 of two rank-2 experts with equal
    gates gives exactly the output of one rank-4 LoRA holding both experts (float64)."""
    from moracl.config import load_config
    from moracl.continual.factory import expert_adapter, moracl_router

    cfg = load_config(CONFIGS / "digit_domains.yaml", [])  # adapter r 4, two r-2 experts, top-2
    router = moracl_router(cfg, task_aware=False)
    expert = expert_adapter(cfg, router)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5)).double()
    mixture = MixtureConfig(router=router, groups=(ExpertGroup(expert, 2),))
    moe = MoRAModel(copy.deepcopy(base), mixture, target_modules=["0"]).double()
    lora = MoRAModel(copy.deepcopy(base), cfg.adapter, target_modules=["0"]).double()
    assert isinstance(cfg.adapter, AdapterConfig)
    params = dict(moe.named_parameters())
    prefix = next(n for n in params if n.endswith("banks.0.lora_A")).removesuffix("lora_A")
    with torch.no_grad():
        params[prefix + "lora_B"].normal_()
        params[prefix.replace("banks.0.", "router.weight")].zero_()  # equal logits: gates 1/2
        a = params[prefix + "lora_A"]  # (experts, r, in)
        b = params[prefix + "lora_B"]  # (out, experts, r)
        single = dict(lora.named_parameters())
        single[next(n for n in single if n.endswith("lora_A"))].copy_(a.flatten(0, 1))
        single[next(n for n in single if n.endswith("lora_B"))].copy_(b.flatten(1))
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(moe(x), lora(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(moe(x), base(x))  # the adapters do contribute
