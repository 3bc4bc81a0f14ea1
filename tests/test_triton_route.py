"""The Triton routing kernels against the routing functions they replace on CUDA.

Without a GPU the kernels run in Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); on a GPU they run compiled.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from moracl.experts.backend import routing_backend
from moracl.experts.gating import RouteGrads
from moracl.experts.routers.topk import topk_gate_backward, topk_gate_forward

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter reads CPU tensors
on_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU layer through interpreted kernels; GPU: see below"
)


def router_ids(task_ids: torch.Tensor):  # type: ignore[no-untyped-def]
    from moracl.experts.routers.base import TaskIds

    return TaskIds.of(task_ids)


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """``moracl.experts.triton_route``: compiled on a GPU, else interpreted (the test
    configuration sets ``TRITON_INTERPRET=1`` without one, before Triton is imported)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")
    from moracl.experts import triton_route

    return triton_route


def _case(n: int, e: int, r: int, noise: bool, per_token: bool, seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    er = e * r
    zl = torch.randn(n, er + (2 * e if noise else e), generator=gen).to(dtype)
    allowed = torch.rand(n if per_token else 1, e, generator=gen) > 0.3
    allowed[:, 0] = True
    if per_token and n > 2:
        allowed[1] = False  # a token with no expert
        allowed[2] = torch.arange(e) == e - 1  # fewer than k
    eps = torch.randn(n, e, generator=gen) if noise else None
    grads = (
        torch.randn(n, er, generator=gen).to(dtype),  # ∂zg
        torch.randn(n, e, generator=gen),  # ∂gates
        torch.randn(n, e, generator=gen),  # ∂probs
        torch.tensor(0.7),  # ∂balance
        torch.tensor(-1.3),  # ∂z
    )
    moved = [t.to(DEV) if t is not None else None for t in (zl, allowed, eps, *grads)]
    zl, allowed, eps, *grads = moved
    return zl, er, allowed, eps, tuple(grads)


CASES = [  # n, e, r, k
    (70, 8, 16, 2),
    (33, 5, 3, 3),
    (1, 4, 2, 1),
    (45, 16, 4, 4),
    (20, 8, 128, 2),  # wide experts: fewer rows per program
    (21, 3, 100, 3),
]


@pytest.mark.parametrize(("n", "e", "r", "k"), CASES)
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernels_equal_the_routing_functions_in_float32(
    kernels: ModuleType, n: int, e: int, r: int, k: int, noise: bool, per_token: bool,
    normalize: bool,
) -> None:  # fmt: skip
    zl, er, allowed, eps, grads = _case(n, e, r, noise, per_token, n + e + k, torch.float32)
    zg, routed, saved = topk_gate_forward(zl, er, allowed, eps, k, normalize)
    gates, probs, chosen, indices, (balance, z) = routed
    f, lse = saved.route.f, saved.route.lse
    got = kernels.gate_forward(zl, er, allowed, eps, k, normalize)
    assert torch.equal(got.chosen, chosen) and torch.equal(got.indices, indices)
    for mine, ref in [
        (got.zg, zg), (got.gates, gates), (got.probs, probs), (got.lse, lse), (got.f, f),
        (got.balance, balance), (got.z, z),
    ]:  # fmt: skip
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    for used in ([0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 1, 2, 3, 4]):
        g = [grads[j] if j in used else None for j in range(5)]
        route_grads = RouteGrads(g[1], g[2], (g[3], g[4]))
        ref_zl, ref_zg = topk_gate_backward(saved, g[0], route_grads, normalize)
        mine_zl, mine_zg = kernels.gate_backward(got.record(), g[0], route_grads)
        torch.testing.assert_close(mine_zl, ref_zl, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine_zg, ref_zg, rtol=1e-5, atol=1e-6)


def test_nothing_depends_on_uninitialised_memory(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every float buffer the kernels allocate starts as NaN (the padding of 5 experts to 8
    included): the routing, the losses and every gradient stay the routing functions'."""
    zl, er, allowed, eps, grads = _case(33, 5, 3, True, True, 11, torch.float32)
    active = torch.arange(33, device=zl.device) % 3 != 0
    zg, routed, saved = topk_gate_forward(zl, er, allowed, eps, 2, True, active)
    route_grads = RouteGrads(grads[1], grads[2], (grads[3], grads[4]))
    ref_zl, ref_zg = topk_gate_backward(saved, grads[0], route_grads, True)
    real_empty = torch.empty

    def nan_empty(*args: object, **kwargs: object) -> torch.Tensor:
        t = real_empty(*args, **kwargs)  # type: ignore[call-overload]
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    got = kernels.gate_forward(zl, er, allowed, eps, 2, True, active)
    mine_zl, mine_zg = kernels.gate_backward(got.record(), grads[0], route_grads)
    monkeypatch.undo()
    for mine, ref in [
        (got.zg, zg), (got.gates, routed.gates), (got.probs, routed.probs),
        (got.balance, routed.aux[0]), (got.z, routed.aux[1]), (mine_zl, ref_zl),
        (mine_zg, ref_zg),
    ]:  # fmt: skip
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "e", "r", "k"), CASES)
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_kernels_count_the_active_tokens_as_the_routing_functions(
    kernels: ModuleType, n: int, e: int, r: int, k: int, noise: bool, per_token: bool
) -> None:
    """Losses over the ``active`` tokens only (padding left out): the kernels against the
    routing functions, forward and every gradient."""
    zl, er, allowed, eps, grads = _case(n, e, r, noise, per_token, 7 * n + e, torch.float32)
    gen = torch.Generator().manual_seed(n)
    active = (torch.rand(n, generator=gen) > 0.4).to(DEV)
    active[: n // 3] = False  # a run of padding
    zg, routed, saved = topk_gate_forward(zl, er, allowed, eps, k, True, active)
    got = kernels.gate_forward(zl, er, allowed, eps, k, True, active)
    for mine, ref in [
        (got.zg, zg), (got.gates, routed.gates), (got.f, saved.route.f),
        (got.balance, routed.aux[0]), (got.z, routed.aux[1]),
    ]:  # fmt: skip
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    route_grads = RouteGrads(grads[1], grads[2], (grads[3], grads[4]))
    ref_zl, _ = topk_gate_backward(saved, grads[0], route_grads)
    mine_zl, _ = kernels.gate_backward(got.record(), grads[0], route_grads)
    torch.testing.assert_close(mine_zl, ref_zl, rtol=1e-5, atol=1e-5)
    if n > 1:  # the losses do move with the mask
        everyone = kernels.gate_forward(zl, er, allowed, eps, k, True)
        assert not torch.allclose(everyone.z, got.z)


def test_an_evaluated_noisy_router_gives_its_noise_scales_no_gradient(
    kernels: ModuleType,
) -> None:
    """In evaluation a noisy router's logits keep their noise-scale columns but draw no
    noise: their gradient is zero (the kernels' output was left unwritten there)."""
    zl, er, allowed, _, grads = _case(40, 8, 4, True, False, 5, torch.float32)
    route_grads = RouteGrads(grads[1], grads[2], (grads[3], grads[4]))
    _, _, saved = topk_gate_forward(zl, er, allowed, None, 2)
    ref_zl, _ = topk_gate_backward(saved, grads[0], route_grads)
    got = kernels.gate_forward(zl, er, allowed, None, 2)
    mine_zl, _ = kernels.gate_backward(got.record(), grads[0], route_grads)
    assert ref_zl.shape == zl.shape and not ref_zl[:, er + 8 :].any()
    torch.testing.assert_close(mine_zl, ref_zl, rtol=1e-5, atol=1e-5)


def test_kernels_in_bfloat16_round_like_the_routing_functions(kernels: ModuleType) -> None:
    zl, er, allowed, eps, grads = _case(64, 8, 16, True, False, 0, torch.bfloat16)
    want_zg, want, saved = topk_gate_forward(zl, er, allowed, eps, 2)
    got = kernels.gate_forward(zl, er, allowed, eps, 2)
    assert got.zg.dtype == torch.bfloat16 and got.gates.dtype == torch.float32
    # bf16: the two sides round apart by up to two bf16 steps (2⁻⁷ relative); allow four
    torch.testing.assert_close(got.zg, want_zg, rtol=2**-5, atol=1e-5)
    torch.testing.assert_close(got.gates, want.gates, rtol=1e-5, atol=1e-6)
    route_grads = RouteGrads(grads[1], grads[2], (grads[3], grads[4]))
    ref_zl, _ = topk_gate_backward(saved, grads[0], route_grads)
    mine_zl, _ = kernels.gate_backward(got.record(), grads[0], route_grads)
    assert mine_zl.dtype == torch.bfloat16
    # the logits' gradient: the kernel sums ∂zg · za in float32 where the functions round
    # the product to bf16 first, so both are held to float32 math on the same inputs
    _, _, saved32 = topk_gate_forward(zl.float(), er, allowed, eps, 2)
    truth, _ = topk_gate_backward(saved32, grads[0].float(), route_grads)
    err_mine = (mine_zl[:, er:].float() - truth[:, er:]).abs().max()
    err_ref = (ref_zl[:, er:].float() - truth[:, er:]).abs().max()
    assert err_mine <= 1.5 * err_ref, (err_mine, err_ref)
    torch.testing.assert_close(mine_zl[:, :er], ref_zl[:, :er], rtol=2**-5, atol=1e-5)  # ∂za


@on_cpu_only
def test_the_routed_layer_uses_the_kernels_with_the_same_results(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:  # (the routing functions: the eager backend; the kernels: the triton one)
    """A top-2 mixture's fused node through the kernels (interpreted here, as on CUDA)
    gives the outputs, routing, auxiliary loss and gradients of the routing functions."""
    from moracl import MoRALinear
    from moracl.experts.mixture import MixtureConfig, RoutingContext
    from moracl.experts.routers.config import RouterConfig

    torch.manual_seed(0)
    cfg = MixtureConfig(rank=4, experts=6, router=RouterConfig(type="topk", k=2))
    layer = MoRALinear(torch.nn.Linear(24, 20), cfg).train()
    mix = layer.adapter("default")
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 11, 24, requires_grad=True)
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    g = torch.randn(3, 11, 20)

    def step() -> tuple[torch.Tensor, ...]:
        mix.context = RoutingContext()
        torch.manual_seed(5)  # the same noise draws
        try:
            out = layer(x)
            routed = mix.context.results[mix]
        finally:
            mix.context = None
        grads = torch.autograd.grad((out * g).sum() + 10 * routed.aux_loss, params)
        return out, routed.gates, routed.aux_loss, *grads

    with routing_backend("eager"):
        want = step()
    calls = []
    real = kernels.gate_forward

    def gate_forward(zl: torch.Tensor, er: int, allowed, noise, k: int, normalize: bool, active):  # type: ignore[no-untyped-def]
        calls.append((zl.shape, er, allowed.shape[-1], k))
        return real(zl, er, allowed, noise, k, normalize, active)

    monkeypatch.setattr(kernels, "gate_forward", gate_forward)
    with routing_backend("triton"):
        got = step()
    assert calls == [(torch.Size([33, 24 + 12]), 24, 6, 2)]
    for mine, ref in zip(got, want):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@on_cpu_only
def test_the_routed_node_keeps_the_kernels_record_not_the_gated_activations(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its backward the node keeps what the kernels' backward reads (``zl``, the
    routing), not the gated activations ``zg (n, e·r)``, which the backward recomputes: an
    activation-sized tensor less per routed layer."""
    from moracl import MoRALinear
    from moracl.experts.mixture import MixtureConfig
    from moracl.experts.routers.config import RouterConfig

    torch.manual_seed(0)
    cfg = MixtureConfig(rank=4, experts=6, router=RouterConfig(type="topk", k=2))
    layer = MoRALinear(torch.nn.Linear(24, 20), cfg).train()
    forwards = []
    real = kernels.gate_forward

    def gate_forward(*args):  # type: ignore[no-untyped-def]
        forwards.append(real(*args))
        return forwards[-1]

    monkeypatch.setattr(kernels, "gate_forward", gate_forward)
    with routing_backend("triton"):
        out = layer(torch.randn(3, 11, 24, requires_grad=True))
    kept = {t.data_ptr() for t in out.grad_fn.saved_tensors}
    (fwd,) = forwards
    assert fwd.zl.data_ptr() in kept and fwd.lse.data_ptr() in kept  # the record
    assert fwd.zg.data_ptr() not in kept and fwd.indices.data_ptr() not in kept


@pytest.mark.parametrize(
    ("n", "e", "r", "t"), [(70, 8, 16, 4), (33, 6, 3, 3), (5, 3, 5, 2), (19, 4, 200, 2)]
)
@pytest.mark.parametrize("weights", [False, True])
def test_task_kernels_equal_the_task_router(
    kernels: ModuleType, n: int, e: int, r: int, t: int, weights: bool
) -> None:
    """Routing by task through the kernel: the gates and choices of ``TaskRouter.route``,
    the gated activations and their backward of :class:`RouteOp`'s plain forms."""
    from moracl.experts.backend import RoutingBackend
    from moracl.experts.routers import build_router
    from moracl.experts.routers.config import RouterConfig

    gen = torch.Generator().manual_seed(n + e)
    router = build_router(RouterConfig(type="task", num_tasks=t, task_weights=weights), 4, e)
    if weights:
        assert router.task_logits is not None
        with torch.no_grad():
            router.task_logits.copy_(torch.randn(t, e, generator=gen))
    router.set_expert_mask(t - 1, torch.arange(e) % 2 == 0)  # not a contiguous block
    router = router.to(DEV)
    task_ids = torch.randint(0, t, (n,), generator=gen).to(DEV)
    za = torch.randn(n, e * r, generator=gen).to(DEV)
    want = router.route(za[:, :0], router.allowed_experts(task_ids), task_ids=task_ids)
    zg, gates, chosen = kernels.task_gate_forward(
        za, e * r, task_ids, router.expert_masks, router.task_logits
    )
    torch.testing.assert_close(gates, want.gates, rtol=1e-6, atol=1e-7)
    assert torch.equal(chosen, want.chosen.expand(n, -1))
    gating = router.gating(router_ids(task_ids), RoutingBackend.EAGER)  # the plain forms
    with torch.no_grad():
        ref_zg, _, saved = gating.forward(za, e * r)
        grad_zg = torch.randn(n, e * r, generator=gen).to(DEV)
        ref_gza, ref_zg2, _ = gating.backward(saved, grad_zg, RouteGrads(None, None, ()))
    torch.testing.assert_close(zg, ref_zg, rtol=1e-6, atol=1e-7)
    gza, zg2 = kernels.gate_apply_backward(grad_zg, za, gates)
    torch.testing.assert_close(gza, ref_gza, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(zg2, ref_zg2, rtol=1e-6, atol=1e-7)


@on_cpu_only
@pytest.mark.parametrize("weights", ["none", "frozen", "trained"])
def test_the_task_routed_layer_uses_the_kernels_with_the_same_results(
    kernels: ModuleType, monkeypatch: pytest.MonkeyPatch, weights: str
) -> None:
    """A task-routed mixture's fused node on a batch mixing tasks row by row: through the
    kernels (interpreted here, as on CUDA) the same outputs, gates and gradients; trainable
    task weights keep the autograd path (the kernels are not used)."""
    from moracl import MoRALinear
    from moracl.experts.mixture import MixtureConfig, RoutingContext
    from moracl.experts.routers.config import RouterConfig

    torch.manual_seed(0)
    rc = RouterConfig(type="task", num_tasks=3, task_weights=weights != "none")
    layer = MoRALinear(torch.nn.Linear(24, 20), MixtureConfig(rank=4, experts=6, router=rc))
    mix = layer.adapter("default")
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    if weights == "frozen":
        mix.router.task_logits.requires_grad_(False)
    x = torch.randn(4, 7, 24, requires_grad=True)
    tids = torch.tensor([2, 0, 1, 2])
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    g = torch.randn(4, 7, 20)

    def step() -> tuple[torch.Tensor, ...]:
        mix.context = RoutingContext(task_ids=tids)
        try:
            out = layer(x)
            routed = mix.context.results[mix]
        finally:
            mix.context = None
        grads = torch.autograd.grad((out * g).sum(), params)
        return out, routed.gates, routed.chosen.expand_as(routed.gates), *grads

    with routing_backend("eager"):
        want = step()
    calls = []
    real = kernels.task_gate_forward

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(True)
        return real(*args)

    monkeypatch.setattr(kernels, "task_gate_forward", spy)
    with routing_backend("triton"):
        got = step()
    assert calls == ([True] if weights != "trained" else [])
    for mine, ref in zip(got, want):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("router", ["topk", "task", "hierarchical"])
def test_cuda_kernels_are_as_accurate_as_the_compiled_functions_and_repeat_bitwise(
    monkeypatch: pytest.MonkeyPatch, router: str
) -> None:
    """On CUDA under bf16 autocast, a top-2 (task-routed, hierarchical 2x4) mixture's outputs,
    gates, auxiliary loss and gradients through the kernels are as close to a float32 plain-autograd
    reference as the routing without them (the ``compiled`` backend), and two runs of the
    kernels give bit-identical results (sums in a fixed order, no atomics)."""
    from moracl import MoRALinear
    from moracl.adapters.fused import plain_autograd
    from moracl.experts.mixture import MixtureConfig, RoutingContext
    from moracl.experts.routers.config import RouterConfig

    torch.manual_seed(0)
    rc = {
        "topk": RouterConfig(type="topk", k=2),
        "task": RouterConfig(type="task", num_tasks=4),
        "hierarchical": RouterConfig(type="hierarchical", groups=2, k=2),
    }[router]
    cfg = MixtureConfig(rank=16, experts=8, router=rc)
    tids = torch.tensor([3, 0, 2, 3], device="cuda") if router == "task" else None
    layer = MoRALinear(torch.nn.Linear(256, 384), cfg).cuda().train()
    mix = layer.adapter("default")
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 1000, 256, device="cuda", requires_grad=True)
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    g = torch.randn(4, 1000, 384, device="cuda")

    def step(bf16: bool = True) -> list[torch.Tensor]:
        mix.context = RoutingContext(task_ids=tids)
        torch.manual_seed(5)  # the same noise draws
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = layer(x)
            routed = mix.context.results[mix]
        finally:
            mix.context = None
        grads = torch.autograd.grad((out.float() * g).sum() + 10 * routed.aux_loss, params)
        return [t.float() for t in (out, routed.gates, routed.aux_loss, *grads)]

    with routing_backend("triton"):
        kernels_a, kernels_b = step(), step()
    for u, v in zip(kernels_a, kernels_b):
        assert torch.equal(u, v)
    with routing_backend("compiled"):
        compiled = step()
    with plain_autograd():
        reference = step(bf16=False)
    for name, mine, other, ref in zip(
        ["out", "gates", "aux", "x", *[n for n, p in mix.named_parameters() if p.requires_grad]],
        kernels_a, compiled, reference,
    ):  # fmt: skip
        scale = ref.abs().max().clamp_min(1e-6)
        err_mine = ((mine - ref).abs().max() / scale).item()
        err_other = ((other - ref).abs().max() / scale).item()
        print(f"{name}: kernels {err_mine:.2e}, compiled {err_other:.2e}")
        assert err_mine <= 1.5 * err_other + 1e-4, (name, err_mine, err_other)


@pytest.mark.parametrize(("n", "e", "k"), [(70, 8, 2), (33, 5, 3), (1, 4, 1), (45, 16, 4)])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_routing_alone_runs_the_kernels_with_no_experts_columns(
    kernels: ModuleType, n: int, e: int, k: int, noise: bool, masked: bool
) -> None:
    """A top-k gating asked to route logits alone (the MoRA node, the routing node of other
    banks, per-sample routing's pooled logits) runs the gating kernels with ``e·r = 0`` under
    the ``triton`` backend: the routing, its losses and the logits' gradient equal the
    routing functions' (float32), from a row-strided view of a wider matrix."""
    from moracl.experts.backend import RoutingBackend
    from moracl.experts.routers.topk import TopKGating, topk_route_backward, topk_route_forward

    gen = torch.Generator().manual_seed(3 * n + e)
    width = 2 * e if noise else e
    wide = torch.randn(n, 7 + width + 3, generator=gen).to(DEV)
    logits = wide[:, 7 : 7 + width]  # as the MoRA node routes its matmul's logit columns
    allowed = (torch.rand(1, e, generator=gen) > 0.2).to(DEV)
    allowed[:, 0] = True
    eps = torch.randn(n, e, generator=gen).to(DEV) if noise else None
    active = (torch.rand(n, generator=gen) > 0.3).to(DEV) if masked else None
    gating = TopKGating(allowed, lambda _: eps, k, True, RoutingBackend.TRITON, active=active)
    routed, saved = gating.route(logits)
    assert isinstance(saved, kernels.GateRecord)  # the kernels ran
    want, ref_saved = topk_route_forward(logits, allowed, eps, k, True, active)
    assert torch.equal(routed.chosen, want.chosen) and torch.equal(routed.indices, want.indices)
    for mine, ref in zip(
        (routed.gates, routed.probs, *routed.aux), (want.gates, want.probs, *want.aux)
    ):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    g = [torch.randn(n, e, generator=gen).to(DEV) for _ in range(2)]
    grads = RouteGrads(g[0], g[1], (torch.tensor(0.7).to(DEV), torch.tensor(-1.3).to(DEV)))
    got, _ = gating.route_backward(saved, grads)
    ref = topk_route_backward(ref_saved, grads, True)
    assert got.shape == (n, width)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
