"""The one error type for bad user input: the CLI turns it into one line on stderr and exit 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: object, candidates: Iterable[object]) -> str | None:
    """The candidate nearest to ``word`` (difflib ratio ≥ 0.6), None when none is near."""
    near = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return near[0] if near else None


class ConfigError(ValueError):
    """Bad input, named by its config key.

    Rendered as ``key=value: reason[, hint]; accepted: a, b, c`` — one line, no traceback. When
    ``accepted`` is a list and the value a string, the hint defaults to the closest accepted one
    ("did you mean topk?")."""

    def __init__(
        self,
        key: str,
        value: object,
        accepted: str | Iterable[object],
        reason: str = "invalid value",
        hint: str | None = None,
    ):
        if not isinstance(accepted, str):
            names = [str(a) for a in accepted]
            if hint is None and isinstance(value, str) and value not in names:
                near = closest(value, names)
                hint = f"did you mean {near}?" if near else None
            accepted = ", ".join(names)
        self.key, self.value, self.accepted, self.reason, self.hint = key, value, accepted, reason, hint
        super().__init__(f"{key}={value!r}: {reason}" + (f", {hint}" if hint else "") + f"; accepted: {accepted}")
