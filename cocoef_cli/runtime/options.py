"""The validated ``runtime.*`` keys of ``runtime=torch_distributed`` (conf/runtime/torch_distributed.yaml)."""

from __future__ import annotations

import math
import numbers
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cocoef_cli.errors import ConfigError

BACKENDS = ("gloo",)
TOKEN_ENV, TOKEN_FILE_ENV = "COCOEF_TOKEN", "COCOEF_TOKEN_FILE"
TOKEN_HOW = (
    f"the same secret in {TOKEN_ENV} (or in a file named by {TOKEN_FILE_ENV}) for the server and every "
    "device, e.g. python -c 'import secrets; print(secrets.token_hex(32))'"
)


def env_token() -> str | None:
    """The run token from the environment: ``COCOEF_TOKEN``, else the stripped content of the file
    ``COCOEF_TOKEN_FILE``; None when neither is set. ConfigError for an unreadable or empty file."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        token = open(path, encoding="utf-8").read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(TOKEN_FILE_ENV, path, "a readable file holding the run token", f"unreadable ({e})") from None
    if not token:
        raise ConfigError(TOKEN_FILE_ENV, path, "a file holding the run token", "empty")
    return token


def run_token(spawn: bool) -> str:
    """The secret a device proves in its first message: a fresh random one when the server spawns
    its devices (handed to them by the launcher), else :func:`env_token` (ConfigError if unset)."""
    if spawn:
        return secrets.token_hex(32)
    token = env_token()
    if token is None:
        raise ConfigError(
            TOKEN_ENV,
            None,
            TOKEN_HOW,
            "runtime.spawn=false: devices started elsewhere must prove they belong to this run",
        )
    return token


def _num(rt: Mapping, key: str, lo: float, allow_none: bool = False, lo_open: bool = False) -> float | None:
    v = rt.get(key)
    acc = ("null or " if allow_none else "") + f"numbers {'>' if lo_open else '≥'} {lo:g}"
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(float(v)):
        raise ConfigError(f"runtime.{key}", v, acc, "not a number")
    if float(v) < lo or (lo_open and float(v) == lo):
        raise ConfigError(f"runtime.{key}", v, acc, "out of range")
    return float(v)


def _bool(rt: Mapping, key: str) -> bool:
    v = rt.get(key)
    if not isinstance(v, bool):
        raise ConfigError(f"runtime.{key}", v, "true, false", "not a boolean")
    return v


@dataclass
class RuntimeOptions:
    """``runtime.*`` for the distributed runtime (see the YAML file for the meaning of each key)."""

    replay: bool = False
    backend: str = "gloo"
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    spawn: bool = True
    timeout_s: float = 60.0
    deadline_s: float | None = None
    time_scale: float = 0.01
    straggle_s: float | None = None
    wait_for: int | None = None
    slow_devices: list[int] = field(default_factory=list)
    slow_s: float = 0.0

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> RuntimeOptions:
        """Validate ``cfg['runtime']`` (and what this runtime cannot do) → options; ConfigError otherwise."""
        rt, M = cfg["runtime"], int(cfg["devices"])
        from cocoef_cli.sim.methods import method_class

        method = cfg["method"]["name"]
        if method_class(cfg).centralized:
            raise ConfigError(
                "method",
                method,
                "a method with devices (coco_ef, coco, gc, ...)",
                "runtime=torch_distributed needs devices; gd is centralised",
            )
        if cfg.get("device", "cpu") != "cpu":
            raise ConfigError("device", cfg.get("device"), "cpu", "runtime=torch_distributed runs on CPU (gloo)")
        backend = rt.get("backend", "gloo")
        if backend not in BACKENDS:
            raise ConfigError("runtime.backend", backend, BACKENDS)
        addr = rt.get("master_addr")
        if not isinstance(addr, str) or not addr:
            raise ConfigError("runtime.master_addr", addr, "a host name or IP address", "empty")
        port = rt.get("master_port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ConfigError("runtime.master_port", port, "null or integers 1..65535", "out of range")
        spawn = _bool(rt, "spawn")
        if not spawn and port is None:
            raise ConfigError(
                "runtime.master_port",
                port,
                "integers 1..65535",
                "runtime.spawn=false: devices elsewhere need a known port",
            )
        if not spawn:
            run_token(False)  # set, before any work
        if not spawn and int(cfg.get("seeds", 1)) > 1:
            raise ConfigError(
                "seeds",
                cfg.get("seeds"),
                "1 with runtime.spawn=false",
                "external devices serve one replicate; run the seeds one by one",
            )
        wait_for = rt.get("wait_for")
        if wait_for is not None and (
            isinstance(wait_for, bool) or not isinstance(wait_for, int) or not 1 <= wait_for <= M
        ):
            raise ConfigError("runtime.wait_for", wait_for, f"null or integers 1..{M}", "out of range")
        slow = rt.get("slow_devices") or []
        if isinstance(slow, (str, bytes)) or not hasattr(slow, "__iter__"):
            raise ConfigError("runtime.slow_devices", slow, f"a list of device indices 0..{M - 1}", "not a list")
        slow = list(slow)
        for i in slow:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < M:
                raise ConfigError(
                    "runtime.slow_devices", slow, f"a list of device indices 0..{M - 1}", f"entry {i!r} is not a device"
                )
        return cls(
            replay=_bool(rt, "replay"),
            backend=backend,
            master_addr=addr,
            master_port=port,
            spawn=spawn,
            timeout_s=_num(rt, "timeout_s", 0.0, lo_open=True),
            deadline_s=_num(rt, "deadline_s", 0.0, allow_none=True, lo_open=True),
            time_scale=_num(rt, "time_scale", 0.0),
            straggle_s=_num(rt, "straggle_s", 0.0, allow_none=True),
            wait_for=wait_for,
            slow_devices=slow,
            slow_s=_num(rt, "slow_s", 0.0),
        )
