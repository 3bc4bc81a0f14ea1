"""Routing per sample while generating: a decoder-only model's continuation keeps the routing
its prompt got (``first_call_routing``, declared by ``MoRAModel.generate``), so generating
with a cache and without one gives the same tokens, every decoding step routes as its
prompt did, and a kept routing refuses a call with another number of samples."""

from __future__ import annotations

import inspect

import pytest
import torch

from moracl.experts import routing_backend
from moracl.experts.per_sample import first_call_routing

from .conftest import randomize_adapters, tiny_llama
from .test_padding_losses import _wrapped

TARGETS = ["q_proj", "down_proj"]


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the first left-padded: ``ids (2, 7)`` and their attention mask."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 101, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("backend", ["eager", "naive"])  # the fused node; the router's route
@pytest.mark.parametrize("beams", [1, 3])
def test_generating_with_a_cache_or_without_gives_the_same_tokens(backend: str, beams: int) -> None:
    """Without a cache each step runs the whole sequence; with one, only its new token. A
    routing per sample that pooled whatever tokens a call carries routed the two apart (a
    cached step by its new token alone); keeping the prompt's routing makes them equal
    (float64: the same tokens, scores to rounding)."""
    model = _wrapped(tiny_llama, "topk-per-sample", TARGETS)
    ids, mask = _prompts()
    options = {
        "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "num_beams": beams,
        "output_scores": True, "return_dict_in_generate": True,
    }  # fmt: skip
    with torch.no_grad(), routing_backend(backend):
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **options)
        full = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
    assert torch.equal(cached.sequences, full.sequences)
    for mine, ref in zip(cached.scores, full.scores, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-9)


def test_each_decoding_step_routes_as_its_prompt_did() -> None:
    """Inside the block, a cached step's single token of each row gets its row's prompt
    routing at every routed layer; outside it, the same step routes by its own token."""
    model = _wrapped(tiny_llama, "topk-per-sample", TARGETS)
    ids, mask = _prompts()
    step_ids = torch.tensor([[7], [9]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)

    params = inspect.signature(model.model.forward).parameters  # the wrapped model's
    name = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: cache

    def step(past: object) -> dict[str, torch.Tensor]:
        model(input_ids=step_ids, attention_mask=step_mask, **{name: past})
        return {p: r.gates for p, r in model.last_routing.items()}

    with torch.no_grad():
        with first_call_routing():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            prompt = {p: r.gates.view(2, 7, -1)[:, 0] for p, r in model.last_routing.items()}
            kept = step(out.past_key_values)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        own = step(out.past_key_values)
    assert prompt.keys() == kept.keys() and len(prompt) == 2 * len(TARGETS)
    for path, gates in kept.items():
        torch.testing.assert_close(gates, prompt[path], rtol=0, atol=0)
    assert any(not torch.equal(own[p], prompt[p]) for p in prompt)  # the block is what keeps it


def test_a_kept_routing_refuses_a_call_with_another_number_of_samples() -> None:
    model = _wrapped(tiny_llama, "topk-per-sample", TARGETS)
    with (
        torch.no_grad(),
        first_call_routing(),
        pytest.raises(ValueError, match="covers 2 samples, but a later call has 3"),
    ):
        model(input_ids=torch.randint(1, 101, (2, 4)))
        model(input_ids=torch.randint(1, 101, (3, 4)))


class _Twice(torch.nn.Module):
    """One linear layer applied twice in a forward (as adaptive computation repeats a
    block): its two calls route different inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("twice", [False, True])
def test_a_mixture_called_twice_in_the_first_forward_keeps_no_routing(twice: bool) -> None:
    """A mixture called once per forward replays its first forward's routing; one called twice
    routes every later call by its own tokens (a kept routing could stand for neither call)."""
    from moracl import MoRAModel
    from moracl.experts import MixtureConfig

    from .test_backends import ROUTERS

    torch.manual_seed(0)
    base = _Twice() if twice else torch.nn.Sequential(torch.nn.Linear(8, 8))
    config = MixtureConfig(kind="lora", rank=2, experts=4, router=ROUTERS["topk-per-sample"])
    model = MoRAModel(base.double(), config, target_modules=["lin" if twice else "0"])
    model = model.double().eval()
    randomize_adapters(model, scale=1.0)
    gen = torch.Generator().manual_seed(1)
    first, later = (torch.randn(2, t, 8, generator=gen, dtype=torch.float64) for t in (5, 1))
    with torch.no_grad():
        own = model(later)
        with first_call_routing():
            model(first)
            got = model(later)
    assert torch.equal(got, own) == twice


def test_an_encoder_decoders_decoder_is_never_masked_by_its_source() -> None:
    """``generate``'s calls are routed as direct calls are: the source's mask for the
    encoder's tokens, the decoder's own for its tokens. Declaring the call's
    ``attention_mask`` for every layer, as before, masked decoder tokens by the source's
    padding whenever the decoder reached the source's length (here step 6, uncached): a
    padded source then scored otherwise than alone (float64, greedy)."""
    from .test_padding_losses import _tiny_t5

    model = _wrapped(_tiny_t5, "topk-per-sample", ["SelfAttention.q", "EncDecAttention.v"])
    src = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(src)
    mask[0, 3:] = 0  # sample 0: 3 real source tokens
    options = {
        "max_new_tokens": 7, "min_new_tokens": 7, "do_sample": False, "use_cache": False,
        "output_scores": True, "return_dict_in_generate": True,
    }  # fmt: skip
    with torch.no_grad():
        batch = model.generate(input_ids=src, attention_mask=mask, **options)
        alone = model.generate(input_ids=src[:1, :3], attention_mask=mask[:1, :3], **options)
    assert len(batch.scores) == 7
    for mine, ref in zip(batch.scores, alone.scores, strict=True):
        torch.testing.assert_close(mine[0], ref[0], rtol=1e-9, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_generating_with_a_cache_or_without_gives_the_same_tokens() -> None:
    """The fused node on CUDA (compiled per-sample gating, Triton routing) replays the kept
    routing too: float32, greedy."""
    model = _wrapped(tiny_llama, "topk-per-sample", TARGETS).float().cuda()
    ids, mask = (t.cuda() for t in _prompts())
    options = {
        "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "output_scores": True,
        "return_dict_in_generate": True,
    }  # fmt: skip
    with torch.no_grad(), routing_backend("triton"):
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **options)
        full = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
    assert torch.equal(cached.sequences, full.sequences)
    for mine, ref in zip(cached.scores, full.scores, strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "naive"])
def test_a_kept_routing_passes_no_gradient_to_the_router(backend: str) -> None:
    """Under autograd a later forward of the block trains the experts as routed by the kept
    routing; the router, whose logits that forward did not route by, gets a zero gradient."""
    model = _wrapped(tiny_llama, "topk-per-sample", ["q_proj"])
    ids, mask = _prompts()
    with first_call_routing(), routing_backend(backend):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:, :3]).logits.square().sum().backward()
    routers = [p for n, p in model.named_parameters() if "router" in n and p.requires_grad]
    experts = [p for n, p in model.named_parameters() if "lora_B" in n or "lora_A" in n]
    assert routers and experts
    assert all(p.grad is None or not p.grad.any() for p in routers)
    assert any(p.grad is not None and p.grad.any() for p in experts)
