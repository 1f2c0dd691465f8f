"""The minibatch draw of ``Objective`` re-done by hand, for tests of any model's partition gradients."""

from collections.abc import Callable, Sequence

import torch

from cocoef_cli.data import partition_indices
from cocoef_cli.models import Objective
from cocoef_cli.rng import SeedRNG


def assert_minibatch_grads(
    model,
    data,
    seeds: Sequence[int],
    b: int,
    theta: torch.Tensor,
    reference: Callable[..., torch.Tensor],
    partitions: int = 9,
    draws: int = 2,
) -> None:
    """A float64 ``Objective`` of ``model`` with ``batch_size=b`` over ``partitions`` iid partitions
    of ``data`` (replicate seeds ``seeds``): for ``draws`` successive updates, G =
    obj.partition_grads(θ) equals, per replicate r and partition j, ``reference(r, θ_r, X_batch,
    Y_batch, w)`` on the b_j = min(b, |P_j|) samples the run's ``batch`` stream draws (re-drawn
    from a fresh copy of the stream; padding sorts last), with weight w = |P_j| / (b_j n)."""
    parts = partition_indices(data.y_train, partitions, {"partition": "iid"}, seeds)
    obj = Objective(
        model, data, parts, 0.0, torch.float64, torch.device("cpu"), batch_size=b, batch_rng=SeedRNG(seeds, "batch")
    )
    twin = SeedRNG(seeds, "batch")
    n = len(data.y_train)
    X, Y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    for _ in range(draws):
        G = obj.partition_grads(theta)
        keys = twin.rand(*parts.shape[1:], dtype=torch.float64)
        for r in range(parts.shape[0]):
            for j in range(parts.shape[1]):
                valid = parts[r, j] < n
                order = torch.argsort(keys[r, j].masked_fill(~torch.as_tensor(valid), 2.0))
                bj = min(b, int(valid.sum()))
                idx = torch.as_tensor(parts[r, j])[order[:bj]]
                ref = reference(r, theta[r], X[idx], Y[idx], valid.sum() / (bj * n))
                torch.testing.assert_close(G[r, j], ref, rtol=1e-9, atol=1e-12)
