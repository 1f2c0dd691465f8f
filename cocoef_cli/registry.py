"""A tiny name → factory registry, one per kind of component (codes, compressors, ...)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Generic, TypeVar

from cocoef_cli.errors import ConfigError

T = TypeVar("T")


def summary(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring, on one line (a whole sentence, never cut)."""
    doc = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
    return " ".join(doc.split("\n\n")[0].split())


class Registry(Generic[T]):
    """Maps a config name (e.g. ``topk``) to a factory; :meth:`describe` lists (name, summary)."""

    def __init__(self, kind: str):
        self.kind = kind  # the config group, e.g. "compressor"
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: object) -> T:
        """The entry registered as ``name`` (any config value); ConfigError naming the entries otherwise."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        raise ConfigError(self.kind, name, self.names(), f"unknown {self.kind}")

    def names(self) -> list[str]:
        return list(self._items)

    def describe(self) -> list[tuple[str, str]]:
        """(name, :func:`summary` of its docstring) for every entry, in registration order."""
        return [(name, summary(obj)) for name, obj in self._items.items()]

    def __contains__(self, name: str) -> bool:
        return name in self._items
