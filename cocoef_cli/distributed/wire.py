"""Wire formats: the compact bytes of one uplink message, per compressor, and back.

A codec turns the dense message m = C(v) ∈ ℝ^D that the simulator's compressor produced into a
fixed number of bytes, and the server turns them back into exactly the same vector
(``decode(encode(m)) == m``, bit for bit; tested for every compressor). Values travel in the run's
float dtype (4 bytes for ``precision=float32``, so the sizes match the docs/design.md §4 formulas with
``value_bits`` = 32; 8 bytes with ``float64``). Integers are bit-packed little-endian
(:func:`pack_bits`). With k, D, s as in docs/design.md §4, b = ceil(log2 D), L = ceil(log2(s+1)), vs = value
bytes:

=================  ============================================  =============================
compressor         payload                                       bytes
=================  ============================================  =============================
identity           D values                                      vs·D
topk               k values + k indices of b bits (``log2``),    vs·k + ceil(k·b/8)
                   32 bits (``32``) or a D-bit mask (``bitmap``)
randk(_unbiased)   k values; the indices follow from the shared  vs·k
                   seed (the server regenerates the keys)
sign               D sign bits                                   ceil(D/8)
scaled_sign        scale + D sign bits                           vs + ceil(D/8)
grouped_sign       one scale per block + D sign bits             vs·ceil(D/g) + ceil(D/8)
qsgd               scale c = ‖v‖/s + D codes (sign, level ξ)     vs + ceil(D·(1+L)/8)
onebit             R = ‖v‖_∞ + D sign bits                       vs + ceil(D/8)
terngrad           s = ‖v‖_∞ + D 2-bit codes {0, +s, −s}         vs + ceil(2D/8)
natural            sign + IEEE exponent per coordinate           ceil(9D/8) (float32)
=================  ============================================  =============================

so payload bytes ≤ bits()/8 + 1 in float32. Each message is framed (:func:`frame`) with an 8-byte
header (iteration int32, flags uint16, the tag 0xC0EF uint16) and, for methods with per-device state,
an 8-byte trailer ‖state_i‖² (instrumentation for the ``ef_norm`` column). A message holding a
non-finite value (a diverging run) is sent flagged and decodes to NaNs: the replicate is then marked
diverged as in the simulator. A message that is not one (wrong tag, unknown flags, Top-k indices out
of range or not ascending, QSGD levels above s) raises :class:`WireError`: the run fails with that line.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cocoef_cli.registry import Registry
from cocoef_cli.sim.compressors import Compressor, RandK, RandKUnbiased, ceil_log2, topk_mask

CODECS: Registry[type[Codec]] = Registry("wire codec")

HEADER = np.dtype([("iter", "<i4"), ("flags", "<u2"), ("tag", "<u2")])  # 8 bytes in front of every uplink message
TAG = 0xC0EF
TRAILER = np.dtype("<f8")  # ‖state_i‖² after the step, methods with per-device state only
FLAG_NONFINITE = 1


class WireError(RuntimeError):
    """A message the codec cannot represent exactly, or bytes from a peer that are not a valid
    message (the run fails with this one line)."""


# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------


def pack_bits(x: np.ndarray, width: int) -> np.ndarray:
    """The low ``width`` bits of every non-negative integer of ``x``, concatenated little-endian
    (bit j of x_i is bit i·width + j of the stream), in ceil(len(x)·width/8) bytes."""
    x = np.asarray(x, dtype=np.uint64).reshape(-1)
    if width == 0 or x.size == 0:
        return np.zeros(0, dtype=np.uint8)
    bits = ((x[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers of ``width`` bits (int64)."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.asarray(buf, dtype=np.uint8), count=count * width, bitorder="little")
    return (bits.reshape(count, width).astype(np.int64) << np.arange(width, dtype=np.int64)).sum(1)


def packed_len(count: int, width: int) -> int:
    return -(-count * width // 8)


# ---------------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------------


class Codec:
    """Fixed-size encoding of one message m ∈ ℝ^D (1-D tensor in ``dtype``) of compressor ``C``.

    ``keys`` is the compressor's U[0,1) draw for this device and iteration (length D), needed by the
    codecs whose ``needs_keys`` is True (random sparsification: both ends regenerate it from the
    shared seed, so the indices are never sent).
    """

    needs_keys: ClassVar[bool] = False

    def __init__(self, C: Compressor, dtype: torch.dtype):
        self.C, self.D, self.dtype = C, C.D, dtype
        self.np_dtype = np.dtype(torch.empty(0, dtype=dtype).numpy().dtype).newbyteorder("<")
        self.vs = self.np_dtype.itemsize

    def nbytes(self) -> int:
        raise NotImplementedError

    def encode(self, m: Tensor, keys: Tensor | None = None) -> np.ndarray:
        raise NotImplementedError

    def decode(self, buf: np.ndarray, keys: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    # helpers
    def _values(self, x: Tensor | np.ndarray) -> np.ndarray:
        a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        return np.ascontiguousarray(a, dtype=self.np_dtype).view(np.uint8).reshape(-1)

    def _read(self, buf: np.ndarray, offset: int, count: int) -> tuple[Tensor, int]:
        end = offset + count * self.vs
        vals = np.frombuffer(np.ascontiguousarray(buf[offset:end]).tobytes(), dtype=self.np_dtype, count=count)
        return torch.from_numpy(vals.astype(self.np_dtype.newbyteorder("="))), end

    def _signs(self, m: Tensor) -> np.ndarray:
        """D sign bits: 1 where the sign bit of m_j is set (−0.0 included, so zeros round-trip)."""
        return pack_bits(torch.signbit(m).cpu().numpy().astype(np.uint64), 1)

    def _pm1(self, buf: np.ndarray) -> Tensor:
        """±1 (dtype) from D sign bits."""
        neg = torch.from_numpy(unpack_bits(buf, 1, self.D).astype(bool))
        one = torch.ones((), dtype=self.dtype)
        return torch.where(neg, -one, one)

    def _zeros(self) -> Tensor:
        return torch.zeros(self.D, dtype=self.dtype)


@CODECS.register("identity")
class DenseCodec(Codec):
    """m as D values."""

    def nbytes(self) -> int:
        return self.vs * self.D

    def encode(self, m, keys=None):
        return self._values(m)

    def decode(self, buf, keys=None):
        return self._read(buf, 0, self.D)[0]


@CODECS.register("topk")
class TopKCodec(Codec):
    """k values, then their indices (b-bit or 32-bit integers, or a D-bit mask), ascending.

    The k positions are re-selected from m by the same Top-k rule (ties → lower index); positions
    that Top-k kept with a zero value decode to zero either way.
    """

    def __init__(self, C, dtype):
        super().__init__(C, dtype)
        self.k = C.k
        self.mode = C.index_bits
        self.width = {"log2": ceil_log2(self.D), "32": 32}.get(self.mode, 1)

    def nbytes(self) -> int:
        idx = packed_len(self.D, 1) if self.mode == "bitmap" else packed_len(self.k, self.width)
        return self.vs * self.k + idx

    def encode(self, m, keys=None):
        mask = topk_mask(m, self.k)
        idx = torch.nonzero(mask).view(-1)  # ascending
        tail = (
            pack_bits(mask.numpy().astype(np.uint64), 1)
            if self.mode == "bitmap"
            else pack_bits(idx.numpy(), self.width)
        )
        return np.concatenate([self._values(m[idx]), tail])

    def decode(self, buf, keys=None):
        vals, off = self._read(buf, 0, self.k)
        if self.mode == "bitmap":
            idx = np.flatnonzero(unpack_bits(buf[off:], 1, self.D))
            if idx.size != self.k:
                raise WireError(f"topk: a bitmap of {idx.size} positions, expected k = {self.k}")
        else:
            idx = unpack_bits(buf[off:], self.width, self.k)
            if idx.size and (idx[-1] >= self.D or np.any(np.diff(idx) <= 0)):
                raise WireError(f"topk: indices not ascending in 0..{self.D - 1}")
        out = self._zeros()
        out[torch.from_numpy(idx)] = vals
        return out


@CODECS.register("randk")
@CODECS.register("randk_unbiased")
class RandKCodec(Codec):
    """k values in ascending index order; the index set is the compressor's own random mask,
    recomputed from the keys both ends regenerate from the shared seed."""

    needs_keys = True
    C: RandK | RandKUnbiased

    def nbytes(self) -> int:
        return self.vs * self.C.k

    def _idx(self, keys: Tensor | None) -> Tensor:
        if keys is None:
            raise WireError(f"{self.C.name}: the shared random keys are needed")
        return torch.sort(self.C.random_indices(keys.to(self.dtype).reshape(1, self.D))[0]).values

    def encode(self, m, keys=None):
        return self._values(m[self._idx(keys)])

    def decode(self, buf, keys=None):
        out = self._zeros()
        out[self._idx(keys)] = self._read(buf, 0, self.C.k)[0]
        return out


@CODECS.register("sign")
class SignCodec(Codec):
    """D sign bits (C(x) = sign(x) ∈ {±1})."""

    def nbytes(self) -> int:
        return packed_len(self.D, 1)

    def encode(self, m, keys=None):
        return self._signs(m)

    def decode(self, buf, keys=None):
        return self._pm1(buf)


@CODECS.register("scaled_sign")
@CODECS.register("onebit")
class ScaleSignCodec(Codec):
    """One scale c = max_j |m_j| and D sign bits: m_j = c·(±1) exactly (``scaled_sign``:
    c = ‖x‖₁/D; ``onebit``: c = ‖x‖_∞)."""

    def nbytes(self) -> int:
        return self.vs + packed_len(self.D, 1)

    def encode(self, m, keys=None):
        return np.concatenate([self._values(m.abs().max().reshape(1)), self._signs(m)])

    def decode(self, buf, keys=None):
        c, off = self._read(buf, 0, 1)
        return c * self._pm1(buf[off:])


@CODECS.register("grouped_sign")
class GroupedSignCodec(Codec):
    """One scale per block of g coordinates (its max |m_j|) and D sign bits."""

    def __init__(self, C, dtype):
        super().__init__(C, dtype)
        self.g, self.B = min(C.group, self.D), C.n_blocks

    def nbytes(self) -> int:
        return self.vs * self.B + packed_len(self.D, 1)

    def encode(self, m, keys=None):
        a = m.abs()
        pad = self.B * self.g - self.D
        if pad:
            a = torch.nn.functional.pad(a, (0, pad))
        return np.concatenate([self._values(a.view(self.B, self.g).amax(-1)), self._signs(m)])

    def decode(self, buf, keys=None):
        scales, off = self._read(buf, 0, self.B)
        return scales.repeat_interleave(self.g)[: self.D] * self._pm1(buf[off:])


@CODECS.register("qsgd")
class QSGDCodec(Codec):
    """Scale c = ‖x‖₂/s and per coordinate a (1 + L)-bit code (sign bit, level ξ_j ∈ 0..s), with
    m_j = (c·(±1))·ξ_j as the compressor computes it.

    c is recovered from m alone: with a = |m| and some level q ∈ 1..s for max_j a_j, try c near
    max a / q (a few ulps either way) until ξ = round(a/c) ≤ s reproduces every a_j = fl(c·ξ_j)
    exactly. The compressor's own c passes that test, so the search always succeeds; any c that
    passes decodes to exactly m.
    """

    def __init__(self, C, dtype):
        super().__init__(C, dtype)
        self.s = C.levels
        self.L = ceil_log2(self.s + 1)

    def nbytes(self) -> int:
        return self.vs + packed_len(self.D, 1 + self.L)

    def _split(self, a: np.ndarray) -> tuple[Any, np.ndarray]:
        t = self.np_dtype.type
        top = a.max() if a.size else t(0)
        if top == 0:
            return t(0), np.zeros(a.shape, dtype=np.int64)
        with np.errstate(all="ignore"):
            for q in range(1, self.s + 1):
                c0 = t(top / t(q))
                cands = [c0]
                lo = hi = c0
                for _ in range(4):
                    lo, hi = np.nextafter(lo, t(0)), np.nextafter(hi, t(np.inf))
                    cands += [hi, lo]
                for c in cands:
                    xi = np.rint(a / c)
                    if xi.max() <= self.s and np.array_equal((c * xi).astype(self.np_dtype), a):
                        return c, xi.astype(np.int64)
        raise WireError("qsgd: message is not of the form c·sign·ξ with ξ in 0..levels")

    def encode(self, m, keys=None):
        a = m.abs().cpu().numpy().astype(self.np_dtype)
        c, xi = self._split(a)
        codes = (torch.signbit(m).cpu().numpy().astype(np.int64) << self.L) | xi
        return np.concatenate([self._values(np.array([c])), pack_bits(codes, 1 + self.L)])

    def decode(self, buf, keys=None):
        c, off = self._read(buf, 0, 1)
        codes = unpack_bits(buf[off:], 1 + self.L, self.D)
        if codes.size and int((codes & ((1 << self.L) - 1)).max()) > self.s:
            raise WireError(f"qsgd: a level above s = {self.s}")
        one = torch.ones((), dtype=self.dtype)
        sgn = torch.where(torch.from_numpy((codes >> self.L).astype(bool)), -one, one)
        xi = torch.from_numpy(codes & ((1 << self.L) - 1)).to(self.dtype)
        return (c * sgn) * xi


@CODECS.register("terngrad")
class TernGradCodec(Codec):
    """s = max_j |m_j| and a 2-bit code per coordinate: 0 → 0, 1 → +s, 2 → −s."""

    def nbytes(self) -> int:
        return self.vs + packed_len(self.D, 2)

    def encode(self, m, keys=None):
        codes = torch.where(m == 0, 0, torch.where(m < 0, 2, 1)).numpy()
        return np.concatenate([self._values(m.abs().max().reshape(1)), pack_bits(codes, 2)])

    def decode(self, buf, keys=None):
        s, off = self._read(buf, 0, 1)
        codes = torch.from_numpy(unpack_bits(buf[off:], 2, self.D))
        one = torch.ones((), dtype=self.dtype)
        return torch.where(codes == 0, torch.zeros((), dtype=self.dtype), s * torch.where(codes == 2, -one, one))


@CODECS.register("natural")
class NaturalCodec(Codec):
    """Per coordinate the sign bit and IEEE exponent field of m_j = ±2^e (mantissa zero): 9 bits
    in float32 (1 + 8), 12 in float64 (1 + 11). Zeros and ±inf are representable; a subnormal
    power of two (|m_j| < 2^-126 in float32) is not and raises :class:`WireError`."""

    def __init__(self, C, dtype):
        super().__init__(C, dtype)
        self.mant = {4: 23, 8: 52}[self.vs]
        self.width = self.vs * 8 - self.mant  # sign + exponent
        self.uint = {4: np.uint32, 8: np.uint64}[self.vs]

    def nbytes(self) -> int:
        return packed_len(self.D, self.width)

    def encode(self, m, keys=None):
        bits = np.ascontiguousarray(m.cpu().numpy(), dtype=self.np_dtype).view(self.uint)
        if np.any(bits & self.uint((1 << self.mant) - 1)):
            raise WireError("natural: a coordinate is not a (normal) power of two")
        return pack_bits((bits >> self.uint(self.mant)).astype(np.uint64), self.width)

    def decode(self, buf, keys=None):
        hi = unpack_bits(buf, self.width, self.D).astype(np.uint64) << np.uint64(self.mant)
        return torch.from_numpy(hi.astype(self.uint).view(self.np_dtype).astype(self.np_dtype.newbyteorder("=")))


def codec_for(C: Compressor, dtype: torch.dtype) -> Codec:
    """The codec of compressor ``C`` for messages in ``dtype``."""
    return CODECS.get(C.name)(C, dtype)


# ---------------------------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------------------------


def message_nbytes(codec: Codec, stateful: bool) -> int:
    """Bytes of one framed uplink message: header + payload (+ trailer)."""
    return HEADER.itemsize + codec.nbytes() + (TRAILER.itemsize if stateful else 0)


def frame(codec: Codec, t: int, m: Tensor, keys: Tensor | None = None, state_sq: float | None = None) -> np.ndarray:
    """Header (iteration t, flags) + payload of m + the optional trailer ‖state‖², as uint8."""
    head = header(t)
    if bool(torch.isfinite(m).all()):
        payload = codec.encode(m, keys)
        if payload.size != codec.nbytes():  # pragma: no cover - codec bug
            raise WireError(f"{codec.C.name}: encoded {payload.size} bytes, expected {codec.nbytes()}")
    else:
        head["flags"] = FLAG_NONFINITE
        payload = np.zeros(codec.nbytes(), dtype=np.uint8)
    parts = [head.view(np.uint8), payload]
    if state_sq is not None:
        parts.append(np.array([state_sq], dtype=TRAILER).view(np.uint8))
    return np.concatenate(parts)


def header(t: int) -> np.ndarray:
    """The (1,) HEADER record of an uplink message of iteration ``t`` (tagged, no flags)."""
    head = np.zeros(1, dtype=HEADER)
    head["iter"], head["tag"] = t, TAG
    return head


def _head(buf: np.ndarray):
    head = np.frombuffer(np.asarray(buf[: HEADER.itemsize], dtype=np.uint8).tobytes(), dtype=HEADER)
    if head.size != 1 or int(head[0]["tag"]) != TAG or int(head[0]["flags"]) & ~FLAG_NONFINITE:
        raise WireError("an uplink message without a valid header (tag, flags)")
    return head[0]


def message_iter(buf: np.ndarray) -> int:
    """The header iteration of a framed message (``STOP_ITER`` for a device's bye); WireError if
    the header is not valid."""
    return int(_head(buf)["iter"])


def unframe(
    codec: Codec, buf: np.ndarray, keys: Tensor | None = None, stateful: bool = False
) -> tuple[int, Tensor, float | None]:
    """(iteration, m, ‖state‖² or None) of a framed message; m is all NaN when flagged non-finite.
    WireError for a message that is not one (see the module docstring)."""
    if buf.size != message_nbytes(codec, stateful):
        raise WireError(f"an uplink message of {buf.size} bytes, expected {message_nbytes(codec, stateful)}")
    head = _head(buf)
    body = buf[HEADER.itemsize : HEADER.itemsize + codec.nbytes()]
    if int(head["flags"]) & FLAG_NONFINITE:
        m = torch.full((codec.D,), math.nan, dtype=codec.dtype)
    else:
        m = codec.decode(body, keys)
    sq = None
    if stateful:
        sq = float(np.frombuffer(buf[HEADER.itemsize + codec.nbytes() :].tobytes(), dtype=TRAILER)[0])
    return int(head["iter"]), m, sq


class CompressorStandIn:
    """A compressor seen by a Method in the runtime: the wrapped compressor's attributes, but
    :meth:`output` decides the message (subclasses), and the dense message path is forced."""

    def __init__(self, C: Any):
        self.C = C

    def output(self, v: torch.Tensor, rng: Any) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, v: torch.Tensor, rng: Any = None) -> torch.Tensor:
        return self.output(v, rng)

    __call__ = compress

    def sparse(
        self, v: torch.Tensor, rng: Any = None, active: Any = None, add: Any = None, subtract: bool = False
    ) -> None:
        if add is not None:  # the Compressor.sparse contract: v += add, always (subtract: only with a result)
            add.add_to(v)
        return None  # methods take the dense path: the message is the dense output of compress

    def __getattr__(self, name: str) -> Any:
        return getattr(self.C, name)
