"""A mixture of one MoRA-sharing bank in one node (:mod:`moracl.experts.routed_mora`): the
frozen layer, every router kind's routing and the gated experts give the outputs, auxiliary
losses and gradients of ``naive`` (the router's own routing and a plain loop over the
experts' MoRA updates), in float64 and float32, for square sizes ``r̂`` that are and are not
multiples of 8 (the node pads them)."""

from __future__ import annotations

import pytest
import torch

import moracl.adapters.fused as fused_nodes
from moracl import MoRALinear
from moracl.adapters.fused import aligned_size
from moracl.adapters.mora import bank as mora_bank
from moracl.experts import RoutingContext, routing_backend

from . import test_backends
from .test_backends import ROUTERS, TASK_IDS, _step

# (in, out, rank) -> r̂ = floor(sqrt((in + out) · rank)): 8 (aligned), 10 (padded to 16) with
# a tiled output (o > r̂), 12 with one group (i < r̂) and a truncated tile
SHAPES = {"aligned": (12, 10, 3), "padded": (20, 14, 3), "narrow": (6, 22, 6)}


@pytest.fixture
def node_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the routed node on the CPU too (by default it runs on CUDA only)."""
    monkeypatch.setattr(mora_bank, "FUSED_DEVICES", ("cpu", "cuda"))


def _layer(router: str, shape: str, dtype: torch.dtype, device: str = "cpu") -> MoRALinear:
    """:func:`tests.test_backends._layer` with MoRA experts on one of :data:`SHAPES`."""
    i, o, rank = SHAPES[shape]
    return test_backends._layer(router, dtype, "mora", (i, o), rank).to(device)


def _inputs(shape: str, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    i, o, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, i, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, o, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), g.to(device, dtype)


def _node_name(layer: MoRALinear, x: torch.Tensor) -> str:
    mix = layer.adapter("default")
    mix.context = RoutingContext(task_ids=TASK_IDS.to(x.device))
    try:
        with routing_backend("eager"):
            out = layer(x)
    finally:
        mix.context = None
    return type(out.grad_fn).__name__


def test_the_shapes_cover_aligned_padded_and_single_group_sizes() -> None:
    sizes = {
        name: _layer("topk", name, torch.float64).adapter("default").banks[0].r_hat
        for name in SHAPES
    }
    assert sizes == {"aligned": 8, "padded": 10, "narrow": 12}
    assert [aligned_size(r) for r in sizes.values()] == [8, 16, 16]
    assert SHAPES["narrow"][0] < sizes["narrow"] < SHAPES["narrow"][1]


@pytest.fixture(params=[False, True], ids=["frozen-first", "update-first"])
def order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Either order of the node's sums, on any device: the frozen product first with the
    decompression as a 0/1 matmul (the CPU's), or the tiled update first with the frozen
    product added in the matmul's epilogue and the decompression's transpose a fold (CUDA's)."""
    monkeypatch.setattr(fused_nodes, "update_first", lambda t: request.param)


@pytest.mark.usefixtures("node_on_cpu", "order")
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_the_routed_node_equals_naive_in_float64(router: str, shape: str) -> None:
    layer = _layer(router, shape, torch.float64)
    x, g = _inputs(shape, torch.float64)
    assert _node_name(layer, x) == "_RoutedMoRALinearBackward"
    want = _step(layer, "naive", x, g)
    got = _step(layer, "eager", x, g)
    tol = 1e4 * torch.finfo(torch.float64).eps  # ~2e-12: rounding of a different op order
    assert len(got) == len(want)
    for mine, ref in zip(got, want):
        torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)


@pytest.mark.usefixtures("node_on_cpu", "order")
@pytest.mark.parametrize("router", ["topk", "topk-per-sample", "dynamic", "task"])
def test_the_routed_node_in_float32_equals_naive_to_float32_rounding(router: str) -> None:
    """Both in float32 (a noisy router draws its noise in the routing dtype)."""
    layer = _layer(router, "padded", torch.float64).float()  # the float64 test's draws
    x, g = _inputs("padded", torch.float32)
    ref = _step(layer, "naive", x, g)
    got = _step(layer, "eager", x, g)
    tol = 1e3 * torch.finfo(torch.float32).eps  # ~1.2e-4, relative to each tensor's scale
    for mine, want in zip(got, ref):
        assert (mine - want).abs().max() <= tol * want.abs().max().clamp_min(1.0)


def test_on_the_cpu_the_mixture_keeps_the_unfused_sum_by_default() -> None:
    """So that a grown mixture (two banks, the unfused sum) rounds old tasks as before."""
    layer = _layer("topk", "padded", torch.float64)
    x, _ = _inputs("padded", torch.float64)
    assert _node_name(layer, x) != "_RoutedMoRALinearBackward"


@pytest.mark.usefixtures("node_on_cpu")
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_a_retained_graph_backpropagates_twice_through_the_node(router: str) -> None:
    test_backends.test_a_retained_graph_backpropagates_twice(router, "mora")  # via the node


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "triton"])  # plain and compiled helpers
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(
    "router", ["topk", "topk-per-sample", "topk-tasks", "dynamic", "hierarchical", "task"]
)
def test_on_cuda_the_mixture_runs_the_node_and_equals_naive(
    router: str, shape: str, backend: str
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    layer = _layer(router, shape, torch.float64, "cuda").float()
    x, g = _inputs(shape, torch.float32, "cuda")
    assert _node_name(layer, x) == "_RoutedMoRALinearBackward"
    ref = _step(layer, "naive", x, g)
    got = _step(layer, backend, x, g)
    tol = 1e3 * torch.finfo(torch.float32).eps  # ~1.2e-4, relative to each tensor's scale
    for mine, want in zip(got, ref):
        assert (mine - want).abs().max() <= tol * want.abs().max().clamp_min(1.0)


@pytest.mark.usefixtures("node_on_cpu")
@pytest.mark.parametrize("compiled", [True, False])
def test_a_bank_can_keep_its_helpers_uncompiled(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile_helpers = False``: the node's helpers are asked for the ``eager`` backend
    (plain operations) whatever the mixture's backend; the outputs are the same."""
    from moracl.experts import RoutingBackend
    from moracl.experts.backend import resolve_backend

    asked: list[RoutingBackend] = []
    shapes: set[bool | None] = set()

    def for_backend(fn, backend, device, dynamic=None):  # type: ignore[no-untyped-def]
        asked.append(backend)
        shapes.add(dynamic)
        return fn

    monkeypatch.setattr(mora_bank, "for_backend", for_backend)
    layer = _layer("topk", "padded", torch.float64)
    bank = layer.adapter("default").banks[0]
    bank.compile_helpers = compiled
    x, g = _inputs("padded", torch.float64)
    want = _step(layer, "naive", x, g)
    got = _step(layer, "triton", x, g)
    resolved = resolve_backend(RoutingBackend.TRITON, torch.device("cpu"))  # interpreter or not
    expected = resolved if compiled else RoutingBackend.EAGER
    assert asked and set(asked) == {expected}
    assert shapes == {False}  # a kernel per layer shape, not shape-generic ones
    for mine, ref in zip(got, want):
        torch.testing.assert_close(mine, ref, rtol=1e-11, atol=1e-11)
