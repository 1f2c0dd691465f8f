"""GPU runs (device=cuda): skipped where no CUDA device is present (the default suite is CPU-only)."""

import pytest
import torch

from cocoef_cli import config
from cocoef_cli.run import execute
from cocoef_cli.sim.engine import Simulation, build_experiment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# deterministic draws only (no stragglers, cyclic allocation, Top-k), so CPU and GPU runs must agree
SETTING = [
    "dataset=synthetic_linreg",
    "model=linear",
    "devices=20",
    "code=sgc",
    "code.d=3",
    "straggler=none",
    "method=coco_ef",
    "compressor=topk",
    "compressor.ratio=0.1",
    "optim.lr=0.05",
    "iters=30",
    "eval_every=10",
    "precision=float64",
]


def test_cuda_run_equals_cpu_run():
    _, cpu = execute(config.load(SETTING + ["device=cpu"]), None)
    _, gpu = execute(config.load(SETTING + ["device=cuda"]), None)
    torch.testing.assert_close(
        torch.as_tensor(gpu.metrics.train_loss.to_numpy()),
        torch.as_tensor(cpu.metrics.train_loss.to_numpy()),
        rtol=1e-9,
        atol=1e-12,
    )


@pytest.mark.parametrize("model", [["dataset=mnist5k", "model=mlp"], ["dataset=mnist5k", "model=softmax"]])
def test_cuda_iteration_has_no_host_round_trip(model):
    """Every tensor of the run lives on the GPU and an update never waits for the device."""
    cfg = config.load(
        [
            "code=sgc",
            "code.d=3",
            "straggler=bernoulli",
            "straggler.p=0.2",
            "method=coco_ef",
            "compressor=topk",
            "compressor.ratio=0.01",
            "devices=100",
            "device=cuda",
            *model,
        ]
    )
    sim = Simulation(build_experiment(cfg))
    for _ in range(2):  # warm-up: caches (CSR structure, buffers) are built here
        sim.step()
    assert sim.theta.is_cuda and sim.exp.method.e.is_cuda and sim.exp.objective.Xp.is_cuda
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sim.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(sim.theta).all()
