"""`cocoef sweep`: a real Hydra multirun of a preset — launchers, resume, index.csv, bad input."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cocoef_cli import sweep as sw
from cocoef_cli.cli import app

runner = CliRunner()
SMOKE_JOBS = {
    "method=coco_ef,straggler.p=0.1",
    "method=coco_ef,straggler.p=0.3",
    "method=coco,straggler.p=0.1",
    "method=coco,straggler.p=0.3",
}


def _mtimes(d: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in d.glob("*/run.json")}


def _check_complete(d: Path, jobs=SMOKE_JOBS) -> pd.DataFrame:
    index = pd.read_csv(d / "index.csv")
    assert list(index.columns) == ["job", "method", "straggler.p", "overrides", "status", "wall_s", "note"]
    assert set(index.job) == jobs and len(index) == len(jobs)
    assert (index.status == "completed").all() and (index.wall_s >= 0).all()
    for row in index.itertuples():
        rec = json.loads((d / row.job / "run.json").read_text())
        assert rec["status"] == "completed"
        ov = dict(o.split("=") for o in row.overrides.split())  # the job's folder holds the job's config
        assert rec["config"]["method"]["name"] == ov["method"]
        assert rec["config"]["straggler"]["p"] == float(ov["straggler.p"])
        assert rec["config"]["devices"] == 6  # from the preset
        m = pd.read_csv(d / row.job / "metrics.csv")
        assert set(m.seed) == {0, 1} and m.iter.max() == rec["config"]["iters"]
    return index


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """The smoke preset swept once with joblib and 2 workers (shared by the tests that copy it)."""
    out = tmp_path_factory.mktemp("smoke") / "sweep"
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    return out, res.stdout


def test_smoke_joblib_two_workers_then_resume_skips_all(smoke_dir):
    out, stdout = smoke_dir
    _check_complete(out)
    launcher = (out / "multirun.yaml").read_text()
    assert "JoblibLauncher" in launcher and "n_jobs: 2" in launcher
    assert "4 completed" in stdout and "train_loss" in stdout  # summary line and table
    before = _mtimes(out)
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--jobs", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert "4 skipped" in res.stdout
    assert _mtimes(out) == before  # nothing was rerun (no wall-time assertion: that would be flaky)
    _check_complete(out)


def test_rerun_redoes_failed_missing_and_stale_jobs_only(smoke_dir, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(smoke_dir[0], out)
    before = _mtimes(out)
    failed, missing, stale, kept = sorted(SMOKE_JOBS)
    rec = json.loads((out / failed / "run.json").read_text())
    (out / failed / "run.json").write_text(json.dumps({**rec, "status": "failed"}))
    (out / missing / "run.json").unlink()
    (out / missing / "metrics.csv").unlink()
    rec = json.loads((out / stale / "run.json").read_text())  # a run of another config (preset edited)
    (out / stale / "run.json").write_text(json.dumps({**rec, "run_id": "0000000000"}))
    mid = _mtimes(out)
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--launcher", "basic", "-q"])
    assert res.exit_code == 2 and stale in res.stderr and "--force" in res.stderr  # finished: not overwritten
    assert _mtimes(out) == mid  # refused before any work
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--launcher", "basic", "-q", "--force"])
    assert res.exit_code == 0, res.output
    assert "1 skipped" in res.stdout
    after = _mtimes(out)
    assert after[kept] == before[kept]
    assert all(after[j] != before[j] for j in (failed, stale)) and missing in after
    _check_complete(out)


def test_a_failing_job_is_recorded_and_the_sweep_exits_1(tmp_path, monkeypatch):
    import cocoef_cli.run as run_mod

    real = run_mod.execute

    def flaky(cfg, out, progress=False, **kwargs):
        if cfg["method"]["name"] == "coco":
            raise RuntimeError("boom")
        return real(cfg, out, progress, **kwargs)

    monkeypatch.setattr(run_mod, "execute", flaky)  # the basic launcher runs jobs in this process
    out = tmp_path / "s"
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--launcher", "basic", "-q"])
    assert res.exit_code == 1
    assert "method=coco,straggler.p=0.1" in res.stderr and "Traceback" not in res.output
    index = pd.read_csv(out / "index.csv").set_index("job")
    assert (index.status == "failed").sum() == 2 and (index.status == "completed").sum() == 2
    rec = json.loads((out / "method=coco,straggler.p=0.3" / "run.json").read_text())
    assert rec["status"] == "failed" and "boom" in rec["error"]
    assert not (out / "method=coco,straggler.p=0.3" / "metrics.csv").exists()
    monkeypatch.setattr(run_mod, "execute", real)
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--launcher", "basic", "-q"])
    assert res.exit_code == 0 and "2 skipped" in res.stdout
    _check_complete(out)


def test_killed_job_leaves_no_metrics_and_rerun_completes_it(tmp_path):
    out = tmp_path / "s"
    longer = ["iters=1000", "eval_every=100"]  # ~1 s per job: time to kill one mid-run
    cmd = [
        sys.executable,
        "-m",
        "cocoef_cli.cli",
        "sweep",
        "smoke",
        *longer,
        "--launcher",
        "basic",
        "-q",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    victim = None
    try:
        deadline = time.time() + 60
        while victim is None and time.time() < deadline and proc.poll() is None:
            started = [p.parent.parent for p in out.glob("*/.hydra/config.yaml")]
            victim = next((j for j in started if not (j / "run.json").exists()), None)
            time.sleep(0.02)
        assert victim is not None, "no job was seen running"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not (victim / "metrics.csv").exists() and not (victim / "run.json").exists()
    for job in out.iterdir():  # no job folder holds metrics.csv without its run.json
        if job.is_dir():
            assert (job / "metrics.csv").exists() == (job / "run.json").exists()
    assert not (out / "index.csv").exists()  # the index is written at the end
    res = runner.invoke(app, ["sweep", "smoke", *longer, "--out", str(out), "--jobs", "2", "-q"])
    assert res.exit_code == 0, res.output
    _check_complete(out)  # constant overrides are in no job name


def test_submitit_local_runs_the_smoke_sweep(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--launcher", "submitit_local", "-q"])
    assert res.exit_code == 0, res.output
    _check_complete(out)
    assert (out / ".submitit").is_dir()  # each job ran as a submitit job


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
    reason="hydra-ray-launcher is not installed (pip install 'cocoef[cluster]'); it downgrades "
    "cloudpickle, so the dev venv leaves it out — see docs/sweeps.md 'On a Ray cluster' for the manual check",
)
def test_ray_launcher_runs_the_smoke_sweep(tmp_path, monkeypatch):  # pragma: no cover — optional
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "s"
    res = runner.invoke(
        app, ["sweep", "smoke", "--out", str(out), "--launcher", "ray", "-q", "+hydra.launcher.ray.init.num_cpus=2"]
    )
    assert res.exit_code == 0, res.output
    _check_complete(out)


BAD = [
    (["bogus"], "experiment", "smoke"),
    (["smoke", "--launcher", "nope"], "--launcher", "submitit_slurm"),
    (["smoke", "straggler.p=0.1,1.5"], "straggler.p", "[0, 1)"),
    (["smoke", "compressor=topk,nope"], "compressor", "randk_unbiased"),
    (["smoke", "devicez=3"], "devicez", "method"),
    (["smoke", "method=["], "overrides", "key=value"),
    (["smoke", "seed=range(0,2"], "overrides", "key=value"),
    (["smoke", "hydra.launcher.n_jobz=3"], "hydra.launcher.n_jobz", "hydra.launcher.n_jobs"),
    (["smoke", "hydra.sweep.dir=/tmp/x"], "hydra.sweep.dir", "--out"),
    (["smoke", "experiment=baselines"], "experiment", "EXPERIMENT"),
    (["smoke", "--launcher", "basic", "--jobs", "2"], "--jobs", "joblib"),
    (["smoke", "--jobs", "0"], "--jobs", "integers"),
    (["smoke", "method=glob(coco*)"], "compressor", "randk_unbiased"),  # coco_diana + top-k, caught before launch
]


@pytest.mark.parametrize("args,key,accepted", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_sweep_arguments_exit_2_with_one_line(tmp_path, args, key, accepted):
    out = tmp_path / "never"
    res = runner.invoke(app, ["sweep", *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}=") and "accepted:" in lines[0], lines
    assert accepted in lines[0].partition("accepted:")[2]
    assert "Traceback" not in res.output and not out.exists()


def test_list_experiments_shows_presets_with_descriptions():
    res = runner.invoke(app, ["list", "experiments"])
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines()[1:]}
    assert {"smoke", "baselines", "lr_grid", "p_sweep", "ratio_sweep"} <= set(lines)
    first = (sw.experiments()[0][0], sw.experiments()[0][1])
    assert first[1] and first[1] in lines[first[0]] and "@package" not in res.stdout
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "experiments:" in res.stdout and "smoke" in res.stdout and "topk" in res.stdout


def test_help_of_sweep_and_list():
    for verb in ["sweep", "list"]:
        res = runner.invoke(app, [verb, "--help"])
        assert res.exit_code == 0 and "Usage" in res.stdout
    assert "--launcher" in runner.invoke(app, ["sweep", "--help"]).stdout


def test_job_names_are_stable_safe_and_distinct():
    assert sw.job_name("method=coco,straggler.p=0.3") == "method=coco,straggler.p=0.3"
    assert sw.job_name("") == "default"
    a, b = sw.job_name("dataset.root=/data/a b"), sw.job_name("dataset.root=/data/a_b")
    assert "/" not in a and " " not in a and a != b and a == sw.job_name("dataset.root=/data/a b")
    long = sw.job_name("x=" + "9" * 500)
    assert len(long) <= 200 and long != sw.job_name("x=" + "9" * 499)


def test_job_folders_do_not_depend_on_override_order_or_launcher():
    a = sw.plan("smoke", ["straggler.p=0.2", "method=coco,coco_ef"], "joblib", check=False).jobs
    b = sw.plan("smoke", ["method=coco_ef,coco", "straggler.p=0.2"], "basic", check=False).jobs
    assert sorted(j.name for j in a) == sorted(j.name for j in b)
    assert {j.name for j in a} == {"method=coco", "method=coco_ef"}  # straggler.p=0.2 is constant


def test_baselines_preset_covers_every_method_with_three_seeds():
    from cocoef_cli import config
    from cocoef_cli.sim.methods import METHODS

    jobs = sw.plan("baselines", [], "basic", check=False).jobs
    cfgs = [config.load(j.overrides) for j in jobs]
    assert {c["method"]["name"] for c in cfgs} == {n for n, _ in METHODS.describe()}
    assert all(c["seeds"] == 3 for c in cfgs)
    assert len({j.name for j in jobs}) == len(jobs)
    for name, _ in sw.experiments():  # every preset composes and expands
        assert sw.plan(name, [], "basic", check=False).jobs


def test_summary_table(smoke_dir):
    table = sw.summary(smoke_dir[0])
    assert len(table) == 4 and {"method", "train_loss", "opt_gap", "bits_up"} <= set(table.columns)
    assert "test_acc" not in table.columns  # regression: no accuracy column
    assert (table.bits_up > 0).all() and table.train_loss.notna().all()


# ------------------------------------------------------------------ sweeps that say what they swept
def test_job_names_hold_every_swept_key_and_no_constant_one():
    pl = sw.plan(
        "smoke",
        ["straggler.p=0.1,0.4", "compressor.ratio=0.05,0.2", "seeds=2", "devices=20", "iters=300", "code.d=3"],
        "joblib",
        check=False,
    )
    assert pl.swept == ["compressor.ratio", "method", "straggler.p"]
    assert set(pl.constant) == {"+experiment=smoke", "seeds=2", "devices=20", "iters=300", "code.d=3"}
    assert len(pl.jobs) == len({j.name for j in pl.jobs}) == 8
    for j in pl.jobs:
        assert j.name == ",".join(f"{k}={j.swept[k]}" for k in pl.swept)  # sorted by key, nothing cut
        assert j.cfg["compressor"]["ratio"] == float(j.swept["compressor.ratio"]) and j.cfg["devices"] == 20


def test_index_has_a_column_per_swept_key_and_constants_are_recorded_once(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(
        app,
        [
            "sweep",
            "smoke",
            "method=coco_ef",
            "straggler.p=0.1,0.3",
            "iters=10",
            "--launcher",
            "basic",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == ["job", "straggler.p", "overrides", "status", "wall_s", "note"]
    assert sorted(index["straggler.p"]) == [0.1, 0.3] and set(index.job) == {"straggler.p=0.1", "straggler.p=0.3"}
    rec = json.loads((out / "sweep.json").read_text())
    assert rec["swept"] == ["straggler.p"] and set(rec["constant"]) == {
        "+experiment=smoke",
        "method=coco_ef",
        "iters=10",
    }
    assert "method=coco_ef" in (out / "multirun.yaml").read_text()  # Hydra's record of the constant overrides
    for job in index.job:
        cfg = json.loads((out / job / "run.json").read_text())["config"]
        assert (
            cfg["iters"] == 10 and cfg["method"]["name"] == "coco_ef" and f"straggler.p={cfg['straggler']['p']}" == job
        )


def test_a_sweep_started_with_the_older_folder_names_resumes(tmp_path):
    """Folders named by every override (the older scheme) are adopted by run_id, not rerun."""
    out = tmp_path / "s"
    res = runner.invoke(app, ["sweep", "smoke", "iters=30", "--out", str(out), "--launcher", "basic", "-q"])
    assert res.exit_code == 0
    for job in SMOKE_JOBS:  # rename to the older names: iters=30 was part of every name
        (out / job).rename(out / f"iters=30,{job}")
    before = {p.parent.name.removeprefix("iters=30,"): p.stat().st_mtime_ns for p in out.glob("*/run.json")}
    res = runner.invoke(app, ["sweep", "smoke", "iters=30", "--out", str(out), "--launcher", "basic"])
    assert res.exit_code == 0, res.output
    assert "4 already done" in res.stdout and "4 finished job folder(s) renamed" in res.stdout
    _check_complete(out)
    assert _mtimes(out) == before  # moved, not rerun
    assert "0 to run" in res.stdout


def test_an_empty_glob_exits_2_naming_the_pattern(tmp_path):
    res = runner.invoke(app, ["sweep", "smoke", "method=glob(coco_x*)", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and not (tmp_path / "x").exists()
    line = res.stderr.strip()
    assert "\n" not in line and "method='glob(coco_x*)'" in line and "matches nothing" in line
    assert "coco_ef" in line.partition("accepted:")[2]
    res = runner.invoke(app, ["sweep", "smoke", "+baseline=glob(zzz*)", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "baseline='glob(zzz*)'" in res.stderr and "coco_diana" in res.stderr


def test_jobs_with_the_same_config_run_once_and_the_table_says_so(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(
        app, ["sweep", "smoke", "method=coco_ef", "seed=0,0", "iters=10", "--launcher", "basic", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert len(index) == 4 and list(index.status).count("duplicate") == 2
    dup = index[index.status == "duplicate"]
    assert all(n == f"same config as {j}" for n, j in zip(dup.note, dup.job))
    assert "2 duplicate(s)" in res.stdout and "duplicate (straggler.p=0.1)" in res.stdout
    assert len(list(out.glob("*/run.json"))) == 2


def test_baseline_arms_keep_their_own_method_and_step_size():
    """smoke sweeps method=coco_ef,coco; with +baseline= arms the arm's method wins: one job per
    (arm, p), no cross product that rewrites an arm's method."""
    from cocoef_cli import config

    pl = sw.plan("smoke", ["+baseline=glob(coc*)"], "basic", check=False)
    arms = [o for o in config.options("baseline") if o.startswith("coc")]
    assert len(pl.jobs) == 2 * len(arms) and not [j for j in pl.jobs if j.same_as]
    for j in pl.jobs:
        arm = j.swept["baseline"]
        owned = sw._arm_keys(config.config_dir(), arm)
        arm_cfg = config.load([f"+baseline={arm}"])
        assert j.cfg["method"]["name"] == arm_cfg["method"]["name"] and j.cfg["optim"]["lr"] == arm_cfg["optim"]["lr"]
        assert j.cfg["compressor"]["name"] == arm_cfg["compressor"]["name"] and "method" in owned
    # the command line still wins over an arm
    pl = sw.plan("smoke", ["+baseline=coco_ef,gc", "optim.lr=0.01"], "basic", check=False)
    assert {j.cfg["optim"]["lr"] for j in pl.jobs} == {0.01} and len(pl.jobs) == 4


def test_sweep_none_sweeps_the_root_config(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(
        app,
        [
            "sweep",
            "none",
            "straggler.p=0.1,0.3",
            "devices=6",
            "code.d=2",
            "iters=5",
            "dataset.n=240",
            "--launcher",
            "basic",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    index = pd.read_csv(out / "index.csv")
    assert set(index.job) == {"straggler.p=0.1", "straggler.p=0.3"}
    cfg = json.loads((out / "straggler.p=0.1" / "run.json").read_text())["config"]
    assert cfg["seeds"] == 1 and cfg["eval_every"] == 10  # the root config's values, not a preset's
    assert "experiment" not in json.loads((out / "sweep.json").read_text())["constant"]


def test_a_job_failing_in_a_joblib_worker_prints_its_reason(tmp_path):
    """The failure happens in the joblib worker processes only (a sitecustomize on their path makes
    execute raise for method=coco): the console names each failed job and the reason."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import cocoef_cli.run as r\n_real = r.execute\n"
        "def execute(cfg, out, progress=False, **kw):\n"
        "    if cfg['method']['name'] == 'coco':\n        raise RuntimeError('boom in the worker')\n"
        "    return _real(cfg, out, progress, **kw)\nr.execute = execute\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), *sys.path])}
    out = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, "-m", "cocoef_cli.cli", "sweep", "smoke", "iters=5", "-j", "2", "-q", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("failed: ")]
    assert sorted(failed) == [
        f"failed: method=coco,straggler.p={p}: RuntimeError: boom in the worker" for p in (0.1, 0.3)
    ]
    index = pd.read_csv(out / "index.csv").set_index("job")
    assert index.loc["method=coco,straggler.p=0.1", "note"] == "RuntimeError: boom in the worker"
