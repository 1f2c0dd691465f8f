"""A custom network defined outside cocoef: a one-hidden-layer tanh MLP with a skip connection."""

import torch

from cocoef_cli import Model


class SkipMLP(Model):
    """One hidden tanh layer plus a linear skip: z = W2 tanh(W1 x + b1) + V x + b2 (cross-entropy).

    θ = [W1 (h, f), b1 (h), W2 (C, h), V (C, f), b2 (C)] flattened; θ⁰ ~ U(−1/√fan_in, 1/√fan_in) per tensor.
    """

    task = "classification"

    def __init__(self, data, hidden=16):
        self.f, self.h, self.C = data.features, int(hidden), data.n_classes
        self.shapes = [(self.h, self.f), (self.h,), (self.C, self.h), (self.C, self.f), (self.C,)]
        self.D = sum(torch.Size(s).numel() for s in self.shapes)

    def forward(self, theta, X):
        """One replicate: theta (D,), X (n, f) → logits (n, C)."""
        W1, b1, W2, V, b2 = (
            t.view(s) for t, s in zip(theta.split([torch.Size(s).numel() for s in self.shapes]), self.shapes)
        )
        return torch.tanh(X @ W1.T + b1) @ W2.T + X @ V.T + b2

    def init(self, rng, dtype):
        fan_in = [self.f, self.f, self.h, self.f, self.f]
        bound = torch.cat(
            [torch.full((torch.Size(s).numel(),), c**-0.5, dtype=dtype) for s, c in zip(self.shapes, fan_in)]
        )
        return (2 * rng.rand(self.D, dtype=dtype) - 1) * bound.to(rng.device)
