"""``cocoef bench``: the simulator against a per-device loop and against the machine's limit.

(a) vectorised simulator vs the per-device loop baseline (:mod:`cocoef_cli.bench_loop`), same run;
(b) one COCO-EF iteration vs one centralised full-batch autograd step and vs the limit = that
    step + one fused pass over G and the error memory (e ← e + G over two (R·M, D) matrices: an
    iteration must compute the partition gradients and read G and read and write e once), at 1
    thread and at every usable core;
(c) seeds=10 vs 10 × seeds=1 per iteration;  (d) time per iteration and peak memory as M grows,
    against the state that must exist;  (e) the partition gradients of ``model=module`` (any
    nn.Module, torch.func) against the built-in networks and a central autograd step.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cocoef_cli import config
from cocoef_cli.sim.codes import CodedSum, FasterForm
from cocoef_cli.sim.engine import Simulation, build_experiment

SETTING = [
    "code=sgc",
    "code.d=3",
    "straggler=bernoulli",
    "straggler.p=0.2",
    "method=coco_ef",
    "compressor=topk",
    "compressor.ratio=0.01",
    "seeds=1",
]
LIMIT_DEVICES = (100, 1000)  # the M of (b): the iteration against the limit, each with its breakdown
WORKLOADS = {"softmax": ["dataset=mnist5k", "model=softmax"], "mlp": ["dataset=mnist5k", "model=mlp"]}
SMOKE_WORKLOADS = {"logistic": ["dataset=synthetic_logreg", "model=logistic"]}  # `--smoke`: seconds


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


def paired_times(
    fns: Sequence[Callable[[], object]], calls: Sequence[int], rounds: int = 5, warmup: int = 2
) -> list[float]:
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
    """A fresh simulation of the run ``overrides`` describes (its ``step`` is one iteration),
    started as a run starts (the evaluation at t = 0, which forms all of G) and past the first
    updates, where it times G's two forms (:class:`~cocoef_cli.sim.codes.FasterForm`): what is
    timed is the form it keeps."""
    sim = Simulation(build_experiment(config.load(list(overrides))))
    code = sim.exp.code
    if code is not None:
        sim.row()
        for t in range(1 + 4 * (1 + FasterForm.TRIALS)):  # the first update uses the evaluation's G; two choices
            sim.step()
            if t and not code.choosing():
                break
    return sim


def replicate_times(overrides: Sequence[str], rounds: int = 5) -> tuple[float, float, Simulation]:
    """(c): seconds per iteration of the run ``overrides`` (seeds=1) and of the same run with
    seeds=10, timed in alternating rounds, and the seeds=10 simulation (for its breakdown)."""
    one = simulation(overrides)
    ten = simulation([o for o in overrides if o != "seeds=1"] + ["seeds=10"])
    t1, t10 = paired_times([one.step, ten.step], [5, 2], rounds=rounds)
    return t1, t10, ten


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


def fused_pass(sim: Simulation) -> Callable[[], object]:
    """One pass over G and the error memory at the run's sizes: e ← e + G, both (R·M, D) in the
    run's dtype (the memory traffic an iteration cannot avoid besides the partition gradients)."""
    exp = sim.exp
    rows = len(exp.seeds) * int(exp.cfg["devices"])
    e = torch.zeros(rows, exp.objective.model.D, dtype=exp.dtype, device=exp.device)
    G = torch.rand(e.shape, dtype=exp.dtype, device=exp.device, generator=torch.Generator(exp.device).manual_seed(0))
    return lambda: e.add_(G)


def breakdown(sim: Simulation, repeat: int = 9, compare: tuple[float, float] | None = None) -> dict[str, float]:
    """Median seconds of each part of one coded update, called as ``Simulation.coded_step`` calls
    them (after ``sim`` has run some updates): partition gradients, stragglers + decoding, encoding
    with the method's step (fused for COCO-EF with Top-k); one evaluation; and, for comparison, the
    two terms of the limit (the central step and the pass over G and e; ``compare``: those two
    as already timed, in seconds, e.g. paired with the iteration in (b)). Where an update forms
    G's rows in the kernel (:meth:`CodedSum.kernel_terms`), the partition gradients are the
    forward and backward pass that give their terms, and the method step includes forming the
    rows (``FUSED_KEY``: 1.0)."""
    exp = sim.exp
    obj, code, method = exp.objective, exp.code, exp.method
    z = exp.straggler.draw()
    a, _ = code.decode(z)
    source = obj.partition_gradients(sim.theta)
    U = CodedSum(code, source, z)
    method.coded_step(U, z, a)  # as an update runs it: does the kernel form G's rows from their terms?
    fused = U.in_kernel
    if fused:  # then the partition gradients are the forward and backward pass that give the terms
        grads = median_time(lambda: obj.partition_gradients(sim.theta), repeat)
    else:
        U = CodedSum(code, obj.partition_grad_blocks(sim.theta), z)
        grads = median_time(lambda: obj.partition_grad_blocks(sim.theta), repeat)
    return {
        "partition gradients": grads,
        "stragglers + decode": median_time(lambda: code.decode(exp.straggler.draw()), repeat),
        "encode + method step (top-k, EF update, aggregate)": median_time(lambda: method.coded_step(U, z, a), repeat),
        "evaluation (every eval_every updates)": evaluation_time(sim),
        "for comparison: central autograd step": compare[0] if compare else median_time(central_step(sim), repeat),
        "for comparison: one pass e ← e + G": compare[1] if compare else median_time(fused_pass(sim), repeat),
        FUSED_KEY: float(fused),
    }


#: The key of :func:`breakdown`'s result that says (1.0) that an update forms G's rows in the kernel.
FUSED_KEY = "G's rows formed in the kernel"


def fused_columns(parts: dict[str, dict[str, float]]) -> list[str]:
    """The breakdown columns whose updates form G's rows in the kernel (see :func:`breakdown`)."""
    return [name for name, p in parts.items() if p.get(FUSED_KEY)]


def evaluation_time(sim: Simulation, repeat: int = 5) -> float:
    """Median seconds of one evaluation of a coded run beyond the work of the update it precedes:
    the engine's evaluation computes the partition gradients at θ^t for the next update, with F
    from their forward pass (full partitions; :meth:`Simulation.row`), so what it adds is that
    loss, the rest of :meth:`Objective.evaluate` (a forward pass on the test set, Σ_j g_j) and
    the ef_norm column: the median of the whole, less the median of the partition gradients."""
    obj, th = sim.exp.objective, sim.theta
    if sim.exp.code is None or obj.batch_size is not None:
        return median_time(lambda: (obj.evaluate(th), sim.state_norm()), repeat, warmup=1)
    whole, grads = paired_times(
        [
            lambda: (obj.evaluate(th, *obj.partition_loss_grad_blocks(th)), sim.state_norm()),
            lambda: obj.partition_grad_blocks(th),
        ],
        [1, 1],
        rounds=repeat,
    )
    return max(whole - grads, 0.0)


def loop_step(overrides: Sequence[str]) -> Callable[[], object]:
    """One iteration of the per-device loop baseline (:mod:`cocoef_cli.bench_loop`) on the run."""
    from cocoef_cli.bench_loop import loop_coco_ef

    exp = build_experiment(config.load(list(overrides)))
    return lambda: loop_coco_ef(exp, 1)


def peak_rss_mib(current: bool = False) -> float:
    """This process's peak resident memory: VmHWM (reset at exec, unlike ru_maxrss, which a child
    inherits from the forking parent), else ru_maxrss; ``current``: VmRSS, the resident size now."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:" if current else "VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def state_mib(sim: Simulation) -> float:
    """The state a run must hold, MiB: the error memory (R·M·D) and the partition gradients G
    (R·N·D) in the run's dtype, plus the data (training set, its per-replicate partitioned copy,
    test set)."""
    exp, obj = sim.exp, sim.exp.objective
    R, M, D = len(exp.seeds), int(exp.cfg["devices"]), obj.model.D
    N = exp.code.N if exp.code is not None else 1
    data = sum(t.numel() * t.element_size() for t in (obj.X, obj.Xp, obj.Xte) if t is not None)
    return (R * (M + N) * D * torch.finfo(exp.dtype).bits // 8 + data) / 2**20


def scaling_point(overrides: Sequence[str], repeat: int = 3) -> dict:
    """Run in a fresh subprocess: seconds per iteration, peak resident memory (MiB), the resident
    size before the build (imports, the compiled kernel loaded) and :func:`state_mib`."""
    code = (
        "import json, numpy as np; from cocoef_cli.bench import sim_step_time, peak_rss_mib, state_mib; "
        "from cocoef_cli.sim import kernels; "
        "kernels.library() and kernels.topk_rows(np.zeros((2, 16), np.float32), 1, 4, 1, 8, 1); "
        "base = peak_rss_mib(current=True); "
        f"t, sim = sim_step_time({list(overrides)!r}, {repeat}); "
        "print(json.dumps({'s': t, 'rss_mib': peak_rss_mib(), 'base_mib': base, 'state_mib': state_mib(sim)}))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        nan = float("nan")
        return {"s": nan, "rss_mib": nan, "base_mib": nan, "state_mib": nan, "error": p.stderr.strip().splitlines()[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
)  # the /proc/cpuinfo flags that matter for float kernels


def cpu_info() -> dict[str, Any]:
    """The CPU from /proc/cpuinfo (Linux; else ``platform``): vendor, model name, the vector
    extensions among ``VECTOR_FLAGS``, and the number of cores this process may use."""
    info: dict[str, Any] = {"vendor": "", "model": platform.processor() or platform.machine(), "vector": []}
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
            if ":" in line
        )
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info.update(
            vendor=fields.get("vendor_id", ""),
            model=fields.get("model name", info["model"]),
            vector=[f for f in VECTOR_FLAGS if f in flags],
        )
    except OSError:
        pass
    from cocoef_cli.run import usable_cores

    info["cores"] = usable_cores()
    return info


def machine() -> str:
    """One line: CPU (vendor, model, vector extensions, usable cores), versions, the C compiler
    that built the Top-k kernel."""
    import numpy

    from cocoef_cli.sim import kernels

    c = cpu_info()
    return (
        f"{c['vendor']} {c['model']} ({', '.join(c['vector']) or 'no AVX'}; {c['cores']} usable cores), "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
        f"Top-k kernel: {kernels.describe()}"
    )


# ---------------------------------------------------------------------------------------------
# (e) model=module: the generic torch.func path against the built-in networks and a central step


def module_mlp(input_shape: Sequence[int], num_outputs: int, hidden: int = 64) -> torch.nn.Module:
    """``model=mlp`` (784-64-10 on MNIST) as a torch.nn.Module, for ``model=module``."""
    import math

    f = math.prod(input_shape)
    nn = torch.nn
    return nn.Sequential(nn.Flatten(), nn.Linear(f, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))


def module_lenet(input_shape: Sequence[int], num_outputs: int) -> torch.nn.Module:
    """``model=cnn`` (LeNet-5: conv 5×5 ×6, pool, conv 5×5 ×16, pool, 120, 84) as a torch.nn.Module."""
    nn = torch.nn
    c, h, w = input_shape
    pad = max(0, (32 - min(h, w)) // 2)
    flat = 16 * (((h + 2 * pad - 4) // 2 - 4) // 2) * (((w + 2 * pad - 4) // 2 - 4) // 2)
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_outputs),
    )


MODULE_WORKLOADS = {"mlp": ("model=mlp", "module_mlp"), "LeNet": ("model=cnn", "module_lenet")}


def partial_grads(sim: Simulation) -> Callable[[], object]:
    """A call computing the partition gradients of ``sim`` at its θ (what (e) times)."""
    return lambda: sim.exp.objective.partition_grad_blocks(sim.theta)


def module_section(quick: bool = False, device: str = "cpu", log: Callable[[str], None] = print) -> list[str]:
    """(e) The partition gradients G (R = 1, M = 100 on mnist5k, as in (b)) of ``model=module`` for the
    MLP and LeNet against the built-in ``model=mlp``/``model=cnn`` and against one central autograd step
    of the same nn.Module on the same training set (forward, loss, backward), at one thread, timed in
    alternating rounds. Returns the report's markdown lines."""
    import copy

    from cocoef_cli.run import pinned_threads

    rows = []
    with pinned_threads(1):
        for name, (builtin, factory) in MODULE_WORKLOADS.items():
            base = [*SETTING, "dataset=mnist5k", "devices=100", f"device={device}"]
            s_mod = simulation([*base, "model=module", f"model._target_=cocoef_cli.bench.{factory}"])
            s_built = simulation([*base, builtin])
            obj = s_mod.exp.objective
            model: Any = obj.model  # a modules.Module: its template nn.Module and input shape
            net = copy.deepcopy(model.template).to(s_mod.theta.dtype)
            torch.nn.utils.vector_to_parameters(s_mod.theta[0].clone(), net.parameters())
            X, Y = obj.X.reshape(-1, *model.input_shape), obj.Y

            def central(net: torch.nn.Module = net, X: torch.Tensor = X, Y: torch.Tensor = Y) -> None:
                net.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(net(X), Y).backward()

            t_mod, t_built, t_central = paired_times(
                [partial_grads(s_mod), partial_grads(s_built), central],
                [3, 3, 3],
                rounds=2 if quick else 7,
            )
            rows.append((name, model.D, t_mod, t_built, t_central))
            log(
                f"(e) {name}: model=module {t_mod * 1e3:.1f} ms, {builtin} {t_built * 1e3:.1f} ms, "
                f"central step {t_central * 1e3:.1f} ms ({t_mod / t_central:.2f}×)"
            )
    md = [
        "",
        "## (e) model=module: partition gradients of any nn.Module (torch.func) vs the built-in paths",
        "",
        "G for M = 100 partitions of mnist5k (R = 1, float32, 1 thread) by `model=module` (vmap over replicates "
        "and partitions of grad of the functional module), by the built-in network, and one central autograd step "
        "of the same nn.Module on the whole training set (forward, cross-entropy, backward).",
        "",
        "| network | D | model=module ms | built-in ms | central step ms | module / central (target ≤ 2×) | "
        "module / built-in |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {n} | {D} | {a * 1e3:.1f} | {b * 1e3:.1f} | {c * 1e3:.1f} | {a / c:.2f}× | {a / b:.2f}× |"
        for n, D, a, b, c in rows
    ]
    return md


def run_bench(
    quick: bool = False,
    out: Path | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    smoke: bool = False,
) -> str:
    """Measure (a)–(e) and return the markdown report (also written to ``out`` when given).
    ``quick``: M ≤ 100; ``smoke``: one small workload (:data:`SMOKE_WORKLOADS`) at M = 10, one
    thread, each measurement once: checks that the benchmark runs (an install), not the speed."""
    from cocoef_cli.run import pinned_threads, usable_cores

    dev = [f"device={device}"]
    rows_a, rows_b, rows_c, rows_d, parts = [], [], [], [], {}
    thread_counts = [1] if smoke else sorted({1, usable_cores()})
    rounds, repeat = (1, 1) if smoke else (9, 9)  # smoke: every measurement once
    M_bc = 10 if smoke else 100  # the devices of (c), and the first of (b)
    limit_devices = [M_bc] if smoke or quick else [M_bc, *LIMIT_DEVICES[1:]]
    for name, wl in (SMOKE_WORKLOADS if smoke else WORKLOADS).items():
        base = SETTING + wl + dev + [f"devices={M_bc}"]
        for devices in limit_devices:
            for n_threads in thread_counts:
                with pinned_threads(n_threads):
                    sim = simulation(SETTING + wl + dev + [f"devices={devices}"])
                    t_sim, t_central, t_pass = paired_times(
                        [sim.step, central_step(sim), fused_pass(sim)],
                        [5, 5, 5],
                        rounds=rounds if devices <= 100 else min(rounds, 3),
                    )
                    if n_threads == thread_counts[-1]:  # where the time goes, at every M of (b)
                        parts[name if devices == M_bc else f"{name}, M={devices}"] = breakdown(
                            sim, repeat, compare=(t_central, t_pass)
                        )
                rows_b.append((name, devices, sim.exp.objective.model.D, n_threads, t_sim, t_central, t_pass))
                log(
                    f"(b) {name} M={devices}, {n_threads} thread(s): iteration {t_sim * 1e3:.2f} ms, central step "
                    f"{t_central * 1e3:.2f} ms, pass over G and e {t_pass * 1e3:.2f} ms"
                )
        for n_threads in thread_counts:
            with pinned_threads(n_threads):
                t1, t10, sim10 = replicate_times(base, rounds=min(rounds, 5))
                if n_threads == thread_counts[-1]:
                    parts[f"{name}, seeds=10"] = breakdown(sim10, repeat=min(repeat, 5))
            rows_c.append((name, n_threads, t1, t10))
            log(
                f"(c) {name}, {n_threads} thread(s): seeds=10 {t10 * 1e3:.2f} ms vs seeds=1 {t1 * 1e3:.2f} ms "
                f"({t10 / (10 * t1):.2f} × 10 seeds=1)"
            )
        for M in [10] if smoke else [10, 100] if quick else [10, 100, 1000]:
            ov = SETTING + wl + dev + [f"devices={M}"]
            t_vec, t_loop = paired_times(
                [simulation(ov).step, loop_step(ov)], [5, 1], rounds=min(rounds, 9 if M <= 100 else 3), warmup=1
            )
            rows_a.append((name, M, t_vec, t_loop))
            log(f"(a) {name} M={M}: simulator {t_vec * 1e3:.2f} ms, loop {t_loop * 1e3:.1f} ms")
        Ms = {"softmax": [10, 100, 1000, 10000], "mlp": [10, 100, 1000]}.get(name, [10])
        for M in Ms[:1] if smoke else Ms[:2] if quick else Ms:
            p = scaling_point(SETTING + wl + dev + [f"devices={M}"], repeat=min(repeat, 9 if M <= 1000 else 3))
            rows_d.append((name, M, p))
            log(
                f"(d) {name} M={M}: {p['s'] * 1e3:.1f} ms/iter, peak RSS {p['rss_mib']:.0f} MiB "
                f"({p['rss_mib'] - p['base_mib']:.0f} above the imports; state {p['state_mib']:.0f} MiB)"
            )
    md = [
        "# Benchmarks",
        "",
        f"Machine: {machine()}. Device: `{device}`; torch threads: "
        f"{' and '.join(map(str, thread_counts))} in (b) and (c), {torch.get_num_threads()} elsewhere.",
        "",
        f"Command: `cocoef bench{' --quick' if quick else ''}{' --smoke' if smoke else ''}` (medians after warm-up, the two sides of each "
        "ratio timed in alternating rounds; setting: mnist5k, "
        "sgc d=3, Bernoulli p=0.2, COCO-EF with Top-k ratio 0.01).",
        "",
        "## (a) vectorised simulator vs a per-device Python loop (same algorithm, same draws)",
        "",
        "| model | M | simulator ms/iter | loop ms/iter | speed-up |",
        "|---|---|---|---|---|",
    ]
    md += [f"| {n} | {M} | {a * 1e3:.2f} | {b * 1e3:.1f} | {b / a:.1f}× |" for n, M, a, b in rows_a]
    md += [
        "",
        "## (b) one COCO-EF iteration vs one centralised full-batch autograd step and vs the limit",
        "",
        "limit = central step + one pass e ← e + G over two (M, D) matrices (timed in the same rounds): what "
        "an iteration must at least do (the partition gradients, and read G and read and write e once).",
        "",
        "| model | M | D | threads | iteration ms | central step ms | pass over G, e ms | limit ms | "
        "vs central step | vs limit (target ≤ 1.3×) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {n} | {M} | {D} | {th} | {a * 1e3:.2f} | {b * 1e3:.2f} | {c * 1e3:.2f} | {(b + c) * 1e3:.2f} | "
        f"{a / b:.2f}× | {a / (b + c):.2f}× |"
        for n, M, D, th, a, b, c in rows_b
    ]
    md += [
        "",
        f"Where an iteration's time goes (each part timed alone, ms, {thread_counts[-1]} thread(s); the two "
        f"comparison rows are (b)'s paired timings; evaluation is not part of an update; M = {M_bc} unless the column says otherwise; the seeds=10 columns are the runs of (c)):",
        "",
        "| part | " + " | ".join(parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    md += [
        f"| {part} | " + " | ".join(f"{parts[n][part] * 1e3:.2f}" for n in parts) + " |"
        for part in next(iter(parts.values()))
        if part != FUSED_KEY
    ]
    if fused_columns(parts):
        md += [
            "",
            f"Columns whose updates form G's rows in the Top-k kernel from their terms (G is never written): "
            f"{', '.join(fused_columns(parts))}; there the partition gradients are the forward and backward pass "
            "that give the terms, and the method step includes forming the rows.",
        ]
    central = {n: b for n, m, _, th, _, b, _ in rows_b if th == thread_counts[-1] and m == M_bc}
    md += [
        "",
        "Evaluation (every `eval_every` updates; target ≤ one central step): "
        + ", ".join(
            f"{n} {parts[n]['evaluation (every eval_every updates)'] / central[n]:.2f}× the central step"
            for n in central
        )
        + ".",
    ]
    md += [
        "",
        f"## (c) replicates: seeds=10 vs seeds=1 (M={M_bc}), per iteration",
        "",
        "| model | threads | seeds=1 ms | seeds=10 ms | seeds=10 / seeds=1 | seeds=10 / (10 × seeds=1) (target ≤ 1.1) |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {n} | {th} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}× | {b / (10 * a):.2f} |" for n, th, a, b in rows_c
    ]
    md += [
        "",
        "## (d) scaling with the number of devices (each point in a fresh process)",
        "",
        "peak RSS − the resident size before the build (imports, compiled kernel) against the state that must "
        "exist (error memory R·M·D + partition gradients R·N·D + the data: training set, its partitioned copy, "
        "test set); target ≤ 2×.",
        "",
        "| model | M | ms/iter | peak RSS MiB | before the build MiB | state MiB | (peak − before) / state |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {n} | {M} | {p['s'] * 1e3:.1f} | {p['rss_mib']:.0f} | {p['base_mib']:.0f} | {p['state_mib']:.0f} | "
        f"{(p['rss_mib'] - p['base_mib']) / p['state_mib']:.2f}× |"
        for n, M, p in rows_d
    ]
    md += module_section(quick, device, log)
    text = "\n".join(md) + "\n"
    if out is not None:
        from cocoef_cli.record import atomic_write

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out), text)
    return text
