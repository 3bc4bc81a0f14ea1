"""AdaLoRA's fused training path (singular values, mask and scaling folded into one down
projection of LoRA's fused node) against plain autograd through the unfused layer: equal
outputs and gradients for the input and every factor, masked triplets included."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from moracl.adapters import AdaLoRA, AdapterConfig
from moracl.adapters.fused import plain_autograd
from moracl.layer import MoRALinear


def _layer(dtype: torch.dtype, bias: bool, dropout: float = 0.0) -> MoRALinear:
    torch.manual_seed(0)
    config = AdapterConfig(kind="adalora", rank=6, target_rank=2, alpha=8.0, dropout=dropout)
    layer = MoRALinear(nn.Linear(24, 20, bias=bias), config).to(dtype)
    adapter = layer.adapters["default"]
    assert isinstance(adapter, AdaLoRA)
    with torch.no_grad():
        for p in adapter.parameters():  # E starts at zero, A and B small: a trained size
            p.normal_()
        adapter.rank_mask.copy_(torch.tensor([True, False, True, True, False, True]))
    return layer


def _run(layer: MoRALinear, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    (out * weights).sum().backward()
    adapter = layer.adapters["default"]
    grads = {"x": x.grad}
    for name, p in adapter.named_parameters():
        grads[name] = p.grad.clone()
        p.grad = None
    assert x.grad is not None
    return out.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_path_equals_plain_autograd(dtype: torch.dtype, atol: float, bias: bool) -> None:
    layer = _layer(dtype, bias).train()
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2), dtype=dtype)
    calls: list[str] = []
    layer.register_forward_hook(lambda *_: calls.append("layer"))
    adapter = layer.adapters["default"]
    adapter.register_forward_hook(lambda *_: calls.append("unfused"))  # forward(), not fused
    fused_out, fused_grads = _run(layer, x)
    assert calls == ["layer"]  # the fused node ran, not the adapter's forward
    with plain_autograd():
        plain_out, plain_grads = _run(layer, x)
    assert calls == ["layer", "unfused", "layer"]  # the adapter ran inside the layer
    assert (fused_out - layer.base_layer(x)).abs().max() > 1e-2  # the update is not zero
    scale = plain_out.abs().max().clamp(min=1)  # rounding grows with the values (~50 here)
    assert (fused_out - plain_out).abs().max() <= atol * scale
    assert set(fused_grads) == {"x", "lora_A", "lora_E", "lora_B"}
    for name, g in fused_grads.items():
        assert (g - plain_grads[name]).abs().max() <= atol * g.abs().max().clamp(min=1), name
    masked = ~adapter.rank_mask
    assert not fused_grads["lora_E"].view(-1)[masked].any()  # masked triplets get no gradient
    assert not fused_grads["lora_A"][masked].any()


def test_dropout_in_training_takes_the_unfused_path() -> None:
    layer = _layer(torch.float64, True, dropout=0.1).train()
    adapter = layer.adapters["default"]
    x = torch.randn(4, 24, dtype=torch.float64)
    assert adapter.fused_forward(x, layer.weight, layer.bias) is None
    layer.eval()
    fused = adapter.fused_forward(x, layer.weight, layer.bias)
    assert fused is not None
    with torch.no_grad():
        plain = layer.base_layer(x) + adapter.delta(x)
    torch.testing.assert_close(fused.detach(), plain, rtol=0, atol=1e-12)
