"""Cost of one simulator iteration against one full-batch autograd step of the same network.

Issue 4's target: one iteration of COCO-EF on mnist5k with mlp (784-64-10, ReLU), 100 devices,
sgc d=3, Bernoulli p=0.2, Top-k ratio 0.01 costs at most 3× one full-batch gradient step
(torch.nn + autograd + SGD) of the same model on the same 4,000 training samples. Both are timed
side by side in this process, alternating in rounds with one pass e ← e + G over the (M, D)
matrices (issue 17's limit = autograd step + that pass); medians are reported, plus where the
iteration's time goes (partition gradients, stragglers + decoding, encoding with the method step).

    .venv/bin/python benchmarks/iteration_overhead.py [--iters 100] [--rounds 5] [--threads T] [OVERRIDES...]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from cocoef_cli import config
from cocoef_cli.bench import FUSED_KEY, WORKLOADS, breakdown, fused_pass, machine
from cocoef_cli.bench import SETTING as BENCH_SETTING
from cocoef_cli.sim.engine import Simulation, build_experiment, simulate

# the bench setting (mnist5k, sgc d=3, p=0.2, COCO-EF + Top-k 1%) on the default 784-64-10 ReLU MLP
SETTING = BENCH_SETTING + WORKLOADS["mlp"] + ["devices=100", "optim.lr=0.5"]


def per_call_ms(fn, k: int) -> float:
    t = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t) / k * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100, help="simulator iterations (and autograd steps) per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the simulated run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = config.load(SETTING + args.overrides + [f"iters={args.iters}", f"eval_every={args.iters}"])
    exp = build_experiment(cfg)
    obj = exp.objective
    X, Y = obj.X, obj.Y  # the same 4,000 training samples (float32)
    sizes = obj.model.sizes
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)

    def autograd_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(X), Y).backward()
        opt.step()

    one_pass = fused_pass(Simulation(exp))  # e ← e + G over the (M, D) matrices: the limit's memory pass
    # warm-up
    per_call_ms(autograd_step, 5)
    per_call_ms(one_pass, 5)
    simulate(exp)
    ref, it, pas = [], [], []
    for _ in range(args.rounds):
        ref.append(per_call_ms(autograd_step, args.iters))
        pas.append(per_call_ms(one_pass, args.iters))
        exp = build_experiment(cfg)  # fresh method state; building is outside the timing
        t = time.perf_counter()
        simulate(exp)
        it.append((time.perf_counter() - t) / args.iters * 1e3)
    ref_ms, it_ms, pass_ms = statistics.median(ref), statistics.median(it), statistics.median(pas)

    sim = Simulation(exp)  # the state after the timed rounds' last build, a few updates in
    for _ in range(5):
        sim.step()
    timed = breakdown(sim, repeat=max(9, args.iters // 4))
    in_kernel = bool(timed.pop(FUSED_KEY))  # a flag, not a time
    parts = {name: sec * 1e3 for name, sec in timed.items()}
    print(machine())
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, D = {obj.model.D}, "
        f"partitions {tuple(obj.Xp.shape[:3])}, rounds {args.rounds} × {args.iters}"
    )
    print(
        f"full-batch autograd step (nn.Sequential {'-'.join(map(str, sizes))}, 4,000 samples): {ref_ms:7.2f} ms "
        f"(rounds: {', '.join(f'{v:.1f}' for v in ref)})"
    )
    print(
        f"one simulator iteration (simulate, {cfg['method']['name']}):            {it_ms:7.2f} ms "
        f"(rounds: {', '.join(f'{v:.1f}' for v in it)})"
    )
    print(f"one pass e ← e + G over the (M, D) matrices:                {pass_ms:7.2f} ms")
    print(f"G's rows formed in the kernel from their terms (G never written): {'yes' if in_kernel else 'no'}")
    print(
        f"ratio: {it_ms / ref_ms:.2f}× the autograd step, {it_ms / (ref_ms + pass_ms):.2f}× the limit "
        f"(autograd step + that pass; target ≤ 1.3×)"
    )
    print("where an iteration's time goes:")
    for name, ms in parts.items():
        print(f"  {name:<52} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
