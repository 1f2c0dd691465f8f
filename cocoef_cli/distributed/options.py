"""The validated ``runtime.*`` keys of ``runtime=torch_distributed`` (conf/runtime/torch_distributed.yaml)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoef_cli.checks import is_int, need_bool, need_int, need_num
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
        token = Path(path).read_text(encoding="utf-8").strip()
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
    def from_config(cls, cfg: Mapping[str, Any]) -> RuntimeOptions:
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
        port = need_int("runtime.master_port", rt.get("master_port"), 1, 65535, none=True)
        spawn = need_bool("runtime.spawn", rt.get("spawn"))
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
        wait_for = need_int("runtime.wait_for", rt.get("wait_for"), 1, M, none=True)
        slow = rt.get("slow_devices") or []
        if isinstance(slow, (str, bytes)) or not hasattr(slow, "__iter__"):
            raise ConfigError("runtime.slow_devices", slow, f"a list of device indices 0..{M - 1}", "not a list")
        slow = list(slow)
        for i in slow:
            if not is_int(i) or not 0 <= i < M:
                raise ConfigError(
                    "runtime.slow_devices", slow, f"a list of device indices 0..{M - 1}", f"entry {i!r} is not a device"
                )
        return cls(
            replay=need_bool("runtime.replay", rt.get("replay")),
            backend=backend,
            master_addr=addr,
            master_port=port,
            spawn=spawn,
            timeout_s=need_num("runtime.timeout_s", rt.get("timeout_s"), 0, lo_open=True, finite=False),
            deadline_s=need_num("runtime.deadline_s", rt.get("deadline_s"), 0, lo_open=True, none=True, finite=False),
            time_scale=need_num("runtime.time_scale", rt.get("time_scale"), 0, finite=False),
            straggle_s=need_num("runtime.straggle_s", rt.get("straggle_s"), 0, none=True, finite=False),
            wait_for=wait_for,
            slow_devices=slow,
            slow_s=need_num("runtime.slow_s", rt.get("slow_s"), 0, finite=False),
        )
