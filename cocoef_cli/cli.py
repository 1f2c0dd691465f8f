"""The ``cocoef`` command line (Typer). Exit status: 0 success, 2 bad input, 1 a failed run."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from cocoef_cli.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="COCO-EF: biased compression with error feedback in gradient coding — simulate, sweep, report.")

OverridesArg = typer.Argument(None, help="Hydra overrides, e.g. method=coco compressor.ratio=0.05 straggler.p=0.3")
ConfigDirOpt = typer.Option(None, "--config-dir", envvar="COCOEF_CONFIG_DIR", help="Config root (default: conf/).")


def clean_errors(fn: Callable) -> Callable:
    """Bad input → one line on stderr, exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    return wrapper


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.4g}"


@app.command()
@clean_errors
def run(overrides: Optional[List[str]] = OverridesArg,
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: runs/<run_id>)."),
        config_dir: Optional[Path] = ConfigDirOpt,
        force: bool = typer.Option(False, "--force", help="Overwrite a finished run in --out."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")) -> None:
    """One run (all its seeds): writes OUT/metrics.csv and OUT/run.json."""
    from cocoef_cli import config
    from cocoef_cli.record import run_id
    from cocoef_cli.run import check_out_dir, execute

    cfg = config.load(overrides or [], config_dir)
    out = out or Path("runs") / run_id(cfg)
    check_out_dir(out, force)
    try:
        exp, res = execute(cfg, out, progress=not quiet)
    except ConfigError:
        raise
    except Exception as e:  # a run that failed: one line, exit 1, run.json says failed
        typer.echo(f"run failed: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1)
    last = res.metrics.groupby("seed").tail(1)
    lab = exp.labels
    parts = [f"{lab['method']} | code={lab['code']} d={lab['d']} | {lab['compressor']} | {lab['straggler']} p={lab['p']:.3g}",
             f"{len(exp.seeds)} seed(s), {int(cfg['iters'])} iters: train_loss {_fmt(last.train_loss.mean())}"]
    if last.opt_gap.notna().any():
        parts.append(f"gap {_fmt(last.opt_gap.mean())}")
    if last.test_acc.notna().any():
        parts.append(f"test_acc {_fmt(last.test_acc.mean())}")
    if last.bits_up.notna().any():
        parts.append(f"bits {_fmt(float(last.bits_up.mean()))}")
    typer.echo(", ".join(parts) + f" [{res.status}, {res.wall_s:.1f}s] → {out}/metrics.csv")
    if res.status != "completed":
        typer.echo(f"diverged (seed: iteration): {res.diverged}", err=True)


KINDS = ("codes", "compressors", "methods", "stragglers", "datasets", "models", "experiments")


@app.command("list")
@clean_errors
def list_(kind: Optional[str] = typer.Argument(None, help="One of: " + ", ".join(KINDS)),
          config_dir: Optional[Path] = ConfigDirOpt) -> None:
    """List the registered components and the sweep presets (name and one-line description)."""
    if kind is not None and kind not in KINDS:
        raise ConfigError("kind", kind, KINDS, "unknown kind")
    if kind == "experiments":  # no torch import needed
        regs: dict = {}
    else:
        from cocoef_cli.data import DATASETS
        from cocoef_cli.models import MODELS
        from cocoef_cli.sim.codes import CODES
        from cocoef_cli.sim.compressors import COMPRESSORS
        from cocoef_cli.sim.methods import METHODS
        from cocoef_cli.sim.stragglers import STRAGGLERS

        regs = {k: r.describe() for k, r in zip(KINDS, (CODES, COMPRESSORS, METHODS, STRAGGLERS, DATASETS, MODELS))}
    if kind in (None, "experiments"):
        from cocoef_cli import config
        from cocoef_cli.sweep import experiments

        regs["experiments"] = experiments(config.config_dir(config_dir))
    for k in [kind] if kind else KINDS:
        typer.echo(f"{k}:")
        for name, doc in regs[k]:
            typer.echo(f"  {name:<18} {doc}")


@app.command()
@clean_errors
def sweep(experiment: str = typer.Argument(..., help="A preset of conf/experiment/ (see `cocoef list experiments`)."),
          overrides: Optional[List[str]] = typer.Argument(None, help="Hydra overrides and sweeps, e.g. "
                                                          "straggler.p=0.1,0.3 seed=range(0,3) hydra.launcher.partition=gpu"),
          out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder (default: runs/sweeps/EXPERIMENT)."),
          launcher: str = typer.Option("joblib", "--launcher", "-l",
                                       help="basic | joblib (local processes) | submitit_local | submitit_slurm | ray"),
          jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel jobs (joblib: n_jobs, default all "
                                             "cores; submitit_slurm: array_parallelism)."),
          config_dir: Optional[Path] = ConfigDirOpt,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table.")) -> None:
    """A Hydra multirun of a preset: one folder per job (metrics.csv, run.json) and OUT/index.csv.
    Resumable: rerunning on the same --out skips finished jobs and reruns failed or missing ones."""
    from cocoef_cli.sweep import SweepError, run_sweep, summary

    try:
        res = run_sweep(experiment, overrides or [], out, launcher, jobs, config_dir, quiet=quiet,
                        echo=(lambda m: None) if quiet else typer.echo)
    except SweepError as e:
        typer.echo(f"sweep failed: {e}", err=True)
        raise typer.Exit(1)
    counts = res.index["status"].value_counts().to_dict()
    if not quiet:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
            typer.echo(summary(res.out, res.index).to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    typer.echo(f"{len(res.jobs)} job(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
               + f" ({res.skipped} skipped as already done) in {res.wall_s:.1f}s → {res.out}/index.csv")
    if not res.ok:
        bad = res.index[~res.index["status"].isin(("completed", "diverged"))]
        typer.echo("failed or missing jobs (rerun the same command to retry): " + ", ".join(bad["job"]), err=True)
        raise typer.Exit(1)


@app.command("check-code")
@clean_errors
def check_code(overrides: Optional[List[str]] = OverridesArg, config_dir: Optional[Path] = ConfigDirOpt,
               max_patterns: int = typer.Option(5000, help="Enumerate up to this many straggler sets, else sample.")) -> None:
    """Decode every straggler set of size ≤ d−1 (or a sample) and print the worst residual ‖aᵀB_F − 1ᵀ‖."""
    from cocoef_cli import config
    from cocoef_cli.run import code_residuals

    cfg = config.load(overrides or [], config_dir)
    rep = code_residuals(cfg, max_patterns)
    typer.echo(f"code={rep['code']} devices={rep['M']} partitions={rep['N']} d={rep['d']} decode={rep['decode']}")
    typer.echo(f"straggler sets of size 0..{rep['d'] - 1}: {rep['checked']} {'enumerated' if rep['exhaustive'] else 'sampled'}")
    typer.echo(f"worst decoding residual: {rep['worst']:.3e}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
