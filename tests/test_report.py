"""`cocoef report`: figures + summary from a sweep output; bad columns exit 2; diverged runs flagged."""

import json
from pathlib import Path

import numpy as np
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
    res = runner.invoke(
        app, ["report", str(run), "--out", str(tmp_path), "--x", "bits_up", "--y", "train_loss", "--hue", "method"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "train_loss_vs_bits_up.png").exists()


@pytest.mark.parametrize("opt", ["--x", "--y", "--hue"])
def test_report_bad_column_exits_2(sweep_dir, tmp_path, opt):
    res = runner.invoke(app, ["report", str(sweep_dir), "--out", str(tmp_path), opt, "nope"])
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "\n" not in line and f"{opt}='nope'" in line and "accepted" in line
    assert ("method.name" if opt == "--hue" else "opt_gap") in line.partition("accepted")[2]
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
    _, runs = load_runs(copy)
    assert (runs["status"] == "diverged").sum() == 1
    res = runner.invoke(app, ["report", str(copy), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "Not plotted" in summary and run.name in summary


def test_fixed_styles_and_bits_to_target():
    assert style_for("coco_ef", "topk") != style_for("coco", "topk")
    assert style_for("gc", "identity") == style_for("gc", "anything")
    assert style_for("new_method", "x") == style_for("new_method", "x")
    rows = pd.DataFrame(
        {
            "label": ["a"] * 6,
            "method": "m",
            "compressor": "c",
            "status": "completed",
            "run": "r",
            "seed": [0, 0, 0, 1, 1, 1],
            "iter": [0, 1, 2] * 2,
            "bits_up": [0, 10, 20] * 2,
            "opt_gap": [1.0, 0.1, 0.01, 1.0, 0.5, 0.05],
        }
    )
    t = bits_to_target(rows, "label", "opt_gap", 0.1)
    assert t["bits_to_target"].iloc[0] == 15 and t["seeds_reached"].iloc[0] == "2/2"
    t = bits_to_target(rows, "label", "opt_gap", 0.02)
    assert t["bits_to_target"].isna().iloc[0] and t["seeds_reached"].iloc[0] == "1/2"


# ------------------------------------------------------------------ one curve = one configuration
GRID = ["method=coco_ef", "straggler.p=0.2", "compressor.ratio=0.1,0.3", "optim.lr=0.05,0.1", "dataset.noise=0.1,0.5"]


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory) -> Path:
    """A 2×2×2 sweep of keys outside the identity columns (2 seeds per job)."""
    out = tmp_path_factory.mktemp("grid") / "g"
    res = runner.invoke(app, ["sweep", "smoke", *GRID, "--out", str(out), "--launcher", "basic", "--quiet"])
    assert res.exit_code == 0, res.output
    return out


def _t_band(v: np.ndarray) -> tuple[float, float, float]:
    """mean and 95% Student-t interval of v, computed here independently of the report."""
    from scipy import stats

    m = float(np.mean(v))
    h = float(stats.t.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v)))
    return m, m - h, m + h


def test_a_grid_of_non_identity_keys_gives_one_curve_per_configuration(grid_dir, tmp_path):
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(grid_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 8 and (summary["seeds"] == 2).all()
    keys = ["compressor.ratio", "dataset.noise", "optim.lr"]
    assert set(keys) <= set(summary.columns) and "curve" in summary.columns
    assert len(summary[keys].drop_duplicates()) == 8
    # every final value: the mean and 95% t-interval over the 2 seeds of that job's metrics.csv
    for r in summary.itertuples():
        job = grid_dir / f"compressor.ratio={r._2:g},dataset.noise={r._3:g},optim.lr={r._4:g}"
        m = pd.read_csv(job / "metrics.csv")
        last = m[m.iter == m.iter.max()].train_loss.to_numpy()
        mean, lo, _ = _t_band(last)
        assert r.train_loss_mean == pytest.approx(mean, rel=1e-12)
        assert r.train_loss_ci95 == pytest.approx(mean - lo, rel=1e-9)
    md = (out / "summary.md").read_text()
    assert "8 curve(s)" in md and "compressor.ratio" in md


def test_curves_csv_holds_the_mean_and_band_of_each_curve_at_each_x(grid_dir, tmp_path):
    out = tmp_path / "rep"
    assert runner.invoke(app, ["report", str(grid_dir), "--out", str(out), "--y", "train_loss"]).exit_code == 0
    pts = pd.read_csv(out / "curves.csv")
    assert set(pts.figure) == {"train_loss_vs_iter", "train_loss_vs_bits_up"}
    for job in (p.parent for p in grid_dir.glob("*/metrics.csv")):
        cfg = json.loads((job / "run.json").read_text())["config"]
        m = pd.read_csv(job / "metrics.csv")
        mine = pts[
            (pts.figure == "train_loss_vs_bits_up")
            & (pts["compressor.ratio"] == cfg["compressor"]["ratio"])
            & (pts["optim.lr"] == cfg["optim"]["lr"])
            & (pts["dataset.noise"] == cfg["dataset"]["noise"])
        ]
        assert sorted(mine.iter) == sorted(m.iter.unique())
        for it, g in m.groupby("iter"):
            row = mine[mine.iter == it].iloc[0]
            mean, lo, hi = _t_band(g.train_loss.to_numpy())
            assert row["mean"] == pytest.approx(mean, rel=1e-12) and row.seeds == 2
            assert row["x"] == pytest.approx(g.bits_up.mean(), rel=1e-12)
            if hi > lo:
                assert row["lo"] == pytest.approx(lo, rel=1e-9) and row["hi"] == pytest.approx(hi, rel=1e-9)


def test_diverged_and_failed_runs_are_never_averaged_in(grid_dir, tmp_path):
    import shutil

    copy = tmp_path / "g"
    shutil.copytree(grid_dir, copy)
    jobs = sorted(p.parent for p in copy.glob("*/run.json"))
    for job, status in zip(jobs[:2], ("diverged", "failed")):
        rec = json.loads((job / "run.json").read_text())
        (job / "run.json").write_text(json.dumps({**rec, "status": status, "diverged": {"1": 20}}))
        m = pd.read_csv(job / "metrics.csv")
        m.loc[m.seed == 1, "train_loss"] = 1e30  # a value that would show in any mean it entered
        m.to_csv(job / "metrics.csv", index=False)
    out = tmp_path / "rep"
    assert runner.invoke(app, ["report", str(copy), "--out", str(out), "--y", "train_loss"]).exit_code == 0
    summary, pts = pd.read_csv(out / "summary.csv"), pd.read_csv(out / "curves.csv")
    assert len(summary) == 6 and (summary.train_loss_mean < 1e3).all() and (pts["mean"] < 1e3).all()
    md = (out / "summary.md").read_text()
    assert f"`{jobs[0].name}`: diverged" in md and f"`{jobs[1].name}`: failed" in md


def test_runs_differing_only_in_iters_are_two_curves(tmp_path):
    base = ["dataset.n=120", "dataset.dim=4", "devices=4", "code.d=2", "seeds=2", "eval_every=5"]
    for iters in (10, 20):
        assert (
            runner.invoke(
                app, ["run", *base, f"iters={iters}", "--out", str(tmp_path / "runs" / f"t{iters}"), "-q"]
            ).exit_code
            == 0
        )
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary.iters) == [10, 20] and sorted(summary["iter"]) == [10, 20] and (summary.seeds == 2).all()
    assert sorted(summary.curve) == ["T=10", "T=20"]
    assert "Setting: COCO-EF, M=4, sgc d=2, p=0.2, top-k 10%" in (out / "summary.md").read_text()


def test_too_many_varying_keys_exit_2_naming_them(tmp_path):
    base = ["dataset.n=120", "dataset.dim=4", "devices=4", "code.d=2", "iters=5"]
    changes = ["optim.lr=0.05", "dataset.noise=0.3", "straggler.p=0.3", "compressor.ratio=0.3", "eval_every=5"]
    for i, ch in enumerate(["seed=0", *changes]):
        assert runner.invoke(app, ["run", *base, ch, "--out", str(tmp_path / "runs" / f"r{i}"), "-q"]).exit_code == 0
    out = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out)])
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "\n" not in line and "more keys vary than the figure can show" in line and "--where" in line
    for key in ("optim.lr", "dataset.noise", "straggler.p", "compressor.ratio", "eval_every"):
        assert key in line
    assert not out.exists()
    # selecting runs makes it drawable
    res = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(out), "--where", "eval_every=10"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out / "summary.csv")) == 5


def test_hue_style_facets_and_where(grid_dir, tmp_path):
    res = runner.invoke(
        app,
        [
            "report",
            str(grid_dir),
            "--out",
            str(tmp_path / "a"),
            "--hue",
            "method,compressor.ratio",
            "--col",
            "optim.lr",
            "--row",
            "dataset.noise",
            "--title",
            "my title",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(tmp_path / "a" / "summary.csv")
    assert len(summary) == 8 and set(summary.curve) == {"COCO-EF, k/D=0.1", "COCO-EF, k/D=0.3"}
    res = runner.invoke(
        app,
        [
            "report",
            str(grid_dir),
            "--out",
            str(tmp_path / "b"),
            "--where",
            "optim.lr=0.05",
            "--where",
            "dataset.noise=0.5",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = pd.read_csv(tmp_path / "b" / "summary.csv")
    assert len(summary) == 2 and list(summary.columns[:2]) == ["curve", "compressor.ratio"]
    md = (tmp_path / "b" / "summary.md").read_text()
    assert "k/D" in md or "compressor.ratio" in md
    res = runner.invoke(app, ["report", str(grid_dir), "--out", str(tmp_path / "c"), "--where", "optim.lrr=0.05"])
    assert res.exit_code == 2 and "did you mean optim.lr" in res.stderr
    res = runner.invoke(app, ["report", str(grid_dir), "--out", str(tmp_path / "c"), "--where", "optim.lr=7"])
    assert res.exit_code == 2 and "no run has optim.lr=7" in res.stderr
    res = runner.invoke(app, ["report", str(grid_dir), "--out", str(tmp_path / "c"), "--hue", "optim.lr"])
    assert res.exit_code == 0  # the other two keys go to style and a facet
    res = runner.invoke(
        app,
        [
            "report",
            str(grid_dir),
            "--out",
            str(tmp_path / "d"),
            "--hue",
            "optim.lr",
            "--style",
            "optim.lr",
            "--col",
            "optim.lr",
            "--row",
            "optim.lr",
        ],
    )
    assert res.exit_code == 2 and "not shown: compressor.ratio, dataset.noise" in res.stderr


def test_default_title_states_the_constant_setting(grid_dir, tmp_path):
    from cocoef_cli.report import load_runs, setting_title

    rows, runs = load_runs(grid_dir)
    assert setting_title(runs, rows) == "COCO-EF, M=6, sgc d=2, p=0.2, top-k, synthetic_linreg/linear"
    rows, runs = load_runs(sorted(p.parent for p in grid_dir.glob("*/run.json"))[0])
    assert setting_title(runs, rows) == "COCO-EF, M=6, sgc d=2, p=0.2, top-k 10%, synthetic_linreg/linear"


def test_runs_of_one_config_in_several_folders_are_one_curve_averaging_their_seeds(tmp_path):
    """seed=0,1,2 as three sweep jobs: one configuration, one curve over the three seeds."""
    out = tmp_path / "s"
    res = runner.invoke(
        app,
        [
            "sweep",
            "none",
            "seed=0,1,2",
            "devices=6",
            "code.d=2",
            "iters=10",
            "dataset.n=240",
            "--launcher",
            "basic",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "rep")]).exit_code == 0
    summary = pd.read_csv(tmp_path / "rep" / "summary.csv")
    assert len(summary) == 1 and summary.seeds.iloc[0] == 3 and summary.runs.iloc[0] == 3
    finals = [pd.read_csv(p).query("iter == 10").train_loss.iloc[0] for p in sorted(out.glob("*/metrics.csv"))]
    assert summary.train_loss_mean.iloc[0] == pytest.approx(np.mean(finals), rel=1e-12)
