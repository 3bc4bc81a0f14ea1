"""A small name -> component registry with helpful errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to components (classes or factories).

    >>> r: Registry[type] = Registry("adapter kind")
    >>> _ = r.register("x")(int)
    >>> r.get("x") is int
    True
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name is registered once."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The component named ``name``; an unknown name raises ``ValueError`` listing all."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.what} {name!r}; expected one of {sorted(self._items)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    @contextmanager
    def temporarily(self, name: str, obj: T) -> Iterator[T]:
        """Register ``obj`` as ``name`` until the block ends (a test's toy component, say).

        Raises:
            ValueError: ``name`` is already registered.
        """
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._items[name] = obj
        try:
            yield obj
        finally:
            self._items.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
