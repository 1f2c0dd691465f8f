"""The ``cocoef`` command line (Typer). Exit status: 0 success, 1 a failed run, 2 bad input,
3 a run that diverged (``cocoef run``: its records are written, status ``diverged``)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from cocoef_cli import explain
from cocoef_cli.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="COCO-EF: biased compression with error feedback in gradient coding — simulate, sweep, report.",
)

OverridesArg = typer.Argument(
    None,
    metavar="KEY=VALUE...",
    show_default=False,
    help="Hydra overrides, e.g. method=coco compressor.ratio=0.05 straggler.p=0.3 "
    "(`cocoef show GROUP` lists a group's keys).",
)
ConfigDirOpt = typer.Option(
    None,
    "--config-dir",
    envvar="COCOEF_CONFIG_DIR",
    help="A folder of extra options (<group>/<option>.yaml) added to the package's own conf/ folder; "
    "one holding config.yaml replaces it (docs/plugins.md).",
)


EXIT_DIVERGED = 3  # `cocoef run`: the run finished and diverged (run.json status "diverged")


def clean_errors(fn: Callable) -> Callable:
    """Bad input → one line on stderr, exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e

    return wrapper


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.4g}"


@app.command()
@clean_errors
def run(
    overrides: list[str] | None = OverridesArg,
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: runs/<run_id>)."),
    config_dir: Path | None = ConfigDirOpt,
    force: bool = typer.Option(
        False,
        "--force",
        help="Rerun even when --out holds this finished run; "
        "overwrite a finished run (or the checkpoint) of another config; start afresh "
        "instead of resuming a checkpoint.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved, validated config and its run_id, and write nothing."
    ),
) -> None:
    """One run (all its seeds): writes OUT/metrics.csv and OUT/run.json. With checkpoint_every=K it
    saves OUT/checkpoint.pt every K updates; rerunning the same command resumes from it."""
    import numpy as np

    from cocoef_cli import config
    from cocoef_cli.record import Table, nanmean, run_id, to_yaml
    from cocoef_cli.run import already_done, check_out_dir, execute

    # the whole schema, before any work, against the config root the config was composed from
    cfg, audit = config.checked(config.compose(overrides or [], config_dir), config_dir)
    rid = run_id(cfg)
    out = out or Path("runs") / rid
    if dry_run:
        typer.echo(to_yaml(cfg).rstrip() + f"\n# run_id: {rid}\n# out: {out}")
        return
    done = None if force else already_done(out, rid)
    if done is not None:  # the same config, finished: nothing to do (as a sweep skips it)
        typer.echo(
            f"already done: {out} holds this run ({done['status']}, run_id {rid}); --force reruns it "
            f"→ {out}/metrics.csv"
        )
        if done["status"] == "diverged":  # the same exit status as when it ran
            raise typer.Exit(EXIT_DIVERGED)
        return
    saved = check_out_dir(out, force, rid)  # this run's checkpoint in OUT (None with --force)
    if saved is not None:
        typer.echo(f"resuming from the checkpoint at update {int(saved['t'])} in {out}", err=True)
    try:
        exp, res = execute(cfg, out, progress=not quiet, resume=saved or False, audit=audit)
    except ConfigError:
        raise
    except Exception as e:  # a run that failed: one line, exit 1, run.json says failed
        typer.echo(f"run failed: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from e
    last = Table.from_rows(res.rows).last_rows()
    lab = exp.labels
    parts = [
        f"{lab['method']} | code={lab['code']} d={lab['d']} | {lab['compressor']} | {lab['straggler']} p={lab['p']:.3g}",
        f"{len(exp.seeds)} seed(s), {int(cfg['iters'])} iters: train_loss {_fmt(nanmean(last.floats('train_loss')))}",
    ]
    for column, name in (("opt_gap", "gap"), ("test_acc", "test_acc"), ("bits_up", "bits")):
        values = last.floats(column)
        if not np.isnan(values).all():
            parts.append(f"{name} {_fmt(nanmean(values))}")
    typer.echo(", ".join(parts) + f" [{res.status}, {res.wall_s:.1f}s] → {out}/metrics.csv")
    if res.status == "diverged":
        seeds = ", ".join(f"seed {s} at update {t}" for s, t in sorted(res.diverged.items()))
        typer.echo(f"diverged: {seeds}", err=True)
        raise typer.Exit(EXIT_DIVERGED)


@app.command("list")
@clean_errors
def list_(
    group: str | None = typer.Argument(
        None, help="A config group (singular or plural): " + ", ".join(explain.LISTABLE) + ". Default: all of them."
    ),
    config_dir: Path | None = ConfigDirOpt,
) -> None:
    """List the options of every config group (or one): name and one-line description."""
    groups = [explain.group_of(group)] if group else explain.LISTABLE
    for g in groups:
        typer.echo(f"{explain.PLURAL[g]}:")
        for name, doc in explain.listing(g, config_dir):
            typer.echo(f"  {name:<18} {doc}")


@app.command()
@clean_errors
def show(
    group: str = typer.Argument(..., help="A config group: " + ", ".join(explain.LISTABLE) + "."),
    name: str | None = typer.Argument(
        None, help="One of its options (default: the one conf/config.yaml selects), e.g. topk."
    ),
    config_dir: Path | None = ConfigDirOpt,
) -> None:
    """An option's keys with their defaults, types and accepted values, and the math of its component."""
    typer.echo(explain.show(explain.group_of(group), name, config_dir))


@app.command()
@clean_errors
def sweep(
    experiment: str = typer.Argument(
        ...,
        help="A preset of conf/experiment/ (see `cocoef list experiments`), "
        "or none: the root config, swept by the overrides alone.",
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Hydra overrides and sweeps, e.g. straggler.p=0.1,0.3 seed=range(0,3) hydra.launcher.partition=gpu"
    ),
    out: Path | None = typer.Option(None, "--out", help="Sweep folder (default: runs/sweeps/EXPERIMENT)."),
    launcher: str = typer.Option(
        "joblib", "--launcher", "-l", help="basic | joblib (local processes) | submitit_local | submitit_slurm | ray"
    ),
    jobs: int | None = typer.Option(
        None,
        "--jobs",
        "-j",
        help="Parallel jobs (joblib: n_jobs, default all cores; submitit_slurm: array_parallelism).",
    ),
    config_dir: Path | None = ConfigDirOpt,
    force: bool = typer.Option(
        False, "--force", help="Overwrite job folders holding finished runs of another config (the preset changed)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary table."),
) -> None:
    """A Hydra multirun of a preset: one folder per job (metrics.csv, run.json), named by the keys
    the sweep varies, and OUT/index.csv. Jobs with the same resolved config run once; a baseline=
    arm keeps its own method, compressor and step size. Resumable: rerunning on the same --out skips
    finished jobs and reruns failed or missing ones; each failed job is printed with its reason."""
    from cocoef_cli.sweep import SweepError, run_sweep, summary

    try:
        res = run_sweep(
            experiment,
            overrides or [],
            out,
            launcher,
            jobs,
            config_dir,
            quiet=quiet,
            echo=(lambda m: None) if quiet else typer.echo,
            force=force,
        )
    except SweepError as e:
        typer.echo(f"sweep failed: {e}", err=True)
        raise typer.Exit(1) from e
    counts = res.index["status"].value_counts().to_dict()
    if not quiet:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
            typer.echo(
                summary(res.out, res.index).to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")
            )
    typer.echo(
        f"{len(res.jobs)} job(s): "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f" ({res.skipped} skipped as already done) in {res.wall_s:.1f}s → {res.out}/index.csv"
    )
    if not res.ok:
        for job, reason in res.failed:
            typer.echo(f"failed: {job}: {reason}", err=True)
        typer.echo(f"{len(res.failed)} job(s) failed or missing: rerun the same command to retry them", err=True)
        raise typer.Exit(1)


@app.command()
@clean_errors
def rerun(
    run_dir: Path = typer.Argument(..., help="A run folder holding run.json (from cocoef run or a sweep job)."),
    out: Path | None = typer.Option(
        None, "--out", help="Keep the rerun here (default: a temporary folder, removed after the comparison)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite a finished run in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Rerun a recorded run from its run.json (resolved config) and report whether metrics.csv is
    byte-identical. Exit 0 identical, 1 different (or nothing recorded to compare)."""
    from cocoef_cli.run import rerun as do_rerun

    rep = do_rerun(run_dir, out, force, progress=not quiet)
    where = f" → {rep['out']}/metrics.csv" if rep["out"] else ""
    for field, change in rep["changed"].items():
        typer.echo(f"note: {field}: {change}", err=True)
    if rep["identical"]:
        typer.echo(f"identical: metrics.csv byte-identical ({rep['rows']} rows, status {rep['status']}){where}")
        return
    if rep["identical"] is None:
        typer.echo(
            f"not compared: {run_dir}/metrics.csv is absent (recorded status {rep['recorded_status']}); "
            f"rerun status {rep['status']}{where}"
        )
    else:
        typer.echo(
            f"DIFFERENT: metrics.csv differs from line {rep['first_diff']} (recorded status "
            f"{rep['recorded_status']}, rerun {rep['status']}){where}"
        )
    raise typer.Exit(1)


@app.command()
@clean_errors
def report(
    runs_dir: Path = typer.Argument(..., help="A run folder, a `cocoef sweep` output or a figures runs folder."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: RUNS_DIR/report)."),
    x: str | None = typer.Option(None, "--x", help="x column (default: iter, bits_up and sim_time where present)."),
    y: str | None = typer.Option(None, "--y", help="y column (default: opt_gap, else test_acc, else train_loss)."),
    hue: str | None = typer.Option(
        None,
        "--hue",
        help="Config key(s) for the colours, e.g. "
        "method,compressor.ratio (default: method and compressor if they vary).",
    ),
    style: str | None = typer.Option(None, "--style", help="Config key for the dash patterns."),
    col: str | None = typer.Option(None, "--col", help="Config key for the column facets."),
    row: str | None = typer.Option(None, "--row", help="Config key for the row facets."),
    where: list[str] | None = typer.Option(None, "--where", help="Only runs with KEY=VALUE (repeatable)."),
    title: str | None = typer.Option(None, "--title", help="Figure title (default: the shared setting)."),
) -> None:
    """Figures (PNG + PDF), summary.csv/.md and curves.csv of the runs under RUNS_DIR. One curve per
    configuration (mean over its seeds, 95% band); every config key that varies is shown as hue,
    style or a facet, and a report that cannot show them all exits 2 naming them. Diverged or
    failed runs are listed in the summary, never plotted."""
    from cocoef_cli.report import report as make_report

    files = make_report(runs_dir, out, x, y, hue, style, col, row, where or (), title)
    for f in files:
        typer.echo(str(f))


@app.command()
@clean_errors
def figures(
    quick: bool = typer.Option(False, "--quick", help="Short budgets (≤ 3 min); writes runs/quick/ unless --out."),
    only: list[str] | None = typer.Option(None, "--only", help="Only this experiment (repeatable), e.g. fig4_vs_p."),
    out: Path | None = typer.Option(
        None, "--out", help="Figures + gallery folder (default: results/, or runs/quick with --quick)."
    ),
    runs: Path | None = typer.Option(
        None, "--runs", help="Raw runs folder (default: runs/figures, or runs/quick/runs with --quick); resumable."
    ),
    jobs: int = typer.Option(2, "--jobs", "-j", help="Sweeps run at the same time."),
    tune_first: bool = typer.Option(
        False,
        "--tune",
        help="Run the step-size tuning stage first (records the best step sizes in conf/step_sizes.yaml unless --quick).",
    ),
    config_dir: Path | None = ConfigDirOpt,
) -> None:
    """Regenerate the paper's figures from experiments/*.yaml: sweeps (resumed), figures, results/README.md."""
    from cocoef_cli.figures import FiguresError
    from cocoef_cli.figures import figures as make_figures

    try:
        make_figures(
            quick=quick,
            only=only or None,
            out=out,
            runs=runs,
            jobs=jobs,
            do_tune=tune_first,
            echo=typer.echo,
            config_dir=config_dir,
        )
    except FiguresError as e:
        typer.echo(f"figures failed: {e}", err=True)
        raise typer.Exit(1) from e


@app.command()
@clean_errors
def tune(
    experiment: str = typer.Argument(..., help="An experiment of experiments/ with a tune: section."),
    quick: bool = typer.Option(False, "--quick", help="The --quick budget and grid (never recorded)."),
    runs: Path | None = typer.Option(None, "--runs", help="Raw runs folder (default: runs/figures)."),
    jobs: int = typer.Option(2, "--jobs", "-j", help="Sweeps run at the same time."),
    write: bool = typer.Option(True, "--write/--no-write", help="Record each arm's best lr in conf/step_sizes.yaml."),
    config_dir: Path | None = ConfigDirOpt,
) -> None:
    """Step-size grid 0.05·2^i for every method arm of an experiment, on the figure's iteration budget;
    prints the table and records each arm's best step size in the block EXPERIMENT of conf/step_sizes.yaml."""
    import pandas as pd

    from cocoef_cli import config
    from cocoef_cli.figures import FiguresError, load_experiments, select, write_tuning
    from cocoef_cli.figures import tune as run_tune

    exp = select(load_experiments(config_dir), [experiment])[0]
    runs = runs or Path("runs/quick/runs" if quick else "runs/figures")
    try:
        table = run_tune(exp, runs, quick, jobs, typer.echo, write=write and not quick, config_dir=config_dir)
    except FiguresError as e:
        typer.echo(f"tune failed: {e}", err=True)
        raise typer.Exit(1) from e
    if not quick:
        typer.echo(f"grid results → {write_tuning(table, Path('results/figures'), exp.name)}")
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    best = table[table["best"]]
    typer.echo(
        "best: "
        + ", ".join(f"{r.arm} {r.lr:g}" for r in best.itertuples())
        + (
            f" (recorded in {config.config_dir(config_dir) / config.STEP_SIZES}, block {exp.lr_setting})"
            if write and not quick
            else ""
        )
    )


@app.command("check-code")
@clean_errors
def check_code(
    overrides: list[str] | None = OverridesArg,
    config_dir: Path | None = ConfigDirOpt,
    max_patterns: int = typer.Option(5000, help="Enumerate up to this many straggler sets, else sample."),
) -> None:
    """Decode every straggler set of size ≤ d−1 (or a sample): worst residual ‖aᵀB_F − 1ᵀ‖, max|B_ij|,
    max|a_i| and ‖a‖₂ (worst, median). For sgc/uncoded (unbiased in expectation): the spread of aᵀB − 1ᵀ
    over straggler draws."""
    from cocoef_cli import config
    from cocoef_cli.run import code_conditioning

    cfg = config.load(overrides or [], config_dir)
    rep = code_conditioning(cfg, max_patterns)
    how = f" construction={rep['construction']}" if "construction" in rep else ""
    typer.echo(f"code={rep['code']} devices={rep['M']} partitions={rep['N']} d={rep['d']} decode={rep['decode']}{how}")
    if rep["kind"] == "expectation":
        typer.echo(
            f"unbiased in expectation only: {rep['draws']} draws of straggler={cfg['straggler']['name']} "
            "(no worst residual: aᵀB = 1ᵀ is not sought per pattern)"
        )
        typer.echo(
            f"aᵀB − 1ᵀ over the draws: bias max_j|mean| {rep['bias']:.3e}, spread (rms) {rep['spread']:.3e}, "
            f"max {rep['max_abs_e']:.3e}"
        )
        typer.echo(f"max |B_ij| {rep['max_abs_B']:.4g}, max |a_i| {rep['max_abs_a']:.4g}")
        return
    typer.echo(
        f"straggler sets of size 0..{rep['d'] - 1}: {rep['sets']} "
        f"{'enumerated' if rep['exhaustive'] else 'sampled (numpy seed 0)'}"
    )
    typer.echo(
        f"max |B_ij| {rep['max_abs_B']:.4g}; max_i |a_i| worst {rep['max_abs_a_worst']:.4g}, median "
        f"{rep['max_abs_a_median']:.4g}; ‖a‖₂ worst {rep['norm_a_worst']:.4g}, median {rep['norm_a_median']:.4g}"
    )
    typer.echo(f"worst decoding residual: {rep['worst_residual']:.3e}")


@app.command()
@clean_errors
def bench(
    quick: bool = typer.Option(False, "--quick", help="Fewer sizes (M ≤ 100): about a minute."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Markdown report to write (default: results/bench.md for the full bench; --quick and --smoke "
        "write only with --out, so they never replace the measured report).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    smoke: bool = typer.Option(
        False, "--smoke", help="One small workload (logistic regression, M = 10): checks an install in seconds."
    ),
) -> None:
    """Benchmarks: simulator vs a per-device loop, vs a centralised step, seeds=10 vs 1, scaling in M."""
    from cocoef_cli.bench import run_bench

    if out is None and not (quick or smoke):
        out = Path("results/bench.md")
    typer.echo(run_bench(quick, out, device, log=lambda line: typer.echo(line, err=True), smoke=smoke))
    if out is not None:
        typer.echo(f"wrote {out}", err=True)


class _Command(typer.core.TyperCommand):
    """A flag takes no value: no type placeholder beside it in --help (typer prints ``<bool>``)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False):
                p.metavar = ""
        return params


for _info in app.registered_commands:  # every verb, --help included
    _info.cls = _Command if _info.cls in (None, typer.core.TyperCommand) else _info.cls


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
