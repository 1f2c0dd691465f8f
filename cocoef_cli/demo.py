"""``make demo``: COCO-EF against its baselines on a small synthetic linear regression.

100 devices, Bernoulli stragglers with p = 0.2, stochastic gradient coding with d = 3, compression
to 3% of the coordinates, 3 seeds.
Writes one run folder per method under ``--out``, a figure of the optimality gap F(θ) − F* against
cumulative uplink bits, and prints the final numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cocoef_cli import config
from cocoef_cli.record import final_rows
from cocoef_cli.run import execute
from cocoef_cli.sim.methods import message_compressor_config

# (label, arm, overrides). Each method runs at its tuned step size: the block ``demo`` of
# conf/step_sizes.yaml (best of the grid 0.05·2^i (i = 0..5) on this task, 3 seeds, 400 updates).
DEMO_RUNS = [
    ("COCO-EF, top-k 3%", "coco_ef_topk", ["method=coco_ef", "compressor=topk"]),
    ("COCO, top-k 3% (no EF)", "coco_topk", ["method=coco", "compressor=topk"]),
    ("COCO, unbiased rand-k 3%", "coco_randk", ["method=coco", "compressor=randk_unbiased"]),
    ("COCO-DIANA, unbiased rand-k 3%", "coco_diana", ["method=coco_diana", "compressor=randk_unbiased"]),
    ("GC, full precision", "gc", ["method=gc"]),
    ("Ignore stragglers, uncoded", "ignore_stragglers", ["method=ignore_stragglers"]),
]
COMMON = [
    "devices=100",
    "straggler=bernoulli",
    "straggler.p=0.2",
    "code=sgc",
    "code.d=3",
    "compressor.ratio=0.03",
    "seeds=3",
    "iters=300",
    "eval_every=10",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path("runs/demo")
    )  # runs/ is not tracked: a demo leaves the checkout clean
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every run")
    args = ap.parse_args(argv)
    frames = []
    for label, arm, ov in DEMO_RUNS:
        lr = f"optim.lr={config.step_size('demo', arm):g}"
        cfg = config.load(COMMON + ov + [lr] + args.overrides)
        sent = message_compressor_config(cfg)["name"]
        slug = f"{cfg['method']['name']}_{sent}"
        _, res = execute(cfg, args.out / slug)
        df = res.metrics.assign(label=label)
        frames.append(df)
        last = final_rows(df)  # a diverged seed: its last finite evaluation
        print(f"  {label:<34} gap {last.opt_gap.mean():.3e}   bits {last.bits_up.mean():.3e}   ({res.wall_s:.1f}s)")
    data = pd.concat(frames, ignore_index=True)
    from cocoef_cli.report import line_figure

    path = line_figure(
        data,
        x="bits_up",
        y="opt_gap",
        hue="label",
        out=args.out / "gap_vs_bits.png",
        title="Synthetic least squares, 100 devices, p = 0.2, SGC d = 3, k = 4 of D = 101\n(mean of 3 seeds, 95% CI)",
    )
    table = (
        final_rows(data, by=("label", "seed"))
        .groupby("label", sort=False)
        .agg(final_gap=("opt_gap", "mean"), total_bits=("bits_up", "mean"))
    )
    print(table.to_string(float_format=lambda v: f"{v:.3e}"))
    print(f"wrote {args.out}/*/metrics.csv and {path}")


if __name__ == "__main__":
    main()
