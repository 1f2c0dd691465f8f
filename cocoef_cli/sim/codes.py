"""Gradient codes: allocation S, encoding matrix B and decoders, batched over R replicates.

Shapes: R replicates, M devices, N partitions, D parameters.

- ``S`` (R, M, N) bool: ``S[r, i, j]`` = device i stores partition j.
- ``B`` (R, M, N): encoding matrix with the support of S; device i sends ``u_i = Σ_j B_ij g_j``,
  i.e. ``U = B G`` (:meth:`Code.encode`, one block-diagonal CSR × dense product; :class:`CodedSum`
  when a consumer fuses it into its own pass).
- ``z`` (R, M) bool: True = the device answered in time. :meth:`Code.decode` returns the decoding
  weights ``a`` (R, M) (zero on stragglers) and the residual ``‖aᵀB − 1ᵀ‖₂`` (R,) in float64, or
  ``None`` for the fixed-weight codes (``uncoded``, ``sgc``), which are unbiased only in expectation.

Public API: :data:`CODES` (the registry, one entry per code with the math in its docstring),
:func:`num_partitions`, :func:`allocate`, :func:`build_code`, :class:`Code` (also
:meth:`Code.from_matrix` for an explicit B), :data:`RESIDUAL_TOL`.

Decoder names: ``fixed`` (a = z), ``rescale`` / ``unbiased`` (uncoded), ``onestep`` (rgc:
a_i = z_i·M/|F| with the residual reported), ``exact`` and ``optimal``.
``optimal`` is always the minimum-norm least-squares solution ``a = pinv(B_Fᵀ) 1`` of
``min ‖B_Fᵀ a − 1‖₂`` (B_F = B with straggler rows zeroed), computed in float64 as one batched
``torch.linalg.pinv`` over replicates. ``exact`` is the code's exact decoder; for ``crc`` it *is*
that least-squares solution (exact whenever the pattern is decodable, the optimal fallback
otherwise); for ``frc`` it puts weight 1 on the lowest-index survivor of each group.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch

from cocoef_cli.checks import is_int, need_int, need_num
from cocoef_cli.errors import ConfigError
from cocoef_cli.registry import Registry
from cocoef_cli.rng import SeedRNG

#: Residuals ‖aᵀB − 1ᵀ‖₂ below this are floating-point noise of an exactly decodable pattern and
#: are reported as exactly 0.0.
RESIDUAL_TOL = 1e-9

#: Iterative-refinement steps a ← a + pinv(B_Fᵀ)(1 − B_Fᵀa) after the least-squares solve.
LSTSQ_REFINE = 2

Decoder = Callable[["Code", torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


# ----------------------------------------------------------------------------- config helpers
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _code_name(cfg: Any) -> str:
    name = _get(cfg, "name")
    if name is None:
        raise ConfigError("code", None, CODES.names(), "no code name given")
    return str(name)


def _scheme(cfg: Any) -> type[CodeScheme] | CodeScheme:
    """The scheme of ``cfg``: a registered class, or an instance of a ``_target_`` class."""
    _code_name(cfg)
    return CODES.build(cfg, builtin=lambda cls: cls)


# ----------------------------------------------------------------------------- decoders
def _residual(code: Code, a64: torch.Tensor) -> torch.Tensor:
    """‖aᵀB − 1ᵀ‖₂ per replicate in float64, with values below RESIDUAL_TOL set to 0.0."""
    res = torch.linalg.vector_norm(torch.einsum("rm,rmn->rn", a64, code._B64) - 1.0, dim=-1)
    return torch.where(res < RESIDUAL_TOL, torch.zeros_like(res), res)


def _decode_fixed(code: Code, z: torch.Tensor) -> tuple[torch.Tensor, None]:
    """a_i = z_i (the unbiasedness lives in B)."""
    return z.to(code.dtype), None


def _decode_rescale(code: Code, z: torch.Tensor) -> tuple[torch.Tensor, None]:
    """a_i = z_i · M / Σ_k z_k (all zero when nobody answers)."""
    zf = z.to(torch.float64)
    n = zf.sum(-1, keepdim=True)
    a = torch.where(n > 0, zf * code.M / n.clamp_min(1.0), torch.zeros_like(zf))
    return a.to(code.dtype), None


def _decode_unbiased(code: Code, z: torch.Tensor) -> tuple[torch.Tensor, None]:
    """a_i = z_i / (1 − p_i), so E[a_i] = 1."""
    if code.p is None:
        raise ValueError("decode=unbiased needs the straggler marginals p")
    return (z.to(torch.float64) / (1.0 - code.p)).to(code.dtype), None


def _lstsq_weights(B64: torch.Tensor, zf: torch.Tensor) -> torch.Tensor:
    """Min-norm least squares a = pinv(B_Fᵀ) 1 for B64 (R, M, N) float64 and zf (R, M) float64
    0/1 (B_F = B with straggler rows zeroed), refined; exact zeros on stragglers. (R, M)."""
    BmT = (B64 * zf[..., None]).transpose(1, 2)  # (R, N, M)
    ones = torch.ones(BmT.shape[0], BmT.shape[1], 1, dtype=torch.float64, device=BmT.device)
    P = torch.linalg.pinv(BmT)  # (R, M, N), one batched SVD
    a = P @ ones
    for _ in range(LSTSQ_REFINE):  # iterative refinement: Tandon's B is badly conditioned (cond ~ 1e10)
        a = a + P @ (ones - BmT @ a)
    return a[..., 0] * zf


def _decode_lstsq(code: Code, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-norm least squares a = pinv(B_Fᵀ) 1, B_F = B with straggler rows zeroed (float64)."""
    a64 = _lstsq_weights(code._B64, z.to(torch.float64))
    return a64.to(code.dtype), _residual(code, a64)


def _decode_frc_groups(code: Code, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight 1 on the lowest-index survivor of each group of d devices (0 if none survives)."""
    R, M, d = z.shape[0], code.M, code.d
    zg = z.reshape(R, M // d, d)
    first = zg.to(torch.int8).argmax(-1)  # first maximal index = lowest-index survivor
    alive = zg.any(-1)
    a64 = torch.nn.functional.one_hot(first, d).to(torch.float64) * alive[..., None].to(torch.float64)
    a64 = a64.reshape(R, M)
    return a64.to(code.dtype), _residual(code, a64)


def _decode_onestep(code: Code, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-step decoding: a_i = z_i · M / Σ_k z_k (0 when nobody answers), residual reported."""
    a64 = _decode_rescale(code, z)[0].to(torch.float64)
    return a64.to(code.dtype), _residual(code, a64)


DECODERS: dict[str, Decoder] = {
    "fixed": _decode_fixed,
    "rescale": _decode_rescale,
    "unbiased": _decode_unbiased,
    "optimal": _decode_lstsq,
    "exact": _decode_lstsq,  # generic exact decoder (min-norm solve); frc overrides it
    "onestep": _decode_onestep,
}


# ----------------------------------------------------------------------------- the Code object
class Code:
    """A built gradient code: S, B (R, M, N), a sparse encoder and a decoder.

    Attributes: ``name, M, N, d, S, B, fixed_weights, decode_name`` and ``p`` (the straggler
    marginals it was built for, (R, M) float64, or None). Nothing is mutated by encode/decode.
    """

    def __init__(
        self,
        name: str,
        S: torch.Tensor,
        B: torch.Tensor,
        d: int,
        decode_name: str,
        decoder: Decoder,
        fixed_weights: bool,
        p: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ):
        """``B`` (R, M, N) is kept as its nonzero entries (float64; ``dtype``, default B's, for
        encoding); the dense ``B`` and ``_B64`` are rebuilt on demand, and the float64 matrix is
        kept only for codes whose decoder needs it (a dense (R, M, N) float64 B of M = N = 10,000
        devices would be 800 MB)."""
        if S.dim() != 3 or B.shape != S.shape:
            raise ValueError(f"S and B must both be (R, M, N); got {tuple(S.shape)} and {tuple(B.shape)}")
        self.name, self.d, self.decode_name = name, int(d), decode_name
        self.S = S.to(torch.bool)
        self.R, self.M, self.N = (int(s) for s in S.shape)
        self.dtype = dtype or B.dtype
        self.fixed_weights = bool(fixed_weights)
        self.p = None if p is None else p.to(torch.float64)
        self._decoder = decoder
        # the entries of B row by row (CSR over the R·M devices), columns increasing in each row
        self._nz = B.nonzero()  # (nnz, 3): (r, i, j), row-major
        self._val64 = B[tuple(self._nz.T)].to(torch.float64)
        counts = torch.bincount(self._nz[:, 0] * self.M + self._nz[:, 1], minlength=self.R * self.M)
        self.K = max(int(counts.max()) if counts.numel() else 0, 1)  # largest row degree
        self._crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self._dense: dict[torch.dtype, torch.Tensor] = {}
        if not self.fixed_weights:  # the least-squares and group decoders use the dense float64 B
            self._dense[torch.float64] = B.to(torch.float64)
        self._csr: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}
        self._row_parts: dict[int, list[RowPart] | None] = {}
        self._forms: dict[int, FasterForm] = {}
        self._fused_checked: dict[tuple, bool] = {}  # CodedSum.kernel_terms: the kernel's rows of G checked
        self._local: bool | None = None  # rows_share_partitions
        self._fused_form = FasterForm()  # fused_choice

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense encoding matrix B (R, M, N) in ``dtype`` (default: the code's), cached."""
        dtype = dtype or self.dtype
        if dtype not in self._dense:
            B = torch.zeros(self.R, self.M, self.N, dtype=dtype, device=self._val64.device)
            self._dense[dtype] = B.index_put_(tuple(self._nz.T), self._val64.to(dtype))
        return self._dense[dtype]

    @property
    def B(self) -> torch.Tensor:
        """Dense B (R, M, N) in the code's dtype."""
        return self.dense()

    @property
    def _B64(self) -> torch.Tensor:
        return self.dense(torch.float64)

    # -- construction from an explicit matrix (tests, check-code)
    @classmethod
    def from_matrix(
        cls,
        B: torch.Tensor | Sequence[Sequence[float]],
        decode: str = "exact",
        p: torch.Tensor | None = None,
        name: str = "matrix",
        dtype: torch.dtype = torch.float64,
    ) -> Code:
        """A Code from an explicit B ((M, N) or (R, M, N)); S = support of B.

        ``decode``: ``exact`` / ``optimal`` (both the min-norm least-squares decoder) or ``fixed``.
        ``d`` is the largest number of devices holding one partition.
        """
        B = torch.as_tensor(B, dtype=dtype)
        if B.dim() == 2:
            B = B[None]
        if decode not in ("exact", "optimal", "fixed"):
            raise ConfigError("code.decode", decode, ["exact", "optimal", "fixed"], "unknown decoder for an explicit B")
        S = B != 0
        d = int(S.sum(1).max()) if S.numel() else 1
        return cls(name, S, B, d, decode, DECODERS[decode], decode == "fixed", p)

    def encode(
        self,
        G: torch.Tensor | Sequence[torch.Tensor],
        z: torch.Tensor | None = None,
        add_to: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """U = B G for G (R, N, D) → (R, M, D), as one sparse × dense product: B of all replicates
        is one block-diagonal (R·M) × (R·N) CSR matrix of its nonzero entries, so each u_i reads
        its d rows of G once and nothing of size (R, M, D) is gathered. G may also be given as
        column blocks (R, N, D_l) whose concatenation is G (each is encoded into its columns of U).
        With ``z`` (R, M), rows of devices with z_i = 0 are 0: stragglers compute nothing. With
        ``add_to`` (R, M, D, contiguous) the product is accumulated in place, add_to += B G, and
        add_to is returned (v += U without a U temporary)."""
        blocks = [G] if isinstance(G, torch.Tensor) else list(G)
        for b in blocks:
            if b.dim() != 3 or b.shape[0] != self.R or b.shape[1] != self.N:
                raise ValueError(f"G must be (R={self.R}, N={self.N}, D); got {tuple(b.shape)}")
        R, N, D = self.R, self.N, sum(b.shape[2] for b in blocks)
        first = blocks[0]
        crow, col, vals, row = self.csr(first.dtype, first.device)
        if z is not None:
            vals = vals * z.reshape(-1).to(vals.dtype)[row]
        with warnings.catch_warnings():  # torch calls CSR support "beta"; the one use here (addmm) is tested
            warnings.simplefilter("ignore", UserWarning)
            B = torch.sparse_csr_tensor(crow, col, vals, (R * self.M, R * N), check_invariants=False)
        if add_to is None:
            add_to = torch.zeros(R, self.M, D, dtype=first.dtype, device=first.device)
        elif add_to.shape != (R, self.M, D) or not add_to.is_contiguous():
            raise ValueError(
                f"add_to must be a contiguous (R={R}, M={self.M}, D={D}) tensor; got {tuple(add_to.shape)}"
            )
        U, off = add_to.view(R * self.M, D), 0
        for b in blocks:
            U[:, off : off + b.shape[2]].addmm_(B, b.reshape(R * N, b.shape[2]))
            off += b.shape[2]
        return add_to

    def csr(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """B of all replicates as one block-diagonal (R·M) × (R·N) CSR matrix: (row pointers,
        columns r·N + j, values in ``dtype``, row r·M + i of each entry), cached per dtype and device."""
        key = (dtype, device)
        if key not in self._csr:
            r, i, j = self._nz.to(device).T
            self._csr[key] = (
                self._crow.to(device),
                j + r * self.N,
                self._val64.to(dtype=dtype, device=device),
                r * self.M + i,
            )
        return self._csr[key]

    def row_parts(self, m: int) -> list[RowPart] | None:
        """B's R·M rows in parts of m consecutive rows, each with the partitions (rows of the
        block-diagonal G, r·N + j) its rows read: as ascending runs [j0, j1), and its CSR columns
        renumbered to positions in their concatenation. None when the parts would read more than
        1.25 × R·N partitions in all (B's rows share few partitions with their neighbours, as in
        crc or a random allocation: forming G by parts would compute much of it twice). Cached."""
        if m not in self._row_parts:
            crow, col = self._crow.cpu().numpy(), self.csr(torch.float64, torch.device("cpu"))[1].numpy()
            rows, parts = self.R * self.M, []
            for i0 in range(0, rows, m):
                i1 = min(rows, i0 + m)
                cols = col[crow[i0] : crow[i1]]
                used = np.unique(cols)
                breaks = np.flatnonzero(np.diff(used) != 1) + 1
                runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(used, breaks) if len(r)]
                parts.append(RowPart(i0, i1, runs, len(used), np.searchsorted(used, cols).astype(np.int64)))
            self._row_parts[m] = parts if sum(p.n for p in parts) <= 1.25 * self.R * self.N else None
        return self._row_parts[m]

    def rows_share_partitions(self) -> bool:
        """Whether B's rows read mostly the partitions of the row before (sgc, frc, uncoded; not
        rgc, bgc or a random allocation): the CSR entries whose column the previous row does not
        read, the partitions the kernel forms when it forms G's rows itself (its ring of recent
        rows), are at most 1.25 × R·N. Cached."""
        if self._local is None:
            crow, col = self._crow.cpu().numpy(), self.csr(torch.float64, torch.device("cpu"))[1].numpy()
            row = np.repeat(np.arange(crow.shape[0] - 1), np.diff(crow))
            keys = row * (self.R * self.N) + col
            new = ~np.isin(keys - self.R * self.N, keys)  # not read by row − 1 (row 0: all new)
            self._local = int(new.sum()) <= 1.25 * self.R * self.N
        return self._local

    def fused_choice(self) -> FasterForm:
        """This run's choice between G's rows formed in the kernel (``by_parts`` True: the first
        form) and torch's stored forms, where it is timed (:meth:`CodedSum.kernel_parts`)."""
        return self._fused_form

    def form_choice(self, m: int) -> FasterForm:
        """This run's choice between G whole and G by parts of m rows (:class:`FasterForm`)."""
        return self._forms.setdefault(m, FasterForm())

    def choosing(self) -> bool:
        """Whether a timed choice of G's form is still being made (its updates alternate forms)."""
        fused = self._fused_form
        if fused.by_parts:  # G's rows formed in the kernel for good: no stored form runs again
            return False
        return any(f.by_parts is None for f in self._forms.values()) or (
            fused.by_parts is None and any(fused.seconds.values())
        )

    def full_weights(self) -> torch.Tensor:
        """ā (R, M) in the code's dtype with āᵀB = 1ᵀ when every device answers: the min-norm
        least squares pinv(Bᵀ)1 in float64 (for sgc ā_i = 1 − p_i is one solution)."""
        a64 = _lstsq_weights(self._B64, torch.ones(self.R, self.M, dtype=torch.float64, device=self._val64.device))
        res = _residual(self, a64)
        if bool((res > 0).any()):  # 1ᵀ not in the row span of B (e.g. bgc): no unbiased full-participation sum
            raise ValueError(
                f"code={self.name}: no weights with āᵀB = 1ᵀ (residual {float(res.max()):.3g}); "
                "method.stale_shifts needs a code whose rows span 1ᵀ (sgc, uncoded, frc, crc)"
            )
        return a64.to(self.dtype)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoding weights a (R, M) in B's dtype (0 on stragglers) and the residual (R,) or None."""
        if z.shape != (self.R, self.M):
            raise ValueError(f"z must be (R={self.R}, M={self.M}); got {tuple(z.shape)}")
        return self._decoder(self, z.to(torch.bool))

    def __repr__(self) -> str:
        return f"Code({self.name}, R={self.R}, M={self.M}, N={self.N}, d={self.d}, decode={self.decode_name})"


class RowPart(NamedTuple):
    """Rows [i0, i1) of B (:meth:`Code.row_parts`): the n partitions they read, as runs [j0, j1) of
    G's rows, and their CSR entries' columns as positions 0..n−1 in those runs."""

    i0: int
    i1: int
    runs: list[tuple[int, int]]
    n: int
    col: np.ndarray


class RowSource(Protocol):
    """G (R, N, D) formed on demand (:class:`cocoef_cli.models.PartitionGradients`): ``blocks()``
    all of it as column blocks (R, N, D_l); where ``by_rows``, ``write(first, stop, out)`` its
    rows [first, stop) of R·N (row r·N + j is g_j(θ_r)) into ``out``, one contiguous
    (stop − first, D_l) tensor per block of ``widths``; ``buffer(numel)`` a flat tensor of G's dtype
    to write them in, reused from one θ to the next; ``holds_whole()`` whether the reused blocks of
    all of G exist already (an evaluation formed them), so that forming G whole costs no memory."""

    rows: int
    widths: tuple[int, ...]
    by_rows: bool

    def blocks(self) -> list[torch.Tensor]: ...

    def write(self, first: int, stop: int, out: Sequence[torch.Tensor]) -> None: ...

    def buffer(self, numel: int) -> torch.Tensor: ...

    def holds_whole(self) -> bool: ...


#: How :meth:`CodedSum.kernel_parts` forms G: ``"faster"``, G's rows formed in the kernel where
#: they are added (:meth:`CodedSum.kernel_terms`) where it can, else by parts or whole, the faster
#: on a run's first updates (:class:`FasterForm`); ``"fused"``, ``"parts"`` or ``"whole"`` that
#: one where it can (tests, benchmarks). Every form gives the same bits.
G_FORM = "faster"
G_FORMS = ("faster", "fused", "parts", "whole")

#: The most samples a partition for which the kernel forms G's rows itself whenever it can: then
#: torch's (MKL's) batched product is mostly the writing of G, and the kernel's own products were
#: faster on every CPU measured (docs/performance.md).
FUSED_MAX_SAMPLES = 8
#: Up to this many, G_FORM = "faster" times G's rows in the kernel against torch's products on a
#: run's first updates and keeps the faster (a :class:`FasterForm`): at 40 samples the kernel's
#: were faster for softmax's 10 classes and slower for the MLP's 64 rows on the Zen 5; MKL sums
#: 400 samples in another order (the check would refuse them).
FUSED_TIMED_SAMPLES = 64


class FasterForm:
    """The faster of G's two forms for one run's kernel, chosen by wall time: the first
    2·(1 + TRIALS) updates that can run by parts, where all of G is held anyway (so that the whole
    form costs no memory), alternate parts and whole (the first of each a warm-up: its buffers'
    first touch), then the form with the lower minimum over its TRIALS timed updates is kept. Both forms give the same sums in the same order, so the choice
    changes the time, never the bits; it is a property of the machine and the workload (G by
    parts gains where G does not stay in the caches, docs/performance.md). The same choice between
    G's rows formed in the kernel (the first form) and stored (:meth:`Code.fused_choice`), on
    every update that can form them."""

    TRIALS = 3

    def __init__(self) -> None:
        self.seconds: dict[bool, list[float]] = {True: [], False: []}
        self.by_parts: bool | None = None  # the kept form, once chosen

    def next(self) -> bool:
        """Whether the next update forms G by parts."""
        if self.by_parts is not None:
            return self.by_parts
        return len(self.seconds[True]) <= len(self.seconds[False])

    def record(self, by_parts: bool, seconds: float) -> None:
        """The wall time of an update's kernel pass (forming G included) in the given form."""
        if self.by_parts is not None:
            return
        self.seconds[by_parts].append(seconds)
        if all(len(t) > self.TRIALS for t in self.seconds.values()):
            self.by_parts = min(self.seconds[True][1:]) <= min(self.seconds[False][1:])


#: Bytes of G a part of the kernel's rows forms at a time (:meth:`CodedSum.kernel_parts`): the
#: partition gradients a part needs are written just before its rows run and read back from the
#: caches, not from memory; small enough for a core's share of the last-level cache of the
#: machines measured (docs/performance.md), large enough that a part's rows share their partitions.
PART_BYTES = 8 << 20


class CodedSum:
    """U = B G of one iteration, not yet formed: u_i = z_i Σ_j B_ij g_j (stragglers compute
    nothing), for G given as column blocks (R, N, D_l), or formed on demand (:class:`RowSource`).
    A consumer either forms it (:meth:`add_to`, :meth:`dense`) or fuses the sum into its own pass
    over the rows of U (the compiled Top-k kernel does, for error feedback: see
    :meth:`kernel_parts`)."""

    def __init__(self, code: Code, G: Sequence[torch.Tensor] | RowSource, z: torch.Tensor):
        self.code, self.z = code, z
        self.in_kernel = False  # whether the kernel formed G's rows itself (kernel_terms)
        self.source: RowSource | None = None
        self._blocks: list[torch.Tensor] | None = None
        if isinstance(G, Sequence):
            self._blocks = list(G)
        else:
            self.source = G

    @property
    def blocks(self) -> list[torch.Tensor]:
        """G's column blocks (R, N, D_l) (formed whole on the first use when G is a :class:`RowSource`)."""
        if self._blocks is None:
            assert self.source is not None
            self._blocks = self.source.blocks()
        return self._blocks

    def add_to(self, v: torch.Tensor) -> torch.Tensor:
        """v += U in place (v: contiguous (R, M, D)); returns v."""
        return self.code.encode(self.blocks, self.z, add_to=v)

    def dense(self) -> torch.Tensor:
        """U as a new (R, M, D) tensor."""
        return self.code.encode(self.blocks, self.z)

    def kernel_args(self, v: torch.Tensor) -> tuple:
        """(adds, crow, col, val, g, gstart, gwidth) as numpy arrays for
        :func:`cocoef_cli.sim.kernels.topk_rows` to add U to ``v`` (CPU): the rows that add (z),
        B's CSR rows, and G's blocks in one flat array, without a copy when the blocks lie one
        after the other in one storage (as :meth:`Objective.partition_grad_blocks` makes them).
        Checks what :meth:`Code.encode` checks (the kernel reads without bounds checks)."""
        first, code = self.blocks[0], self.code
        D = sum(b.shape[-1] for b in self.blocks)
        if any(b.dim() != 3 or b.shape[:2] != (code.R, code.N) or b.dtype != v.dtype for b in self.blocks):
            raise ValueError(
                f"G blocks must be ({code.R}, {code.N}, ·) in {v.dtype}; got "
                f"{[(tuple(b.shape), b.dtype) for b in self.blocks]}"
            )
        self._check_v(v, D)
        sizes = [b.numel() for b in self.blocks]
        starts = np.cumsum([0] + sizes[:-1])
        base = first.untyped_storage().data_ptr()
        consecutive = all(
            b.is_contiguous()
            and b.untyped_storage().data_ptr() == base
            and b.data_ptr() == first.data_ptr() + int(s) * first.element_size()
            for b, s in zip(self.blocks, starts)
        )
        g = first.as_strided((sum(sizes),), (1,)) if consecutive else torch.cat([b.reshape(-1) for b in self.blocks])
        return (*self._rows_args(first.dtype), g.numpy(), starts, np.array([b.shape[2] for b in self.blocks]))

    def _rows_args(self, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(adds, crow, col, val) as numpy arrays: the rows that add (z) and B's CSR rows in ``dtype``."""
        crow, col, val, _ = self.code.csr(dtype, torch.device("cpu"))
        return self.z.reshape(-1).to(torch.bool).numpy(), crow.numpy(), col.numpy(), val.numpy()

    def _check_v(self, v: torch.Tensor, D: int) -> None:
        code = self.code
        if v.shape != (code.R, code.M, D) or not v.is_contiguous() or v.device.type != "cpu":
            raise ValueError(f"v must be a contiguous CPU (R={code.R}, M={code.M}, D={D}) tensor; got {tuple(v.shape)}")

    def kernel_terms(self, v: torch.Tensor) -> Any:
        """G's terms for the kernel to form each row of G where it adds it (a
        :class:`cocoef_cli.sim.kernels.Terms`; G is then never written), or None: where G is
        formed already or its source offers no such terms (``RowSource.kernel_terms``: none with
        an l2 term), the kernel cannot form them at speed (no hardware FMA), a partition has more
        than FUSED_TIMED_SAMPLES samples, the terms do not have the shapes the kernel takes, B's
        rows share few partitions with the row before (:meth:`Code.rows_share_partitions`: the
        kernel would form most partitions once per row that reads them; ``G_FORM = "fused"``
        forms them anyway), or the kernel's rows differ from the source's in a bit. That last
        check runs once per run (per shapes, samples, dtype and thread count): every row of G at
        the first θ, formed both ways in ranges of about 1 MiB, compared as integers (MKL sums a
        product of 1 to 3 rows, or of float64, in another order on the CPUs measured: those fail
        it)."""
        src, code = self.source, self.code
        get = getattr(src, "kernel_terms", None)
        blocks = get() if src is not None and self._blocks is None and get is not None else None
        if src is None or not blocks or v.device.type != "cpu" or src.rows != code.R * code.N:
            return None
        from cocoef_cli.sim import kernels

        timed_out = G_FORM == "faster" and code.fused_choice().by_parts is False
        if timed_out and kernels.Terms.samples(blocks) > FUSED_MAX_SAMPLES:
            return None  # timed, and torch's stored G was the faster: no terms to build

        if not kernels.fused():
            return None
        try:
            terms = kernels.Terms(blocks)
        except ValueError:  # a model's terms the kernel does not take (its products are torch's)
            return None
        D = sum(src.widths)
        if (
            terms.B > FUSED_TIMED_SAMPLES
            or terms.dtype != v.dtype
            or terms.rows != src.rows
            or tuple(terms.widths) != tuple(src.widths)
            or (G_FORM == "faster" and not code.rows_share_partitions())
        ):
            return None
        self._check_v(v, D)
        strides = tuple((tuple(L.stride()), None if X is None else tuple(X.stride())) for L, X in blocks)
        shapes = (tuple(terms.kinds), tuple(terms.cs), tuple(terms.fs), terms.B, terms.rows, strides)
        key = (*shapes, terms.dtype, torch.get_num_threads())
        if key not in code._fused_checked:
            code._fused_checked[key] = _same_rows(src, terms)
        return terms if code._fused_checked[key] else None

    def kernel_parts(self, v: torch.Tensor) -> Iterator[tuple[int, int, tuple]]:
        """The kernel's rows of v (R·M, flattened) in parts: (i0, i1, the :meth:`kernel_args` of
        rows [i0, i1)), to be run in order. Where G is a :class:`RowSource` that writes by rows and
        consecutive rows of B share their partitions (sgc, frc, uncoded: a part of ``m`` devices
        needs about m partitions; :meth:`Code.row_parts`), each part forms the partition gradients
        it needs (about PART_BYTES) just before it is yielded, into one reused buffer, and the
        kernel reads them from the caches; else one part adds from all of G. Same sums, same order.
        Which of the two forms runs where both can is :data:`G_FORM`'s (by default the faster on
        this run's first updates: :class:`FasterForm`). Before either, G's rows formed in the
        kernel where it can (:meth:`kernel_terms`; G never stored): always at most
        FUSED_MAX_SAMPLES samples a partition, else (at most FUSED_TIMED_SAMPLES) where it was the
        faster on the run's first updates (a second :class:`FasterForm`, against the stored forms)."""
        if G_FORM not in G_FORMS:
            raise ValueError(f"codes.G_FORM must be one of {', '.join(G_FORMS)}; got {G_FORM!r}")
        terms = self.kernel_terms(v) if G_FORM in ("faster", "fused") else None
        timed = terms is not None and G_FORM == "faster" and terms.B > FUSED_MAX_SAMPLES
        choice = self.code.fused_choice() if timed else None
        start = time.perf_counter()
        self.in_kernel = terms is not None and (choice is None or choice.next())
        if self.in_kernel:
            yield 0, self.code.R * self.code.M, (*self._rows_args(v.dtype), terms)
        else:
            yield from self._stored_parts(v)
        if choice is not None:
            choice.record(self.in_kernel, time.perf_counter() - start)

    def _stored_parts(self, v: torch.Tensor) -> Iterator[tuple[int, int, tuple]]:
        """:meth:`kernel_parts` with G's rows stored: by parts or whole."""
        src = self.source
        plan, m = None, 0
        if src is not None and src.by_rows and self._blocks is None:
            m = max(1, PART_BYTES // max(1, v.element_size() * sum(src.widths)))
            plan = self.code.row_parts(m)
        if plan is None or len(plan) == 1:
            yield 0, self.code.R * self.code.M, self.kernel_args(v)
            return
        assert src is not None
        # timed only where all of G is held anyway (a full-batch run's evaluations form it): else parts
        choice = self.code.form_choice(m) if G_FORM == "faster" and src.holds_whole() else None
        start = time.perf_counter()
        if G_FORM == "whole" or (choice is not None and not choice.next()):
            yield 0, self.code.R * self.code.M, self.kernel_args(v)
            if choice is not None:
                choice.record(False, time.perf_counter() - start)
            return
        widths, code = src.widths, self.code
        if src.rows != code.R * code.N:
            raise ValueError(f"G must have R·N = {code.R * code.N} rows ({code.R} × {code.N}); got {src.rows}")
        self._check_v(v, sum(widths))
        adds, crow_np, _, val_np = self._rows_args(v.dtype)
        width_np = np.array(widths, dtype=np.int64)
        buf = src.buffer(max(p.n for p in plan) * sum(widths))
        if buf.dtype != v.dtype:
            raise ValueError(f"G's rows must be in v's dtype {v.dtype}; got {buf.dtype}")
        for p in plan:
            sizes = [p.n * w for w in widths]
            out = [b.view(p.n, w) for b, w in zip(buf[: sum(sizes)].split(sizes), widths)]
            at = 0
            for j0, j1 in p.runs:
                src.write(j0, j1, [o[at : at + j1 - j0] for o in out])
                at += j1 - j0
            lo, hi = crow_np[p.i0], crow_np[p.i1]
            starts = np.cumsum([0] + sizes[:-1])
            yield (
                p.i0,
                p.i1,
                (adds[p.i0 : p.i1], crow_np[p.i0 : p.i1 + 1] - lo, p.col, val_np[lo:hi], buf.numpy(), starts, width_np),
            )
        if choice is not None:
            choice.record(True, time.perf_counter() - start)


def _same_rows(src: RowSource, terms: Any) -> bool:
    """Whether every row of G that ``terms`` form in the kernel equals, bit for bit, the row
    ``src`` writes (torch's products), block by block, in ranges of about PART_BYTES / 8 rows' bytes."""
    size = terms.dtype.itemsize
    m = max(1, (PART_BYTES // 8) // max(1, size * sum(src.widths)))  # about 1 MiB of rows each way
    offsets = np.cumsum([0, *src.widths])
    ints = np.int32 if size == 4 else np.int64  # bits, not values: -0 is not +0, NaN is NaN
    for first in range(0, src.rows, m):
        stop = min(src.rows, first + m)
        out = [torch.empty(stop - first, w, dtype=terms.dtype) for w in src.widths]
        src.write(first, stop, out)
        rows = terms.rows_of(first, stop)
        for o, a, b in zip(out, offsets[:-1], offsets[1:]):
            if not np.array_equal(o.numpy().view(ints), np.ascontiguousarray(rows[:, a:b]).view(ints)):
                return False
    return True


# ----------------------------------------------------------------------------- allocations
def _cyclic(M: int, N: int, offsets: Sequence[int], device: torch.device | str, stride: int = 1) -> torch.Tensor:
    """(M, N) bool: device i holds (stride·i + o) mod N for every o in offsets."""
    i = stride * torch.arange(M, device=device)[:, None]
    o = torch.as_tensor(list(offsets), dtype=torch.long, device=device)[None, :]
    S = torch.zeros(M, N, dtype=torch.bool, device=device)
    S.scatter_(1, (i + o) % N, True)
    return S


def _permuted(S0: torch.Tensor, rng: SeedRNG) -> torch.Tensor:
    """Independent random row and column permutations of S0 per replicate: (R, M, N)."""
    M, N = S0.shape
    rows, cols = rng.randperm(M), rng.randperm(N)  # (R, M), (R, N)
    S = S0[rows]  # (R, M, N)
    return torch.gather(S, 2, cols[:, None, :].expand(-1, M, N))


def _n_candidates(M: int, k: int) -> int:
    """Candidate permutations drawn per step (fixed, so every replicate consumes the same draws)."""
    want = math.ceil(16 * math.exp(min(k, 30)))
    cap = max(32, (1 << 22) // (M * k))
    return int(min(want, cap))


def _random_regular(M: int, d: int, rng: SeedRNG) -> torch.Tensor:
    """Random d-regular bipartite allocation (M = N): union of d disjoint random permutations.

    The k-th permutation is the first of a fixed batch of candidates that avoids the k earlier
    ones on every row; a replicate for which some batch has no such candidate falls back to a
    randomly row/column-permuted cyclic allocation (also d-regular). The number of draws per
    replicate does not depend on acceptance, so results are replicate-independent.
    """
    R, dev = rng.R, rng.device
    cols = torch.empty(R, M, d, dtype=torch.long, device=dev)
    cols[:, :, 0] = rng.randperm(M)
    failed = torch.zeros(R, dtype=torch.bool, device=dev)
    ar = torch.arange(R, device=dev)
    for k in range(1, d):
        cand = rng.rand(_n_candidates(M, k), M, dtype=torch.float64).argsort(-1)  # (R, T, M)
        clash = (cand[..., None] == cols[:, None, :, :k]).any(-1).any(-1)  # (R, T)
        ok = ~clash
        cols[:, :, k] = cand[ar, ok.to(torch.int8).argmax(-1)]
        failed |= ~ok.any(-1)
    fallback = _permuted(_cyclic(M, M, range(d), dev), rng)
    S = torch.zeros(R, M, M, dtype=torch.bool, device=dev)
    S.scatter_(2, cols, True)
    return torch.where(failed[:, None, None], fallback, S)


# ----------------------------------------------------------------------------- code schemes
class CodeScheme:
    """Base of the registry entries: allocation, encoding and accepted decoders of one code.

    Built-ins are used as classes (classmethods reading the ``code`` group ``cfg``). A plugin
    (``code._target_=pkg.mod.MyCode``) subclasses it and is built as ``cls(**keys)`` (its own
    YAML keys; ``d``, ``partitions`` and ``decode`` are read by the framework from ``cfg``). It
    implements ``allocate(self, cfg, M, N, d, rng)`` → S (R, M, N) bool, S[r, i, j] = device i
    holds partition j (R = rng.R replicates; draw only from ``rng``), and optionally
    ``encoding(self, cfg, S, p, d, rng)`` → B (R, M, N) float64 with the support of S (default
    B = S; p (R, M) the straggler marginals). Device i sends u_i = Σ_j B_ij g_j; the decoders
    (``decoders``, first = default) give weights a with ĝ = Σ_i a_i u_i: ``optimal`` the
    min-norm least squares a = pinv(B_Fᵀ)1 (exact whenever 1ᵀ is in the row space of the
    survivors' B), ``fixed`` a = z.
    """

    name: ClassVar[str] = ""
    decoders: ClassVar[dict[str, Decoder]] = {"optimal": DECODERS["optimal"], "fixed": DECODERS["fixed"]}
    fixed_weights: ClassVar[bool] = False
    square: ClassVar[bool] = False  # requires N == M

    @classmethod
    def redundancy(cls, cfg: Any, M: int, N: int) -> int:
        hi = min(M, N)
        return need_int("code.d", _get(cfg, "d", 1), 1, hi)

    @classmethod
    def decode_name(cls, cfg: Any) -> str:
        name = _get(cfg, "decode")
        if name is None:
            return next(iter(cls.decoders))
        if name not in cls.decoders:
            raise ConfigError("code.decode", name, list(cls.decoders), f"not a decoder of code {cls.name}")
        return str(name)

    @classmethod
    def allocate(cls, cfg: Any, M: int, N: int, d: int, rng: SeedRNG) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def encoding(cls, cfg: Any, S: torch.Tensor, p: torch.Tensor, d: int, rng: SeedRNG) -> torch.Tensor:
        """B in float64, (R, M, N)."""
        return S.to(torch.float64)


CODES: Registry[type[CodeScheme]] = Registry("code", CodeScheme, common=("d", "partitions", "decode"))


@CODES.register("uncoded")
class Uncoded(CodeScheme):
    """No redundancy (d = 1): device i holds partition i and sends g_i.

    S = B = I (N = M; ``code.d`` is ignored). Decoders: ``rescale`` (default) a_i = z_i·M/Σ_k z_k
    (all zero when nobody answers, i.e. stragglers are ignored) or ``unbiased`` a_i = z_i/(1−p_i),
    so E[Σ_i a_i g_i] = Σ_i g_i = ∇F.
    """

    name = "uncoded"
    decoders: ClassVar[dict[str, Decoder]] = {"rescale": _decode_rescale, "unbiased": _decode_unbiased}
    fixed_weights = True
    square = True

    @classmethod
    def redundancy(cls, cfg: Any, M: int, N: int) -> int:
        return 1

    @classmethod
    def allocate(cls, cfg: Any, M: int, N: int, d: int, rng: SeedRNG) -> torch.Tensor:
        return torch.eye(M, dtype=torch.bool, device=rng.device).expand(rng.R, M, M).clone()


@CODES.register("sgc")
class SGC(CodeScheme):
    """Stochastic gradient coding: d partitions per device, B_ij = S_ij/(c_j(1−p_i)), a_i = z_i.

    Allocation ``code.allocation``: ``cyclic`` (device i holds (i+o) mod N for o in
    ``code.offsets``, default 0..d−1; offsets [0,1,3] with M = N = 7 is the Fano plane) or
    ``random`` (M = N: a uniformly drawn union of d disjoint permutation matrices, falling back to a
    randomly permuted cyclic allocation; M ≠ N: the strided layout "device i holds (i·d+o) mod N,
    o < d" under random row and column permutations, needing M·d ≥ N).
    c_j = Σ_i S_ij is the number of devices holding partition j (= d for the regular allocations
    with M = N). With the ``fixed`` decoder a_i = z_i and z_i ~ Bernoulli(1−p_i),
    E[Σ_i a_i B_ij] = Σ_i S_ij/c_j = 1, so E[ĝ] = Σ_j g_j = ∇F (no residual is reported).
    ``code.p_assumed`` = p̂ (default null: the true p_i) builds the weights from a misspecified
    probability, B_ij = S_ij/(c_j(1−p̂)): then E[ĝ] = Σ_j g_j Σ_i S_ij(1−p_i)/(c_j(1−p̂)).
    """

    name = "sgc"
    decoders: ClassVar[dict[str, Decoder]] = {"fixed": _decode_fixed}
    fixed_weights = True

    @classmethod
    def allocate(cls, cfg: Any, M: int, N: int, d: int, rng: SeedRNG) -> torch.Tensor:
        allocation = _get(cfg, "allocation", "cyclic") or "cyclic"
        if allocation not in ("cyclic", "random"):
            raise ConfigError("code.allocation", allocation, ["cyclic", "random"], "unknown allocation")
        offsets = _get(cfg, "offsets")
        if offsets is not None and allocation != "cyclic":
            raise ConfigError(
                "code.offsets",
                offsets,
                "null (offsets apply to allocation=cyclic only)",
                "offsets given with allocation=random",
            )
        if offsets is None:
            offsets = list(range(d))
        else:
            acc = f"a list of {d} integers, distinct mod {N} (one per unit of code.d)"
            if isinstance(offsets, (str, bytes)) or not hasattr(offsets, "__iter__"):
                raise ConfigError("code.offsets", offsets, acc, "must be a list")
            offsets = list(offsets)
            if len(offsets) != d or not all(is_int(o) for o in offsets):
                raise ConfigError("code.offsets", offsets, acc, f"need exactly d={d} integers")
            if len({int(o) % N for o in offsets}) != d:
                raise ConfigError("code.offsets", offsets, acc, "offsets collide mod N")
            offsets = [int(o) % N for o in offsets]
        if allocation == "cyclic":
            S0 = _cyclic(M, N, offsets, rng.device)
            empty = (~S0.any(0)).nonzero().flatten().tolist()
            if empty:
                raise ConfigError(
                    "code.partitions",
                    N,
                    f"null or integers 1..{M + max(offsets)} (with these offsets)",
                    f"cyclic allocation leaves partitions {empty[:5]} on no device",
                )
            return S0.expand(rng.R, M, N).clone()
        if M == N:
            return _random_regular(M, d, rng)
        if M * d < N:
            raise ConfigError(
                "code.partitions",
                N,
                f"null or integers 1..{M * d} (devices × d)",
                "random allocation cannot store every partition",
            )
        # strided layout: device i holds (i·d + o) mod N, o < d (rows d, columns ⌊Md/N⌋ or ⌈Md/N⌉)
        return _permuted(_cyclic(M, N, range(d), rng.device, stride=d), rng)

    @classmethod
    def encoding(cls, cfg: Any, S: torch.Tensor, p: torch.Tensor, d: int, rng: SeedRNG) -> torch.Tensor:
        c = S.sum(1, dtype=torch.float64)  # (R, N) devices per partition
        if bool((c == 0).any()):
            raise ValueError("sgc: some partition is stored on no device")
        assumed = _get(cfg, "p_assumed")
        if assumed is not None:
            assumed = need_num(
                "code.p_assumed", assumed, 0, 1, hi_open=True, accepted="null (the true p) or numbers in [0, 1)"
            )
            p = torch.full_like(p, assumed)
        r, i, j = S.nonzero(as_tuple=True)  # only the d entries a row: no dense (R, M, N) temporaries
        B = torch.zeros(S.shape, dtype=torch.float64, device=S.device)
        return B.index_put_((r, i, j), 1.0 / (c[r, j] * (1.0 - p)[r, i]))


@CODES.register("frc")
class FRC(CodeScheme):
    """Fractional repetition code (Tandon et al. 2017): groups of d devices replicate d partitions.

    Requires d | M and N = M. Group g = devices gd..gd+d−1 all hold partitions gd..gd+d−1 and
    B = S (block-diagonal ones). ``exact``: weight 1 on the lowest-index survivor of each group, so
    aᵀB = 1ᵀ whenever every group has a survivor (any ≤ d−1 stragglers); a group with no survivor
    contributes nothing, which is also its least-squares optimum. ``optimal``: min-norm least
    squares (1/k on each of a group's k survivors).
    """

    name = "frc"
    decoders: ClassVar[dict[str, Decoder]] = {"exact": _decode_frc_groups, "optimal": _decode_lstsq}
    square = True

    @classmethod
    def redundancy(cls, cfg: Any, M: int, N: int) -> int:
        d = need_int("code.d", _get(cfg, "d", 1), 1, M)
        if M % d:
            divs = [k for k in range(1, M + 1) if M % k == 0]
            raise ConfigError("code.d", d, divs, f"frc needs d to divide devices={M}")
        return d

    @classmethod
    def allocate(cls, cfg: Any, M: int, N: int, d: int, rng: SeedRNG) -> torch.Tensor:
        g = torch.arange(M, device=rng.device) // d
        return (g[:, None] == g[None, :]).expand(rng.R, M, M).clone()

    @classmethod
    def encoding(cls, cfg: Any, S: torch.Tensor, p: torch.Tensor, d: int, rng: SeedRNG) -> torch.Tensor:
        g = torch.arange(S.shape[1], device=S.device) // d
        if not bool(((g[:, None] == g[None, :]) == S).all()):
            raise ValueError("frc: S is not the fractional-repetition allocation")
        return S.to(torch.float64)


#: ``code.construction`` of crc (first = default).
CRC_CONSTRUCTIONS = ("cyclic_mds", "best_random", "random")
#: Straggler sets of size d − 1 on which ``best_random`` scores its candidates (all when fewer).
SEARCH_SETS = 128


_BEST: dict[tuple[int, int, int, str], int] = {}  # this process's best_random searches, by candidates


def _best_candidate(B: torch.Tensor, H: torch.Tensor, d: int) -> int:
    """Index of the candidate encoding B[c] (C, M, M) whose worst max_i|a_i| over the
    :data:`SEARCH_SETS` straggler sets of size d − 1 is smallest among those exact on all of them.
    Kept per process, keyed by the candidates' H (drawn from the code stream, so the draws and the
    stream are the same with or without the kept result): the config check, the build and every
    job of a sweep worker with the same seed search once."""
    import hashlib

    C, M = B.shape[0], B.shape[-1]
    key = (M, d, C, hashlib.sha256(H.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
    if key not in _BEST:
        sets, _ = straggler_sets(M, [d - 1], SEARCH_SETS, seed=0)
        a, res = _weights_over_sets(B, sets)  # (P, C, M), (P, C)
        score = a.abs().amax(-1).amax(0).masked_fill(res.amax(0) > 1e-6, math.inf)
        if bool(torch.isinf(score.amin())):
            raise ValueError(
                f"crc construction=best_random: none of the {C} random H decodes every straggler "
                "set exactly; use code.construction=cyclic_mds"
            )
        _BEST[key] = int(score.argmin())
    return _BEST[key]


def _tandon_rows(H: torch.Tensor) -> torch.Tensor:
    """B (..., M, M) from parity checks H (..., d−1, M): B_ii = 1 and the d−1 other entries x of
    row i (columns i+1..i+d−1 mod M) solve H_{:,supp∖i} x = −H_{:,i}, so H Bᵀ = 0."""
    *lead, m, M = H.shape
    i = torch.arange(M, device=H.device)
    B = torch.zeros(*lead, M, M, dtype=torch.float64, device=H.device)
    B[..., i, i] = 1.0
    if m == 0:
        return B
    others = (i[:, None] + torch.arange(1, m + 1, device=H.device)[None, :]) % M  # (M, d−1)
    A = H[..., others].transpose(-3, -2)  # (..., M, d−1 rows of H, d−1 unknowns)
    x = torch.linalg.solve(A, -H.transpose(-1, -2))  # rhs −H_{:, i}: (..., M, d−1)
    return B.scatter_(-1, others.expand(*lead, M, m), x)


def _cyclic_mds_rows(M: int, d: int, device: torch.device | str) -> torch.Tensor:
    """(M, M) float64 rows of the real (nega)cyclic MDS construction of :class:`CRC` (B_ii = 1)."""
    theta = np.pi + 2 * np.pi * (np.arange(d - 1) - (d - 2) / 2) / M  # roots e^{iθ}, symmetric about π
    sgn = 1.0 if (M - d) % 2 == 0 else -1.0  # e^{iMθ}: x^M − 1 (cyclic) or x^M + 1 (negacyclic)
    g = np.poly(np.exp(1j * theta))[::-1].real  # g_0..g_{d−1}; real since the roots come in conjugate pairs
    B = np.zeros((M, M))
    for j in range(d):  # row i = x^i g(x) mod (x^M − sgn): a coefficient wrapping past M is multiplied by sgn
        cols = np.arange(M) + j
        B[np.arange(M), cols % M] = g[j] * np.where(cols >= M, sgn, 1.0)
    if sgn < 0:  # 1 ∉ C: rescale partitions by the projection t of 1 onto C = rowspan(B)
        t = B.T @ np.linalg.lstsq(B.T, np.ones(M), rcond=None)[0]
        if np.abs(t).min() < 1e-6:
            raise ValueError(f"crc cyclic_mds: the projection of 1 has a zero entry (M={M}, d={d})")
        B = B / t[None, :]
    return torch.as_tensor(B / np.diag(B)[:, None], dtype=torch.float64, device=device)


def straggler_sets(M: int, sizes: Sequence[int], max_sets: int, seed: int = 0) -> tuple[list[tuple[int, ...]], bool]:
    """Every straggler set (tuple of devices) of the given sizes when there are at most
    ``max_sets``, else ``max_sets`` drawn with numpy seed ``seed`` (a size uniformly among
    ``sizes``, then a uniform set of that size). Returns (sets, exhaustive)."""
    import itertools

    sizes = [s for s in sizes if 0 <= s < M]
    if sum(math.comb(M, s) for s in sizes) <= max_sets:
        return [c for s in sizes for c in itertools.combinations(range(M), s)], True
    gen = np.random.default_rng(seed)
    return [
        tuple(sorted(int(j) for j in gen.choice(M, size=int(gen.choice(sizes)), replace=False)))
        for _ in range(max_sets)
    ], False


def _set_masks(M: int, sets: Sequence[tuple[int, ...]], device: torch.device | str) -> torch.Tensor:
    """(P, M) float64: 0 on the devices of each straggler set, 1 elsewhere."""
    z = torch.ones(len(sets), M, dtype=torch.float64, device=device)
    for k, st in enumerate(sets):
        z[k, list(st)] = 0.0
    return z


def _weights_over_sets(
    B64: torch.Tensor, sets: Sequence[tuple[int, ...]], decode: Code | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights for every straggler set, a (P, R, M), and the raw residuals ‖aᵀB − 1ᵀ‖₂ (P, R):
    least squares of B64 (R, M, N) in chunks of sets (one batched pinv each), or the decoder of
    ``decode`` set by set."""
    R, M, N = B64.shape
    z = _set_masks(M, sets, B64.device)
    if decode is not None:
        a = torch.stack([decode.decode(zk.bool().expand(R, M))[0].to(torch.float64) for zk in z])
    else:
        chunk, out = max(1, (1 << 22) // max(R * M * N, 1)), []
        for lo in range(0, len(sets), chunk):
            zc = z[lo : lo + chunk]  # (p, M)
            p = zc.shape[0]
            Bc = B64[None].expand(p, R, M, N).reshape(p * R, M, N)
            out.append(_lstsq_weights(Bc, zc[:, None, :].expand(p, R, M).reshape(p * R, M)).reshape(p, R, M))
        a = torch.cat(out)
    res = torch.linalg.vector_norm(torch.einsum("prm,rmn->prn", a, B64) - 1.0, dim=-1)
    return a, res


def conditioning(code: Code, sets: Sequence[tuple[int, ...]]) -> dict[str, float]:
    """How a decoding code amplifies message errors, over the straggler ``sets`` and the R
    replicates: ``worst_residual`` = max ‖aᵀB_F − 1ᵀ‖₂, ``max_abs_B`` = max |B_ij|, and the worst
    and median over (set, replicate) of max_i |a_i| and of ‖a‖₂. ĝ − ∇F = Σ_i a_i (m_i − u_i)
    for exact a, so a compression error is multiplied by up to max|a|."""
    a, res = _weights_over_sets(code._B64, sets, None if code._decoder is _decode_lstsq else code)
    amax, anorm = a.abs().amax(-1).flatten(), torch.linalg.vector_norm(a, dim=-1).flatten()
    return {
        "worst_residual": float(res.max()),
        "max_abs_B": float(code._val64.abs().max()),
        "max_abs_a_worst": float(amax.max()),
        "max_abs_a_median": float(amax.median()),
        "norm_a_worst": float(anorm.max()),
        "norm_a_median": float(anorm.median()),
    }


def coverage_spread(code: Code, draws: Sequence[torch.Tensor]) -> dict[str, float]:
    """For fixed-weight codes (unbiased only in expectation): e = aᵀB − 1ᵀ (per partition) over
    straggler ``draws`` z (R, M) each: ``bias`` = max_j |mean e_j| (→ 0 for an unbiased code),
    ``spread`` = the root mean square of e, ``max_abs_e`` = max |e_j|, plus ``max_abs_B`` and
    ``max_abs_a``."""
    r, i, j = code._nz.T  # aᵀB from the nonzero entries (no dense B)
    e, amax = [], 0.0
    for z in draws:
        a = code.decode(z)[0].to(torch.float64)
        amax = max(amax, float(a.abs().max()))
        cov = torch.zeros(code.R * code.N, dtype=torch.float64, device=a.device)
        e.append(cov.index_add_(0, r * code.N + j, a[r, i] * code._val64).reshape(code.R, code.N) - 1.0)
    E = torch.stack(e)  # (T, R, N)
    return {
        "bias": float(E.mean(0).abs().max()),
        "spread": float(E.pow(2).mean().sqrt()),
        "max_abs_e": float(E.abs().max()),
        "max_abs_B": float(code._val64.abs().max()),
        "max_abs_a": amax,
    }


@CODES.register("crc")
class CRC(CodeScheme):
    """Cyclic repetition code (Tandon et al. 2017): device i holds i..i+d−1 mod M, N = M.

    Every construction gives rows b_i supported on i..i+d−1 with B_ii = 1, all in an
    (M−d+1)-dimensional code C ∋ 1 such that any M−d+1 rows are independent, hence span C:
    1ᵀ = aᵀB_F for every survivor set F of size ≥ M−d+1. ``code.construction``:

    - ``cyclic_mds`` (default; Raviv et al. 2020 in a real form): with the d−1 angles
      θ_m = π + 2π(m − (d−2)/2)/M (m = 0..d−2, symmetric about π, so g is real) and
      g(x) = ∏_m (x − e^{iθ_m}), row i is x^i g(x) mod (x^M − σ), σ = e^{iMθ_m} = (−1)^{M−d}:
      cyclic when M − d is even, negacyclic (a coefficient wrapping past M changes sign) when
      odd. C = {c : c(e^{iθ_m}) = 0 ∀m}. Rows F independent: Σ_{i∈F} α_i x^i g ≡ 0 mod
      (x^M − σ) forces α(ζ) = 0 at the M−d+1 other roots ζ of x^M − σ, consecutive on the
      circle, a Vandermonde system in the distinct e^{2πij/M}, j ∈ F, so α = 0. For σ = 1,
      1 ∈ C (1(ζ) = 0 for ζ ≠ 1). For σ = −1 (no real cyclic code works then, e.g. d = 3,
      M even: α_j = sin(2πkj/M) vanishes on {0, M/2}), 1 ∉ C: with t the orthogonal
      projection of 1 onto C (t_j = 1 − O(d/M), all nonzero, checked), B = B_C diag(1/t)
      has rowspan C·diag(1/t) ∋ 1 and the same supports and independence.
    - ``random`` (Tandon's Algorithm 2): H ∈ ℝ^{(d−1)×M} i.i.d. N(0,1), last column set so
      H·1 = 0; b_i is the vector of null(H) on its window (H_{:,supp∖i} x = −H_{:,i}). Exact with
      probability 1, but badly conditioned (max|a| in the thousands at M = 12).
    - ``best_random``: ``code.candidates`` such H drawn from the code stream; keeps the one
      with the smallest worst max_i|a_i| over the straggler sets of size d−1 (all of them, or
      :data:`SEARCH_SETS` drawn with numpy seed 0), among the candidates exact on all of them.

    Rows are scaled so that B_ii = 1.     ``exact``: a solving aᵀB_F = 1ᵀ on the survivors F — the min-norm least squares
    a = pinv(B_Fᵀ)1 in float64, also the ``optimal`` fallback beyond d−1 stragglers.
    """

    name = "crc"
    decoders: ClassVar[dict[str, Decoder]] = {"exact": _decode_lstsq, "optimal": _decode_lstsq}
    square = True

    @classmethod
    def construction(cls, cfg: Any, M: int, d: int) -> str:
        """``code.construction`` (validated, with ``code.candidates`` for best_random)."""
        name = _get(cfg, "construction", CRC_CONSTRUCTIONS[0]) or CRC_CONSTRUCTIONS[0]
        if name not in CRC_CONSTRUCTIONS:
            raise ConfigError("code.construction", name, CRC_CONSTRUCTIONS, "unknown crc construction")
        if name == "best_random":
            need_int("code.candidates", _get(cfg, "candidates", 32), 1, 4096)
        return name

    @classmethod
    def allocate(cls, cfg: Any, M: int, N: int, d: int, rng: SeedRNG) -> torch.Tensor:
        cls.construction(cfg, M, d)  # fail early
        return _cyclic(M, M, range(d), rng.device).expand(rng.R, M, M).clone()

    @classmethod
    def encoding(cls, cfg: Any, S: torch.Tensor, p: torch.Tensor, d: int, rng: SeedRNG) -> torch.Tensor:
        R, M, _ = S.shape
        if not bool((_cyclic(M, M, range(d), S.device) == S).all()):
            raise ValueError("crc: S is not the cyclic allocation")
        how = cls.construction(cfg, M, d)
        if d == 1:
            return torch.eye(M, dtype=torch.float64, device=S.device).expand(R, M, M).clone()
        if how == "cyclic_mds":
            return _cyclic_mds_rows(M, d, S.device).expand(R, M, M).clone()
        C = 1 if how == "random" else int(_get(cfg, "candidates", 32))
        H = (
            rng.randn(d - 1, M, dtype=torch.float64)
            if how == "random"
            else rng.randn(C, d - 1, M, dtype=torch.float64).reshape(R * C, d - 1, M)
        )
        H[:, :, -1] = -H[:, :, :-1].sum(-1)
        B = _tandon_rows(H)  # (R·C, M, M)
        if how == "random":
            return B
        Bs = B.reshape(R, C, M, M)
        best = torch.tensor([_best_candidate(Bs[r], H.reshape(R, C, d - 1, M)[r], d) for r in range(R)])
        return Bs[torch.arange(R, device=S.device), best.to(S.device)]


@CODES.register("bgc")
class BGC(CodeScheme):
    """Bernoulli gradient code: S_ij ~ Bernoulli(d/N) i.i.d., every partition on ≥ 1 device.

    Each empty partition column gets one device drawn uniformly. B = S. ``optimal``:
    a = argmin ‖B_Fᵀa − 1‖₂, the min-norm least squares pinv(B_Fᵀ)1 in float64.
    """

    name = "bgc"
    decoders: ClassVar[dict[str, Decoder]] = {"optimal": _decode_lstsq}

    @classmethod
    def allocate(cls, cfg: Any, M: int, N: int, d: int, rng: SeedRNG) -> torch.Tensor:
        S = rng.rand(M, N, dtype=torch.float64) < d / N  # (R, M, N)
        pick = (rng.rand(N, dtype=torch.float64) * M).long().clamp_max(M - 1)  # (R, N), always drawn
        empty = ~S.any(1)  # (R, N)
        fix = torch.zeros_like(S)
        fix.scatter_(1, pick[:, None, :], empty[:, None, :])
        return S | fix


@CODES.register("rgc")
class RGC(CodeScheme):
    """Sparse random graph code (Charles, Papailiopoulos, Ellenberg 2017), an *approximate* code.

    S is a random d-regular bipartite graph (M = N: a union of d disjoint random permutation
    matrices drawn from the code stream, as sgc's ``allocation=random``): every device holds d
    partitions, every partition is on d devices. B = S/d, so 1ᵀB = 1ᵀ (a = 1 is exact without
    stragglers). With stragglers no weights need be exact: the decoders minimise, or only
    estimate, the residual e = aᵀB_F − 1ᵀ, reported as ``‖e‖₂``; ĝ = ∇F + Σ_j e_j g_j + the
    compression error Σ_i a_i (m_i − u_i), whose weights stay O(1) (no Vandermonde solves).

    - ``optimal`` (default): a = argmin ‖B_Fᵀa − 1‖₂, the min-norm least squares pinv(B_Fᵀ)1
      in float64 (the smallest residual of any decoder; nested survivor sets F' ⊂ F give
      ‖e(F')‖ ≥ ‖e(F)‖).
    - ``onestep``: a_i = z_i·M/|F|. Partition j's coverage is (aᵀB)_j = M c_j(F)/(d|F|) with
      c_j(F) its surviving holders; over a uniformly random F of fixed size E[c_j(F)] =
      d|F|/M, so E[aᵀB] = 1ᵀ: unbiased over random straggler sets, max|a| = M/|F|.
    """

    name = "rgc"
    decoders: ClassVar[dict[str, Decoder]] = {"optimal": _decode_lstsq, "onestep": _decode_onestep}
    square = True

    @classmethod
    def allocate(cls, cfg: Any, M: int, N: int, d: int, rng: SeedRNG) -> torch.Tensor:
        return _random_regular(M, d, rng)

    @classmethod
    def encoding(cls, cfg: Any, S: torch.Tensor, p: torch.Tensor, d: int, rng: SeedRNG) -> torch.Tensor:
        if not (bool((S.sum(1) == d).all()) and bool((S.sum(2) == d).all())):
            raise ValueError("rgc: S is not d-regular")
        return S.to(torch.float64) / d


# ----------------------------------------------------------------------------- entry points
def num_partitions(cfg: Any, M: int) -> int:
    """N = ``code.partitions`` if set, else M; ``uncoded``, ``frc``, ``crc`` and ``rgc`` require N = M."""
    scheme = _scheme(cfg)
    N = _get(cfg, "partitions")
    if N is None:
        return int(M)
    N = need_int("code.partitions", N, 1, accepted="null or integers ≥ 1")
    if scheme.square and N != M:
        raise ConfigError("code.partitions", N, f"null or {M}", f"code {scheme.name} needs partitions = devices")
    return N


def allocate(cfg: Any, M: int, rng: SeedRNG) -> torch.Tensor:
    """The allocation S (R, M, N) bool, one per replicate, drawn from ``rng`` (the code stream)."""
    scheme = _scheme(cfg)
    N = num_partitions(cfg, M)
    d = scheme.redundancy(cfg, M, N)
    scheme.decode_name(cfg)  # fail early on a bad decoder
    return scheme.allocate(cfg, M, N, d, rng)


def build_code(cfg: Any, S: torch.Tensor, p: torch.Tensor, rng: SeedRNG, dtype: torch.dtype) -> Code:
    """The Code for allocation S (R, M, N) and straggler marginals p (R, M) float64.

    ``rng`` is consumed only by ``crc`` (the random H). B is stored in ``dtype``; decoding is done
    in float64 and cast back.
    """
    scheme = _scheme(cfg)
    R, M, N = S.shape
    d = scheme.redundancy(cfg, M, N)
    decode = scheme.decode_name(cfg)
    p = torch.as_tensor(p, dtype=torch.float64, device=S.device)
    if p.shape != (R, M):
        raise ValueError(f"p must be (R={R}, M={M}); got {tuple(p.shape)}")
    needs_p = scheme is SGC or decode == "unbiased"
    if needs_p and bool((p >= 1).any() | (p < 0).any()):
        raise ValueError(f"code {scheme.name}/{decode} needs straggler marginals p_i in [0, 1)")
    B = scheme.encoding(cfg, S, p, d, rng)
    name = scheme.name or _code_name(cfg)
    fixed = scheme.fixed_weights or decode == "fixed"
    return Code(name, S, B, d, decode, scheme.decoders[decode], fixed, p, dtype=dtype)
