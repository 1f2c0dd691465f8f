"""What the CLI says about its own configuration: ``cocoef list`` and ``cocoef show``.

An *option* is a YAML file ``conf/<group>/<option>.yaml`` (so plugins of a user's config folder are
options too); its ``name`` key names the component of the group's registry that it configures.
Its one-line description is the file's leading comment, else the first paragraph of the
component's docstring; ``show`` prints every key with its default, type and the comment beside it
(where the accepted values are documented), then the component's whole docstring (its math).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from cocoef_cli import config
from cocoef_cli.errors import ConfigError
from cocoef_cli.registry import TARGET, Registry, import_target, summary

# `cocoef list` also takes the plural of a group (codes, compressors, ...)
LISTABLE = (*config.ALL_GROUPS, *config.PRESETS)
PLURAL = {g: g + "s" for g in LISTABLE}  # the headers of `cocoef list`
_GROUP_OF = {p: g for g, p in PLURAL.items()}
_KEY_LINE = re.compile(r"^([A-Za-z_][\w]*):\s*(.*?)\s*(?:#\s?(.*))?$")


def registry(group: str) -> Any:
    """The component registry of ``group`` (None for groups without one: optim, network, presets)."""
    reg: Registry[Any]
    if group == "code":
        from cocoef_cli.sim.codes import CODES as reg
    elif group == "compressor":
        from cocoef_cli.sim.compressors import COMPRESSORS as reg
    elif group == "method":
        from cocoef_cli.sim.methods import METHODS as reg
    elif group == "straggler":
        from cocoef_cli.sim.stragglers import STRAGGLERS as reg
    elif group == "dataset":
        from cocoef_cli.data import DATASETS as reg
    elif group == "model":
        from cocoef_cli.models import MODELS as reg
    elif group == "logger":
        from cocoef_cli.tracking import LOGGERS as reg
    else:
        return None
    return reg


def group_of(kind: str) -> str:
    """``kind`` as a group name (singular or plural); ConfigError naming the groups otherwise."""
    group = _GROUP_OF.get(kind, kind)
    if group not in LISTABLE:
        raise ConfigError("GROUP", kind, LISTABLE, "unknown group")
    return group


def _comments(path: Path) -> tuple[str, dict[str, str]]:
    """(leading comment of the file, joined; {top-level key: the comment beside it, with its
    indented continuation lines})."""
    head: list[str] = []
    keys: dict[str, str] = {}
    last = None
    for line in path.read_text().splitlines():
        s = line.strip()
        if not keys and last is None and s.startswith("#"):
            if "@package" not in s:
                head.append(s.lstrip("#").strip())
            continue
        m = _KEY_LINE.match(line)
        if m:
            last = m.group(1)
            keys[last] = (m.group(3) or "").strip()
        elif last and line[:1].isspace() and s.startswith("#"):
            keys[last] = (keys[last] + " " + s.lstrip("#").strip()).strip()
        elif s:
            last = None if not line[:1].isspace() else last
    return " ".join(head), keys


def describe(group: str, option: str, root: Path | None = None) -> str:
    """One line: the option file's leading comment, else its component's docstring summary, else
    the comment beside its ``name`` key."""
    path = config.option_path(group, option, root)
    head, keys = _comments(path) if path else ("", {})
    if head:
        return head
    values = config._option_defaults(group, option, root)
    reg, name = registry(group), values.get("name", option)
    if values.get(TARGET):  # a plugin: its class's docstring
        try:
            return summary(import_target(f"{group}.{TARGET}", values[TARGET])) or values[TARGET]
        except ConfigError as e:
            return f"{values[TARGET]} ({e.reason})"
    if reg is not None and name in reg:
        return summary(reg.get(name))
    return keys.get("name", "")


def listing(group: str, root: Path | None = None) -> list[tuple[str, str]]:
    """(option, description) of every option of ``group``: registered components in registration
    order, then the other files (plugins) by name."""
    reg = registry(group)
    order = {n: i for i, n in enumerate(reg.names())} if reg is not None else {}
    opts = config.options(group, root)
    opts.sort(key=lambda o: (order.get(o, len(order)), o))
    return [(o, describe(group, o, root)) for o in opts]


def _type(v: Any) -> str:
    if v is None:
        return "optional"  # null by default; the comment says what it takes
    return {bool: "bool", int: "int", float: "number", str: "string", list: "list", dict: "mapping"}.get(
        type(v), type(v).__name__
    )


def _value(v: Any) -> str:
    """A default as it is written in YAML: null, true, 0.1, [64], log2."""
    import yaml

    return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()


def show(group: str, option: str | None = None, root: Path | None = None) -> str:
    """The text of ``cocoef show GROUP [OPTION]`` (default: the option conf/config.yaml selects)."""
    root = config.config_dir(root)
    opts = config.options(group, root)
    if option is None:
        defaults = config._option_defaults(".", "config", root).get("defaults", [])
        option = next((d[group] for d in defaults if isinstance(d, dict) and group in d), None)
        if option is None:
            raise ConfigError("NAME", None, opts, f"{group} has no default option: name one")
    if option not in opts:
        raise ConfigError(group, option, opts, f"unknown {group}")
    path = config.option_path(group, option, root)
    if path is None:
        raise ConfigError(group, option, opts, f"unknown {group}")
    if group in config.PRESETS:  # a preset: the overrides it applies, as written
        return f"+{group}={option}  ({path})\n{describe(group, option, root)}\n\n" + path.read_text().rstrip()
    values = config._option_defaults(group, option, root)
    _, comments = _comments(path)
    parents = [d for d in values.pop("defaults", []) if isinstance(d, str) and d != "_self_"]
    for parent in parents:  # an option extending another of its group (e.g. code=crc_random): the merged keys
        values = {**config._option_defaults(group, parent, root), **values}
        comments = {**_comments(root / group / f"{parent}.yaml")[1], **{k: c for k, c in comments.items() if c}}
    name = values.get("name", option)
    reg = registry(group)
    doc = inspect.cleandoc(reg.get(name).__doc__ or "") if reg is not None and name in reg else ""
    if values.get(TARGET) and not doc:  # a plugin: its class's docstring, when it imports
        try:
            doc = inspect.cleandoc(import_target(f"{group}.{TARGET}", values[TARGET]).__doc__ or "")
        except ConfigError:
            doc = ""
    head = describe(group, option, root)
    lines = [f"{group}={option}  ({path}" + (f"; component {name})" if name != option else ")")]
    if head and not (doc and head == " ".join(doc.split("\n\n")[0].split())):  # else the docstring starts with it
        lines.append(head)
    lines += [doc, ""] if doc else [""]
    keys = [k for k in values if k != "name"]
    rows = [("key", "default", "type", "accepted values / meaning")]
    rows += [
        (
            f"{group}.{k}",
            _value(values[k]),
            _type(values[k]),
            comments.get(k, ""),
        )
        for k in keys
    ]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}".rstrip() for a, b, c, d in rows] if keys else ["(no keys)"]
    return "\n".join(lines)
