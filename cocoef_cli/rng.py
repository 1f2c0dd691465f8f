"""Seeded random streams: one torch.Generator per (replicate seed, purpose).

Every purpose (data partition, code allocation, stragglers, compressor, minibatches) has its own
stream, so changing the compressor never changes the straggler pattern a seed sees, and a run with
``seeds=R`` draws exactly what R runs with ``seeds=1`` draw. Draws loop over replicates only (never
over devices) and are stacked into a leading replicate dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

STREAMS = ("partition", "code", "straggler", "compressor", "batch", "init", "split", "data")


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit integer seed derived from (seed, stream) with numpy's SeedSequence."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, STREAMS.index(stream)])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64)) & (
        (1 << 63) - 1
    )


class SeedRNG:
    """R generators (one per replicate seed) for one stream; every draw returns shape ``(R, *shape)``."""

    def __init__(self, seeds: Sequence[int], stream: str, device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.stream = stream
        self.device = torch.device(device)
        self.gens = []
        for s in self.seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(stream_seed(s, stream))
            self.gens.append(g)

    @property
    def R(self) -> int:
        return len(self.gens)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) draws, shape (R, *shape)."""
        return torch.stack([torch.rand(shape, generator=g, device=self.device, dtype=dtype) for g in self.gens])

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws, shape (R, *shape)."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.gens])

    def randperm(self, n: int) -> torch.Tensor:
        """One random permutation of range(n) per replicate, shape (R, n), int64."""
        return torch.stack([torch.randperm(n, generator=g, device=self.device) for g in self.gens])

    def split(self, r: int) -> SeedRNG:
        """A view holding only replicate r's generator (shares state with this one)."""
        sub = SeedRNG.__new__(SeedRNG)
        sub.seeds, sub.stream, sub.device, sub.gens = [self.seeds[r]], self.stream, self.device, [self.gens[r]]
        return sub
