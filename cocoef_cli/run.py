"""One run end to end: build (validating everything first), simulate, write the records."""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path

from cocoef_cli.errors import ConfigError
from cocoef_cli.record import run_id, run_record, write_run
from cocoef_cli.sim.engine import Experiment, RunResult, build_experiment, simulate


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite a completed run without ``--force`` (checked before any work)."""
    if (Path(out) / "run.json").exists() and not force:
        raise ConfigError("--out", str(out), "a new or empty folder, or --force", "holds a finished run")


def execute(cfg: dict, out: Path | None, progress: bool = False) -> tuple[Experiment, RunResult]:
    """Build the experiment (may raise ConfigError: nothing is written then), simulate all
    replicates, and, with ``out``, write ``metrics.csv`` and ``run.json`` atomically."""
    exp = build_experiment(cfg)
    rid = run_id(cfg)
    T = int(cfg["iters"])
    runner = simulate
    if cfg["runtime"]["name"] == "torch_distributed":  # DESIGN §10: M device processes + a server
        from cocoef_cli.runtime import run_distributed as runner
    bar = _progress(progress, f"{cfg['method']['name']} [{len(exp.seeds)} seed(s)]", T)
    t0 = time.perf_counter()
    try:
        with bar or nullcontext():
            result = runner(exp, rid, progress=(lambda t: bar.update(bar.task_ids[0], completed=t)) if bar else None)
    except Exception as e:
        if out is not None:
            write_run(out, None, run_record(cfg, "failed", time.perf_counter() - t0, run_id=rid,
                                            error=f"{type(e).__name__}: {e}"))
        raise
    if out is not None:
        extra = {"run_id": rid, "f_star": exp.f_star, "bits_per_message": exp.bits_per_message}
        if getattr(result, "runtime", None) is not None:
            extra["runtime"] = result.runtime
        if result.diverged:
            extra["diverged"] = {str(k): v for k, v in result.diverged.items()}
        write_run(out, result.metrics, run_record(cfg, result.status, result.wall_s, **extra))
    return exp, result


def _progress(enabled: bool, label: str, total: int):
    """A Rich progress bar on stderr when it is a terminal; None otherwise."""
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 console=Console(stderr=True), transient=True)
    p.add_task(label, total=total)
    return p


def code_residuals(cfg: dict, max_patterns: int = 5000) -> dict:
    """Worst ‖aᵀB_F − 1ᵀ‖₂ of the configured code over every straggler set of size ≤ d−1
    (all of them when there are at most ``max_patterns``, else a uniform sample of sizes and sets)."""
    import itertools
    import math

    import numpy as np
    import torch

    from cocoef_cli.sim.codes import allocate, build_code
    from cocoef_cli.sim.rng import SeedRNG
    from cocoef_cli.sim.stragglers import build_straggler

    M, seeds = int(cfg["devices"]), [int(cfg["seed"])]
    rng = SeedRNG(seeds, "code")
    S = allocate(cfg["code"], M, rng)
    p = build_straggler(cfg["straggler"], S.sum(-1), SeedRNG(seeds, "straggler")).p
    code = build_code(cfg["code"], S, p, rng, torch.float64)
    sizes = range(min(code.d, M))  # straggler-set sizes 0..d−1 (at least one device answers)
    total = sum(math.comb(M, s) for s in sizes)
    if total <= max_patterns:
        sets = [c for s in sizes for c in itertools.combinations(range(M), s)]
    else:
        gen = np.random.default_rng(0)
        sets = [tuple(gen.choice(M, size=gen.integers(len(sizes)), replace=False)) for _ in range(max_patterns)]
    worst = 0.0
    ones = torch.ones(code.N, dtype=torch.float64)
    for straggling in sets:
        z = torch.ones(1, M, dtype=torch.bool)
        z[0, list(straggling)] = False
        a, _ = code.decode(z)
        worst = max(worst, float((a.double()[0] @ code.B[0].double() - ones).norm()))
    return {"code": code.name, "M": M, "N": code.N, "d": code.d, "decode": getattr(code, "decode_name", ""),
            "checked": len(sets), "exhaustive": total <= max_patterns, "worst": worst}
