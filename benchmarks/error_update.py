"""Error feedback's e ← v − m inside the Top-k kernel's pass over each row (``fuses_subtract``)
against the generic update after the selection (a scatter into the whole error memory), per
update of the bench setting (mnist5k, sgc d=3, Bernoulli p=0.2, COCO-EF + Top-k 1%, seeds=1):
both paths are in the package, so they alternate in rounds on one simulation in this process.

    .venv/bin/python benchmarks/error_update.py [--models mlp softmax] [--devices 100 1000]
        [--threads 1 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

from cocoef_cli import config
from cocoef_cli.bench import SETTING, WORKLOADS, machine
from cocoef_cli.run import pinned_threads
from cocoef_cli.sim import compressors
from cocoef_cli.sim.engine import Simulation, build_experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"Machine: {machine()}")
    for n_threads in args.threads:
        for model in args.models:
            for devices in args.devices:
                steps = 15 if devices <= 100 else 4
                with pinned_threads(n_threads):
                    cfg = config.load(SETTING + WORKLOADS[model] + [f"devices={devices}", "device=cpu"])
                    sim = Simulation(build_experiment(cfg))
                    for _ in range(5):
                        sim.step()
                    times: dict[bool, list[float]] = {True: [], False: []}
                    try:
                        for _ in range(args.rounds):
                            for fused in (True, False):
                                compressors.TopK.fuses_subtract = fused
                                sim.step()
                                t = time.perf_counter()
                                for _ in range(steps):
                                    sim.step()
                                times[fused].append((time.perf_counter() - t) / steps)
                    finally:
                        compressors.TopK.fuses_subtract = True
                in_pass, after = statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3
                print(
                    f"{model} M={devices}, {n_threads} thread(s): in the kernel's pass {in_pass:.2f} ms, "
                    f"scatter after {after:.2f} ms per update, ratio {in_pass / after:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
