"""Hydra composition over ``conf/``, top-level validation, and one-line error messages.

Components validate their own keys when built (codes, compressors, ...); this module validates the
top-level keys and turns Hydra's composition errors into :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from cocoef_cli.errors import ConfigError

GROUPS = ("method", "code", "compressor", "straggler", "dataset", "model", "optim", "network", "runtime")
PRECISIONS = ("float32", "float64")
DEVICES = ("cpu", "cuda", "auto")
RUNTIMES = ("simulator", "torch_distributed")


def config_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The config root: ``--config-dir``, else $COCOEF_CONFIG_DIR, else ``conf/`` beside the package
    (editable install), else the copy shipped inside the package (wheel)."""
    env = os.environ.get("COCOEF_CONFIG_DIR")
    here = Path(__file__).resolve().parent
    for cand in (explicit, env, here.parent / "conf", here / "conf"):
        if cand and (Path(cand) / "config.yaml").is_file():
            return Path(cand).resolve()
    where = explicit or env or here.parent / "conf"
    raise ConfigError("--config-dir", str(where), "a folder holding config.yaml", "no config found")


def options(group: str, root: Path | None = None) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    root = root or config_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), root: str | os.PathLike | None = None, name: str = "config") -> dict:
    """Compose ``conf/<name>.yaml`` with Hydra overrides, resolve it and return a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    root_path = config_dir(root)
    _check_override_syntax(overrides, root_path)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root_path), version_base="1.3"):
            cfg = hydra_compose(name, overrides=list(overrides))
    except ConfigError:
        raise
    except Exception as e:  # Hydra's composition errors, rendered as one line naming the key
        raise _hydra_error(e, overrides, root_path) from None
    finally:
        GlobalHydra.instance().clear()
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


def _check_override_syntax(overrides: Sequence[str], root: Path) -> None:
    """Catch unknown group options before Hydra does (its message names the wrong file)."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep:
            raise ConfigError("overrides", ov, "key=value (e.g. straggler.p=0.3)", "not an override")
        key = key.lstrip("+~")
        if key in GROUPS and value and "," not in value and not value.startswith(("[", "{", "$")):
            if value not in options(key, root):
                raise ConfigError(key, value, options(key, root), f"unknown {key}")


def _hydra_error(e: Exception, overrides: Sequence[str], root: Path) -> ConfigError:
    msg = str(e)
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        group = key.split(".")[0]
        value = next((o.partition("=")[2] for o in overrides if o.lstrip("+~").partition("=")[0] == key), None)
        if group in GROUPS and "." in key:
            return ConfigError(key, value, "the keys of the chosen option (see conf/" + group + "/)", "unknown key")
        return ConfigError(key, value, "the keys of conf/config.yaml or a group name: " + ", ".join(GROUPS),
                           "unknown key")
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:
        key, _, value = m.group(1).partition("=")
        return ConfigError(key, value, "one value (sweeps go through `cocoef sweep`)", "a sweep in a single run")
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if m:
        return ConfigError(m.group(1), m.group(2), options(m.group(1), root), f"unknown {m.group(1)}")
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return ConfigError("overrides", " ".join(overrides), "Hydra override syntax key=value", first)


def _int(cfg: dict, key: str, lo: int, accepted: str, allow_none: bool = False, prefix: str = "") -> None:
    v = cfg.get(key)
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(prefix + key, v, accepted, "not an integer" if not isinstance(v, int) or isinstance(v, bool) else "out of range")


def validate(cfg: dict) -> dict:
    """Check the top-level keys and ``optim``/``network`` (components check their own groups)."""
    for g in GROUPS:
        if not isinstance(cfg.get(g), dict) or "name" not in cfg[g]:
            raise ConfigError(g, cfg.get(g), "an option of conf/" + g, "missing group")
    _int(cfg, "devices", 1, "integers ≥ 1")
    _int(cfg, "iters", 0, "integers ≥ 0")
    _int(cfg, "seed", 0, "integers ≥ 0")
    _int(cfg, "seeds", 1, "integers ≥ 1")
    _int(cfg, "eval_every", 1, "integers ≥ 1")
    _int(cfg, "batch_size", 1, "null or integers ≥ 1", allow_none=True)
    for key, accepted in (("precision", PRECISIONS), ("device", DEVICES)):
        if cfg.get(key) not in accepted:
            raise ConfigError(key, cfg.get(key), accepted)
    if cfg["runtime"]["name"] not in RUNTIMES:
        raise ConfigError("runtime", cfg["runtime"]["name"], RUNTIMES)
    if cfg["runtime"]["name"] == "torch_distributed":
        from cocoef_cli.runtime.options import RuntimeOptions

        RuntimeOptions.from_cfg(cfg)  # validates runtime.* (nothing is started)
    optim = cfg["optim"]
    lr = optim.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or lr == float("inf"):
        raise ConfigError("optim.lr", lr, "finite numbers > 0", "out of range")
    from cocoef_cli.sim.engine import SCHEDULES

    if optim.get("schedule", "const") not in SCHEDULES:
        raise ConfigError("optim.schedule", optim.get("schedule"), SCHEDULES)
    mom = optim.get("momentum", 0.0)
    if not isinstance(mom, (int, float)) or not 0 <= mom < 1:
        raise ConfigError("optim.momentum", mom, "numbers in [0, 1)", "out of range")
    if optim.get("schedule") == "step":
        _int(optim, "step_size", 1, "integers ≥ 1", prefix="optim.")
        g = optim.get("gamma")
        if not isinstance(g, (int, float)) or not 0 < g <= 1:
            raise ConfigError("optim.gamma", g, "numbers in (0, 1]", "out of range")
    bw = cfg["network"].get("bandwidth_bps")
    if bw is not None and (not isinstance(bw, (int, float)) or bw <= 0):
        raise ConfigError("network.bandwidth_bps", bw, "null or numbers > 0", "out of range")
    return cfg


def load(overrides: Sequence[str] = (), root: str | os.PathLike | None = None) -> dict:
    """compose + validate."""
    return validate(compose(overrides, root))


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg))
