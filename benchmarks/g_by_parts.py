"""G formed by parts (``codes.PART_BYTES`` of partition gradients written just before the kernel's
rows that add them, read back from the caches), and G's rows formed in the kernel from their
terms (``codes.G_FORM = "fused"``, where the run allows it: at most ``FUSED_MAX_SAMPLES`` samples
a partition and the rows checked equal to torch's) against G formed whole (one (R, N, D) tensor
in memory, then the kernel over all rows), per update of the bench setting (mnist5k, sgc d=3,
Bernoulli p=0.2, COCO-EF + Top-k 1%, seeds=1 or ``--seeds R``), with the limit of (b) (central step + one pass
e ← e + G) timed in the same rounds. Every path is in the package (``PART_BYTES`` of at least
all of G is the whole path), so they alternate in rounds on one simulation in this process.

    .venv/bin/python benchmarks/g_by_parts.py [--models mlp softmax] [--devices 100 1000]
        [--threads 1 2] [--mib 4 8 16] [--seeds 1] [--rounds 5]
"""

from __future__ import annotations

import argparse

from cocoef_cli import config
from cocoef_cli.bench import SETTING, WORKLOADS, central_step, fused_pass, machine, paired_times
from cocoef_cli.run import pinned_threads
from cocoef_cli.sim import codes
from cocoef_cli.sim.engine import Simulation, build_experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mib", type=float, nargs="+", default=[codes.PART_BYTES / 2**20])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"Machine: {machine()}")
    default, form = codes.PART_BYTES, codes.G_FORM
    sizes = [int(m * 2**20) for m in args.mib] + [1 << 62]  # the last: one part, G whole

    def update(sim: Simulation, part_bytes: int, form: str = "parts"):
        def step() -> None:
            codes.PART_BYTES, codes.G_FORM = part_bytes, form  # not the timed choice: this form
            sim.step()

        return step

    for n_threads in args.threads:
        for model in args.models:
            for devices in args.devices:
                with pinned_threads(n_threads):
                    setting = [o for o in SETTING if o != "seeds=1"] + [f"seeds={args.seeds}"]
                    cfg = config.load(setting + WORKLOADS[model] + [f"devices={devices}", "device=cpu"])
                    sim = Simulation(build_experiment(cfg))
                    try:
                        codes.G_FORM = "fused"
                        z = sim.exp.straggler.draw()
                        U = codes.CodedSum(sim.exp.code, sim.exp.objective.partition_gradients(sim.theta), z)
                        fusable = U.kernel_terms(sim.exp.method.e) is not None  # (checks the rows once)
                        fns = [update(sim, b) for b in sizes] + [central_step(sim), fused_pass(sim)]
                        fns += [update(sim, sizes[-1], "fused")] if fusable else []
                        times = paired_times(fns, [3] * len(fns), rounds=args.rounds)
                    finally:
                        codes.PART_BYTES, codes.G_FORM = default, form
                limit = times[len(sizes)] + times[len(sizes) + 1]
                whole = times[len(sizes) - 1]
                cells = [
                    f"{m:g} MiB parts {t * 1e3:.2f} ms ({t / limit:.2f}× limit, {t / whole:.2f}× whole)"
                    for m, t in zip(args.mib, times)
                ]
                print(
                    f"{model} M={devices}, seeds={args.seeds}, {n_threads} thread(s): limit {limit * 1e3:.2f} ms; G whole "
                    f"{whole * 1e3:.2f} ms ({whole / limit:.2f}× limit); "
                    + "; ".join(cells)
                    + (
                        f"; G's rows in the kernel {times[-1] * 1e3:.2f} ms ({times[-1] / limit:.2f}× limit, "
                        f"{times[-1] / whole:.2f}× whole)"
                        if len(times) > len(sizes) + 2
                        else "; G's rows in the kernel: not here (too many samples a partition, or not equal to torch's)"
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
