"""The per-device loop baseline (cocoef_cli/bench_loop.py) and the vectorised simulator compute the same run."""

import numpy as np
import pytest

from cocoef_cli import config
from cocoef_cli.bench_loop import loop_coco_ef
from cocoef_cli.sim.engine import build_experiment, simulate


@pytest.mark.parametrize(
    "setup",
    [
        ["dataset=iris", "model=softmax", "code=sgc", "code.d=3", "model.l2=0.01"],
        ["dataset.n=300", "dataset.dim=8", "code=crc", "code.d=2"],
    ],
)
def test_loop_baseline_matches_simulator(setup):
    ov = setup + [
        "devices=6",
        "iters=15",
        "eval_every=1",
        "precision=float64",
        "method=coco_ef",
        "compressor=topk",
        "compressor.k=3",
        "straggler=bernoulli",
        "straggler.p=0.3",
        "optim.lr=0.3",
    ]
    cfg = config.load(ov)
    sim = simulate(build_experiment(cfg)).metrics
    exp = build_experiment(cfg)
    thetas = loop_coco_ef(exp, 15)
    losses = [float(exp.objective.loss(th.unsqueeze(0))[0]) for th in thetas]
    np.testing.assert_allclose(sim.train_loss.to_numpy()[1:], losses, rtol=1e-9)
    assert sim.train_loss.iloc[-1] < sim.train_loss.iloc[0]
