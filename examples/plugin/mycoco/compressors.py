"""Top-k with random dithering: a compressor defined outside cocoef."""

import math

import torch

from cocoef_cli import Compressor


class TopKDither(Compressor):
    """Top-k sparsification whose kept values are randomly dithered to s levels (biased).

    With S the k largest |x_j| and m = max_{j∈S} |x_j|: C(x)_j = m·sign(x_j)·ξ_j/s for j ∈ S, else 0,
    ξ_j = l + Bernoulli(s|x_j|/m − l), l = floor(s|x_j|/m) (so E[C(x)_j] = x_j on S); C(0) = 0.
    Bits: k·(ceil(log2 D) + 1 + ceil(log2(s+1))) + value_bits (indices, signs, levels, the scale m).
    """

    unbiased = False  # Top-k is biased; use it with error feedback (method=coco_ef)
    randomized = True  # it draws from rng

    def __init__(self, D, k=10, levels=4, value_bits=32):
        super().__init__(D, value_bits)
        if not 1 <= k <= D:
            raise ValueError(f"k must be in 1..{D}, got {k}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.k, self.levels = int(k), int(levels)

    def compress(self, v, rng):
        """v (R, M, D) → the dense reconstruction (R, M, D)."""
        u = rng.rand(*v.shape[1:], dtype=v.dtype).to(v.device)  # one U[0,1) per entry, (R, M, D)
        idx = v.abs().topk(self.k, dim=-1, sorted=False).indices  # (R, M, k)
        x = v.gather(-1, idx)
        m = x.abs().amax(-1, keepdim=True)
        y = self.levels * x.abs() / torch.where(m > 0, m, torch.ones_like(m))
        low = y.floor()
        xi = low + (u.gather(-1, idx) < y - low).to(v.dtype)
        vals = m * torch.sign(x) * xi / self.levels
        return torch.zeros_like(v).scatter_(-1, idx, vals)

    def bits(self):
        return self.k * (math.ceil(math.log2(self.D)) + 1 + math.ceil(math.log2(self.levels + 1))) + self.value_bits
