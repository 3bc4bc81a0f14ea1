"""Routers: gates, losses and statistics against hand-computed values; composition, masks,
growth, errors, torch.compile and bf16 autocast."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moracl.adapters.base import ParamRole, iter_param_roles
from moracl.experts import (
    ROUTERS,
    HierarchicalRouter,
    Router,
    RouterConfig,
    RouterType,
    RoutingResult,
    TaskRouter,
    build_router,
    load_balance_loss,
    router_z_loss,
)

D, E = 6, 8

# One row per registered router (and the interesting variants); E experts must suit each.
CONFIGS = [
    {"type": "topk", "k": 2},
    {"type": "topk", "k": 1, "noise": False},
    {"type": "dynamic", "top_p": 0.6, "min_experts": 1, "max_experts": 3},
    {"type": "task", "num_tasks": 2},
    {"type": "task", "num_tasks": 4, "task_weights": True},
    {"type": "hierarchical", "groups": 2, "k": 2},
    {
        "type": "hierarchical",
        "groups": 2,
        "outer": {"type": "task", "num_tasks": 2},
        "inner": {"type": "hierarchical", "groups": 2, "k": 1},
    },
    {"type": "soft"},
]


def _ids(cfg: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in cfg.items() if not isinstance(v, dict))


def _router(cfg: dict, d: int = D, e: int = E, scale: float = 1.0) -> Router:
    """A router with random (not small) parameters, so routing is far from uniform."""
    router = build_router(RouterConfig.from_dict(cfg), d, e).double()
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return router


def _task_ids(n: int, tasks: int) -> torch.Tensor:
    return torch.arange(n) % tasks


def _needs_tasks(router: Router) -> bool:
    return any(isinstance(m, TaskRouter) for m in router.modules())


def _call(router: Router, x: torch.Tensor) -> RoutingResult:
    return router(x, task_ids=_task_ids(x.shape[0], 2) if _needs_tasks(router) else None)


def test_every_built_in_router_is_in_the_table() -> None:
    # routers registered from outside (test_extending.py) have tests of their own
    assert {c["type"] for c in CONFIGS} == {t.value for t in RouterType} <= set(ROUTERS.names())


# -- properties every router has -------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("training", [False, True])
def test_gates_are_a_distribution_over_the_chosen_experts(cfg: dict, training: bool) -> None:
    router = _router(cfg).train(training)
    x = torch.randn(10, D, dtype=torch.float64)
    before = set(vars(router))
    res = _call(router, x)
    assert set(vars(router)) == before  # nothing stashed on the module during forward
    assert res.gates.shape == res.probs.shape == res.chosen.shape == (10, E)
    assert torch.allclose(res.gates.sum(-1), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(res.probs.sum(-1), torch.ones(10, dtype=torch.float64))
    assert (res.gates >= 0).all()
    assert (res.gates[~res.chosen] == 0).all()
    assert res.chosen.any(-1).all()
    if res.indices is not None:  # indices name exactly the chosen experts (or zero-gate extras)
        picked = torch.zeros_like(res.chosen).scatter(-1, res.indices, True)
        assert (picked | ~res.chosen).all()
        assert (res.gates[~picked] == 0).all()
    stats = res.stats
    assert torch.allclose(stats.usage, res.chosen.double().mean(0))
    assert torch.allclose(stats.experts_per_token, res.chosen.double().sum(-1).mean())
    assert not stats.entropy.requires_grad
    assert res.aux_loss.shape == ()
    assert set(res.aux_losses) == set(res.aux_weights)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_route_logits_from_a_fused_matmul_equals_forward(cfg: dict) -> None:
    router = _router(cfg).eval()
    x = torch.randn(7, D, dtype=torch.float64)
    down = torch.randn(E * 4, D, dtype=torch.float64)  # the experts' stacked down projections
    fused = F.linear(x, torch.cat([down, router.logit_weights()]))  # one matmul
    assert router.logit_weights().shape == (router.num_logits, D)
    tids = _task_ids(7, 2) if _needs_tasks(router) else None
    got = router.route_logits(fused[:, E * 4 :], task_ids=tids)
    want = router(x, task_ids=tids)
    assert torch.allclose(got.gates, want.gates)
    for name, loss in want.aux_losses.items():
        assert torch.allclose(got.aux_losses[name], loss)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_logit_parts_are_the_logit_rows_as_the_router_holds_them(cfg: dict) -> None:
    """The blocks a fused node stacks are ``logit_weights()``'s rows in order, and each
    trainable block is the parameter itself (no copy between it and the node)."""
    router = _router(cfg)
    parts = router.logit_parts()
    assert torch.equal(torch.cat(parts), router.logit_weights())
    params = {id(p) for p in router.parameters()}
    assert all(id(p) in params for p in parts if p.requires_grad)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_config_round_trips_and_parameters_are_tagged_router(cfg: dict) -> None:
    config = RouterConfig.from_dict(cfg)
    plain = json.loads(json.dumps(config.to_dict()))
    assert RouterConfig.from_dict(plain) == config
    router = build_router(config, D, E)
    tagged = {name: role for name, _, role in iter_param_roles(router)}
    assert set(tagged) == {name for name, _ in router.named_parameters()}
    assert set(tagged.values()) <= {ParamRole.ROUTER}


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_grow_keeps_old_rows_and_old_tasks_routing(cfg: dict) -> None:
    router = _router(cfg).eval()
    if router.num_tasks == 0:
        router.set_expert_mask(0, torch.ones(E, dtype=torch.bool))
    x = torch.randn(9, D, dtype=torch.float64)
    task0 = torch.zeros(9, dtype=torch.long)
    before = router(x, task_ids=task0)
    old = {k: v.clone() for k, v in router.state_dict().items() if v.dtype != torch.bool}
    n_new = router.group_size if isinstance(router, HierarchicalRouter) else 3
    router.grow(n_new)
    assert router.num_experts == E + n_new
    for key, value in router.state_dict().items():
        if value.dtype == torch.bool:
            continue
        if key in old:
            head = tuple(slice(0, s) for s in old[key].shape)
            assert torch.equal(value[head], old[key]), key  # old rows bit-identical
            tail = value.clone()
            tail[head] = 0
            assert (tail == 0).all(), key  # new rows zero
        else:
            assert (value == 0).all(), key  # a new sub-router starts at zero
    assert not router.expert_masks[:, E:].any()  # old tasks don't see the new experts
    assert router.global_mask[E:].all()
    after = router(x, task_ids=task0)
    assert torch.allclose(after.gates[:, :E], before.gates)
    assert (after.gates[:, E:] == 0).all()


# -- top-k -----------------------------------------------------------------------------------
LOGITS = [[1.0, 2.0, 0.0, -1.0], [0.5, 0.1, 3.0, 0.2], [2.0, 2.5, -1.0, 0.0]]


def _softmax(values: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in values)
    return [math.exp(v) / z for v in values]


def test_topk_matches_hand_computed_gates_losses_and_stats() -> None:
    router = build_router(RouterConfig(k=2, noise=False), 3, 4).double().eval()
    res = router.route_logits(torch.tensor(LOGITS, dtype=torch.float64))
    n, e, k = 3, 4, 2
    want_gates = [[0.0] * e for _ in range(n)]
    counts = [0] * e
    for t, row in enumerate(LOGITS):
        top = sorted(range(e), key=lambda j: -row[j])[:k]
        for j, g in zip(top, _softmax([row[j] for j in top])):
            want_gates[t][j] = g
            counts[j] += 1
    assert counts == [3, 2, 1, 0]
    assert torch.allclose(res.gates, torch.tensor(want_gates, dtype=torch.float64))
    assert res.indices is not None and res.indices.tolist() == [[1, 0], [2, 0], [1, 0]]

    probs = [_softmax(row) for row in LOGITS]
    p_mean = [sum(p[j] for p in probs) / n for j in range(e)]
    balance = e * sum(counts[j] / (n * k) * p_mean[j] for j in range(e))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / n
    assert res.aux_losses["balance"].item() == pytest.approx(balance, rel=1e-12)
    assert res.aux_losses["z"].item() == pytest.approx(z, rel=1e-12)
    assert res.aux_loss.item() == pytest.approx(0.01 * balance + 1e-3 * z, rel=1e-12)

    entropy = sum(-sum(q * math.log(q) for q in p) for p in probs) / n
    assert res.stats.entropy.item() == pytest.approx(entropy, rel=1e-12)
    assert res.stats.usage.tolist() == pytest.approx([c / n for c in counts])
    assert res.stats.experts_per_token.item() == 2.0


def test_losses_are_one_and_zero_gradient_free_for_uniform_routing() -> None:
    probs = torch.full((6, 3), 1 / 3, dtype=torch.float64)
    chosen = torch.eye(3, dtype=torch.bool).repeat(2, 1)
    assert load_balance_loss(probs, chosen).item() == pytest.approx(1.0)
    logits = torch.zeros(6, 3, dtype=torch.float64)
    assert router_z_loss(logits).item() == pytest.approx(math.log(3) ** 2)


def test_gradients_reach_the_router_and_its_noise() -> None:
    router = build_router(RouterConfig(k=2), D, E).train()
    assert router.noise_weight is not None
    x = torch.randn(32, D)
    res = router(x)
    target = torch.randn(32, E)
    ((res.gates * target).sum() + res.aux_loss).backward()
    for p in (router.weight, router.noise_weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_noise_is_active_only_in_training() -> None:
    router = _router({"type": "topk", "k": 2})
    x = torch.randn(16, D, dtype=torch.float64)
    router.eval()
    assert torch.equal(router(x).gates, router(x).gates)
    router.train()
    assert not torch.equal(router(x).gates, router(x).gates)


def test_topk_with_fewer_allowed_experts_than_k() -> None:
    router = _router({"type": "topk", "k": 2, "num_tasks": 1}).eval()
    only = torch.zeros(E, dtype=torch.bool)
    only[5] = True
    router.set_expert_mask(0, only)
    res = router(torch.randn(4, D, dtype=torch.float64), task_ids=torch.zeros(4, dtype=torch.long))
    assert (res.gates[:, 5] == 1).all() and res.gates.sum() == 4
    assert res.stats.experts_per_token.item() == 1.0
    assert torch.isfinite(res.aux_loss)


# -- masks -------------------------------------------------------------------------------------
def test_task_masks_per_row_and_the_global_mask() -> None:
    router = _router({"type": "topk", "k": 2, "num_tasks": 2}).eval()
    first = torch.arange(E) < E // 2
    router.set_expert_mask(0, first)
    router.set_expert_mask(1, ~first)
    x = torch.randn(12, D, dtype=torch.float64)
    tids = _task_ids(12, 2)
    res = router(x, task_ids=tids)
    allowed = torch.stack([first, ~first])[tids]  # (n, e)
    assert (res.chosen & ~allowed).sum() == 0 and (res.gates[~allowed] == 0).all()
    assert torch.allclose(res.gates.sum(-1), torch.ones(12, dtype=torch.float64))
    # each row routes as a router restricted to its task's experts would
    for task, mask in ((0, first), (1, ~first)):
        rows = tids == task
        sub = build_router(RouterConfig(k=2), D, E // 2).double().eval()
        with torch.no_grad():
            sub.weight.copy_(router.weight[mask])
        want = sub(x[rows]).gates
        assert torch.allclose(res.gates[rows][:, mask], want)
    # without task ids: the global mask
    assert router(x).chosen[:, ~first].any()
    router.set_expert_mask(None, first)
    assert not router(x).chosen[:, ~first].any()
    # appending a task
    router.set_expert_mask(2, torch.ones(E, dtype=torch.bool))
    assert router.num_tasks == 3


# -- dynamic -----------------------------------------------------------------------------------
PROBS = [[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]


@pytest.mark.parametrize(
    ("options", "counts"),
    [
        ({}, [1, 2, 2]),  # the flatter the distribution, the more experts
        ({"top_p": 0.9}, [3, 4, 4]),
        ({"min_experts": 2}, [2, 2, 2]),
        ({"top_p": 0.9, "max_experts": 2}, [2, 2, 2]),
    ],
)
def test_dynamic_keeps_the_smallest_prefix_reaching_top_p(options: dict, counts: list) -> None:
    cfg = RouterConfig(type="dynamic", noise=False, **options)
    router = build_router(cfg, 3, 4).double().eval()
    res = router.route_logits(torch.tensor(PROBS, dtype=torch.float64).log())
    want = torch.zeros(3, 4, dtype=torch.float64)
    for t, (row, c) in enumerate(zip(PROBS, counts)):
        top = sorted(range(4), key=lambda j: (-row[j], j))[:c]
        for j in top:
            want[t, j] = row[j] / sum(row[i] for i in top)
    assert res.chosen.sum(-1).tolist() == counts
    assert torch.allclose(res.gates, want)
    assert res.stats.experts_per_token.item() == pytest.approx(sum(counts) / 3)
    assert res.indices is not None and res.indices.shape == (3, cfg.max_experts or 4)


# -- task --------------------------------------------------------------------------------------
def test_task_router_routes_mixed_rows_to_their_tasks_experts() -> None:
    router = build_router(RouterConfig(type="task", num_tasks=3), D, 6).double()
    tids = torch.tensor([2, 0, 1, 0, 2])
    want = torch.zeros(5, 6, dtype=torch.float64)
    for row, t in enumerate(tids.tolist()):
        want[row, 2 * t : 2 * t + 2] = 0.5  # task t owns experts 2t and 2t + 1
    for training in (True, False):
        res = router.train(training)(torch.randn(5, D, dtype=torch.float64), task_ids=tids)
        assert torch.equal(res.gates, want)
        assert res.aux_losses == {} and res.aux_loss.item() == 0.0


def test_task_router_learned_weights_over_owned_experts() -> None:
    router = build_router(RouterConfig(type="task", num_tasks=2, task_weights=True), D, 4)
    router = router.double()
    with torch.no_grad():
        router.task_logits.copy_(torch.tensor([[0.0, 1.0, 5.0, 5.0], [9.0, 9.0, 2.0, 0.0]]))
    res = router(torch.randn(2, D, dtype=torch.float64), task_ids=torch.tensor([0, 1]))
    want = [[*_softmax([0.0, 1.0]), 0.0, 0.0], [0.0, 0.0, *_softmax([2.0, 0.0])]]
    assert torch.allclose(res.gates, torch.tensor(want, dtype=torch.float64))
    res.gates[:, 1].sum().backward()
    assert router.task_logits.grad is not None and router.task_logits.grad.abs().sum() > 0
    router.set_expert_mask(2, torch.tensor([False, True, True, False]))  # a new task
    assert router.task_logits.shape == (3, 4)


# -- hierarchical ------------------------------------------------------------------------------
def _expected_composition(router: HierarchicalRouter, x: torch.Tensor, tids) -> torch.Tensor:
    outer = router.outer(x, task_ids=tids)
    parts = [inner(x, task_ids=tids).gates for inner in router.inner]  # each (n, s)
    return torch.cat([outer.gates[:, h, None] * g for h, g in enumerate(parts)], dim=-1)


@pytest.mark.parametrize("training", [False, True])
def test_hierarchical_equals_the_composition_of_its_routers(training: bool) -> None:
    cfg = {
        "type": "hierarchical",
        "groups": 3,
        "outer": {"type": "topk", "k": 2, "noise": False},
        "inner": {"type": "topk", "k": 2, "noise": False},
    }
    router = _router(cfg, e=12).train(training)
    assert isinstance(router, HierarchicalRouter)
    x = torch.randn(20, D, dtype=torch.float64)
    res = router(x)
    assert torch.allclose(res.gates, _expected_composition(router, x, None))
    assert res.chosen.sum(-1).eq(4).all() and res.indices is not None
    assert res.indices.shape == (20, 4)
    assert torch.equal(torch.zeros_like(res.chosen).scatter(-1, res.indices, True), res.chosen)

    outer = router.outer(x)
    for name, loss in outer.aux_losses.items():
        assert torch.allclose(res.aux_losses[f"group.{name}"], loss)
    # the inner losses count only the tokens sent to each group, weighted by their number
    rows = [outer.chosen[:, h] for h in range(3)]
    share = torch.stack([r.sum() for r in rows]).double() / sum(r.sum() for r in rows)
    for name in ("balance", "z"):
        per_group = torch.stack(
            [inner(x[r]).aux_losses[name] for inner, r in zip(router.inner, rows)]
        )
        assert torch.allclose(res.aux_losses[f"expert.{name}"], (share * per_group).sum())


def test_hierarchical_with_a_task_outer_and_three_levels() -> None:
    cfg = {
        "type": "hierarchical",
        "groups": 2,
        "outer": {"type": "task", "num_tasks": 2},
        "inner": {"type": "hierarchical", "groups": 2, "k": 1, "noise": False},
    }
    router = _router(cfg).eval()
    assert isinstance(router, HierarchicalRouter)
    x = torch.randn(8, D, dtype=torch.float64)
    tids = _task_ids(8, 2)
    res = router(x, task_ids=tids)
    assert torch.allclose(res.gates, _expected_composition(router, x, tids))
    # task t owns group t: its rows never leave experts [4t, 4t + 4)
    group = torch.arange(E) // (E // 2)
    assert not (res.chosen & (group[None, :] != tids[:, None])).any()
    assert res.chosen.sum(-1).eq(1).all()  # top-1 of top-1 inside the task's group
    with pytest.raises(ValueError, match="task_ids"):
        router(x)


def test_hierarchical_grows_by_whole_groups() -> None:
    router = _router({"type": "hierarchical", "groups": 2, "k": 1})
    with pytest.raises(ValueError, match="whole groups of 4"):
        router.grow(3)
    assert router.num_experts == E and router.num_groups == 2  # nothing changed
    router.grow(8)
    assert router.num_groups == 4 and router.outer.num_experts == 4


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: build_router(RouterConfig(k=3), D, 2), r"k=3 .*number of experts \(2\)"),
        (lambda: RouterConfig(type="nope"), r"unknown router 'nope'; expected one of \["),
        (
            lambda: RouterConfig.from_dict({"kk": 1}),
            r"\['kk'\] for the topk router; valid keys: \[",
        ),
        (lambda: RouterConfig(k=0), "k must be an integer >= 1, got 0"),
        (lambda: RouterConfig(type="dynamic", top_p=1.5), "top_p must be in"),
        (lambda: RouterConfig(top_p=0.5), r"\['top_p'\] for the topk router; valid keys: \["),
        (lambda: RouterConfig(balance_weight=-1.0), "balance_weight"),
        (lambda: RouterConfig(type="dynamic", min_experts=3, max_experts=2), "max_experts=2"),
        (lambda: RouterConfig(groups=2), r"\['groups'\] for the topk router; valid keys"),
        (lambda: RouterConfig(type="task"), "num_tasks >= 1"),
        (lambda: RouterConfig(type="hierarchical"), "groups >= 1"),
        (lambda: RouterConfig(type="hierarchical", groups=2, inner={"k": 0}), "k must be"),
        (lambda: build_router(RouterConfig(type="hierarchical", groups=3), D, 8), "divisible"),
        (lambda: build_router(RouterConfig(type="task", num_tasks=3), D, 2), "one expert per"),
        (lambda: build_router(RouterConfig(type="dynamic", min_experts=5), D, 4), "min_experts=5"),
    ],
)
def test_bad_configs_raise_value_errors_naming_the_value(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_task_ids_and_masks_are_checked() -> None:
    router = build_router(RouterConfig(num_tasks=2), D, E)
    x = torch.randn(3, D)
    with pytest.raises(ValueError, match=r"task id 2 out of range; expected 0 <= task id < 2"):
        router(x, task_ids=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="task id -1 out of range"):
        router(x, task_ids=torch.tensor([0, -1, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        router(x, task_ids=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="one entry per token"):
        router(x, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        router(torch.randn(3, 5))
    task = build_router(RouterConfig(type="task", num_tasks=2), D, E)
    with pytest.raises(ValueError, match="task id 7 out of range"):
        task(x, task_ids=torch.tensor([7, 0, 0]))
    with pytest.raises(ValueError, match="pass task_ids"):
        task(x)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        router.set_expert_mask(0, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one expert"):
        router.set_expert_mask(0, torch.zeros(E, dtype=torch.bool))
    with pytest.raises(TypeError, match="boolean"):
        router.set_expert_mask(0, torch.ones(E))
    with pytest.raises(ValueError, match=r"task_id must be an integer in \[0, 2\]"):
        router.set_expert_mask(5, torch.ones(E, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_new must be a positive integer"):
        router.grow(0)


# -- precision and compilation -------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_bf16_autocast_routes_in_float32(cfg: dict) -> None:
    router = build_router(RouterConfig.from_dict(cfg), D, E).train()
    x = torch.randn(10, D)
    tids = _task_ids(10, 2) if _needs_tasks(router) else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = router(x, task_ids=tids)
    for t in (res.gates, res.probs, res.aux_loss):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert torch.allclose(res.gates.sum(-1), torch.ones(10), atol=1e-5)
    res16 = router.to(torch.bfloat16)(x.to(torch.bfloat16), task_ids=tids)
    assert res16.gates.dtype == torch.float32


@pytest.mark.slow
def test_topk_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    router = build_router(RouterConfig(k=2), 16, 8)
    x = torch.randn(32, 16)
    compiled = torch.compile(router, fullgraph=True)  # a host sync would break the graph
    router.eval()
    res = compiled(x)
    assert torch.allclose(res.gates, router(x).gates, atol=1e-6)
    router.train()
    res = compiled(x)
    res.aux_loss.backward()
    assert torch.allclose(res.gates.sum(-1), torch.ones(32), atol=1e-6)
    assert router.noise_weight is not None and router.noise_weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_topk_forward_and_backward_make_no_host_sync_on_cuda() -> None:
    router = build_router(RouterConfig(k=2), 16, 8).cuda().train()
    x = torch.randn(64, 16, device="cuda")
    router(x).aux_loss.backward()  # warm up (lazy CUDA init syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = router(x)
        ((res.gates * 2).sum() + res.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_topk_compiles_under_bf16_autocast_on_cuda() -> None:
    router = build_router(RouterConfig(k=2), 16, 8).cuda().train()
    x = torch.randn(64, 16, device="cuda", requires_grad=True)
    compiled = torch.compile(router, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = compiled(x)
    assert res.gates.dtype == torch.float32
    assert torch.allclose(res.gates.sum(-1), torch.ones(64, device="cuda"), atol=1e-5)
    ((res.gates * 2).sum() + res.aux_loss).backward()
    assert router.noise_weight is not None and router.noise_weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("which", ["topk", "dynamic"])
def test_compiled_router_functions_match_eager_on_cuda(which: str) -> None:
    from moracl.experts.routers.dynamic import dynamic_route
    from moracl.experts.routers.topk import topk_route

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(256, 16, device="cuda", generator=gen)
    noise = torch.randn(256, 8, device="cuda", generator=gen)
    allowed = torch.rand(256, 8, device="cuda", generator=gen) > 0.2
    allowed[:, 0] = True
    w = torch.randn(256, 8, device="cuda", generator=gen)
    fn = topk_route if which == "topk" else dynamic_route
    extra = (2,) if which == "topk" else (0.6, 1, 4)
    outs = []
    for call in (torch.compile(fn, fullgraph=True), fn):  # compiled, then eager
        x = logits.clone().requires_grad_(True)
        gates, probs, chosen, _indices, balance, z = call(x, allowed, noise, None, *extra)
        ((gates * w).sum() + balance + z).backward()
        outs.append((gates, probs, chosen, balance, z, x.grad))
    for got, ref in zip(*outs):
        if got.dtype == torch.bool:
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_closed_form_backward_equals_autograd(
    noise: bool, per_token: bool, k: int, normalize: bool
) -> None:
    """The fused node's top-k routing (forward, and its backward written out) against
    autograd through :func:`topk_route`, in float64, for each output's gradient alone and
    all together; per-token masks include tokens with fewer than ``k`` allowed experts."""
    from moracl.experts.gating import RouteGrads
    from moracl.experts.routers.topk import topk_route, topk_route_backward, topk_route_forward

    gen = torch.Generator().manual_seed(k + 2 * noise + 4 * per_token)
    n, e = 12, 5
    logits = torch.randn(n, 2 * e if noise else e, dtype=torch.float64, generator=gen)
    logits.requires_grad_(True)
    eps = torch.randn(n, e, dtype=torch.float64, generator=gen) if noise else None
    allowed = torch.rand(n if per_token else 1, e, generator=gen) > 0.4
    allowed[:, 0] = True
    if per_token:
        allowed[1] = torch.tensor([True, False, False, False, False])  # fewer than k
    want = topk_route(logits, allowed, eps, None, k, normalize)
    with torch.no_grad():
        routed, saved = topk_route_forward(logits, allowed, eps, k, normalize)
    got = (*routed[:4], None, None, None, None, *routed.aux)
    for i in (0, 1, 8, 9):  # gates, probs, balance, z
        torch.testing.assert_close(
            got[i], want[[0, 1, 4, 5][(0, 1, 8, 9).index(i)]], rtol=0, atol=1e-12
        )
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    grads = (
        torch.randn(n, e, dtype=torch.float64, generator=gen),
        torch.randn(n, e, dtype=torch.float64, generator=gen),
        torch.tensor(0.7, dtype=torch.float64),
        torch.tensor(-1.3, dtype=torch.float64),
    )
    outs = (want[0], want[1], want[4], want[5])
    for used in ([0], [1], [2], [3], [0, 1, 2, 3]):
        ref = torch.autograd.grad(
            [outs[j] for j in used], logits, [grads[j] for j in used], retain_graph=True
        )[0]
        chosen_grads = [grads[j] if j in used else None for j in range(4)]
        with torch.no_grad():
            route_grads = RouteGrads(chosen_grads[0], chosen_grads[1], tuple(chosen_grads[2:]))
            mine = topk_route_backward(saved, route_grads, normalize)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_batched_topk_routes_each_group_alone_and_its_backward_equals_autograd(
    noise: bool, per_token: bool, normalize: bool
) -> None:
    """Top-k over ``(n, b, e)``: each of the ``b`` groups routed as a 2-D call would route
    it, losses over each group's counted tokens (``active (n, b)``, one group with no counted
    token); the closed-form backward against autograd, in float64."""
    from moracl.experts.gating import RouteGrads
    from moracl.experts.routers.topk import topk_route, topk_route_backward, topk_route_forward

    gen = torch.Generator().manual_seed(2 * noise + per_token)
    n, b, e, k = 10, 3, 4, 2
    logits = torch.randn(n, b, 2 * e if noise else e, dtype=torch.float64, generator=gen)
    logits.requires_grad_(True)
    eps = torch.randn(n, b, e, dtype=torch.float64, generator=gen) if noise else None
    allowed = torch.rand(n if per_token else 1, b, e, generator=gen) > 0.3
    allowed[..., 0] = True
    active = torch.rand(n, b, generator=gen) > 0.4
    active[:, 2] = False
    want = topk_route(logits, allowed, eps, active, k, normalize)
    for h in range(b):
        alone = topk_route(
            logits[:, h],
            allowed[:, h],
            None if eps is None else eps[:, h],
            active[:, h],
            k,
            normalize,
        )
        for got, ref in zip(want, alone):
            got_h = got[h] if got.ndim == 1 else got[:, h]
            torch.testing.assert_close(got_h, ref, rtol=0, atol=1e-12)
    with torch.no_grad():
        _, saved = topk_route_forward(logits, allowed, eps, k, normalize, active)
    grads = (
        torch.randn(n, b, e, dtype=torch.float64, generator=gen),
        torch.randn(n, b, e, dtype=torch.float64, generator=gen),
        torch.randn(b, dtype=torch.float64, generator=gen),
        torch.randn(b, dtype=torch.float64, generator=gen),
    )
    outs = (want[0], want[1], want[4], want[5])
    for used in ([0], [1], [2], [3], [0, 1, 2, 3]):
        ref = torch.autograd.grad(
            [outs[j] for j in used], logits, [grads[j] for j in used], retain_graph=True
        )[0]
        chosen_grads = [grads[j] if j in used else None for j in range(4)]
        with torch.no_grad():
            route_grads = RouteGrads(chosen_grads[0], chosen_grads[1], tuple(chosen_grads[2:]))
            mine = topk_route_backward(saved, route_grads, normalize)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("settings", [(0.5, 1, 5), (0.9, 1, 3), (0.3, 2, 4), (1.0, 1, 5)], ids=str)
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_dynamic_closed_form_backward_equals_autograd(
    settings: tuple[float, int, int], noise: bool, per_token: bool
) -> None:
    """The fused node's top-p routing (its forward, and top-k's closed-form backward on the
    ranked experts) against autograd through :func:`dynamic_route`, in float64, for each
    output's gradient alone and all together; per-token masks include a token with one
    allowed expert, so counts vary from token to token."""
    from moracl.experts.gating import RouteGrads
    from moracl.experts.routers.dynamic import dynamic_route, dynamic_route_forward
    from moracl.experts.routers.topk import topk_route_backward

    top_p, low, high = settings
    gen = torch.Generator().manual_seed(int(top_p * 10) + 2 * noise + 4 * per_token)
    n, e = 16, 5
    logits = torch.randn(n, 2 * e if noise else e, dtype=torch.float64, generator=gen) * 2
    logits.requires_grad_(True)
    eps = torch.randn(n, e, dtype=torch.float64, generator=gen) if noise else None
    allowed = torch.rand(n if per_token else 1, e, generator=gen) > 0.3
    allowed[:, 0] = True
    if per_token:
        allowed[1] = torch.tensor([False, False, True, False, False])
    want = dynamic_route(logits, allowed, eps, None, top_p, low, high)
    with torch.no_grad():
        routed, saved = dynamic_route_forward(logits, allowed, eps, top_p, low, high)
    counts = routed.chosen.sum(-1)
    assert counts.min() >= 1 and counts.max() <= high
    for got, ref in zip((*routed[:4], *routed.aux), want):
        assert got is not None
        if got.dtype in (torch.bool, torch.int64):
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    grads = (
        torch.randn(n, e, dtype=torch.float64, generator=gen),
        torch.randn(n, e, dtype=torch.float64, generator=gen),
        torch.tensor(0.7, dtype=torch.float64),
        torch.tensor(-1.3, dtype=torch.float64),
    )
    outs = (want[0], want[1], want[4], want[5])
    for used in ([0], [1], [2], [3], [0, 1, 2, 3]):
        ref = torch.autograd.grad(
            [outs[j] for j in used], logits, [grads[j] for j in used], retain_graph=True
        )[0]
        chosen_grads = [grads[j] if j in used else None for j in range(4)]
        with torch.no_grad():
            route_grads = RouteGrads(chosen_grads[0], chosen_grads[1], tuple(chosen_grads[2:]))
            mine = topk_route_backward(saved, route_grads, True)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


def test_dynamic_gating_functions_compile_without_graph_breaks() -> None:
    """The fused node's top-p gating forward and its backward, as they run compiled on CUDA,
    under ``torch.compile(fullgraph=True)`` give eager's numbers."""
    from moracl.experts.gating import RouteGrads
    from moracl.experts.routers.dynamic import dynamic_gate_forward
    from moracl.experts.routers.topk import topk_gate_backward

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    n, e, r = 32, 6, 3
    zl = torch.randn(n, e * r + 2 * e, generator=gen)
    noise = torch.randn(n, e, generator=gen)
    allowed = torch.rand(n, e, generator=gen) > 0.3
    allowed[:, 0] = True
    grad_zg = torch.randn(n, e * r, generator=gen)
    grads = RouteGrads(torch.randn(n, e, generator=gen), None, (torch.tensor(0.5), None))
    runs = []
    for fwd, bwd in (
        (
            torch.compile(dynamic_gate_forward, fullgraph=True),
            torch.compile(topk_gate_backward, fullgraph=True),
        ),
        (dynamic_gate_forward, topk_gate_backward),
    ):
        zg, routed, saved = fwd(zl, e * r, allowed, noise, 0.6, 1, 4)
        runs.append((zg, *routed[:3], *routed.aux, *bwd(saved, grad_zg, grads, True)))
    for got, ref in zip(*runs):
        if got.dtype == torch.bool:
            assert torch.equal(got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("router", ["topk", "topk-switch", "dynamic", "hierarchical"])
def test_fused_routed_layer_on_cuda_matches_plain_autograd_without_host_sync(router: str) -> None:
    """On CUDA the routing inside the fused node runs compiled (top-k, top-p, two-level);
    outputs, routing and gradients match plain autograd through the router and the
    per-expert loop (float32), and a warmed-up forward and backward make no host
    synchronisation."""
    from moracl import MoRALinear
    from moracl.experts.mixture import MixtureConfig, RoutingContext

    rc = {
        "topk": RouterConfig(type="topk", k=2),
        "topk-switch": RouterConfig(type="topk", k=1, normalize=False),
        "dynamic": RouterConfig(type="dynamic"),
        "hierarchical": RouterConfig(type="hierarchical", groups=2, k=2),
    }[router]
    layer = MoRALinear(torch.nn.Linear(64, 96), MixtureConfig(rank=4, experts=8, router=rc))
    layer = layer.cuda().train()
    mix = layer.adapter("default")
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]

    def fused() -> tuple[torch.Tensor, RoutingResult]:
        mix.context = RoutingContext()
        try:
            return layer(x), mix.context.results[mix]
        finally:
            mix.context = None

    fused()  # compiles
    torch.manual_seed(3)
    out, got = fused()
    torch.manual_seed(3)
    want = mix.route(x)
    ref = layer.base_layer(x) + mix.naive_delta(x, want.gates)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.gates, want.gates, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    a = torch.autograd.grad((out * g).sum() + 10 * got.aux_loss, params)
    b = torch.autograd.grad((ref * g).sum() + 10 * want.aux_loss, params)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, got = fused()
        ((out * g).sum() + got.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_unnormalized_topk_gates_are_the_router_probabilities() -> None:
    """``normalize=False`` (Switch): each chosen expert's gate is its probability over all
    allowed experts, so with k = 1 the task loss reaches the router; ``True``: the gates of
    one token sum to 1 and k = 1 gives a constant gate of 1 (no gradient)."""
    x = torch.randn(16, D, dtype=torch.float64)
    for normalize in (True, False):
        cfg = RouterConfig(type="topk", k=1, noise=False, normalize=normalize)
        router = build_router(cfg, D, E).double().train()
        res = router(x)
        chosen_probs = (res.probs * res.chosen).sum(-1)
        want = torch.ones(16, dtype=torch.float64) if normalize else chosen_probs
        torch.testing.assert_close(res.gates.sum(-1), want, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad(res.gates.square().sum(), router.weight)
        assert (grad.abs().max() > 0) == (not normalize)
    with pytest.raises(ValueError, match="normalize must be True or False, got .yes."):
        RouterConfig(type="topk", normalize="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_select_topk_matches_torch_topk_and_breaks_ties_low(k: int) -> None:
    from moracl.experts.routing import gather_k, scatter_k, select_topk

    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    top, idx = select_topk(scores, k)
    ref_top, ref_idx = scores.topk(k, dim=-1)
    assert torch.equal(idx, ref_idx) and torch.equal(top, ref_top)
    # gather/scatter by one-hot equal torch's
    assert torch.equal(gather_k(scores, idx), scores.gather(-1, idx))
    vals = torch.randn(64, k, generator=gen, dtype=torch.float64)
    assert torch.equal(scatter_k(idx, vals, 8), torch.zeros_like(scores).scatter(-1, idx, vals))
    marks = vals > 0
    ref = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, marks)
    assert torch.equal(scatter_k(idx, marks, 8), ref)
    if k <= 4:  # ties (a fresh zero router): the lowest indices, in order
        _, tied = select_topk(torch.zeros(3, 8), k)
        assert tied.tolist() == [list(range(k))] * 3
