"""Typed getters for config values: the value, converted, or the one-line :class:`ConfigError`.

Every validator of the package checks scalars through these four, so a bad value reads the same
everywhere: ``key=value: not an integer; accepted: integers 1..10``. Booleans are never numbers
(YAML ``true`` is not 1), NaN is never a number, and ``accepted`` is written from the bounds
unless the caller says more (``accepted=``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeGuard

from cocoef_cli.errors import ConfigError


def is_int(v: Any) -> TypeGuard[int]:
    """True for Python / numpy integers, False for bools, floats and strings."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """True for real numbers other than bools and NaN (±inf included)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(float(v))


def need_int(
    key: str, v: Any, lo: int | None = None, hi: int | None = None, *, none: bool = False, accepted: str | None = None
) -> Any:
    """``int(v)`` with lo ≤ v ≤ hi (None: unbounded); ``none``: None is accepted (and returned)."""
    acc = accepted or ("null or " if none else "") + "integers" + (
        f" {lo}..{hi}" if lo is not None and hi is not None else f" ≥ {lo}" if lo is not None else ""
    )
    if v is None and none:
        return None
    if not is_int(v):
        raise ConfigError(key, v, acc, "not an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(key, int(v), acc, "out of range")
    return int(v)


def need_num(
    key: str,
    v: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    none: bool = False,
    finite: bool = True,
    accepted: str | None = None,
) -> Any:
    """``float(v)`` in the interval lo..hi (open ends as flagged; None: unbounded); ``finite``:
    ±inf refused; ``none``: None is accepted (and returned)."""
    if accepted is None:
        if lo is not None and hi is not None:
            rng = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            rng = f" {'>' if lo_open else '≥'} {lo:g}"
        else:
            rng = ""
        unbounded = finite and (lo is None or hi is None)
        accepted = ("null or " if none else "") + ("finite " if unbounded else "") + "numbers" + rng
    if v is None and none:
        return None
    if not is_num(v):
        raise ConfigError(key, v, accepted, "not a number")
    x = float(v)
    if (
        (finite and math.isinf(x))
        or (lo is not None and (x < lo or (lo_open and x == lo)))
        or (hi is not None and (x > hi or (hi_open and x == hi)))
    ):
        raise ConfigError(key, v, accepted, "out of range")
    return x


def need_bool(key: str, v: Any) -> bool:
    """``v`` when it is a boolean (YAML true/false), never 0/1 or a string."""
    if not isinstance(v, bool):
        raise ConfigError(key, v, "true, false", "not a boolean")
    return v


def need_choice(key: str, v: Any, choices: Iterable[Any], reason: str = "invalid value") -> Any:
    """``v`` when it is one of ``choices`` (the error names the closest one)."""
    choices = list(choices)
    if v not in choices:
        raise ConfigError(key, v, choices, reason)
    return v
