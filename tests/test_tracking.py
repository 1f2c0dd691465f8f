"""Loggers (logger=tensorboard | mlflow), read back with tensorboard's EventAccumulator and
mlflow's client; the CSV/JSON record is unchanged by them. Live progress of a single run."""

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cocoef_cli import config
from cocoef_cli.cli import app
from cocoef_cli.run import _live, execute

runner = CliRunner()
TINY = ["dataset.n=200", "dataset.dim=4", "devices=5", "iters=6", "eval_every=3", "code.d=2", "seeds=2"]


def _series(df: pd.DataFrame, seed: int, col: str) -> list[tuple[int, float]]:
    d = df[df.seed == seed]
    return [(int(t), float(v)) for t, v in zip(d["iter"], d[col])]


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same steps, the same values (to float32 precision: event files store float32)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, tracked = tmp_path / "plain", tmp_path / "tb"
    for out, extra in ((plain, []), (tracked, ["logger=tensorboard"])):
        res = runner.invoke(app, ["run", *TINY, *extra, "--out", str(out), "-q"])
        assert res.exit_code == 0, res.output
    # the record is the same with a logger: metrics.csv byte-identical, the same run_id
    assert (plain / "metrics.csv").read_bytes() == (tracked / "metrics.csv").read_bytes()
    rec = json.loads((tracked / "run.json").read_text())
    assert rec["run_id"] == json.loads((plain / "run.json").read_text())["run_id"]
    assert rec["config"]["logger"]["name"] == "tensorboard"
    df = pd.read_csv(tracked / "metrics.csv")
    acc = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for seed in (0, 1):
        for col in ("train_loss", "opt_gap", "bits_up"):
            _same([(e.step, e.value) for e in acc.Scalars(f"seed{seed}/{col}")], _series(df, seed, col))
    assert "seed0/test_acc" not in tags["scalars"]  # NaN for regression: not logged
    last = df[df["iter"] == df["iter"].max()]
    assert acc.Scalars("final/train_loss")[0].value == pytest.approx(last.train_loss.mean(), rel=1e-6)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "straggler:" in text and rec["run_id"] in text
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    hp = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(rec["config"]["optim"]["lr"])
    assert hp["method.name"].string_value == "coco_ef" and hp["status"].string_value == "completed"
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "final/train_loss" in [m.name.tag for m in exp.metric_infos]
    assert sorted(p.parent for p in tmp_path.rglob("run.json")) == [plain, tracked]


def test_mlflow_run_read_back_and_a_failed_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("mlflow", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *TINY, "logger=mlflow", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cocoef").experiment_id])
    rec = json.loads((out / "run.json").read_text())
    assert run.data.params["optim.lr"] == str(rec["config"]["optim"]["lr"]) and run.data.params["devices"] == "5"
    assert run.data.tags["status"] == "completed" and run.data.tags["cocoef.run_id"] == rec["run_id"]
    assert run.info.status == "FINISHED"
    df = pd.read_csv(out / "metrics.csv")
    for seed in (0, 1):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"seed{seed}/train_loss"))
        _same(hist, _series(df, seed, "train_loss"))
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["cocoef-run.json", "metrics.csv"]
    art = client.download_artifacts(run.info.run_id, "metrics.csv", str(tmp_path))
    assert Path(art).read_bytes() == (out / "metrics.csv").read_bytes()
    assert [p.parent for p in tmp_path.rglob("run.json")] == [out]  # report reads run folders only

    # a failed run, tracked in a store given by URI: status tag failed
    import cocoef_cli.run as run_mod

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(run_mod, "simulate", boom)
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = config.check(
        config.compose([*TINY, "logger=mlflow", f"logger.tracking_uri={store}", "logger.experiment=mine"]), None
    )
    with pytest.raises(RuntimeError, match="boom"):
        execute(cfg, tmp_path / "failed")
    client = MlflowClient(tracking_uri=store)
    (failed,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert failed.data.tags["status"] == "failed" and "boom" in failed.data.tags["error"]
    assert failed.info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(failed.info.run_id)] == ["cocoef-run.json"]
    assert (tmp_path / "store" / "mlartifacts").is_dir()  # beside the store, not in the cwd


def test_mlflow_one_run_per_sweep_job_in_the_sweep_store(tmp_path):
    pytest.importorskip("mlflow", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    from mlflow.tracking import MlflowClient

    from cocoef_cli.sweep import run_sweep

    out = tmp_path / "sw"
    res = run_sweep(
        "smoke", ["logger=mlflow", "iters=4", "eval_every=2"], out, "joblib", 2, quiet=True, echo=lambda m: None
    )
    assert res.ok and len(res.jobs) == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cocoef").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(j.name for j in res.jobs)
    assert all(r.data.tags["status"] == "completed" and r.info.status == "FINISHED" for r in runs)
    assert sorted(p.parent for p in out.rglob("run.json") if ".hydra" not in p.parts) == sorted(
        out / j.name for j in res.jobs
    )


def test_a_missing_extra_exits_2_naming_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    res = runner.invoke(app, ["run", *TINY, "logger=mlflow", "--out", str(tmp_path / "x")])
    assert (
        res.exit_code == 2 and "pip install -e '.[tracking]'" in res.stderr and "mlflow is not installed" in res.stderr
    )
    assert not (tmp_path / "x").exists()


def test_records_stream_to_the_progress_hook(tmp_path):
    """simulate hands every evaluation to on_record as it is recorded: together, the metrics rows."""
    from cocoef_cli.sim.engine import build_experiment, simulate

    tiny = [o for o in TINY if not o.startswith("dataset.")]
    cfg = config.check(config.compose([*tiny, "dataset=digits", "model=softmax", "optim.lr=0.5"]), None)
    frames = []
    res = simulate(build_experiment(cfg), "x", on_record=frames.append)
    got = pd.concat([f.frame() for f in frames]).sort_values(["seed", "iter"], kind="stable")
    assert got["train_loss"].tolist() == res.metrics["train_loss"].tolist() and len(frames) == 3
    text = _live(frames[-1])
    assert text.startswith(f"train_loss {frames[-1]['train_loss'].mean():.4g}") and "test_acc 0." in text
    assert "test_acc" not in _live(frames[-1].with_constant("test_acc", float("nan")))


def test_a_failing_tracker_never_fails_the_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    from cocoef_cli.tracking import TensorBoardLogger

    def broken(self, points):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardLogger, "_log", broken)
    cfg = config.check(config.compose([*TINY, "logger=tensorboard"]), None)
    _, res = execute(cfg, tmp_path / "r")
    assert res.status == "completed" and json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("warning: logger=tensorboard stopped tracking: OSError: disk full") == 1


def test_a_tracker_that_cannot_start_never_fails_the_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard", reason="the tracking extra is not installed: pip install -e '.[tracking]'")
    from cocoef_cli.tracking import TensorBoardLogger

    def broken(self, *args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(TensorBoardLogger, "__init__", broken)
    cfg = config.check(config.compose([*TINY, "logger=tensorboard"]), None)
    _, res = execute(cfg, tmp_path / "r")
    assert res.status == "completed" and json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "completed"
    assert "warning: logger=tensorboard could not start: OSError: read-only file system" in capsys.readouterr().err
