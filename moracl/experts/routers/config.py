"""The router's typed configuration."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moracl.parse_fields import check_field_types, check_string_keys

__all__ = ["RouterConfig"]

_NESTED = ("outer", "inner")
#: the deepest nesting of router configs (a hierarchical router's outer/inner) accepted
MAX_DEPTH = 8
_PER = ("token", "sample")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_weight(name: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class RouterConfig:
    """How a layer's tokens are routed to its experts; ``type`` names a registered router.

    ``RouterConfig(type="topk", k=2)``; fields a router type does not use are ignored, except
    the hierarchical ones, which other types reject.

    Args:
        type: registered router (``topk``, ``dynamic``, ``task``, ``hierarchical``, ``soft``).
        k: experts per token (``topk``; the inner default of ``hierarchical``).
        normalize: ``topk``: the gates are the softmax over the chosen experts' scores (they
            sum to 1); ``False``: each chosen expert's gate is its router probability, as
            Switch routes top-1, so that with ``k = 1`` the task loss still trains the router.
        noise: learned input-dependent noise on the logits while training (Shazeer et al.
            2017), for the routers that select (``topk``, ``dynamic``).
        balance_weight: weight of the Switch load-balance loss (``topk``, ``dynamic``).
        z_weight: weight of the router z-loss (routers with learned logits).
        top_p: ``dynamic``: keep the smallest set of most probable experts whose probability
            reaches ``top_p``, in ``(0, 1]``.
        min_experts: ``dynamic``: at least this many experts per token.
        max_experts: ``dynamic``: at most this many (``None``: all).
        num_tasks: rows of the per-task expert masks (``task``: the tasks, >= 1).
        task_weights: ``task``: learn per-task weights over the task's experts (else uniform).
        groups: ``hierarchical``: number of equal groups of experts.
        outer: ``hierarchical``: the group router (``None``: noisy top-1 with this config's
            noise and loss weights); may be ``task`` or itself hierarchical.
        inner: ``hierarchical``: the expert router used inside each group (``None``: top-``k``
            with this config's noise and loss weights); may be hierarchical (more levels).
        per: what one routing decision covers: ``token`` (each token routed on its own) or
            ``sample`` (a batch row's tokens routed together, by the mean of their inputs;
            see :mod:`moracl.experts.per_sample`). Routers with learned logits only, set on
            the outermost config.
    """

    type: str = "topk"
    k: int = 2
    normalize: bool = True
    noise: bool = True
    balance_weight: float = 0.01
    z_weight: float = 1e-3
    top_p: float = 0.5
    min_experts: int = 1
    max_experts: int | None = None
    num_tasks: int = 0
    task_weights: bool = False
    groups: int = 0
    outer: RouterConfig | None = None
    inner: RouterConfig | None = None
    per: str = "token"

    def __post_init__(self) -> None:
        from moracl.experts.routers.base import ROUTERS  # the registry imports this module

        if not isinstance(self.type, str):
            raise ValueError(f"type must be a router name, got {self.type!r}")
        router_cls = ROUTERS.get(self.type)  # unknown name: ValueError listing the routers
        _check_int("k", self.k, 1)
        _check_bool("normalize", self.normalize)
        _check_bool("noise", self.noise)
        _check_weight("balance_weight", self.balance_weight)
        _check_weight("z_weight", self.z_weight)
        if (
            not isinstance(self.top_p, (int, float))
            or isinstance(self.top_p, bool)
            or not 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("min_experts", self.min_experts, 1)
        if self.max_experts is not None:
            _check_int("max_experts", self.max_experts, 1)
            if self.max_experts < self.min_experts:
                raise ValueError(
                    f"max_experts={self.max_experts} must be >= min_experts={self.min_experts}"
                )
        _check_int("num_tasks", self.num_tasks, 0)
        _check_bool("task_weights", self.task_weights)
        _check_int("groups", self.groups, 0)
        for name in _NESTED:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, RouterConfig.from_dict(value))
            elif value is not None and not isinstance(value, RouterConfig):
                raise ValueError(
                    f"{name} must be a RouterConfig, a mapping or None, got {type(value).__name__}"
                )
            nested = getattr(self, name)
            if nested is not None and nested.per != "token":
                raise ValueError(
                    f"{name}.per={nested.per!r}: a hierarchical router routes all its levels "
                    f"alike; set per on the outermost config"
                )
        if self.per not in _PER:
            raise ValueError(f"per must be one of {list(_PER)}, got {self.per!r}")
        router_cls.check_config(self)

    @property
    def loss_weights(self) -> dict[str, float]:
        """Auxiliary-loss name -> weight."""
        return {"balance": float(self.balance_weight), "z": float(self.z_weight)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterConfig:
        """Build from a plain mapping (parsed YAML/JSON); unknown keys, values of the wrong
        type and nesting (``outer``/``inner``) deeper than :data:`MAX_DEPTH` levels raise
        ``ValueError`` naming the key path (``inner.inner.k``)."""
        return cls._parse(data, "", 1)

    @classmethod
    def _parse(cls, data: Any, path: str, depth: int) -> RouterConfig:
        if isinstance(data, RouterConfig):
            return data
        where = path.rstrip(".") or "a router config"
        data = dict(check_string_keys(data, where))
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"{path}unknown router config key(s) {unknown}; valid keys: {valid}")
        check_field_types(cls, data, prefix=path, skip=_NESTED)
        for name in _NESTED:
            value = data.get(name)
            if value is None or isinstance(value, RouterConfig):
                continue
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"{path}{name} must be a router config (a mapping) or null, got "
                    f"{type(value).__name__}"
                )
            if depth >= MAX_DEPTH:
                raise ValueError(
                    f"{path}{name}: routers nest at most {MAX_DEPTH} levels deep "
                    f"(outer/inner of hierarchical routers)"
                )
            data[name] = cls._parse(value, f"{path}{name}.", depth + 1)
        try:
            return cls(**data)
        except ValueError as e:
            if not path:
                raise
            raise ValueError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (nested configs as mappings) that ``from_dict`` turns back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, RouterConfig) else value
        return out

    def replace(self, **changes: Any) -> RouterConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
