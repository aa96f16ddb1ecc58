"""One registry helper for everything looked up by name: models, heads, policies, data sets and
methods.

A :class:`Registry` maps names to builders. It refuses a name registered twice, lists its
names (optionally by glob pattern), and gives a clear :class:`~splitexit.errors.InputError`
that lists the known names for an unknown one. Imports no torch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import InputError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named builders of one kind (``kind`` names them in messages: ``"model"``, ``"head
    type"``...).

    >>> shapes = Registry("shape")
    >>> @shapes.register("square")
    ... def square(side):
    ...     return (side, side)
    >>> shapes.create("square", 3), shapes.list()
    ((3, 3), ['square'])
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None, *, stamp: str | None = None
                 ) -> Callable[[T], T]:
        """Decorator adding a builder under ``name`` (default: its ``name`` attribute).

        Args:
            name: The name (default: the entry's ``name`` attribute).
            stamp: Also set this attribute of the entry to the name, e.g. ``"kind"`` for a
                class whose instances report the name they were registered under.

        Raises:
            InputError: the name is already registered (a second builder never silently
                replaces the first).
        """

        def deco(entry: T) -> T:
            key = name if name is not None else entry.name  # type: ignore[attr-defined]
            self.add(key, entry)
            if stamp is not None:
                setattr(entry, stamp, key)
            return entry

        return deco

    def add(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; refuses duplicates and names that are not strings."""
        if not isinstance(name, str) or not name:
            raise InputError(f"a {self.kind} is registered under a non-empty string name, got "
                             f"{name!r}")
        if name in self._entries:
            raise InputError(f"{self.kind} {name!r} is registered twice; choose another name "
                             f"(registered: {', '.join(self.list())})")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The builder registered as ``name``.

        Raises:
            InputError: an unknown name; the message lists the known ones.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise InputError(f"unknown {self.kind} {name!r}; known: "
                             f"{', '.join(self.list())}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the builder registered as ``name`` with the arguments given."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a glob pattern, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.list())})"
