"""PEFT's ``adapter_config.json`` in moracl's terms: each field checked and read, every
option moracl cannot honour refused naming it, and the :class:`~moracl.adapters.base.
AdapterConfig` the layers share (:mod:`moracl.peft_files` has the whole mapping)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moracl.adapters.adalora import AdaLoRAConfig
from moracl.adapters.base import AdapterConfig
from moracl.adapters.lora import LoRAConfig
from moracl.parse_fields import show
from moracl.peft_layout import regex

__all__ = [
    "ADALORA_PATTERN_SUFFIX",
    "BASE_REWRITING_INITS",
    "COMMON",
    "READ",
    "adalora_ranks",
    "base_config",
    "check_options",
    "integer",
    "layer_config",
    "target_names",
]

#: config keys read below
READ = {
    "LORA": (
        "r", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "rank_pattern",
        "alpha_pattern", "init_lora_weights", "eva_config",
    ),
    "VERA": (
        "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
        "init_weights",
    ),
    "ADALORA": (
        "init_r", "target_r", "lora_alpha", "lora_dropout", "orth_reg_weight", "beta1",
        "beta2", "tinit", "tfinal", "deltaT", "total_step", "rank_pattern", "r",
        "init_lora_weights",
    ),
}  # fmt: skip
#: PEFT's ``rank_pattern`` key of an AdaLoRA layer: ``<layer path>.lora_E``, the adapter name
#: after it when PEFT kept it
ADALORA_PATTERN_SUFFIX = ".lora_E"
#: config keys of either type: read below, or metadata that does not change the adapter
COMMON = (
    "peft_type", "target_modules", "exclude_modules", "modules_to_save", "bias",
    "fan_in_fan_out", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying",
)  # fmt: skip
#: ``init_lora_weights`` values that rewrite the base model's weights at initialisation
BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _number(config: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {show(value)}")
    return value


def integer(config: Mapping[str, Any], key: str, default: int, where: str) -> int:
    """``config[key]`` (``default`` when absent), refused unless an integer."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be an integer, got {show(value)}")
    return value


def _flag(config: Mapping[str, Any], key: str, where: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {show(value)}")
    return value


def target_names(value: Any, key: str, where: str) -> str | list[str] | None:
    """A ``target_modules``-like ``value`` (config key ``key``): ``None``, a regular
    expression, or a list of non-empty names; anything else is refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(f"{where}: {key} must be a string or a list of names, got {show(value)}")


def _patterns(config: Mapping[str, Any], key: str, where: str) -> dict[str, float]:
    value = config.get(key) or {}
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        raise ValueError(f"{where}: {key} must be an object of name -> number, got {show(value)}")
    return dict(value)


def _pattern_value(patterns: Mapping[str, float], path: str, default: float, where: str) -> float:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of
    ``path`` after a dot."""
    for key, value in patterns.items():
        if regex(rf"(.*\.)?({key})$", where).match(path):
            return value
    return default


def check_options(config: Mapping[str, Any], peft_type: str, where: str) -> None:
    """Refuse every PEFT option moracl cannot honour, naming it."""
    known = set(COMMON) | set(READ[peft_type])
    for key, value in config.items():
        if key not in known and not _empty(value):
            raise ValueError(
                f"{where}: {key}={show(value)} has no moracl equivalent (moracl reads PEFT "
                f"{peft_type} adapters with that option unset)"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{where}: bias={show(bias)}: moracl adapters train no biases; only bias='none' "
            f"adapters can be read"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={init!r} rewrote the base model's weights when the "
            f"adapter was created, so it does not apply to the original model; convert it in "
            f"PEFT first (save_pretrained(path_initial_model_for_weight_conversion=...))"
        )


def base_config(config: Mapping[str, Any], peft_type: str, where: str) -> AdapterConfig:
    """The adapter config every layer shares before ``rank_pattern``/``alpha_pattern``."""
    if peft_type == "ADALORA":
        integer(config, "r", 8, where)  # PEFT's AdaLoRA ignores it (init_r is the rank)
        total_step = None
        if config.get("total_step") is not None:  # the length of the run it was trained in
            total_step = integer(config, "total_step", 1, where)
        fields: dict[str, Any] = {
            "kind": "adalora",
            "rank": integer(config, "init_r", 12, where),
            "target_rank": integer(config, "target_r", 8, where),
            "alpha": float(_number(config, "lora_alpha", 8, where)),
            "dropout": _number(config, "lora_dropout", 0.0, where),
            "orth_reg_weight": _number(config, "orth_reg_weight", 0.5, where),
            "beta1": _number(config, "beta1", 0.85, where),
            "beta2": _number(config, "beta2", 0.85, where),
            "tinit": integer(config, "tinit", 0, where),
            "tfinal": integer(config, "tfinal", 0, where),
            "delta_t": integer(config, "deltaT", 1, where),
        }
        if total_step is not None and total_step > fields["tinit"] + fields["tfinal"]:
            fields["total_step"] = total_step
    elif peft_type == "VERA":
        fields = {
            "kind": "vera",
            "rank": integer(config, "r", 256, where),
            "dropout": _number(config, "vera_dropout", 0.0, where),
            "d_initial": _number(config, "d_initial", 0.1, where),
            # the projections themselves are PEFT's, set after the adapter is built
            "projection_seed": max(integer(config, "projection_prng_key", 0, where), 0),
        }
    else:
        fields = {
            "kind": "dora" if _flag(config, "use_dora", where) else "lora",
            "rank": integer(config, "r", 8, where),
            "alpha": float(_number(config, "lora_alpha", 8, where)),
            "rslora": _flag(config, "use_rslora", where),
            "dropout": _number(config, "lora_dropout", 0.0, where),
        }
    try:
        return AdapterConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def layer_config(
    base: AdapterConfig, config: Mapping[str, Any], targets: Sequence[str], where: str
) -> AdapterConfig:
    """``base`` with the rank and alpha ``rank_pattern``/``alpha_pattern`` give every target,
    refused unless they give all of them the same; for AdaLoRA, each target's surviving rank
    (:func:`adalora_ranks`)."""
    if isinstance(base, AdaLoRAConfig):
        kept = adalora_ranks(config, base.rank, targets, where)
        return base if kept is None else base.replace(rank_pattern=kept)
    if not isinstance(base, LoRAConfig):
        return base
    ranks = _patterns(config, "rank_pattern", where)
    alphas = _patterns(config, "alpha_pattern", where)
    chosen = {
        t: (
            _pattern_value(ranks, t, base.rank, f"{where}: rank_pattern"),
            _pattern_value(alphas, t, base.alpha, f"{where}: alpha_pattern"),
        )
        for t in targets
    }
    distinct = sorted(set(chosen.values()))
    if len(distinct) > 1:
        example = {t: chosen[t] for t in list(chosen)[:4]}
        raise ValueError(
            f"{where}: rank_pattern={show(ranks)} / alpha_pattern={show(alphas)} give the layers "
            f"different (rank, alpha): {example} ...; one moracl adapter has one rank and alpha "
            f"on every layer (save the adapter in PEFT with one r and lora_alpha)"
        )
    rank, alpha = distinct[0]
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise ValueError(f"{where}: rank_pattern gives rank {rank!r}; expected an integer")
    try:
        return base.replace(rank=rank, alpha=float(alpha))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def adalora_ranks(
    config: Mapping[str, Any], rank: int, targets: Sequence[str], where: str
) -> dict[str, int] | None:
    """Each target's rank in a PEFT AdaLoRA folder: ``rank_pattern`` maps
    ``<layer path>.lora_E`` to the kept triplets of the layer's ``rank`` (``init_r``) as
    booleans, and PEFT resizes such a layer to the triplets kept (a target it does not name
    keeps ``rank``); ``None`` without a pattern.  A key naming no target, or a value that is not
    ``rank`` booleans, is refused."""
    value = config.get("rank_pattern")
    if not value:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"{where}: rank_pattern must be an object of '<layer>.lora_E' -> list of booleans, "
            f"got {show(value)}"
        )
    ranks: dict[str, int] = {}
    for key, mask in value.items():
        path = _adalora_layer(key, targets)
        if path is None:
            raise ValueError(
                f"{where}: rank_pattern key {key!r} names no adapted layer; expected "
                f"'<layer>{ADALORA_PATTERN_SUFFIX}' for a layer among {list(targets)[:5]}"
            )
        if (
            not isinstance(mask, list)
            or len(mask) != rank
            or not all(isinstance(b, bool) for b in mask)
        ):
            raise ValueError(
                f"{where}: rank_pattern[{key!r}]={show(mask)}; expected init_r={rank} booleans "
                f"(the triplets the rank budget kept)"
            )
        ranks[path] = sum(mask)
    return {t: ranks.get(t, rank) for t in targets}


def _adalora_layer(key: Any, targets: Sequence[str]) -> str | None:
    """The target ``key`` names (``<path>.lora_E`` or ``<path>.lora_E.<adapter name>``)."""
    if not isinstance(key, str):
        return None
    for path in targets:
        stem = f"{path}{ADALORA_PATTERN_SUFFIX}"
        if key == stem or (key.startswith(f"{stem}.") and "." not in key[len(stem) + 1 :]):
            return path
    return None
