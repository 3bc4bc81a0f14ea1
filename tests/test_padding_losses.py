"""Routers that route each token leave padded positions out of their auxiliary losses under a
declared token mask (as transformers' Mixtral leaves them out of its balance loss): the
losses of a padded batch equal the router's losses of its real tokens alone, and so do their
gradients, under every backend and for LoRA and MoRA experts (float64)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moracl import MoRAModel
from moracl.adapters.mora import bank as mora_bank
from moracl.experts import MixtureConfig, RoutingContext, RoutingStats, routing_backend
from moracl.experts.per_sample import token_mask

from .conftest import randomize_adapters, tiny_llama
from .test_backends import ROUTERS, TASK_IDS, _layer

F64 = torch.float64
PER_TOKEN = sorted(r for r in ROUTERS if r not in ("topk-per-sample", "task"))  # with losses
LENGTHS = torch.tensor([5, 3, 1])
MASK = torch.arange(5) < LENGTHS[:, None]  # (3, 5): 9 real tokens


def _wrapped(
    make_base: Callable[[], torch.nn.Module], router: str, targets: list[str]
) -> MoRAModel:
    """``make_base()`` in float64 and evaluation (no routing noise, whose draws depend on the
    token count) with a mixture of 4 LoRA experts under ``router`` on ``targets``, its
    adapters random; seeded."""
    torch.manual_seed(0)
    config = MixtureConfig(kind="lora", rank=2, experts=4, router=ROUTERS[router])
    model = MoRAModel(make_base().double(), config, target_modules=targets).double().eval()
    randomize_adapters(model, scale=1.0)
    return model


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    """``x (3, 5, 12)`` with large values at the padded positions, and its real tokens."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 12, generator=gen, dtype=F64)
    junk = 30 * torch.randn(3, 5, 12, generator=gen, dtype=F64)
    return torch.where(MASK[..., None], x, junk), x[MASK]


def _routed(layer: torch.nn.Module, x: torch.Tensor, backend: str, masked: bool):  # type: ignore[no-untyped-def]
    mix = layer.adapter("default")
    mix.context = RoutingContext(task_ids=TASK_IDS)
    try:
        with routing_backend(backend):
            if masked:
                with token_mask(MASK):
                    layer(x)
            else:
                layer(x)
        return mix.context.results[mix]
    finally:
        mix.context = None


@pytest.mark.parametrize("kind", ["lora", "mora", "mora-node"])
@pytest.mark.parametrize("backend", ["naive", "eager"])
@pytest.mark.parametrize("router", PER_TOKEN)
def test_padded_positions_are_left_out_of_the_auxiliary_losses(
    router: str, backend: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "mora-node":  # the routed MoRA node, on the CPU too
        monkeypatch.setattr(mora_bank, "FUSED_DEVICES", ("cpu", "cuda"))
    layer = _layer(router, F64, "mora" if kind.startswith("mora") else "lora").eval()
    mix = layer.adapter("default")  # evaluation: no noise, whose draws depend on the count
    params = [p for p in mix.router.parameters() if p.requires_grad]
    x, real = _padded()
    token_tasks = TASK_IDS[:, None].expand(3, 5)[MASK]  # (9,)
    want = mix.router(real, task_ids=token_tasks)  # the real tokens alone, no mask
    got = _routed(layer, x, backend, masked=True)
    assert sorted(got.aux_losses) == sorted(want.aux_losses)
    tol = 1e4 * torch.finfo(F64).eps
    for name, loss in want.aux_losses.items():
        torch.testing.assert_close(got.aux_losses[name], loss, rtol=tol, atol=tol)
    got_grads = torch.autograd.grad(got.aux_loss, params)
    want_grads = torch.autograd.grad(want.aux_loss, params)
    for mine, ref in zip(got_grads, want_grads):
        torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)
    unmasked = _routed(layer, x, backend, masked=False)  # the padding counts without a mask
    assert not torch.allclose(unmasked.aux_loss, want.aux_loss)


def test_a_strict_mask_of_another_shape_is_refused_by_a_per_token_router() -> None:
    layer = _layer("topk", F64)
    x, _ = _padded()
    with token_mask(torch.ones(3, 4, dtype=torch.bool)), pytest.raises(ValueError) as err:
        layer(x)
    assert "(3, 4)" in str(err.value) and "(3, 5)" in str(err.value)
    with token_mask(torch.ones(3, 4, dtype=torch.bool), strict=False):
        layer(x)  # a non-strict mask that does not fit: every position counts


@pytest.mark.parametrize(
    "active", [torch.ones(4, dtype=torch.bool), torch.ones(9), [True] * 9], ids=str
)
def test_a_router_refuses_an_active_mask_that_is_not_one_bool_per_token(active: object) -> None:
    router = _layer("topk", F64).adapter("default").router
    with pytest.raises(ValueError, match=r"active must be a bool tensor of shape \(9,\)"):
        router(torch.randn(9, 12, dtype=F64), active=active)  # type: ignore[arg-type]


@pytest.mark.parametrize("router", ["topk", "hierarchical", "dynamic"])
def test_a_transformers_model_gives_a_padded_sample_the_losses_it_has_alone(router: str) -> None:
    """``attention_mask`` passed to the wrapper declares the padding: a right-padded sample's
    auxiliary loss is its loss alone (causal attention never reads the padding), and counting
    the padding would move it."""
    model = _wrapped(tiny_llama, router, ["q_proj", "v_proj", "down_proj"])
    short = torch.randint(1, 101, (1, 4))
    padded = torch.cat([short, torch.randint(1, 101, (1, 5))], 1)
    mask = (torch.arange(9) < 4).long()[None]  # (1, 9)
    model(input_ids=short, attention_mask=torch.ones_like(short))
    alone = model.aux_loss()
    model(input_ids=padded, attention_mask=mask)
    torch.testing.assert_close(model.aux_loss(), alone, rtol=1e-10, atol=1e-12)
    model(input_ids=padded)
    assert not torch.allclose(model.aux_loss(), alone)


def _tiny_t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1,
        num_decoder_layers=1, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg).double().eval()


@pytest.mark.parametrize("cross", [True, False], ids=["cross-attention", "self-attention"])
def test_an_encoder_decoder_masks_each_side_with_its_own_padding(cross: bool) -> None:
    """T5 with routing per sample: the encoder's tokens (in the encoder, and as the decoder's
    cross-attention keys and values) pool under ``attention_mask``, the decoder's under
    their own mask (none here), even where the decoder's length equals the encoder's: a
    sample padded in a batch gives the logits it gives alone (float64)."""
    targets = ["EncDecAttention.v", "EncDecAttention.k"] if cross else ["SelfAttention.q"]
    model = _wrapped(_tiny_t5, "topk-per-sample", targets)
    src = torch.randint(1, 50, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0  # sample 0: 3 real source tokens, padded to the decoder's length 5
    tgt = torch.randint(1, 50, (2, 5))
    with torch.no_grad():
        batch = model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        alone = model(
            input_ids=src[:1, :3], attention_mask=mask[:1, :3], decoder_input_ids=tgt[:1]
        ).logits
        with token_mask(mask):  # the encoder called on its own, as generate() calls it
            encoded = model.model.get_encoder()(input_ids=src, attention_mask=mask)
        given = model(
            encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tgt
        ).logits  # precomputed encoder states, as generate() passes them
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(given, batch, rtol=1e-9, atol=1e-10)


def test_generate_routes_a_left_padded_prompt_as_it_routes_alone() -> None:
    """``generate`` calls the wrapped model itself: each of its forwards is masked by the
    call's ``attention_mask``, so a left-padded prompt, routed per sample, gets the scores
    it gets alone at every step (float64, greedy)."""
    model = _wrapped(tiny_llama, "topk-per-sample", ["q_proj", "down_proj"])
    short, long = torch.randint(1, 101, (1, 3)), torch.randint(1, 101, (1, 7))
    prompts = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(prompts)
    mask[0, :4] = 0  # left padding
    options = {
        "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_scores": True,
        "return_dict_in_generate": True,
    }  # fmt: skip
    with torch.no_grad():
        batch = model.generate(input_ids=prompts, attention_mask=mask, **options)
        alone = model.generate(input_ids=short, attention_mask=torch.ones_like(short), **options)
    assert torch.equal(batch.sequences[0, 4:], alone.sequences[0])
    for mine, ref in zip(batch.scores, alone.scores, strict=True):
        torch.testing.assert_close(mine[0], ref[0], rtol=1e-9, atol=1e-10)


def test_generate_with_an_encoder_decoder_masks_its_source_padding() -> None:
    """T5's ``generate`` runs the encoder on its own, then decodes against its states: the
    encoder's and the cross-attention's per-sample routing pool a padded source's real
    tokens only, so its scores are the ones it gets alone (float64, greedy)."""
    model = _wrapped(_tiny_t5, "topk-per-sample", ["SelfAttention.q", "EncDecAttention.v"])
    src = torch.randint(1, 50, (2, 6))
    mask = torch.ones_like(src)
    mask[0, 3:] = 0  # sample 0: 3 real source tokens
    options = {
        "max_new_tokens": 3, "do_sample": False, "output_scores": True,
        "return_dict_in_generate": True,
    }  # fmt: skip
    with torch.no_grad():
        batch = model.generate(input_ids=src, attention_mask=mask, **options)
        alone = model.generate(input_ids=src[:1, :3], attention_mask=mask[:1, :3], **options)
    for mine, ref in zip(batch.scores, alone.scores, strict=True):
        torch.testing.assert_close(mine[0], ref[0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("router", ["topk", "dynamic", "topk-per-sample"])
def test_routing_statistics_count_the_real_tokens_only(router: str) -> None:
    """``routing_stats()`` (usage, entropy, experts per token) of a padded batch under its
    mask equal the statistics of its real tokens' routing, and differ without the mask."""
    model = _wrapped(tiny_llama, router, ["q_proj"])
    ids = torch.randint(1, 101, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        masked = model.routing_stats()
        path = next(iter(masked))  # the first layer's
        result = model.last_routing[path]
        real = mask.reshape(-1).bool()
        want = RoutingStats.compute(result.probs[real], result.chosen[real])
        model(input_ids=ids)
        unmasked = model.routing_stats()
    for name in ("usage", "entropy", "experts_per_token"):
        torch.testing.assert_close(getattr(masked[path], name), getattr(want, name))
    assert not torch.allclose(masked[path].entropy, unmasked[path].entropy)


def test_the_data_parallel_balance_loss_counts_the_real_tokens_too() -> None:
    """``reduced_aux_loss`` (the balance loss over the global batch) in one process equals the
    routers' own losses of a padded batch: the real tokens only, as they count them."""
    from moracl.distributed import reduced_aux_loss

    model = _wrapped(tiny_llama, "topk", ["q_proj"])
    ids = torch.randint(1, 101, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 2:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    results = list(model.last_routing.values())
    own = sum(r.aux_loss for r in results)
    torch.testing.assert_close(reduced_aux_loss(results), own.float())  # it sums in float32
