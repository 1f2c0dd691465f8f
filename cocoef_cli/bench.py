"""``cocoef bench``: the simulator against a per-device loop and against the physical limit.

(a) vectorised simulator vs the per-device loop baseline (benchmarks/loop_baseline.py), same run;
(b) one COCO-EF iteration vs one centralised full-batch autograd step (the limit is about 1×);
(c) seeds=10 vs seeds=1;  (d) time per iteration and peak memory as M grows.
Times are medians over repeats after warm-up, measured in one process; the two sides of each ratio
are timed in alternating rounds (:func:`paired_times`), so that a slow phase of a shared machine
does not land on one side only; each scaling point runs in its own subprocess so that its peak
resident memory (ru_maxrss) is its own.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from cocoef_cli import config
from cocoef_cli.sim.codes import CodedSum
from cocoef_cli.sim.engine import Simulation, build_experiment

SETTING = ["code=sgc", "code.d=3", "straggler=bernoulli", "straggler.p=0.2", "method=coco_ef", "compressor=topk",
           "compressor.ratio=0.01", "seeds=1"]
WORKLOADS = {"softmax": ["dataset=mnist5k", "model=softmax"], "mlp": ["dataset=mnist5k", "model=mlp"]}


def median_time(fn: Callable[[], object], repeat: int = 7, warmup: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired_times(fns: Sequence[Callable[[], object]], calls: Sequence[int], rounds: int = 5,
                 warmup: int = 2) -> list[float]:
    """Median wall seconds per call of each of ``fns``, timed in alternating rounds (``calls[i]``
    calls of ``fns[i]`` per round, one function after the other) after ``warmup`` calls of each:
    a slow phase of a shared machine then hits every side of a ratio alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, n, out in zip(fns, calls, times):
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def simulation(overrides: Sequence[str]) -> Simulation:
    """A fresh simulation of the run ``overrides`` describes (its ``step`` is one iteration)."""
    return Simulation(build_experiment(config.load(list(overrides))))


def sim_step_time(overrides: Sequence[str], repeat: int = 9) -> tuple[float, Simulation]:
    sim = simulation(overrides)
    return median_time(sim.step, repeat), sim


def central_step(sim: Simulation) -> Callable[[], None]:
    """One full-batch autograd step of the same model on the same training set: forward, backward,
    θ ← θ − η∇F (of the first replicate's θ)."""
    obj = sim.exp.objective
    theta = sim.theta[:1].detach().clone()

    def step() -> None:
        nonlocal theta
        th = theta.requires_grad_(True)
        loss = obj.model.losses(obj.model.logits(th, obj.X), obj.Y).mean()
        (g,) = torch.autograd.grad(loss, th)
        theta = (th - 0.1 * g).detach()

    return step


def breakdown(sim: Simulation, repeat: int = 9) -> dict[str, float]:
    """Median seconds of each part of one coded update, called as ``Simulation.coded_step`` calls
    them (after ``sim`` has run some updates): partition gradients, stragglers + decoding, encoding
    with the method's step (fused for COCO-EF with Top-k); and one evaluation."""
    exp = sim.exp
    obj, code, method = exp.objective, exp.code, exp.method
    z = exp.straggler.draw()
    a, _ = code.decode(z)
    U = CodedSum(code, obj.partition_grad_blocks(sim.theta), z)
    return {
        "partition gradients": median_time(lambda: obj.partition_grad_blocks(sim.theta), repeat),
        "stragglers + decode": median_time(lambda: code.decode(exp.straggler.draw()), repeat),
        "encode + method step (top-k, EF update, aggregate)": median_time(lambda: method.coded_step(U, z, a), repeat),
        "evaluation (every eval_every updates)": median_time(lambda: obj.evaluate(sim.theta), 3, warmup=1),
    }


def loop_step(overrides: Sequence[str]) -> Callable[[], object]:
    """One iteration of the per-device loop baseline (benchmarks/loop_baseline.py) on the run."""
    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    if folder not in sys.path:  # called once per (model, M): add the folder once
        sys.path.insert(0, folder)
    from loop_baseline import loop_coco_ef

    exp = build_experiment(config.load(list(overrides)))
    return lambda: loop_coco_ef(exp, 1)


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (reset at exec, unlike ru_maxrss, which a child
    inherits from the forking parent), else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scaling_point(overrides: Sequence[str], repeat: int = 3) -> dict:
    """Run in a fresh subprocess: seconds per iteration and peak resident memory (MiB)."""
    code = ("import json; from cocoef_cli.bench import sim_step_time, peak_rss_mib; "
            f"t,_=sim_step_time({list(overrides)!r}, {repeat}); "
            "print(json.dumps({'s': t, 'rss_mib': peak_rss_mib()}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        return {"s": float("nan"), "rss_mib": float("nan"), "error": p.stderr.strip().splitlines()[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def run_bench(quick: bool = False, out: Path | None = None, device: str = "cpu",
              log: Callable[[str], None] = print) -> str:
    """Measure (a)–(d) and return the markdown report (also written to ``out`` when given)."""
    dev = [f"device={device}"]
    rows_a, rows_b, rows_c, rows_d, parts = [], [], [], [], {}
    for name, wl in WORKLOADS.items():
        base = SETTING + wl + dev + ["devices=100"]
        sim = simulation(base)
        t_sim, t_central = paired_times([sim.step, central_step(sim)], [5, 5], rounds=9)
        rows_b.append((name, sim.exp.objective.model.D, t_sim, t_central))
        parts[name] = breakdown(sim)
        log(f"(b) {name}: iteration {t_sim * 1e3:.2f} ms, central step {t_central * 1e3:.2f} ms")
        sim1, sim10 = simulation(base), simulation([o for o in base if o != "seeds=1"] + ["seeds=10"])
        t1, t10 = paired_times([sim1.step, sim10.step], [5, 2])
        rows_c.append((name, t1, t10))
        parts[f"{name}, seeds=10"] = breakdown(sim10, repeat=5)
        log(f"(c) {name}: seeds=10 {t10 * 1e3:.2f} ms vs seeds=1 {t1 * 1e3:.2f} ms")
        for M in ([10, 100] if quick else [10, 100, 1000]):
            ov = SETTING + wl + dev + [f"devices={M}"]
            t_vec, t_loop = paired_times([simulation(ov).step, loop_step(ov)], [5, 1], rounds=9 if M <= 100 else 3,
                                         warmup=1)
            rows_a.append((name, M, t_vec, t_loop))
            log(f"(a) {name} M={M}: simulator {t_vec * 1e3:.2f} ms, loop {t_loop * 1e3:.1f} ms")
        Ms = {"softmax": [10, 100, 1000, 10000], "mlp": [10, 100, 1000]}[name]
        for M in (Ms[:2] if quick else Ms):
            p = scaling_point(SETTING + wl + dev + [f"devices={M}"], repeat=9 if M <= 1000 else 3)
            rows_d.append((name, M, p))
            log(f"(d) {name} M={M}: {p['s'] * 1e3:.1f} ms/iter, peak RSS {p['rss_mib']:.0f} MiB")
    md = ["# Benchmarks", "", f"Machine: {machine()}. Device: `{device}`.", "",
          f"Command: `cocoef bench{' --quick' if quick else ''}` (medians after warm-up, the two sides of each "
          "ratio timed in alternating rounds; setting: mnist5k, "
          "sgc d=3, Bernoulli p=0.2, COCO-EF with Top-k ratio 0.01).", "",
          "## (a) vectorised simulator vs a per-device Python loop (same algorithm, same draws)", "",
          "| model | M | simulator ms/iter | loop ms/iter | speed-up |", "|---|---|---|---|---|"]
    md += [f"| {n} | {M} | {a * 1e3:.2f} | {b * 1e3:.1f} | {b / a:.1f}× |" for n, M, a, b in rows_a]
    md += ["", "## (b) one COCO-EF iteration (M=100) vs one centralised full-batch autograd step", "",
           "| model | D | iteration ms | central step ms | ratio |", "|---|---|---|---|---|"]
    md += [f"| {n} | {D} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f}× |" for n, D, a, b in rows_b]
    md += ["", "Where an iteration's time goes (each part timed alone, ms; evaluation is not part of an update; "
           "the seeds=10 columns are the runs of (c)):", "",
           "| part | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    md += [f"| {part} | " + " | ".join(f"{parts[n][part] * 1e3:.2f}" for n in parts) + " |"
           for part in next(iter(parts.values()))]
    md += ["", "## (c) replicates: seeds=10 vs seeds=1 (M=100)", "",
           "| model | seeds=1 ms | seeds=10 ms | ratio |", "|---|---|---|---|"]
    md += [f"| {n} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}× |" for n, a, b in rows_c]
    md += ["", "## (d) scaling with the number of devices (each point in a fresh process)", "",
           "| model | M | ms/iter | peak RSS MiB |", "|---|---|---|---|"]
    md += [f"| {n} | {M} | {p['s'] * 1e3:.1f} | {p['rss_mib']:.0f} |" for n, M, p in rows_d]
    text = "\n".join(md) + "\n"
    if out is not None:
        from cocoef_cli.record import atomic_write

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out), text)
    return text
