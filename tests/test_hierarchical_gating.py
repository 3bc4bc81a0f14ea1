"""The hierarchical router's two-level top-k: all groups routed as one batch, and the fused
node's closed-form backward, each against the plain reference (each group's router on its
own, and autograd through ``route``) in float64."""

from __future__ import annotations

import pytest
import torch

from moracl.experts.backend import RoutingBackend
from moracl.experts.gating import ReplayGating, RouteGrads
from moracl.experts.routers import RouterConfig, build_router
from moracl.experts.routers.hierarchical import HierarchicalRouter
from moracl.experts.routers.hierarchical_gating import HierarchicalGating

D, G, S = 6, 3, 4
AUX = ("group.balance", "group.z", "expert.balance", "expert.z")


def _router(noise: bool = True, outer_k: int = 1, k: int = 2, normalize: bool = True):  # type: ignore[no-untyped-def]
    cfg = RouterConfig(
        type="hierarchical",
        groups=G,
        outer={"type": "topk", "k": outer_k, "noise": noise},
        inner={"type": "topk", "k": k, "noise": noise, "normalize": normalize},
    )
    router = build_router(cfg, D, G * S).double().train()
    assert isinstance(router, HierarchicalRouter)
    gen = torch.Generator().manual_seed(outer_k + 2 * k)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.8)
    return router


def _masks(router: HierarchicalRouter) -> torch.Tensor:
    """Per-task masks on both levels and on one group's router; returns task ids (n,)."""
    router.set_expert_mask(0, [True] * (G * S - 1) + [False])
    router.set_expert_mask(1, [False] * S + [True] * (G * S - S))
    router.outer.set_expert_mask(0, [True, True, False])
    router.outer.set_expert_mask(1, [True, True, True])
    router.inner[1].set_expert_mask(0, [True, False, True, False])
    router.inner[1].set_expert_mask(1, [True, True, True, True])
    return torch.tensor([0, 1] * 6)


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("noise", [False, True])
def test_groups_routed_as_one_batch_equal_each_group_routed_alone(
    noise: bool, masks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs, losses and their gradients, noise drawn from the same seed."""
    router = _router(noise)
    task_ids = _masks(router) if masks else None
    logits = torch.randn(12, router.num_logits, dtype=torch.float64)
    runs = []
    for batched in (True, False):
        monkeypatch.setattr(HierarchicalRouter, "_batched", lambda self, b=batched: b)
        leaf = logits.clone().requires_grad_(True)
        torch.manual_seed(3)
        res = router.route_logits(leaf, task_ids=task_ids)
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(res.gates.shape, dtype=torch.float64, generator=gen)
        loss = (res.gates * w).sum() + (res.probs * w.flip(0)).sum() + res.aux_loss * 5
        runs.append((res, torch.autograd.grad(loss, leaf)[0]))
    (got, grad), (want, want_grad) = runs
    assert torch.equal(got.chosen, want.chosen) and torch.equal(got.indices, want.indices)
    for a, b in ((got.gates, want.gates), (got.probs, want.probs), (grad, want_grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert got.aux_losses.keys() == want.aux_losses.keys() == set(AUX)
    for name in AUX:
        torch.testing.assert_close(got.aux_losses[name], want.aux_losses[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize(("outer_k", "k", "normalize"), [(1, 2, True), (2, 1, False), (2, 3, True)])
@pytest.mark.parametrize("noise", [False, True])
def test_closed_form_backward_equals_autograd_through_route(
    noise: bool, outer_k: int, k: int, normalize: bool, masks: bool
) -> None:
    """The fused node's routing (forward, and backward written out) against autograd
    through the router's ``route``, for each output's gradient alone and all together."""
    router = _router(noise, outer_k, k, normalize)
    task_ids = _masks(router) if masks else None
    from moracl.experts.routers.base import as_task_ids

    gating = router.gating(as_task_ids(task_ids), RoutingBackend.EAGER)
    assert isinstance(gating, HierarchicalGating) and gating.aux_names == AUX
    logits = torch.randn(12, router.num_logits, dtype=torch.float64).requires_grad_(True)
    torch.manual_seed(5)
    want = router.route_logits(logits, task_ids=task_ids)
    torch.manual_seed(5)
    with torch.no_grad():
        routed, saved = gating.route(logits)
    assert torch.equal(routed.chosen, want.chosen) and torch.equal(routed.indices, want.indices)
    torch.testing.assert_close(routed.gates, want.gates, rtol=0, atol=1e-12)
    torch.testing.assert_close(routed.probs, want.probs, rtol=0, atol=1e-12)
    for name, value in zip(AUX, routed.aux):
        torch.testing.assert_close(value, want.aux_losses[name], rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    outs = (want.gates, want.probs, *(want.aux_losses[n] for n in AUX))
    grads = [torch.randn(o.shape, dtype=torch.float64, generator=gen) for o in outs]
    for used in ([0], [1], [2], [3], [4], [5], list(range(6))):
        ref = torch.autograd.grad(
            [outs[j] for j in used], logits, [grads[j] for j in used], retain_graph=True
        )[0]
        g = [grads[j] if j in used else None for j in range(6)]
        with torch.no_grad():
            mine, extra = gating.route_backward(saved, RouteGrads(g[0], g[1], tuple(g[2:])))
        assert extra == ()
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


def test_other_compositions_replay_route() -> None:
    """A task-routed outer level, or groups whose routers differ, take the general path."""
    task_outer = RouterConfig(
        type="hierarchical", groups=2, k=1, outer=RouterConfig(type="task", num_tasks=2)
    )
    router = build_router(task_outer, D, 8)
    assert isinstance(router.gating(None, RoutingBackend.EAGER), ReplayGating)
    router = _router()
    assert router._batched()
    router.inner[2] = build_router(RouterConfig(type="topk", k=1), D, S)
    assert not router._batched()
    assert isinstance(router.gating(None, RoutingBackend.EAGER), ReplayGating)


def test_routing_functions_compile_without_graph_breaks() -> None:
    """``torch.compile(fullgraph=True)`` of the forward and the backward (as the fused node
    runs them on CUDA) gives eager's numbers."""
    from moracl.experts.routers.hierarchical_gating import (
        hierarchical_gate_backward,
        hierarchical_gate_forward,
        hierarchical_route_backward,
        hierarchical_route_forward,
    )

    torch._dynamo.reset()
    router = _router(noise=True).float()
    gating = router.gating(None, RoutingBackend.EAGER)
    assert isinstance(gating, HierarchicalGating)
    logits = torch.randn(32, router.num_logits)
    noise_g, noise_e = torch.randn(32, G), torch.randn(32, G, S)
    args = (logits, gating.group_allowed, gating.expert_allowed, noise_g, noise_e)
    settings = (gating.group_logits, gating.groups, gating.experts)
    gen = torch.Generator().manual_seed(0)
    grads = RouteGrads(
        torch.randn(32, G * S, generator=gen),
        torch.randn(32, G * S, generator=gen),
        tuple(torch.randn((), generator=gen) for _ in AUX),
    )
    runs = []
    for fwd, bwd in (
        (
            torch.compile(hierarchical_route_forward, fullgraph=True),
            torch.compile(hierarchical_route_backward, fullgraph=True),
        ),
        (hierarchical_route_forward, hierarchical_route_backward),
    ):
        routed, saved = fwd(*args, *settings)
        runs.append((*routed[:3], *routed.aux, bwd(saved, grads, *settings[1:])))
    # the gated forms (routing and gating in one function), as the fused node runs them
    er = G * S * 3
    zl = torch.cat([torch.randn(32, er, generator=gen), logits], dim=1)
    grad_zg = torch.randn(32, er, generator=gen)
    for fwd, bwd in (
        (
            torch.compile(hierarchical_gate_forward, fullgraph=True),
            torch.compile(hierarchical_gate_backward, fullgraph=True),
        ),
        (hierarchical_gate_forward, hierarchical_gate_backward),
    ):
        zg, routed, saved = fwd(zl, er, *args[1:], *settings)
        runs.append((zg, *routed[:3], *bwd(saved, grad_zg, grads, *settings[1:])))
    assert len(runs) == 4
    for first, second in (runs[:2], runs[2:]):
        for got, ref in zip(first, second):
            if got.dtype == torch.bool:
                assert torch.equal(got, ref)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # and the gated forms route as the routing functions do
    for got, ref in zip(runs[3][1:4], runs[1][:3]):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
