"""The minibatch draw of ``Objective`` re-done by hand, for tests of any model's partition gradients."""

from collections.abc import Callable

import torch


def assert_minibatch_grads(
    obj, theta: torch.Tensor, data, parts, b: int, twin, reference: Callable[..., torch.Tensor], draws: int = 2
) -> None:
    """For ``draws`` successive updates: G = obj.partition_grads(θ) equals, per replicate r and
    partition j, ``reference(r, θ_r, X_batch, Y_batch, w)`` on the b_j = min(b, |P_j|) samples the
    run's ``batch`` stream draws (``twin``: a fresh copy of it; padding sorts last), with weight
    w = |P_j| / (b_j n)."""
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
