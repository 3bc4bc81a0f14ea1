"""``MoRALayer`` / ``MoRALinear``: a frozen linear layer plus named adapters.

Shapes: ``x (..., i)`` -> ``(..., o)``; the frozen weight is seen as ``W (o × i)`` whatever
the wrapped layer's storage (``nn.Linear`` stores ``o × i``, transformers' ``Conv1D`` ``i × o``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from moracl.adapters.base import Adapter, AdapterConfig, build_adapter, check_adapter_fit
from moracl.adapters.fused import fused_enabled
from moracl.experts.mixture import Mixture, MixtureConfig, check_mixture_fit
from moracl.nf4_kernel import frozen_linear

__all__ = [
    "MoRALayer",
    "MoRALinear",
    "adapter_dtype",
    "build_layer_adapter",
    "check_fit",
    "is_conv1d",
    "is_linear_like",
    "linear_features",
]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """True for the layer types moracl can adapt."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or ``Conv1D`` (which stores its weight ``i × o``)."""
    w: Tensor = module.weight  # type: ignore[assignment]
    if is_conv1d(module):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype of adapters on a layer whose frozen weight has ``weight_dtype`` (float32 for
    half-precision bases, so the adapter trains in full precision)."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


def check_fit(
    in_features: int,
    out_features: int,
    config: AdapterConfig | MixtureConfig,
    where: str = "a layer",
) -> None:
    """Raise ``ValueError`` naming ``where``, the value and the bound if ``config`` (one
    adapter or a mixture) is out of range for an ``in_features -> out_features`` layer; nothing
    is allocated (see :meth:`moracl.adapters.base.Adapter.check_fit` for the bounds)."""
    if isinstance(config, MixtureConfig):
        check_mixture_fit(in_features, out_features, config, where)
    elif isinstance(config, AdapterConfig):
        check_adapter_fit(in_features, out_features, config, where)
    else:
        raise TypeError(
            f"config must be an AdapterConfig or MixtureConfig, got {type(config).__name__}"
        )


def build_layer_adapter(
    in_features: int, out_features: int, config: AdapterConfig | MixtureConfig
) -> Adapter | Mixture:
    """The adapter (or mixture) ``config`` describes for an ``in_features -> out_features``
    layer, on the current default device (``torch.device("meta")`` builds shapes only)."""
    if isinstance(config, MixtureConfig):
        return Mixture.from_config(in_features, out_features, config)
    return build_adapter(in_features, out_features, config)


class MoRALayer(nn.Module):
    """One adapted linear layer: the frozen ``base_layer`` and its named ``adapters``.

    Several adapters may live on one layer (any kinds, any ranks); ``active`` says which ones
    run.  ``merge()`` folds the active adapters into a new weight tensor and ``unmerge()``
    restores the original tensor object, so the frozen weights are never written to.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                "MoRALayer wraps nn.Linear or transformers' Conv1D, "
                f"got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.transposed = is_conv1d(base_layer)
        w: Tensor = base_layer.weight  # type: ignore[assignment]
        o, i = (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])
        self.out_features: int = int(o)
        self.in_features: int = int(i)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.merged: tuple[str, ...] = ()
        self._original_weight: nn.Parameter | None = None

    # -- the frozen layer ---------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The frozen weight as ``(o × i)`` (a view for ``Conv1D``)."""
        w: Tensor = self.base_layer.weight  # type: ignore[assignment]
        return w.t() if self.transposed else w

    @property
    def bias(self) -> Tensor | None:
        b: Tensor | None = self.base_layer.bias  # type: ignore[assignment]
        return b

    # -- adapters -------------------------------------------------------------------------
    def adapter(self, name: str) -> Adapter | Mixture:
        """The adapter (or mixture) called ``name`` on this layer."""
        return cast("Adapter | Mixture", self.adapters[name])

    def add_adapter(self, name: str, config: AdapterConfig | MixtureConfig) -> Adapter | Mixture:
        """Create adapter ``name`` of ``config.kind`` on this layer (fp32 for half bases)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged:
            raise RuntimeError("cannot add an adapter to a merged layer; unmerge() first")
        w = self.weight
        check_fit(self.in_features, self.out_features, config)  # before any allocation
        adapter = build_layer_adapter(self.in_features, self.out_features, config)
        dtype = adapter_dtype(w.dtype)
        adapter.to(device=w.device, dtype=dtype)
        with torch.no_grad():
            adapter.initialize(w.detach())
        self.adapters[name] = adapter
        return adapter

    def set_active(self, names: Iterable[str]) -> None:
        names = tuple(names)
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"no adapter {n!r} on this layer; it has {list(self.adapters)}")
        if self.merged and names != self.merged:
            raise RuntimeError("unmerge() before changing the active adapters of a merged layer")
        self.active = names

    # -- merging ------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters into a new frozen weight; the original tensor is kept."""
        if self.merged or not self.active:
            return
        original: nn.Parameter = self.base_layer.weight  # type: ignore[assignment]
        w = self.weight
        merged = w.to(torch.promote_types(w.dtype, torch.float32)).clone()
        for name in self.active:
            merged += self.adapter(name).delta_weight(merged.to(w.dtype)).to(merged.dtype)
        merged = merged.to(w.dtype)
        new = nn.Parameter(
            merged.t().contiguous() if self.transposed else merged, requires_grad=False
        )
        self._original_weight = original
        self.base_layer.weight = new
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original weight tensor."""
        if not self.merged:
            return
        if self._original_weight is None:
            raise RuntimeError("merged layer lost its original weight")
        self.base_layer.weight = self._original_weight
        self._original_weight = None
        self.merged = ()

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x (..., i) -> (..., o)``: the frozen output plus every active adapter's update."""
        if self.merged or self.disabled or not self.active:
            out: Tensor = self.base_layer(x)
            return out
        w, b = self.weight, self.bias
        # a quantised weight (moracl.quant: torchao's NF4Tensor) runs through nf4_linear,
        # which keeps it 4-bit for the backward; the fused nodes read plain tensors only
        if len(self.active) == 1 and fused_enabled() and type(w) in (Tensor, nn.Parameter):
            fused = self.adapter(self.active[0]).fused_forward(x, w, b)
            if fused is not None:
                return fused
        out = frozen_linear(x, w, b)
        for name in self.active:
            out = self.adapter(name)(x, out, weight=w, bias=b)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, active={list(self.active)}"


class MoRALinear(MoRALayer):
    """Drop-in replacement for ``nn.Linear`` (or ``Conv1D``) with adapters.

    >>> layer = MoRALinear(nn.Linear(16, 8), AdapterConfig(kind="lora", rank=2))
    >>> layer(torch.randn(3, 16)).shape
    torch.Size([3, 8])
    """

    def __init__(
        self, base_layer: nn.Module, config: AdapterConfig | None = None, *, name: str = "default"
    ) -> None:
        super().__init__(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(name, config)
            self.set_active([name])
