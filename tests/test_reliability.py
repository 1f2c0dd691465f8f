"""Reliability (issue 7): the validated schema, divergence, crash safety and checkpoints,
reproducibility (`cocoef rerun`, launchers, thread count), never overwriting without --force."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cocoef_cli import checkpoint, config
from cocoef_cli.cli import EXIT_DIVERGED, app
from cocoef_cli.run import execute

runner = CliRunner()
TINY = ["dataset.n=120", "dataset.dim=4", "devices=4", "iters=3", "eval_every=1", "code.d=2"]

# ------------------------------------------------------------------ property-based: the schema
# valid choices combine freely with each other (devices ∈ {4, 6}, d ∈ {1, 2}: d ≤ M and d | M)
VALID = {
    "method": ["coco_ef", "coco", "coco_ef21", "gc", "ef_sgd", "ignore_stragglers", "gd"],
    "compressor": ["topk", "randk", "sign", "scaled_sign", "qsgd", "natural", "identity", "onebit"],
    "code": ["sgc", "frc", "crc", "bgc", "uncoded"],
    "straggler": ["none", "bernoulli", "fixed", "markov", "hetero", "delay"],
    "devices": ["4", "6"],
    "code.d": ["1", "2"],
    "seeds": ["1", "2"],
    "optim.momentum": ["0.0", "0.5"],
    "optim.schedule": ["const", "inv_sqrt"],
    "precision": ["float32", "float64"],
    "batch_size": ["null", "5"],
    "model.l2": ["0.0", "0.01"],
    "checkpoint_every": ["null", "2"],
}
# (overrides, the key the one-line error must name)
INVALID = [
    (["straggler.p=1.5"], "straggler.p"),
    (["straggler.p=abc"], "straggler.p"),
    (["compressor.ratio=0"], "compressor.ratio"),
    (["compressor.k=1000"], "compressor.k"),  # k ≤ D = 5
    (["code.d=99"], "code.d"),
    (["code=frc", "code.d=3", "devices=4"], "code.d"),  # d | M for frc
    (["devices=0"], "devices"),
    (["iters=-1"], "iters"),
    (["eval_every=0"], "eval_every"),
    (["seeds=0"], "seeds"),
    (["seed=x"], "seed"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.momentum=1"], "optim.momentum"),
    (["model.l2=-1"], "model.l2"),
    (["model.bias=maybe"], "model.bias"),
    (["dataset.noise=abc"], "dataset.noise"),
    (["dataset.standardize=3"], "dataset.standardize"),
    (["dataset.seed=-2"], "dataset.seed"),
    (["precision=float16"], "precision"),
    (["method=nope"], "method"),
    (["compressor=nope"], "compressor"),
    (["checkpoint_every=0"], "checkpoint_every"),
    (["threads=0"], "threads"),
    (["batch_size=0"], "batch_size"),
    (["method=coco_diana", "compressor=topk"], "compressor"),  # compressor/method compatibility
    (["straggler=fixed", "straggler.s=9"], "straggler.s"),
    (["devicez=3"], "devicez"),
    (["dataset=mnist", "dataset.root=/nonexistent"], "dataset.root"),  # dataset files present
]


@st.composite
def override_sets(draw):
    chosen = draw(st.dictionaries(st.sampled_from(sorted(VALID)), st.none(), max_size=5))
    ovs = [f"{k}={draw(st.sampled_from(VALID[k]))}" for k in sorted(chosen)]
    if "straggler=fixed" in ovs:  # its default s = 10 exceeds these tiny device counts
        ovs.append("straggler.s=1")
    bad = draw(st.none() | st.sampled_from(INVALID))
    if bad is None:
        return ovs, None
    bad_ovs, key = bad
    keys = {o.partition("=")[0] for o in bad_ovs}
    ovs = [o for o in ovs if o.partition("=")[0] not in keys] + bad_ovs
    if any(o.startswith("dataset=") for o in bad_ovs):
        return [o for o in TINY if not o.startswith("dataset.")] + ovs, key
    return TINY + ovs, key


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=override_sets())
def test_random_override_sets_valid_run_invalid_exit_2(case, tmp_path_factory):
    ovs, key = case
    if key is None:
        ovs = TINY + ovs
    out = tmp_path_factory.mktemp("prop") / "o"
    res = runner.invoke(app, ["run", *ovs, "--out", str(out), "-q"])
    assert "Traceback" not in res.output
    if key is None:
        assert res.exit_code == 0, (ovs, res.output)
        rec = json.loads((out / "run.json").read_text())
        m = pd.read_csv(out / "metrics.csv")
        assert rec["status"] == "completed" and m.iter.max() == 3 and not m.duplicated(["seed", "iter"]).any()
        assert not (out / checkpoint.FILENAME).exists()  # removed once the run is recorded
    else:
        assert res.exit_code == 2, (ovs, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}=") and "accepted:" in lines[0], (ovs, lines)
        assert not out.exists()


def test_check_validates_groups_the_method_ignores_without_building_runs(monkeypatch):
    cfg = config.load([*TINY, "method=gc", "compressor.k=1000"])  # gc sends full precision, but k is a typo
    with pytest.raises(config.ConfigError, match=r"compressor\.k"):
        config.check(cfg, None)
    cfg = config.load([*TINY, "method=gd", "straggler.p=2"])
    with pytest.raises(config.ConfigError, match=r"straggler\.p"):
        config.check(cfg, None)
    big = config.load(["devices=2000", "seeds=300", "dataset.dim=200", "dataset.n=4000", "iters=1"])
    from cocoef_cli.sim import methods

    sizes = []
    init = methods.Method.__init__

    def record(self, cfg, C, R, M, D, *args):
        sizes.append((R, M))
        init(self, cfg, C, R, M, D, *args)

    monkeypatch.setattr(methods.Method, "__init__", record)
    config.check(big, None)  # no R×M×D state: a full build would allocate 300·2000·201 floats (480 MB)
    assert sizes == [(1, 1)]


# --------------------------------------------------------------------------- divergence
def test_divergence_stops_the_seed_keeps_rows_and_is_recorded(tmp_path):
    out = tmp_path / "d"
    res = runner.invoke(app, ["run", *TINY, "iters=200", "eval_every=20", "seeds=2", "optim.lr=1e8", "--out", str(out)])
    assert res.exit_code == EXIT_DIVERGED == 3, res.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "diverged" and set(rec["diverged"]) == {"0", "1"}
    its = set(rec["diverged"].values())
    last = res.output.strip().splitlines()[-1]
    assert last == "diverged: " + ", ".join(f"seed {s} at update {rec['diverged'][str(s)]}" for s in (0, 1))
    assert all(0 < t < 20 for t in its), its  # caught at the update, not at the next evaluation
    m = pd.read_csv(out / "metrics.csv")
    assert set(m.iter) == {0} and m.train_loss.notna().all()  # the rows before it, no garbage
    res = runner.invoke(app, ["run", *TINY, "--out", str(tmp_path / "ok")])
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["diverged"] == {}


CRC = [
    "code=crc",
    "code.construction=random",
    "code.d=3",
    "devices=12",
    "straggler=fixed",
    "straggler.s=2",
    "compressor=topk",
    "compressor.ratio=0.1",
    "optim.lr=0.05",
    "iters=300",
    "precision=float64",
]


def test_a_blow_up_is_a_divergence_in_float64(tmp_path):
    """With Tandon's random H (ill-conditioned decoding weights) the loss of this run grows to 1e86 in
    float64 without ever overflowing: it diverged when it first
    exceeded diverge_factor × its initial loss; with the rule off it runs to the end, finite."""
    res = runner.invoke(app, ["run", *CRC, "--out", str(tmp_path / "a"), "-q"])
    assert res.exit_code == 3, res.output
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert rec["status"] == "diverged" and list(rec["diverged"]) == ["0"]
    again = runner.invoke(app, ["run", *CRC, "--out", str(tmp_path / "a"), "-q"])
    assert again.exit_code == 3 and "already done" in again.output  # the same status as when it ran
    m = pd.read_csv(tmp_path / "a" / "metrics.csv")
    f0, t = m.train_loss.iloc[0], rec["diverged"]["0"]
    assert (m.train_loss <= 1e6 * f0).all() and m.iter.max() < t  # the rows before it, none past it
    res = runner.invoke(app, ["run", *CRC, "diverge_factor=null", "--out", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.output
    m = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert m.iter.max() == 300 and m.train_loss.max() > 1e6 * m.train_loss.iloc[0]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "completed"
    res = runner.invoke(app, ["run", *CRC, "diverge_factor=1e12", "--out", str(tmp_path / "c"), "-q"])
    assert res.exit_code == 3 and json.loads((tmp_path / "c" / "run.json").read_text())["diverged"]["0"] > t


@pytest.mark.parametrize("bad", ["0.5", "1", "true", "abc"])
def test_diverge_factor_is_validated(bad):
    res = runner.invoke(app, ["run", *TINY, f"diverge_factor={bad}"])
    assert res.exit_code == 2 and "diverge_factor" in res.output and "> 1" in res.output


def test_a_diverging_job_does_not_stop_the_sweep(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(
        app,
        [
            "sweep",
            "smoke",
            "method=coco_ef",
            "straggler.p=0.1",
            "optim.lr=0.2,1e8",
            "--launcher",
            "basic",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    index = pd.read_csv(out / "index.csv").set_index("job")
    assert sorted(index.status) == ["completed", "diverged"]
    bad = index.index[index.status == "diverged"][0]
    assert "1e8" in bad or "100000000" in bad
    assert json.loads((out / bad / "run.json").read_text())["diverged"]


# ---------------------------------------------------------------------------- checkpoints
class _Crash(Exception):
    pass


CKPT_CASES = [
    ["straggler=markov", "optim.momentum=0.5"],
    ["straggler=delay", "straggler.deadline=4", "batch_size=7"],
    ["method=coco_diana", "compressor=qsgd", "code=crc"],
    ["dataset=iris", "model=softmax", "method=coco", "compressor=onebit", "straggler=hetero"],
]


@pytest.mark.parametrize("extra", CKPT_CASES, ids=[" ".join(c) for c in CKPT_CASES])
def test_checkpoint_resume_equals_uninterrupted_run(tmp_path, monkeypatch, extra):
    base = [
        "dataset.n=240",
        "dataset.dim=5",
        "devices=6",
        "iters=40",
        "eval_every=5",
        "code.d=2",
        "seeds=2",
        "checkpoint_every=7",
    ]
    if extra[0].startswith("dataset="):
        base = [o for o in base if not o.startswith("dataset.")]
    cfg = config.load(base + extra)
    execute(cfg, tmp_path / "ref")
    real = checkpoint.Checkpoint.save
    saved = []

    def crash_after_third(self, sim, loop):
        real(self, sim, loop)
        saved.append(sim.t)
        if len(saved) == 3:
            raise _Crash

    monkeypatch.setattr(checkpoint.Checkpoint, "save", crash_after_third)
    with pytest.raises(_Crash):
        execute(cfg, tmp_path / "b")
    monkeypatch.setattr(checkpoint.Checkpoint, "save", real)
    assert saved == [7, 14, 21] and checkpoint.read(tmp_path / "b" / checkpoint.FILENAME)["t"] == 21
    execute(cfg, tmp_path / "b")  # resumes at update 21
    rec = json.loads((tmp_path / "b" / "run.json").read_text())
    assert rec["status"] == "completed" and rec["resumed_from"] == 21
    assert (tmp_path / "b" / "metrics.csv").read_bytes() == (tmp_path / "ref" / "metrics.csv").read_bytes()
    assert not (tmp_path / "b" / checkpoint.FILENAME).exists()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


def test_sigkill_after_a_checkpoint_then_rerun_resumes_identically(tmp_path):
    args = [
        "dataset.n=600",
        "dataset.dim=40",
        "devices=20",
        "iters=3000",
        "eval_every=100",
        "code.d=2",
        "straggler=markov",
        "checkpoint_every=200",
    ]
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "cocoef_cli.cli", "run", *args, "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(out / checkpoint.FILENAME, proc), "no checkpoint was written"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not (out / "run.json").exists()
    assert not (out / "metrics.csv").exists()
    t = checkpoint.read(out / checkpoint.FILENAME)["t"]
    assert t > 0 and t % 200 == 0
    res = runner.invoke(app, ["run", *args, "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert f"resuming from the checkpoint at update {t}" in res.stderr
    assert json.loads((out / "run.json").read_text())["resumed_from"] == t
    ref = tmp_path / "ref"
    assert runner.invoke(app, ["run", *args, "checkpoint_every=null", "--out", str(ref), "-q"]).exit_code == 0
    assert (out / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert not list(out.glob(".*.tmp")) and not (out / checkpoint.FILENAME).exists()


def test_a_checkpoint_of_another_run_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "r"
    cfg = config.load([*TINY, "iters=20", "checkpoint_every=5"])
    real = checkpoint.Checkpoint.save

    def crash(self, sim, loop):
        real(self, sim, loop)
        raise _Crash

    checkpoint.Checkpoint.save = crash
    try:
        with pytest.raises(_Crash):
            execute(cfg, out)
    finally:
        checkpoint.Checkpoint.save = real
    before = (out / checkpoint.FILENAME).read_bytes()
    res = runner.invoke(app, ["run", *TINY, "iters=20", "optim.lr=0.1", "--out", str(out)])
    assert res.exit_code == 2 and "checkpoint of another run" in res.stderr
    assert (out / checkpoint.FILENAME).read_bytes() == before
    res = runner.invoke(app, ["run", *TINY, "iters=20", "optim.lr=0.1", "--out", str(out), "--force", "-q"])
    assert res.exit_code == 0 and "resuming" not in res.stderr


def test_a_failed_run_is_replaced_a_finished_one_is_done_or_needs_force(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "failed", "config": {}}))
    assert runner.invoke(app, ["run", *TINY, "--out", str(out), "-q"]).exit_code == 0
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    res = runner.invoke(app, ["run", *TINY, "--out", str(out), "-q"])  # the same config: already done
    assert res.exit_code == 0 and res.stdout.startswith(f"already done: {out} holds this run (completed"), res.output
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == files
    res = runner.invoke(app, ["run", *TINY, "iters=7", "--out", str(out), "-q"])  # another config
    assert res.exit_code == 2 and "--force" in res.stderr and "holds a finished run" in res.stderr
    res = runner.invoke(app, ["run", *TINY, "--out", str(out), "-q", "--force"])  # reruns
    assert res.exit_code == 0 and "already done" not in res.stdout
    assert (out / "run.json").stat().st_mtime_ns > files["run.json"][0]
    assert (out / "metrics.csv").read_bytes() == files["metrics.csv"][1]


# ----------------------------------------------------------------------- reproducibility
def test_two_runs_give_identical_files_and_rerun_says_so(tmp_path):
    args = [*TINY, "iters=30", "eval_every=5", "seeds=2", "straggler=markov", "compressor=qsgd", "method=coco"]
    for name in "ab":
        assert runner.invoke(app, ["run", *args, "--out", str(tmp_path / name), "-q"]).exit_code == 0
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == (tmp_path / "b" / "metrics.csv").read_bytes()
    ra, rb = (json.loads((tmp_path / n / "run.json").read_text()) for n in "ab")
    for r in (ra, rb):
        r.pop("wall_s"), r.pop("command")
    assert ra == rb
    res = runner.invoke(app, ["rerun", str(tmp_path / "a"), "--out", str(tmp_path / "c"), "-q"])
    assert res.exit_code == 0 and res.stdout.startswith("identical"), res.output
    assert (tmp_path / "c" / "metrics.csv").read_bytes() == (tmp_path / "a" / "metrics.csv").read_bytes()
    text = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    text[3] = text[3].replace(",", ";", 1)
    (tmp_path / "a" / "metrics.csv").write_text("\n".join(text) + "\n")
    res = runner.invoke(app, ["rerun", str(tmp_path / "a"), "-q"])  # into a temporary folder
    assert res.exit_code == 1 and "DIFFERENT" in res.stdout and "line 4" in res.stdout
    res = runner.invoke(app, ["rerun", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.stderr.startswith("error: RUN_DIR=")


def test_metrics_do_not_depend_on_the_callers_thread_count(tmp_path):
    import torch

    # softmax on digits: its float reductions change with the number of torch threads (measured)
    cfg = config.load(["dataset=digits", "model=softmax", "iters=20", "eval_every=5", "optim.lr=0.5", "devices=20"])
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            execute(cfg, tmp_path / str(n))
            assert torch.get_num_threads() == n  # restored after the run
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "1" / "metrics.csv").read_bytes() == (tmp_path / "2" / "metrics.csv").read_bytes()


def test_basic_and_joblib_launchers_write_identical_metrics(tmp_path):
    for launcher in ("basic", "joblib"):
        extra = ["--jobs", "2"] if launcher == "joblib" else []
        res = runner.invoke(
            app, ["sweep", "smoke", "--launcher", launcher, *extra, "--out", str(tmp_path / launcher), "-q"]
        )
        assert res.exit_code == 0, res.output
    jobs = sorted(p.parent.name for p in (tmp_path / "basic").glob("*/metrics.csv"))
    assert len(jobs) == 4
    for j in jobs:
        assert (tmp_path / "basic" / j / "metrics.csv").read_bytes() == (
            tmp_path / "joblib" / j / "metrics.csv"
        ).read_bytes()


def test_sweep_sigkilled_midway_resumes_complete_and_duplicate_free(tmp_path):
    out = tmp_path / "s"
    longer = ["iters=1500", "eval_every=100", "checkpoint_every=100", "dataset.n=600", "dataset.dim=30"]
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
    try:  # kill once one job is finished and another has checkpointed
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            done = list(out.glob("*/run.json"))
            if done and any(not (p.parent / "run.json").exists() for p in out.glob(f"*/{checkpoint.FILENAME}")):
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it was killed"
    finished = {p.parent.name for p in out.glob("*/run.json")}
    assert 1 <= len(finished) < 4
    res = runner.invoke(app, ["sweep", "smoke", *longer, "--launcher", "basic", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert f"{len(finished)} skipped" in res.stdout
    index = pd.read_csv(out / "index.csv")
    assert len(index) == 4 and index.job.is_unique and (index.status == "completed").all()
    assert any(json.loads((out / j / "run.json").read_text()).get("resumed_from") for j in index.job)
    for j in index.job:
        m = pd.read_csv(out / j / "metrics.csv")
        assert not m.duplicated(["seed", "iter"]).any() and len(m) == 2 * 16  # 2 seeds × iters 0, 100, ..., 1500
        assert not (out / j / checkpoint.FILENAME).exists() and not list((out / j).glob(".*.tmp"))


@pytest.mark.parametrize(
    "overrides,key",
    [
        ([], "diverge_factor"),
        ([], "code.p_assumed"),
        (["method=coco_diana", "compressor=randk_unbiased"], "method.stale_shifts"),
        (["method=coco_ef21"], "method.stale_shifts"),
    ],
)
def test_keys_added_later_keep_older_run_ids_at_their_default(overrides, key):
    """A run recorded before a key existed keeps its id (its sweep folder is not stale) while the
    key is at its default; set to another value, the id changes."""
    from cocoef_cli.record import run_id

    cfg = config.load(overrides)
    group, _, name = key.rpartition(".")
    older = json.loads(json.dumps(cfg))
    (older[group] if group else older).pop(name)
    assert run_id(cfg) == run_id(older)
    other = {"diverge_factor": 1e3, "code.p_assumed": 0.3, "method.stale_shifts": True}[key]
    changed = json.loads(json.dumps(cfg))
    (changed[group] if group else changed)[name] = other
    assert run_id(changed) != run_id(cfg)
