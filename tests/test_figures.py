"""`cocoef figures --quick --only NAME` end to end into a temporary folder; experiment files; tuning records."""

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cocoef_cli.cli import app
from cocoef_cli.figures import arm_task, load_experiments, render, run_tasks, write_lrs

runner = CliRunner()


def test_experiment_files_are_consistent():
    exps = load_experiments()
    assert {
        "fig1_gap_iters",
        "fig2_gap_bits",
        "fig3_mnist",
        "fig4_vs_p",
        "fig5a_vs_ratio",
        "fig6_vs_d",
        "fig7_vs_time",
        "fig8_bits_table",
    } <= set(exps)
    for exp in exps.values():
        if exp.plot["kind"] == "table":
            assert all(p["runs_of"] in exps for p in exp.plot["tables"])
            continue
        assert exp.arms and exp.plot.get("title") and exp.plot.get("shows")
        for arm in exp.arms:
            assert arm.lr is not None or exp.sweep.get("lr_grid"), (exp.name, arm.id)
            assert all(isinstance(o, str) and "=" in o for o in arm.overrides)
        assert all(isinstance(o, str) for o in exp.sweep.get("overrides", []))


def test_unknown_experiment_exits_2(tmp_path):
    res = runner.invoke(app, ["figures", "--quick", "--only", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--only='nope'" in res.output and "fig1_gap_iters" in res.output


def test_write_lrs_keeps_comments(tmp_path):
    p = tmp_path / "step_sizes.yaml"
    p.write_text("# keep me\nbaselines:\n  a: 0.2\n\n# and me\nfig:\n  a: 0.2  # a's\n  b: 0.4\n")
    write_lrs(p, "fig", {"a": 0.8, "c": 0.05})
    write_lrs(p, "new", {"a": 1.6})
    text = p.read_text()
    assert "# keep me\nbaselines:\n  a: 0.2\n\n# and me\nfig:\n  a: 0.8  # a's\n  b: 0.4\n  c: 0.05\n" in text
    assert yaml.safe_load(text) == {"baselines": {"a": 0.2}, "fig": {"a": 0.8, "b": 0.4, "c": 0.05}, "new": {"a": 1.6}}


def test_tuned_step_sizes_live_in_one_file():
    """conf/step_sizes.yaml holds every tuned lr: the baseline arms resolve theirs from it, the
    figure arms read their experiment's block, the demo its ``demo`` block."""
    from cocoef_cli import config
    from cocoef_cli.demo import DEMO_RUNS

    table = config.step_sizes()
    for arm in config.options("baseline"):
        assert config.load([f"baseline={arm}"])["optim"]["lr"] == table["baselines"][arm]
    for exp in load_experiments().values():
        for a in exp.arms if exp.plot.get("kind") != "table" and not exp.sweep.get("lr_grid") else []:
            assert a.lr == table[exp.lr_setting][a.id], (exp.name, a.id)
    assert {arm for _, arm, _ in DEMO_RUNS} == set(table["demo"])
    for path in (config.config_dir() / "baseline").glob("*.yaml"):
        assert "${step_size:baselines," in path.read_text()


def test_an_arm_with_its_own_lr_is_refused(tmp_path):
    import shutil

    from cocoef_cli import config
    from cocoef_cli.errors import ConfigError

    shutil.copytree(config.config_dir(), tmp_path / "conf")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "f.yaml").write_text(
        "sweep: {name: s, preset: smoke}\narms:\n  - {id: a, overrides: [method=gc], lr: 0.3}\n"
    )
    with pytest.raises(ConfigError, match=r"f.yaml: arms\[a\].lr=0.3: tuned step sizes live in one file"):
        load_experiments(tmp_path / "conf")


def test_figures_quick_only_end_to_end(tmp_path):
    out, runs = tmp_path / "res", tmp_path / "runs"
    args = ["figures", "--quick", "--only", "fig7_vs_time", "--out", str(out), "--runs", str(runs)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    png = out / "figures" / "fig7_vs_time.png"
    assert 10_000 < png.stat().st_size < 150_000 and png.with_suffix(".pdf").exists()  # small PNGs (committed)
    summ = pd.read_csv(png.with_suffix(".csv"))
    assert len(summ) == 4 and {"label", "lr", "opt_gap_mean", "sim_time_mean"} <= set(summ.columns)
    gallery = (out / "README.md").read_text()
    assert "fig7_vs_time.png" in gallery and "cocoef figures --only fig7_vs_time --quick" in gallery
    assert "cocoef sweep fig_delay" in gallery and "4 of 4 jobs run (0 resumed)" in gallery
    # resumable: every arm's sweep, run again (in-process: cheap), finds its job done and runs nothing
    exp = load_experiments()["fig7_vs_time"]
    for arm in exp.arms:
        task = arm_task(exp, arm, runs, quick=True)
        res = runner.invoke(app, task.argv)
        assert res.exit_code == 0 and "(1 skipped as already done)" in res.output, res.output
    # the figures' own runner counts them from the sweep function's result
    tasks = [arm_task(exp, arm, runs, quick=True) for arm in exp.arms]
    assert run_tasks(tasks, 1, lambda m: None) == {"jobs": 4, "skipped": 4}
    # and a re-draw from the same runs gives the same table
    render(exp, {exp.name: exp}, runs, tmp_path / "again", quick=True)
    assert pd.read_csv(tmp_path / "again" / "fig7_vs_time.csv").equals(summ)


@pytest.mark.parametrize("name", sorted(load_experiments()))
def test_every_experiment_arm_composes_valid_configs(name, tmp_path):
    """Every arm of every experiment expands into jobs (--quick grid) and its first job passes the
    config check that ``cocoef run`` makes: a preset key that an arm's option lacks (e.g.
    compressor.ratio with compressor=grouped_sign, straggler.s with straggler=bernoulli) fails here."""
    from cocoef_cli import config
    from cocoef_cli.sweep import check_builds, plan

    exp = load_experiments()[name]
    if exp.plot["kind"] == "table" or exp.spec.get("runs_of"):
        return
    for arm in exp.arms:
        argv = arm_task(exp, arm, tmp_path, quick=True).argv
        jobs = plan(argv[1], argv[2 : argv.index("--out")], launcher="basic", check=False).unique
        assert jobs, (exp.name, arm.id)
        check_builds(jobs[:1], config.config_dir())


def test_a_failed_sweep_says_why_on_the_console_as_it_ends(tmp_path):
    """run_tasks echoes each sweep's reason with FAILED when it ends (not only in the final error)."""
    from cocoef_cli.errors import ConfigError
    from cocoef_cli.figures import Arm, Task

    ovs = ["compressor=grouped_sign", "compressor.ratio=0.5"]
    bad = Task("s", Arm("bad", "bad", ovs, None), "none", ovs, tmp_path / "s")
    lines: list[str] = []
    with pytest.raises(ConfigError):
        run_tasks([bad], 1, lines.append)
    assert len(lines) == 1 and "s/bad: FAILED: " in lines[0] and "compressor.ratio" in lines[0], lines


def test_a_figure_labels_a_swept_preset_by_its_option_and_never_averages_two_configs(tmp_path, small):
    """code=crc_random is a preset of crc (its rows' code column says crc): the figure rows take
    the option the sweep chose, and a point whose rows come from two configs is an error naming
    the key in which they differ, not a silent average."""
    from types import SimpleNamespace

    from cocoef_cli.figures import Arm, FiguresError, Task, _one_run_per_point, arm_rows
    from cocoef_cli.sweep import run_sweep

    ovs = [*small, "devices=6", "code.d=2", "straggler=fixed", "straggler.s=1", "code=crc,crc_random"]
    task = Task("t", Arm("a", "A", [], None), "none", ovs, tmp_path / "s")
    assert run_sweep(task.preset, task.overrides, task.out, "basic", quiet=True, echo=lambda m: None).ok
    rows, _ = arm_rows(task)
    assert set(rows["code"]) == {"crc", "crc_random"}
    exp = SimpleNamespace(name="t")
    _one_run_per_point(exp, rows, ["label", "code"])  # one run per (arm, code): fine
    with pytest.raises(FiguresError, match=r"would average 2 runs .*code\.construction"):
        _one_run_per_point(exp, rows, ["label"])


def test_worker_deaths_names_the_signal_or_the_status():
    from types import SimpleNamespace

    from cocoef_cli.figures import worker_deaths

    procs = {1: SimpleNamespace(pid=11, exitcode=-9), 2: SimpleNamespace(pid=12, exitcode=3)}
    procs[3] = SimpleNamespace(pid=13, exitcode=None)  # still running
    procs[4] = SimpleNamespace(pid=14, exitcode=0)
    why = worker_deaths(procs)
    assert (
        why == "worker pid 11 killed by SIGKILL (the out-of-memory killer sends it); worker pid 12 exited with status 3"
    )
    assert worker_deaths({1: SimpleNamespace(pid=5, exitcode=-11)}) == "worker pid 5 killed by SIGSEGV"
    assert worker_deaths({1: SimpleNamespace(pid=6, exitcode=-40)}) == "worker pid 6 killed by signal 40"  # no name
    assert worker_deaths({1: SimpleNamespace(pid=7, exitcode=-15)}) == (
        "worker pid 7 killed by SIGTERM (the pool stops the other workers when one dies)"
    )
    assert worker_deaths({}) == ""


def test_a_worker_killed_mid_sweep_says_by_what(tmp_path, monkeypatch):
    """A sweep whose worker process is killed (here its model kills it with SIGKILL, as the
    out-of-memory killer would) fails with the signal on the console, not a bare BrokenProcessPool."""
    from cocoef_cli.figures import Arm, FiguresError, Task

    (tmp_path / "killer_model.py").write_text(
        "import os, signal\n"
        "from cocoef_cli.nets import Model\n"
        "class Killer(Model):\n"
        "    def __init__(self, data, **keys):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned worker starts with the parent's sys.path
    ovs = ["dataset=digits", "model=custom", "model._target_=killer_model.Killer", "iters=2"]
    task = Task("s", Arm("killed", "killed", ovs, None), "none", ovs, tmp_path / "s")
    lines: list[str] = []
    with pytest.raises(FiguresError) as failed:
        run_tasks([task], 1, lines.append)
    assert "killed by SIGKILL" in str(failed.value), (str(failed.value), lines)
    assert len(lines) == 1 and "s/killed: FAILED: not finished: worker pid" in lines[0], lines
    assert "BrokenProcessPool" not in lines[0]
