"""Which token mask each call of a wrapped transformers model routes under.

Shape legend: ``b`` rows, ``t`` positions, ``d`` features.

A call through :class:`~moracl.model.MoRAModel` passes its ``attention_mask (b, t)`` to the
mixtures as the token mask (:func:`~moracl.experts.per_sample.token_mask`, non-strict: an
input of another leading shape, such as a cached decoding step's single token, routes
unmasked), so that padding never moves a sample's routing nor enters a per-token router's
auxiliary losses.  An encoder-decoder has two: the encoder's tokens (in the encoder, and as
the decoder's cross-attention keys and values, recognised by the encoder's output) route
under ``attention_mask``, the decoder's under ``decoder_attention_mask``
(:class:`~moracl.experts.context.SideMasks`), so that the encoder's padding never stands for
decoder tokens of the same length.  ``generate`` calls the wrapped model itself: each of its
calls is routed as a direct call is (``MoRAModel.routed_call``: that call's mask, or an
encoder-decoder's two sides), an encoder run alone under its own mask, and a decoder-only
model's routings per sample keep the prompt's routing for the continuation.  A mask
the caller declares around a call wins over all of these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

from torch import Tensor, nn

from moracl.experts.context import SideMasks
from moracl.experts.mixture import Mixture
from moracl.experts.per_sample import current_token_mask, first_call_routing, token_mask

__all__ = [
    "each_call",
    "encoder_of",
    "keeping_encoder_states",
    "masked_generate",
    "masking_each_call",
    "padding_scope",
    "side_masks",
]


def padding_scope(mixtures: Iterable[Mixture], attention_mask: Any) -> AbstractContextManager[None]:
    """A transformers-style ``attention_mask (b, t)`` declared as the token mask
    (non-strict); nothing where a mask is declared already or there is no mixture."""
    if (
        isinstance(attention_mask, Tensor)
        and attention_mask.ndim == 2
        and current_token_mask() is None
        and any(True for _ in mixtures)
    ):
        return token_mask(attention_mask, strict=False)
    return nullcontext()


def encoder_of(model: nn.Module) -> nn.Module | None:
    """A transformers encoder-decoder's encoder (``config.is_encoder_decoder`` and
    ``get_encoder()``), or ``None``."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return encoder if isinstance(encoder, nn.Module) else None


def _hidden_states(output: Any) -> Tensor | None:
    """An encoder's output states ``(b, t, d)``: ``last_hidden_state`` or the first item."""
    states = getattr(output, "last_hidden_state", None)
    if states is None and isinstance(output, (tuple, list)) and output:
        states = output[0]
    return states if isinstance(states, Tensor) else None


def side_masks(
    model: nn.Module, mixtures: Iterable[Mixture], kwargs: dict[str, Any]
) -> SideMasks | None:
    """For an encoder-decoder called with ``kwargs`` where no mask is declared: the
    ``attention_mask`` for the encoder's tokens and the ``decoder_attention_mask`` for the
    decoder's (2-D ones, each non-strict), with the encoder's states when the call passes
    them (``encoder_outputs``); ``None`` for any other model."""
    encoder = encoder_of(model)
    if encoder is None or current_token_mask() is not None:
        return None

    def mask(name: str) -> tuple[Tensor, bool] | None:
        value = kwargs.get(name)
        return (value, False) if isinstance(value, Tensor) and value.ndim == 2 else None

    inside = {id(m) for m in encoder.modules()}
    sides = SideMasks(
        encoder=mask("attention_mask"),
        decoder=mask("decoder_attention_mask"),
        encoder_mixtures=frozenset(id(m) for m in mixtures if id(m) in inside),
    )
    given = _hidden_states(kwargs.get("encoder_outputs"))  # precomputed: no encoder call
    if given is not None:
        sides.encoder_states.append(given)
    return sides


@contextmanager
def keeping_encoder_states(model: nn.Module, sides: SideMasks) -> Iterator[None]:
    """While the block runs, the output of each call of ``model``'s encoder is appended to
    ``sides.encoder_states`` (the decoder's cross-attention reads it); the hook is removed
    on exit."""
    encoder = encoder_of(model)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} is not an encoder-decoder")

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        states = _hidden_states(output)
        if states is not None:
            sides.encoder_states.append(states)

    handle = encoder.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def each_call(
    modules: Sequence[nn.Module], scope: Callable[[dict[str, Any]], AbstractContextManager[None]]
) -> Iterator[None]:
    """While the block runs, every call of ``modules`` runs inside ``scope(kwargs)`` (its
    keyword arguments); the hooks are removed on exit."""
    scopes: list[ExitStack] = []

    def enter(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        stack = ExitStack()
        scopes.append(stack)  # first: the closing hook pops it even if the scope raises
        stack.enter_context(scope(kwargs))

    def leave(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        scopes.pop().close()

    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(m.register_forward_hook(leave, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while scopes:  # a call that raised before its hook ran (never left open)
            scopes.pop().close()


def _call_mask(kwargs: dict[str, Any]) -> AbstractContextManager[None]:
    """A call's 2-D ``attention_mask`` as the token mask (non-strict), unless one is
    declared already (an outer call's, or the caller's)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.ndim == 2 and current_token_mask() is None:
        return token_mask(mask, strict=False)
    return nullcontext()


def masking_each_call(modules: Sequence[nn.Module]) -> AbstractContextManager[None]:
    """While the block runs, every call of ``modules`` passed a 2-D ``attention_mask``
    keyword declares it as the token mask (non-strict) for its duration, unless a mask is
    declared already (an outer call's, or the caller's); the hooks are removed on exit."""
    return each_call(modules, _call_mask)


def masked_generate(
    model: nn.Module,
    generate: Callable[..., Any],
    routed_call: Callable[[dict[str, Any]], AbstractContextManager[None]],
) -> Callable[..., Any]:
    """``model``'s ``generate`` with each call it makes of ``model`` routed as a direct call
    is (``routed_call(kwargs)``: its ``attention_mask``, an encoder-decoder's two sides), and
    an encoder-decoder's encoder run under its ``attention_mask`` (:func:`masking_each_call`):
    the prompt's forward, expanded for beam search or not, and the encoder's tokens pool and
    count their real tokens only; a cached decoding step's single token routes unmasked.
    In a decoder-only model every routing per sample keeps the prompt's routing for the
    decoding steps (:func:`~moracl.experts.per_sample.first_call_routing`), with a cache or
    without; an encoder-decoder's decoder, whose first call is its start token alone,
    routes each call by its own tokens."""

    @functools.wraps(generate)
    def masked(*args: Any, **kwargs: Any) -> Any:
        encoder = encoder_of(model)
        with ExitStack() as stack:
            if encoder is None:
                stack.enter_context(first_call_routing())
            else:
                stack.enter_context(masking_each_call([encoder]))
            stack.enter_context(each_call([model], routed_call))
            return generate(*args, **kwargs)

    return masked
