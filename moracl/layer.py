"""``MoRALayer`` / ``MoRALinear``: a frozen linear layer plus named adapters.

Shapes: ``x (..., i)`` -> ``(..., o)``; the frozen weight is seen as ``W (o × i)`` whatever
the wrapped layer's storage (``nn.Linear`` stores ``o × i``, transformers' ``Conv1D`` ``i × o``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moracl.adapters.base import Adapter, AdapterConfig, build_adapter
from moracl.adapters.fused import fused_enabled
from moracl.experts.mixture import Mixture, MixtureConfig

__all__ = ["MoRALayer", "MoRALinear", "is_conv1d", "is_linear_like"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """True for the layer types moracl can adapt."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


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
    def adapter(self, name: str) -> Adapter:
        """The adapter called ``name`` on this layer."""
        return cast(Adapter, self.adapters[name])

    def add_adapter(self, name: str, config: AdapterConfig | MixtureConfig) -> Adapter:
        """Create adapter ``name`` of ``config.kind`` on this layer (fp32 for half bases)."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged:
            raise RuntimeError("cannot add an adapter to a merged layer; unmerge() first")
        w = self.weight
        adapter: Adapter
        if isinstance(config, MixtureConfig):
            adapter = Mixture(self.in_features, self.out_features, config)
        else:
            adapter = build_adapter(self.in_features, self.out_features, config)
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
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
        if len(self.active) == 1 and fused_enabled():
            fused = self.adapter(self.active[0]).fused_forward(x, w, b)
            if fused is not None:
                return fused
        out = F.linear(x, w, b)
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
