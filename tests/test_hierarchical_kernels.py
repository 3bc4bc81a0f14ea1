"""A hierarchical router's routing and gating as Triton kernels
(:mod:`moracl.experts.triton_hierarchical`) against its closed form, forward and every
gradient, float32; in Triton's interpreter without a GPU (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os

import pytest
import torch

from moracl.experts.backend import RoutingBackend
from moracl.experts.gating import RouteGrads
from moracl.experts.routers.hierarchical_gating import (
    HierarchicalGating,
    LevelSettings,
    hierarchical_gate_backward,
    hierarchical_gate_forward,
    hierarchical_route_backward,
    hierarchical_route_forward,
)

pytest.importorskip("triton")
from moracl.experts import triton_hierarchical

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _kernels() -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")


def _case(n: int, g: int, s: int, r: int, noise: bool | None, masked: bool, seed: int):  # type: ignore[no-untyped-def]
    """``noise``: drawn (True), none (False), or a noisy router evaluated (None: its scale
    columns present, no draws)."""
    gen = torch.Generator().manual_seed(seed)
    lg, ls = (g, s) if noise is False else (2 * g, 2 * s)
    er = g * s * r
    wide = torch.randn(n, er + lg + g * ls + 5, generator=gen)
    zl = wide[:, : er + lg + g * ls]  # row-strided, as the node's padded matmul
    rows = n if masked else 1  # per-token masks (task ids) with the masked case
    group_allowed = torch.rand(rows, g, generator=gen) > 0.2
    group_allowed[:, 0] = True
    expert_allowed = torch.rand(rows, g, s, generator=gen) > 0.2
    expert_allowed[..., 0] = True
    gn = torch.randn(n, g, generator=gen) if noise else None
    en = torch.randn(n, g, s, generator=gen) if noise else None
    active = torch.rand(n, generator=gen) > 0.3 if masked else None
    grads = RouteGrads(
        torch.randn(n, g * s, generator=gen),
        torch.randn(n, g * s, generator=gen),
        tuple(torch.randn((), generator=gen) for _ in range(4)),
    )
    grad_zg = torch.randn(n, er, generator=gen)
    move = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    grads = RouteGrads(*(move(t) for t in grads[:2]), tuple(move(t) for t in grads.aux))
    return (
        move(zl), er, move(group_allowed), move(expert_allowed), move(gn), move(en),
        move(active), grads, move(grad_zg), lg,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("n", "g", "s", "r", "kg", "ks"),
    [(40, 2, 4, 3, 1, 2), (33, 4, 2, 2, 2, 1), (1, 2, 4, 2, 1, 2), (21, 3, 3, 5, 2, 2)],
)
@pytest.mark.parametrize("noise", [False, True, None])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("normalize", [(True, True), (False, True), (True, False)])
def test_the_kernels_equal_the_closed_form(
    n: int,
    g: int,
    s: int,
    r: int,
    kg: int,
    ks: int,
    noise: bool | None,
    masked: bool,
    normalize: tuple[bool, bool],
) -> None:
    zl, er, ga, ea, gn, en, active, grads, grad_zg, lg = _case(n, g, s, r, noise, masked, n + g)
    groups, experts = LevelSettings(kg, normalize[0]), LevelSettings(ks, normalize[1])
    gating = HierarchicalGating(
        group_allowed=ga, expert_allowed=ea, group_noise=lambda _: gn,
        expert_noise=lambda _: en, group_logits=lg, groups=groups, experts=experts,
        backend=RoutingBackend.TRITON, active=active,
    )  # fmt: skip
    zg, routed, saved = gating.forward(zl, er)
    assert not hasattr(saved, "route")  # the kernels' record, not the closed form's
    ref_zg, ref, ref_saved = hierarchical_gate_forward(
        zl, er, ga, ea, gn, en, lg, groups, experts, active
    )
    assert torch.equal(routed.chosen, ref.chosen) and torch.equal(routed.indices, ref.indices)
    for mine, want in zip(
        (zg, routed.gates, routed.probs, *routed.aux), (ref_zg, ref.gates, ref.probs, *ref.aux)
    ):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6)
    for used in (0, 1, 2):  # none of the outputs' gradients, the gates', all
        route_grads = RouteGrads(
            grads.gates if used else None, grads.probs if used == 2 else None,
            grads.aux if used == 2 else (None,) * 4,
        )  # fmt: skip
        got_zl, got_zg, _ = gating.backward(saved, grad_zg, route_grads)
        want_zl, want_zg = hierarchical_gate_backward(
            ref_saved, grad_zg, route_grads, groups, experts
        )
        torch.testing.assert_close(got_zl, want_zl, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_zg, want_zg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "g", "s", "kg", "ks"), [(40, 2, 4, 1, 2), (21, 3, 3, 2, 2)])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_routing_alone_runs_the_kernels_with_no_experts_columns(
    n: int, g: int, s: int, kg: int, ks: int, noise: bool, masked: bool
) -> None:
    """Routing logits alone (the MoRA node, other banks' routing node) runs the kernels with
    ``e·r = 0`` under ``triton``: the routing, its losses and the logits' gradient equal
    :func:`hierarchical_route_forward`'s and its backward's, from a row-strided view."""
    zl, _, ga, ea, gn, en, active, grads, _, lg = _case(n, g, s, 0, noise, masked, 7 * n + g)
    groups, experts = LevelSettings(kg, True), LevelSettings(ks, True)
    gating = HierarchicalGating(
        group_allowed=ga, expert_allowed=ea, group_noise=lambda _: gn,
        expert_noise=lambda _: en, group_logits=lg, groups=groups, experts=experts,
        backend=RoutingBackend.TRITON, active=active,
    )  # fmt: skip
    routed, saved = gating.route(zl)
    assert isinstance(saved, triton_hierarchical.HierarchicalRecord)  # the kernels ran
    want, ref_saved = hierarchical_route_forward(zl, ga, ea, gn, en, lg, groups, experts, active)
    assert torch.equal(routed.chosen, want.chosen) and torch.equal(routed.indices, want.indices)
    for mine, ref in zip(
        (routed.gates, routed.probs, *routed.aux), (want.gates, want.probs, *want.aux)
    ):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    got, _ = gating.route_backward(saved, grads)
    assert got.shape == zl.shape
    ref_grad = hierarchical_route_backward(ref_saved, grads, groups, experts)
    torch.testing.assert_close(got, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("g", "s"), [(3, 3), (2, 4)])
def test_nothing_depends_on_uninitialised_memory(
    monkeypatch: pytest.MonkeyPatch, g: int, s: int
) -> None:
    """Every float buffer the kernels allocate starts as NaN (padding slots of a group count
    that is not a power of two included): the routing, the four losses and every gradient
    stay the closed form's."""
    zl, er, ga, ea, gn, en, active, grads, grad_zg, lg = _case(21, g, s, 2, True, True, 5 * g)
    groups, experts = LevelSettings(2, True), LevelSettings(2, True)
    gating = HierarchicalGating(
        group_allowed=ga, expert_allowed=ea, group_noise=lambda _: gn,
        expert_noise=lambda _: en, group_logits=lg, groups=groups, experts=experts,
        backend=RoutingBackend.TRITON, active=active,
    )  # fmt: skip
    real_empty = torch.empty

    def nan_empty(*args: object, **kwargs: object) -> torch.Tensor:
        t = real_empty(*args, **kwargs)  # type: ignore[call-overload]
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    zg, routed, saved = gating.forward(zl, er)
    got_zl, got_zg, _ = gating.backward(saved, grad_zg, grads)
    monkeypatch.undo()
    ref_zg, ref, ref_saved = hierarchical_gate_forward(
        zl, er, ga, ea, gn, en, lg, groups, experts, active
    )
    want_zl, want_zg = hierarchical_gate_backward(ref_saved, grad_zg, grads, groups, experts)
    for mine, want in zip(
        (zg, routed.gates, routed.probs, *routed.aux, got_zl, got_zg),
        (ref_zg, ref.gates, ref.probs, *ref.aux, want_zl, want_zg),
    ):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)
