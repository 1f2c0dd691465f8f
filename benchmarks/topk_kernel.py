"""The compiled Top-k kernel alone, on the error-feedback rows of the bench setting (mnist5k, sgc
d=3, Bernoulli p=0.2, COCO-EF + Top-k 1%, after a few updates): its selection over e (M, D), and
its whole pass with the encoding fused (e + B G, then the selection), and where the run forms
G's rows in the kernel (``CodedSum.kernel_terms``: M = 1,000 here) that pass with G's rows formed
from their terms (builds whose source has ``topk_rows_fused``), per call.

Each ``--source`` (default: this tree's ``cocoef_cli/sim/topk_rows.c``) is built with the flags
the package uses (:func:`cocoef_cli.sim.kernels.builds`, the best that builds) into a temporary
folder, and the builds are timed in alternating rounds on the same rows (restored before each
call), so two versions of the C file compare in one process. An older version must keep the
file name (it includes itself: ``git show REV:cocoef_cli/sim/topk_rows.c > OLD/topk_rows.c``) and
this tree's C signature (from f451f0f on, which added ``subtract``):

    .venv/bin/python benchmarks/topk_kernel.py [--source OLD.c --source cocoef_cli/sim/topk_rows.c]
        [--models softmax mlp] [--devices 100 1000] [--threads 1 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cocoef_cli import config
from cocoef_cli.bench import SETTING, WORKLOADS, machine
from cocoef_cli.sim import compressors, kernels
from cocoef_cli.sim.codes import CodedSum
from cocoef_cli.sim.engine import Simulation, build_experiment


def build(source: Path, folder: Path) -> object:
    """The library built from ``source`` with the package's best working flags."""
    cc = kernels.compiler()
    assert cc is not None, "no C compiler"
    for i, (flags, _) in enumerate(kernels.builds()):
        out = folder / f"{source.stem}-{len(list(folder.iterdir()))}-{i}.so"
        failure, _ = kernels._compile(cc, flags, out)  # the package's own build step
        if not failure:
            return kernels._load(out)
    raise SystemExit(f"{source} does not build: {failure}")


def rows(model: str, devices: int, lib: object | None) -> tuple[np.ndarray, tuple, tuple | None, int]:
    """(e after 5 updates, the fused encoding's kernel arguments at θ^5 with G stored, the same
    with G's rows formed in the kernel (None where the run does not form them, or no build
    ``lib`` can), k) of the bench setting."""
    cfg = config.load(SETTING + WORKLOADS[model] + [f"devices={devices}", "device=cpu", "iters=5"])
    sim = Simulation(build_experiment(cfg))
    for _ in range(5):
        sim.step()
    exp = sim.exp
    e = exp.method.e.detach().contiguous()
    z = exp.straggler.draw()
    add = CodedSum(exp.code, exp.objective.partition_grad_blocks(sim.theta), z).kernel_args(e)
    formed = None
    if lib is not None:
        kernels._LIBRARY, kernels._TRIED = lib, True  # the check of the rows runs on this build
        terms = CodedSum(exp.code, exp.objective.partition_gradients(sim.theta), z).kernel_terms(e)
        formed = None if terms is None else (*add[:4], terms)
    return e.reshape(-1, e.shape[-1]).numpy().copy(), add, formed, exp.method.C.k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, action="append", help="C file(s) to compare (default: this tree's)")
    ap.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    sources = args.source or [kernels.SOURCE]
    print(f"Machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        libs = []
        for source in sources:
            kernels.SOURCE = source.resolve()
            libs.append(build(source, Path(tmp)))
        for model in args.models:
            for devices in args.devices:
                forming = [lib for lib in libs if hasattr(lib, "topk_rows_fused_f32")]
                e0, add, formed, k = rows(model, devices, forming[-1] if forming else None)
                modes = [("selection", None), ("add + selection", add)]
                modes += [("G's rows formed + add + selection", formed)] if formed is not None else []
                h = k // compressors.SAMPLE_HITS
                r = int(k / h + 3.0 * math.sqrt(k / h)) + 2
                for threads in args.threads:
                    times: dict[tuple[int, str], list[float]] = {}
                    results = []
                    for _ in range(args.rounds):
                        for i, lib in enumerate(libs):
                            kernels._LIBRARY, kernels._TRIED = lib, True
                            for what, fused in modes:
                                if fused is formed and lib not in forming:  # an older source: no such pass
                                    continue
                                x = e0.copy()
                                t = time.perf_counter()
                                idx, _ = kernels.topk_rows(x, k, h, r, 8 * r * h, threads, None, fused)
                                times.setdefault((i, what), []).append(time.perf_counter() - t)
                                results.append((i, what, np.sort(idx, axis=1)))
                    same = all(
                        np.array_equal(a[2], b[2]) for a in results for b in results if a[1] == b[1] and a[0] != b[0]
                    )
                    for what, _ in modes:
                        cells = " | ".join(
                            f"{source}: {statistics.median(times[(i, what)]) * 1e3:.2f} ms"
                            for i, source in enumerate(sources)
                            if (i, what) in times
                        )
                        print(f"{model} M={devices} threads={threads} {what}: {cells}", flush=True)
                    if len(libs) > 1:
                        print(f"  same selections from every build: {same}")


if __name__ == "__main__":
    main()
