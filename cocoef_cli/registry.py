"""A tiny name → factory registry, one per kind of component (codes, compressors, ...), and the
one place where a ``_target_`` (a class from outside the package) is resolved and built.

A config group selects its component by ``name`` (a registered built-in) or by ``_target_``, the
dotted path of a class importable from the working directory or ``PYTHONPATH``
(``compressor._target_=mypkg.mod.MyCompressor``). A ``_target_`` class must subclass the kind's
public base (:attr:`Registry.base`) and is built as ``cls(*needs, **keys)``: what its kind always
needs (e.g. D for a compressor) positionally, then the group's keys as keyword arguments (all
but ``name``, ``_target_`` and the kind's :attr:`Registry.common` keys, which the framework reads).
A registered entry whose group also has a ``_target_`` (e.g. ``model=module``, a factory path)
is a built-in: it reads its ``_target_`` itself.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from cocoef_cli.errors import ConfigError, closest

T = TypeVar("T")

TARGET = "_target_"


def summary(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring, on one line (a whole sentence, never cut)."""
    doc = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
    return " ".join(doc.split("\n\n")[0].split())


def import_target(key: str, path: Any) -> Any:
    """The object a dotted ``path`` (``pkg.mod.Name``, a ``_target_``) names: the longest importable
    module prefix, then attributes (the working directory is on the import path, as for
    ``python -m``). A bad path is a one-line :class:`ConfigError` naming ``key``."""
    accepted = "a dotted path pkg.module.Name importable from the working directory or PYTHONPATH"
    if path is None or path in ("", "???"):
        raise ConfigError(key, path, accepted, "not set" if path is None else "required")
    if not isinstance(path, str) or "." not in path or not all(p.isidentifier() for p in path.split(".")):
        raise ConfigError(key, path, accepted, "not a dotted path")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the console script's path lacks the cwd
        sys.path.append(os.getcwd())
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and not module.startswith(e.name):  # the module exists, one it imports not
                raise ConfigError(key, path, accepted, f"importing {module} failed: {e}") from None
            continue
        except Exception as e:  # the module exists but fails on import: its own error, one line
            first = (str(e).strip().splitlines() or [""])[0]
            raise ConfigError(key, path, accepted, f"importing {module} raised {type(e).__name__}: {first}") from None
        for j, attr in enumerate(parts[i:], i):
            if not hasattr(obj, attr):
                owner = ".".join(parts[:j])
                names = [f"{owner}.{n}" for n, v in vars(obj).items() if inspect.isclass(v) and not n.startswith("_")]
                raise ConfigError(key, path, names or accepted, f"{owner} has no attribute {attr}") from None
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(key, path, accepted, f"cannot import {parts[0]} (no module named {parts[0]})")


class Registry(Generic[T]):
    """Maps a config name (e.g. ``topk``) to a factory; :meth:`describe` lists (name, summary).

    ``base``: the class a ``_target_`` must subclass (None: any callable); ``common``: group keys
    the framework reads itself, never passed to a ``_target_``'s constructor."""

    def __init__(self, kind: str, base: type | None = None, common: tuple[str, ...] = ()):
        self.kind = kind  # the config group, e.g. "compressor"
        self.base, self.common = base, common
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

    def plugin(self, cfg: Mapping[str, Any]) -> bool:
        """True when ``cfg`` selects a ``_target_`` class: it has one and its ``name`` is not a
        registered entry (a registered one, e.g. ``model=module``, reads its ``_target_`` itself)."""
        return TARGET in cfg and cfg.get("name") not in self._items

    def entry(self, cfg: Mapping[str, Any]) -> T:
        """The factory of the group ``cfg``: its ``_target_`` (imported, checked) or its ``name``."""
        if not self.plugin(cfg):
            return self.get(cfg.get("name"))
        key = f"{self.kind}.{TARGET}"
        obj = import_target(key, cfg[TARGET])
        base = self.base
        if base is not None and not (inspect.isclass(obj) and issubclass(obj, base)):
            what = f"a subclass of cocoef_cli.{base.__name__}"
            raise ConfigError(key, cfg[TARGET], what, f"not a subclass of {base.__name__}")
        if base is None and not callable(obj):
            raise ConfigError(key, cfg[TARGET], "a class or function", "not callable")
        return obj

    def keys(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a ``_target_``: the group's keys but name, _target_ and :attr:`common`."""
        return {k: v for k, v in cfg.items() if k not in ("name", TARGET, *self.common)}

    def build(self, cfg: Mapping[str, Any], *needs: Any, builtin: Callable[[T], Any]) -> Any:
        """The component of the group ``cfg``: ``builtin(registered factory)`` for a name, or
        ``cls(*needs, **keys)`` for a ``_target_`` (a key its constructor does not take, or a
        ValueError/TypeError it raises, is a ConfigError naming the key)."""
        if not self.plugin(cfg):
            return builtin(self.get(cfg.get("name")))
        cls: Any = self.entry(cfg)
        keys = self.keys(cfg)
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):  # no signature (a builtin callable): just call it
            sig = None
        if sig is not None:
            params = list(sig.parameters.values())
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                named = [p.name for p in params[len(needs) :] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
                for k, v in keys.items():
                    if k not in named:
                        accepted = [f"{self.kind}.{n}" for n in named] or f"none ({cfg[TARGET]} takes no keys)"
                        near = closest(k, named)
                        hint = f"did you mean {self.kind}.{near}?" if near else None
                        raise ConfigError(f"{self.kind}.{k}", v, accepted, f"not a key of {cfg[TARGET]}", hint)
            try:
                sig.bind(*needs, **keys)
            except TypeError as e:
                raise ConfigError(f"{self.kind}.{TARGET}", cfg[TARGET], "the keys its __init__ takes", str(e)) from None
        try:
            return cls(*needs, **keys)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            given = ", ".join(f"{self.kind}.{k}={v!r}" for k, v in keys.items()) or "no keys"
            raise ConfigError(
                f"{self.kind}.{TARGET}",
                cfg[TARGET],
                f"values its __init__ accepts (given: {given})",
                f"{type(e).__name__}: {e}",
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def describe(self) -> list[tuple[str, str]]:
        """(name, :func:`summary` of its docstring) for every entry, in registration order."""
        return [(name, summary(obj)) for name, obj in self._items.items()]

    def __contains__(self, name: str) -> bool:
        return name in self._items
