"""`cocoef bench` building blocks on a small setting (the full benchmark is `make bench`)."""
import math

import pytest

from cocoef_cli.bench import breakdown, central_step_time, sim_step_time

SMALL = ["dataset=synthetic_logreg", "model=logistic", "devices=12", "code=sgc", "code.d=3", "straggler=bernoulli",
         "straggler.p=0.2", "compressor=topk", "compressor.ratio=0.1"]


@pytest.mark.parametrize("method", ["coco_ef", "gc"])
def test_breakdown_times_every_part_of_an_update(method):
    t, sim = sim_step_time(SMALL + [f"method={method}"], repeat=3)
    parts = breakdown(sim, repeat=3)
    assert set(parts) == {"partition gradients", "stragglers + decode", "encode + method step (top-k, EF update, aggregate)",
                          "evaluation (every eval_every updates)"}
    assert all(math.isfinite(s) and s > 0 for s in [t, *parts.values()])
    assert sim.t >= 3  # the timed updates really ran
    assert 0 < central_step_time(sim, repeat=3) < 10
