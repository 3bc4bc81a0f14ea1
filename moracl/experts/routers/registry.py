"""The router registry: each router type's module registers its router class and config
variant under the type's name.  Imports no routing op."""

from __future__ import annotations

from collections.abc import Callable

from moracl.experts.routers.base import Router
from moracl.experts.routers.config import RouterConfig, RouterType, type_name
from moracl.registry import Registry

__all__ = ["ROUTERS", "build_router", "register_router"]

ROUTERS: Registry[type[Router]] = Registry("router")


def register_router(
    name: RouterType | str, config_cls: type[RouterConfig]
) -> Callable[[type[Router]], type[Router]]:
    """Class decorator registering a :class:`Router` subclass and its config variant (whose
    ``router_type`` must be ``name``) under ``name``: a built-in :class:`RouterType`, or a new
    name for a router defined outside moracl (``RouterConfig(type=name)`` then builds its
    config, ``type: name`` in a YAML file too)."""
    key = type_name(name)
    if type_name(getattr(config_cls, "router_type", "")) != key:
        raise ValueError(f"{config_cls.__name__}.router_type must be {key!r}")

    def deco(cls: type[Router]) -> type[Router]:
        ROUTERS.register(key)(cls)
        RouterConfig._types[key] = config_cls
        return cls

    return deco


def build_router(config: RouterConfig, in_features: int, num_experts: int) -> Router:
    """The router ``config.type`` over ``num_experts`` experts of ``in_features`` inputs."""
    if not isinstance(config, RouterConfig):
        raise TypeError(f"config must be a RouterConfig, got {type(config).__name__}")
    return ROUTERS.get(type_name(config.type))(config, in_features, num_experts)
