"""``MoRAModel``: adapters injected into chosen linear layers of any ``nn.Module``.

The wrapped model is a *structural copy* of the one passed in: new module objects sharing
the original parameter tensors, so injecting never changes the caller's model and costs no
weight memory; merging writes new weight tensors and leaves the shared ones untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import itertools
import os
import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Self, SupportsIndex, cast

import torch
from torch import Tensor, nn

import moracl.adapters  # noqa: F401  (registers the adapter kinds)
from moracl.adapter_files import SavedLayout, check_header, expected_state, parse_layout
from moracl.adapters.base import AdapterConfig, ParamRole
from moracl.checkpoint import WEIGHTS_NAME, open_adapter, write_adapter
from moracl.experts.context import sample_task_ids, token_task_ids
from moracl.experts.mixture import Mixture, MixtureConfig, RoutingContext
from moracl.experts.routers.base import TaskIds
from moracl.experts.routing import RoutingResult, RoutingStats
from moracl.guard import assert_finite
from moracl.layer import MoRALayer, MoRALinear, check_fit, linear_features
from moracl.peft_files import (
    FolderFormat,
    check_moracl_representable,
    folder_format,
    load_adapter_folder,
    read_peft,
    save_peft,
    set_vera_projections,
)
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

    ``forward`` declares the wrapped model's parameters plus ``task_ids`` (the instance's class
    is a subclass of ``MoRAModel`` made once per wrapped class), so tools that read
    ``inspect.signature(model.forward)`` (``transformers.Trainer`` keeping dataset columns,
    finding ``labels``) see what the call accepts.  PEFT's names work as aliases:
    :meth:`get_base_model`, :meth:`disable_adapter`, :meth:`merge_adapter`,
    :meth:`unmerge_adapter`, :meth:`load_adapter`, :attr:`peft_config`, :attr:`active_adapter`.
    """

    #: the class a per-wrapped-class subclass was made from (``None`` on an ordinary class)
    _signature_base: type[MoRAModel] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        """An instance of ``cls``'s subclass whose ``forward`` declares the parameters of the
        wrapped model's ``forward`` (see :func:`_signature_class`)."""
        model = args[0] if args else kwargs.get("model")
        made: type[MoRAModel] = cls
        if isinstance(model, nn.Module) and not isinstance(model, MoRAModel):
            made = _signature_class(cls, type(model))
        return super().__new__(made)  # type: ignore[return-value]

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        """Pickled (and copied) as the importable class; :meth:`__setstate__` makes the
        signature subclass again."""
        reduced = super().__reduce_ex__(protocol)
        base = type(self)._signature_base
        if base is None or not isinstance(reduced, tuple) or reduced[1][:1] != (type(self),):
            return reduced
        return (_new_instance, (base,), *reduced[2:])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        wrapped = self._modules.get("model")
        if wrapped is not None and type(self)._signature_base is None:
            self.__class__ = _signature_class(type(self), type(wrapped))

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
        self._routed_ids: Tensor | None = None  # the task ids of a route() block
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
        sample).  Inside :meth:`route` a call without ``task_ids`` takes the block's."""
        mixtures = {path: m for path, m in self.mixtures()}
        if not mixtures:
            return self.model(*args, **kwargs)
        ctx = (
            _RowsContext(task_ids=self._routed_ids)
            if task_ids is None and self._routed_ids is not None
            else RoutingContext(task_ids=task_ids)
        )
        if self.record_router_inputs:
            ctx.router_inputs = {}
        before = [m.context for m in mixtures.values()]  # a route() block's, or None
        for m in mixtures.values():
            m.context = ctx
        try:
            out = self.model(*args, **kwargs)
        finally:
            for m, b in zip(mixtures.values(), before):
                m.context = b
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

    @contextmanager
    def route(self, task_ids: Tensor | Sequence[int]) -> Iterator[None]:
        """Route every forward inside the block by ``task_ids``, one per batch row, including
        the calls the wrapped model makes on its own (``generate``, an encoder run alone).

        A call whose batch is a whole multiple ``k`` of the rows gives each row's id to ``k``
        consecutive rows: the layout of ``generate``'s beam search and
        ``num_return_sequences``; any other batch size raises ``ValueError``.  A forward
        given its own ``task_ids`` uses those.

            with model.route(torch.tensor([0, 1])):
                tokens = model.generate(input_ids=prompts, max_new_tokens=8)
        """
        mixtures = [m for _, m in self.mixtures()]
        if not mixtures:
            raise ValueError(
                "route() needs an active mixture of experts to route; the active adapters "
                f"{list(self.active_adapters)} have none"
            )
        ids = _row_ids(task_ids, next(self.parameters()).device)
        block = _RowsContext(task_ids=ids, keep_results=False)
        before = [m.context for m in mixtures]
        outer = self._routed_ids
        self._routed_ids = ids
        for m in mixtures:
            m.context = block
        try:
            yield
        finally:
            self._routed_ids = outer
            for m, b in zip(mixtures, before):
                m.context = b

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
        """Attributes this wrapper lacks come from the wrapped model; a name neither has
        raises an ``AttributeError`` naming both (and a close name, if one exists)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        wrapped = cast(nn.Module, super().__getattr__("model"))
        try:
            return getattr(wrapped, name)
        except AttributeError:
            pass
        raise _MissingAttribute(self, wrapped, name) from None

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

    # -- PEFT's names ---------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, AdapterConfig | MixtureConfig]:
        """Adapter name -> config (a copy of :attr:`adapter_configs`)."""
        return dict(self.adapter_configs)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of them when several are active."""
        names = list(self.active_adapters)
        return names[0] if len(names) == 1 else names

    def get_base_model(self) -> nn.Module:
        """The wrapped model with its adapted layers (what :meth:`forward` calls)."""
        return self.model

    def disable_adapter(self) -> AbstractContextManager[None]:
        """:meth:`disable_adapters` under PEFT's name."""
        return self.disable_adapters()

    def merge_adapter(self) -> None:
        """:meth:`merge` under PEFT's name."""
        self.merge()

    def unmerge_adapter(self) -> None:
        """:meth:`unmerge` under PEFT's name."""
        self.unmerge()

    @torch.no_grad()
    def load_adapter(
        self,
        directory: str | os.PathLike[str],
        adapter_name: str,
        *,
        saved_name: str | None = None,
    ) -> list[str]:
        """Add the adapter saved in ``directory`` (a moracl folder, or one PEFT wrote) as
        ``adapter_name``, inactive and frozen (:meth:`set_adapter` uses it); returns the
        adapted layers' paths.

        ``saved_name`` picks one adapter of a moracl folder holding several.  The folder is
        checked as in :meth:`from_pretrained` before anything changes; a folder with
        ``modules_to_save`` is refused (this model keeps one copy of each such module)."""
        if folder_format(directory) is FolderFormat.PEFT:
            if saved_name is not None:
                raise ValueError(
                    f"{directory} is a PEFT folder of one adapter; saved_name= picks one adapter "
                    f"of a moracl folder, got {saved_name!r}"
                )
            load_adapter_folder(self, directory, adapter_name)
            self.set_adapter(self.active_adapters)  # the new adapter: inactive, frozen
            return list(self.adapter_targets[adapter_name])
        folder = open_adapter(directory)
        where = str(folder.config_path)
        layout = parse_layout(folder.config, where)
        names = [a.name for a in layout.adapters]
        if saved_name is None and len(names) > 1:
            raise ValueError(f"{where} holds adapters {names}; pick one with saved_name=")
        picked = [a for a in layout.adapters if saved_name in (None, a.name)]
        if not picked:
            raise ValueError(f"{where} has no adapter {saved_name!r}; it holds {names}")
        if layout.modules_to_save:
            raise ValueError(
                f"{where} also saves modules_to_save {list(layout.modules_to_save)}; load_adapter "
                "adds adapters only (load the folder with MoRAModel.from_pretrained instead)"
            )
        if adapter_name in self.adapter_configs:
            raise ValueError(
                f"adapter {adapter_name!r} already exists; have {list(self.adapter_configs)}"
            )
        saved = picked[0]
        renamed = dataclasses.replace(saved, name=adapter_name)
        old, new = f".adapters.{saved.name}.", f".adapters.{adapter_name}."
        header = {k.replace(old, new): v for k, v in folder.header.items() if old in k}
        expected = expected_state(_PlainView(self.model), SavedLayout((renamed,), (), ()))
        check_header(expected, header, str(folder.path / WEIGHTS_NAME))
        tensors = {k.replace(old, new): t for k, t in folder.load_tensors().items() if old in k}
        paths = self.add_adapter(adapter_name, saved.config, target_modules=_exact(saved.targets))
        targets = self.adapter_state_dict([adapter_name])
        for key, t in tensors.items():
            targets[key].copy_(t)
        self.set_adapter(self.active_adapters)  # the new adapter: inactive, frozen
        return paths

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
        """Save task ``task_id``'s routed experts as one plain LoRA in PEFT's format:
        ``save_pretrained(directory, format="peft", task_id=task_id)``."""
        return self.save_pretrained(directory, format="peft", task_id=task_id)

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
        self,
        directory: str | os.PathLike[str],
        names: Sequence[str] | None = None,
        *,
        format: str = "moracl",
        task_id: int | None = None,
    ) -> Path:
        """Write the adapters ``names`` (default: all) into ``directory``; returns it.

        ``format="moracl"``: ``moracl_config.json`` + ``adapter_model.safetensors`` +
        ``checksums.json``, any adapter kind or mixture, read back by :meth:`from_pretrained`.
        ``format="peft"``: PEFT's layout, which ``peft.PeftModel.from_pretrained`` loads:
        LoRA (rsLoRA), DoRA and VeRA adapters (of several, each but ``"default"`` in a
        subfolder named after it), or with ``task_id`` task ``task_id``'s update of the active
        task-routed mixtures as one LoRA; what PEFT cannot represent (MoRA, other mixtures) is
        refused (:func:`moracl.peft_files.save_peft`)."""
        formats = [f.value for f in FolderFormat]
        if format not in formats:
            raise ValueError(f"format must be one of {formats}, got {format!r}")
        if format == FolderFormat.PEFT:
            return save_peft(self, directory, names, task_id=task_id)
        if task_id is not None:
            raise ValueError(
                "task_id picks one task's update for format='peft'; moracl's format saves the "
                "whole mixture"
            )
        if any(layer.merged for _, layer in self.adapted_layers()):
            raise RuntimeError("save_pretrained on a merged model: unmerge() first")
        names = list(self.adapter_configs) if names is None else list(names)
        for n in names:
            if n not in self.adapter_configs:
                raise ValueError(f"unknown adapter {n!r}; have {list(self.adapter_configs)}")
        check_moracl_representable(self, names)
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
        raises ``ValueError`` (``FileNotFoundError`` if missing) and is never written to.

        A folder PEFT wrote (an ``adapter_config.json`` with ``peft_type``) is read by
        :meth:`from_peft`; moracl folders of earlier versions (``adapter_config.json`` in
        moracl's layout) still load."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_pretrained needs an nn.Module, got {type(model).__name__}")
        if folder_format(directory) is FolderFormat.PEFT:
            return cls.from_peft(model, directory)
        folder = open_adapter(directory)
        layout = parse_layout(folder.config, str(folder.config_path))
        check_header(expected_state(model, layout), folder.header, str(folder.weights_path))
        return cls._from_layout(model, layout, folder.load_tensors())

    @classmethod
    def from_peft(
        cls, model: nn.Module, directory: str | os.PathLike[str], *, adapter_name: str = "default"
    ) -> MoRAModel:
        """Load the adapter that PEFT's ``save_pretrained`` wrote into ``directory`` onto
        ``model`` as adapter ``adapter_name``: LoRA, rsLoRA, DoRA or VeRA, with its
        ``modules_to_save``; the outputs are PEFT's.  Checked like :meth:`from_pretrained`
        before anything is allocated; safetensors only.  What maps to what, and what is refused
        with a ``ValueError`` naming the option: :mod:`moracl.peft_files`."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_peft needs an nn.Module, got {type(model).__name__}")
        read = read_peft(model, directory, adapter_name)
        new = cls._from_layout(model, read.layout, read.tensors)
        set_vera_projections(new.model, adapter_name, read.projections)
        return new

    @classmethod
    def _from_layout(
        cls, model: nn.Module, layout: SavedLayout, tensors: dict[str, Tensor]
    ) -> MoRAModel:
        """``model`` with the checked ``layout``'s adapters, loaded with ``tensors``."""
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


def _new_instance(cls: type[MoRAModel]) -> MoRAModel:
    """An empty ``cls`` for pickle and copy to fill in (see ``MoRAModel.__reduce_ex__``)."""
    return cls.__new__(cls)


# -- routing blocks -----------------------------------------------------------------------


def _row_ids(task_ids: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """``(b,)`` integer task ids, one per batch row, on ``device``."""
    ids = task_ids if isinstance(task_ids, Tensor) else torch.as_tensor(list(task_ids))
    if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            "route() takes one integer task id per batch row (a 1-d tensor or a list), got "
            f"shape {tuple(ids.shape)} and dtype {ids.dtype}"
        )
    return ids.to(device)


@dataclasses.dataclass
class _RowsContext(RoutingContext):
    """A routing context whose ``task_ids (b,)`` also route a batch of ``k·b`` rows, each id
    given to ``k`` consecutive rows (how ``generate`` expands a batch for beam search).

    ``keep_results=False`` keeps no routing (a context living through a whole ``generate``
    would otherwise keep every step's)."""

    keep_results: bool = True

    def record(self, mixture: nn.Module, result: RoutingResult) -> None:
        if self.keep_results:
            super().record(mixture, result)

    def token_ids(self, lead: torch.Size) -> TaskIds | None:
        key = ("token", tuple(lead))
        if key not in self._checked:
            self._checked[key] = TaskIds.of(token_task_ids(self._rows(lead), lead))
        return self._checked[key]

    def sample_ids(self, lead: torch.Size) -> TaskIds | None:
        key = ("sample", tuple(lead))
        if key not in self._checked:
            ids = sample_task_ids(self._rows(lead), lead)
            assert ids is not None  # _rows never returns None
            self._checked[key] = TaskIds.of(ids)
        return self._checked[key]

    def _rows(self, lead: torch.Size) -> Tensor:
        """``(rows,)``: the ids repeated to the ``rows = lead[0]`` of an input."""
        ids = self.task_ids
        assert ids is not None  # route() always gives ids
        b, rows = ids.shape[0], (lead[0] if len(lead) else 1)
        if rows == b:
            return ids
        if rows % b:
            raise ValueError(
                f"route() was given {b} task ids, which do not divide the {rows} rows of an "
                f"input with leading shape {tuple(lead)}; give one task id per batch row"
            )
        return ids.repeat_interleave(rows // b)  # row i's id on rows i·k ... i·k + k - 1


# -- errors ---------------------------------------------------------------------------------


class _MissingAttribute(AttributeError):
    """``'MoRAModel' object (wrapping X) has no attribute 'y'``, with a close name if there is
    one; the message is made only when read (``hasattr`` misses stay cheap)."""

    def __init__(self, owner: nn.Module, wrapped: nn.Module, name: str) -> None:
        super().__init__(name)
        self._owner, self._wrapped, self._name = owner, wrapped, name

    def __str__(self) -> str:
        msg = (
            f"{type(self._owner).__name__!r} object (wrapping {type(self._wrapped).__name__}) "
            f"has no attribute {self._name!r}"
        )
        close = _close_name(self._name, itertools.chain(dir(self._owner), dir(self._wrapped)))
        return msg if close is None else f"{msg}; did you mean {close!r}?"


def _close_name(name: str, names: Iterable[str]) -> str | None:
    public = {n for n in names if name.startswith("_") or not n.startswith("_")}
    hits = difflib.get_close_matches(name, sorted(public), n=1, cutoff=0.6)
    return hits[0] if hits else None


# -- the declared forward signature ---------------------------------------------------------

_SIGNATURE_CLASSES: dict[tuple[type, type], type] = {}


def _forward_signature(wrapped: type) -> inspect.Signature | None:
    """``(self, <the wrapped forward's parameters>, *, task_ids=None)``; ``None`` where the
    wrapped ``forward`` has no readable signature."""
    try:
        inner = inspect.signature(getattr(wrapped, "forward"))  # noqa: B009
    except (AttributeError, TypeError, ValueError):
        return None
    params = list(inner.parameters.values())[1:]  # the wrapped model's own ``self``
    if not any(p.name == "task_ids" for p in params):
        at = next(
            (i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
            len(params),
        )
        task_ids = inspect.Parameter(
            "task_ids", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Tensor | None"
        )
        params.insert(at, task_ids)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        return inspect.Signature([this, *params])
    except ValueError:  # e.g. a wrapped parameter called ``self``
        return None


def _signature_class(cls: type[MoRAModel], wrapped: type) -> type[MoRAModel]:
    """``cls``'s subclass (same name) whose ``forward`` is ``cls.forward`` declaring the
    parameters of ``wrapped.forward`` plus ``task_ids``; made once per pair, ``cls`` itself
    where the signature cannot be read."""
    base = cls._signature_base or cls
    made = _SIGNATURE_CLASSES.get((base, wrapped))
    if made is None:
        signature = _forward_signature(wrapped)
        if signature is None:
            return base
        f = base.forward
        forward = types.FunctionType(
            f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__
        )
        forward.__kwdefaults__ = dict(f.__kwdefaults__ or {})
        forward.__dict__.update(f.__dict__)
        forward.__qualname__, forward.__doc__ = f.__qualname__, f.__doc__
        forward.__module__, forward.__annotations__ = f.__module__, dict(f.__annotations__)
        forward.__signature__ = signature  # type: ignore[attr-defined]
        namespace = {
            "forward": forward,
            "_signature_base": base,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        made = _SIGNATURE_CLASSES[(base, wrapped)] = type(base.__name__, (base,), namespace)
    return made
