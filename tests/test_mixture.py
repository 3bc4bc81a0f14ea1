"""Mixtures of adapter experts: dense-masked compute against the per-expert loop, routing
through the model wrapper, task routing, growth with frozen experts and masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moracl import AdapterConfig, MoRAModel
from moracl.experts.mixture import ExpertGroup, Mixture, MixtureConfig
from moracl.experts.routers.config import RouterConfig
from tests.numerics import assert_close_to_scale

from .conftest import mlp

ROUTERS = {
    "topk": RouterConfig(type="topk", k=2),
    "dynamic": RouterConfig(type="dynamic", top_p=0.6, max_experts=3),
    "task": RouterConfig(type="task", num_tasks=2, task_weights=True),
    "soft": RouterConfig(type="soft"),
    "hierarchical": RouterConfig(type="hierarchical", groups=2, k=1),
}
EXPERTS = {
    "lora": {"kind": "lora", "rank": 3, "experts": 4},
    "mora": {"kind": "mora", "rank": 2, "experts": 4},
    "mixed": {
        "groups": (
            ExpertGroup(AdapterConfig(kind="lora", rank=3, alpha=6.0), 3),
            ExpertGroup(AdapterConfig(kind="mora", rank=2), 1),
        )
    },
}


def _mixture(router: str, experts: str, d_in: int = 20, d_out: int = 28) -> Mixture:
    cfg = MixtureConfig(router=ROUTERS[router], **EXPERTS[experts])
    mix = Mixture.from_config(d_in, d_out, cfg).double().train()
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return mix


@pytest.mark.parametrize("experts", sorted(EXPERTS))
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_dense_masked_equals_the_per_expert_loop(router: str, experts: str) -> None:
    mix = _mixture(router, experts)
    x = torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True)
    task_ids = torch.tensor([0, 1])
    result = mix.route(x, task_ids if router == "task" else None)
    gates = result.gates.detach()
    assert gates.shape == (10, mix.num_experts)
    params = [x, *(p for p in mix.banks.parameters())]
    out = mix.mix(x, gates)
    ref = mix.naive_delta(x, gates)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_fixed_gates_give_the_dense_update() -> None:
    mix = _mixture("task", "mixed")
    gates = torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    x = torch.randn(6, 20, dtype=torch.float64)
    torch.testing.assert_close(
        mix.mix(x, gates.expand(6, 4)), x @ mix.delta_weight(gates=gates).T, rtol=0, atol=1e-10
    )


def _model(router: RouterConfig, experts: int = 4) -> MoRAModel:
    cfg = MixtureConfig(kind="lora", rank=4, experts=experts, router=router)
    model = MoRAModel(mlp(24, 40, 12), cfg, target_modules="all-linear")
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            for bank in layer.adapter("default").banks:
                bank.lora_B.normal_(0, 0.3)
    return model


def test_the_wrapper_collects_aux_loss_and_statistics() -> None:
    model = _model(RouterConfig(type="topk", k=2, balance_weight=0.1, z_weight=0.01))
    x, y = torch.randn(16, 24), torch.randn(16, 12)
    out = model(x)
    assert set(model.last_routing) == {"0.adapters.default", "2.adapters.default"}
    expected = sum(r.aux_loss for r in model.last_routing.values())
    torch.testing.assert_close(model.aux_loss(), expected)
    assert model.aux_loss() > 0
    loss = nn.functional.mse_loss(out, y) + model.aux_loss()
    loss.backward()
    routers = [m.router for _, m in model.mixtures()]
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for r in routers for p in r.parameters()
    )
    stats = model.routing_stats()["0.adapters.default"]
    torch.testing.assert_close(stats.experts_per_token, torch.tensor(2.0))
    # the mixture leaves nothing behind on itself
    assert all(m.context is None for _, m in model.mixtures())


def test_task_routing_of_a_mixed_batch_equals_each_task_alone() -> None:
    model = _model(RouterConfig(type="task", num_tasks=2, task_weights=True))
    x = torch.randn(6, 24)
    tasks = torch.tensor([0, 1, 1, 0, 1, 0])
    mixed = model(x, task_ids=tasks)
    for t in (0, 1):
        rows = tasks == t
        alone = model(x[rows], task_ids=tasks[rows])
        assert_close_to_scale(mixed[rows], alone, 1e-5)  # other batch shapes round apart
    with pytest.raises(ValueError, match="task id 2 out of range"):
        model(x, task_ids=torch.full((6,), 2))


def test_growth_with_frozen_experts_and_masks_keeps_old_tasks_bit_identical() -> None:
    torch.manual_seed(0)
    model = _model(RouterConfig(type="task", num_tasks=1, task_weights=True), experts=2)
    x = torch.randn(8, 24)
    old = torch.zeros(8, dtype=torch.long)
    before = model(x, task_ids=old).detach().clone()
    for _, mix in model.mixtures():
        mix.freeze_experts()
        mix.grow(AdapterConfig(kind="lora", rank=4), 2)
        mix.router.set_expert_mask(1, torch.tensor([False, False, True, True]))
    model.set_adapter("default")  # refresh which parameters train
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1
    )
    new = torch.ones(8, dtype=torch.long)
    for _ in range(3):
        loss = model(x, task_ids=new).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model(x, task_ids=old), before)
    assert not torch.equal(model(x, task_ids=new), before)


def test_save_and_load_a_mixture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = mlp(24, 40, 12)
    cfg = MixtureConfig(kind="mora", rank=2, experts=3, router=RouterConfig(type="topk", k=2))
    model = MoRAModel(base, cfg, target_modules="all-linear").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    again = MoRAModel.from_pretrained(base, tmp_path).eval()
    x = torch.randn(4, 24)
    assert torch.equal(again(x), model(x))
    assert isinstance(again.adapter_configs["default"], MixtureConfig)


def test_mixture_errors() -> None:
    with pytest.raises(ValueError, match="cannot be a mixture expert"):
        Mixture.from_config(8, 8, MixtureConfig(kind="vera", rank=2, experts=2))
    with pytest.raises(ValueError, match="experts must be a positive integer"):
        MixtureConfig(kind="lora", experts=0)


@pytest.mark.parametrize("kinds", ["lora", "mixed"])
def test_task_export_to_peft_reproduces_the_task(tmp_path, kinds: str) -> None:  # type: ignore[no-untyped-def]
    peft = pytest.importorskip("peft")
    from .conftest import tiny_llama

    base = tiny_llama()
    router = RouterConfig(type="task", num_tasks=2, task_weights=True)
    cfg = MixtureConfig(router=router, **EXPERTS[kinds])
    model = MoRAModel(base, cfg, target_modules=["q_proj", "v_proj", "down_proj"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids, task_ids=torch.tensor([1, 1])).logits
        plain = base(input_ids=ids).logits
        assert (expected - plain).abs().max() > 1e-3
        model.export_task_peft(tmp_path / "task1", 1)
        loaded = peft.PeftModel.from_pretrained(tiny_llama_copy(base), tmp_path / "task1").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        merged = model.merged_task_model(1)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def tiny_llama_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize(
    "router",
    ["topk", "topk-switch", "task", "dynamic", "soft", "hierarchical", "hierarchical-task"],
)
def test_fused_mixture_layer_matches_the_loop_with_router_gradients(
    router: str, masks: bool
) -> None:
    """The fused node (frozen matmul, router logits folded into the experts' matmul, gates,
    experts) against plain autograd through the router and the per-expert loop: outputs,
    gates, auxiliary losses and the gradients of all of them, in float64, training mode
    (noise drawn from the same seed)."""
    from moracl import MoRALinear
    from moracl.experts.mixture import RoutingContext

    task_outer = RouterConfig(type="task", num_tasks=2, task_weights=True)
    routers = {
        **ROUTERS,
        "hierarchical-task": RouterConfig(type="hierarchical", groups=2, k=1, outer=task_outer),
        "topk-switch": RouterConfig(type="topk", k=1, normalize=False),
    }
    cfg = MixtureConfig(kind="lora", rank=3, experts=4, router=routers[router])
    layer = MoRALinear(nn.Linear(20, 28).double(), cfg).double().train()
    mix = layer.adapter("default")
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    by_task = router in ("task", "hierarchical-task")
    task_ids = torch.tensor([0, 1, 1]) if by_task or masks else None
    if masks and not by_task:
        mix.router.set_expert_mask(0, [True, False, True, False])
        mix.router.set_expert_mask(1, [False, True, True, True])
    x = torch.randn(3, 5, 20, dtype=torch.float64, requires_grad=True)
    mix.context = RoutingContext(task_ids=task_ids)
    torch.manual_seed(7)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_RoutedLoRALinearBackward"
    got_routing = mix.context.results[mix]
    mix.context = None
    torch.manual_seed(7)
    want_routing = mix.route(x, task_ids)
    ref = layer.base_layer(x) + mix.naive_delta(x, want_routing.gates)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_routing.gates, want_routing.gates, rtol=0, atol=1e-12)
    assert torch.equal(got_routing.chosen, want_routing.chosen)
    assert set(got_routing.aux_losses) == set(want_routing.aux_losses)
    torch.testing.assert_close(got_routing.aux_loss, want_routing.aux_loss, rtol=0, atol=1e-12)
    g, gp = torch.randn_like(out), torch.randn_like(ref.new_empty(want_routing.probs.shape))

    def loss(y: torch.Tensor, routing) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return (y * g).sum() + 3.0 * routing.aux_loss + (routing.probs * gp).sum()

    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    got = torch.autograd.grad(loss(out, got_routing), params, allow_unused=True)
    want = torch.autograd.grad(loss(ref, want_routing), params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_task_ids_are_read_back_once_per_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or original(t))
    model = _model(RouterConfig(type="task", num_tasks=2))
    model(torch.randn(6, 24), task_ids=torch.tensor([0, 1, 1, 0, 1, 0]))
    assert len(calls) == 1 and len(list(model.mixtures())) == 2
    model(torch.randn(6, 24), task_ids=torch.tensor([0, 1, 1, 0, 1, 0]))
    assert len(calls) == 2  # checked again in the next forward (nothing cached across them)


def test_a_graphed_step_refuses_host_tensors() -> None:
    from moracl.cuda_graphs import GraphedStep

    with pytest.raises(ValueError, match="input 0 must be a CUDA tensor, got cpu"):
        GraphedStep(lambda x: x, torch.zeros(2))


class _TwoCalls(nn.Module):
    """Runs one linear layer on two groups of rows, as a length-bucketing encoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.proj(x[:2]), self.proj(x[2:])])


def test_a_layer_called_twice_reports_the_routing_of_both_calls() -> None:
    torch.manual_seed(0)
    cfg = MixtureConfig(kind="lora", rank=2, experts=4, router=RouterConfig(type="topk", k=2))
    model = MoRAModel(_TwoCalls().double(), cfg, target_modules=["proj"]).train()
    mix = next(m for _, m in model.mixtures())
    x = torch.randn(5, 3, 6, dtype=torch.float64)  # 2 rows then 3 rows: 6 + 9 tokens
    model.eval()  # no noise: both paths route deterministically
    model(x)
    got = model.last_routing[next(p for p, _ in model.mixtures())]
    first, second = mix.route(x[:2]), mix.route(x[2:])
    assert got.gates.shape == (15, 4)
    torch.testing.assert_close(got.gates, torch.cat([first.gates, second.gates]), rtol=0, atol=0)
    assert got.indices is not None and got.indices.shape == (15, 2)
    for name in ("balance", "z"):  # token-weighted: every token counts once
        want = (6 * first.aux_losses[name] + 9 * second.aux_losses[name]) / 15
        torch.testing.assert_close(got.aux_losses[name], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.aux_loss(), got.aux_loss.float(), rtol=1e-6, atol=0)


def test_merged_task_model_in_float64_equals_the_routed_forward() -> None:
    """A float64 model's task update is read in float64 (the router is not fed float32)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2)).double()
    config = MixtureConfig(
        groups=(ExpertGroup(AdapterConfig(kind="lora", rank=2), 4),),
        router=RouterConfig(type="task", num_tasks=2, task_weights=True),
    )
    model = MoRAModel(base, config).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(3, 8, dtype=torch.float64)
    for t in (0, 1):
        routed = model(x, task_ids=torch.full((3,), t))
        assert_close_to_scale(model.merged_task_model(t)(x), routed, 1e-12)  # values ~400
