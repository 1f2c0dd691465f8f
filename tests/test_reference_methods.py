"""Every method's whole trajectory against the independent numpy simulator (tests/numpy_reference.py).

Each case runs the package (``config.load`` + ``run.execute``) on a small float64 problem with
stragglers and compares every evaluated row (train/test loss, accuracy, ‖∇F‖, ‖state‖, bits,
devices received) with the reference, to 1e-10. The reference draws the straggler masks from a
fresh copy of the run's straggler model on the same seeded stream; everything else (B, a, C, the
updates) is its own. Top-k, scaled/grouped sign and the identity are deterministic, so they must
match draw for draw.
"""

import numpy as np
import numpy_reference
import pandas as pd
import pytest
import torch

from cocoef_cli import config
from cocoef_cli.rng import SeedRNG
from cocoef_cli.run import execute

BASE = ["devices=6", "iters=24", "eval_every=4", "precision=float64", "straggler.p=0.3", "code.d=2", "optim.lr=0.3"]
LINREG = BASE + ["dataset.n=300", "dataset.dim=7"]
COLS = ["train_loss", "test_loss", "test_acc", "grad_norm", "ef_norm", "bits_up", "n_received", "opt_gap"]


def compare(overrides: list[str]) -> pd.DataFrame:
    """Run the package and the reference on the same config; assert every row agrees; return the run's rows."""
    cfg = config.load(overrides)
    _, res = execute(cfg, None)
    got = res.metrics
    ref = pd.DataFrame(numpy_reference.simulate(cfg))
    assert res.status == "completed"
    assert list(got.seed) == list(ref.seed) and list(got.iter) == list(ref.iter)
    for col in COLS:
        g, r = got[col].to_numpy(float), ref[col].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg=col)
        np.testing.assert_allclose(g[~np.isnan(g)], r[~np.isnan(r)], rtol=1e-10, atol=1e-12, err_msg=col)
    return got


CASES = {
    "coco_ef-topk": ["method=coco_ef", "compressor=topk", "compressor.k=2"],
    "coco_ef-scaled_sign": ["method=coco_ef", "compressor=scaled_sign", "optim.lr=0.1"],
    "coco_ef-grouped_sign": ["method=coco_ef", "compressor=grouped_sign", "compressor.group=3", "optim.lr=0.1"],
    "coco_ef-topk-frc": ["method=coco_ef", "compressor=topk", "compressor.k=3", "code=frc", "code.d=2"],
    "coco_ef-topk-normal-init": [
        "method=coco_ef",
        "compressor=topk",
        "compressor.k=2",
        "model.init=normal",
        "model.init_scale=0.5",
        "seeds=2",
    ],
    "coco-topk": ["method=coco", "compressor=topk", "compressor.k=3"],
    "coco-scaled_sign-uncoded-unbiased": [
        "method=coco",
        "compressor=scaled_sign",
        "code=uncoded",
        "code.decode=unbiased",
        "optim.lr=0.1",
    ],
    "coco_diana-identity": ["method=coco_diana", "compressor=identity"],
    "coco_diana-topk-alpha": [
        "method=coco_diana",
        "compressor=topk",
        "compressor.k=2",
        "method.allow_biased=true",
        "method.alpha=0.4",
    ],
    "coco_ef21-topk": ["method=coco_ef21", "compressor=topk", "compressor.k=2"],
    "coco_ef21-grouped_sign": ["method=coco_ef21", "compressor=grouped_sign", "compressor.group=4", "optim.lr=0.1"],
    "gc": ["method=gc"],
    "gc-frc": ["method=gc", "code=frc", "code.d=3"],
    "ef_sgd-topk": ["method=ef_sgd", "compressor=topk", "compressor.k=2"],
    "ignore_stragglers": ["method=ignore_stragglers"],
    "gd": ["method=gd"],
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_method_trajectory_equals_numpy_reference(case):
    compare(LINREG + CASES[case])


@pytest.mark.parametrize("method", ["coco_ef", "coco_diana", "coco_ef21", "ef_sgd"])
@pytest.mark.parametrize("state", ["freeze", "reset"])
def test_straggler_state_trajectory_equals_numpy_reference(method, state):
    """freeze: a straggler's memory is kept as it is; reset: it is zeroed (docs/design.md §1)."""
    comp = ["compressor=topk", "compressor.k=2"]
    if method == "coco_diana":
        comp += ["method.allow_biased=true", "method.alpha=0.5"]
    got = compare(LINREG + [f"method={method}", f"method.straggler_state={state}", "straggler.p=0.4", "seeds=2"] + comp)
    assert (got.n_received.dropna() < 6).any()  # some updates had stragglers


@pytest.mark.parametrize(
    "setup",
    [
        ["dataset=synthetic_logreg", "dataset.n=300", "dataset.dim=6", "model=logistic", "model.l2=0.01"],
        ["dataset=iris", "model=softmax", "model.l2=0.02"],
    ],
)
@pytest.mark.parametrize("method", ["coco_ef", "coco_ef21"])
def test_classification_trajectory_equals_numpy_reference(setup, method):
    compare(BASE + setup + [f"method={method}", "compressor=topk", "compressor.k=3", "optim.lr=0.5"])


def test_coco_ef_on_the_compiled_topk_kernel_path_equals_numpy_reference():
    """D = 201, k = 20: Top-k runs in the compiled threshold kernel with U = B G fused into it."""
    compare(
        LINREG
        + [
            "dataset.dim=200",
            "dataset.n=400",
            "method=coco_ef",
            "compressor=topk",
            "compressor.k=20",
            "optim.lr=0.1",
            "iters=12",
        ]
    )


def test_linear_model_with_ridge_and_markov_stragglers_equals_numpy_reference():
    """l2 > 0 adds (|P_j|/n) λ θ to every partition gradient; persistent (markov) stragglers; T not a
    multiple of eval_every (the last update still has its row)."""
    compare(
        LINREG
        + [
            "model.l2=0.1",
            "iters=22",
            "straggler=markov",
            "straggler.p=0.3",
            "straggler.stay=0.6",
            "method=coco_ef",
            "compressor=topk",
            "compressor.k=2",
        ]
    )


def test_delay_stragglers_and_simulated_time_equal_numpy_reference():
    """delay: T_i = load_i (t0 + Exp(mu)) by inversion of the straggler stream's uniforms, straggler
    iff T_i > deadline; sim_time adds per update the deadline (or max_i T_i if all answered) plus
    the upload time of one message, bits / bandwidth (docs/design.md §3); the marginal p of the p column."""
    t0, mu, deadline, bw, T = 1.0, 2.0, 1.6, 20000.0, 24
    linreg = [o for o in LINREG if not o.startswith("straggler.p=")]
    got = compare(
        linreg
        + [
            "method=ignore_stragglers",
            "straggler=delay",
            f"straggler.t0={t0}",
            f"straggler.mu={mu}",
            f"straggler.deadline={deadline}",
            f"network.bandwidth_bps={bw}",
        ]
    )
    rng, D, M = SeedRNG([0], "straggler"), 8, 6
    clock, times, answered = 0.0, [0.0], []
    for t in range(1, T + 1):
        u = rng.rand(M, dtype=torch.float64).numpy()[0]
        Ti = 1.0 * (t0 - np.log1p(-u) / mu)  # uncoded: load 1
        late = Ti > deadline
        clock += (deadline if late.any() else Ti.max()) + 32 * D / bw
        answered.append(int((~late).sum()))
        if t % 4 == 0:
            times.append(clock)
    np.testing.assert_allclose(got.sim_time.to_numpy(float), times, rtol=1e-12)
    np.testing.assert_array_equal(got.n_received.to_numpy(float)[1:], answered[3::4])
    assert 0 < np.mean(answered) < M
    # the marginal P(T_i > deadline) = exp(−mu (deadline/load − t0)), the run's p column
    assert got.p.iloc[0] == pytest.approx(np.exp(-mu * (deadline - t0)), rel=1e-12)
