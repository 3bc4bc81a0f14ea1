"""Activation checkpointing (``torch.utils.checkpoint``, transformers'
``activation_checkpointing_enable()``): the same gradients as without it for every adapter kind
and router, or a clear error where they could not be the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moracl import AdapterConfig, MoRAModel
from moracl.experts.mixture import MixtureConfig

from .conftest import randomize_adapters, tiny_llama
from .test_adapters import KINDS
from .test_inplace_after import ROUTERS

MODES = [None, "reentrant", "non-reentrant"]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(12, 24), nn.Linear(24, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class _Net(nn.Module):
    """Two residual blocks, each checkpointed as ``mode`` says."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.mode is None:
                x = x + block(x)
            else:
                x = x + checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return x


def _grads(
    config: AdapterConfig | MixtureConfig, mode: str | None, aux: bool, **kwargs: torch.Tensor
) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = MoRAModel(_Net(mode).double(), config, target_modules="all-linear").double().train()
    randomize_adapters(model)
    torch.manual_seed(1)  # the routers' noise: the same draws in every mode
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    loss = model(x, **kwargs).square().sum()
    if aux:
        loss = loss + model.aux_loss()
    loss.backward()
    return [x.grad, *(p.grad for p in model.parameters() if p.requires_grad)]  # type: ignore[list-item]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)  # float64


ADAPTERS = [k for k in KINDS if k["kind"] != "dylora"]


@pytest.mark.parametrize("mode", MODES[1:])
@pytest.mark.parametrize("options", ADAPTERS, ids=lambda o: "-".join(map(str, o.values())))
def test_checkpointed_adapters_get_the_gradients_of_the_plain_model(
    options: dict, mode: str
) -> None:
    config = AdapterConfig(rank=4, **options)
    _assert_same(_grads(config, mode, aux=False), _grads(config, None, aux=False))


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_checkpointed_mixtures_get_the_gradients_of_the_plain_model(router: str) -> None:
    config = MixtureConfig(kind="lora", rank=2, experts=4, router=ROUTERS[router])
    kwargs = {"task_ids": torch.tensor([0, 1, 0])} if router == "task" else {}
    want = _grads(config, None, aux=True, **kwargs)
    _assert_same(_grads(config, "non-reentrant", aux=True, **kwargs), want)
    # reentrant checkpointing: the layers' gradients are right, the routing losses cannot be
    _assert_same(
        _grads(config, "reentrant", aux=False, **kwargs), _grads(config, None, aux=False, **kwargs)
    )


@pytest.mark.parametrize("router", ["topk", "hierarchical", "soft"])
def test_aux_loss_of_a_reentrant_checkpointed_forward_is_refused(router: str) -> None:
    config = MixtureConfig(kind="lora", rank=2, experts=4, router=ROUTERS[router])
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _grads(config, "reentrant", aux=True)
    model = MoRAModel(_Net(None), config, target_modules="all-linear").train()
    with torch.no_grad():  # a forward without gradients: reading the loss is fine
        model(torch.randn(2, 12))
        assert torch.isfinite(model.aux_loss())


@pytest.mark.parametrize("mode", MODES[1:])
def test_dylora_under_checkpointing_is_refused_with_a_reason(mode: str) -> None:
    config = AdapterConfig(kind="dylora", rank=4, min_rank=1)
    with pytest.raises(RuntimeError, match="DyLoRA draws a new rank at every training call"):
        _grads(config, mode, aux=False)
    _grads(config, None, aux=False)  # without checkpointing: trains


@pytest.mark.parametrize("router", ["topk", "task", "topk-per-sample"])
def test_transformers_gradient_checkpointing_gives_the_plain_gradients(router: str) -> None:
    config = MixtureConfig(kind="lora", rank=2, experts=4, router=ROUTERS[router])
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(9) < torch.tensor([[5], [9]])).long()  # row 0 right-padded
    kwargs: dict[str, torch.Tensor] = {"attention_mask": mask}
    if router == "task":
        kwargs["task_ids"] = torch.tensor([1, 0])
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        base = tiny_llama().double()
        if enabled:
            # transformers' default: non-reentrant (gradient_checkpointing_enable in older releases)
            enable = getattr(base, "activation_checkpointing_enable", None)
            (enable or base.gradient_checkpointing_enable)()
        model = MoRAModel(base, config, target_modules=["q_proj", "v_proj", "down_proj"])
        model.double().train()
        randomize_adapters(model)
        torch.manual_seed(1)
        out = model(input_ids=ids, labels=ids, **kwargs)
        (out.loss + model.aux_loss()).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    _assert_same(grads[1], grads[0])
