"""The router's typed configuration: one frozen dataclass per router type, chosen by ``type``.

``RouterConfig(type="topk", k=2)`` returns a :class:`~moracl.experts.routers.topk.
TopKRouterConfig`, as ``AdapterConfig(kind=...)`` does for adapters; each variant has only the
fields its router reads, so a key another type uses (``top_p`` on a top-k router) is refused
with the list of valid keys.  Router types register their variant with
:func:`~moracl.experts.routers.registry.register_router`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from moracl.parse_fields import check_field_types, check_string_keys, show

__all__ = [
    "MAX_DEPTH",
    "LogitRouterConfig",
    "RoutePer",
    "RouterConfig",
    "RouterType",
    "check_bool",
    "check_int",
    "check_weight",
    "type_name",
]

#: the deepest nesting of router configs (a hierarchical router's outer/inner) accepted
MAX_DEPTH = 8

C = TypeVar("C", bound="RouterConfig")
#: a router config class (named here: inside the config classes ``type`` is a field)
ConfigClass = type["RouterConfig"]


class RouterType(str, Enum):
    """The built-in router types (each registered under its value). A router registered
    from outside (:func:`~moracl.experts.routers.registry.register_router` with a new name)
    has its name, a string, as its type."""

    TOPK = "topk"
    DYNAMIC = "dynamic"
    TASK = "task"
    HIERARCHICAL = "hierarchical"
    SOFT = "soft"


class RoutePer(str, Enum):
    """What one routing decision covers: each ``token`` on its own, or a batch row's tokens
    together (``sample``, by the mean of their inputs; see :mod:`moracl.experts.per_sample`)."""

    TOKEN = "token"
    SAMPLE = "sample"


def check_int(name: str, value: Any, minimum: int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool) >= minimum."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_weight(name: str, value: Any) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a finite number >= 0."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def type_name(value: RouterType | str) -> str:
    """The registry name of a router type: a built-in type's value, or the name itself."""
    return value.value if isinstance(value, RouterType) else value


def _router_type(value: Any) -> RouterType | str:
    """``value`` as a built-in :class:`RouterType`, or a registered router's name; else
    ``ValueError`` listing the registered types."""
    if isinstance(value, str) and value in RouterConfig._types:
        return RouterType(value) if value in RouterType._value2member_map_ else value
    raise ValueError(
        f"type must be one of {sorted(RouterConfig._types)} (the registered routers), "
        f"got {show(value)}"
    )


def _enum(cls: type[Enum], name: str, value: Any) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in cls]}, got {value!r}") from None


@dataclass(frozen=True)
class RouterConfig:
    """How a layer's tokens are routed to its experts; ``type`` names a registered router.

    ``RouterConfig(type=..., **fields)`` returns the variant of ``type`` (default ``topk``).

    Args:
        type: the router type (:class:`RouterType`).
        num_tasks: rows of the router's per-task expert masks (``task``: the tasks, >= 1).
    """

    type: RouterType | str = RouterType.TOPK
    num_tasks: int = 0

    _types: ClassVar[dict[str, ConfigClass]] = {}
    #: fields holding nested router configs (the hierarchical router's ``outer``/``inner``)
    nested: ClassVar[tuple[str, ...]] = ()

    if TYPE_CHECKING:  # the variant's fields, as keywords (the dataclass makes __init__)

        def __init__(self, *, type: RouterType | str = ..., **fields: Any) -> None: ...

    def __new__(cls, *args: Any, **kwargs: Any) -> RouterConfig:
        if args:
            raise TypeError("RouterConfig takes keyword arguments only")
        if cls is RouterConfig:
            cls = cls.variant(kwargs.get("type", RouterType.TOPK))
        cls.check_keys(kwargs)
        return super().__new__(cls)

    @classmethod
    def variant(cls, type_: Any) -> ConfigClass:
        """The config class of router type ``type_``; ``ValueError`` listing the types."""
        sub = cls._types.get(type_) if isinstance(type_, str) else None
        if sub is None:
            raise ValueError(f"unknown router {show(type_)}; expected one of {sorted(cls._types)}")
        return sub

    @classmethod
    def check_keys(cls, data: Mapping[str, Any]) -> None:
        """``ValueError`` for keys that are not fields of this router type's config."""
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(valid))
        if unknown:
            name = getattr(cls, "router_type", None)
            what = f"the {type_name(name)} router" if name is not None else "a router"
            raise ValueError(
                f"unknown router config key(s) {unknown} for {what}; valid keys: {valid}"
            )

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", _router_type(self.type))
        expected = getattr(type(self), "router_type", None)
        if expected is not None and type_name(self.type) != type_name(expected):
            raise ValueError(
                f"{type(self).__name__} has type {type_name(expected)!r}, got {self.type!r}"
            )
        check_int("num_tasks", self.num_tasks, 0)

    @property
    def loss_weights(self) -> dict[str, float]:
        """Auxiliary-loss name -> weight (the losses this router type computes)."""
        return {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterConfig:
        """Build from a plain mapping (parsed YAML/JSON); the key ``type`` (default ``topk``)
        picks the variant.  Unknown keys, values of the wrong type and nesting
        (``outer``/``inner``) deeper than :data:`MAX_DEPTH` levels raise ``ValueError`` naming
        the key path (``inner.inner.k``)."""
        return _parse(data, "", 1)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (Enums as their values, nested configs as mappings) that
        ``from_dict`` turns back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, RouterConfig):
                value = value.to_dict()
            elif isinstance(value, Enum):
                value = value.value
            out[f.name] = value
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def _parse(data: Any, path: str, depth: int) -> RouterConfig:
    if isinstance(data, RouterConfig):
        return data
    where = path.rstrip(".") or "a router config"
    data = dict(check_string_keys(data, where))
    try:
        sub = RouterConfig.variant(data.get("type", RouterType.TOPK))
        sub.check_keys(data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if path else str(e)) from None
    nested: tuple[str, ...] = getattr(sub, "nested", ())
    check_field_types(sub, data, prefix=path, skip=nested)
    for name in nested:
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
        data[name] = _parse(value, f"{path}{name}.", depth + 1)
    try:
        return RouterConfig(**data)
    except ValueError as e:
        if not path:
            raise
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class LogitRouterConfig(RouterConfig):
    """Fields of the routers with learned logits (``x Wᵀ``).

    Args:
        per: what one routing decision covers (:class:`RoutePer`); set on the outermost
            config of a hierarchical router.
        z_weight: weight of the router z-loss.
    """

    per: RoutePer = RoutePer.TOKEN
    z_weight: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "per", _enum(RoutePer, "per", self.per))
        check_weight("z_weight", self.z_weight)

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"z": float(self.z_weight)}
