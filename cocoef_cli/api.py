"""The Python API, for notebooks: the CLI's runs and sweeps as pandas DataFrames.

``run`` goes through exactly what ``cocoef run`` does (compose, check, threads resolved as the
CLI resolves them, the run's metrics.csv and run.json written), then reads the two files back, so
``run(...).metrics`` has the rows and values of the CLI's metrics.csv for the same config.
Overrides are a list (``["method=coco_ef", "straggler.p=0.3"]``) or a dict
(``{"method": "coco_ef", "straggler.p": 0.3}``; a nested dict ``{"straggler": {"p": 0.3}}`` is the
same as its dotted keys). Bad input raises :class:`~cocoef_cli.errors.ConfigError` (the CLI's
one-line message) before any work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["Result", "load_runs", "overrides_of", "run", "sweep"]


@dataclass
class Result:
    """One run: ``metrics`` (metrics.csv as a DataFrame), ``record`` (run.json as a dict) and the
    folder ``out`` they were written to (None when the run went to a temporary folder)."""

    metrics: pd.DataFrame
    record: dict[str, Any]
    out: Path | None

    @property
    def run_id(self) -> str:
        return self.record["run_id"]


def _value(v: Any) -> str:
    """A Python value as a Hydra override value: null, true, 0.3, [64, 32], text."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def overrides_of(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """The override list of a list, or of a (nested) dict of keys → values."""
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        if isinstance(overrides, str):
            raise TypeError("overrides: a list of key=value strings or a dict, not one string")
        return [str(o) for o in overrides]
    out: list[str] = []

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={_value(v)}")

    walk(overrides, "")
    return out


def run(
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Result:
    """``cocoef run OVERRIDES [--out OUT] [--config-dir DIR] [--force]`` → :class:`Result`.

    ``out=None``: a temporary folder, removed afterwards (nothing stays on disk). With ``out``, a
    finished run of the same config there is read back, not rerun (as the CLI), unless ``force``.
    A run that fails raises its exception (run.json in ``out`` says ``failed``)."""
    from cocoef_cli import config
    from cocoef_cli.record import read_record, run_id
    from cocoef_cli.run import already_done, check_out_dir, execute

    cfg = config.check(config.compose(overrides_of(overrides), config_dir), config_dir)
    rid = run_id(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="cocoef-api-")) if out is None else None
    folder = tmp / "run" if tmp is not None else Path(str(out))
    try:
        if tmp is not None or force or already_done(folder, rid) is None:
            saved = check_out_dir(folder, force, rid) if tmp is None else None
            execute(cfg, folder, progress=False, resume=saved or False)
        metrics = pd.read_csv(folder / "metrics.csv")
        return Result(metrics, read_record(folder), None if tmp else folder)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def sweep(
    experiment: str = "none",
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    launcher: str = "joblib",
    jobs: int | None = None,
    config_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> pd.DataFrame:
    """``cocoef sweep EXPERIMENT OVERRIDES`` (``none``: the root config swept by the overrides, e.g.
    ``["straggler.p=0.1,0.3"]``) → every metrics row of every job, as :func:`load_runs`.

    ``out=None``: a temporary folder, removed afterwards. Raises
    :class:`~cocoef_cli.sweep.SweepError` when the launch itself fails; a failed job is a row-less
    run whose ``status`` the returned frame's ``attrs["runs"]`` (one row per job) shows."""
    from cocoef_cli.sweep import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="cocoef-api-")) if out is None else None
    folder = tmp / "sweep" if tmp is not None else Path(str(out))
    try:
        res = run_sweep(
            experiment,
            overrides_of(overrides),
            folder,
            launcher,
            jobs,
            Path(config_dir) if config_dir else None,
            quiet=True,
            echo=lambda *a, **k: None,
            force=force,
        )
        return load_runs(res.out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_runs(folder: str | os.PathLike) -> pd.DataFrame:
    """Every metrics row of every run under ``folder`` (a run, a sweep, or a folder of them), with
    the columns ``run`` (its folder), ``status`` and the run's flattened config keys; one row per
    run (status, wall_s, config) in ``.attrs["runs"]``."""
    from cocoef_cli.report import load_runs as _load

    rows, runs = _load(Path(folder))
    rows.attrs["runs"] = runs
    return rows
