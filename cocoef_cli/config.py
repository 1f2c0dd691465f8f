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

Scalars are checked by the typed getters of :mod:`cocoef_cli.checks` (as every component does).
Errors are :class:`ConfigError` (key, value, what is accepted): the CLI prints one line, exit 2.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from cocoef_cli.checks import need_bool, need_choice, need_int, need_num
from cocoef_cli.errors import ConfigError, closest
from cocoef_cli.registry import TARGET

GROUPS = ("method", "code", "compressor", "straggler", "dataset", "model", "optim", "network", "runtime")
OPTIONAL_GROUPS = ("logger",)  # absent from configs recorded before it existed; never part of run_id
ALL_GROUPS = GROUPS + OPTIONAL_GROUPS
PRECISIONS = ("float32", "float64")
DEVICES = ("cpu", "cuda", "auto")
RUNTIMES = ("simulator", "torch_distributed")


def builtin_dir() -> Path:
    """The package's own config tree: $COCOEF_CONFIG_DIR, else ``conf/`` beside the package
    (editable install), else the copy a wheel installs under <prefix>/share/cocoef/conf."""
    env = os.environ.get("COCOEF_CONFIG_DIR")
    here = Path(__file__).resolve().parent
    shipped = Path(sys.prefix) / "share" / "cocoef" / "conf"  # data-files of an installed wheel
    for cand in (env, here.parent / "conf", shipped):
        if cand and (Path(cand) / "config.yaml").is_file():
            return Path(cand).resolve()
    raise ConfigError(
        "--config-dir", str(env or here.parent / "conf"), "a folder holding config.yaml", "no config found"
    )


def config_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The config root: ``--config-dir`` (a folder), else :func:`builtin_dir`.

    A ``--config-dir`` holding ``config.yaml`` replaces the built-in tree; one without it extends
    it (:func:`layers`): its ``<group>/<option>.yaml`` files are options next to the built-in ones,
    under names of their own (Hydra would take the built-in file of the same name: an error)."""
    if explicit is None:
        return builtin_dir()
    root = Path(explicit)
    if not root.is_dir():
        raise ConfigError(
            "--config-dir", str(explicit), "an existing folder (config.yaml in it replaces conf/)", "no such folder"
        )
    if not (root / "config.yaml").is_file():
        base = builtin_dir()
        for path in sorted(root.glob("*/*.yaml")):
            if (base / path.parent.name / path.name).is_file():
                raise ConfigError(
                    "--config-dir",
                    str(explicit),
                    f"option files of names of their own (rename {path.parent.name}/{path.name}), or a full tree with config.yaml",
                    f"{path.parent.name}/{path.name} has the name of a built-in option",
                )
    return root.resolve()


def layers(root: Path | None = None) -> list[Path]:
    """The folders searched for options (their names are distinct, :func:`config_dir`): ``root`` alone when it holds config.yaml (a
    full config tree), else ``root`` then the built-in tree (a user folder of extra options)."""
    root = Path(root) if root else builtin_dir()
    return [root] if (root / "config.yaml").is_file() else [root, builtin_dir()]


def option_path(group: str, name: Any, root: Path | None = None) -> Path | None:
    """The YAML file of option ``name`` of ``group`` (group ".": the root config), None if none."""
    for layer in layers(root):
        path = layer / group / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def options(group: str, root: Path | None = None) -> list[str]:
    """The options of a config group: the YAML files in ``<layer>/<group>/`` of every layer."""
    return sorted({p.stem for layer in layers(root) for p in (layer / group).glob("*.yaml")})


def compose(overrides: Sequence[str] = (), root: str | os.PathLike | None = None, name: str = "config") -> dict:
    """Compose ``conf/<name>.yaml`` with Hydra overrides, resolve it and return a plain dict.

    An override of a key the config does not have is reported by :func:`unknown_key` (the keys of
    the option it would belong to, the closest one); keys added with ``+`` are checked by
    :func:`validate` (the declared keys)."""
    root_path = config_dir(root)
    overrides = canonical(overrides)
    _check_override_syntax(overrides, root_path)
    try:
        return _hydra_compose(root_path, name, overrides)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's composition errors, rendered as one line naming the key
        raise _hydra_error(e, overrides, root_path) from None


STEP_SIZES = "step_sizes.yaml"  # in the config root: setting → arm → tuned optim.lr


def step_sizes(root: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """``<root>/step_sizes.yaml``: the tuned step sizes of every setting, {} when absent."""
    return _option_defaults(".", Path(STEP_SIZES).stem, Path(root) if root else None)


def step_size(setting: str, arm: str, root: str | os.PathLike | None = None) -> float:
    """The tuned ``optim.lr`` of ``arm`` in ``setting`` (a block of ``step_sizes.yaml``)."""
    table = step_sizes(root)
    if arm not in (table.get(setting) or {}):
        raise ConfigError(f"{STEP_SIZES}: {setting}", arm, list(table.get(setting) or table), "no tuned step size")
    return float(table[setting][arm])


_ROOTS: list[Path] = []  # the config root being resolved (read by the step_size resolver)


def resolve(cfg: Any, root: str | os.PathLike | None) -> dict:
    """A composed Hydra config as a plain dict, interpolations resolved against the config root
    ``root`` (``${step_size:SETTING,ARM}`` reads its step_sizes.yaml)."""
    from omegaconf import OmegaConf

    _ROOTS.append(config_dir(root))
    try:
        out = OmegaConf.to_container(cfg, resolve=True)
    finally:
        _ROOTS.pop()
    assert isinstance(out, dict)
    return out


def _register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("step_size"):  # used by conf/baseline/*.yaml
        OmegaConf.register_new_resolver(
            "step_size", lambda setting, arm: step_size(str(setting), str(arm), _ROOTS[-1] if _ROOTS else None)
        )


_register_resolver()


def searchpath(root: Path) -> list[str]:
    """The Hydra override that adds a user folder of options to the built-in tree (none for a
    full config tree), for the config dir ``layers(root)[-1]``."""
    extra = layers(root)[:-1]
    return [f"hydra.searchpath=[{','.join('file://' + str(p) for p in extra)}]"] if extra else []


def _hydra_compose(root: Path, name: str, overrides: Sequence[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(layers(root)[-1]), version_base="1.3"):
            cfg = hydra_compose(name, overrides=[*overrides, *searchpath(root)], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    out = resolve(cfg, root)
    assert isinstance(choices, dict)
    return named(out, choices)


def named(cfg: dict, choices: dict) -> dict:
    """``cfg`` with ``name`` set to the selected option (Hydra's ``runtime.choices``) in the groups
    whose option file leaves it out (a plugin's file of a user folder need not repeat it)."""
    for g in ALL_GROUPS:
        if isinstance(cfg.get(g), dict) and "name" not in cfg[g] and choices.get(g):
            cfg[g] = {"name": choices[g], **cfg[g]}
    return cfg


def override_key(override: str) -> str:
    """The key of an override ``[+|++|~]key=value``, without its prefix."""
    return override.partition("=")[0].lstrip("+~")


# presets (``# @package _global_``): tuned method arms (conf/config.yaml declares ``baseline: null``,
# so ``baseline=ARM`` picks one; ``+baseline=ARM`` is the same) and sweep presets (``+experiment=``)
PRESETS = ("baseline", "experiment")


def canonical(overrides: Sequence[str]) -> list[str]:
    """The overrides as Hydra takes them: ``+baseline=ARM`` / ``++baseline=ARM`` (the spelling from
    before conf/config.yaml declared ``baseline: null``) become ``baseline=ARM``."""
    return [re.sub(r"^\+{1,2}(?=baseline=)", "", ov) for ov in overrides]


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
        if key == "experiment" and not ov.startswith("+"):
            raise ConfigError(key, value, f"+{key}={value}", f"a {key} preset is added with +")
        if (
            key in ALL_GROUPS + PRESETS
            and value
            and "," not in value
            and not value.startswith(("[", "{", "$"))
            and value not in options(key, root)
        ):
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
        others = {o: group_keys(group, o, root) for o in options(group, root) if o != name}
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
        if TARGET in (cfg.get(group) or {}):  # a plugin: its keys are its __init__'s, added with +
            hint = f"a key of its _target_ class is added with +{dotted}={value}"
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
    for g in (g for g in ALL_GROUPS if isinstance(cfg.get(g), dict) and TARGET not in cfg[g]):
        # (a _target_ group's keys are checked against its class's __init__ when it is built)
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


def validate(cfg: dict, root: str | os.PathLike | None = None) -> dict:
    """Check the top-level keys, ``optim``/``network``, and the group keys against the option files
    of the config root ``root`` (None: the default root); components check their own groups."""
    for g in GROUPS:
        if not isinstance(cfg.get(g), dict) or "name" not in cfg[g]:
            raise ConfigError(g, cfg.get(g), "an option of conf/" + g, "missing group")
    _check_declared(cfg, Path(root) if root else None)
    for key, lo in (("devices", 1), ("iters", 0), ("seed", 0), ("seeds", 1), ("eval_every", 1)):
        need_int(key, cfg.get(key), lo)
    need_int("batch_size", cfg.get("batch_size"), 1, none=True)
    need_choice("precision", cfg.get("precision"), PRECISIONS)
    need_choice("device", cfg.get("device"), DEVICES)
    need_choice("runtime", cfg["runtime"]["name"], RUNTIMES)
    if cfg["runtime"]["name"] == "torch_distributed":
        from cocoef_cli.distributed.options import RuntimeOptions

        RuntimeOptions.from_config(cfg)  # validates runtime.* (nothing is started)
    optim = cfg["optim"]
    need_num("optim.lr", optim.get("lr"), 0, lo_open=True)
    from cocoef_cli.sim.engine import SCHEDULES

    need_choice("optim.schedule", optim.get("schedule", "const"), SCHEDULES)
    need_num("optim.momentum", optim.get("momentum", 0.0), 0, 1, hi_open=True)
    if optim.get("schedule") == "step":
        need_int("optim.step_size", optim.get("step_size"), 1)
        need_num("optim.gamma", optim.get("gamma"), 0, 1, lo_open=True)
    need_num("network.bandwidth_bps", cfg["network"].get("bandwidth_bps"), 0, lo_open=True, none=True, finite=False)
    need_num("diverge_factor", cfg.get("diverge_factor"), 1, lo_open=True, none=True)
    need_int("checkpoint_every", cfg.get("checkpoint_every"), 1, none=True)
    if cfg.get("threads") != "auto":
        need_int(
            "threads",
            cfg.get("threads"),
            1,
            none=True,
            accepted="auto or integers ≥ 1 (torch CPU threads inside a run)",
        )
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


# group keys that no component validates itself: their check (key, value) → value
GROUP_RULES: dict[str, Callable[[str, Any], Any]] = {
    "dataset.seed": partial(need_int, lo=0),
    "dataset.noise": partial(need_num, lo=0),
    "dataset.standardize": need_bool,
    "model.l2": partial(need_num, lo=0),
    "model.bias": need_bool,
    "model.init_scale": partial(need_num, lo=0),
    "method.allow_biased": need_bool,
}
# group keys whose YAML default is a number but that also take a string (checked by their component)
_STRING_OK = ("straggler.deadline", "compressor.index_bits")


def _option_defaults(group: str, name: Any, root: Path | None) -> dict:
    """The keys of ``conf/<group>/<name>.yaml`` (its defaults), {} when there is no such file."""
    try:
        import yaml

        path = option_path(group, name, root)  # group ".": the root config
        # libyaml's parser where PyYAML has it (≈ 10× faster: a run reads some 20 option files)
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if path else None
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, ConfigError):
        return {}


def validate_groups(cfg: dict, root: Path | None = None) -> None:
    """:data:`GROUP_RULES`, then every group key against the type of its YAML default (a boolean
    default takes a boolean, a number default a number)."""
    for dotted, rule in GROUP_RULES.items():
        group, key = dotted.split(".", 1)
        if key in cfg.get(group, {}):
            rule(dotted, cfg[group][key])
    for group in (g for g in ALL_GROUPS if isinstance(cfg.get(g), dict)):
        for key, default in _option_defaults(group, cfg[group].get("name"), root).items():
            dotted, v = f"{group}.{key}", cfg[group].get(key)
            if key == "name" or v is None or default is None or dotted in _STRING_OK or dotted in GROUP_RULES:
                continue
            if isinstance(default, bool):
                need_bool(dotted, v)
            elif isinstance(default, (int, float)):
                need_num(dotted, v, finite=False, accepted="numbers" if isinstance(default, float) else "integers")


def check(cfg: dict, root: str | os.PathLike | None) -> dict:
    """The whole schema before any work (:func:`checked`). Returns ``cfg``."""
    return checked(cfg, root)[0]


def checked(cfg: dict, root: str | os.PathLike | None) -> tuple[dict, tuple[dict | None, list[str]]]:
    """The whole schema before any work: :func:`validate` against the config root ``root`` the
    config was composed from (None: the default root), then every component's own validator as
    the run assembles it, at the smallest size (:func:`cocoef_cli.sim.engine.assemble`: one
    replicate, one device of method state). Needs the dataset (for D and its files; loaded once
    per process, the run's build reuses it), nothing else heavy. Prints the audit's warnings (one
    line each, the run goes on). Returns (``cfg``, the audit of replicate 0:
    :func:`cocoef_cli.sim.audit.audit_parts`), which :func:`cocoef_cli.run.execute` records."""
    from cocoef_cli.sim.audit import audit_parts
    from cocoef_cli.sim.compressors import build_compressor
    from cocoef_cli.sim.engine import assemble, code_and_stragglers

    validate(cfg, root)
    parts = assemble(cfg, smallest=True)
    # groups the method overrides (gc: no compressor; ef_sgd: uncoded; gd: no devices) are still
    # checked as written: a bad value is a typo whether or not this method uses it
    method_cls = type(parts.method)
    if not method_cls.compresses:
        build_compressor(cfg["compressor"], parts.model.D)
    if method_cls.centralized or method_cls.code is not None:
        code_and_stragglers(cfg["code"], cfg["straggler"], int(cfg["devices"]), parts.seeds, parts.dtype)
    report = audit_parts(parts, cfg)
    for line in report[1]:
        print(f"warning: {line}", file=sys.stderr)
    return cfg, report


def load(overrides: Sequence[str] = (), root: str | os.PathLike | None = None) -> dict:
    """compose + validate."""
    return validate(compose(overrides, root), config_dir(root))
