"""Compiled CPU kernels (numba): the exact Top-k selection of many rows in one pass per row.

:func:`topk_rows` computes what :func:`cocoef_cli.sim.compressors.topk_indices` defines (the k
largest |x_j| of every row, ties to the lower index, NaN largest) by a sampled threshold: each row is read once, in cache, by a compiled loop (rows in
parallel). ``AVAILABLE`` is False where numba cannot be imported; callers then select over full
rows with torch (exact too, slower).
"""
from __future__ import annotations

import types

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
        for j in range(m):  # everything above the k-th largest (at most k − 1 entries) ...
            if vals[j] > kth or np.isnan(vals[j]):
                out[o] = idx[j]
                o += 1
        for j in range(m):  # ... then the tied entries of lowest position
            if o >= k:
                break
            if vals[j] == kth:
                out[o] = idx[j]
                o += 1

    def _topk_rows(x, k, h, r, cap, active, out):  # pragma: no cover - compiled
        n, D = x.shape
        for i in prange(n):
            if not active[i]:  # a row whose result is not used: any valid indices
                for o in range(k):
                    out[i, o] = o
                continue
            row = x[i]
            ns = (D + h - 1) // h
            sample = np.empty(ns, x.dtype)
            for j in range(ns):
                sample[j] = abs(row[j * h])
            t = np.partition(sample, ns - r)[ns - r]  # the r-th largest sampled magnitude
            count = 0
            if t > 0:  # False for t = 0 (mostly-zero rows) and NaN: full selection below
                cand_idx = np.empty(cap, np.int64)
                cand_val = np.empty(cap, x.dtype)
                for j in range(D):
                    a = abs(row[j])
                    if not a < t:  # |x_j| ≥ t, or NaN
                        if count < cap:
                            cand_idx[count] = j
                            cand_val[count] = a
                        count += 1
                if k <= count <= cap:
                    _select_into(cand_val[:count], cand_idx[:count], k, out[i])
                    continue
            _select_into(np.abs(row), np.arange(D), k, out[i])

    def _named(fn, name):
        """A copy of fn under another name: numba caches compiled code per function name."""
        copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        copy.__qualname__ = name
        return copy

    # rows in parallel (numba threads), and one thread without numba's threading layer (no thread
    # pool beside torch's; the default runs use one thread)
    _topk_rows_parallel = njit(parallel=True, cache=True, nogil=True)(_named(_topk_rows, "_topk_rows_parallel"))
    _topk_rows_serial = njit(cache=True, nogil=True)(_named(_topk_rows, "_topk_rows_serial"))


def topk_rows(x: np.ndarray, k: int, h: int, r: int, cap: int, threads: int,
              active: np.ndarray | None = None) -> np.ndarray:
    """Indices (n, k) of the k largest |x_j| of every row of the C-contiguous float array x (n, D).

    The threshold t of a row is the r-th largest of its strided sample x[::h]; the candidates
    |x_j| ≥ t (in index order) are selected exactly; a row with t = 0 or NaN, fewer than k or more
    than ``cap`` candidates is selected over the full row. ``threads``: numba threads to use.
    ``active`` (n,) bool: rows marked False are skipped (their indices are 0..k−1).
    """
    out = np.empty((x.shape[0], k), dtype=np.int64)
    act = np.ones(x.shape[0], dtype=np.bool_) if active is None else np.ascontiguousarray(active, dtype=np.bool_)
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS, x.shape[0]))
    if threads == 1:
        _topk_rows_serial(x, k, h, r, cap, act, out)
    else:
        numba.set_num_threads(threads)
        _topk_rows_parallel(x, k, h, r, cap, act, out)
    return out
