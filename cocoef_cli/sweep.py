"""Experiment sweeps: a real Hydra multirun of a ``conf/experiment/`` preset, resumable.

``run_sweep`` (behind ``cocoef sweep``) works in three steps:

1. **Plan** (nothing written): expand the preset's ``hydra.sweeper.params`` and the command-line
   overrides into one override list per job exactly as Hydra's basic sweeper does, compose and
   build every job's config (so a typo costs seconds, not a cluster allocation), and name each
   job's folder from its own overrides (:func:`job_name`; stable across reruns).
2. **Launch**: call :func:`_task` through ``hydra.main`` with a temporary ``sys.argv``
   (``-m``, the overrides, ``hydra.sweep.dir``, ``hydra/launcher=...``). Each job skips itself
   when its folder already holds a finished run of the same config, else runs through
   :func:`cocoef_cli.run.execute`, which writes ``metrics.csv`` then ``run.json`` atomically.
   When every job is already done the launch is skipped altogether.
3. **Index**: read every job folder's ``run.json`` and write ``DIR/index.csv`` (job, overrides,
   status, wall_s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cocoef_cli import config
from cocoef_cli.errors import ConfigError
from cocoef_cli.record import FINISHED, final_rows, read_record

LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm", "ray")
PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
}
JOBS_KEY = {"joblib": "hydra.launcher.n_jobs", "submitit_slurm": "hydra.launcher.array_parallelism"}
INDEX_COLUMNS = ["job", "overrides", "status", "wall_s"]  # plus swept keys and note: index_columns
EXCLUDED_FROM_NAME = ("experiment",)  # = hydra.job.config.override_dirname.exclude_keys in conf/hydra/
_SAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")
_MAX_NAME = 200  # < 255 bytes, the usual file-name limit
NO_PRESET = "none"  # `cocoef sweep none KEY=a,b`: the root config, no preset


def job_name(override_dirname: str) -> str:
    """Folder name of a job from Hydra's ``override_dirname``: its swept overrides, sorted by key,
    ``k=v,k=v`` (the sweep's constant overrides are excluded, see :func:`plan`).

    Characters outside ``[A-Za-z0-9._=,+-]`` become ``_``, and a name longer than 200 characters
    (a dozen swept keys with long values) is cut; either way a short hash of the full string is
    appended so that distinct jobs never share a folder."""
    if not override_dirname:
        return "default"
    safe = _SAFE.sub("_", override_dirname)
    if safe == override_dirname and len(safe) <= _MAX_NAME:
        return safe
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return f"{safe[: _MAX_NAME - 9]}-{digest}"


if not OmegaConf.has_resolver("cocoef_job"):  # used by hydra.sweep.subdir in conf/hydra/default.yaml
    OmegaConf.register_new_resolver("cocoef_job", lambda s="": job_name(str(s)))


@dataclass
class Job:
    name: str  # folder: the job's swept overrides (constant ones excluded), see :func:`job_name`
    overrides: list[str]  # as the job is composed and launched: the sweep's constant overrides, then its swept ones
    run_id: str
    cfg: dict = field(default_factory=dict, repr=False)  # the composed, validated config
    swept: dict[str, str] = field(default_factory=dict)  # swept key (without +/~) -> this job's value
    same_as: str | None = None  # the first job of the sweep with the same resolved config: this one is not run

    @property
    def label(self) -> str:
        """The job's swept overrides, space-separated (``index.csv``'s ``overrides`` column)."""
        return " ".join(f"{k}={v}" for k, v in self.swept.items())


@dataclass
class Plan:
    """A sweep expanded into jobs (nothing run, nothing written)."""

    experiment: str
    jobs: list[Job]
    constant: list[str]  # overrides every job shares: recorded once (sweep.json, multirun.yaml), in no name
    swept: list[str]  # the keys (without +/~) that take more than one value across the jobs, in name order
    hydra: list[str]  # hydra overrides to launch with (launcher first)

    @property
    def unique(self) -> list[Job]:
        """The jobs to run: one per resolved config."""
        return [j for j in self.jobs if j.same_as is None]


@dataclass
class SweepResult:
    out: Path
    jobs: list[Job]
    index: Any  # pandas DataFrame of index.csv
    skipped: int
    wall_s: float
    swept: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.index["status"].isin((*FINISHED, "duplicate")).all())

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(job, one-line reason from its run.json) of every job that did not finish."""
        bad = self.index[~self.index["status"].isin((*FINISHED, "duplicate"))]
        return [
            (str(r.job), str(r.note) if isinstance(r.note, str) and r.note else str(r.status)) for r in bad.itertuples()
        ]


# ---------------------------------------------------------------------------------------- the task
def _task(cfg: DictConfig) -> str:
    """One job of the multirun (runs in the launcher's worker). Skips a finished run of the same
    config; else runs it via :func:`cocoef_cli.run.execute`. Never raises for a failed run: it
    records ``status: failed`` in ``run.json`` instead, so the other jobs go on."""
    from hydra.core.hydra_config import HydraConfig

    from cocoef_cli.record import run_id, run_record, write_run
    from cocoef_cli.run import already_done, execute

    runtime = HydraConfig.get().runtime
    out = Path(runtime.output_dir)
    # the sweep's root: a user folder of options on the search path, else the main config dir
    sources = {s.provider: s.path for s in runtime.config_sources if s.schema == "file"}
    root = sources.get("command-line", sources.get("main"))
    plain = config.resolve(cfg, root)
    choices = OmegaConf.to_container(runtime.choices)
    assert isinstance(choices, dict)
    plain = config.named(plain, choices)
    rid = run_id(plain)
    if already_done(out, rid) is not None:
        return "skipped"
    t0 = time.perf_counter()
    try:
        config.validate(plain, root)
        _, res = execute(plain, out, progress=False, threads=1)  # threads=auto: one per worker
        return res.status
    except Exception as e:
        now = read_record(out)
        if now.get("status") != "failed" or now.get("run_id") != rid:
            # execute() failed while building (nothing written yet): record the failure here
            write_run(
                out,
                None,
                run_record(plain, "failed", time.perf_counter() - t0, run_id=rid, error=f"{type(e).__name__}: {e}"),
            )
        return "failed"


# ------------------------------------------------------------------------------------------ plan
def experiments(root: Path | None = None) -> list[tuple[str, str]]:
    """(name, one-line description) of every preset (as ``cocoef list experiments`` prints them)."""
    from cocoef_cli import explain

    return explain.listing("experiment", root)


def _quote(value: str) -> str:
    """A Hydra override value that is taken literally (paths with spaces, commas, ...)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(task overrides, hydra overrides); refuses the keys the CLI owns."""
    task, hyd = [], []
    for ov in overrides:
        key = config.override_key(ov)
        if config.is_hydra_key(key):
            if key in (
                "hydra.sweep.dir",
                "hydra.sweep.subdir",
                "hydra.run.dir",
                "hydra/launcher",
                "hydra.mode",
            ) or key.startswith("hydra.job.config.override_dirname"):  # job folder names: see conf/hydra/
                raise ConfigError(
                    key,
                    ov.partition("=")[2],
                    {"hydra.sweep.dir": "--out", "hydra/launcher": "--launcher"}.get(
                        key, "the value set by cocoef sweep"
                    ),
                    "set by the CLI",
                )
            hyd.append(ov)
        elif key in ("experiment",):
            raise ConfigError(key, ov.partition("=")[2], "the EXPERIMENT argument of cocoef sweep", "set by the CLI")
        else:
            task.append(ov)
    return task, hyd


def plan(
    experiment: str,
    overrides: Sequence[str] = (),
    launcher: str = "joblib",
    jobs: int | None = None,
    root: Path | None = None,
    check: bool = True,
) -> Plan:
    """Validate a sweep and expand it into jobs, writing nothing.

    The preset's ``hydra.sweeper.params`` and the command-line overrides are expanded as Hydra's
    basic sweeper does (cross product; ``glob()`` over a group's options), then:

    * a job with a ``baseline=ARM`` override keeps the arm's own values: the preset's sweep of a
      key the arm sets (``method``, ``compressor``, ``optim.lr``, ...) is dropped from that job
      (the command line still wins over the arm);
    * jobs whose resolved configs are equal (same ``run_id``) are run once (``same_as``);
    * keys that take one value across the jobs are the sweep's constant overrides; a job's name
      is made of the others (:func:`job_name`).

    Raises :class:`ConfigError` for an unknown preset or launcher, bad override syntax, a glob or
    sweep that matches nothing, or a job whose config is invalid (``check`` builds every job's
    experiment, as ``cocoef run`` would)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cocoef_cli.record import run_id

    root = config.config_dir(root)
    names = config.options("experiment", root)
    if experiment not in names and experiment != NO_PRESET:
        raise ConfigError("experiment", experiment, [*names, NO_PRESET], "unknown experiment")
    if launcher not in LAUNCHERS:
        raise ConfigError("--launcher", launcher, LAUNCHERS, "unknown launcher")
    if launcher in PLUGINS:
        import importlib.util

        mod, pkg = PLUGINS[launcher]
        if importlib.util.find_spec(mod) is None:
            raise ConfigError(
                "--launcher",
                launcher,
                f"an installed launcher: pip install {pkg} (or cocoef[cluster])",
                "launcher plugin not installed",
            )
    if jobs is not None:
        if launcher not in JOBS_KEY:
            raise ConfigError(
                "--jobs",
                jobs,
                "joblib or submitit_slurm launchers (set hydra.launcher.* for others)",
                f"not supported by launcher {launcher}",
            )
        if jobs < 1 and not (launcher == "joblib" and jobs == -1):
            raise ConfigError("--jobs", jobs, "integers ≥ 1 (-1: all cores, joblib)", "out of range")
    task_ovs, hydra_ovs = _split_overrides(config.canonical(overrides))
    hydra_ovs = [f"hydra/launcher={launcher}", *hydra_ovs, *config.searchpath(root)]
    if jobs is not None:
        hydra_ovs.append(f"{JOBS_KEY[launcher]}={jobs}")
    exp_ovs = [] if experiment == NO_PRESET else [f"+experiment={experiment}"]

    parser = OverridesParser.create()
    try:
        parsed_user = parser.parse_overrides([*exp_ovs, *task_ovs])
    except Exception as e:
        bad = next((o for o in task_ovs if not _parses(parser, o)), " ".join(task_ovs))
        raise ConfigError(
            "overrides",
            bad,
            "Hydra override syntax key=value, sweeps key=a,b or key=range(0,3)",
            str(e).strip().splitlines()[0],
        ) from None
    # the preset's hydra.sweeper.params and the hydra overrides, composed once (validates the
    # latter), then the sweep expanded by Hydra's own basic sweeper code (glob() needs the loader)
    plain_user = [str(o.input_line) for o in parsed_user if not o.is_sweep_override()]  # set by the parser
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config.layers(root)[-1]), version_base="1.3"):
            try:
                hcfg = compose("config", overrides=[*plain_user, *hydra_ovs], return_hydra_config=True)
            except Exception as e:
                raise config._hydra_error(e, [*plain_user, *hydra_ovs], root) from None
            params = OmegaConf.select(hcfg, "hydra.sweeper.params") or {}
            preset = config.canonical([f"{k}={v}" for k, v in params.items()])
            loader_parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())

            def expand(ovs: list[str]) -> list[list[str]]:
                try:
                    return BasicSweeper.split_arguments(loader_parser.parse_overrides(ovs), None)[0]
                except Exception as e:
                    raise ConfigError(
                        "overrides",
                        " ".join(ovs),
                        "Hydra sweep syntax (key=a,b, key=range(0,3), key=glob(*))",
                        str(e).strip().splitlines()[0],
                    ) from None

            for ov in [*preset, *task_ovs]:  # a glob or sweep that matches nothing: name it
                if not expand([ov]):
                    key, _, pattern = ov.partition("=")
                    group = key.lstrip("+~")
                    accepted = config.options(group, root) if group in (*config.GROUPS, "baseline") else "values"
                    raise ConfigError(group, pattern, accepted, "matches nothing")
            batch = expand([*preset, *exp_ovs, *task_ovs])
    except ConfigError as err:
        if not err.key.startswith("hydra.launcher."):
            raise
        raise ConfigError(
            err.key, err.value, _launcher_keys(root, launcher), f"unknown key of launcher {launcher}"
        ) from None
    finally:
        GlobalHydra.instance().clear()
    if not batch:
        raise ConfigError("overrides", " ".join([*preset, *task_ovs]), "sweeps with at least one value", "0 jobs")
    user_keys = {config.override_key(o) for o in task_ovs}
    preset_keys = {config.override_key(o) for o in preset} - user_keys
    arms: dict[str, set[str]] = {}
    expanded: list[dict[str, str]] = []  # per job: key (as written, with +/~) -> override
    for job_ovs in batch:
        ovs = {o.partition("=")[0]: o for o in job_ovs}
        arm = next((o.partition("=")[2] for k, o in ovs.items() if k.lstrip("+~") == "baseline"), None)
        if arm is not None:
            owned = arms.setdefault(arm, _arm_keys(root, arm))
            kept = {
                k: o
                for k, o in ovs.items()
                if not (config.override_key(o) in preset_keys and config.override_key(o) in owned)
            }
            if kept != ovs and kept in expanded:
                continue  # the arm's value replaced the preset's: one job per arm, not one per preset value
            ovs = kept
        expanded.append(ovs)
    keys = list(dict.fromkeys(k for ovs in expanded for k in ovs))
    swept_keys = [k for k in keys if len({ovs.get(k) for ovs in expanded}) > 1]
    constant = [expanded[0][k] for k in keys if k not in swept_keys]
    exclude = [config.override_key(o) for o in constant]
    out: list[Job] = []
    first: dict[str, str] = {}
    for ovs in expanded:
        job_ovs = [*constant, *(ovs[k] for k in swept_keys if k in ovs)]
        cfg = config.load(job_ovs, root)
        dirname = get_overrides_dirname(parser.parse_overrides(job_ovs), exclude, ",", "=")
        rid = run_id(cfg)
        job = Job(
            job_name(dirname),
            job_ovs,
            rid,
            cfg,
            swept={
                k.lstrip("+~"): ovs[k].partition("=")[2] if k in ovs else ""
                for k in sorted(swept_keys, key=lambda k: k.lstrip("+~"))
            },
        )
        if rid in first:
            job.same_as = first[rid]
        else:
            first[rid] = job.name
        out.append(job)
    swept_names = sorted(k.lstrip("+~") for k in swept_keys)
    result = Plan(experiment, out, constant, swept_names, hydra_ovs)
    if check:
        check_builds(result.unique, root)
    return result


def _arm_keys(root: Path, arm: str) -> set[str]:
    """The keys a ``conf/baseline/`` arm sets: the groups its defaults override and its own keys."""
    path = config.option_path("baseline", arm, root)
    if path is None:
        return set()
    node = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(node, dict)
    owned: set[str] = set()
    for d in node.pop("defaults", []) or []:
        if isinstance(d, dict):
            owned |= {str(k).removeprefix("override ").strip().lstrip("/") for k in d}

    def walk(d: Any, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                owned.add(f"{prefix}{k}")

    walk(node, "")
    return owned


def _launcher_keys(root: Path, launcher: str) -> list[str]:
    """The ``hydra.launcher.*`` keys the chosen launcher accepts."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config.layers(root)[-1]), version_base="1.3"):
            cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        return [f"hydra.launcher.{k}" for k in cfg.hydra.launcher if k != "_target_"]
    finally:
        GlobalHydra.instance().clear()


def _parses(parser: Any, ov: str) -> bool:
    try:
        parser.parse_overrides([ov])
        return True
    except Exception:
        return False


# top-level keys that config.validate checks fully: jobs differing only in them build alike
_NOT_BUILT = ("seed", "seeds", "iters", "eval_every", "optim", "network")


def check_builds(jobs: Sequence[Job], root: Path) -> None:
    """Check each job's config with :func:`config.check` against the config root ``root`` (the
    whole schema: every component's validator at the smallest size, datasets loaded once), once per
    group of jobs that differ only in keys :func:`config.validate` checks fully."""

    built: set[str] = set()
    for job in jobs:
        sig = json.dumps({k: v for k, v in job.cfg.items() if k not in _NOT_BUILT}, sort_keys=True, default=str)
        if sig not in built:
            config.check(job.cfg, root)
            built.add(sig)


def job_status(out: Path, job: Job) -> tuple[str, float | None]:
    """(status, wall_s) of a job folder: ``missing`` when it holds no run, ``stale`` when it holds
    a run of another config (it will be rerun)."""
    rec = read_record(out / job.name)
    if not rec:
        return "missing", None
    if rec.get("run_id") != job.run_id:
        return "stale", None
    return str(rec.get("status", "missing")), rec.get("wall_s")


# ---------------------------------------------------------------------------------------- launch
def run_sweep(
    experiment: str,
    overrides: Sequence[str] = (),
    out: Path | None = None,
    launcher: str = "joblib",
    jobs: int | None = None,
    root: Path | None = None,
    quiet: bool = False,
    echo: Any = print,
    force: bool = False,
) -> SweepResult:
    """Plan, launch (unless every job is done) and index a sweep. See the module docstring.

    A job folder holding a finished run of another config (``stale``: the preset or the code's
    config changed) is only overwritten with ``force``; without it the sweep stops before any work.
    Finished runs of the sweep's jobs found under other folder names (a sweep started with older
    folder names, or with other swept keys) are moved to their job's folder first."""
    import pandas as pd

    from cocoef_cli.record import atomic_write

    t0 = time.perf_counter()
    root = config.config_dir(root)
    pl = plan(experiment, overrides, launcher, jobs, root, check=False)
    out = Path(out or Path("runs") / "sweeps" / experiment).resolve()
    moved = adopt_folders(out, pl.unique)
    before = {j.name: job_status(out, j)[0] for j in pl.unique}
    stale = [n for n, st in before.items() if st == "stale" and read_record(out / n).get("status") in FINISHED]
    if stale and not force:
        raise ConfigError(
            "--out",
            str(out),
            "--force to overwrite them, or another --out",
            f"{len(stale)} job folder(s) hold finished runs of another config: {', '.join(stale[:3])}"
            + (", ..." if len(stale) > 3 else ""),
        )
    todo = [j for j in pl.unique if before[j.name] not in FINISHED]
    check_builds(todo, root)  # finished jobs were valid; the others are built once before anything is written
    skipped = len(pl.unique) - len(todo)
    dups = len(pl.jobs) - len(pl.unique)
    echo(
        f"sweep {experiment}: {len(pl.jobs)} job(s), {skipped} already done, "
        + (f"{dups} duplicate(s) of another job's config, " if dups else "")
        + f"{len(todo)} to run [launcher {launcher}] → {out}"
        + (f" ({moved} finished job folder(s) renamed to the current names)" if moved else "")
    )
    if pl.swept:
        echo("swept: " + ", ".join(pl.swept) + (" | constant: " + " ".join(pl.constant) if pl.constant else ""))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SWEEP_FILE, json.dumps(_sweep_record(pl, launcher, todo), indent=2, default=str) + "\n")
    if todo:
        argv = [
            "cocoef",
            "-m",
            *pl.constant,
            f"hydra.sweep.dir={_quote(str(out))}",
            "hydra/sweeper=cocoef",
            f"hydra.sweeper.jobs_file={_quote(str(out / SWEEP_FILE))}",
            "hydra.job.config.override_dirname.exclude_keys=["
            + ",".join(_quote(config.override_key(o)) for o in pl.constant)
            + "]",
            *pl.hydra,
        ]
        with _JobProgress(out, todo, enabled=not quiet):
            _launch(root, argv)
    index = pd.DataFrame([index_row(out, j, pl.swept) for j in pl.jobs], columns=index_columns(pl.swept))
    atomic_write(out / "index.csv", index.to_csv(index=False))
    return SweepResult(out, pl.jobs, index, skipped, time.perf_counter() - t0, pl.swept)


SWEEP_FILE = "sweep.json"  # the plan: constant overrides, swept keys, jobs; the sweeper launches its "launch" list


def _sweep_record(pl: Plan, launcher: str, todo: Sequence[Job]) -> dict[str, Any]:
    n = len(pl.constant)
    return {
        "experiment": pl.experiment,
        "launcher": launcher,
        "constant": pl.constant,
        "swept": pl.swept,
        "jobs": [{"job": j.name, **j.swept, "run_id": j.run_id, "same_as": j.same_as} for j in pl.jobs],
        "launch": [j.overrides[n:] for j in todo],
    }


def index_columns(swept: Sequence[str]) -> list[str]:
    """``index.csv``: job, one column per swept key, then the job's swept overrides, status, wall_s
    and a note (the reason of a failure, the job a duplicate repeats)."""
    return ["job", *swept, *INDEX_COLUMNS[1:], "note"]


def index_row(out: Path, job: Job, swept: Sequence[str]) -> dict[str, Any]:
    if job.same_as is not None:
        status, wall, note = "duplicate", None, f"same config as {job.same_as}"
    else:
        status, wall = job_status(out, job)
        note = ""
        if status == "failed":
            err = str(read_record(out / job.name).get("error") or "no reason recorded").strip()
            note = err.splitlines()[0] if err else "no reason recorded"
        elif status in ("missing", "stale"):
            note = "no run.json of this config: the job did not finish (see the launcher's output)"
    return {
        "job": job.name,
        **{k: job.swept.get(k, "") for k in swept},
        "overrides": job.label,
        "status": status,
        "wall_s": wall,
        "note": note,
    }


def adopt_folders(out: Path, jobs: Sequence[Job]) -> int:
    """Move finished runs of ``jobs`` found in other sub-folders of ``out`` (same ``run_id``) to
    their job's folder when that folder holds no run; returns how many were moved."""
    if not out.is_dir():
        return 0
    names = {j.name for j in jobs}
    found: dict[str, Path] = {}
    for child in sorted(out.iterdir()):
        if child.is_dir() and child.name not in names:
            rec = read_record(child)
            if rec.get("status") in FINISHED and rec.get("run_id"):
                found.setdefault(str(rec["run_id"]), child)
    moved = 0
    for j in jobs:
        src, dst = found.get(j.run_id), out / j.name
        if src is not None and not (dst / "run.json").exists():
            if dst.exists():
                import shutil

                shutil.rmtree(dst)  # an unfinished attempt (no run.json)
            src.rename(dst)
            moved += 1
    return moved


class SweepError(RuntimeError):
    """The sweep machinery itself failed (launcher, cluster): not a job's failure."""


def _launch(root: Path, argv: list[str]) -> None:
    """Run the Hydra multirun with a temporary ``sys.argv``; restore argv, logging and Hydra's
    global state afterwards whatever happens."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    saved_argv, saved_path = sys.argv, os.environ.get("PYTHONPATH")
    # the workers of every launcher import a _target_ as this process does: from the cwd, then PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), saved_path) if p)
    root_logger = logging.getLogger()
    saved_handlers, saved_level = list(root_logger.handlers), root_logger.level
    GlobalHydra.instance().clear()
    try:
        sys.argv = argv
        main = config.layers(root)[-1]  # the full tree; a user folder of options is on argv's hydra.searchpath
        hydra.main(version_base="1.3", config_path=str(main), config_name="config")(_task)()
    except SystemExit as e:
        if e.code not in (0, None):
            raise SweepError(f"Hydra multirun exited with status {e.code} (see the message above)") from None
    finally:
        sys.argv = saved_argv
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path
        root_logger.handlers[:] = saved_handlers
        root_logger.setLevel(saved_level)
        GlobalHydra.instance().clear()


class _JobProgress:
    """A Rich bar of finished jobs, fed by polling the job folders (works for every launcher,
    in-process or not); silent when disabled or when stderr is not a terminal."""

    def __init__(self, out: Path, todo: list[Job], enabled: bool):
        self.out, self.todo = out, todo
        self.enabled = enabled and sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.time()

    def _finished(self) -> int:
        n = 0
        for j in self.todo:
            p = self.out / j.name / "run.json"
            try:
                if p.stat().st_mtime >= self._start - 1:
                    n += 1
            except OSError:
                pass
        return n

    def _loop(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("jobs"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task("jobs", total=len(self.todo))
            while not self._stop.wait(0.5):
                bar.update(task, completed=self._finished())
            bar.update(task, completed=self._finished())

    def __enter__(self) -> _JobProgress:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ----------------------------------------------------------------------------------------- table
def summary(out: Path, index: Any | None = None) -> Any:
    """One row per job: its swept keys, status, then the final metrics (mean over seeds) of its
    ``metrics.csv``: method, compressor, seeds, final train loss, optimality gap, test accuracy
    (where it applies), total bits; a duplicate job names the job it repeats."""
    import pandas as pd

    index = pd.read_csv(Path(out) / "index.csv", keep_default_na=False) if index is None else index
    meta = [c for c in index.columns if c not in ("overrides", "wall_s", "note")]
    rows = []
    for job in index.to_dict("records"):
        row: dict[str, Any] = {c: job[c] for c in meta}
        if job["status"] == "duplicate":
            row["status"] = f"duplicate ({job['note'].removeprefix('same config as ')})"
        path = Path(out) / str(job["job"]) / "metrics.csv"
        if path.exists() and job["status"] != "duplicate":
            df = pd.read_csv(path)
            last = final_rows(df)
            row.update(
                method=last["method"].iloc[0],
                compressor=last["compressor"].iloc[0],
                seeds=last["seed"].nunique(),
                train_loss=last["train_loss"].mean(),
            )
            for col in ("opt_gap", "test_acc", "bits_up"):
                if col in last and last[col].notna().any():
                    row[col] = last[col].mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.dropna(axis=1, how="all")
