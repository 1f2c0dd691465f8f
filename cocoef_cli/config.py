"""Hydra composition over ``conf/``, the validated schema, and one-line error messages.

Validation happens in two layers, both before any work or any file is written:

* :func:`validate` — the schema that needs no data: every top-level key (type and range), the
  ``optim``/``network``/``runtime`` groups, and the group keys no component checks itself (typed by
  :data:`GROUP_RULES`, plus a type check of every group key against its option's YAML default:
  a key whose default is a boolean takes a boolean, one whose default is a number takes a number).
* :func:`check` — :func:`validate`, then the component validators exactly as a run builds them, at
  the smallest size that checks every rule: the dataset is loaded (files present, D known), the
  model, the compressor for that D (k ≤ D), the code allocation and straggler model for one
  replicate (d ≤ devices, d | M for ``frc``, ...), the method for one device (compressor/method
  compatibility, its own keys). No partition tensors or R×M×D states are allocated.

Errors are :class:`ConfigError` (key, value, what is accepted): the CLI prints one line, exit 2.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cocoef_cli.errors import ConfigError, closest

GROUPS = ("method", "code", "compressor", "straggler", "dataset", "model", "optim", "network", "runtime")
OPTIONAL_GROUPS = ("logger",)  # absent from configs recorded before it existed; never part of run_id
ALL_GROUPS = GROUPS + OPTIONAL_GROUPS
PRECISIONS = ("float32", "float64")
DEVICES = ("cpu", "cuda", "auto")
RUNTIMES = ("simulator", "torch_distributed")


def config_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The config root: ``--config-dir``, else $COCOEF_CONFIG_DIR, else ``conf/`` beside the package
    (editable install), else the copy a wheel installs under <prefix>/share/cocoef/conf."""
    env = os.environ.get("COCOEF_CONFIG_DIR")
    here = Path(__file__).resolve().parent
    shipped = Path(sys.prefix) / "share" / "cocoef" / "conf"  # data-files of an installed wheel
    for cand in (explicit, env, here.parent / "conf", shipped):
        if cand and (Path(cand) / "config.yaml").is_file():
            return Path(cand).resolve()
    where = explicit or env or here.parent / "conf"
    raise ConfigError("--config-dir", str(where), "a folder holding config.yaml", "no config found")


def options(group: str, root: Path | None = None) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    root = root or config_dir()
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), root: str | os.PathLike | None = None, name: str = "config") -> dict:
    """Compose ``conf/<name>.yaml`` with Hydra overrides, resolve it and return a plain dict.

    An override of a key the config does not have is reported by :func:`unknown_key` (the keys of
    the option it would belong to, the closest one); keys added with ``+`` are checked by
    :func:`validate` (the declared keys)."""
    root_path = config_dir(root)
    _check_override_syntax(overrides, root_path)
    try:
        return _hydra_compose(root_path, name, overrides)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's composition errors, rendered as one line naming the key
        raise _hydra_error(e, overrides, root_path) from None


def _hydra_compose(root: Path, name: str, overrides: Sequence[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            cfg = hydra_compose(name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out


def override_key(override: str) -> str:
    """The key of an override ``[+|++|~]key=value``, without its prefix."""
    return override.partition("=")[0].lstrip("+~")


# presets added with +NAME=OPTION (``# @package _global_``): tuned method arms, sweep presets
PRESETS = ("baseline", "experiment")


def _check_override_syntax(overrides: Sequence[str], root: Path) -> None:
    """Catch unknown group options and Hydra's own keys before Hydra does (its messages name the
    wrong file, or it accepts ``hydra.*`` keys that do nothing here)."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep:
            raise ConfigError("overrides", ov, "key=value (e.g. straggler.p=0.3)", "not an override")
        key = key.lstrip("+~")
        if is_hydra_key(key):
            raise ConfigError(
                key,
                value,
                "the keys of the config (hydra.launcher.* and hydra.sweeper.params are cocoef sweep's)",
                "Hydra's own keys do nothing in a single run",
            )
        if key in PRESETS and not ov.startswith("+"):
            raise ConfigError(key, value, f"+{key}={value}", f"a {key} preset is added with +")
        if key in ALL_GROUPS + PRESETS and value and "," not in value and not value.startswith(("[", "{", "$")):
            if value not in options(key, root):
                raise ConfigError(key, value, options(key, root), f"unknown {key}")


def root_keys(root: Path | None = None) -> list[str]:
    """The top-level keys of ``conf/config.yaml``, then the group names."""
    data = _option_defaults(".", "config", root)
    return [k for k in data if k != "defaults"] + list(ALL_GROUPS)


def group_keys(group: str, name: Any, root: Path | None = None) -> list[str]:
    """The keys ``conf/<group>/<name>.yaml`` declares (``name`` excluded)."""
    return [k for k in _option_defaults(group, name, root) if k != "name"]


def unknown_key(dotted: str, value: Any, cfg: dict, root: Path | None = None) -> ConfigError:
    """The error for a key the config does not declare: the accepted keys of its level (those of
    the group's selected option, or the top-level ones), and a hint: the options of the group that
    declare it ("dataset.path belongs to dataset=csv"), else the closest accepted key."""
    group, _, key = dotted.partition(".")
    if key and group in ALL_GROUPS:
        name = (cfg.get(group) or {}).get("name")
        accepted = [f"{group}.{k}" for k in group_keys(group, name, root)]
        others = {o: group_keys(group, o, root) for o in options(group, root or config_dir()) if o != name}
        owners = [o for o, keys in others.items() if key in keys]
        near = closest(key, group_keys(group, name, root))
        far = closest(key, [k for keys in others.values() for k in keys])
        target = "_target_" in _option_defaults(group, name, root)
        hint = (
            f"keys of the {group}._target_ factory are added with +: +{dotted}={value}"
            if target
            else f"{dotted} belongs to {group}=" + ", ".join(owners)
            if owners
            else f"did you mean {group}.{near}?"
            if near
            else f"did you mean {group}.{far} (of {group}="
            + ", ".join(o for o, keys in others.items() if far in keys)
            + ")?"
            if far
            else None
        )
        return ConfigError(
            dotted, value, accepted or f"none ({group}={name} has no keys)", f"unknown key of {group}={name}", hint
        )
    accepted = root_keys(root)
    in_groups = [f"{g}.{k}" for g in ALL_GROUPS for k in (cfg.get(g) or {}) if k != "name"]
    owner = next((d for d in in_groups if d.split(".", 1)[1] == dotted), None)
    near = owner or closest(dotted, accepted + in_groups)
    return ConfigError(dotted, value, accepted, "unknown key", f"did you mean {near}?" if near else None)


def _check_declared(cfg: dict, root: Path | None) -> None:
    """Every key of ``cfg`` is declared: top-level keys by conf/config.yaml, group keys by the
    selected option's YAML file (a key added with ``+group.key=`` that it does not declare is a
    typo, or a key of another option)."""
    top = root_keys(root)
    for k in cfg:
        if k not in top:
            raise unknown_key(k, cfg[k], cfg, root)
    for g in (g for g in ALL_GROUPS if isinstance(cfg.get(g), dict)):
        declared = _option_defaults(g, cfg[g].get("name"), root)
        if "_target_" in declared:  # the other keys are the target's arguments: it checks them
            continue
        for k in cfg[g]:
            if declared and k not in declared:
                raise unknown_key(f"{g}.{k}", cfg[g][k], cfg, root)


def is_hydra_key(key: str) -> bool:
    """A key of Hydra's own config (``hydra.*``, ``hydra/*``)."""
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _hydra_error(e: Exception, overrides: Sequence[str], root: Path) -> ConfigError:
    """One line for a Hydra composition error; an unknown key through :func:`unknown_key`, from the
    config composed without it (``hydra.*`` keys: the caller lists the accepted ones)."""
    msg = str(e)
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        value = next((o.partition("=")[2] for o in overrides if override_key(o) == key), None)
        if is_hydra_key(key):
            return ConfigError(key, value, "the keys of Hydra's config", "unknown key")
        rest = [o for o in overrides if override_key(o) != key and not is_hydra_key(override_key(o))]
        try:
            cfg = compose(rest, root)
        except ConfigError as other:  # another bad override: that one is reported
            return other
        return unknown_key(key, value, cfg, root)
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
        raise ConfigError(
            prefix + key,
            v,
            accepted,
            "not an integer" if not isinstance(v, int) or isinstance(v, bool) else "out of range",
        )


def validate(cfg: dict, root: str | os.PathLike | None = None) -> dict:
    """Check the top-level keys, ``optim``/``network``, and the group keys against the option files
    of the config root ``root`` (None: the default root); components check their own groups."""
    for g in GROUPS:
        if not isinstance(cfg.get(g), dict) or "name" not in cfg[g]:
            raise ConfigError(g, cfg.get(g), "an option of conf/" + g, "missing group")
    _check_declared(cfg, Path(root) if root else None)
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
    df = cfg.get("diverge_factor")
    if df is not None and (not isinstance(df, (int, float)) or isinstance(df, bool) or not 1 < df < float("inf")):
        raise ConfigError("diverge_factor", df, "null or finite numbers > 1", "out of range")
    _int(cfg, "checkpoint_every", 1, "null or integers ≥ 1", allow_none=True)
    if cfg.get("threads") != "auto":
        _int(cfg, "threads", 1, "auto or integers ≥ 1 (torch CPU threads inside a run)", allow_none=True)
    if cfg.get("checkpoint_every") is not None and cfg["runtime"]["name"] != "simulator":
        raise ConfigError(
            "checkpoint_every",
            cfg["checkpoint_every"],
            "null with runtime=torch_distributed",
            "checkpoints are written by the simulator only",
        )
    validate_groups(cfg, Path(root) if root else None)
    from cocoef_cli import tracking

    tracking.check(cfg)  # the logger group: its keys, its packages installed (the tracking extra)
    return cfg


# group keys that no component validates itself: (key, kind, lower bound, accepted)
GROUP_RULES: dict[str, tuple[str, float | None, str]] = {
    "dataset.seed": ("int", 0, "integers ≥ 0"),
    "dataset.noise": ("number", 0, "numbers ≥ 0"),
    "dataset.standardize": ("bool", None, "true, false"),
    "model.l2": ("number", 0, "numbers ≥ 0"),
    "model.bias": ("bool", None, "true, false"),
    "model.init_scale": ("number", 0, "numbers ≥ 0"),
    "method.allow_biased": ("bool", None, "true, false"),
}
# group keys whose YAML default is a number but that also take a string (checked by their component)
_STRING_OK = ("straggler.deadline", "compressor.index_bits")


def _typed(key: str, v: Any, kind: str, lo: float | None, accepted: str) -> None:
    import math

    if kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(key, v, accepted, "not a boolean")
        return
    is_num = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "int" and not (is_num and float(v).is_integer()):
        raise ConfigError(key, v, accepted, "not an integer")
    if not is_num or math.isnan(v) or math.isinf(v):
        raise ConfigError(key, v, accepted, "not a finite number")
    if lo is not None and v < lo:
        raise ConfigError(key, v, accepted, "out of range")


def _option_defaults(group: str, name: Any, root: Path | None) -> dict:
    """The keys of ``conf/<group>/<name>.yaml`` (its defaults), {} when there is no such file."""
    try:
        import yaml

        path = (root or config_dir()) / group / f"{name}.yaml"  # group ".": the root config
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, ConfigError):
        return {}


def validate_groups(cfg: dict, root: Path | None = None) -> None:
    """:data:`GROUP_RULES`, then every group key against the type of its YAML default."""
    for dotted, (kind, lo, accepted) in GROUP_RULES.items():
        group, key = dotted.split(".", 1)
        if key in cfg.get(group, {}):
            _typed(dotted, cfg[group][key], kind, lo, accepted)
    for group in (g for g in ALL_GROUPS if isinstance(cfg.get(g), dict)):
        defaults = _option_defaults(group, cfg[group].get("name"), root)
        for key, default in defaults.items():
            dotted, v = f"{group}.{key}", cfg[group].get(key)
            if key == "name" or v is None or default is None or dotted in _STRING_OK or dotted in GROUP_RULES:
                continue
            if isinstance(default, bool) and not isinstance(v, bool):
                raise ConfigError(dotted, v, "true, false", "not a boolean")
            if (
                isinstance(default, (int, float))
                and not isinstance(default, bool)
                and (isinstance(v, (bool, str, list, dict)))
            ):
                raise ConfigError(dotted, v, "numbers" if isinstance(default, float) else "integers", "not a number")


def check(cfg: dict, root: str | os.PathLike | None) -> dict:
    """The whole schema before any work: :func:`validate` against the config root ``root`` the
    config was composed from (None: the default root), then every component's own validator as
    a run builds it, at the smallest size (one replicate, one device for the method state). Needs
    the dataset (for D and its files; loaded once per process, the run's build reuses it), nothing
    else heavy. Returns ``cfg``."""
    import torch

    from cocoef_cli.data import load_dataset, partition_indices
    from cocoef_cli.models import build_model
    from cocoef_cli.sim.codes import allocate, build_code
    from cocoef_cli.sim.compressors import build_compressor
    from cocoef_cli.sim.engine import resolve_device
    from cocoef_cli.sim.methods import METHODS, build_message_compressor
    from cocoef_cli.sim.rng import SeedRNG
    from cocoef_cli.sim.stragglers import build_straggler

    validate(cfg, root)
    resolve_device(cfg["device"])
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg["precision"]]
    data = load_dataset(cfg["dataset"])
    model = build_model(cfg["model"], data)
    method_cls = METHODS.get(cfg["method"]["name"])
    compressor = build_message_compressor(cfg, model.D)
    seeds, M = [int(cfg["seed"])], int(cfg["devices"])
    method_cls(cfg["method"], compressor, 1, 1, model.D, dtype, torch.device("cpu"), SeedRNG(seeds, "compressor"))

    def code_and_stragglers(code_cfg: dict):
        rng = SeedRNG(seeds, "code")
        S = allocate(code_cfg, M, rng)
        straggler = build_straggler(cfg["straggler"], S.sum(-1), SeedRNG(seeds, "straggler"))
        return build_code(code_cfg, S, straggler.p, rng, dtype)

    # groups the method overrides (gc: no compressor; ef_sgd: uncoded; gd: no devices) are still
    # checked as written: a bad value is a typo whether or not this method uses it
    if not method_cls.compresses:
        build_compressor(cfg["compressor"], model.D)
    if method_cls.centralized or method_cls.code is not None:
        code_and_stragglers(cfg["code"])
    if method_cls.centralized:
        partition_indices(data.y_train, 1, {"partition": "iid"}, seeds)
        return cfg
    code = code_and_stragglers(
        cfg["code"] if method_cls.code is None else {"name": method_cls.code, "d": 1, "decode": "rescale"}
    )
    partition_indices(data.y_train, code.N, cfg["dataset"], seeds)
    from cocoef_cli.sim.audit import audit

    for line in audit(code, cfg, seeds, compressor, method_cls)[1]:  # one line each, the run goes on
        print(f"warning: {line}", file=sys.stderr)
    return cfg


def load(overrides: Sequence[str] = (), root: str | os.PathLike | None = None) -> dict:
    """compose + validate."""
    return validate(compose(overrides, root), config_dir(root))


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg))
