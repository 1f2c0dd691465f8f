"""`cocoef bench` building blocks on a small setting (the full benchmark is `make bench`)."""

import math
from pathlib import Path

import pytest

from cocoef_cli import bench
from cocoef_cli.bench import breakdown, central_step, median_time, paired_times, sim_step_time

SMALL = [
    "dataset=synthetic_logreg",
    "model=logistic",
    "devices=12",
    "code=sgc",
    "code.d=3",
    "straggler=bernoulli",
    "straggler.p=0.2",
    "compressor=topk",
    "compressor.ratio=0.1",
]


@pytest.mark.parametrize("method", ["coco_ef", "gc"])
def test_breakdown_times_every_part_of_an_update(method):
    t, sim = sim_step_time(SMALL + [f"method={method}"], repeat=3)
    parts = breakdown(sim, repeat=3)
    assert set(parts) == {
        "partition gradients",
        "stragglers + decode",
        "encode + method step (top-k, EF update, aggregate)",
        "evaluation (every eval_every updates)",
        "for comparison: central autograd step",
        "for comparison: one pass e ← e + G",
        bench.FUSED_KEY,
    }
    assert parts.pop(bench.FUSED_KEY) == 0.0  # 12 devices: too many samples a partition to fuse
    assert all(math.isfinite(s) and s > 0 for s in [t, *parts.values()])
    assert sim.t >= 3  # the timed updates really ran
    assert 0 < median_time(central_step(sim), repeat=3) < 10


@pytest.mark.parametrize("rows_equal", [True, False])
def test_breakdown_says_where_the_kernel_forms_g_s_rows(rows_equal, monkeypatch):
    """With a few samples a partition (here 4; digits, 10 classes) COCO-EF's updates form G's rows in the Top-k kernel
    where the check finds them equal to torch's (made to pass or fail here: whether MKL sums in the kernel's order
    depends on the CPU): the breakdown says which, and the report names the column."""
    from cocoef_cli.sim import codes, kernels

    if kernels.library() is None or not kernels.fused():
        pytest.skip("no compiled kernel with a hardware FMA")
    monkeypatch.setattr(codes, "_same_rows", lambda *a: rows_equal)
    setting = [o for o in SMALL if not o.startswith(("dataset=", "model=", "devices="))]
    _, sim = sim_step_time(setting + ["dataset=digits", "model=softmax", "devices=360", "method=coco_ef"], repeat=3)
    parts = breakdown(sim, repeat=3)
    assert parts[bench.FUSED_KEY] == float(rows_equal)
    assert bench.fused_columns({"a": parts, "b": {**parts, bench.FUSED_KEY: 0.0}}) == (["a"] if rows_equal else [])


def test_paired_times_alternates_rounds_and_takes_medians(monkeypatch):
    """Each function is called warmup times, then in rounds of its own call count, one after the
    other; the result is each function's median call time (here a fake clock: a costs 1, b 3 s,
    except b's first timed call, 100 s, which the median ignores)."""
    clock, calls = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def a():
        calls.append("a")
        clock[0] += 1.0

    def b():
        calls.append("b")
        clock[0] += 100.0 if calls.count("b") == 2 else 3.0  # the first call after the warm-up

    assert paired_times([a, b], [2, 1], rounds=3, warmup=1) == [1.0, 3.0]
    assert "".join(calls) == "ab" + "aab" * 3


def test_the_limit_pass_and_the_state_have_the_run_sizes():
    _, sim = sim_step_time(SMALL + ["method=coco_ef", "seeds=2"], repeat=1)
    obj, D = sim.exp.objective, sim.exp.objective.model.D
    step = bench.fused_pass(sim)
    e = step()
    assert e.shape == (2 * 12, D) and e.dtype == sim.exp.dtype and float(e.sum()) > 0  # e ← 0 + G, G ~ U(0, 1)
    data = sum(t.numel() * 4 for t in (obj.X, obj.Xp, obj.Xte))  # float32
    assert bench.state_mib(sim) == (2 * (12 + sim.exp.code.N) * D * 4 + data) / 2**20


def test_cpu_info_names_the_machine():
    info = bench.cpu_info()
    assert info["cores"] >= 1 and set(info["vector"]) <= set(bench.VECTOR_FLAGS)
    line = bench.machine()
    assert "torch" in line and "Top-k kernel" in line and str(info["model"]) in line


def test_quick_and_smoke_benches_never_replace_the_measured_report(tmp_path, monkeypatch):
    """`cocoef bench` writes results/bench.md; --quick and --smoke write only where --out says."""
    from typer.testing import CliRunner

    from cocoef_cli import bench
    from cocoef_cli.cli import app

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda quick, out, device, log=None, smoke=False: seen.append(out) or "r")
    monkeypatch.chdir(tmp_path)
    for args in (["--smoke"], ["--quick"], ["--smoke", "--out", "x.md"], []):
        res = CliRunner().invoke(app, ["bench", *args])
        assert res.exit_code == 0, res.output
    assert seen == [None, None, Path("x.md"), Path("results/bench.md")]


def test_a_bench_simulation_is_past_the_timing_of_g_s_forms(monkeypatch):
    """bench.simulation starts a run as a run starts (the evaluation at t = 0) and steps it past
    the updates that time G's two forms (codes.FasterForm), so that the bench times the form the
    run keeps; a run with no choice to make takes two steps."""
    from cocoef_cli.sim import codes, compressors
    from cocoef_cli.sim.codes import FasterForm

    if compressors._kernels() is None:
        pytest.skip("no compiled kernel: G is formed whole")
    monkeypatch.setattr(codes, "PART_BYTES", 4 * 2410 * 21)  # a part per replicate
    digits = ["dataset=digits", "model=mlp", "model.hidden=[32]", "devices=21", "seeds=2"]
    sim = bench.simulation(digits + ["compressor.ratio=0.05"])
    assert sim.t == 1 + 2 * (1 + FasterForm.TRIALS) and not sim.exp.code.choosing()
    assert sim.exp.code.form_choice(21).by_parts is not None
    sign = bench.simulation(digits + ["compressor=scaled_sign"])  # no Top-k kernel: G whole, no choice
    assert sign.t == 2 and not sign.exp.code.choosing()
