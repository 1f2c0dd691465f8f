"""``cocoef figures`` and ``cocoef tune``: the paper's figure set from ``experiments/*.yaml``.

An experiment file names (see ``experiments/README.md``):

* ``sweep``: a ``conf/experiment/`` preset, the swept overrides (Hydra syntax), the extra
  overrides of ``--quick``, and a ``name`` — the runs folder ``RUNS/<name>/<arm id>/``, shared by
  every experiment that names the same sweep (``runs_of: OTHER`` reuses another file's sweep and
  arms);
* ``arms``: the compared methods, each ``{id, label, overrides}``; an arm's step size is its
  entry in the experiment's block of ``conf/step_sizes.yaml``, written by ``cocoef tune``
  (``lr_from: OTHER`` or ``runs_of: OTHER``: the block of OTHER);
* ``tune``: the tuning setting (``at``: overrides replacing the swept ones), the grid 0.05·2^i,
  the metric and whether lower or higher is better;
* ``plot``: ``kind`` (``line``: y against x per facet; ``final``: final y against a swept key;
  ``table``: bits to reach a target), ``x``, ``y``, ``facet`` and the caption texts.

Each arm of each sweep is one ``cocoef sweep PRESET ARM-OVERRIDES optim.lr=LR SWEPT --out
RUNS/<sweep>/<arm>`` (a real Hydra multirun, resumable: finished jobs are skipped), run in-process
in ``--jobs`` long-lived worker processes. Figures go to ``OUT/figures/<name>.png|pdf`` with a
compact CSV of final values, and the gallery to ``OUT/README.md``.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cocoef_cli import config
from cocoef_cli.errors import ConfigError
from cocoef_cli.record import final_rows

KINDS = ("line", "final", "table")


class FiguresError(RuntimeError):
    """A sweep of the figure set failed (not bad input)."""


@dataclass
class Arm:
    id: str
    label: str
    overrides: list[str]
    lr: float | None


@dataclass
class FigureSpec:
    """One figure of the set: ``experiments/<name>.yaml`` (its sweep, arms and plot)."""

    name: str
    path: Path
    spec: dict
    arms: list[Arm] = field(default_factory=list)

    @property
    def sweep(self) -> dict:
        return self.spec["sweep"]

    @property
    def plot(self) -> dict:
        return self.spec.get("plot", {})

    @property
    def lr_setting(self) -> str:
        """The block of ``conf/step_sizes.yaml`` holding the arms' tuned step sizes."""
        return self.spec.get("lr_from") or self.spec.get("runs_of") or self.name


def experiments_dir(root: Path | None = None) -> Path:
    """``experiments/`` beside the config root (``conf/``)."""
    return config.config_dir(root).parent / "experiments"


def load_experiments(root: Path | None = None) -> dict[str, FigureSpec]:
    """Every ``experiments/*.yaml``, ordered by ``order``, with ``runs_of``/``lr_from`` resolved."""
    folder = experiments_dir(root)
    raw: dict[str, tuple[Path, dict]] = {}
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        raw[path.stem] = (path, spec)
    exps: dict[str, FigureSpec] = {}
    for name, (path, spec) in sorted(raw.items(), key=lambda kv: (kv[1][1].get("order", 99), kv[0])):
        src = spec.get("runs_of")
        if src:
            if src not in raw or raw[src][1].get("runs_of"):
                raise ConfigError(
                    f"{path.name}: runs_of",
                    src,
                    [n for n, v in raw.items() if not v[1].get("runs_of")],
                    "unknown experiment",
                )
            spec = {**{k: v for k, v in raw[src][1].items() if k in ("sweep", "arms", "tune", "lr_from")}, **spec}
        kind = spec.get("plot", {}).get("kind", "line")
        if kind not in KINDS:
            raise ConfigError(f"{path.name}: plot.kind", kind, KINDS, "unknown kind")
        if kind != "table" and "sweep" not in spec:
            raise ConfigError(f"{path.name}: sweep", None, "a sweep: {name, preset, overrides}", "missing")
        exps[name] = FigureSpec(name, path, spec)
    tuned = config.step_sizes(root)
    for exp in exps.values():
        lookup = tuned.get(exp.lr_setting) or {}
        for a in exp.spec.get("arms", []):
            if "lr" in a:
                raise ConfigError(
                    f"{exp.path.name}: arms[{a['id']}].lr",
                    a["lr"],
                    f"no lr here: the block {exp.lr_setting} of conf/{config.STEP_SIZES}",
                    "tuned step sizes live in one file",
                )
            lr = lookup.get(a["id"])
            exp.arms.append(
                Arm(a["id"], a.get("label", a["id"]), list(a.get("overrides", [])), None if lr is None else float(lr))
            )
    return exps


def select(exps: dict[str, FigureSpec], only: list[str] | None) -> list[FigureSpec]:
    if not only:
        return list(exps.values())
    bad = [o for o in only if o not in exps]
    if bad:
        raise ConfigError("--only", bad[0], list(exps), "unknown experiment")
    return [exps[o] for o in only]


# ------------------------------------------------------------------------------------ running
@dataclass
class Task:
    """One sweep (:func:`cocoef_cli.sweep.run_sweep`, basic launcher): one arm of one sweep."""

    sweep: str
    arm: Arm
    preset: str
    overrides: list[str]
    out: Path

    @property
    def argv(self) -> list[str]:
        """The same sweep as ``cocoef`` arguments."""
        return ["sweep", self.preset, *self.overrides, "--out", str(self.out), "--launcher", "basic", "--quiet"]

    @property
    def command(self) -> str:
        return "cocoef " + " ".join(shlex.quote(a) for a in self.argv)


def arm_task(exp: FigureSpec, arm: Arm, runs: Path, quick: bool, tune: bool = False) -> Task:
    """The ``cocoef sweep`` command of one arm (the figure sweep, or its tuning grid)."""
    sw = exp.sweep
    if tune:
        t = exp.spec.get("tune") or {}
        grid = t.get("quick_grid" if quick and "quick_grid" in t else "grid", [])
        swept = [*t.get("at", []), *t.get("extra", []), "optim.lr=" + ",".join(f"{g:g}" for g in grid)]
        out = runs / "tune" / sw["name"] / arm.id
    else:
        grid = sw.get("quick_lr_grid" if quick and "quick_lr_grid" in sw else "lr_grid")
        if grid:  # the best step size per setting is chosen from this grid when drawing
            lr_ov = "optim.lr=" + ",".join(f"{g:g}" for g in grid)
        elif arm.lr is None:
            raise ConfigError(
                f"{exp.path.name}: arms[{arm.id}].lr",
                None,
                f"a step size (run `cocoef tune {exp.name}`) or sweep.lr_grid",
                "missing",
            )
        else:
            lr_ov = f"optim.lr={arm.lr:g}"
        swept = [*sw.get("overrides", []), lr_ov]
        out = runs / sw["name"] / arm.id
    quick_ovs = sw.get("quick", []) if quick else []
    for ov in [*arm.overrides, *swept, *quick_ovs]:
        if not isinstance(ov, str) or "=" not in ov:
            raise ConfigError(
                f"{exp.path.name}: overrides",
                ov,
                'quoted Hydra overrides, e.g. "straggler.p=0.1,0.3"',
                "not a key=value string (quote sweeps: YAML splits them at the commas)",
            )
    return Task(sw["name"], arm, sw["preset"], [*arm.overrides, *swept, *quick_ovs], out)


def _worker_init(env: dict[str, str]) -> None:
    """A sweep worker process: thread counts and config root before torch is imported; a crash
    (segmentation fault, abort) prints its Python traceback on stderr (``faulthandler``)."""
    import faulthandler

    os.environ.update(env)
    faulthandler.enable()


def worker_deaths(processes: dict, wait: float = 5.0) -> str:
    """Why worker processes died, from their exit codes: "worker pid 12 killed by SIGKILL (the
    out-of-memory killer sends it)" or "worker pid 12 exited with status 3"; "" when none did.
    A process without an exit code yet is waited for up to ``wait`` seconds (the pool reports a
    death when the worker's pipe closes, which can be before its exit status can be read)."""
    import signal
    import time

    why = []
    for proc in processes.values():
        # the pool's own thread may be reaping the same child: its status can show a moment later
        deadline = time.monotonic() + wait
        while proc.exitcode is None and hasattr(proc, "join") and time.monotonic() < deadline:
            proc.join(0.05)
        code = proc.exitcode
        if code is None or code == 0:
            continue
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:  # a real-time or unknown signal: no name
                name = f"signal {-code}"
            hint = {
                "SIGKILL": " (the out-of-memory killer sends it)",
                "SIGTERM": " (the pool stops the other workers when one dies)",
            }.get(name, "")
            why.append(f"worker pid {proc.pid} killed by {name}{hint}")
        else:
            why.append(f"worker pid {proc.pid} exited with status {code}")
    return "; ".join(why)


def _worker_sweep(task: Task) -> tuple[int, str, int, int]:
    """One sweep in this (long-lived) worker process: (exit code as ``cocoef sweep`` would give it:
    0, 1 failed jobs, 2 bad input; a one-line message; jobs listed; jobs skipped as already done)."""
    from cocoef_cli.sweep import SweepError, run_sweep

    cwd = os.getcwd()
    try:
        res = run_sweep(task.preset, task.overrides, task.out, "basic", quiet=True, echo=lambda m: None)
    except ConfigError as e:
        return 2, f"error: {e}", 0, 0
    except SweepError as e:
        return 1, f"sweep failed: {e}", 0, 0
    finally:
        os.chdir(cwd)  # a sweep never moves the next one
    if not res.ok:
        job, reason = res.failed[0]
        return 1, f"{len(res.failed)} job(s) failed or missing, e.g. {job}: {reason}", len(res.jobs), res.skipped
    return 0, f"{len(res.jobs)} job(s), {res.skipped} skipped as already done", len(res.jobs), res.skipped


def run_tasks(tasks: list[Task], jobs: int, echo: Callable[[str], None], config_dir: Path | None = None) -> dict:
    """Run the sweeps (``cocoef sweep ...``), ``jobs`` at a time, in ``jobs`` long-lived worker
    processes (one torch thread each when several run at once): each sweep runs in-process in a
    worker, so Python and torch start ``jobs`` times, not once per sweep. Bad input (exit 2) raises
    ConfigError; failed jobs raise FiguresError after every task has run. Returns
    ``{"jobs": N, "skipped": M}`` (jobs listed by the sweeps, jobs resumed as already done)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
    if config_dir is not None:
        env["COCOEF_CONFIG_DIR"] = str(Path(config_dir).resolve())
    failures: list[str] = []
    counts = {"jobs": 0, "skipped": 0}
    t0 = time.perf_counter()
    if not tasks:
        return counts
    with ProcessPoolExecutor(
        max_workers=max(1, min(jobs, len(tasks))),
        mp_context=mp.get_context("spawn"),
        initializer=_worker_init,
        initargs=(env,),
    ) as pool:
        started = {pool.submit(_worker_sweep, t): t for t in tasks}
        processes = dict(getattr(pool, "_processes", None) or {})  # to read their exit codes
        died = ""  # why the pool broke, said once (by the first sweep it stopped)
        for fut in as_completed(started):
            task = started[fut]
            try:
                code, msg, n_jobs, n_skipped = fut.result()
            except BrokenProcessPool:  # a worker died: every sweep not finished stops with it
                if died:
                    why = "the worker pool stopped (see above)"
                else:
                    processes.update(getattr(pool, "_processes", None) or {})
                    died = worker_deaths(processes) or "a worker process died"
                    why = f"{died}; the worker pool stopped"
                code, msg, n_jobs, n_skipped = 1, f"not finished: {why}", 0, 0
            except Exception as e:  # a sweep raised
                code, msg, n_jobs, n_skipped = 1, f"{type(e).__name__}: {e}", 0, 0
            counts["jobs"] += n_jobs
            counts["skipped"] += n_skipped
            if code == 2:
                failures.append(f"bad input in {task.command}: {msg}")
            elif code != 0:
                failures.append(f"{task.command}: exit {code}: {msg}")
            status = "ok" if code == 0 else f"FAILED: {msg}"  # why, on the console, as it happens
            echo(f"  [{time.perf_counter() - t0:6.1f}s] {task.sweep}/{task.arm.id}: {status}")
    if failures:
        if any(f.startswith("bad input") for f in failures):
            raise ConfigError("experiments", failures[0].split(": ", 1)[0], "valid overrides", failures[0])
        raise FiguresError("; ".join(failures))
    return counts


def _tasks(exps: list[FigureSpec], runs: Path, quick: bool, tune: bool = False) -> list[Task]:
    seen: dict[tuple[str, str], Task] = {}
    for exp in exps:
        if exp.plot.get("kind") == "table" or (tune and not exp.spec.get("tune")):
            continue
        for arm in exp.arms:
            key = (exp.sweep["name"], arm.id)
            task = arm_task(exp, arm, runs, quick, tune)
            if key in seen and seen[key].argv != task.argv:
                raise ConfigError(
                    f"{exp.path.name}: sweep.name",
                    exp.sweep["name"],
                    "one spec per sweep name",
                    f"arm {arm.id} differs from another experiment's arm of the same sweep",
                )
            seen[key] = task
    # MNIST-sized sweeps first so that the small ones fill the gaps
    return sorted(seen.values(), key=lambda t: "mnist" not in t.sweep)


def arm_rows(task: Task, prune: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, runs) of the jobs listed in the arm's ``index.csv``, with ``arm`` and ``label``
    columns; a swept group's column holds the option the job chose (``code=crc_random`` is a
    preset of crc: its rows say crc_random, not crc); job folders not in the index (an older step
    size) are deleted when ``prune``."""
    from cocoef_cli.report import load_runs

    index = pd.read_csv(task.out / "index.csv", keep_default_na=False, dtype=str)  # values as the sweep wrote them
    jobs = set(index["job"].astype(str))
    if prune:
        for child in task.out.iterdir():
            if child.is_dir() and child.name not in jobs and (child / "run.json").exists():
                shutil.rmtree(child)
    rows, runs = load_runs(task.out)
    rows = rows[rows["run"].isin(jobs)] if not rows.empty else rows
    runs = runs[runs["run"].isin(jobs)]
    # a swept group is labelled by the option the sweep chose (code=crc_random, not its name crc)
    for group in (g for g in config.GROUPS if g in index.columns and g in rows.columns):
        chosen = dict(zip(index["job"].astype(str), index[group].astype(str)))
        rows = rows.assign(**{group: rows["run"].map(chosen).fillna(rows[group])})
    rows = rows.assign(arm=task.arm.id, label=task.arm.label)
    runs = runs.assign(arm=task.arm.id, label=task.arm.label)
    return rows, runs


def experiment_rows(exp: FigureSpec, runs: Path, quick: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames, infos = [], []
    for arm in exp.arms:
        r, i = arm_rows(arm_task(exp, arm, runs, quick))
        frames.append(r)
        infos.append(i)
    return pd.concat(frames, ignore_index=True), pd.concat(infos, ignore_index=True)


# ------------------------------------------------------------------------------------- tuning
def tune(
    exp: FigureSpec,
    runs: Path,
    quick: bool,
    jobs: int,
    echo: Callable[[str], None],
    write: bool,
    config_dir: Path | None = None,
) -> pd.DataFrame:
    """Run each arm's step-size grid at the tuning setting; return (arm, lr, final metric) and,
    with ``write``, record each arm's best lr in the experiment's block of conf/step_sizes.yaml."""
    t = exp.spec.get("tune")
    if not t:
        raise ConfigError("experiment", exp.name, "an experiment with a tune: section", "nothing to tune")
    tasks = [arm_task(exp, arm, runs, quick, tune=True) for arm in exp.arms]
    echo(f"tune {exp.name}: {len(tasks)} arm(s) × grid {t.get('grid')} at {t.get('at', [])} {t.get('extra', [])}")
    run_tasks(tasks, jobs, echo, config_dir)
    metric, mode = t.get("metric", "opt_gap"), t.get("mode", "min")

    rows = []
    for task in tasks:
        data, info = arm_rows(task)
        fin = final_rows(data[data["status"] == "completed"]) if not data.empty else data
        for lr, g in info.groupby("optim.lr"):
            status = g["status"].iloc[0]
            val = fin.loc[fin["optim.lr"] == lr, metric].mean() if len(fin) else float("nan")
            rows.append(
                {
                    "arm": task.arm.id,
                    "label": task.arm.label,
                    "lr": float(lr),
                    "status": status,
                    f"final_{metric}": val if status == "completed" else float("nan"),
                }
            )
    table = pd.DataFrame(rows)
    col = f"final_{metric}"
    best = {}
    for arm, g in table.groupby("arm", sort=False):
        g = g.dropna(subset=[col])
        if len(g):
            best[arm] = float(g.loc[g[col].idxmin() if mode == "min" else g[col].idxmax(), "lr"])
    table["best"] = [best.get(a) == lr for a, lr in zip(table["arm"], table["lr"])]
    if write:
        write_lrs(config.config_dir(config_dir) / config.STEP_SIZES, exp.lr_setting, best)
        for arm in exp.arms:
            arm.lr = best.get(arm.id, arm.lr)
    return table


TUNING_CSV = "_tuning.csv"  # FIGDIR/<experiment>_tuning.csv: a tuning table, linked from the gallery


def write_tuning(table: pd.DataFrame, figdir: Path, name: str) -> Path:
    """Write a :func:`tune` table to FIGDIR/NAME_tuning.csv (``cocoef tune`` and ``figures --tune``)."""
    path = Path(figdir) / f"{name}{TUNING_CSV}"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format="%.4g")
    return path


def write_lrs(path: Path, setting: str, best: dict[str, float]) -> None:
    """Record ``best`` (arm → lr) in the block ``setting:`` of ``path`` (conf/step_sizes.yaml),
    keeping comments and the other blocks; a missing arm or block is appended."""
    lines = path.read_text().splitlines() if path.exists() else []
    if f"{setting}:" not in lines:
        lines += ["", f"{setting}:"]
    start = lines.index(f"{setting}:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    block = lines[start + 1 : end]
    for arm, lr in best.items():
        pat = re.compile(rf"^(\s+{re.escape(arm)}:\s*)([^\s#]+)(.*)$")
        hit = next((i for i, ln in enumerate(block) if pat.match(ln)), None)
        if hit is None:
            block.append(f"  {arm}: {lr:g}")
        else:
            block[hit] = pat.sub(rf"\g<1>{lr:g}\g<3>", block[hit])
    lines[start + 1 : end] = block
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ drawing
def _filter(rows: pd.DataFrame, flt: dict | None) -> pd.DataFrame:
    for k, v in (flt or {}).items():
        rows = (
            rows[pd.to_numeric(rows[k], errors="coerce").sub(float(v)).abs() < 1e-12]
            if isinstance(v, (int, float))
            else rows[rows[k].astype(str) == str(v)]
        )
    return rows


def render(exp: FigureSpec, exps: dict[str, FigureSpec], runs: Path, figdir: Path, quick: bool) -> dict[str, Any]:
    """Draw one experiment; returns what the gallery needs (files, tables, excluded runs)."""
    from cocoef_cli import report as rp

    plot = exp.plot
    kind = plot.get("kind", "line")
    out = figdir / f"{exp.name}.png"
    info: dict[str, Any] = {"png": out, "tables": [], "excluded": []}
    if kind == "table":
        parts = []
        for part in plot["tables"]:
            src = exps[part["runs_of"]]
            rows, runs_info = experiment_rows(src, runs, quick)
            rows = _filter(rows, part.get("filter"))
            info["excluded"] += _excluded(runs_info)
            t = rp.bits_to_target(rows, "label", part["y"], float(part["target"]), part.get("mode", "min"))
            t.insert(0, "task", part["task"])
            name = {"opt_gap": "gap F − F*", "test_acc": "test accuracy"}.get(part["y"], part["y"])
            t.insert(2, "target", f"{name} {'≤' if part.get('mode', 'min') == 'min' else '≥'} {part['target']:g}")
            parts.append(t)
        table = pd.concat(parts, ignore_index=True)
        table.to_csv(out.with_suffix(".csv"), index=False)
        info["tables"].append(table)
        info["png"] = _bits_bars(table, out, plot.get("title", ""))
        return info
    rows, runs_info = experiment_rows(exp, runs, quick)
    rows = _filter(rows, plot.get("filter"))
    info["excluded"] = _excluded(runs_info, grid=bool(exp.sweep.get("lr_grid")))
    chosen = None
    if exp.sweep.get("lr_grid"):
        rows, chosen = best_lr_rows(
            rows,
            [plot["x"], *([plot["facet"]] if plot.get("facet") else [])],
            plot["y"],
            plot.get("mode", "max" if plot["y"] == "test_acc" else "min"),
        )
    _one_run_per_point(
        exp, rows, ["label", *([plot["x"]] if kind == "final" else []), *[plot[k] for k in ("facet",) if plot.get(k)]]
    )
    order = [a.label for a in exp.arms]
    title = plot.get("title", "") + ("" if not quick else "  [--quick]")
    if kind == "line":
        rp.line_panels(
            rows,
            plot.get("x", "iter"),
            plot["y"],
            "label",
            out,
            title=title,
            facet=plot.get("facet"),
            hue_order=order,
            facet_fmt=plot.get("facet_fmt", "{col} = {val}"),
            ylim=plot.get("ylim"),
        )
    else:
        rp.final_figure(
            rows,
            plot["x"],
            plot["y"],
            "label",
            out,
            title=title,
            facet=plot.get("facet"),
            hue_order=order,
            x_order=plot.get("x_order"),
        )
    # compact summary: final values per arm and setting (mean and std over seeds)
    fin = final_rows(rows[rows["status"] == "completed"])
    keys = [
        "label",
        *[
            k
            for k in ("code", "p", "d", "compressor.ratio", "compressor.group", "straggler.deadline")
            if k in fin and fin[k].astype(str).nunique() > 1
        ],
    ]
    ys = [c for c in ("opt_gap", "test_acc", "bits_up", "sim_time") if c in fin and fin[c].notna().any()]
    _one_run_per_point(exp, fin, keys)
    summ = fin.groupby(keys, sort=False)[ys].agg(["mean", "std"])
    summ.columns = [f"{a}_{b}" for a, b in summ.columns]
    summ = summ.reset_index()
    if chosen is not None:
        lr = fin.groupby(keys, sort=False)["optim.lr"].first().reset_index(drop=True)
        summ.insert(len(keys), "lr", lr.values)
        info["lr_table"] = (
            summ[keys + ["lr"]]
            .pivot(index="label", columns=keys[1], values="lr")
            .reindex([a.label for a in exp.arms])
            .reset_index()
            if len(keys) == 2
            else None
        )
    else:
        summ.insert(1, "lr", summ["label"].map({a.label: a.lr for a in exp.arms}))
    summ.to_csv(out.with_suffix(".csv"), index=False, float_format="%.4g")
    return info


def best_lr_rows(rows: pd.DataFrame, keys: list[str], y: str, mode: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep, for each (arm, setting), the runs of the step size with the best final ``y`` (mean
    over seeds; diverged/failed runs never win). Returns (rows, chosen (label, keys, optim.lr))."""
    ok = rows[rows["status"] == "completed"]
    fin = final_rows(ok).groupby(["label", *keys, "optim.lr"], sort=False)[y].mean().reset_index()
    pick = fin.loc[
        (fin.groupby(["label", *keys])[y].idxmin() if mode == "min" else fin.groupby(["label", *keys])[y].idxmax())
    ]
    keep = rows.merge(pick[["label", *keys, "optim.lr"]], on=["label", *keys, "optim.lr"])
    return keep, pick


def _one_run_per_point(exp: FigureSpec, rows: pd.DataFrame, keys: list[str]) -> None:
    """Every point (curve) the figure or its table draws averages the seeds of ONE run: raises
    FiguresError when the completed rows of some ``keys`` group come from runs of different
    configs, naming the point, the jobs and the config keys in which they differ."""
    done = rows[rows["status"] == "completed"] if "status" in rows else rows
    for point, g in done.groupby(keys, sort=False, dropna=False):
        ids = g.drop_duplicates("run_id")
        if len(ids) <= 1:
            continue
        cols = [c for c in ids.columns if "." in c and ids[c].astype(str).nunique() > 1]
        where = ", ".join(f"{k}={v}" for k, v in zip(keys, point if isinstance(point, tuple) else (point,)))
        raise FiguresError(
            f"{exp.name}: the point ({where}) would average {len(ids)} runs of different configs "
            f"(jobs {', '.join(ids['run'].astype(str).tolist()[:4])}; they differ in {', '.join(cols) or 'run_id'}): "
            "sweep the differing key into the plot's x, facet or a filter"
        )


def _excluded(runs_info: pd.DataFrame, grid: bool = False) -> list[str]:
    """The runs a figure leaves out (diverged, failed), one line each; with a step-size ``grid``,
    one line per (arm, setting) none of whose step sizes completed (it is missing from the
    figure), and one count of the other grid points that did not complete (their setting is drawn
    at its best completed step size)."""
    bad = runs_info[runs_info["status"] != "completed"]
    if not grid:
        return [f"{r.label} [{r.run}]: {r.status}" for r in bad.itertuples()]
    lr = pd.to_numeric(runs_info["optim.lr"], errors="coerce") if "optim.lr" in runs_info else None
    setting = runs_info["run"].str.replace(r"(?:^|,)optim\.lr=[^,]*", "", regex=True).str.strip(",")
    info = runs_info.assign(setting=setting.replace("", "default"), lr=lr)
    completed = {(r.label, r.setting) for r in info[info["status"] == "completed"].itertuples()}
    lines, other_n = [], 0
    for (label, s), g in info.loc[bad.index].groupby(["label", "setting"], sort=False):
        if (label, s) in completed:
            other_n += len(g)
            continue
        lrs = ", ".join(f"{v:g}" for v in sorted(g["lr"].dropna().unique()))
        lines.append(f"{label} [{s}]: {'/'.join(sorted(set(g['status'])))} at every step size (lr {lrs})")
    if other_n:
        lines.append(f"{other_n} other run(s) at step sizes that were not chosen did not complete")
    return lines


def _bits_bars(table: pd.DataFrame, out: Path, title: str) -> Path:
    """Horizontal bars: bits to reach the target per method, one panel per task."""
    from cocoef_cli import report as rp

    plt = rp.pyplot()
    table = table.assign(panel=table["task"] + ": " + table["target"])
    tasks = list(dict.fromkeys(table["panel"]))
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(5.6 * len(tasks), 0.42 * table.groupby("panel").size().max() + 1.6), squeeze=False
    )
    for ax, task in zip(axes[0], tasks):
        t = table[table["panel"] == task].reset_index(drop=True)
        reached = t["bits_to_target"].notna()
        top = t.loc[reached, "bits_to_target"].max() if reached.any() else 1.0
        for i, r in t.iterrows():
            color, _ = rp.style_for(r["method"], r["compressor"])
            if r["bits_to_target"] == r["bits_to_target"]:
                ax.barh(i, r["bits_to_target"], color=color, alpha=0.85)
                ax.text(r["bits_to_target"] * 1.08, i, f"{r['bits_to_target']:.2g}", va="center", fontsize=8)
            else:  # x in axes coordinates: readable whatever the bars' range (or with no bar at all)
                ax.text(
                    0.02,
                    i,
                    "not reached",
                    va="center",
                    fontsize=8,
                    color="#a00",
                    style="italic",
                    transform=ax.get_yaxis_transform(),
                )
        ax.set_yticks(range(len(t)))
        ax.set_yticklabels(t["label"], fontsize=8.5)
        ax.set_ylim(len(t) - 0.5, -0.5)  # first row on top, no row clipped
        ax.set_xscale("log")
        if reached.any():  # bars start a decade-floor below the smallest one, so every bar shows
            low = t.loc[reached, "bits_to_target"].min()
            ax.set_xlim(10 ** math.floor(math.log10(low / 1.5)), top * 6)
        else:
            ax.set_xlim(1e5, 1e9)
        ax.set_xlabel("uplink bits to reach the target (bits)")
        ax.set_title(task, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    return rp.save_figure(fig, out)


# ------------------------------------------------------------------------------------ gallery
def gallery(
    exps: list[FigureSpec],
    infos: dict[str, dict],
    out: Path,
    quick: bool,
    runs: Path,
    tuning: dict[str, Path],
    timing: str,
) -> Path:
    """``OUT/README.md``: each figure, what it shows, what it says, its commands and step sizes."""
    from cocoef_cli.report import markdown_table

    lines = [
        "# Results: the paper's figures, regenerated",
        "",
        "Regenerate everything with `make figures` (= `cocoef figures`; raw runs go to `runs/figures/`, "
        "resumable, not committed); one figure with `cocoef figures --only NAME`; a 3-minute "
        "smoke version with `cocoef figures --quick` (writes `runs/quick/`, never this folder). "
        "`cocoef tune NAME` re-runs a step-size grid and records the best step size per method in "
        "`experiments/NAME.yaml`; `cocoef figures --tune` does that first for every figure.",
        "",
        "Every curve is the mean over 3 seeds (seeds run together) with a 95% bootstrap confidence band; "
        "every method runs at its own best step size from the grid 0.05·2^i, tuned on the same "
        "iteration budget (tables below each figure). Colours and dash patterns are fixed per method: "
        "solid = error feedback with a biased compressor, dashed = the same compressor without error "
        "feedback, dash-dot = unbiased compressors, dotted = full precision.",
        "",
    ]
    if quick:
        lines += ["**This is a `--quick` run** (shorter budgets): the captions below describe the full run.", ""]
    if timing:
        lines += [timing, ""]
    cost = out / "figures" / "timings.md"  # measured cost of the full and --quick runs (written by hand)
    if not quick and cost.exists():
        lines += [cost.read_text().strip(), ""]
    lines += ["| figure | what |", "|---|---|"]
    for exp in exps:
        lines.append(f"| [{exp.name}](#{exp.name}) | {exp.plot.get('title', '')} |")
    lines.append("")
    for exp in exps:
        info = infos.get(exp.name)
        if info is None:
            continue
        plot = exp.plot
        rel = os.path.relpath(info["png"], out)
        lines += [
            f"## {exp.name}",
            "",
            f"**{plot.get('title', exp.name)}**",
            "",
            f"![{exp.name}]({rel})",
            "",
            f"[PDF]({os.path.relpath(Path(info['png']).with_suffix('.pdf'), out)}) · "
            f"[final values (CSV)]({os.path.relpath(Path(info['png']).with_suffix('.csv'), out)}) · "
            f"spec: [`experiments/{exp.path.name}`](../experiments/{exp.path.name})",
            "",
        ]
        if plot.get("shows"):
            lines += [f"*What it shows.* {plot['shows'].strip()}", ""]
        if plot.get("says"):
            lines += [f"*What it says.* {plot['says'].strip()}", ""]
        for t in info["tables"]:
            lines += [markdown_table(t.drop(columns=["method", "compressor"])), ""]
        if info["excluded"]:
            lines += ["Not plotted (diverged or failed): " + "; ".join(info["excluded"]), ""]
        lines += ["Command:", "", "```bash", f"cocoef figures --only {exp.name}{' --quick' if quick else ''}"]
        if plot.get("kind") != "table":
            lines += ["# = one resumable sweep per method:"]
            lines += [arm_task(exp, a, runs, quick).command for a in exp.arms]
        lines += ["```", ""]
        if info.get("lr_table") is not None:
            lines += [
                "Step size chosen per method and setting (best final value of the grid "
                f"{exp.sweep.get('lr_grid')}, in the sweep itself):",
                "",
                markdown_table(info["lr_table"].rename(columns={"label": "method"})),
                "",
            ]
        elif plot.get("kind") != "table" and exp.arms and not exp.sweep.get("lr_grid"):
            src = exp.spec.get("lr_from") or exp.spec.get("runs_of") or exp.name
            tuned = tuning.get(src)
            lines += [
                f"Step sizes (tuned by `cocoef tune {src}`"
                + (f", grid results: [{tuned.name}]({os.path.relpath(tuned, out)})" if tuned else "")
                + "):",
                "",
                markdown_table(
                    pd.DataFrame(
                        {"method": [a.label for a in exp.arms], "step size η": [f"{a.lr:g}" for a in exp.arms]}
                    )
                ),
                "",
            ]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def figures(
    quick: bool = False,
    only: list[str] | None = None,
    out: Path | None = None,
    runs: Path | None = None,
    jobs: int = 2,
    do_tune: bool = False,
    echo: Callable[[str], None] = print,
    config_dir: Path | None = None,
) -> Path:
    """Run the sweeps of the selected experiments (resuming), draw them, write the gallery."""
    t0 = time.perf_counter()
    exps = load_experiments(config_dir)
    chosen = select(exps, only)
    # a table needs the runs of the experiments it reads
    needed = list(chosen)
    for exp in chosen:
        for part in exp.plot.get("tables", []) if exp.plot.get("kind") == "table" else []:
            if exps[part["runs_of"]] not in needed:
                needed.append(exps[part["runs_of"]])
    out = Path(out or ("runs/quick" if quick else "results"))
    runs = Path(runs or ("runs/quick/runs" if quick else "runs/figures"))
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    tuning: dict[str, Path] = {p.name[: -len(TUNING_CSV)]: p for p in figdir.glob("*" + TUNING_CSV)}
    if do_tune:
        for exp in needed:
            if exp.spec.get("tune") and not exp.spec.get("runs_of") and exp.arms and not exp.spec.get("lr_from"):
                table = tune(exp, runs, quick, jobs, echo, write=not quick, config_dir=config_dir)
                tuning[exp.name] = write_tuning(table, figdir, exp.name)
        exps = load_experiments(config_dir)  # re-read the recorded step sizes
        chosen = select(exps, only)
        needed = [exps[e.name] for e in needed]
    tasks = _tasks(needed, runs, quick)
    echo(f"figures: {len(chosen)} experiment(s), {len(tasks)} sweep(s) of one method each, {jobs} at a time → {runs}")
    t1 = time.perf_counter()
    counts = run_tasks(tasks, jobs, echo, config_dir)
    t_runs = time.perf_counter() - t1
    infos = {}
    for exp in chosen:
        infos[exp.name] = render(exp, exps, runs, figdir, quick)
        echo(f"  wrote {infos[exp.name]['png']}")
    ran = counts["jobs"] - counts["skipped"]
    timing = (
        f"Last run that simulated: `cocoef figures{' --quick' if quick else ''}"
        f"{' --only ' + ' --only '.join(only) if only else ''} --jobs {jobs}`: {len(tasks)} sweeps, "
        f"{ran} of {counts['jobs']} jobs run ({counts['skipped']} resumed), {t_runs:.0f} s of simulation, "
        f"{time.perf_counter() - t0:.0f} s in total ({jobs} parallel sweeps, {os.cpu_count()} cores)."
    )
    old_readme = out / "README.md"
    if ran == 0 and old_readme.exists():  # a pure re-draw: keep the timing of the run that simulated
        prev = [ln for ln in old_readme.read_text().splitlines() if ln.startswith("Last run")]
        timing = prev[0] if prev else timing
    path = (
        gallery(list(exps.values()), infos, out, quick, runs, tuning, timing)
        if not only
        else _gallery_merge(exps, chosen, infos, out, quick, runs, tuning, timing)
    )
    echo(f"{len(chosen)} figure(s) in {time.perf_counter() - t0:.0f}s → {figdir}, gallery {path}")
    return path


def _gallery_merge(
    exps: dict[str, FigureSpec],
    chosen: list[FigureSpec],
    infos: dict,
    out: Path,
    quick: bool,
    runs: Path,
    tuning: dict,
    timing: str,
) -> Path:
    """With ``--only``: keep the other figures already in OUT/figures in the gallery."""
    figdir = out / "figures"
    for exp in exps.values():
        if exp.name not in infos and (figdir / f"{exp.name}.png").exists():
            tables = []
            if exp.plot.get("kind") == "table" and (figdir / f"{exp.name}.csv").exists():
                tables.append(pd.read_csv(figdir / f"{exp.name}.csv"))
            infos[exp.name] = {"png": figdir / f"{exp.name}.png", "tables": tables, "excluded": []}
    return gallery(list(exps.values()), infos, out, quick, runs, tuning, timing)
