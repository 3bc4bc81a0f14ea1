"""A wrapped model's module tree: copied without copying its tensors, edited by path, and
seen as it was before any layer was adapted."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

from torch import nn

from moracl.layer import MoRALayer

__all__ = ["PlainView", "adapted_layers_of", "set_submodule", "structural_copy"]


def structural_copy(model: nn.Module) -> nn.Module:
    """New module objects, same parameter and buffer tensors (tied weights stay tied)."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``root``."""
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def adapted_layers_of(model: nn.Module) -> Iterator[tuple[str, MoRALayer]]:
    """``(path, layer)`` for every adapted layer of ``model``, in ``named_modules`` order.

    The walk does not descend into an adapted layer (none holds another; its base layer and
    adapters are most of a model's modules), so a forward that looks for its mixtures pays
    for the model's structure, not for its adapters."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, MoRALayer):
            yield prefix, module
            continue
        children = [
            (f"{prefix}.{name}" if prefix else name, child)
            for name, child in module._modules.items()
            if child is not None
        ]
        stack.extend(reversed(children))  # pre-order, children in registration order


class PlainView(nn.Module):
    """Presents an adapted model to target selection as if its layers were plain linears."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)

    _model: nn.Module

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:  # type: ignore[override]
        for name, m in self._model.named_modules():
            if name.endswith(".base_layer") or ".adapters." in name or name.endswith(".adapters"):
                continue
            yield name, (m.base_layer if isinstance(m, MoRALayer) else m)

    def get_submodule(self, target: str) -> nn.Module:
        m = self._model.get_submodule(target)
        return m.base_layer if isinstance(m, MoRALayer) else m

    def get_output_embeddings(self) -> nn.Module | None:
        get = getattr(self._model, "get_output_embeddings", None)
        return get() if callable(get) else None
