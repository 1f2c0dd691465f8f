"""Compiled CPU kernels (numba): the exact Top-k selection of many rows, one pass per row.

:func:`topk_rows` computes what :func:`cocoef_cli.sim.compressors.topk_indices` defines (the k
largest |x_j| of every row, ties to the lower index, NaN largest) by a sampled threshold; each
row is read once, in cache, by a compiled loop (rows in parallel). It can first add to each row
a sparse combination of the rows of another matrix, x_i += Σ_j B_ij g_j (the encoding of gradient
coding, fused so that error feedback reads and writes its memory once). ``AVAILABLE`` is False
where numba cannot be imported; callers then select over full rows with torch (exact too, slower).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

try:
    import numba
    from numba import njit, prange

    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the torch path usable
    AVAILABLE = False


if AVAILABLE:

    @njit(cache=True, nogil=True)
    def _select_into(vals, idx, k, out):  # pragma: no cover - compiled
        """out[:k] = idx of the k largest vals (NaN largest), ties to the earliest position."""
        m = vals.shape[0]
        kth = np.partition(vals.copy(), m - k)[m - k]  # the k-th largest (NaN sorts last = largest)
        o = 0
        if np.isnan(kth):  # at least k NaN: the first k of them
            for j in range(m):
                if o < k and np.isnan(vals[j]):
                    out[o] = idx[j]
                    o += 1
            return
        _take_from(vals, idx, kth, k, out)

    @njit(cache=True, nogil=True)
    def _take_from(vals, idx, kth, k, out):  # pragma: no cover - compiled
        """out[:k] = idx of every vals[j] > kth (at most k − 1 of them, NaN included), then of the
        vals[j] == kth of lowest position."""
        o = 0
        for j in range(vals.shape[0]):  # without branches: at most k − 1 entries pass
            out[min(o, k - 1)] = idx[j]
            o += (vals[j] > kth) | np.isnan(vals[j])
        for j in range(vals.shape[0]):
            if o >= k:
                break
            if vals[j] == kth:
                out[o] = idx[j]
                o += 1

    @njit(cache=True, nogil=True)
    def _kth_largest(a, k):  # pragma: no cover - compiled
        """The k-th largest entry of ``a`` (no NaN), by quickselect (median-of-three pivots,
        Hoare partition); ``a`` is reordered."""
        lo, hi, target = 0, a.shape[0] - 1, k - 1
        while lo < hi:
            x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
            if x < y:
                x, y = y, x
            if y < z:
                y = x if x < z else z
            i, j = lo, hi
            while i <= j:  # descending: a[lo:i] ≥ pivot ≥ a[j+1:hi+1]
                while a[i] > y:
                    i += 1
                while a[j] < y:
                    j -= 1
                if i <= j:
                    a[i], a[j] = a[j], a[i]
                    i += 1
                    j -= 1
            if target <= j:
                hi = j
            elif target >= i:
                lo = i
            else:
                return a[target]
        return a[target]

    @njit(cache=True, nogil=True)
    def _rth_largest_strided(row, h, r):  # pragma: no cover - compiled
        """The r-th largest of |row[::h]| (NaN as the largest; −1 when the sample has fewer than r
        entries), kept in an ascending buffer of r values: one compare per sampled entry, an
        insertion only for the few that enter the running top r (no selection pass over a copy).
        Only a threshold: the selection that uses it is exact whatever it is."""
        top = np.full(r, -1.0, row.dtype)  # top[0]: the smallest of the r largest so far
        for j in range(0, row.shape[0], h):
            a = abs(row[j])
            if a != a:
                a = np.inf
            if a > top[0]:
                q = 1
                while q < r and top[q] < a:
                    top[q - 1] = top[q]
                    q += 1
                top[q - 1] = a
        return top[0]

    def _topk_rows(x, k, h, r, cap, active, adds, crow, col, val, g, gstart, gwidth, out, picked):  # pragma: no cover
        n, D = x.shape
        nw = (D + 7) // 8
        widest = gwidth.max() if gwidth.shape[0] else 0
        for i in prange(n):
            row = x[i]
            lo, hi = crow[i], crow[i + 1]
            if adds[i] and hi > lo:  # x_i += u_i, u_i = Σ_j B_ij g_j summed first (as a device does)
                u = np.empty(widest, x.dtype)
                off = 0
                for b in range(gstart.shape[0]):  # block by block of columns
                    w = gwidth[b]
                    dst, acc = row[off : off + w], u[:w]
                    src = g[gstart[b] + col[lo] * w : gstart[b] + (col[lo] + 1) * w]
                    c = val[lo]
                    for q in range(acc.shape[0]):  # bounds the compiler can see: vectorised
                        acc[q] = c * src[q]
                    for nz in range(lo + 1, hi):
                        src = g[gstart[b] + col[nz] * w : gstart[b] + (col[nz] + 1) * w]
                        c = val[nz]
                        for q in range(acc.shape[0]):
                            acc[q] += c * src[q]
                    for q in range(dst.shape[0]):
                        dst[q] += acc[q]
                    off += w
            if not active[i]:  # a row whose selection is not used: any valid indices
                for o in range(k):
                    out[i, o] = o
                    picked[i, o] = row[o]
                continue
            t = _rth_largest_strided(row, h, r)  # the r-th largest sampled magnitude
            if t > 0:  # False for t ≤ 0 (mostly-zero rows; −1: a sample shorter than r): full selection below
                # candidates |x_j| ≥ t (or NaN), in index order: a byte mask (vectorised), then
                # the nonzero 8-byte words, each appended without branches
                mask = np.zeros(nw * 8, np.uint8)
                for j in range(D):
                    mask[j] = not abs(row[j]) < t
                words = mask.view(np.uint64)
                cand_idx = np.empty(cap + 8, np.int64)
                count = 0
                for w in range(nw):
                    if words[w] != 0:
                        p = min(count, cap)
                        for q in range(8):
                            cand_idx[p] = w * 8 + q
                            p += mask[w * 8 + q]
                        count += p - min(count, cap)
                if k <= count <= cap:
                    cand_val = np.empty(count, x.dtype)
                    scratch = np.empty(count, x.dtype)
                    nan = False
                    for c in range(count):
                        a = abs(row[cand_idx[c]])
                        cand_val[c] = a
                        scratch[c] = a
                        nan |= a != a
                    if nan:
                        _select_into(cand_val, cand_idx[:count], k, out[i])
                    else:
                        _take_from(cand_val, cand_idx[:count], _kth_largest(scratch, k), k, out[i])
                else:
                    _select_into(np.abs(row), np.arange(D), k, out[i])
            else:
                _select_into(np.abs(row), np.arange(D), k, out[i])
            for o in range(k):
                picked[i, o] = row[out[i, o]]

    def _named(fn, name):
        """A copy of fn under another name: numba caches compiled code per function name."""
        copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        copy.__qualname__ = name
        return copy

    # rows in parallel (numba threads), and one thread without numba's threading layer (no thread
    # pool beside torch's; the default runs use one thread)
    _topk_rows_parallel = njit(parallel=True, cache=True, nogil=True)(_named(_topk_rows, "_topk_rows_parallel"))
    _topk_rows_serial = njit(cache=True, nogil=True)(_named(_topk_rows, "_topk_rows_serial"))


_TARGET_READY = False  # numba's CPU target initialised (on the first call of a compiled function)


@contextmanager
def _target_without_scipy_linalg() -> Iterator[None]:
    """numba initialises its CPU target on the first call of any compiled function, and that
    imports ``scipy.linalg`` (≈ 0.25 s with what it pulls in) only to learn whether ``np.dot``
    inside compiled code may call BLAS; these kernels never do. During that first call
    ``scipy.linalg`` is hidden (unless something imported it already), so numba records "no BLAS"
    (its compiled ``np.dot`` of vectors then loops, matrix products import scipy when compiled)."""
    global _TARGET_READY
    hide = not _TARGET_READY and "scipy.linalg" not in sys.modules
    if hide:
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import → ImportError
    try:
        yield
    finally:
        _TARGET_READY = True
        if hide and sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]


def topk_rows(
    x: np.ndarray,
    k: int,
    h: int,
    r: int,
    cap: int,
    threads: int,
    active: np.ndarray | None = None,
    add: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) of the k largest |x_j| of every row of the C-contiguous float array x (n, D),
    and the values x_ij there (after the addition below).

    The threshold t of a row is the r-th largest of its strided sample x[::h]; the candidates
    |x_j| ≥ t (in index order) are selected exactly; a row with t ≤ 0 (t = −1 when the sample has
    fewer than r entries; t = +inf when r sampled entries are NaN), fewer than k or more than
    ``cap`` candidates is selected over the full row. ``threads``: numba threads to use.
    ``active`` (n,) bool: rows marked False are not selected (their indices are 0..k−1).
    ``add`` = (adds, crow, col, val, g, gstart, gwidth): first, every row with ``adds[i]`` (bool)
    gets x_i += u_i in place, u_i = Σ_{e = crow[i]}^{crow[i+1]−1} val[e]·G[col[e]] (summed in entry
    order, then added), where G (rows, D) is stored
    as column blocks: block b is the C-contiguous (rows, gwidth[b]) array at g[gstart[b]:] (g flat,
    x's dtype; the blocks' widths sum to D).
    """
    n = x.shape[0]
    out, picked = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=x.dtype)
    act = np.ones(n, dtype=np.bool_) if active is None else np.ascontiguousarray(active, dtype=np.bool_)
    if add is None:
        none = np.zeros(0, dtype=np.int64)
        add = (
            np.zeros(n, dtype=np.bool_),
            np.zeros(n + 1, dtype=np.int64),
            none,
            np.zeros(0, x.dtype),
            np.zeros(0, x.dtype),
            none,
            none,
        )
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS, n))  # type: ignore[attr-defined]  # set at import
    with _target_without_scipy_linalg():
        if threads == 1:
            _topk_rows_serial(x, k, h, r, cap, act, *add, out, picked)
        else:
            numba.set_num_threads(threads)
            _topk_rows_parallel(x, k, h, r, cap, act, *add, out, picked)
    return out, picked
