"""Writing PEFT adapter folders that ``peft.PeftModel.from_pretrained`` loads: a model's
LoRA (rsLoRA), DoRA, VeRA and AdaLoRA adapters (:func:`save_peft`), or plain LoRA factors
(:func:`write_lora_folder`); what PEFT cannot represent is refused before anything is
written.  AdaLoRA is written as PEFT's ``AdaLoraModel.save_pretrained`` writes it after the
final allocation: the surviving triplets and ``rank_pattern``.

Shape legend: ``r`` rank, ``i``/``o`` layer input/output sizes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moracl.adapters.adalora import AdaLoRA, AdaLoRAConfig
from moracl.adapters.dora import DoRAConfig
from moracl.adapters.lora import LoRAConfig
from moracl.adapters.vera import VeRA, VeRAConfig
from moracl.adapters.vera.module import shared_projection
from moracl.checkpoint import CONFIG_NAME, WEIGHTS_NAME, safetensors_bytes, write_files
from moracl.experts.mixture import MixtureConfig
from moracl.guard import assert_finite, finite_json
from moracl.layer import MoRALayer
from moracl.peft_layout import (
    PEFT_CONFIG_NAME,
    PREFIX,
    AdaptedModel,
    exact_pattern,
    peft_matches,
    peft_saved_modules,
    plain_modules,
)

__all__ = ["check_moracl_representable", "save_peft", "write_lora_folder"]


def _write_peft(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write a PEFT folder (with moracl's ``checksums.json`` beside it, which PEFT ignores);
    non-finite values are refused before anything is written."""
    assert_finite(tensors, f"PEFT adapter for {directory}")
    text = finite_json(config, str(directory / PEFT_CONFIG_NAME), indent=2, sort_keys=True)
    files = {
        WEIGHTS_NAME: safetensors_bytes(tensors, {"format": "pt"}),
        PEFT_CONFIG_NAME: (text + "\n").encode(),
    }
    return write_files(directory, files, stale=[CONFIG_NAME])


def _common(
    targets: str | list[str], modules: Sequence[str], fan_in_fan_out: bool
) -> dict[str, Any]:
    return {
        "target_modules": targets,
        "modules_to_save": list(modules) or None,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


def write_lora_folder(
    directory: str | os.PathLike[str],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    fan_in_fan_out: bool = False,
    target_modules: str | list[str] | None = None,
    modules: Mapping[str, Tensor] | None = None,
) -> Path:
    """Save ``{layer path: (A (r × i), B (o × r))}`` as a PEFT LoRA adapter with scaling 1
    (``lora_alpha = r``; layers of another rank through ``rank_pattern``/``alpha_pattern``).

    ``target_modules`` defaults to the sorted paths; ``modules`` are ``modules_to_save``
    tensors by ``<module path>.<name>``, with ``modules_to_save`` their paths."""
    ranks = {path: int(a.shape[0]) for path, (a, _) in factors.items()}
    r0 = max(ranks.values())
    modules = dict(modules or {})
    saved = sorted({k.rsplit(".", 1)[0] for k in modules})
    config = {
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": {p: r for p, r in ranks.items() if r != r0},
        "alpha_pattern": {p: r for p, r in ranks.items() if r != r0},
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        **_common(
            sorted(factors) if target_modules is None else target_modules, saved, fan_in_fan_out
        ),
    }
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().float()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().float()
    tensors.update({f"{PREFIX}{k}": v.detach() for k, v in modules.items()})
    return _write_peft(Path(directory), config, tensors)


def _peft_targets(
    targets: Sequence[str], names: Sequence[str], saved: Sequence[str]
) -> str | list[str]:
    """``target_modules`` selecting exactly ``targets`` under PEFT's matching: the list of
    paths when it does, else an exact regular expression.  A target inside a module of
    ``modules_to_save`` is refused (PEFT never adapts those)."""
    for t in targets:
        for m in saved:
            if re.match(rf"(^|.*\.){m}($|\..*)", t):
                raise ValueError(
                    f"layer {t!r} is adapted and inside modules_to_save entry {m!r}; PEFT never "
                    f"adapts a module it saves whole"
                )
    listed = sorted(targets)
    if set(peft_matches(listed, names)) == set(targets):
        return listed
    return exact_pattern(listed)


def _module_tensors(model: AdaptedModel, names: Sequence[str]) -> dict[str, Tensor]:
    """``modules_to_save`` tensors by ``<path>.<name>``, refusing what PEFT cannot match."""
    out: dict[str, Tensor] = {}
    layers = dict(model.adapted_layers())
    for path in model.saved_modules:
        if path in layers:
            raise ValueError(
                f"module {path!r} is both adapted and in modules_to_save; PEFT cannot save both"
            )
        for k, v in model.model.get_submodule(path).state_dict().items():
            out[f"{path}.{k}"] = v
    hits = peft_saved_modules(names, list(model.saved_modules) or None, "modules_to_save")
    if set(hits) != set(model.saved_modules):
        raise ValueError(
            f"PEFT matches modules_to_save by suffix: {model.saved_modules} would also select "
            f"{sorted(set(hits) - set(model.saved_modules))[:5]}"
        )
    return out


def _fan_in_fan_out(layers: Mapping[str, MoRALayer], targets: Sequence[str], name: str) -> bool:
    kinds = {layers[t].transposed for t in targets}
    if len(kinds) > 1:
        raise ValueError(
            f"adapter {name!r} adapts both nn.Linear and Conv1D layers; PEFT's fan_in_fan_out "
            f"is one setting per adapter: target one kind of layer"
        )
    return kinds.pop()


def _vera_tensors(
    layers: Mapping[str, MoRALayer], targets: Sequence[str], name: str
) -> dict[str, Tensor]:
    """VeRA's tensors in PEFT's layout: the shared projections (each layer's must be their
    slices) and every layer's scaling vectors."""
    adapters: dict[str, VeRA] = {}
    for t in targets:
        adapter = layers[t].adapter(name)
        assert isinstance(adapter, VeRA)  # the adapter config is a VeRAConfig
        adapters[t] = adapter
    widest = max(targets, key=lambda t: layers[t].in_features)
    tallest = max(targets, key=lambda t: layers[t].out_features)
    a, b = adapters[widest].vera_A, adapters[tallest].vera_B  # (r, max i), (max o, r)
    for t, adapter in adapters.items():
        i, o = layers[t].in_features, layers[t].out_features
        if not torch.equal(adapter.vera_A, a[:, :i]) or not torch.equal(adapter.vera_B, b[:o]):
            raise ValueError(
                f"VeRA adapter {name!r}: PEFT shares one projection pair over all layers and "
                f"slices it, but layer {t!r} ({i} -> {o}) has projections of its own (moracl "
                f"draws one per layer shape): write VeRA in PEFT's format for target layers of "
                f"one input size (or an adapter that was loaded from PEFT)"
            )
    tensors = {"base_model.vera_A": a.float(), "base_model.vera_B": b.float()}
    for t, adapter in adapters.items():
        tensors[f"{PREFIX}{t}.vera_lambda_d"] = adapter.lambda_d.detach()
        tensors[f"{PREFIX}{t}.vera_lambda_b"] = adapter.lambda_b.detach()
    return tensors


def _adalora_tensors(
    config: AdaLoRAConfig, layers: Mapping[str, MoRALayer], targets: Sequence[str], name: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """AdaLoRA's config and tensors in PEFT's layout: each layer's surviving triplets
    (``lora_A (k, i)``, ``lora_E (k, 1)``, ``lora_B (o, k)``, as ``save_pretrained`` keeps
    them) and ``rank_pattern`` marking ``k`` of ``init_r`` kept, which PEFT resizes each layer
    to on load (its scaling stays ``alpha / (init_r + 1e-5)``).  Only the kept count matters
    to PEFT, so a layer built pruned marks its triplets first."""
    pattern: dict[str, list[bool]] = {}
    tensors: dict[str, Tensor] = {}
    for t in targets:
        adapter = layers[t].adapter(name)
        assert isinstance(adapter, AdaLoRA)  # the adapter config is an AdaLoRAConfig
        mask = adapter.rank_mask.tolist()  # (r,)
        pattern[f"{t}.lora_E"] = mask + [False] * (config.rank - len(mask))
        for key, value in adapter.saved_state().items():
            if key != "rank_mask":
                tensors[f"{PREFIX}{t}.{key}"] = value
    peft = {
        "peft_type": "ADALORA",
        "init_r": config.rank,
        "target_r": config.target_rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "orth_reg_weight": config.orth_reg_weight,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "tinit": config.tinit,
        "tfinal": config.tfinal,
        "deltaT": config.delta_t,
        # the run's length when the config records it, else the least PEFT accepts
        "total_step": config.total_step or config.tinit + config.tfinal + 1,
        "rank_pattern": pattern,
        "use_rslora": False,
        "use_dora": False,
    }
    return peft, tensors


def _peft_adapter(
    model: AdaptedModel, name: str, names: Sequence[str], modules: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Adapter ``name``'s PEFT config and tensors, or ``ValueError`` naming what PEFT cannot
    represent."""
    config = model.adapter_configs[name]
    targets = model.adapter_targets[name]
    layers = dict(model.adapted_layers())
    common = _common(
        _peft_targets(targets, names, model.saved_modules),
        model.saved_modules,
        _fan_in_fan_out(layers, targets, name),
    )
    tensors = {f"{PREFIX}{k}": v.detach() for k, v in modules.items()}
    if isinstance(config, LoRAConfig):  # DoRA too
        peft: dict[str, Any] = {
            "peft_type": "LORA",
            "r": config.rank,
            "lora_alpha": config.alpha,
            "use_rslora": config.rslora,
            "use_dora": isinstance(config, DoRAConfig),
            "lora_dropout": config.dropout,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
        for t in targets:
            state = layers[t].adapter(name).state_dict()
            tensors[f"{PREFIX}{t}.lora_A.weight"] = state["lora_A"]
            tensors[f"{PREFIX}{t}.lora_B.weight"] = state["lora_B"]
            if "magnitude" in state:
                tensors[f"{PREFIX}{t}.lora_magnitude_vector"] = state["magnitude"]
    elif isinstance(config, AdaLoRAConfig):
        peft, adalora = _adalora_tensors(config, layers, targets, name)
        tensors.update(adalora)
    elif isinstance(config, VeRAConfig):
        peft = {
            "peft_type": "VERA",
            "r": config.rank,
            "projection_prng_key": config.projection_seed,
            "save_projection": True,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
        }
        tensors.update(_vera_tensors(layers, targets, name))
    else:
        kind = "mixture of experts" if isinstance(config, MixtureConfig) else config.kind
        raise ValueError(
            f"adapter {name!r} is a {kind} adapter, which PEFT cannot represent; PEFT's format "
            f"holds lora (rslora), dora, vera and adalora adapters, and one task of a task-routed "
            f"mixture (task_id=...)"
        )
    return {**peft, **common}, tensors


def save_peft(
    model: AdaptedModel,
    directory: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    *,
    task_id: int | None = None,
) -> Path:
    """Write ``model``'s adapters ``names`` (default: all) in PEFT's layout into
    ``directory``; returns it.

    One adapter goes into ``directory`` itself; of several, the one named ``"default"`` does
    and each other into ``directory/<name>`` (PEFT's layout for several adapters).  With
    ``task_id``, task ``task_id``'s update of the active task-routed mixtures is written as
    one LoRA.  ``modules_to_save`` go with every adapter.  What PEFT cannot represent is
    refused, naming the adapter, before anything is written."""
    layers = dict(model.adapted_layers())
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("save_pretrained on a merged model: unmerge() first")
    plain = list(plain_modules(model.model))
    modules = _module_tensors(model, plain)
    out = Path(directory)
    if task_id is not None:
        if names is not None:
            raise ValueError(
                "task_id writes the active task-routed mixtures' update for one task; "
                f"names={list(names)!r} cannot be combined with it"
            )
        other = [
            n for n in model.active_adapters
            if not isinstance(model.adapter_configs[n], MixtureConfig)
        ]  # fmt: skip
        if other:
            raise ValueError(
                f"task_id writes only the mixtures' update, but adapters {other} are active too"
            )
        factors = model.task_factors(task_id)
        fan = _fan_in_fan_out(layers, list(factors), "of the mixtures")
        targets = _peft_targets(list(factors), plain, model.saved_modules)
        return write_lora_folder(
            out, factors, fan_in_fan_out=fan, target_modules=targets, modules=modules
        )
    chosen = list(model.adapter_configs) if names is None else list(names)
    if not chosen:
        raise ValueError("names is empty; name at least one adapter to save")
    for n in chosen:
        if n not in model.adapter_configs:
            raise ValueError(f"unknown adapter {n!r}; have {list(model.adapter_configs)}")
    folders = {
        n: out if len(chosen) == 1 or n == "default" else out / n for n in chosen
    }  # fmt: skip
    written = {n: _peft_adapter(model, n, plain, modules) for n in chosen}  # checks all first
    for n, (config, tensors) in written.items():
        _write_peft(folders[n], config, tensors)
    return out


def check_moracl_representable(model: AdaptedModel, names: Sequence[str]) -> None:
    """Refuse to save in moracl's format a VeRA adapter whose projections came from PEFT:
    moracl's format regenerates them from ``projection_seed``, which cannot give PEFT's."""
    for path, layer in model.adapted_layers():
        for n in names:
            adapter = layer.adapters[n] if n in layer.adapters else None  # noqa: SIM401
            if isinstance(adapter, VeRA) and not _seeded(adapter):
                raise ValueError(
                    f"adapter {n!r} (layer {path!r}) has VeRA projections read from a PEFT "
                    f"folder, which moracl's format cannot carry (it regenerates them from "
                    f"projection_seed); save it with format='peft'"
                )


def _seeded(adapter: VeRA) -> bool:
    """Whether ``adapter``'s projections are the ones its ``projection_seed`` gives."""
    r, seed = adapter.config.rank, adapter.config.projection_seed
    a = shared_projection(r, adapter.in_features, seed, 0)
    b = shared_projection(adapter.out_features, r, seed, 1)
    return torch.equal(adapter.vera_A.cpu().float(), a) and torch.equal(
        adapter.vera_B.cpu().float(), b
    )
