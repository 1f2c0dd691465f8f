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

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.kind, name, self.names(), f"unknown {self.kind}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def describe(self) -> list[tuple[str, str]]:
        """(name, :func:`summary` of its docstring) for every entry, in registration order."""
        return [(name, summary(obj)) for name, obj in self._items.items()]

    def __contains__(self, name: str) -> bool:
        return name in self._items


def locate(path: object, key: str) -> object:
    """The object a dotted path ``pkg.mod.attr`` names (a ``_target_``): the longest importable
    module prefix, then attributes. A bad path is a :class:`ConfigError` naming ``key``."""
    import importlib

    accepted = "a dotted path pkg.module.name importable from PYTHONPATH"
    if not isinstance(path, str) or path in ("", "???") or not all(p.isidentifier() for p in path.split(".")):
        raise ConfigError(key, path, accepted, "required" if path in (None, "", "???") else "not a dotted path")
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod_name = ".".join(parts[:i])
        try:
            obj: object = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not mod_name.startswith(e.name):  # the module exists, one it imports not
                raise ConfigError(key, path, accepted, f"importing {mod_name} failed: {e}") from None
            continue
        except Exception as e:  # the module exists but fails on import: its own error, one line
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(key, path, accepted, f"importing {mod_name} raised {type(e).__name__}: {first}") from None
        for j, attr in enumerate(parts[i:], i):
            if not hasattr(obj, attr):
                raise ConfigError(key, path, accepted, f"{'.'.join(parts[:j])} has no attribute {attr}") from None
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(key, path, accepted, f"no module named {parts[0]}")
