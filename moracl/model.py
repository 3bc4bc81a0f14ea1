"""``MoRAModel``: adapters injected into chosen linear layers of any ``nn.Module``.

The wrapped model is a *structural copy* of the one passed in: new module objects sharing
the original parameter tensors, so injecting never changes the caller's model and costs no
weight memory; merging writes new weight tensors and leaves the shared ones untouched.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import moracl.adapters  # noqa: F401  (registers the adapter kinds)
from moracl.adapter_files import check_header, expected_state, parse_layout
from moracl.adapters.base import AdapterConfig, ParamRole
from moracl.checkpoint import CONFIG_NAME, WEIGHTS_NAME, open_adapter, write_adapter
from moracl.experts.mixture import Mixture, MixtureConfig, RoutingContext
from moracl.experts.routing import RoutingResult, RoutingStats
from moracl.guard import assert_finite
from moracl.layer import MoRALayer, MoRALinear, check_fit, linear_features
from moracl.targets import ALL_LINEAR, TargetSpec, select_targets

__all__ = ["MoRAModel"]


def structural_copy(model: nn.Module) -> nn.Module:
    """New module objects, same parameter and buffer tensors (tied weights stay tied)."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _data_parallel() -> bool:
    """Whether a process group of more than one process is running (cheap to ask)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class MoRAModel(nn.Module):
    """A frozen model with adapters on its target linear layers.

    Args:
        model: any ``nn.Module`` (a transformers model, a plain network); not modified.
        config: the adapter (``AdapterConfig(kind=..., ...)``) for the first adapter.
        target_modules: names, a regular expression, or ``"all-linear"`` (see
            :func:`moracl.targets.select_targets`).
        adapter_name: the first adapter's name.
        modules_to_save: names of extra modules (e.g. a classification head) trained in
            full and saved with the adapters; they are copied, not shared.
        exclude_modules: names never adapted.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig | MixtureConfig,
        *,
        target_modules: TargetSpec = ALL_LINEAR,
        adapter_name: str = "default",
        modules_to_save: Sequence[str] = (),
        exclude_modules: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MoRAModel wraps an nn.Module, got {type(model).__name__}")
        if isinstance(model, MoRAModel):
            raise TypeError(
                "the model is already a MoRAModel; use add_adapter() for a second adapter"
            )
        self.model = structural_copy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.adapter_configs: dict[str, AdapterConfig | MixtureConfig] = {}
        self.last_routing: dict[str, RoutingResult] = {}
        #: keep each mixture's router input of a forward in :attr:`last_router_inputs`
        self.record_router_inputs = False
        self.last_router_inputs: dict[str, Tensor] = {}
        self.adapter_targets: dict[str, list[str]] = {}
        self.saved_modules: list[str] = []
        self.active_adapters: tuple[str, ...] = ()
        self._exclude = tuple(exclude_modules)
        self.add_adapter(adapter_name, config, target_modules=target_modules)
        self.set_adapter(adapter_name)
        self._add_modules_to_save(modules_to_save)

    # -- delegation ---------------------------------------------------------------------
    def forward(self, *args: Any, task_ids: Tensor | None = None, **kwargs: Any) -> Any:
        """Call the wrapped model; ``task_ids`` (one per batch row, or per token) route the
        mixtures.  Afterwards :attr:`last_routing` holds each mixture layer's routing and
        :meth:`aux_loss` their weighted auxiliary loss; with :attr:`record_router_inputs`,
        :attr:`last_router_inputs` what each router read (the rows' means for a router per
        sample)."""
        mixtures = {path: m for path, m in self.mixtures()}
        if not mixtures:
            return self.model(*args, **kwargs)
        ctx = RoutingContext(task_ids=task_ids)
        if self.record_router_inputs:
            ctx.router_inputs = {}
        for m in mixtures.values():
            m.context = ctx
        try:
            out = self.model(*args, **kwargs)
        finally:
            for m in mixtures.values():
                m.context = None
        self.last_routing = {p: ctx.results[m] for p, m in mixtures.items() if m in ctx.results}
        inputs = ctx.router_inputs or {}
        self.last_router_inputs = {p: inputs[m] for p, m in mixtures.items() if m in inputs}
        return out

    def mixtures(self) -> Iterator[tuple[str, Mixture]]:
        """``(path, mixture)`` for every active mixture of experts."""
        for path, layer in self.adapted_layers():
            for name in layer.active:
                adapter = layer.adapter(name)
                if isinstance(adapter, Mixture):
                    yield f"{path}.adapters.{name}", adapter

    def aux_loss(self) -> Tensor:
        """The routers' weighted auxiliary losses of the last forward, summed (a scalar).

        Under data parallelism (a process group of more than one process) the Switch balance
        losses use the expert assignments of the global batch
        (:func:`moracl.distributed.reduced_aux_loss`)."""
        if not self.last_routing:
            p = next(self.parameters())
            return p.new_zeros(())
        if _data_parallel():
            from moracl.distributed import reduced_aux_loss

            return reduced_aux_loss(list(self.last_routing.values()))
        by_weight: dict[float, list[Tensor]] = {}  # a few kernels per weight, not per layer
        for r in self.last_routing.values():
            for name, loss in r.aux_losses.items():
                by_weight.setdefault(r.aux_weights[name], []).append(loss.float())
        parts = [torch.stack(losses).sum() * w for w, losses in by_weight.items()]
        if not parts:
            return next(self.parameters()).new_zeros((), dtype=torch.float32)
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum()

    def routing_stats(self) -> dict[str, RoutingStats]:
        """Per mixture layer: expert usage, entropy and experts per token of the last forward."""
        return {path: r.stats for path, r in self.last_routing.items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- adapters -------------------------------------------------------------------------
    def adapted_layers(self) -> Iterator[tuple[str, MoRALayer]]:
        """``(path, layer)`` for every adapted layer, paths relative to the wrapped model."""
        for name, m in self.model.named_modules():
            if isinstance(m, MoRALayer):
                yield name, m

    def add_adapter(
        self,
        name: str,
        config: AdapterConfig | MixtureConfig,
        *,
        target_modules: TargetSpec = ALL_LINEAR,
    ) -> list[str]:
        """Add adapter ``name`` on the layers ``target_modules`` selects; returns their paths."""
        if not isinstance(config, (AdapterConfig, MixtureConfig)):
            raise TypeError(
                f"config must be an AdapterConfig or MixtureConfig, got {type(config).__name__}"
            )
        if not name or not isinstance(name, str) or "." in name:
            raise ValueError(f"adapter names are non-empty strings without dots, got {name!r}")
        if name in self.adapter_configs:
            raise ValueError(f"adapter {name!r} already exists; have {list(self.adapter_configs)}")
        plain = _PlainView(self.model)
        paths = select_targets(plain, target_modules, exclude=self._exclude)
        for path in paths:  # every layer is checked before any is changed or allocated
            check_fit(*linear_features(plain.get_submodule(path)), config, f"layer {path!r}")
        for path in paths:
            layer = self.model.get_submodule(path)
            if not isinstance(layer, MoRALayer):
                layer = MoRALinear(layer)  # freezes the layer ...
                if path in self.saved_modules:  # ... unless it is a trained module_to_save
                    layer.base_layer.requires_grad_(True)
                _set_submodule(self.model, path, layer)
            layer.add_adapter(name, config)
        self.adapter_configs[name] = config
        self.adapter_targets[name] = paths
        return paths

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapters (others stay on the layers, frozen and unused)."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for n in names:
            if n not in self.adapter_configs:
                raise ValueError(f"unknown adapter {n!r}; have {list(self.adapter_configs)}")
        for _, layer in self.adapted_layers():
            layer.set_active([n for n in names if n in layer.adapters])
            for n in layer.adapters:
                adapter = layer.adapter(n)
                for pname, p in adapter.named_parameters():
                    p.requires_grad_(n in names and adapter.is_trainable(pname))
        self.active_adapters = names

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the frozen base alone inside the block."""
        layers = [layer for _, layer in self.adapted_layers()]
        before = [layer.disabled for layer in layers]
        try:
            for layer in layers:
                layer.disabled = True
            yield
        finally:
            for layer, b in zip(layers, before):
                layer.disabled = b

    def _add_modules_to_save(self, names: Sequence[str], *, exact: bool = False) -> None:
        for name in names:
            hits = [
                p
                for p, _ in self.model.named_modules()
                if p == name or (not exact and p.endswith("." + name))
            ]
            if not hits:
                raise ValueError(f"modules_to_save entry {name!r} matched no module")
            for path in hits:
                fresh = copy.deepcopy(self._plain(path))  # a real copy: it trains
                for p in fresh.parameters():
                    p.requires_grad_(True)
                layer = self.model.get_submodule(path)
                if isinstance(layer, MoRALayer):  # adapted too: the copy becomes its base
                    layer.base_layer = fresh
                else:
                    _set_submodule(self.model, path, fresh)
                self.saved_modules.append(path)

    def _plain(self, path: str) -> nn.Module:
        """The module at ``path`` as in the original model (an adapted layer's base)."""
        m = self.model.get_submodule(path)
        return m.base_layer if isinstance(m, MoRALayer) else m

    def param_roles(self) -> dict[str, ParamRole]:
        """The trained copies of ``modules_to_save`` are heads."""
        return {
            f"model.{path}.{n}": ParamRole.HEAD
            for path in self.saved_modules
            for n, _ in self.model.get_submodule(path).named_parameters()
            if ".adapters." not in f".{n}"
        }

    # -- counting -----------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (shared tensors counted once)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, n = self.trainable_parameters()
        print(f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}")

    # -- merging ------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapters into new weight tensors (``unmerge`` restores them)."""
        for _, layer in self.adapted_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.adapted_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """An ordinary model with the active adapters folded into its weights."""
        self.merge()
        return self._unload()

    def unload(self) -> nn.Module:
        """An ordinary model without the adapters (weights unchanged)."""
        self.unmerge()
        return self._unload()

    def _unload(self) -> nn.Module:
        plain = structural_copy(self.model)
        for path, layer in list(_layers(plain)):
            _set_submodule(plain, path, layer.base_layer)
        return plain

    # -- per-task export ----------------------------------------------------------------
    def task_factors(self, task_id: int) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer path: (A, B)}``: task ``task_id``'s update of every task-routed mixture."""
        from moracl.experts.export import task_lora_factors

        factors = {}
        for path, mixture in self.mixtures():
            factors[path.split(".adapters.")[0]] = task_lora_factors(mixture, task_id)
        if not factors:
            raise ValueError("the model has no active mixture of experts to export")
        return factors

    def export_task_peft(self, directory: str | os.PathLike[str], task_id: int) -> Path:
        """Save task ``task_id``'s routed experts as one plain LoRA in PEFT's format."""
        from moracl.experts.export import write_peft_lora

        factors = self.task_factors(task_id)
        transposed = {path: self._layer(path).transposed for path in factors}
        if len(set(transposed.values())) > 1:
            raise ValueError("cannot export a mix of nn.Linear and Conv1D layers in one adapter")
        return write_peft_lora(directory, factors, fan_in_fan_out=any(transposed.values()))

    @torch.no_grad()
    def merged_task_model(self, task_id: int) -> nn.Module:
        """An ordinary model with task ``task_id``'s update folded into its weights."""
        factors = self.task_factors(task_id)
        plain = structural_copy(self.model)
        for path, layer in list(_layers(plain)):
            base = copy.copy(layer.base_layer)  # new module object, new weight below
            if path in factors:
                a, b = factors[path]
                w = layer.weight
                new = w + (b @ a).to(w.dtype)
                base.weight = nn.Parameter(
                    new.t().contiguous() if layer.transposed else new, requires_grad=False
                )
            _set_submodule(plain, path, base)
        return plain

    def _layer(self, path: str) -> MoRALayer:
        layer = self.model.get_submodule(path)
        if not isinstance(layer, MoRALayer):
            raise ValueError(f"{path!r} is not an adapted layer")
        return layer

    # -- saving -------------------------------------------------------------------------
    def adapter_state_dict(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Tensors of the adapters ``names`` (default: all) and of ``modules_to_save``."""
        names = list(self.adapter_configs) if names is None else list(names)
        out: dict[str, Tensor] = {}
        for path, layer in self.adapted_layers():
            for n in names:
                if n in layer.adapters:
                    for k, v in layer.adapters[n].state_dict().items():
                        out[f"{path}.adapters.{n}.{k}"] = v
        for path in self.saved_modules:
            for k, v in self._plain(path).state_dict().items():
                out[f"{path}.{k}"] = v
        return out

    def save_pretrained(
        self, directory: str | os.PathLike[str], names: Sequence[str] | None = None
    ) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``."""
        if any(layer.merged for _, layer in self.adapted_layers()):
            raise RuntimeError("save_pretrained on a merged model: unmerge() first")
        names = list(self.adapter_configs) if names is None else list(names)
        for n in names:
            if n not in self.adapter_configs:
                raise ValueError(f"unknown adapter {n!r}; have {list(self.adapter_configs)}")
        config = {
            "adapters": {
                n: {"config": self.adapter_configs[n].to_dict(), "targets": self.adapter_targets[n]}
                for n in names
            },
            "active": [n for n in self.active_adapters if n in names],
            "modules_to_save": self.saved_modules,
            "base_model": type(self.model).__name__,
        }
        return write_adapter(directory, config, self.adapter_state_dict(names))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike[str]) -> MoRAModel:
        """Rebuild the adapters saved in ``directory`` on ``model`` and load their tensors.

        Everything is checked before anything is allocated (see :mod:`moracl.adapter_files`):
        the folder (no symbolic links, every file against ``checksums.json``), the config's
        structure, each config's bounds on its layers, and every saved tensor's name, shape and
        dtype against the model; then the tensors, which must be finite.  A refused folder
        raises ``ValueError`` (``FileNotFoundError`` if missing) and is never written to."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_pretrained needs an nn.Module, got {type(model).__name__}")
        folder = open_adapter(directory)
        layout = parse_layout(folder.config, str(folder.path / CONFIG_NAME))
        check_header(expected_state(model, layout), folder.header, str(folder.path / WEIGHTS_NAME))
        tensors = folder.load_tensors()
        first, *rest = layout.adapters
        new = cls(
            model,
            first.config,
            target_modules=_exact(first.targets),
            adapter_name=first.name,
            modules_to_save=[],
        )
        for saved in rest:
            new.add_adapter(saved.name, saved.config, target_modules=_exact(saved.targets))
        new._add_modules_to_save(layout.modules_to_save, exact=True)
        new.set_adapter(layout.active)
        new.load_adapter_tensors(tensors)
        return new

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy saved tensors in, checking every name, shape and dtype first and refusing
        non-finite values (nothing changes on error)."""
        assert_finite(tensors, "load_adapter_tensors")
        targets = self.adapter_state_dict()
        missing = sorted(set(targets) - set(tensors))
        extra = sorted(set(tensors) - set(targets))
        if missing or extra:
            raise ValueError(
                f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for key, t in tensors.items():
            if t.shape != targets[key].shape:
                layer = key.split(".adapters.")[0]
                raise ValueError(
                    f"layer {layer!r}: saved tensor {key!r} has shape {tuple(t.shape)} "
                    "but the model's "
                    f"has shape {tuple(targets[key].shape)} (the base model's layer shapes differ)"
                )
            want = targets[key].dtype
            if (t.dtype != want) and not (t.is_floating_point() and want.is_floating_point):
                raise ValueError(
                    f"saved tensor {key!r} has dtype {t.dtype} but the model's has {want}"
                )
        for key, t in tensors.items():
            targets[key].copy_(t)


class _PlainView(nn.Module):
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


def _layers(model: nn.Module) -> Iterator[tuple[str, MoRALayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, MoRALayer))


def _exact(paths: Sequence[str]) -> str:
    import re

    return "|".join(re.escape(p) for p in paths)
