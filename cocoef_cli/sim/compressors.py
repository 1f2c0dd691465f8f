"""Compressors: the dense vector the server reconstructs from one message, and its cost in bits.

Every compressor maps a batch ``v`` of shape ``(R, M, D)`` (R replicates, M devices; any number of
middle dims works) to a tensor of the same shape and dtype: row ``v[r, i]`` is one message, and all
norms / scales are taken per message, over the last dimension. Randomised compressors draw only
from the ``rng`` argument (a :class:`~cocoef_cli.rng.SeedRNG` with ``rng.R == R``), with one
draw of shape ``v.shape[1:]`` (a leading R is added by the rng) per call, so a run with seeds
``[0, 1]`` compresses exactly like two runs with seeds ``[0]`` and ``[1]``. Nothing loops over
devices or coordinates.

:meth:`Compressor.bits` is the cost of ONE message, a deterministic formula of D, k, ...
(docs/design.md §4), with ``value_bits`` (default 32) bits per transmitted float. ``value_bits``
only changes the accounting: values are not quantised to that precision.

Notation: x ∈ ℝ^D one message, sign(0) = +1, ω the variance constant of an unbiased compressor:
E[C(x)] = x and E‖C(x) − x‖² ≤ ω‖x‖².
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cocoef_cli.checks import is_int, need_int, need_num
from cocoef_cli.errors import ConfigError
from cocoef_cli.registry import Registry
from cocoef_cli.rng import SeedRNG

INDEX_BITS = ("log2", "32", "bitmap")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def ceil_log2(n: int) -> int:
    """ceil(log2 n) for an integer n ≥ 1, exactly (no float rounding): 1 → 0, 2 → 1, 5 → 3."""
    if n < 1:
        raise ValueError(f"ceil_log2 needs n >= 1, got {n}")
    return (n - 1).bit_length()


def sign_pm1(v: Tensor) -> Tensor:
    """Elementwise sign with sign(0) = +1 (values ±1, dtype of ``v``)."""
    one = torch.ones((), dtype=v.dtype, device=v.device)
    return torch.where(v < 0, -one, one)


#: Expected number of a row's top-k entries in its strided sample (threshold path of topk_indices).
SAMPLE_HITS = 8

#: Select with the compiled per-row kernel (C, built once per machine) when it can be built; else
#: full-row selection with torch (exact too). Turned off by :func:`_kernels` where no compiler builds it.
USE_KERNELS = True


def _kernels() -> Any:
    """The compiled-kernel module (:mod:`cocoef_cli.sim.kernels`, its library built or loaded on
    first use), or None where the kernel cannot be built (``USE_KERNELS`` is then turned off)."""
    global USE_KERNELS
    from cocoef_cli.sim import kernels

    if kernels.library() is None:
        USE_KERNELS = False
        return None
    return kernels


def topk_indices(v: Tensor, k: int, active: Tensor | None = None) -> Tensor:
    """Indices (..., k) of the k largest |v_j| of every row: :func:`topk_pick` without the values."""
    return topk_pick(v, k, active)[0]


def subtract_at(v: Tensor, idx: Tensor, vals: Tensor, active: Tensor | None = None) -> Tensor:
    """v ← v − m in place, m = ``vals`` at ``idx`` (..., k) on the ``active`` messages and 0 on the
    others (v + (−m), touching k entries a message); returns v."""
    m = vals if active is None else vals.masked_fill(active.unsqueeze(-1).logical_not(), 0.0)
    return v.scatter_add_(-1, idx, m.neg())


def topk_pick(
    v: Tensor, k: int, active: Tensor | None = None, add: Any = None, subtract: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(indices (..., k) of the k largest |v_j| of every row (last dim), in no particular order,
    and v at those indices when the kernel ran (else None)); ties go to the lower index; NaN
    counts as the largest magnitude (as in ``torch.topk``).

    Exact, and without a full sort. On CPU, when k ≥ 2·SAMPLE_HITS and D ≥ 8k, by a threshold in
    the compiled per-row kernel (:func:`cocoef_cli.sim.kernels.topk_rows`): a strided sample of
    every h-th |v_j| (h = k // SAMPLE_HITS) gives t, its r-th largest value with
    r = k/h + 3√(k/h) + 2, so that t ≤ the row's k-th largest magnitude with high probability; the
    candidates {j : |v_j| ≥ t} (about r·h ≈ 2k of them) are selected exactly; rows whose candidate
    count is below k, above 8·r·h, or whose t is 0 are selected over the full row. Elsewhere (GPU,
    small k, or where the kernel cannot be built) the full rows are selected directly (:func:`_select`). ``active``
    (v.shape[:-1], bool): rows whose result the caller does not use; they may be skipped, and
    their indices are then arbitrary (valid) ones.

    ``add`` (a :class:`~cocoef_cli.sim.codes.CodedSum` U, optional): first v += U in place (v
    contiguous (R, M, D)), in the kernel's pass over each row when the kernel runs (u_i summed
    over its partitions first, then added, as a device of the distributed runtime does).
    ``subtract``: last, v ← v − v at the picked indices of the ``active`` rows
    (:func:`subtract_at`; in the kernel's pass over the row when it runs); the values are then
    always returned (those before).
    """
    D = v.shape[-1]
    use_kernel = USE_KERNELS and v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64)
    kernels = _kernels() if use_kernel and k >= 2 * SAMPLE_HITS and 8 * k <= D and v.numel() else None
    if kernels is None:
        if add is not None:
            add.add_to(v)
        idx = _select(v.abs(), k)
        if not subtract:
            return idx, None
        vals = v.gather(-1, idx)
        subtract_at(v, idx, vals, active)
        return idx, vals
    h = k // SAMPLE_HITS
    r = int(k / h + 3.0 * math.sqrt(k / h)) + 2
    x = v.detach().reshape(-1, D).contiguous()
    act = None if active is None else active.detach().reshape(-1).to(torch.bool).numpy()
    xs, threads = x.numpy(), torch.get_num_threads()
    out, picked = np.empty((xs.shape[0], k), np.int64), np.empty((xs.shape[0], k), xs.dtype)
    for i0, i1, args in [(0, xs.shape[0], None)] if add is None else add.kernel_parts(v):
        part = None if act is None else act[i0:i1]
        kernels.topk_rows(xs[i0:i1], k, h, r, 8 * r * h, threads, part, args, subtract, (out[i0:i1], picked[i0:i1]))
    if subtract and x.data_ptr() != v.data_ptr():  # v was not contiguous: the kernel subtracted in a copy
        v.copy_(x.view(v.shape))
    shape = (*v.shape[:-1], k)
    return torch.from_numpy(out).view(shape), torch.from_numpy(picked).view(shape)


#: Entries per block of the full-row selection (temporaries stay small whatever M·D is).
SELECT_BLOCK = 1 << 22


def _select(a: Tensor, k: int) -> Tensor:
    """Positions (..., k) of the k largest entries of every row of magnitudes ``a`` (NaN largest),
    ties to the lower position.

    ``torch.topk(sorted=False)`` selects k entries and t, the k-th largest value. torch chooses
    arbitrarily among entries tied with t; when some row left a tied entry out, the rule is
    applied: keep every a_j > t, then the a_j == t of lowest position until exactly k are kept
    (the k largest of the integer key 2L+1 for a_j > t, L − j for a_j = t, 0 otherwise). On CPU
    the rule runs only when such a row exists (one check per block of rows), and rows are taken in
    blocks of about SELECT_BLOCK entries; elsewhere always, so that no host synchronisation is
    needed.
    """
    L = a.shape[-1]
    rows = a.reshape(-1, L)
    if a.device.type == "cpu" and rows.numel() > SELECT_BLOCK:
        blocks = rows.split(max(1, SELECT_BLOCK // L))
        return torch.cat([_select_rows(b, k) for b in blocks]).view(*a.shape[:-1], k)
    return _select_rows(rows, k).view(*a.shape[:-1], k)


def _select_rows(a: Tensor, k: int) -> Tensor:
    """:func:`_select` of a (rows, L) block."""
    top = torch.topk(a, k, dim=-1, sorted=False)
    t = top.values.amin(dim=-1, keepdim=True)
    # every a_j > t is selected, so a tied entry was left out iff more than k entries are ≥ t
    ambiguous = (a >= t).sum(-1, dtype=torch.int32) > k
    if a.device.type == "cpu" and not bool(ambiguous.any()):
        return top.indices
    L = a.shape[-1]
    by_position = torch.arange(L, 0, -1, dtype=torch.int32, device=a.device)  # L − j
    key = torch.where(a > t, 2 * L + 1, (a == t) * by_position)
    return torch.topk(key, k, dim=-1, sorted=False).indices


def topk_mask(v: Tensor, k: int) -> Tensor:
    """Boolean mask of :func:`topk_indices` (exactly k entries per row are True, zeros included)."""
    if k >= v.shape[-1]:
        return torch.ones_like(v, dtype=torch.bool)
    return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, topk_indices(v, k), True)


def _uniform(rng: SeedRNG | None, v: Tensor, name: str) -> Tensor:
    """One U[0,1) draw per entry of ``v`` from ``rng`` (shape (R, ...) with R = rng.R)."""
    if rng is None:
        raise ValueError(f"compressor {name!r} is randomised: pass a SeedRNG")
    if v.dim() < 1 or v.shape[0] != rng.R:
        raise ValueError(f"compressor {name!r}: leading dim of v {tuple(v.shape)} must be rng.R = {rng.R}")
    return rng.rand(*v.shape[1:], dtype=v.dtype).to(v.device)


def _cfg_get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if cfg is not None else default


def resolve_k(cfg: Mapping[str, Any] | Any, D: int) -> int:
    """k = ``compressor.k`` if set, else max(1, ceil(``compressor.ratio``·D)); validated in 1..D.

    ratio·D is rounded to 9 decimals before the ceiling, so that e.g. ratio 0.07 with D = 100 gives
    k = 7 and not 8 (0.07·100 = 7.000000000000001 in floating point).
    """
    k = _cfg_get(cfg, "k")
    if k is not None:
        return need_int("compressor.k", k, 1, D)
    ratio = _cfg_get(cfg, "ratio", 0.1)
    if ratio is None:
        raise ConfigError(
            "compressor.ratio", ratio, "a number in (0, 1] (or set compressor.k)", "k and ratio both null"
        )
    ratio = need_num("compressor.ratio", ratio, 0, 1, lo_open=True)
    return max(1, min(D, math.ceil(round(ratio * D, 9))))


# ---------------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------------


class Compressor:
    """Base class: ``compress`` returns the server's dense reconstruction, ``bits`` one message's cost.

    A plugin (``compressor._target_=pkg.mod.MyCompressor``) subclasses it with
    ``__init__(self, D, **keys)`` calling ``super().__init__(D)`` (keys: the group's YAML keys,
    as keyword arguments), and implements

    * ``compress(self, v, rng)``: v (R, M, D), one message a row ``v[r, i]``; returns a NEW tensor
      of the same shape and dtype, the dense reconstruction C(v[r, i]) of every message (v itself
      unchanged). Random draws come only from ``rng`` (a SeedRNG with rng.R == R:
      ``rng.rand(M, D, dtype=v.dtype)`` is one U[0,1) per entry, shape (R, M, D)), so replicates
      stay independent and reproducible;
    * ``bits(self)``: the bits of ONE message (an int, a formula of D and the keys);
    * the class flag ``unbiased`` (E[C(x)] = x; methods such as ``coco`` need it) and, for an
      unbiased C, ``omega(self)`` with E‖C(x) − x‖² ≤ ω‖x‖² (optional).

    The fast sparse path (:meth:`sparse`: k kept coordinates as (indices, values)) is optional:
    without it the methods use the dense reconstruction.
    """

    name: ClassVar[str] = ""
    unbiased: bool = False  # a class property; an instance may differ (terngrad with clip)
    randomized: ClassVar[bool] = False

    def __init__(self, D: int, value_bits: int = 32):
        self.D = need_int("D", D, 1)
        self.value_bits = need_int("compressor.value_bits", value_bits, 1)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, D: int) -> Compressor:
        """Build from a config mapping; subclasses add their own keys."""
        return cls(D, value_bits=_cfg_get(cfg, "value_bits", 32))

    def omega(self) -> float | None:
        """ω with E‖C(x) − x‖² ≤ ω‖x‖² (unbiased compressors), None for biased ones."""
        return None

    def compress(self, v: Tensor, rng: SeedRNG | None = None) -> Tensor:
        """Dense reconstruction C(v) of every message (last dim D): a new tensor (never v or a view of
        it: callers may reuse v in place), same shape and dtype; v unchanged."""
        if v.shape[-1] != self.D:
            raise ValueError(f"{self.name}: last dim of v is {v.shape[-1]}, compressor built for D={self.D}")
        return self._compress(v, rng)

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, v: Tensor, rng: SeedRNG | None = None) -> Tensor:
        return self.compress(v, rng)

    def sparse(
        self,
        v: Tensor,
        rng: SeedRNG | None = None,
        active: Tensor | None = None,
        add: Any = None,
        subtract: bool = False,
    ) -> tuple[Tensor, Tensor] | None:
        """C(v) as (indices, values) of shape (..., k) when the compressor keeps k coordinates per
        message (C(v) = 0 elsewhere), drawing exactly what :meth:`compress` draws; None otherwise.
        Lets callers avoid dense (R, M, D) temporaries. ``active`` (v.shape[:-1], bool, optional):
        messages the caller will not use (stragglers'); their indices may be arbitrary. ``add``
        (a :class:`~cocoef_cli.sim.codes.CodedSum` U, optional): v += U in place first, always
        (also when the result is None), fused into the selection where the compressor can
        (``fuses_add``). ``subtract``: when the result is not None, also v ← v − C(v) in place on
        the active messages (error feedback's e ← v − m, computed as v + (−m)), fused into the
        selection where the compressor can (``fuses_subtract``); the values returned are C(v)'s."""
        if add is not None and not self.fuses_add:
            add.add_to(v)
            add = None
        if subtract and self.fuses_subtract:
            return self._sparse_subtract(v, rng, active, add)
        out = self._sparse(v, rng, active, add)
        if subtract and out is not None:
            subtract_at(v, out[0], out[1], active)
        return out

    #: True: :meth:`_sparse` adds ``add`` to v itself, in its own pass; else :meth:`sparse` adds it first
    fuses_add: ClassVar[bool] = False
    #: True: :meth:`_sparse_subtract` is :meth:`sparse` with ``subtract``, in the selection's pass
    fuses_subtract: ClassVar[bool] = False

    def _sparse_subtract(
        self, v: Tensor, rng: SeedRNG | None, active: Tensor | None, add: Any
    ) -> tuple[Tensor, Tensor]:
        """:meth:`sparse` with ``subtract`` (classes that set ``fuses_subtract``)."""
        raise NotImplementedError  # pragma: no cover - only called when fuses_subtract

    def _sparse(self, v: Tensor, rng: SeedRNG | None, active: Tensor | None, add: Any) -> tuple[Tensor, Tensor] | None:
        """:meth:`sparse` after v += U (or with ``add`` to fuse, when the class ``fuses_add``)."""
        return None

    def bits(self) -> int:
        """Bits of one message (docs/design.md §4)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._extra_repr()
        return f"{type(self).__name__}(D={self.D}{', ' + extra if extra else ''}, value_bits={self.value_bits})"


class _KSparse(Compressor):
    """Keeps k of the D coordinates; k from ``compressor.k`` or ``compressor.ratio``."""

    def __init__(self, D: int, k: int, value_bits: int = 32):
        super().__init__(D, value_bits)
        self.k = need_int("compressor.k", k, 1, self.D)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, D: int) -> Compressor:
        D = need_int("D", D, 1)
        return cls(D, resolve_k(cfg, D), value_bits=_cfg_get(cfg, "value_bits", 32))

    def _pick(
        self, v: Tensor, rng: SeedRNG | None, active: Tensor | None = None, add: Any = None
    ) -> tuple[Tensor, Tensor | None]:
        """The k kept coordinates of every message, shape (..., k) (arbitrary where ``active`` is
        False), and v there if known (else None); ``add``: see :meth:`Compressor._sparse`."""
        raise NotImplementedError

    def _scale(self) -> float:
        return 1.0

    def _check_width(self, v: Tensor) -> None:
        if v.shape[-1] != self.D:
            raise ValueError(f"{self.name}: last dim of v is {v.shape[-1]}, compressor built for D={self.D}")

    def _sparse(self, v: Tensor, rng: SeedRNG | None, active: Tensor | None, add: Any) -> tuple[Tensor, Tensor]:
        self._check_width(v)
        idx, vals = self._pick(v, rng, active, add)
        if vals is None:
            vals = v.gather(-1, idx)
        return idx, vals.mul_(self._scale()) if self._scale() != 1.0 else vals

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        idx, vals = self._sparse(v, rng, None, None)
        return torch.zeros_like(v).scatter_(-1, idx, vals)

    def random_indices(self, keys: Tensor) -> Tensor:
        """The k coordinates random-k keeps for iid U[0,1) ``keys`` (..., D): the k largest keys, so
        uniform without replacement; shape (..., k), unordered. The wire codec regenerates them."""
        return torch.topk(keys, self.k, dim=-1, sorted=False).indices

    def _extra_repr(self) -> str:
        return f"k={self.k}"


COMPRESSORS: Registry[type[Compressor]] = Registry("compressor", Compressor)


# ---------------------------------------------------------------------------------------------
# the compressors
# ---------------------------------------------------------------------------------------------


@COMPRESSORS.register("identity")
class Identity(Compressor):
    """No compression: the full-precision vector.

    C(x) = x. Unbiased, ω = 0. Bits: value_bits·D.
    """

    name = "identity"
    unbiased = True

    def omega(self) -> float:
        return 0.0

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        return v.clone()

    def bits(self) -> int:
        return self.value_bits * self.D


@COMPRESSORS.register("topk")
class TopK(_KSparse):
    """Top-k sparsification: keep the k largest-magnitude coordinates (biased, δ = k/D).

    C(x)_j = x_j if j is among the k largest |x_j| (ties → lower index), else 0.
    Biased; contraction ‖C(x) − x‖² ≤ (1 − k/D)‖x‖². Deterministic.
    Bits (``compressor.index_bits``): ``log2`` k·(vb + ceil(log2 D)); ``32`` k·(vb + 32);
    ``bitmap`` vb·k + D; vb = value_bits.
    """

    name = "topk"
    fuses_add = True

    def __init__(self, D: int, k: int, value_bits: int = 32, index_bits: str | int = "log2"):
        super().__init__(D, k, value_bits)
        ib = str(index_bits) if is_int(index_bits) or isinstance(index_bits, str) else None
        if ib not in INDEX_BITS:
            raise ConfigError("compressor.index_bits", index_bits, INDEX_BITS, "unknown index encoding")
        self.index_bits = ib

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, D: int) -> Compressor:
        D = need_int("D", D, 1)
        return cls(
            D,
            resolve_k(cfg, D),
            value_bits=_cfg_get(cfg, "value_bits", 32),
            index_bits=_cfg_get(cfg, "index_bits", "log2"),
        )

    fuses_subtract = True

    def __init_subclass__(cls, **kw: Any) -> None:
        """A subclass that changes what is picked or returned (``_pick``, ``_sparse``, ``_scale``)
        without its own ``_sparse_subtract`` takes the generic subtraction after its ``_sparse``."""
        super().__init_subclass__(**kw)
        if "_sparse_subtract" not in cls.__dict__ and any(n in cls.__dict__ for n in ("_pick", "_sparse", "_scale")):
            cls.fuses_subtract = False

    def _pick(self, v: Tensor, rng: SeedRNG | None, active: Tensor | None = None, add: Any = None):
        return topk_pick(v, self.k, active, add)

    def _sparse_subtract(
        self, v: Tensor, rng: SeedRNG | None, active: Tensor | None, add: Any
    ) -> tuple[Tensor, Tensor]:
        self._check_width(v)
        idx, vals = topk_pick(v, self.k, active, add, subtract=True)
        assert vals is not None  # topk_pick gives the values when it subtracts
        return idx, vals

    def bits(self) -> int:
        vb, k, D = self.value_bits, self.k, self.D
        if self.index_bits == "log2":
            return k * (vb + ceil_log2(D))
        if self.index_bits == "32":
            return k * (vb + 32)
        return vb * k + D  # bitmap

    def _extra_repr(self) -> str:
        return f"k={self.k}, index_bits={self.index_bits!r}"


@COMPRESSORS.register("randk")
class RandK(_KSparse):
    """Random-k sparsification: keep k uniformly random coordinates, unscaled (biased).

    C(x)_j = x_j for j ∈ S, else 0; S ⊂ {1..D}, |S| = k, uniform without replacement, drawn
    independently per device (and per replicate) from the compressor stream.
    Biased: E[C(x)] = (k/D)·x; E‖C(x) − x‖² = (1 − k/D)‖x‖². Bits: value_bits·k (the indices
    follow from the shared seed).
    """

    name = "randk"
    randomized = True

    def _pick(self, v: Tensor, rng: SeedRNG | None, active: Tensor | None = None, add: Any = None):
        return self.random_indices(_uniform(rng, v, self.name)), None

    def bits(self) -> int:
        return self.value_bits * self.k


@COMPRESSORS.register("randk_unbiased")
class RandKUnbiased(_KSparse):
    """Random-k sparsification rescaled by D/k (unbiased).

    C(x)_j = (D/k)·x_j for j ∈ S, else 0; S uniform k-subset per device, as in ``randk``.
    Unbiased, E‖C(x) − x‖² = (D/k − 1)‖x‖², so ω = D/k − 1. Bits: value_bits·k.
    """

    name = "randk_unbiased"
    unbiased = True
    randomized = True

    def omega(self) -> float:
        return self.D / self.k - 1.0

    def _pick(self, v: Tensor, rng: SeedRNG | None, active: Tensor | None = None, add: Any = None):
        return self.random_indices(_uniform(rng, v, self.name)), None

    def _scale(self) -> float:
        return self.D / self.k

    def bits(self) -> int:
        return self.value_bits * self.k


@COMPRESSORS.register("sign")
class Sign(Compressor):
    """Sign compression: one bit per coordinate, no scale (biased).

    C(x)_j = sign(x_j) ∈ {−1, +1}, sign(0) = +1. Biased, not scale-preserving. Bits: D.
    """

    name = "sign"

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        return sign_pm1(v)

    def bits(self) -> int:
        return self.D


@COMPRESSORS.register("scaled_sign")
class ScaledSign(Compressor):
    """Scaled sign: signs times the mean magnitude ‖x‖₁/D (biased).

    C(x) = (‖x‖₁/D)·sign(x), sign(0) = +1. Biased; ‖C(x) − x‖² = ‖x‖² − ‖x‖₁²/D
    (contraction with δ = ‖x‖₁²/(D‖x‖²) ≥ 1/D). Bits: D + value_bits.
    """

    name = "scaled_sign"

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        scale = v.abs().sum(dim=-1, keepdim=True) / self.D
        return scale * sign_pm1(v)

    def bits(self) -> int:
        return self.D + self.value_bits


@COMPRESSORS.register("grouped_sign")
class GroupedSign(Compressor):
    """Grouped (block-wise) scaled sign: scaled sign per block of `group` coordinates (biased).

    Coordinates are cut into B = ceil(D/g) consecutive blocks G_1..G_B of g = ``group``
    coordinates (the last one has D − (B−1)·g); C(x)_j = (‖x_{G_b}‖₁/|G_b|)·sign(x_j) for j ∈ G_b,
    sign(0) = +1. Biased; g ≥ D is ``scaled_sign``, g = 1 is the identity.
    Bits: D + value_bits·ceil(D/g).
    """

    name = "grouped_sign"

    def __init__(self, D: int, group: int = 64, value_bits: int = 32):
        super().__init__(D, value_bits)
        self.group = need_int("compressor.group", group, 1)
        self.n_blocks = -(-self.D // self.group)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, D: int) -> Compressor:
        return cls(D, group=_cfg_get(cfg, "group", 64), value_bits=_cfg_get(cfg, "value_bits", 32))

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        D, g, B = self.D, min(self.group, self.D), self.n_blocks
        pad = B * g - D
        a = torch.nn.functional.pad(v.abs(), (0, pad)) if pad else v.abs()
        sums = a.reshape(*v.shape[:-1], B, g).sum(dim=-1)  # (..., B) block ℓ1 norms
        lengths = torch.full((B,), float(g), dtype=v.dtype, device=v.device)
        lengths[-1] = D - (B - 1) * g
        scale = (sums / lengths).repeat_interleave(g, dim=-1)[..., :D]
        return scale * sign_pm1(v)

    def bits(self) -> int:
        return self.D + self.value_bits * self.n_blocks

    def _extra_repr(self) -> str:
        return f"group={self.group}"


@COMPRESSORS.register("qsgd")
class QSGD(Compressor):
    """QSGD: stochastic rounding of |x_j|/‖x‖₂ to s = `levels` levels (unbiased).

    C(x)_j = ‖x‖₂·sign(x_j)·ξ_j/s, ξ_j = l + Bernoulli(s|x_j|/‖x‖₂ − l), l = floor(s|x_j|/‖x‖₂);
    C(0) = 0. Unbiased, ω = min(D/s², √D/s) (Alistarh et al. 2017, Lemma 3.1).
    Bits: D·(1 + ceil(log2(s+1))) + value_bits.
    """

    name = "qsgd"
    unbiased = True
    randomized = True

    def __init__(self, D: int, levels: int = 4, value_bits: int = 32):
        super().__init__(D, value_bits)
        self.levels = need_int("compressor.levels", levels, 1)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, D: int) -> Compressor:
        return cls(D, levels=_cfg_get(cfg, "levels", 4), value_bits=_cfg_get(cfg, "value_bits", 32))

    def omega(self) -> float:
        s, D = self.levels, self.D
        return min(D / s**2, math.sqrt(D) / s)

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        u = _uniform(rng, v, self.name)
        s = self.levels
        norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        y = (s / safe) * v.abs()  # in [0, s]; 0 everywhere when ‖v‖ = 0
        low = torch.floor(y)
        xi = low + (u < (y - low)).to(v.dtype)
        return (norm / s) * sign_pm1(v) * xi

    def bits(self) -> int:
        return self.D * (1 + ceil_log2(self.levels + 1)) + self.value_bits

    def _extra_repr(self) -> str:
        return f"levels={self.levels}"


@COMPRESSORS.register("onebit")
class OneBit(Compressor):
    """Stochastic ±‖x‖_∞ quantiser, one bit a coordinate (unbiased; not Seide et al.'s 1-bit SGD).

    Not the 1-bit SGD of Seide et al. (2014), which is deterministic sign quantisation with error
    feedback and per-column means: use ``sign``/``scaled_sign`` with ``coco_ef`` for that family.

    With R = ‖x‖_∞: C(x)_j = +R with probability (1 + x_j/R)/2, else −R; C(0) = 0.
    Unbiased; E‖C(x) − x‖² = D·R² − ‖x‖² ≤ (D − 1)‖x‖², ω = D − 1. Bits: D + value_bits.
    """

    name = "onebit"
    unbiased = True
    randomized = True

    def omega(self) -> float:
        return float(self.D - 1)

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        u = _uniform(rng, v, self.name)
        R = v.abs().amax(dim=-1, keepdim=True)
        safe = torch.where(R > 0, R, torch.ones_like(R))
        p_up = 0.5 * (1.0 + v / safe)
        one = torch.ones((), dtype=v.dtype, device=v.device)
        return R * torch.where(u < p_up, one, -one)

    def bits(self) -> int:
        return self.D + self.value_bits


@COMPRESSORS.register("terngrad")
class TernGrad(Compressor):
    """TernGrad: clip to ±c·σ, ternarise to {−s, 0, +s} with s = ‖x‖_∞ (biased when clipped).

    With ``clip`` = c (default 2.5, as the reference implementation of Wen et al. 2017): x_j ←
    max(−cσ, min(x_j, cσ)), σ = (Σ_j x_j²/D)^½ of the message (no clipping when σ = 0); then
    C(x)_j = s·sign(x_j)·b_j, b_j ~ Bernoulli(|x_j|/s), s = ‖x‖_∞; C(0) = 0. Clipping makes C
    biased (E C(x) = clip(x)); ``clip=null``: unbiased, E‖C(x) − x‖² = s‖x‖₁ − ‖x‖² ≤
    (√D − 1)‖x‖², ω = √D − 1. Bits: 2·D + value_bits.
    """

    name = "terngrad"
    unbiased = True  # the class without clipping; an instance with clip is biased
    randomized = True

    def __init__(self, D: int, clip: float | None = 2.5, value_bits: int = 32):
        super().__init__(D, value_bits)
        self.clip = need_num("compressor.clip", clip, 0, lo_open=True, none=True)
        self.unbiased = self.clip is None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any, D: int) -> Compressor:
        return cls(D, clip=_cfg_get(cfg, "clip", 2.5), value_bits=_cfg_get(cfg, "value_bits", 32))

    def omega(self) -> float | None:
        return math.sqrt(self.D) - 1.0 if self.clip is None else None

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        u = _uniform(rng, v, self.name)
        if self.clip is not None:
            sigma = v.pow(2).mean(dim=-1, keepdim=True).sqrt()
            c = torch.where(sigma > 0, self.clip * sigma, torch.full_like(sigma, math.inf))
            v = torch.minimum(torch.maximum(v, -c), c)
        s = v.abs().amax(dim=-1, keepdim=True)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        keep = u < v.abs() / safe
        return torch.where(keep, s * sign_pm1(v), torch.zeros((), dtype=v.dtype, device=v.device))

    def bits(self) -> int:
        return 2 * self.D + self.value_bits


@COMPRESSORS.register("natural")
class Natural(Compressor):
    """Natural compression: stochastic rounding of every coordinate to a power of two (unbiased).

    For x_j ≠ 0 with a = floor(log2|x_j|): C(x)_j = sign(x_j)·2^(a+1) with probability
    (|x_j| − 2^a)/2^a, else sign(x_j)·2^a; 0 stays 0 (Horváth et al. 2019).
    Unbiased, ω = 1/8. Bits: 9·D (sign + 8-bit exponent; independent of value_bits).
    """

    name = "natural"
    unbiased = True
    randomized = True

    def omega(self) -> float:
        return 1.0 / 8.0

    def _compress(self, v: Tensor, rng: SeedRNG | None) -> Tensor:
        u = _uniform(rng, v, self.name)
        a = v.abs()
        mant, expo = torch.frexp(a)  # a = mant·2^expo, mant ∈ [0.5, 1): 2^floor(log2 a) = 2^(expo−1)
        low = torch.ldexp(torch.full_like(a, 0.5), expo)
        p_up = 2.0 * mant - 1.0  # = (a − low)/low, exactly
        mag = torch.where(u < p_up, 2.0 * low, low)
        return torch.where(a > 0, sign_pm1(v) * mag, torch.zeros((), dtype=v.dtype, device=v.device))

    def bits(self) -> int:
        return 9 * self.D


# ---------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------


def build_compressor(cfg: Mapping[str, Any] | Any, D: int) -> Compressor:
    """The compressor named by ``cfg.name`` for messages of dimension D, validated.

    ``cfg`` is the ``compressor`` config group (dict or OmegaConf DictConfig), a built-in ``name``
    or a ``_target_`` class (:meth:`~cocoef_cli.registry.Registry.build`). Bad values raise
    :class:`ConfigError` naming the dotted key (``compressor.k``, ``compressor.ratio``, ...).
    """
    # a _target_ class: cls(D, **keys); a name: its from_config (ConfigError when unknown)
    return COMPRESSORS.build(cfg, D, builtin=lambda cls: cls.from_config(cfg, D))


__all__ = [
    "COMPRESSORS",
    "QSGD",
    "Compressor",
    "GroupedSign",
    "Identity",
    "Natural",
    "OneBit",
    "RandK",
    "RandKUnbiased",
    "ScaledSign",
    "Sign",
    "TernGrad",
    "TopK",
    "build_compressor",
    "ceil_log2",
    "resolve_k",
    "sign_pm1",
    "topk_mask",
]
