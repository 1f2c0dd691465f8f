"""Step sizes, momentum, minibatches and randomised compressors against independent references.

Schedules and momentum: whole trajectories against the numpy simulator (tests/numpy_reference.py),
to 1e-10. Minibatch gradients, rand-k and QSGD cannot be matched draw for draw by an independent
reference, so their expectations are tested instead, with fixed seeds: a sample mean over K
independent draws must lie within Z_BOUND standard errors of the exact expectation, coordinate by
coordinate (with K ≥ 2000 draws and fixed seeds each such test is deterministic; a wrong rescale
or a biased update moves the mean by many standard errors).
"""

import math

import numpy as np
import numpy_reference
import pytest
import torch
from test_reference_methods import LINREG, compare

from cocoef_cli import config
from cocoef_cli.data import load_dataset, partition_indices
from cocoef_cli.models import Objective, build_model
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.compressors import build_compressor
from cocoef_cli.sim.engine import step_size
from cocoef_cli.sim.methods import METHODS

Z_BOUND = 5.0  # standard errors: a correct sampler exceeds it with probability < 1e-6 per coordinate


def assert_mean_within(samples: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Sample mean over axis 0 within Z_BOUND standard errors of ``expected`` (plus float slack)."""
    K = samples.shape[0]
    se = samples.std(0, ddof=1) / math.sqrt(K)
    err = np.abs(samples.mean(0) - expected)
    assert (err <= Z_BOUND * se + 1e-12).all(), f"{what}: max |mean − E| / se = {np.max(err / (se + 1e-300)):.1f}"


# ------------------------------------------------------------------------------------- schedules
SCHEDULES = {
    "const": ["optim.schedule=const"],
    "inv_sqrt": ["optim.schedule=inv_sqrt", "optim.lr=0.5"],
    "step": ["optim.schedule=step", "optim.step_size=5", "optim.gamma=0.5"],
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("momentum", [0.0, 0.6])
@pytest.mark.parametrize("method", ["coco_ef", "gd"])
def test_schedule_and_momentum_trajectory_equals_numpy_reference(schedule, momentum, method):
    """η_t: const η, inv_sqrt η/√t, step η·γ^⌊(t−1)/s⌋; heavy ball buf ← μ buf + ĝ, θ ← θ − η_t buf."""
    compare(
        LINREG
        + SCHEDULES[schedule]
        + [
            f"optim.momentum={momentum}",
            f"method={method}",
            "compressor=topk",
            "compressor.k=2",
            "iters=24",
            "eval_every=1",
        ]
    )


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_step_size_function_equals_the_formula(schedule):
    optim = {"lr": 0.5, "schedule": schedule, "gamma": 0.3, "step_size": 4}
    for t in range(1, 30):
        assert step_size(optim, t) == pytest.approx(numpy_reference.lr(optim, t), rel=1e-15)


# ------------------------------------------------------------------------------------- minibatches
@pytest.mark.parametrize(
    "setup", [["dataset=synthetic_linreg", "model=linear", "model.l2=0.1"], ["dataset=iris", "model=softmax"]]
)
def test_minibatch_partition_gradients_are_unbiased(setup):
    """batch_size = b < |P_j|: E[g_j^batch] = g_j (the |P_j|/b rescale), over K = 3000 seeded draws
    (R = 500 replicates with their own batch streams and the same partition, 6 draws each)."""
    extra = ["dataset.n=200", "dataset.dim=4"] if "dataset=synthetic_linreg" in setup else []
    cfg = config.load(setup + extra + ["devices=5", "precision=float64"])
    data = load_dataset(cfg["dataset"])
    model = build_model(cfg["model"], data)
    R, calls, b = 500, 6, 3
    parts = np.repeat(partition_indices(data.y_train, 5, cfg["dataset"], [0]), R, axis=0)
    assert ((parts < data.n).sum(-1) > 4 * b).all()
    l2 = cfg["model"].get("l2", 0.0)
    full = Objective(model, data, parts[:1], l2, torch.float64, torch.device("cpu"))
    mb = Objective(
        model, data, parts, l2, torch.float64, torch.device("cpu"), batch_size=b, batch_rng=SeedRNG(range(R), "batch")
    )
    theta = 0.3 * torch.randn(1, model.D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    draws = np.concatenate([mb.partition_grads(theta.expand(R, -1)).numpy() for _ in range(calls)])  # (K, N, D)
    assert np.abs(draws[0] - draws[1]).max() > 0  # draws differ
    assert_mean_within(draws, full.partition_grads(theta).numpy()[0], "minibatch g_j")


# ------------------------------------------------------------------------------------- randomised compressors
def one_step(method: str, comp: dict, K: int, state: bool, **mcfg):
    """K independent replicates (compressor seeds 0..K−1) of one step of ``method`` from the same
    U (M, D), z, a and, if ``state``, the same nonzero h: returns (ĝ (K, D), method, U, h, a)."""
    M, D = 4, 10
    g = torch.Generator().manual_seed(11)
    U = torch.randn(M, D, generator=g, dtype=torch.float64)
    h = torch.randn(M, D, generator=g, dtype=torch.float64) if state else torch.zeros(M, D, dtype=torch.float64)
    z = torch.tensor([True, False, True, True])
    a = torch.tensor([1.3, 0.0, 0.7, 1.0], dtype=torch.float64)
    C = build_compressor(comp, D)
    m = METHODS.get(method)(mcfg, C, K, M, D, torch.float64, torch.device("cpu"), SeedRNG(range(K), "compressor"))
    if state:
        m.h = h.expand(K, M, D).clone()
    Uz = (U * z[:, None]).expand(K, M, D).clone()
    ghat = m.step(Uz, z.expand(K, M), a.expand(K, M))
    return ghat.numpy(), m, (U * z[:, None]).numpy(), h.numpy(), a.numpy()


UNBIASED = {"randk_unbiased": {"name": "randk_unbiased", "k": 3}, "qsgd": {"name": "qsgd", "levels": 2}}


@pytest.mark.parametrize("comp", UNBIASED)
def test_coco_with_an_unbiased_compressor_is_unbiased(comp):
    """E[ĝ] = Σ_i a_i u_i for coco with rand-k (scaled D/k) or QSGD."""
    ghat, _, U, _, a = one_step("coco", UNBIASED[comp], 4000, state=False)
    assert_mean_within(ghat, a @ U, comp)


def test_coco_with_randk_is_biased_by_k_over_d():
    """rand-k without rescaling: E[C(x)] = (k/D) x (docs/design.md §4), so E[ĝ] = (k/D) Σ_i a_i u_i."""
    ghat, _, U, _, a = one_step("coco", {"name": "randk", "k": 3}, 4000, state=False)
    assert_mean_within(ghat, 0.3 * (a @ U), "randk")


@pytest.mark.parametrize("comp,omega", [("randk_unbiased", 10 / 3 - 1), ("qsgd", min(10 / 4, math.sqrt(10) / 2))])
def test_diana_is_unbiased_and_steps_its_shifts_by_the_default_alpha(comp, omega):
    """DIANA (Mishchenko et al. 2019): message h_i + C(u_i − h_i), so E[ĝ] = Σ_i a_i u_i; shift
    h_i ← h_i + α C(u_i − h_i) with α = 1/(ω + 1) by default, so E[h_i'] = h_i + α (u_i − h_i) for a
    device that answered; a straggler's h is kept (freeze). ω: rand-k D/k − 1, QSGD min(D/s², √D/s)."""
    K = 4000
    ghat, m, U, h, a = one_step("coco_diana", UNBIASED[comp], K, state=True)
    alpha = 1.0 / (omega + 1.0)
    assert m.alpha == pytest.approx(alpha, rel=1e-12)
    assert_mean_within(ghat, a @ U, f"{comp} ĝ")
    h_new = m.h.numpy()
    answered = [0, 2, 3]
    assert_mean_within(h_new[:, answered], (h + alpha * (U - h))[answered], f"{comp} h")
    np.testing.assert_array_equal(h_new[:, 1], np.broadcast_to(h[1], h_new[:, 1].shape))


def test_ef21_shift_moves_by_the_compressed_difference():
    """EF21 (Richtárik et al. 2021): h_i ← h_i + C(u_i − h_i), so with an unbiased C, E[h_i'] = u_i
    for a device that answered (never C(u_i − h_i) alone), and ĝ = Σ_i a_i h_i'."""
    ghat, m, U, _, a = one_step("coco_ef21", UNBIASED["randk_unbiased"], 4000, state=True)
    h_new = m.h.numpy()
    assert_mean_within(h_new[:, [0, 2, 3]], U[[0, 2, 3]], "EF21 h")
    np.testing.assert_allclose(ghat, np.einsum("m,kmd->kd", a, h_new), rtol=1e-12, atol=1e-12)
