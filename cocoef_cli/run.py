"""One run end to end: build (validating everything first), simulate, write the records; resume
from a checkpoint; rerun a recorded run and compare."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from cocoef_cli.checks import is_int
from cocoef_cli.errors import ConfigError
from cocoef_cli.record import FINISHED, clean_tmp, nanmean, read_record, run_id, run_record, write_run
from cocoef_cli.sim.engine import RunParts, RunResult, build_experiment, simulate
from cocoef_cli.tracking import open_logger


def check_out_dir(out: Path, force: bool, rid: str | None = None) -> dict[str, Any] | None:
    """Refuse, before any work and unless ``force``: a folder holding a finished run (``completed``
    or ``diverged``), or a checkpoint of another run (``rid`` given). A ``failed`` run is replaced.
    Returns the checkpoint of run ``rid`` in ``out`` (read once, for :func:`execute` to resume
    from), else None."""
    if force:
        return None
    out = Path(out)
    status = read_record(out).get("status")  # None when there is no (readable) run.json
    if status is not None and status != "failed":
        raise ConfigError("--out", str(out), "a new or empty folder, or --force", f"holds a finished run ({status})")
    if rid is None:
        return None
    from cocoef_cli import checkpoint

    ck = checkpoint.read(out / checkpoint.FILENAME)
    if ck is not None and ck.get("run_id") != rid:
        raise ConfigError(
            "--out",
            str(out),
            "the folder of the same run (same config) to resume it, another folder, or --force",
            f"holds a checkpoint of another run ({ck.get('run_id')})",
        )
    return ck


def already_done(out: Path, rid: str) -> dict[str, Any] | None:
    """The record in ``out`` when it is a finished run (``completed`` or ``diverged``:
    deterministic, rerunning gives the same) of run ``rid``, else None."""
    rec = read_record(Path(out))
    return rec if rec.get("status") in FINISHED and rec.get("run_id") == rid else None


AUTO_THREADS_MIN_WORK = 1 << 18  # R·M·D below this: one thread (a parallel region costs more than it saves)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(cfg: dict, auto: int | None = None, model: Any = None) -> int:
    """torch CPU threads of the run ``cfg``: ``threads`` when it is an integer; ``auto`` (the
    default): ``auto`` when given (sweeps: 1 per worker), else the usable cores when the state
    per update R·M·D reaches ``AUTO_THREADS_MIN_WORK`` values, else 1. A function of the config
    and the machine only, so a run is reproducible on that machine (run.json records the count).
    ``model``: the run's model (its D), built here when needed and not given."""
    n = cfg.get("threads")
    if is_int(n):
        return n
    if auto is not None:
        return auto
    if model is None:
        from cocoef_cli.data import load_dataset
        from cocoef_cli.models import build_model

        model = build_model(cfg["model"], load_dataset(cfg["dataset"]))
    work = int(cfg["seeds"]) * int(cfg["devices"]) * model.D
    return usable_cores() if work >= AUTO_THREADS_MIN_WORK else 1


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """torch CPU threads = ``n`` inside a run (float reductions, e.g. matrix products, can depend
    on the thread count; pinning it makes metrics.csv byte-identical whichever launcher runs it)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(
    cfg: dict,
    out: Path | None,
    progress: bool = False,
    resume: bool | dict[str, Any] = True,
    threads: int | None = None,
    audit: tuple[dict[str, Any] | None, list[str]] | None = None,
) -> tuple[RunParts, RunResult]:
    """Build the experiment (may raise ConfigError: nothing is written then), simulate all
    replicates, and, with ``out``, write ``metrics.csv`` and ``run.json`` atomically.

    With ``out`` and the simulator runtime, ``checkpoint_every`` = K saves ``OUT/checkpoint.pt``
    every K updates, and a checkpoint of the same run already in ``OUT`` is resumed from (``resume``
    true; a dict: that checkpoint, already read by :func:`check_out_dir`; false: start afresh);
    the checkpoint is removed once ``run.json`` is written. ``threads``: what ``threads=auto``
    means here (see :func:`resolve_threads`; ``run.json`` records the count used). ``audit``: the
    code audit of replicate 0 that :func:`cocoef_cli.config.checked` measured, recorded in
    ``run.json`` (measured here when not given)."""
    from cocoef_cli.data import load_dataset
    from cocoef_cli.models import build_model

    model = build_model(cfg["model"], load_dataset(cfg["dataset"]))  # its D sizes threads=auto; the build reuses it
    n_threads = resolve_threads(cfg, threads, model)
    with pinned_threads(n_threads):
        exp = build_experiment(cfg, model)
        rid = run_id(cfg)
        T = int(cfg["iters"])
        runner: Callable[..., RunResult] = simulate
        kwargs: dict[str, Any] = {}
        ckpt = None
        if cfg["runtime"]["name"] == "torch_distributed":  # docs/design.md §10: M device processes + a server
            from cocoef_cli.distributed import run_distributed as runner
        elif out is not None:
            from cocoef_cli.checkpoint import FILENAME, Checkpoint

            Path(out).mkdir(parents=True, exist_ok=True)
            clean_tmp(Path(out))
            if cfg.get("checkpoint_every") or (Path(out) / FILENAME).exists():
                ckpt = Checkpoint(Path(out) / FILENAME, cfg.get("checkpoint_every"), rid, resume=resume)
                kwargs["checkpoint"] = ckpt
        bar = _progress(progress, f"{cfg['method']['name']} [{len(exp.seeds)} seed(s)]", T)
        logger = open_logger(cfg, out, rid)  # logger=none (the default): the record only

        def on_record(frame: Any) -> None:  # each evaluation, as it is recorded
            logger.log(frame)
            if bar:
                bar.update(bar.task_ids[0], live=_live(frame))

        if runner is simulate:
            kwargs["on_record"] = on_record
        t0 = time.perf_counter()
        try:
            with bar or nullcontext():
                result = runner(
                    exp, rid, progress=(lambda t: bar.update(bar.task_ids[0], completed=t)) if bar else None, **kwargs
                )
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if out is not None:
                write_run(
                    out,
                    None,
                    run_record(cfg, "failed", time.perf_counter() - t0, run_id=rid, threads=n_threads, error=error),
                )
            logger.close("failed", None, error)
            raise
        if out is not None:
            extra: dict[str, Any] = {
                "run_id": rid,
                "threads": n_threads,
                "f_star": exp.f_star,
                "bits_per_message": exp.bits_per_message,
            }
            if result.runtime is not None:
                extra["runtime"] = result.runtime
            # per seed: the update at which it diverged (empty when none did); report marks these
            extra["diverged"] = {str(k): v for k, v in result.diverged.items()}
            if ckpt is not None and ckpt.resumed_from is not None:
                extra["resumed_from"] = ckpt.resumed_from
            if audit is None:
                from cocoef_cli.sim.audit import audit_run

                audit = audit_run(cfg)
            extra["code_conditioning"], extra["warnings"] = audit
            write_run(out, result.rows, run_record(cfg, result.status, result.wall_s, **extra))
            if ckpt is not None:
                ckpt.discard()
        logger.close(result.status, result.rows)
        return exp, result


def rerun(run_dir: Path, out: Path | None = None, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Rerun the run recorded in ``run_dir/run.json`` (its resolved config) into ``out`` (default: a
    temporary folder, removed afterwards) and compare ``metrics.csv`` byte for byte.

    Returns ``identical`` (bool, or None when there is nothing recorded to compare), ``rows``,
    ``first_diff`` (1-based line number of the first differing line, or None), the recorded and new
    ``status``, and ``changed`` (the provenance fields that differ: versions, git commit)."""
    import shutil
    import tempfile

    from cocoef_cli import config
    from cocoef_cli.record import git_info, versions

    run_dir = Path(run_dir)
    rec = read_record(run_dir)
    if not rec or not isinstance(rec.get("config"), dict):
        raise ConfigError(
            "RUN_DIR", str(run_dir), "a run folder holding run.json (written by cocoef run/sweep)", "no run record"
        )
    cfg, audit = config.checked(rec["config"], None)  # run.json keeps no config root: the default one
    tmp = None
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="cocoef-rerun-"))
        target = tmp / "run"
    else:
        target = Path(out)
        if target.resolve() == run_dir.resolve():
            raise ConfigError("--out", str(out), "another folder than RUN_DIR", "would overwrite the recorded run")
        check_out_dir(target, force, run_id(cfg))
    try:
        _, res = execute(cfg, target, progress=progress, resume=False, threads=rec.get("threads"), audit=audit)
        old, new = run_dir / "metrics.csv", target / "metrics.csv"
        first = None
        identical: bool | None = None
        if old.exists():
            a, b = old.read_bytes(), new.read_bytes()
            identical = a == b
            if not identical:
                la, lb = a.splitlines(), b.splitlines()
                first = next((i + 1 for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)) + 1)
        changed: dict[str, str] = {}
        now = versions()
        if rec.get("versions") and rec["versions"] != now:
            changed["versions"] = ", ".join(
                f"{k} {rec['versions'].get(k)} → {v}" for k, v in now.items() if rec["versions"].get(k) != v
            )
        old_git, git_now = rec.get("git") or {}, git_info() or {}
        if old_git.get("commit") != git_now.get("commit"):
            changed["git commit"] = f"{old_git.get('commit')} → {git_now.get('commit')}"
        if old_git.get("dirty") or git_now.get("dirty"):
            changed["git dirty"] = f"recorded {old_git.get('dirty')}, now {git_now.get('dirty')} (uncommitted changes)"
        return {
            "identical": identical,
            "rows": len(res.metrics),
            "first_diff": first,
            "recorded_status": rec.get("status"),
            "status": res.status,
            "changed": changed,
            "out": None if tmp else str(target),
            "recorded_run_id": rec.get("run_id"),
            "run_id": run_id(cfg),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _progress(enabled: bool, label: str, total: int):
    """A Rich progress bar on stderr when it is a terminal; None otherwise."""
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[live]}"),
        console=Console(stderr=True),
        transient=True,
    )
    p.add_task(label, total=total, live="")
    return p


def _live(frame: Any) -> str:
    """The latest evaluation for the progress bar: train loss (and test accuracy where there is
    one), mean over the replicates still running."""
    if not len(frame):
        return "diverged"
    text = f"train_loss {nanmean(frame.floats('train_loss')):.4g}"
    acc = frame.floats("test_acc") if "test_acc" in frame else np.full(1, np.nan)
    if not np.isnan(acc).all():
        text += f"  test_acc {nanmean(acc):.3f}"
    return text


def code_conditioning(cfg: dict, max_patterns: int = 5000) -> dict:
    """The configured code (first seed) measured by :func:`cocoef_cli.sim.audit.code_report`:
    decoding codes over every straggler set of size ≤ d−1 (all of them when there are at most
    ``max_patterns``, else a seeded sample of sizes and sets), fixed-weight codes over
    ``max_patterns`` straggler draws (at most 1000)."""
    import torch

    from cocoef_cli.sim.audit import code_report
    from cocoef_cli.sim.engine import code_and_stragglers

    seeds = [int(cfg["seed"])]
    code, _ = code_and_stragglers(cfg["code"], cfg["straggler"], int(cfg["devices"]), seeds, torch.float64)
    return code_report(
        code, cfg["code"], cfg["straggler"], seeds, max_patterns if not code.fixed_weights else min(max_patterns, 1000)
    )
