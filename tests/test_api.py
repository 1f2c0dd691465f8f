"""cocoef_cli.api: the CLI's runs as DataFrames; the worked example of docs/api.md; examples/."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cocoef_cli import api
from cocoef_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
TINY = ["dataset.n=200", "dataset.dim=4", "devices=5", "iters=12", "eval_every=4"]


def _blocks(md: Path, lang: str = "python") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", md.read_text(), re.S)


def test_run_gives_the_rows_and_values_of_the_cli_csv(tmp_path):
    ovs = [*TINY, "method=coco_ef", "straggler.p=0.3", "seeds=2"]
    res = runner.invoke(app, ["run", *ovs, "--out", str(tmp_path / "cli"), "-q"])
    assert res.exit_code == 0, res.output
    cli = pd.read_csv(tmp_path / "cli" / "metrics.csv")
    got = api.run(ovs)  # out=None: a temporary folder
    pd.testing.assert_frame_equal(got.metrics, cli)
    assert got.out is None and got.record["run_id"] == cli.run_id.iloc[0] == got.run_id
    assert got.record["threads"] == 1 and got.record["status"] == "completed"
    as_dict = api.run({k: v for k, v in (o.split("=") for o in ovs)})
    pd.testing.assert_frame_equal(as_dict.metrics, cli)
    nested = api.overrides_of({"straggler": {"p": 0.3}, "batch_size": None, "dataset.standardize": False})
    assert nested == ["straggler.p=0.3", "batch_size=null", "dataset.standardize=false"]


def test_run_into_a_folder_reads_a_finished_run_back_and_load_runs(tmp_path):
    out = tmp_path / "r"
    first = api.run([*TINY, "seed=3"], out=out)
    assert first.out == out and (out / "run.json").exists()
    stamp = (out / "run.json").stat().st_mtime_ns
    again = api.run([*TINY, "seed=3"], out=out)  # already done: read back, not rerun
    assert (out / "run.json").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again.metrics, first.metrics)
    rows = api.load_runs(out)
    assert rows.train_loss.tolist() == first.metrics.train_loss.tolist()
    assert rows.attrs["runs"].status.tolist() == ["completed"]
    assert set(rows["straggler.p"]) == {first.record["config"]["straggler"]["p"]}


def test_bad_overrides_raise_the_cli_error():
    from cocoef_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^compressor='topkk': unknown compressor, did you mean topk\?"):
        api.run(["compressor=topkk"])


def test_the_worked_example_of_docs_api_md_runs(tmp_path, monkeypatch, capsys):
    blocks = _blocks(ROOT / "docs" / "api.md")
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "docs/api.md", "exec"), {})
    assert "completed" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # out=None leaves nothing behind


def test_the_compressor_of_docs_plugins_md_runs(tmp_path, monkeypatch):
    code = next(b for b in _blocks(ROOT / "docs" / "plugins.md") if "class SignNorm" in b)
    (tmp_path / "docplug.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    res = api.run([*TINY, "compressor=custom", "compressor._target_=docplug.SignNorm"])
    assert res.record["status"] == "completed"
    assert res.metrics.bits_up.iloc[-1] > 0


def _env(*paths):
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (*paths, ROOT))}


def test_examples_run_from_the_checkout(tmp_path):
    """The plugin package with its YAML folder from the CLI, and the custom-network script."""
    cmd = [sys.executable, "-m", "cocoef_cli.cli", "run", "--config-dir", str(ROOT / "examples/plugin/conf")]
    cmd += ["compressor=topk_dither", "model=skip_mlp", "dataset=iris", "iters=10", "--out", "r", "-q"]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=_env(ROOT / "examples" / "plugin"))
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert m.compressor.iloc[0] == "topk_dither" and m.train_loss.iloc[-1] < m.train_loss.iloc[0]
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_network.py"), "--iters", "10"],
        check=True,
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
    ).stdout
    assert "status completed" in out and "skip_mlp" in out
