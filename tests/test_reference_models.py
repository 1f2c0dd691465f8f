"""The networks' initialisation and evaluation against independent references (torch.nn, statistics)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from cocoef_cli import config
from cocoef_cli.data import load_dataset
from cocoef_cli.models import build_model
from cocoef_cli.rng import SeedRNG
from cocoef_cli.run import execute


@pytest.mark.parametrize("init", ["torch", "kaiming", "xavier"])
def test_network_init_is_uniform_on_minus_c_to_c(init):
    """Every tensor of θ⁰ ~ U(−c, c) coordinatewise (torch: c = 1/√fan_in, kaiming √(6/fan_in),
    xavier √(6/(fan_in + fan_out)); biases 0 except for torch): x = θ/c has mean 0 and E[x²] = 1/3,
    both within 5 standard errors (Var x = 1/3, Var x² = 4/45), over one fixed seed."""
    cfg = config.load(["dataset=digits", "model=mlp", "model.hidden=[48]", f"model.init={init}"])
    model = build_model(cfg["model"], load_dataset(cfg["dataset"]))
    theta = model.init(SeedRNG([0], "init"), torch.float64)
    for (name, _, fan_in, fan_out), x in zip(model.params, model.unflatten(theta[0])):
        bias = name.endswith("bias")
        c = {
            "torch": 1 / math.sqrt(fan_in),
            "kaiming": 0.0 if bias else math.sqrt(6 / fan_in),
            "xavier": 0.0 if bias else math.sqrt(6 / (fan_in + fan_out)),
        }[init]
        x = x.flatten().numpy()
        if c == 0.0:
            assert (x == 0).all(), name
            continue
        x = x / c
        n = len(x)
        assert np.abs(x).max() <= 1.0, name
        assert abs(x.mean()) <= 5 * math.sqrt(1 / 3 / n), name
        assert abs((x * x).mean() - 1 / 3) <= 5 * math.sqrt(4 / 45 / n), name


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_run_metrics_equal_torch_nn(activation):
    """A run of the MLP on iris: the row at t = 0 (θ⁰ from the init stream) against an
    nn.Sequential loaded with θ⁰: train loss = mean cross-entropy, ‖∇F‖ by autograd, test loss and
    accuracy (argmax of the logits)."""
    cfg = config.load(
        [
            "dataset=iris",
            "model=mlp",
            "model.hidden=[6]",
            f"model.activation={activation}",
            "devices=3",
            "code.d=2",
            "iters=2",
            "eval_every=1",
            "precision=float64",
            "seeds=2",
        ]
    )
    exp, res = execute(cfg, None)
    data = exp.data
    theta = exp.objective.model.init(SeedRNG(exp.seeds, "init"), torch.float64)
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation]
    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    Xte, yte = torch.as_tensor(data.X_test), torch.as_tensor(data.y_test)
    first = res.metrics[res.metrics.iter == 0]
    for r in range(2):
        net = torch.nn.Sequential(torch.nn.Linear(4, 6), act(), torch.nn.Linear(6, 3)).double()
        torch.nn.utils.vector_to_parameters(theta[r], net.parameters())
        loss = Fn.cross_entropy(net(X), y)
        grad = torch.nn.utils.parameters_to_vector(torch.autograd.grad(loss, list(net.parameters())))
        with torch.no_grad():
            Zte = net(Xte)
            row = first.iloc[r]
            assert row.train_loss == pytest.approx(float(loss), rel=1e-10)
            assert row.grad_norm == pytest.approx(float(grad.norm()), rel=1e-10)
            assert row.test_loss == pytest.approx(float(Fn.cross_entropy(Zte, yte)), rel=1e-10)
            assert row.test_acc == pytest.approx(float((Zte.argmax(-1) == yte).double().mean()), rel=1e-12)
