"""Run records: atomic ``metrics.csv`` / ``run.json`` writers and the provenance they carry."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import pandas as pd

#: the leading columns of metrics.csv that label a row (the setting, the seed and the update), not metrics
LABEL_COLUMNS = (
    "run_id",
    "method",
    "code",
    "compressor",
    "straggler",
    "dataset",
    "model",
    "devices",
    "d",
    "p",
    "seed",
    "iter",
)


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write ``text`` (str or bytes) to a temporary file beside ``path``, fsync, then rename (and
    fsync the folder): a reader sees the old file or the complete new one, never a half-written
    file under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        stream: IO[Any] = os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", newline="")
        with stream as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_tmp(folder: Path) -> None:
    """Remove temporary files an interrupted :func:`atomic_write` (SIGKILL) left in ``folder``."""
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def git_info() -> dict[str, Any] | None:
    """Commit and dirty flag of the checkout the package runs from, when it is a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if commit.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import numpy
    import torch

    from cocoef_cli import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cocoef": __version__,
    }


def run_record(config: dict, status: str, wall_s: float, **extra: Any) -> dict[str, Any]:
    """The ``run.json`` payload (docs/design.md §8)."""
    return {
        "config": config,
        "status": status,
        "wall_s": round(float(wall_s), 3),
        "versions": versions(),
        "git": git_info(),
        "command": command_line(),
        **extra,
    }


def command_line() -> str:
    """The command line, with the program named without its folder (no machine path in records)."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog.endswith(".py"):  # python -m cocoef_cli.X: argv[0] is the module's file
        prog = f"python -m cocoef_cli.{prog[:-3]}" if "cocoef_cli" in Path(sys.argv[0]).parts else prog
    return " ".join([prog, *sys.argv[1:]])


def write_run(out: Path, metrics: pd.DataFrame | None, record: dict[str, Any]) -> None:
    """Write ``metrics.csv`` (if any) then ``run.json`` (last: its presence marks the run done)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        atomic_write(out / "metrics.csv", metrics.to_csv(index=False))
    atomic_write(out / "run.json", json.dumps(record, indent=2, default=str) + "\n")


# keys that never change what a run computes: left out of its id (a checkpointed run resumes under the
# same id; a run tracked by a logger is the same run as without; the thread count changes float
# rounding only, and run.json records the count used)
ID_EXCLUDED = ("checkpoint_every", "logger", "threads")
# keys added after runs were recorded: left out of the id at their default, so older ids stay valid
# (dotted keys for group keys; a key whose default changed what runs compute, e.g. code.construction
# or compressor.clip, is not listed: those runs get a new id)
ID_DEFAULTS: dict[str, Any] = {"diverge_factor": 1e6, "code.p_assumed": None, "method.stale_shifts": False}


def run_id(config: dict) -> str:
    """A short stable id of a resolved config (same results-relevant config ⇒ same id)."""
    import hashlib

    keyed = {k: v for k, v in config.items() if k not in ID_EXCLUDED}
    for dotted, default in ID_DEFAULTS.items():
        group, _, key = dotted.rpartition(".")
        node = keyed.get(group) if group else keyed
        if isinstance(node, dict) and key in node and node[key] == default:
            node = {k: v for k, v in node.items() if k != key}
            keyed = node if not group else {**keyed, group: node}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]


def final_rows(rows: pd.DataFrame, by: tuple[str, ...] = ("run", "seed")) -> pd.DataFrame:
    """The last evaluated row of every (run, seed) (the keys of ``by`` the frame has): the row at
    the seed's largest ``iter``. A diverged seed records no row after its divergence, so its final
    row is its last finite evaluation (earlier than the others'), not dropped."""
    keys = [k for k in by if k in rows.columns]
    return rows[rows["iter"] == rows.groupby(keys)["iter"].transform("max")]


FINISHED = ("completed", "diverged")  # deterministic outcomes: never rerun, never overwritten without --force


def read_record(out: Path) -> dict:
    """``OUT/run.json`` as a dict, {} when absent or unreadable."""
    try:
        rec = json.loads((Path(out) / "run.json").read_text())
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys, ``{"optim.lr": 0.2, ...}`` (lists as their text)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)):
        out[prefix[:-1]] = str(list(d))
    else:
        out[prefix[:-1]] = d
    return out


def to_yaml(cfg: Any) -> str:
    """A resolved config as YAML (OmegaConf's layout)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg))
