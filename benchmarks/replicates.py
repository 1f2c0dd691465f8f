"""seeds = 10 against 10 × seeds = 1 per iteration (issue 17's replicate target ≤ 1.1), at 1 thread
and at 2, for the bench setting (mnist5k, sgc d=3, Bernoulli p=0.2, COCO-EF + Top-k 1%, M = 100):
the two runs timed in alternating rounds in this process (:func:`cocoef_cli.bench.replicate_times`, as
`make bench` times its (c)).

    .venv/bin/python benchmarks/replicates.py [--rounds 5] [--threads 1 2] [--models softmax mlp]

To compare two versions, run it from each version's source tree (``cd TREE && PYTHONPATH=TREE
python benchmarks/replicates.py``: an editable install would otherwise import the work tree).
"""

from __future__ import annotations

import argparse

from cocoef_cli.bench import SETTING, WORKLOADS, machine, replicate_times
from cocoef_cli.run import pinned_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = ap.parse_args()
    print(f"Machine: {machine()}")
    for n_threads in args.threads:
        for name in args.models:
            with pinned_threads(n_threads):
                t1, t10, _ = replicate_times(SETTING + WORKLOADS[name] + ["device=cpu", "devices=100"], args.rounds)
            print(
                f"{name}, {n_threads} thread(s): seeds=1 {t1 * 1e3:.2f} ms, seeds=10 {t10 * 1e3:.2f} ms, "
                f"seeds=10 / (10 × seeds=1) = {t10 / (10 * t1):.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
