"""Which implementation routes a mixture's tokens: the :class:`RoutingBackend`.

Every backend computes the same function; they differ in speed and in what they need:

- ``naive``: the router's own ``route`` under autograd and a plain loop over the experts
  (the reference every other backend is tested against);
- ``eager``: the frozen matmul, the router and the gated experts in one autograd node
  (:mod:`moracl.experts.routed_lora`) with the routing's backward written out in closed form
  where the router kind has one (else its ``route`` replayed under autograd), run eagerly;
  experts that are not plain LoRA factors (MoRA and AdaLoRA banks, several banks) get the
  same routing in a node of its own (:mod:`moracl.experts.route_node`) and their banks'
  updates;
- ``compiled``: ``eager`` with the closed-form functions under ``torch.compile`` on CUDA
  (elsewhere they run eagerly, as ``eager``);
- ``triton``: ``compiled`` with the routing and gating as Triton kernels where they take the
  routing (see :mod:`moracl.experts.triton_route`: on CUDA, or on the CPU in Triton's
  interpreter, ``TRITON_INTERPRET=1``); elsewhere the ``compiled`` form serves;
- ``auto``: ``triton`` on CUDA when Triton is installed, ``compiled`` on CUDA without it,
  ``eager`` elsewhere.

A backend a router kind lacks falls back along ``triton -> compiled -> eager``.  The backend
comes from :attr:`MixtureConfig.backend <moracl.experts.mixture.MixtureConfig>`, or, for the
layers run inside a block, from :func:`routing_backend` (which wins over the config)::

    with routing_backend("eager"):
        loss = model(x).loss
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from enum import Enum
from typing import Any

import torch

__all__ = [
    "RoutingBackend",
    "compiled",
    "current_routing_backend",
    "for_backend",
    "resolve_backend",
    "routing_backend",
    "triton_installed",
    "triton_runs_on",
]


class RoutingBackend(str, Enum):
    """How a mixture routes (see the module docstring); str-valued, so YAML strings work."""

    AUTO = "auto"
    TRITON = "triton"
    COMPILED = "compiled"
    EAGER = "eager"
    NAIVE = "naive"

    @classmethod
    def parse(cls, value: Any, name: str = "backend") -> RoutingBackend:
        """``value`` (a member or its string) as a member; else ``ValueError`` naming it."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{name} must be one of {[b.value for b in cls]}, got {value!r}"
            ) from None


_BACKEND: ContextVar[RoutingBackend | None] = ContextVar("moracl_routing_backend", default=None)


@contextmanager
def routing_backend(backend: RoutingBackend | str) -> Iterator[None]:
    """Inside the block every mixture routes with ``backend`` (whatever its config says)."""
    token = _BACKEND.set(RoutingBackend.parse(backend))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def current_routing_backend() -> RoutingBackend | None:
    """The backend set by the innermost :func:`routing_backend` block, or ``None``."""
    return _BACKEND.get()


@functools.cache
def triton_installed() -> bool:
    """Whether Triton imports (asked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch, read once


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device``: CUDA, or the CPU in Triton's interpreter
    (``TRITON_INTERPRET=1`` when the process started)."""
    return triton_installed() and (device.type == "cuda" or _interpreted())


def resolve_backend(configured: RoutingBackend, device: torch.device) -> RoutingBackend:
    """The concrete backend (never ``auto``) for a layer configured with ``configured`` whose
    input is on ``device``: the context's, else the configured one, ``auto`` resolved for the
    device, ``triton`` where its kernels cannot run falling back to ``compiled``, and
    ``compiled`` off CUDA to ``eager``."""
    backend = _BACKEND.get() or configured
    if backend is RoutingBackend.AUTO:
        if device.type != "cuda":
            return RoutingBackend.EAGER
        backend = RoutingBackend.TRITON
    if backend is RoutingBackend.TRITON and not triton_runs_on(device):
        backend = RoutingBackend.COMPILED
    if backend is RoutingBackend.COMPILED and device.type != "cuda":
        return RoutingBackend.EAGER
    return backend


class _Compiled:
    """``torch.compile(fn, fullgraph=True)`` that runs ``fn`` itself, with a warning, from
    the call that would exceed torch's recompile limit on: a process that meets more input
    layouts than the limit allows (many layer shapes and routers, experts that grow) keeps
    training, uncompiled, instead of failing."""

    def __init__(self, fn: Callable[..., Any], dynamic: bool | None = None) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        self.eager = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager:
            return self.fn(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            self.eager = True
            limit = torch._dynamo.config.recompile_limit
            warnings.warn(
                f"{self.fn.__module__}.{self.fn.__qualname__} met more input layouts than "
                f"torch.compile's recompile_limit ({limit}); it runs uncompiled from now on "
                f"in this process (raise torch._dynamo.config.recompile_limit to keep it "
                f"compiled)",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args, **kwargs)


_COMPILED: dict[tuple[Callable[..., Any], bool | None], _Compiled] = {}


def compiled(fn: Callable[..., Any], dynamic: bool | None = None) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True, dynamic=dynamic)``, compiled once per process,
    function and ``dynamic``; past torch's recompile limit it runs ``fn`` uncompiled (with a
    warning) rather than fail.  ``dynamic=False`` keeps a kernel per input shape (no
    shape-generic kernels after a second shape), for functions that meet few shapes."""
    key = (fn, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = _Compiled(fn, dynamic)
    return _COMPILED[key]


def for_backend(
    fn: Callable[..., Any],
    backend: RoutingBackend,
    device: torch.device,
    dynamic: bool | None = None,
) -> Callable[..., Any]:
    """``fn`` under ``torch.compile`` (:func:`compiled`, with ``dynamic``) for the ``compiled``
    and ``triton`` backends on CUDA; ``fn`` itself elsewhere."""
    fast = backend in (RoutingBackend.COMPILED, RoutingBackend.TRITON)
    return compiled(fn, dynamic) if fast and device.type == "cuda" else fn
