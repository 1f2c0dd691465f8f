"""The simulator end to end against independent references."""

import numpy as np
import pandas as pd
import pytest
import torch

from cocoef_cli import config
from cocoef_cli.data import load_dataset
from cocoef_cli.rng import SeedRNG
from cocoef_cli.run import execute
from cocoef_cli.sim.compressors import build_compressor
from cocoef_cli.sim.engine import COLUMNS
from cocoef_cli.sim.methods import METHODS


def gd_losses(cfg: dict, lr: float, T: int, every: int) -> list[float]:
    """Plain float64 gradient descent on ½‖Xw + b − y‖²/n, written independently of the package."""
    data = load_dataset(cfg["dataset"])
    X = np.hstack([data.X_train, np.ones((data.n, 1))])
    y = data.y_train
    w = np.zeros(X.shape[1])
    out = []
    for t in range(T + 1):
        if t % every == 0 or t == T:
            out.append(0.5 * np.mean((X @ w - y) ** 2))
        w = w - lr * X.T @ (X @ w - y) / len(y)
    return out


CODES = [
    ["code=uncoded"],
    ["code=sgc", "code.d=3"],
    ["code=sgc", "code.d=2", "code.allocation=random"],
    ["code=frc", "code.d=3"],
    ["code=crc", "code.d=3"],
    ["code=bgc", "code.d=3"],
]


@pytest.mark.parametrize("method", ["coco_ef", "coco", "gc"])
@pytest.mark.parametrize("code", CODES, ids=lambda c: "-".join(v.split("=")[1] for v in c))
def test_identity_no_stragglers_is_gradient_descent(small, method, code):
    cfg = config.load(small + code + [f"method={method}", "compressor=identity", "straggler=none", "optim.lr=0.3"])
    _, res = execute(cfg, None)
    ref = gd_losses(cfg, 0.3, 20, 5)
    got = res.metrics.train_loss.to_numpy()
    assert len(got) == len(ref) == 5
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=0)
    assert (res.metrics.n_received.dropna() == 6).all()


def test_gd_method_is_gradient_descent(small):
    cfg = config.load(small + ["method=gd", "optim.lr=0.3"])
    _, res = execute(cfg, None)
    np.testing.assert_allclose(res.metrics.train_loss, gd_losses(cfg, 0.3, 20, 5), rtol=1e-10)
    assert res.metrics.bits_up.isna().all() and (res.metrics.code == "none").all()


RANDOM_SETUP = [
    "method=coco_ef",
    "compressor=randk",
    "compressor.k=2",
    "straggler=bernoulli",
    "straggler.p=0.3",
    "code=sgc",
    "code.allocation=random",
    "code.d=2",
    "batch_size=8",
]


def test_seeds_run_together_equal_separate_runs(small):
    together = execute(config.load(small + RANDOM_SETUP + ["seed=3", "seeds=4"]), None)[1].metrics
    apart = pd.concat(
        [execute(config.load(small + RANDOM_SETUP + [f"seed={s}"]), None)[1].metrics for s in range(3, 7)],
        ignore_index=True,
    )
    assert list(together.seed.unique()) == [3, 4, 5, 6]
    num = ["train_loss", "test_loss", "grad_norm", "bits_up", "n_received", "ef_norm", "opt_gap"]
    np.testing.assert_allclose(together[num].to_numpy(float), apart[num].to_numpy(float), rtol=1e-12, atol=1e-15)
    # and the replicates really differ from each other
    assert together.groupby("seed").train_loss.last().nunique() == 4


def test_metrics_schema_and_semantics(small):
    cfg = config.load(small + ["straggler.p=0.5", "compressor=topk", "compressor.k=2", "seeds=2"])
    _, res = execute(cfg, None)
    df = res.metrics
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert list(df.iter.unique()) == [0, 5, 10, 15, 20]
    first, rest = df[df.iter == 0], df[df.iter > 0]
    assert (first.bits_up == 0).all() and first.n_received.isna().all()
    assert rest.n_received.between(0, 6).all()
    # bits: k·(32 + ceil(log2 D)) per message, D = 6 → ceil(log2 6) = 3
    per_msg = 2 * (32 + 3)
    assert (df.bits_up % per_msg == 0).all()
    assert (rest.groupby("seed").bits_up.diff().dropna() >= 0).all()
    assert df.p.eq(0.5).all() and df.d.eq(3).all() and df.test_acc.isna().all()
    assert df.decode_residual.isna().all()  # sgc: fixed weights
    assert (df.ef_norm[df.iter > 0] > 0).all()
    assert (df.opt_gap >= -1e-9).all()


def test_diverged_run_keeps_earlier_rows(small):
    cfg = config.load(small + ["optim.lr=1e6", "iters=200", "eval_every=1", "diverge_factor=null"])  # non-finite θ
    _, res = execute(cfg, None)
    assert res.status == "diverged" and 0 in res.diverged
    assert np.isfinite(res.metrics.train_loss).all()
    assert 0 < res.metrics.iter.max() < res.diverged[0]


@pytest.mark.parametrize("method", ["coco_ef", "ef_sgd"])
@pytest.mark.parametrize("comp", ["topk", "sign", "scaled_sign", "randk", "randk_unbiased", "qsgd", "natural"])
def test_error_feedback_invariant_with_stragglers(method, comp):
    """Σ_t ĝ_t + Σ_i e_i = Σ_t Σ_i z_i u_i when a = z: nothing sent is lost or invented."""
    R, M, D, T = 3, 4, 7, 25
    C = build_compressor({"name": comp, "k": 2, "levels": 2}, D)
    cls = METHODS.get(method)
    m = cls({}, C, R, M, D, torch.float64, torch.device("cpu"), SeedRNG(range(R), "compressor"))
    g = torch.Generator().manual_seed(0)
    sent = torch.zeros(R, D, dtype=torch.float64)
    inputs = torch.zeros(R, D, dtype=torch.float64)
    for _ in range(T):
        z = torch.rand(R, M, generator=g) > 0.3
        U = torch.randn(R, M, D, generator=g, dtype=torch.float64) * z.unsqueeze(-1)  # stragglers: u = 0
        inputs += U.sum(1)
        sent += m.step(U, z, z.double())
    torch.testing.assert_close(sent + m.e.sum(1), inputs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("comp", ["topk", "scaled_sign", "randk"])
@pytest.mark.parametrize("reset", ["freeze", "reset"])
def test_coco_ef_coded_step_equals_step_on_the_formed_sum(comp, reset):
    """What the simulator calls, coded_step(U) with U = B G not yet formed (fused into the Top-k
    kernel's pass), equals step on U formed first: same aggregate, same error memory."""
    from cocoef_cli.sim.codes import CodedSum, allocate, build_code

    R, M, D, T = 2, 12, 3000, 4
    rng_ = SeedRNG([0, 1], "code")
    code = build_code(
        {"name": "sgc", "d": 3},
        allocate({"name": "sgc", "d": 3}, M, rng_),
        torch.full((R, M), 0.2, dtype=torch.float64),
        rng_,
        torch.float64,
    )
    C = build_compressor({"name": comp, "k": 40}, D)
    fused, formed = (
        METHODS.get("coco_ef")(
            {"straggler_state": reset}, C, R, M, D, torch.float64, torch.device("cpu"), SeedRNG([0, 1], "compressor")
        )
        for _ in range(2)
    )
    g = torch.Generator().manual_seed(4)
    for _ in range(T):
        G = torch.randn(R, code.N, D, generator=g, dtype=torch.float64)
        z = torch.rand(R, M, generator=g) > 0.3
        a, _ = code.decode(z)
        U = CodedSum(code, [G], z)
        torch.testing.assert_close(fused.coded_step(U, z, a), formed.step(U.dense(), z, a), rtol=0, atol=1e-12)
        torch.testing.assert_close(fused.e, formed.e, rtol=0, atol=1e-12)


def test_a_straggler_memory_holding_inf_does_not_reach_the_aggregate():
    """A straggler sends nothing: its (frozen) memory, even inf, touches neither ĝ nor itself."""
    R, M, D = 1, 3, 400
    C = build_compressor({"name": "topk", "k": 20}, D)
    m = METHODS.get("coco_ef")({}, C, R, M, D, torch.float32, torch.device("cpu"), SeedRNG([0], "compressor"))
    m.e[0, 1, 7] = float("inf")
    z = torch.tensor([[True, False, True]])
    U = torch.randn(R, M, D) * z.unsqueeze(-1)
    g = m.step(U, z, z.float())
    assert torch.isfinite(g).all()
    assert m.e[0, 1, 7] == float("inf") and torch.isfinite(m.e[0, [0, 2]]).all()


def test_reset_straggler_state_zeroes_memory():
    R, M, D = 1, 3, 5
    C = build_compressor({"name": "topk", "k": 1}, D)
    m = METHODS.get("coco_ef")(
        {"straggler_state": "reset"}, C, R, M, D, torch.float64, torch.device("cpu"), SeedRNG([0], "compressor")
    )
    U = torch.randn(R, M, D, dtype=torch.float64)
    m.step(U.clone(), torch.ones(R, M, dtype=torch.bool), torch.ones(R, M, dtype=torch.float64))
    assert (m.e.norm(dim=-1) > 0).all()
    z = torch.tensor([[True, False, True]])
    before = m.e.clone()
    m.step(U * z.unsqueeze(-1), z, z.double())
    assert m.e[0, 1].abs().sum() == 0 and not torch.equal(m.e[0, 0], before[0, 0])


def test_momentum_and_schedules_run(small):
    for ov in (["optim.momentum=0.5"], ["optim.schedule=inv_sqrt"], ["optim.schedule=step", "optim.step_size=5"]):
        _, res = execute(config.load(small + ov), None)
        assert res.status == "completed"
        assert res.metrics.train_loss.iloc[-1] < res.metrics.train_loss.iloc[0]


@pytest.mark.parametrize(
    "setup",
    [
        ["dataset=iris", "model=softmax"],
        ["dataset=breast_cancer", "model=logistic"],
        ["dataset=wine", "model=softmax", "code=crc"],
        ["dataset=synthetic_logreg", "model=logistic", "method=coco_diana", "compressor=qsgd"],
        ["dataset=digits", "model=softmax", "method=coco_ef21", "compressor=scaled_sign", "straggler=markov"],
    ],
)
def test_classification_workloads_learn(setup):
    cfg = config.load(setup + ["devices=10", "iters=60", "eval_every=30", "optim.lr=0.5", "code.d=2"])
    _, res = execute(cfg, None)
    df = res.metrics
    assert df.test_acc.notna().all()
    assert df.train_loss.iloc[-1] < df.train_loss.iloc[0]
    assert df.test_acc.iloc[-1] > df.test_acc.iloc[0] or df.test_acc.iloc[-1] > 0.8


def test_delay_model_records_sim_time(small):
    cfg = config.load(small + ["straggler=delay", "straggler.deadline=8.0"])
    _, res = execute(cfg, None)
    t = res.metrics.groupby("seed").sim_time
    assert res.metrics.sim_time.iloc[0] == 0 and (t.diff().dropna() > 0).all()
    # each update costs at most the deadline plus the upload of one message
    per_update = res.metrics.sim_time.diff().dropna() / 5
    assert (per_update <= 8.0 + 1.0).all()


@pytest.mark.parametrize(
    "setup",
    [
        ["dataset=mnist1d", "model=mlp", "model.l2=0.01"],
        ["dataset=digits", "model=softmax", "model.l2=0.01", "seeds=2"],
        ["iters=4"],
    ],
)
def test_evaluation_shares_the_next_updates_gradients(setup, monkeypatch):
    """An evaluation takes ∇F = Σ_j g_j and F from the partition gradients' pass at θ^t (F the
    same value as the full pass, summed in another order); the next update reuses those G, so a
    run computes one partition pass per update (plus one for the final evaluation), never a full
    backward pass and never a forward pass of its own on the training set."""
    from cocoef_cli.models import Objective
    from cocoef_cli.sim.engine import Simulation, build_experiment, simulate

    cfg = config.load(setup + ["iters=6", "eval_every=2", "devices=6"])
    sim = Simulation(build_experiment(cfg))
    sim.step()
    obj = sim.exp.objective
    full, shared = obj.evaluate(sim.theta), obj.evaluate(sim.theta, *obj.partition_loss_grad_blocks(sim.theta))
    torch.testing.assert_close(shared.train_loss, full.train_loss, rtol=1e-6, atol=0)
    assert torch.equal(obj.evaluate(sim.theta, obj.partition_grad_blocks(sim.theta)).train_loss, full.train_loss)
    torch.testing.assert_close(shared.grad, full.grad, rtol=1e-5, atol=1e-7)
    assert not torch.equal(shared.grad, torch.zeros_like(shared.grad))

    calls = {"partition": 0, "partition+loss": 0, "full": 0, "train_loss": 0}

    def counted(name, key):
        method = getattr(Objective, name)

        def wrapper(s, th):
            calls[key] += 1
            return method(s, th)

        monkeypatch.setattr(Objective, name, wrapper)

    counted("partition_gradients", "partition")  # an update's G (formed whole or by parts)
    counted("partition_loss_grad_blocks", "partition+loss")
    counted("loss_and_grad", "full")
    counted("train_loss", "train_loss")
    simulate(build_experiment(cfg))
    # evaluations at t = 0, 2, 4, 6 compute G with F; the updates at t = 1, 3, 5 compute G alone
    assert calls == {"partition": 3, "partition+loss": 4, "full": 0, "train_loss": 0}


@pytest.mark.parametrize("extra", [["code.d=2"], ["code.d=3", "model.l2=0.01", "batch_size=8"], ["code=uncoded"]])
@pytest.mark.parametrize("threads", [1, 2])
def test_updates_with_g_by_parts_are_the_bits_of_g_whole(extra, threads, monkeypatch):
    """A run whose COCO-EF updates form G by parts (parts of 41 of the 42 rows, the real partition
    gradients: the last part is one row, reading one partition, or, with sgc d = 2, two runs of
    one) leaves the same bits in θ and the error memory as with G whole, at 1 and 2 threads."""
    from cocoef_cli.sim import codes, compressors
    from cocoef_cli.sim.engine import Simulation, build_experiment

    if compressors._kernels() is None:
        pytest.skip("no compiled kernel: G is formed whole")
    base = ["dataset=digits", "model=mlp", "model.hidden=[32]", "devices=21", "seeds=2", "compressor.ratio=0.05"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sims = [Simulation(build_experiment(config.load(base + extra + [f"threads={threads}"]))) for _ in range(2)]
        parts = 0
        kernel_parts = codes.CodedSum.kernel_parts

        def counting(self, v):
            nonlocal parts
            for i0, i1, args in kernel_parts(self, v):
                parts += (i1 - i0) < self.code.R * self.code.M
                yield i0, i1, args

        monkeypatch.setattr(codes.CodedSum, "kernel_parts", counting)
        monkeypatch.setattr(codes, "G_FORM", "parts")  # not the timed choice: by parts every update
        for _ in range(4):
            for sim, part_bytes in zip(sims, [1 << 62, 4 * 2410 * 41]):
                monkeypatch.setattr(codes, "PART_BYTES", part_bytes)
                sim.step()
    finally:
        torch.set_num_threads(before)
    assert parts == 4 * 2  # every update of the second run in two parts (41 rows, then 1)
    assert torch.equal(sims[0].theta, sims[1].theta)
    assert torch.equal(sims[0].exp.method.e, sims[1].exp.method.e)
