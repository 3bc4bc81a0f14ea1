"""Adaptive computation's early exit per token against the masked fixed-step form.

The ``token`` loop runs the block on the still-running tokens only; every token's output,
steps, remainder and halting weights, the ponder cost and the gradients must be those of the
``masked`` loop (``max_steps`` block calls on every token, a halted token's later steps
weighted 0), with a plain MLP block and with moracl's top-k mixture layer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from moracl import AdapterConfig, ExpertGroup, MixtureConfig, MoRAModel, RouterConfig
from moracl.experts import token_mask
from moracl.experts.act import ACTLoop, ACTOutput, AdaptiveComputation
from moracl.layer import MoRALinear

D, MAX_STEPS = 8, 5


def _mlp(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, D)).to(dtype)


def _mixture(dtype: torch.dtype, per: str = "token") -> nn.Module:
    """A top-2-of-4 LoRA mixture on a linear layer, experts made non-zero so routing matters."""
    config = MixtureConfig(
        groups=(ExpertGroup(AdapterConfig(kind="lora", rank=2), 4),),
        router=RouterConfig(type="topk", k=2, noise=False, per=per),
    )
    layer = MoRALinear(nn.Linear(D, D).to(dtype))
    layer.add_adapter("default", config)
    layer.set_active(["default"])
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.normal_(0, 0.5)
    return nn.Sequential(layer, nn.Tanh())


BLOCKS: dict[str, Callable[[torch.dtype], nn.Module]] = {"mlp": _mlp, "mixture": _mixture}
#: the halting unit's weight std and bias per block: tokens halt after 1 to 5 steps
HALT = {"mlp": (5.0, -2.0), "mixture": (3.0, -4.0)}


def _act(
    block: str, dtype: torch.dtype, seed: int = 0, buckets: int | None = None
) -> AdaptiveComputation:
    """Halting weights spread so that tokens halt at different steps; ``buckets``: the
    token loop's ``shape_buckets`` (None: exact sizes on the CPU)."""
    torch.manual_seed(seed)
    block_module = BLOCKS[block](dtype)
    act = AdaptiveComputation(
        block_module, features=D, max_steps=MAX_STEPS, shape_buckets=buckets
    ).to(dtype)
    std, bias = HALT[block]
    with torch.no_grad():
        act.act_halt.weight.normal_(0, std)
        act.act_halt.bias.fill_(bias)
    return act


def _assert_same(token: ACTOutput, masked: ACTOutput, atol: float, rtol: float) -> None:
    k = token.weights.shape[0]
    tol = {"atol": atol, "rtol": rtol}
    torch.testing.assert_close(token.output, masked.output, **tol)
    torch.testing.assert_close(token.remainders, masked.remainders, **tol)
    torch.testing.assert_close(token.ponder_cost, masked.ponder_cost, **tol)
    torch.testing.assert_close(token.weights, masked.weights[:k], **tol)
    assert torch.equal(token.steps, masked.steps)
    assert k == int(masked.steps.max())  # the token loop stops with the last token
    assert not masked.weights[k:].any()  # nothing after the last halt in the masked form


CASES = [(torch.float64, 1e-12, 0.0), (torch.float32, 1e-5, 1e-5)]


#: exact sizes, and pads to multiples of ceil(42 / 5) = 9 rows
BUCKETS = [None, 5]


@pytest.mark.parametrize("buckets", BUCKETS)
@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize(("dtype", "atol", "rtol"), CASES)
def test_token_loop_equals_the_masked_form_for_every_token(
    block: str, dtype: torch.dtype, atol: float, rtol: float, buckets: int | None
) -> None:
    act = _act(block, dtype, buckets=buckets).eval()
    x = torch.randn(6, 7, D, dtype=dtype)
    with torch.no_grad():
        masked = act(x, loop="masked")
        token = act(x)  # eval mode: the token loop by default
    assert masked.weights.shape == (MAX_STEPS, 6, 7)
    assert len(torch.unique(masked.steps)) >= 3  # tokens halt at different steps
    _assert_same(token, masked, atol, rtol)
    with torch.no_grad():
        _assert_same(act(x, loop="batch"), masked, atol, rtol)


@pytest.mark.parametrize("buckets", BUCKETS)
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_token_loop_in_training_has_the_masked_form_gradients(
    block: str, buckets: int | None
) -> None:
    grads = {}
    for loop in ("masked", "token"):
        act = _act(block, torch.float64, buckets=buckets).train()
        act.training_loop = ACTLoop.parse(loop)
        x = torch.randn(5, 6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        res = act(x)
        (res.output.square().sum() + res.ponder_cost).backward()
        assert x.grad is not None
        grads[loop] = {"x": x.grad, **{n: p.grad for n, p in act.named_parameters()}}
        assert len(torch.unique(res.steps)) >= 3
    trained = [n for n, g in grads["masked"].items() if g is not None and g.abs().sum() > 0]
    assert {"x", "act_halt.weight", "act_halt.bias"} <= set(trained)
    for name, g in grads["masked"].items():
        other = grads["token"][name]
        if g is None:
            assert other is None or not other.any(), name
        else:
            assert other is not None, name
            torch.testing.assert_close(other, g, rtol=0, atol=1e-12, msg=name)


class _Counting(nn.Module):
    """Wraps a block and counts the token rows it was run on, call by call."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.calls: list[int] = []

    @property
    def rows(self) -> int:
        return sum(self.calls)

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[:-1].numel())
        out: Tensor = self.block(x)
        return out


@pytest.mark.parametrize("loop", list(ACTLoop))
def test_block_work_follows_the_steps_computed(loop: ACTLoop) -> None:
    torch.manual_seed(0)
    counting = _Counting(_mlp(torch.float64))
    act = AdaptiveComputation(counting, features=D, max_steps=MAX_STEPS).double().eval()
    with torch.no_grad():
        act.act_halt.weight.normal_(0, 5.0)
        act.act_halt.bias.fill_(-2.0)
        res = act(torch.randn(40, D, dtype=torch.float64), loop=loop)
    expected = {
        ACTLoop.MASKED: 40 * MAX_STEPS,
        ACTLoop.BATCH: 40 * int(res.steps.max()),
        ACTLoop.TOKEN: int(res.steps.sum()),  # N per token: the cost follows the mean steps
    }[loop]
    assert counting.rows == expected
    assert res.steps.mean() < 0.8 * MAX_STEPS


def test_shape_buckets_pad_each_step_to_a_multiple_and_only_the_padding_is_extra() -> None:
    torch.manual_seed(0)
    counting = _Counting(_mlp(torch.float64))
    act = AdaptiveComputation(counting, features=D, max_steps=MAX_STEPS, shape_buckets=4)
    act = act.double().eval()
    with torch.no_grad():
        act.act_halt.weight.normal_(0, 5.0)
        act.act_halt.bias.fill_(-2.0)
        res = act(torch.randn(40, D, dtype=torch.float64))  # unit = ceil(40 / 4) = 10 rows
    running = [int((res.steps > k).sum()) for k in range(len(counting.calls))]  # live rows
    assert counting.calls[0] == 40 and len(set(running)) >= 3
    for calls, live in zip(counting.calls[1:], running[1:]):
        assert calls % 10 == 0 and live <= calls < live + 10  # padding only up to the unit
    assert any(c > live for c, live in zip(counting.calls, running))  # some step was padded


def test_shape_buckets_are_checked() -> None:
    for bad in (-1, 2.5, True, "32"):
        with pytest.raises(
            ValueError, match=f"shape_buckets must be None or an integer >= 0, got {bad!r}"
        ):
            AdaptiveComputation(_mlp(torch.float32), features=D, max_steps=2, shape_buckets=bad)  # type: ignore[arg-type]


def test_all_halting_at_the_first_step_runs_the_block_once() -> None:
    act = _act("mlp", torch.float64).eval()
    with torch.no_grad():
        act.act_halt.bias.fill_(20.0)
        x = torch.randn(3, D, dtype=torch.float64)
        res = act(x)
    assert res.weights.shape == (1, 3) and torch.equal(res.steps, torch.ones(3).double())
    torch.testing.assert_close(res.output, act.block(x), rtol=0, atol=1e-15)


def test_loop_names_are_checked_and_a_per_sample_mixture_refuses_the_token_loop() -> None:
    with pytest.raises(ValueError, match=r"inference_loop must be one of \['masked', 'batch', "):
        AdaptiveComputation(_mlp(torch.float32), features=D, max_steps=2, inference_loop="fast")
    act = AdaptiveComputation(_mlp(torch.float32), features=D, max_steps=2)
    with pytest.raises(ValueError, match="loop must be one of .* got 'all'"):
        act(torch.randn(2, D), loop="all")
    per_sample = _mixture(torch.float32, per="sample")
    with pytest.raises(ValueError, match="routes whole samples .* expected 'masked' or 'batch'"):
        AdaptiveComputation(per_sample, features=D, max_steps=2)
    ok = AdaptiveComputation(per_sample, features=D, max_steps=2, inference_loop="batch").eval()
    with pytest.raises(ValueError, match="routes whole samples"):
        ok(torch.randn(2, 3, D), loop="token")
    assert ok(torch.randn(2, 3, D)).output.shape == (2, 3, D)


class _Stepped(nn.Module):
    """``x + tanh(up(x))`` repeated under a halting unit: the model a mixture goes into."""

    def __init__(self, buckets: int | None) -> None:
        super().__init__()
        self.act = AdaptiveComputation(
            _Residual(), features=D, max_steps=MAX_STEPS, shape_buckets=buckets
        )
        with torch.no_grad():
            self.act.act_halt.weight.normal_(0, 3.0)
            self.act.act_halt.bias.fill_(-3.0)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.act(x, loop="token").output
        return out


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.up(x))


def _routed_model(buckets: int | None) -> MoRAModel:
    """:class:`_Stepped` with a top-2-of-4 LoRA mixture on ``up`` (no noise: the routing is
    a function of each token), in float64, training."""
    torch.manual_seed(0)
    config = MixtureConfig(
        groups=(ExpertGroup(AdapterConfig(kind="lora", rank=2), 4),),
        router=RouterConfig(type="topk", k=2, noise=False),
    )
    model = MoRAModel(_Stepped(buckets).double(), config, target_modules=["up"]).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.train()


def _aux_and_grads(model: MoRAModel, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    model(x)
    aux = model.aux_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    return aux.detach(), [g.detach() for g in torch.autograd.grad(aux, params)]


def _assert_same_losses(
    got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]
) -> None:
    """Equal up to float64 rounding: a mask routes the losses through their masked form (a
    weighted mean), whose rounding differs from the plain mean's by up to ~1e-8 of a gradient's
    scale here; counting a pad or a padding token moves the losses by ~1e-3."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7 * float(w.abs().max()))


def test_the_routers_losses_count_the_running_tokens_whatever_the_bucket_size() -> None:
    """Pad rows (a running token repeated up to a bucket) are declared to the block's layers
    as masked rows: the mixture's auxiliary losses and their gradients are those of exact
    sizes; before, the pads counted, so CUDA's default of 32 buckets and the CPU's exact
    sizes gave different losses."""
    x = torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = _aux_and_grads(_routed_model(0), x)
    for buckets in (3, 4):
        model = _routed_model(buckets)
        got = _aux_and_grads(model, x)
        (routing,) = model.last_routing.values()
        assert routing.tokens is not None
        assert routing.gates.shape[0] > routing.tokens.sum()  # pads were run, not counted
        _assert_same_losses(got, want)


def test_under_a_token_mask_the_routers_losses_count_the_real_tokens_only() -> None:
    """Padding declared by a ``(b, t)`` token mask (what the model declares from an
    ``attention_mask``) is followed into every step: the losses equal those of the real
    tokens run alone."""
    x = torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:], mask[2, 3:] = False, False
    want = _aux_and_grads(_routed_model(0), x[mask][None])
    for buckets in (0, 3):
        with token_mask(mask):
            got = _aux_and_grads(_routed_model(buckets), x)
        _assert_same_losses(got, want)


def _inference_routing(model: MoRAModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """The routers' auxiliary loss and the experts' usage over the counted rows of an
    inference call (no gradients: the fixed-buffer ``token`` loop)."""
    model.eval()
    with torch.no_grad():
        model(x)
    (routing,) = model.last_routing.values()
    return model.aux_loss(), routing.stats.usage


def test_at_inference_the_routing_record_counts_the_running_real_tokens_only() -> None:
    """The inference loop (fixed buffers) declares each step's rows too: what the routers
    record and their losses count neither the pads of a bucket nor the padding a call
    declares; before, both counted, so the statistics read after an inference call depended
    on the bucket size and included padding."""
    x = torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:], mask[2, 3:] = False, False
    want = _inference_routing(_routed_model(0), x)
    want_real = _inference_routing(_routed_model(0), x[mask][None])
    for buckets in (3, 4):
        got = _inference_routing(_routed_model(buckets), x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
        with token_mask(mask):
            got = _inference_routing(_routed_model(buckets), x)
        torch.testing.assert_close(got, want_real, rtol=1e-9, atol=0)
