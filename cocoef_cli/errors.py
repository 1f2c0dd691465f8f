"""The one error type for bad user input: the CLI turns it into one line on stderr and exit 2."""
from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
    """Bad input, named by its config key.

    Rendered as ``key=value: reason; accepted: a, b, c`` — one line, no traceback.
    """

    def __init__(self, key: str, value: object, accepted: str | Iterable[str], reason: str = "invalid value"):
        if not isinstance(accepted, str):
            accepted = ", ".join(str(a) for a in accepted)
        self.key, self.value, self.accepted, self.reason = key, value, accepted, reason
        super().__init__(f"{key}={value!r}: {reason}; accepted: {accepted}")
