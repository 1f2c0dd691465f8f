"""Run records: atomic ``metrics.csv`` / ``run.json`` writers and the provenance they carry."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pandas (≈ 0.5 s to import) only where a DataFrame is asked for
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


class Table:
    """Metrics rows as named numpy columns of one length: what the simulator records and
    ``metrics.csv`` holds, without pandas on the run's path. Columns follow pandas 3's types:
    float32/float64 and int64 arrays, ``object`` arrays for text, None and mixed columns (as
    ``pd.concat`` makes them), so :meth:`frame` is the DataFrame and :meth:`to_csv` is
    ``frame().to_csv(index=False)``, byte for byte."""

    def __init__(self, columns: Mapping[str, np.ndarray]):
        self.columns: dict[str, np.ndarray] = dict(columns)
        lengths = {len(a) for a in self.columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: {sorted(lengths)}")

    @classmethod
    def of(cls, values: Mapping[str, Any], n: int) -> Table:
        """A table of n rows: numpy arrays (or tensors: ``.numpy()`` of a CPU copy) as they are,
        lists as a column, anything else repeated n times."""
        cols = {}
        for k, v in values.items():
            if hasattr(v, "detach"):
                v = v.detach().cpu().numpy()
            if isinstance(v, np.generic):  # a numpy scalar keeps its type, as pandas keeps it
                v = np.full(n, v)
            cols[k] = v if isinstance(v, np.ndarray) else _column(v if isinstance(v, list) else [v] * n)
        return cls(cols)

    @classmethod
    def from_rows(cls, rows: Table | pd.DataFrame) -> Table:
        """A Table as it is; a DataFrame's columns as numpy arrays (a checkpoint of an older release)."""
        if isinstance(rows, Table):
            return rows
        return cls({str(c): rows[c].to_numpy() for c in rows.columns})

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns

    def floats(self, name: str) -> np.ndarray:
        """A column as float64 (None and text as NaN)."""
        a = self.columns[name]
        if a.dtype.kind == "O":
            return np.array([v if isinstance(v, int | float | np.number) else np.nan for v in a.tolist()], np.float64)
        return a.astype(np.float64)

    def last_rows(self) -> Table:
        """The last evaluated row of every seed (its largest ``iter``; a diverged seed's last
        finite evaluation): :func:`final_rows` of one run."""
        seed, it = self.columns["seed"].tolist(), self.columns["iter"].tolist()
        last: dict[Any, Any] = {}
        for s, t in zip(seed, it):
            last[s] = max(last.get(s, t), t)
        return self.take(np.array([last[s] == t for s, t in zip(seed, it)], dtype=bool))

    def take(self, rows: np.ndarray) -> Table:
        """The rows a boolean mask or an index array selects, in that order."""
        return Table({k: a[rows] for k, a in self.columns.items()})

    def select(self, names: Sequence[str]) -> Table:
        return Table({k: self.columns[k] for k in names})

    def with_constant(self, name: str, value: Any) -> Table:
        """This table with a column of ``value`` on every row (replaced when it exists)."""
        return Table({**self.columns, name: _column([value] * len(self))})

    def sorted_by(self, keys: Sequence[str]) -> Table:
        """Rows ordered by the keys (the first key first), equal keys in their order (stable)."""
        return self.take(np.lexsort([self.columns[k] for k in reversed(keys)]))

    @staticmethod
    def concat(tables: Sequence[Table]) -> Table:
        """The rows of each table in turn (same columns); a column whose types differ is widened
        as pandas 3's ``pd.concat`` widens it: numbers to their common type (bools among integers
        too), anything else mixed to ``object``. An empty table adds no row, and (unlike pandas)
        no type either: the simulator's empty evaluations (every replicate diverged) have the
        types of the others."""
        rows = [t for t in tables if len(t)] or list(tables[:1])  # an empty table adds no row, nor a type
        out = {}
        for k in tables[0].columns:
            parts = [t.columns[k] for t in rows]
            kinds = {a.dtype.kind for a in parts}
            if len({a.dtype for a in parts}) > 1 and not (kinds <= set("iuf") or kinds <= set("biu")):
                parts = [a.astype(object) for a in parts]
            out[k] = np.concatenate(parts)
        return Table(out)

    def frame(self) -> pd.DataFrame:
        """The rows as a pandas DataFrame (pandas imported here)."""
        import pandas as pd

        return pd.DataFrame(self.columns)

    def to_csv(self) -> str:
        """The CSV text pandas' ``to_csv(index=False)`` writes for :meth:`frame`: floats in their
        shortest round-trip form of their own precision, NaN and None empty, minimal quoting."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator=os.linesep, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(list(self.columns))
        writer.writerows(zip(*(_cells(a) for a in self.columns.values())))
        return buf.getvalue()


def nanmean(a: np.ndarray) -> float:
    """The mean of the entries that are not NaN (NaN when there are none), as pandas' mean."""
    kept = a[~np.isnan(a)]
    return float(kept.mean()) if len(kept) else math.nan


def _column(values: list) -> np.ndarray:
    """A list as pandas types it: bools, integers and floats (None as NaN among numbers) as numpy
    numbers; text, None alone and anything else as ``object``."""
    kinds = {type(v) for v in values}
    if kinds and kinds <= {bool}:
        return np.array(values, dtype=bool)
    if kinds and kinds <= {int}:
        return np.array(values, dtype=np.int64)
    if kinds and kinds <= {int, float, type(None)} and kinds & {int, float}:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    a = np.empty(len(values), dtype=object)
    a[:] = values
    return a


def _cells(a: np.ndarray) -> list[str]:
    """One column's CSV fields, as pandas formats them."""
    if a.dtype.kind == "f":
        text = a.astype(str)
        text[np.isnan(a)] = ""
        return text.tolist()
    if a.dtype.kind == "O":
        return ["" if v is None or (isinstance(v, float | np.floating) and v != v) else str(v) for v in a.tolist()]
    return a.astype(str).tolist()


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


def write_run(out: Path, metrics: Table | pd.DataFrame | None, record: dict[str, Any]) -> None:
    """Write ``metrics.csv`` (if any) then ``run.json`` (last: its presence marks the run done)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        atomic_write(
            out / "metrics.csv", metrics.to_csv() if isinstance(metrics, Table) else metrics.to_csv(index=False)
        )
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
