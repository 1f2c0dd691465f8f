"""model=module: any torch.nn.Module (factories in tests/module_nets.py), exact against autograd run on
each partition alone (float64); θ⁰ from the factory per replicate seed; validation; a built-in twin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import module_nets
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as Fn
from minibatch_reference import assert_minibatch_grads
from typer.testing import CliRunner

from cocoef_cli import config
from cocoef_cli.cli import app
from cocoef_cli.data import Dataset, partition_indices
from cocoef_cli.errors import ConfigError
from cocoef_cli.models import Objective, build_model
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.engine import build_experiment, simulate

SEEDS = [3, 4]
TESTS = Path(__file__).resolve().parent
runner = CliRunner()


def dataset(n=23, shape=(1, 6, 6), classes=4, task="classification", seed=0) -> Dataset:
    g = np.random.default_rng(seed)
    f = int(np.prod(shape))
    y, yte = (
        (np.arange(n) % classes, np.arange(7) % classes) if task == "classification" else (g.random(n), g.random(7))
    )
    k = classes if task == "classification" else 0
    return Dataset("tiny", g.random((n, f)), y, g.random((7, f)), yte, task, k, shape if len(shape) == 3 else None)


def module_model(target, data, **keys):
    return build_model({"name": "module", "_target_": f"module_nets.{target}", "l2": 0.0, **keys}, data)


def reference_grad(model, r, theta, X, y, scale):
    """scale · Σ_s ∇ℓ_s(θ_r) by plain autograd on the module the factory returns, θ_r and replicate r's buffers
    loaded into it, on the given samples only."""
    net = model.factory(**model.kwargs).double()
    torch.nn.utils.vector_to_parameters(theta.detach().clone(), net.parameters())
    for name, b in net.named_buffers():
        b.copy_(model.buffers[name][r])
    z = net(X.reshape(len(X), *model.input_shape))
    if model.task == "regression":
        loss = scale * 0.5 * ((z.squeeze(-1) - y) ** 2).sum()
    else:
        loss = scale * Fn.cross_entropy(z, y, reduction="sum")
    return torch.nn.utils.parameters_to_vector(torch.autograd.grad(loss, list(net.parameters())))


CASES = [
    ("mlp", {"width": 5, "depth": 2}, (1, 6, 6), "classification"),
    ("resnet", {"channels": 2}, (1, 6, 6), "classification"),
    ("Scaled", {}, (1, 6, 6), "classification"),
    ("mlp", {}, (5,), "regression"),
]


@pytest.mark.parametrize("target,keys,shape,task", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_partition_grads_equal_autograd_per_partition(target, keys, shape, task):
    n = 23
    data = dataset(n, shape, task=task)
    model = module_model(target, data, **keys)
    parts = partition_indices(data.y_train, 4, {"partition": "iid"}, SEEDS)
    parts[:, 0, 1:] = n  # partition 0 of each replicate keeps one sample: unequal sizes (its others are dropped)
    assert len(set((parts < n).sum(-1).ravel().tolist())) > 1
    l2 = 0.05
    obj = Objective(model, data, parts, l2, torch.float64, torch.device("cpu"))
    theta = model.init(SeedRNG(SEEDS, "init"), torch.float64)
    G = obj.partition_grads(theta)
    assert G.shape == (len(SEEDS), 4, model.D) and G.dtype == torch.float64
    X, Y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    for r in range(len(SEEDS)):
        for j in range(4):
            idx = torch.as_tensor(parts[r, j][parts[r, j] < n])
            ref = reference_grad(model, r, theta[r], X[idx], Y[idx], 1.0 / n) + (len(idx) / n) * l2 * theta[r]
            torch.testing.assert_close(G[r, j], ref, rtol=1e-9, atol=1e-12)
    full_ref = torch.stack([reference_grad(model, r, theta[r], X, Y, 1.0 / n) for r in range(len(SEEDS))])
    F, g = obj.loss_and_grad(theta)
    torch.testing.assert_close(g, full_ref + l2 * theta, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(F, obj.loss(theta), rtol=1e-12, atol=1e-14)
    Z = model.logits(theta, X)  # shared inputs (n, f) and per-replicate ones (R, n, f) agree
    assert Z.shape == (len(SEEDS), n, model.C)
    torch.testing.assert_close(model.logits(theta, X.expand(len(SEEDS), n, X.shape[1])), Z)
    blocks = obj.partition_grad_blocks(theta)
    assert [b.shape[-1] for b in blocks] == [p.numel() for p in model.template.parameters()]
    torch.testing.assert_close(torch.cat(blocks, -1), G, rtol=0, atol=0)


def test_minibatch_grads_are_autograd_on_the_drawn_samples():
    n, b = 30, 4
    data = dataset(n, (1, 6, 6))
    model = module_model("resnet", data)
    theta = model.init(SeedRNG(SEEDS, "init"), torch.float64)
    assert_minibatch_grads(  # 9 partitions of 30: sizes 4 and 3, so b_j < b too
        model, data, SEEDS, b, theta, lambda r, th, Xb, Yb, w: reference_grad(model, r, th, Xb, Yb, w)
    )


def test_init_is_the_factorys_under_the_replicate_seed():
    data = dataset()
    model = module_model("Scaled", data)
    th = model.init(SeedRNG([0, 1], "init"), torch.float64)
    s = model.buffers["s"].clone()
    again = model.init(SeedRNG([1], "init"), torch.float64)
    torch.testing.assert_close(th[1:], again)  # replicate r is the run with seed r alone
    torch.testing.assert_close(model.buffers["s"], s[1:])  # buffers too
    assert not torch.equal(th[0], th[1]) and not torch.equal(s[0], s[1])
    assert model.buffers["count"].dtype == torch.int64  # integer buffers keep their dtype
    # θ⁰ is exactly the factory's parameters when torch's generator is seeded as the init stream seeds it
    g = SeedRNG([0], "init").gens[0]
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    net = module_nets.Scaled((36,), 4)
    torch.testing.assert_close(th[0], torch.nn.utils.parameters_to_vector(net.parameters()).double())
    # the global generator is left as it was
    state = torch.get_rng_state()
    module_model("mlp", data).init(SeedRNG([0], "init"), torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    zero = module_model("linear_zero", data).init(SeedRNG([0, 1], "init"), torch.float64)
    assert (zero == 0).all()


def test_the_factory_gets_the_shape_and_outputs_only_if_it_takes_them():
    iris = ["dataset=iris", "devices=5", "iters=3", "eval_every=3"]
    cfg = config.load([*iris, "model=module", "model._target_=module_nets.fixed", "+model.width=6"])
    model = build_experiment(cfg).objective.model
    assert model.kwargs == {"width": 6} and model.D == 4 * 6 + 6 + 6 * 3 + 3


def test_batchnorm_in_eval_mode_is_an_affine_map():
    data = dataset()
    model = module_model("batchnorm", data, eval=True)
    assert set(model.template.state_dict()) >= {"2.running_mean", "2.running_var"}
    parts = partition_indices(data.y_train, 3, {"partition": "iid"}, SEEDS)
    obj = Objective(model, data, parts, 0.0, torch.float64, torch.device("cpu"))
    theta = model.init(SeedRNG(SEEDS, "init"), torch.float64)
    G = obj.partition_grads(theta)
    X, Y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    idx = torch.as_tensor(parts[1, 2][parts[1, 2] < data.n])
    net = model.factory(**model.kwargs).double()
    torch.nn.utils.vector_to_parameters(theta[1].clone(), net.parameters())
    ref = torch.autograd.grad(Fn.cross_entropy(net(X[idx]), Y[idx], reduction="sum") / data.n, list(net.parameters()))
    torch.testing.assert_close(G[1, 2], torch.nn.utils.parameters_to_vector(ref), rtol=1e-9, atol=1e-12)


def test_a_module_that_is_softmax_gives_its_trajectory():
    """nn.Linear zero-initialised on the flattened input = model=softmax (bias) at θ⁰ = 0: the same metrics
    (close, not byte-identical: the θ layout differs — weight then bias vs bias as the last column — and the
    sums run in another order; scaled_sign and the metrics do not depend on the layout)."""
    common = ["dataset=digits", "devices=10", "iters=30", "eval_every=10", "seeds=2", "precision=float64"]
    common += ["compressor=scaled_sign", "optim.lr=0.5", "model.l2=0.01"]
    a = simulate(build_experiment(config.load([*common, "model=softmax"]))).metrics
    b = simulate(
        build_experiment(config.load([*common, "model=module", "model._target_=module_nets.linear_zero"]))
    ).metrics
    cols = ["train_loss", "test_loss", "test_acc", "grad_norm", "ef_norm", "bits_up"]
    assert len(a) == len(b) == 8
    assert a.train_loss.iloc[-1] < 0.9 * a.train_loss.iloc[0]  # it trains
    np.testing.assert_allclose(b[cols].to_numpy(float), a[cols].to_numpy(float), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "overrides,key,reason",
    [
        (["model=module"], "model._target_", "required"),
        (["model=module", "model._target_=no_such_pkg.make"], "model._target_", "no module named no_such_pkg"),
        (["model=module", "model._target_=module_nets.nope"], "model._target_", "module_nets has no attribute nope"),
        (["model=module", "model._target_=module_nets.not_a_module"], "model._target_", "it returned int"),
        (
            ["model=module", "model._target_=module_nets.raises"],
            "model._target_",
            "raised RuntimeError: no network today",
        ),
        (["model=module", "model._target_=module_nets.batchnorm"], "model._target_", "BatchNorm in training mode"),
        (["model=module", "model._target_=module_nets.Running"], "model._target_", "partition gradient failed"),
        (["model=module", "model._target_=module_nets.mlp", "+model.widht=3"], "model.widht", "did you mean"),
        (["model=module", "model._target_=module_nets.mlp", "model.width=3"], "model.width", "+model.width=3"),
        (["model=module", "model._target_=module_nets.mlp", "+model.num_outputs=3"], "model.num_outputs", "given"),
        (["model=module", "model._target_=module_nets.wrong_outputs"], "model._target_", "for S = 2 is (2, 4)"),
        (
            ["model=module", "model._target_=module_nets.resnet"],
            "model._target_",
            "(input_shape=(4,), num_outputs=3) raised ValueError",
        ),
    ],
)
def test_bad_module_configs_exit_2_with_one_line_before_any_work(tmp_path, overrides, key, reason):
    out = tmp_path / "o"
    res = runner.invoke(app, ["run", *overrides, "dataset=iris", "devices=5", "iters=2", "--out", str(out)])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {key}=") and reason in line, line
    assert not out.exists()


def test_a_required_argument_of_the_factory_is_named():
    with pytest.raises(ConfigError, match=r"^model\.width=None: required by module_nets.required, missing"):
        module_model("required", dataset())
    assert module_model("required", dataset(), width=3).D == 36 * 3 + 3 + 3 * 4 + 4


def test_run_and_rerun_with_a_module(tmp_path):
    ov = ["model=module", "model._target_=module_nets.resnet", "+model.channels=2", "dataset=digits", "devices=6"]
    res = runner.invoke(app, ["run", *ov, "iters=4", "eval_every=2", "--out", str(tmp_path / "r"), "-q"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["config"]["model"] == {"name": "module", "_target_": "module_nets.resnet", "l2": 0.0, "channels": 2}
    res = runner.invoke(app, ["rerun", str(tmp_path / "r")])
    assert res.exit_code == 0 and "identical" in res.output, res.output


def test_a_joblib_sweep_imports_the_factory_in_its_workers(tmp_path):
    """Two jobs in two joblib worker processes, the factory's folder on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    mlp = ["model=module", "model._target_=module_nets.mlp", "+model.width=4"]  # on smoke's least squares
    sweep = [sys.executable, "-m", "cocoef_cli.cli", "sweep", "smoke", *mlp, "method=coco_ef", "straggler.p=0.1,0.3"]
    p = subprocess.run([*sweep, "--jobs", "2", "--out", str(tmp_path / "s")], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    index = pd.read_csv(tmp_path / "s" / "index.csv")
    assert len(index) == 2 and (index.status == "completed").all()
    for job in index.job:
        m = pd.read_csv(tmp_path / "s" / job / "metrics.csv")
        assert (m.model == "module").all() and set(m.seed) == {0, 1} and m.iter.max() == 30


@pytest.mark.parametrize(
    "factory,builtin",
    [("module_mlp", {"name": "mlp", "hidden": [64]}), ("module_lenet", {"name": "cnn", "channels": [6, 16]})],
)
def test_the_bench_modules_are_the_builtin_networks(factory, builtin):
    """The nn.Modules `make bench` times against model=mlp / model=cnn: same θ layout, same partition gradients."""
    data = dataset(11, (1, 28, 28), classes=3)
    mod = build_model({"name": "module", "_target_": f"cocoef_cli.bench.{factory}", "l2": 0.0}, data)
    ref = build_model({**builtin, "hidden": builtin.get("hidden", [120, 84]), "kernel": 5, "init": "torch"}, data)
    assert mod.D == ref.D
    parts = partition_indices(data.y_train, 3, {"partition": "iid"}, SEEDS)
    theta = ref.init(SeedRNG(SEEDS, "init"), torch.float64)
    G = Objective(mod, data, parts, 0.0, torch.float64, torch.device("cpu")).partition_grads(theta)
    G_ref = Objective(ref, data, parts, 0.0, torch.float64, torch.device("cpu")).partition_grads(theta)
    torch.testing.assert_close(G, G_ref, rtol=1e-9, atol=1e-12)
