"""Every routing backend gives the outputs, auxiliary losses and gradients of ``naive`` (the
router's own routing under autograd and a plain loop over the experts) on a tiny mixture of
each router kind.

The backends compute the same function by different operation sequences (a fused node with a
closed-form or replayed backward, kernels), so they are held to the float64 reference within
a tolerance derived from the dtype's machine epsilon.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from moracl import AdapterConfig, MoRALinear, MoRAModel
from moracl.adapters import ADAPTERS
from moracl.experts import (
    MixtureConfig,
    RouterConfig,
    RoutingBackend,
    RoutingContext,
    current_routing_backend,
    routing_backend,
)
from moracl.experts.backend import resolve_backend

ROUTERS = {
    "topk": RouterConfig(type="topk", k=2),
    "topk-switch": RouterConfig(type="topk", k=1, normalize=False),
    "topk-per-sample": RouterConfig(type="topk", k=2, per="sample"),
    "topk-tasks": RouterConfig(type="topk", k=2, num_tasks=2),
    "dynamic": RouterConfig(type="dynamic", top_p=0.6, max_experts=3),
    "soft": RouterConfig(type="soft"),
    "task": RouterConfig(type="task", num_tasks=2, task_weights=True),
    "hierarchical": RouterConfig(type="hierarchical", groups=2, k=1),
}
CPU_BACKENDS = ["eager", "compiled", "auto"]
TASK_IDS = torch.tensor([1, 0, 1])


def _layer(
    router: str,
    dtype: torch.dtype,
    kind: str = "lora",
    shape: tuple[int, int] = (12, 10),
    rank: int = 3,
) -> MoRALinear:
    """A ``shape`` linear with a mixture of 4 ``kind`` experts under ``router``, every
    parameter drawn in ``dtype`` (build in float64 and cast for the same draws in another)."""
    torch.manual_seed(0)
    cfg = MixtureConfig(kind=kind, rank=rank, experts=4, router=ROUTERS[router])
    layer = MoRALinear(nn.Linear(*shape), cfg).to(dtype).train()
    mix = layer.adapter("default")
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    if router == "topk-tasks":  # task rows that restrict the experts
        mix.router.set_expert_mask(0, torch.tensor([True, True, False, True]))
        mix.router.set_expert_mask(1, torch.tensor([False, True, True, True]))
    return layer


def _step(layer: MoRALinear, backend: str, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Output, weighted auxiliary loss, each auxiliary loss, gates and the gradients of
    ``(out · g).sum() + 10 · aux`` for the input and every trainable parameter."""
    mix = layer.adapter("default")
    x = x.detach().requires_grad_(True)
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    mix.context = RoutingContext(task_ids=TASK_IDS)
    torch.manual_seed(7)  # the same noise draws
    try:
        with routing_backend(backend):
            out = layer(x)
        routed = mix.context.results[mix]
    finally:
        mix.context = None
    grads = torch.autograd.grad((out * g).sum() + 10 * routed.aux_loss, params)
    losses = [routed.aux_losses[name] for name in sorted(routed.aux_losses)]
    return [out, routed.aux_loss, *losses, routed.gates, *grads]


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(3, 5, 10, generator=gen, dtype=torch.float64).to(dtype)
    return x, g


@pytest.mark.parametrize("kind", ["lora", "mora"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_backend_equals_naive_in_float64(router: str, backend: str, kind: str) -> None:
    """LoRA experts run the fused routed node; MoRA experts (not LoRA factors) the routing
    node (:mod:`moracl.experts.route_node`) and the bank's stacked update."""
    layer = _layer(router, torch.float64, kind)
    x, g = _inputs(torch.float64)
    want = _step(layer, "naive", x, g)
    got = _step(layer, backend, x, g)
    tol = 1e4 * torch.finfo(torch.float64).eps  # ~2e-12: rounding of a different op order
    assert len(got) == len(want)
    for mine, ref in zip(got, want):
        torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["lora", "mora"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_an_evaluated_layer_backpropagates_as_naive(router: str, kind: str) -> None:
    """In evaluation a noisy router draws no noise but keeps its noise-scale logits: the
    fused nodes' backward gave those columns a gradient of the wrong shape (and the Triton
    kernels left them unwritten); now they get zero, as under ``naive``."""
    layer = _layer(router, torch.float64, kind).eval()
    x, g = _inputs(torch.float64)
    want = _step(layer, "naive", x, g)
    got = _step(layer, "eager", x, g)
    tol = 1e4 * torch.finfo(torch.float64).eps
    for mine, ref in zip(got, want):
        torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "mora"])
@pytest.mark.parametrize(
    "router",
    ["topk", "topk-switch", "topk-per-sample", "topk-tasks", "task", "dynamic", "hierarchical"],
)
def test_the_triton_backend_equals_naive(router: str, kind: str) -> None:
    """The kernels (on CUDA, or in Triton's interpreter on the CPU) against the naive backend,
    both in float32 (the kernels' dtype; the same noise draws), within a tolerance of
    float32's epsilon relative to each tensor's scale."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if resolve_backend(RoutingBackend.TRITON, torch.device(device)) is not RoutingBackend.TRITON:
        pytest.skip("Triton's kernels do not run here (no GPU, interpreter off)")
    x, g = _inputs(torch.float64)
    layer = _layer(router, torch.float64, kind).float().to(device)
    x, g = x.float().to(device), g.float().to(device)
    ref = _step(layer, "naive", x, g)
    got = _step(layer, "triton", x, g)
    tol = 1e3 * torch.finfo(torch.float32).eps  # ~1.2e-4
    for mine, want in zip(got, ref):
        scale = want.abs().max().clamp_min(1.0)
        assert (mine - want).abs().max() <= tol * scale


def test_the_context_wins_over_the_config_and_is_restored() -> None:
    layer = _layer("topk", torch.float64)
    mix = layer.adapter("default")
    x, g = _inputs(torch.float64)
    naive = MixtureConfig(rank=3, experts=4, router=ROUTERS["topk"], backend="naive")
    assert naive.backend is RoutingBackend.NAIVE
    assert MixtureConfig.from_dict(naive.to_dict()) == naive
    assert current_routing_backend() is None
    with routing_backend(RoutingBackend.EAGER):
        assert current_routing_backend() is RoutingBackend.EAGER
        with routing_backend("naive"):
            assert resolve_backend(RoutingBackend.EAGER, x.device) is RoutingBackend.NAIVE
        assert current_routing_backend() is RoutingBackend.EAGER
    assert current_routing_backend() is None
    assert resolve_backend(RoutingBackend.AUTO, torch.device("cpu")) is RoutingBackend.EAGER
    assert resolve_backend(RoutingBackend.COMPILED, torch.device("cpu")) is RoutingBackend.EAGER
    mix.backend = RoutingBackend.NAIVE  # the config's choice, without a context
    a = _step(layer, "naive", x, g)
    mix.context = RoutingContext()
    torch.manual_seed(7)
    try:
        out = layer(x)
    finally:
        mix.context = None
    torch.testing.assert_close(out, a[0], rtol=0, atol=0)


def test_bad_backends_are_refused_naming_the_value() -> None:
    with (
        pytest.raises(ValueError, match=r"backend must be one of \['auto', .*got 'fast'"),
        routing_backend("fast"),
    ):
        pass
    with pytest.raises(ValueError, match="backend must be one of .*got 'fast'"):
        MixtureConfig(backend="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("router", ["topk", "dynamic", "hierarchical", "topk-per-sample"])
def test_experts_that_are_not_lora_route_in_one_node(router: str) -> None:
    """MoRA experts under ``eager``: the gates come out of the routing node, whose backward
    is the gating's (``naive`` and plain autograd, e.g. for MAML's clones, keep the router's
    own ``route``)."""
    from moracl.adapters.fused import plain_autograd

    layer = _layer(router, torch.float64, "mora")
    mix = layer.adapter("default")
    x, _ = _inputs(torch.float64)
    for backend, node in (("eager", True), ("naive", False)):
        mix.context = RoutingContext(task_ids=TASK_IDS)
        try:
            with routing_backend(backend):
                layer(x)
            gates = mix.context.results[mix].gates
        finally:
            mix.context = None
        assert (type(gates.grad_fn).__name__ == "_RouteBackward") is node
    mix.context = RoutingContext(task_ids=TASK_IDS)
    try:
        with routing_backend("eager"), plain_autograd():
            layer(x)
        assert type(mix.context.results[mix].gates.grad_fn).__name__ != "_RouteBackward"
    finally:
        mix.context = None


_NODES = ("_RoutedLoRALinearBackward", "_RouteBackward")


def _live_routing_nodes() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ in _NODES)


def _live_custom_nodes() -> int:
    """Backward nodes of any custom autograd function (every fused node of moracl's)."""
    gc.collect()
    node = torch.autograd.function.BackwardCFunction
    return sum(issubclass(type(o), node) for o in gc.get_objects())  # type(): no proxies


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_no_adapter_kind_keeps_a_graph_after_a_forward_without_a_backward(kind: str) -> None:
    """Every adapter kind's training forward (fused nodes included) frees its graph with its
    output when no backward runs."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12))
    options = {"target_rank": 2} if kind == "adalora" else {}
    config = AdapterConfig.from_dict({"kind": kind, "rank": 4, **options})
    model = MoRAModel(base, config, target_modules=["0", "1"])
    x, _ = _inputs(torch.float32)
    before = _live_custom_nodes()
    for _ in range(3):
        out = model.train()(x.requires_grad_(True))
        assert out.requires_grad
    del out
    assert _live_custom_nodes() == before


@pytest.mark.parametrize("kind", ["lora", "mora"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_a_forward_without_a_backward_leaves_no_graph_behind(router: str, kind: str) -> None:
    """An evaluation under grad mode (or a loss never backpropagated) frees each forward's
    graph with its output: the routing nodes keep their outputs through
    ``save_for_backward``, not as attributes of ``ctx`` (a cycle through C++ that the
    collector could not always break: such forwards' graphs stayed alive, one leaked forward
    in three or more for 12 of these 16 cases)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12))
    cfg = MixtureConfig(kind=kind, rank=3, experts=4, router=ROUTERS[router])
    model = MoRAModel(base, cfg, target_modules=["0", "1"]).train()
    x, _ = _inputs(torch.float32)
    before = _live_routing_nodes()
    for _ in range(3):
        out = model(x, task_ids=TASK_IDS)
        assert out.requires_grad
    del out
    with torch.no_grad():  # last_routing: this forward's (no graph) instead of the last one's
        model(x, task_ids=TASK_IDS)
    assert _live_routing_nodes() == before


@pytest.mark.parametrize("kind", ["lora", "mora"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_a_retained_graph_backpropagates_twice(router: str, kind: str) -> None:
    """``retain_graph=True`` keeps the routing's record: a second backward through the same
    graph gives the first one's gradients (input and parameters)."""
    layer = _layer(router, torch.float64, kind)
    mix = layer.adapter("default")
    x, g = _inputs(torch.float64)
    x.requires_grad_(True)
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    mix.context = RoutingContext(task_ids=TASK_IDS)
    try:
        with routing_backend("eager"):
            out = layer(x)
        aux = mix.context.results[mix].aux_loss
    finally:
        mix.context = None
    loss = (out * g).sum() + 10 * aux
    first = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(f is not None for f in first[1:])
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _twice_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_a_compiled_function_past_the_recompile_limit_runs_uncompiled_with_a_warning() -> None:
    """The compiled closed forms meet one input layout per layer shape, router and expert
    count: past torch's recompile limit they must keep computing (uncompiled), not raise."""
    from moracl.experts.backend import compiled

    fn = compiled(_twice_plus_one)
    with (
        torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False),
        pytest.warns(RuntimeWarning, match=r"_twice_plus_one met more input layouts .*\(1\)"),
    ):
        outs = [fn(torch.arange(float(n))) for n in (2, 3, 4)]
    for n, out in zip((2, 3, 4), outs):
        torch.testing.assert_close(out, torch.arange(float(n)) * 2 + 1, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls run quietly
        torch.testing.assert_close(fn(torch.ones(5)), torch.full((5,), 3.0), rtol=0, atol=0)
