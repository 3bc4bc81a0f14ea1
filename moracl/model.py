"""``MoRAModel``: adapters injected into chosen linear layers of any ``nn.Module``.

The wrapped model is a *structural copy* of the one passed in: new module objects sharing
the original parameter tensors, so injecting never changes the caller's model and costs no
weight memory; merging writes new weight tensors and leaves the shared ones untouched.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Self, SupportsIndex, cast

import torch
from torch import Tensor, nn

import moracl.adapters  # noqa: F401  (registers the adapter kinds)
from moracl.adapters.base import AdapterConfig, ParamRole
from moracl.call_masks import keeping_encoder_states, masked_generate, padding_scope, side_masks
from moracl.experts.mixture import Mixture, MixtureConfig, RoutingContext
from moracl.experts.per_sample import begin_forward, declared_token_mask
from moracl.experts.routing import RoutingResult, RoutingStats
from moracl.layer import MoRALayer, MoRALinear, check_fit, linear_features
from moracl.model_saving import AdapterSaving
from moracl.model_signature import MissingAttribute, signature_class
from moracl.module_tree import PlainView, adapted_layers_of, set_submodule, structural_copy
from moracl.quant import dequantize_base
from moracl.routing_rows import RowsContext, row_ids
from moracl.targets import ALL_LINEAR, TargetSpec, select_targets

__all__ = ["MoRAModel"]


def _data_parallel() -> bool:
    """Whether a process group of more than one process is running (cheap to ask)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _for(config: AdapterConfig | MixtureConfig, path: str) -> AdapterConfig | MixtureConfig:
    """The config the adapter on layer ``path`` is built from."""
    return config.for_layer(path) if isinstance(config, AdapterConfig) else config


class MoRAModel(AdapterSaving, nn.Module):
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
        wrapped model's ``forward`` (see :func:`moracl.model_signature.signature_class`)."""
        model = args[0] if args else kwargs.get("model")
        made: type[MoRAModel] = cls
        if isinstance(model, nn.Module) and not isinstance(model, MoRAModel):
            made = signature_class(cls, type(model))
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
            self.__class__ = signature_class(type(self), type(wrapped))

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
        #: mixtures whose routers train but routed the last forward without gradients
        self._routed_without_grad: list[str] = []
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
        sample).  Inside :meth:`route` a call without ``task_ids`` takes the block's.

        Activation checkpointing (``torch.utils.checkpoint``, transformers'
        ``activation_checkpointing_enable()``, ``gradient_checkpointing_enable()`` in older
        releases) recomputes blocks in the backward, after this call returns: their mixtures
        route by the task ids of the last call made with gradients, so call ``backward`` after
        each such call, as training loops do, before the next."""
        with self.routed_call(kwargs, task_ids):
            return self.model(*args, **kwargs)

    @contextmanager
    def routed_call(self, kwargs: dict[str, Any], task_ids: Tensor | None = None) -> Iterator[None]:
        """The routing of one call of the wrapped model with keyword arguments ``kwargs``,
        for its duration: the mixtures' context (``task_ids``, else a :meth:`route` block's),
        each side's token mask (an encoder-decoder's two, or ``attention_mask``); afterwards
        :attr:`last_routing` and the rest.  :meth:`forward` runs every call under it, and so
        do the calls ``generate`` makes of the wrapped model."""
        mixtures = {path: m for path, m in self.mixtures()}
        if not mixtures:
            yield
            return
        begin_forward()  # inside first_call_routing(): the forwards after the first replay it
        ctx = (
            RowsContext(task_ids=self._routed_ids)
            if task_ids is None and self._routed_ids is not None
            else RoutingContext(task_ids=task_ids)
        )
        if self.record_router_inputs:
            ctx.router_inputs = {}
        before = [m.context for m in mixtures.values()]  # a route() block's, or None
        for m in mixtures.values():
            m.context = ctx
        ctx.sides = side_masks(self.model, mixtures.values(), kwargs)
        try:
            if ctx.sides is not None:  # an encoder-decoder: each side under its own mask
                with keeping_encoder_states(self.model, ctx.sides):
                    yield
            else:
                with padding_scope(mixtures.values(), kwargs.get("attention_mask")):
                    ctx.padding = declared_token_mask()
                    yield
        finally:
            for m, b in zip(mixtures.values(), before):
                m.context = b
        if torch.is_grad_enabled():  # a checkpointed block recomputed in the backward
            replay = ctx.for_recompute()
            for m in mixtures.values():
                m.recompute_context = replay
        self.last_routing = {p: ctx.results[m] for p, m in mixtures.items() if m in ctx.results}
        self._routed_without_grad = (
            [
                p
                for p, m in mixtures.items()
                if m in ctx.without_grad and any(q.requires_grad for q in m.router.parameters())
            ]
            if self.training and torch.is_grad_enabled()
            else []
        )
        inputs = ctx.router_inputs or {}
        self.last_router_inputs = {p: inputs[m] for p, m in mixtures.items() if m in inputs}

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
        ids = row_ids(task_ids, next(self.parameters()).device)
        block = RowsContext(task_ids=ids, keep_results=False)
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

            return self._check_aux(reduced_aux_loss(list(self.last_routing.values())))
        by_weight: dict[float, list[Tensor]] = {}  # a few kernels per weight, not per layer
        for r in self.last_routing.values():
            for name, loss in r.aux_losses.items():
                by_weight.setdefault(r.aux_weights[name], []).append(loss.float())
        parts = [torch.stack(losses).sum() * w for w, losses in by_weight.items()]
        if not parts:
            return next(self.parameters()).new_zeros((), dtype=torch.float32)
        return self._check_aux(parts[0] if len(parts) == 1 else torch.stack(parts).sum())

    def _check_aux(self, total: Tensor) -> Tensor:
        """``total``, or a ``RuntimeError`` where the last forward ran with gradients but
        routers that train routed without them, read while gradients are on: the loss would
        train nothing and say nothing (reentrant activation checkpointing)."""
        if not self._routed_without_grad or not torch.is_grad_enabled():
            return total
        paths = self._routed_without_grad
        named = ", ".join(paths[:2]) + (f" and {len(paths) - 2} more" if len(paths) > 2 else "")
        raise RuntimeError(
            f"aux_loss(): the routers of {named} routed the last forward without gradients "
            "although the forward and the routers train, so their auxiliary losses carry no "
            "gradient. torch.utils.checkpoint(..., use_reentrant=True) does this (it runs the "
            "block under torch.no_grad and again in the backward), and the auxiliary losses "
            "would never reach the routers: use use_reentrant=False (the default of "
            "transformers' activation_checkpointing_enable()), or call aux_loss() inside "
            "torch.no_grad() to only read it"
        )

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
            found = getattr(wrapped, name)
        except AttributeError:
            pass
        else:
            if name == "generate" and callable(found):
                return masked_generate(wrapped, found, self.routed_call)
            return found
        raise MissingAttribute(self, wrapped, name) from None

    # -- adapters -------------------------------------------------------------------------
    def adapted_layers(self) -> Iterator[tuple[str, MoRALayer]]:
        """``(path, layer)`` for every adapted layer, paths relative to the wrapped model."""
        return adapted_layers_of(self.model)

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
        plain = PlainView(self.model)
        paths = select_targets(plain, target_modules, exclude=self._exclude)
        for path in paths:  # every layer is checked before any is changed or allocated
            check_fit(
                *linear_features(plain.get_submodule(path)), _for(config, path), f"layer {path!r}"
            )
        for path in paths:
            layer = self.model.get_submodule(path)
            if not isinstance(layer, MoRALayer):
                layer = MoRALinear(layer)  # freezes the layer ...
                if path in self.saved_modules:  # ... unless it is a trained module_to_save
                    layer.base_layer.requires_grad_(True)
                set_submodule(self.model, path, layer)
            layer.add_adapter(name, _for(config, path))
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
                    set_submodule(self.model, path, fresh)
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
        """An ordinary model with the active adapters folded into its weights (an NF4 base,
        :func:`moracl.quant.quantize_base`, dequantised: ordinary float weights)."""
        self.merge()
        return dequantize_base(self._unload())

    def unload(self) -> nn.Module:
        """An ordinary model without the adapters (weights unchanged)."""
        self.unmerge()
        return self._unload()

    def _unload(self) -> nn.Module:
        plain = structural_copy(self.model)
        for path, layer in list(adapted_layers_of(plain)):
            set_submodule(plain, path, layer.base_layer)
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
        for path, layer in list(adapted_layers_of(plain)):
            base = copy.copy(layer.base_layer)  # new module object, new weight below
            if path in factors:
                a, b = factors[path]
                w = layer.weight
                w = w.to(w.dtype)  # an NF4 base weight: dequantised; a float one: itself
                new = w + (b @ a).to(w.dtype)
                base.weight = nn.Parameter(
                    new.t().contiguous() if layer.transposed else new, requires_grad=False
                )
            set_submodule(plain, path, base)
        return dequantize_base(plain)

    def _layer(self, path: str) -> MoRALayer:
        layer = self.model.get_submodule(path)
        if not isinstance(layer, MoRALayer):
            raise ValueError(f"{path!r} is not an adapted layer")
        return layer


def _new_instance(cls: type[MoRAModel]) -> MoRAModel:
    """An empty ``cls`` for pickle and copy to fill in (see ``MoRAModel.__reduce_ex__``)."""
    return cls.__new__(cls)
