"""The `cocoef` command line through Typer's CliRunner and as a real subprocess."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from cocoef_cli.cli import app
from cocoef_cli.sim.engine import COLUMNS

runner = CliRunner()
TINY = ["dataset.n=200", "dataset.dim=4", "devices=5", "iters=6", "eval_every=3", "code.d=2"]


def test_run_writes_csv_and_json(tmp_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *TINY, "seeds=2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "metrics.csv")
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert len(df) == 2 * 3 and set(df.seed) == {0, 1}
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "completed" and rec["config"]["devices"] == 5
    assert set(rec["versions"]) >= {"python", "torch", "numpy", "cocoef"} and rec["wall_s"] >= 0
    assert "command" in rec and "git" in rec
    assert "metrics.csv" in res.stdout and "train_loss" in res.stdout
    # a finished run is not overwritten without --force
    again = runner.invoke(app, ["run", *TINY, "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
    assert runner.invoke(app, ["run", *TINY, "--out", str(out), "--force"]).exit_code == 0


BAD = [
    (["compressor=foo"], "compressor"),
    (["method=nope"], "method"),
    (["straggler.p=1.0"], "straggler.p"),
    (["straggler.p=-0.1"], "straggler.p"),
    (["compressor.k=0"], "compressor.k"),
    (["compressor.k=10"], "compressor.k"),  # D = 5 here
    (["devices=0"], "devices"),
    (["code.d=9"], "code.d"),
    (["code=frc", "code.d=2"], "code.d"),  # 2 does not divide 5
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1"], "optim.lr"),
    (["iters=2.5"], "iters"),
    (["iters=abc"], "iters"),
    (["dataset=csv"], "dataset.path"),
    (["dataset=csv", "dataset.path=/nonexistent/x.csv"], "dataset.path"),
    (["compressor.kk=3"], "compressor.kk"),
    (["devicez=3"], "devicez"),
    (["method=coco_diana", "compressor=topk"], "compressor"),
    (["model=softmax"], "model"),
    (["precision=float16"], "precision"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, overrides, key):
    out = tmp_path / "never"
    base = [o for o in TINY if not o.startswith("dataset.")] if "dataset=csv" in overrides else TINY
    res = runner.invoke(app, ["run", *base, *overrides, "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}=") and "accepted:" in lines[0]
    assert "Traceback" not in res.output
    assert not out.exists()


def test_bad_input_as_a_process_has_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "cocoef_cli.cli", "run", "straggler.p=1.5", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "straggler.p=1.5" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "x").exists()


def test_list():
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0
    for name in ["coco_ef", "coco_diana", "topk", "grouped_sign", "sgc", "crc", "markov", "delay", "digits", "softmax"]:
        assert name in res.stdout
    res = runner.invoke(app, ["list", "compressors"])
    assert res.exit_code == 0 and "topk" in res.stdout and "sgc" not in res.stdout
    assert runner.invoke(app, ["list", "bogus"]).exit_code == 2


@pytest.mark.parametrize("code,d,devices", [("crc", 3, 8), ("frc", 2, 6), ("bgc", 2, 6), ("rgc", 3, 8)])
def test_check_code(code, d, devices):
    res = runner.invoke(app, ["check-code", f"code={code}", f"code.d={d}", f"devices={devices}"])
    assert res.exit_code == 0, res.output
    worst = float(res.stdout.split()[-1])
    assert "e" in res.stdout.split()[-1]  # scientific notation
    assert (worst < 1e-9) == (code not in ("bgc", "rgc"))  # approximate codes have a residual
    assert "max |B_ij|" in res.stdout and "max_i |a_i| worst" in res.stdout and "enumerated" in res.stdout


def test_check_code_conditioning_of_crc_constructions():
    def worst_a(*extra):
        res = runner.invoke(app, ["check-code", "code=crc", "code.d=3", "devices=12", *extra])
        assert res.exit_code == 0, res.output
        return float(res.stdout.split("max_i |a_i| worst ")[1].split(",")[0])

    assert worst_a() < 10 < 100 * worst_a() < worst_a("code.construction=random")


def test_check_code_sgc_reports_the_spread_not_a_residual():
    res = runner.invoke(app, ["check-code", "code=sgc", "code.d=3", "devices=6"])
    assert res.exit_code == 0, res.output
    assert "worst decoding residual" not in res.stdout and "unbiased in expectation only" in res.stdout
    spread = float(res.stdout.split("spread (rms) ")[1].split(",")[0])
    assert spread > 0.01


def test_help_of_every_verb():
    for verb in ["run", "list", "check-code", "sweep", "report", "figures", "tune", "rerun", "bench"]:
        res = runner.invoke(app, [verb, "--help"])
        assert res.exit_code == 0 and "Usage" in res.stdout


def test_demo_writes_csvs_and_figure(tmp_path):
    from cocoef_cli.demo import main

    main(["--out", str(tmp_path), "iters=20", "seeds=2", "devices=20"])
    csvs = sorted(tmp_path.glob("*/metrics.csv"))
    assert len(csvs) == 6
    assert (tmp_path / "gap_vs_bits.png").stat().st_size > 10_000 and (tmp_path / "gap_vs_bits.pdf").exists()
    df = pd.read_csv(csvs[0])
    assert df.opt_gap.notna().all() and set(df.seed) == {0, 1}


def test_every_config_folder_ships_with_wheels():
    """pyproject's data-files must list conf/ and each of its groups (installed wheels read them)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shipped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    groups = sorted(str(p.relative_to(root / "conf")) for p in (root / "conf").rglob("*") if p.is_dir())
    expected = {"share/cocoef/conf": ["conf/*.yaml"]} | {f"share/cocoef/conf/{g}": [f"conf/{g}/*.yaml"] for g in groups}
    assert shipped == expected


def test_run_checks_against_its_own_config_dir(tmp_path, monkeypatch):
    """`run --config-dir B` validates against B only, never the default root ($COCOEF_CONFIG_DIR)."""
    import shutil
    from pathlib import Path

    conf = Path(__file__).resolve().parent.parent / "conf"
    other, mine = tmp_path / "other", tmp_path / "mine"
    shutil.copytree(conf, other)  # the default root: another project's schema (model.init is a number)
    (other / "model" / "linear.yaml").write_text("name: linear\nbias: true\nl2: 0.0\ninit: 0.0\ninit_scale: 0.01\n")
    monkeypatch.setenv("COCOEF_CONFIG_DIR", str(other))
    shutil.copytree(conf, mine)  # the run's root: the shipped one plus a compressor preset of its own
    (mine / "compressor" / "topk_bitmap.yaml").write_text(
        "name: topk\nk: null\nratio: 0.5\nindex_bits: bitmap\nvalue_bits: 32\n"
    )
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *TINY, "compressor=topk_bitmap", "--config-dir", str(mine), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["config"]["compressor"]["index_bits"] == "bitmap"
    bad = [
        (["compressor=nope"], "compressor", "topk_bitmap"),  # accepted: the options of the run's root
        (["compressor=topk_bitmap", "compressor.ratio=2"], "compressor.ratio", "(0, 1]"),
    ]
    for overrides, key, accepted in bad:
        res = runner.invoke(app, ["run", *TINY, *overrides, "--config-dir", str(mine), "--out", str(tmp_path / "x")])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}="), res.output
        assert "accepted:" in lines[0] and accepted in lines[0] and not (tmp_path / "x").exists()


def test_records_name_the_program_without_a_machine_path(monkeypatch):
    from cocoef_cli.record import command_line

    monkeypatch.setattr("sys.argv", ["/home/me/proj/.venv/bin/cocoef", "run", "iters=3"])
    assert command_line() == "cocoef run iters=3"
    monkeypatch.setattr("sys.argv", ["/home/me/proj/cocoef_cli/demo.py", "--out", "runs/demo"])
    assert command_line() == "python -m cocoef_cli.demo --out runs/demo"


def test_the_demo_writes_outside_the_tracked_tree():
    """`make demo` leaves a clean checkout clean: its default folder is ignored by git, and no
    committed file is a run record (records hold the machine's commands and versions)."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    demo_line = next(ln for ln in (root / "Makefile").read_text().splitlines() if "cocoef_cli.demo" in ln)
    out = Path(demo_line.partition("--out")[2].split()[0])
    assert out == Path("runs/demo")
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "x" / "metrics.csv")], cwd=root)
    assert ignored.returncode == 0
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.endswith("run.json")]
