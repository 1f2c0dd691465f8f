"""`cocoef report`: figures + summary from a sweep output; bad columns exit 2; diverged runs flagged."""
import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cocoef_cli.cli import app
from cocoef_cli.report import bits_to_target, load_runs, style_for

runner = CliRunner()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sw") / "smoke"
    res = runner.invoke(app, ["sweep", "smoke", "--out", str(out), "--launcher", "basic", "--quiet"])
    assert res.exit_code == 0, res.output
    return out


def test_report_writes_figures_and_summary(sweep_dir, tmp_path):
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(sweep_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("opt_gap_vs_iter", "opt_gap_vs_bits_up"):
        assert (out / f"{name}.png").stat().st_size > 5000
        assert (out / f"{name}.pdf").exists()
    summary = (out / "summary.md").read_text()
    assert "4 run(s), 4 completed" in summary and "coco_ef" in summary
    assert len(pd.read_csv(out / "summary.csv")) == 4


def test_report_single_run_and_options(sweep_dir, tmp_path):
    run = next(p for p in sweep_dir.iterdir() if (p / "metrics.csv").exists())
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path), "--x", "bits_up", "--y", "train_loss",
                              "--hue", "method"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "train_loss_vs_bits_up.png").exists()


@pytest.mark.parametrize("opt", ["--x", "--y", "--hue"])
def test_report_bad_column_exits_2(sweep_dir, tmp_path, opt):
    res = runner.invoke(app, ["report", str(sweep_dir), "--out", str(tmp_path), opt, "nope"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and f"{opt}='nope'" in line and "opt_gap" in line and "accepted" in line
    assert not list(tmp_path.glob("*.png"))


def test_report_missing_dir_exits_2(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no runs found" in res.output


def test_diverged_runs_are_listed_not_plotted(sweep_dir, tmp_path):
    import shutil

    copy = tmp_path / "sw"
    shutil.copytree(sweep_dir, copy)
    run = sorted(p for p in copy.iterdir() if (p / "run.json").exists())[0]
    rec = json.loads((run / "run.json").read_text())
    rec.update(status="diverged", diverged={"0": 12})
    (run / "run.json").write_text(json.dumps(rec))
    rows, runs = load_runs(copy)
    assert (runs["status"] == "diverged").sum() == 1
    res = runner.invoke(app, ["report", str(copy), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "Not plotted" in summary and run.name in summary


def test_fixed_styles_and_bits_to_target():
    assert style_for("coco_ef", "topk") != style_for("coco", "topk")
    assert style_for("gc", "identity") == style_for("gc", "anything")
    assert style_for("new_method", "x") == style_for("new_method", "x")
    rows = pd.DataFrame({"label": ["a"] * 6, "method": "m", "compressor": "c", "status": "completed", "run": "r",
                         "seed": [0, 0, 0, 1, 1, 1], "iter": [0, 1, 2] * 2, "bits_up": [0, 10, 20] * 2,
                         "opt_gap": [1.0, 0.1, 0.01, 1.0, 0.5, 0.05]})
    t = bits_to_target(rows, "label", "opt_gap", 0.1)
    assert t["bits_to_target"].iloc[0] == 15 and t["seeds_reached"].iloc[0] == "2/2"
    t = bits_to_target(rows, "label", "opt_gap", 0.02)
    assert t["bits_to_target"].isna().iloc[0] and t["seeds_reached"].iloc[0] == "1/2"
