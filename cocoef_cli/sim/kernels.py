"""Compiled CPU kernel (C): the exact Top-k selection of many rows, one pass per row.

:func:`topk_rows` computes what :func:`cocoef_cli.sim.compressors.topk_indices` defines (the k
largest |x_j| of every row, ties to the lower index, NaN largest) by a sampled threshold; each
row is read once, in cache, by a compiled loop (``topk_rows.c``; ranges of rows in parallel on
torch's own OpenMP threads, ctypes releasing the GIL). It can first add to each row a sparse combination of
the rows of another matrix, x_i += Σ_j B_ij g_j (the encoding of gradient coding, fused so that
error feedback reads and writes its memory once).

The C file is compiled on the first selection of a process that needs it, with the machine's C
compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), for this CPU (``-march=native``) with
OpenMP (``-fopenmp``), each dropped when the compiler refuses it, and with ``-ffp-contract=off``
(no fused multiply-add: the same IEEE operations in the same order on every CPU), and kept in the cache folder (:func:`cocoef_cli.data.cache_dir`)
under a key of the source, the flags and the CPU, so later processes only load it (≈ 1 ms).
:func:`library` is None where no compiler builds it; callers then select over full rows with
torch (exact too, slower), and a one-line note on stderr says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch  # loaded first: the kernel's libgomp.so.1 is then torch's own (one OpenMP pool)

from cocoef_cli.data import cache_dir

SOURCE = Path(__file__).with_name("topk_rows.c")
#: -O3 vectorises the loops; -ffp-contract=off keeps a·b + c two roundings (never an FMA)
FLAGS = ("-O3", "-std=c99", "-ffp-contract=off", "-fPIC", "-shared")
NATIVE = "-march=native"
OPENMP = "-fopenmp"

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_PTR, *[_I64] * 6, *[_PTR] * 8, _I64, _I64, _I64, _PTR, _PTR]
_FUSED_ARGTYPES = [_PTR, *[_I64] * 6, *[_PTR] * 6, _I64, *[_PTR] * 5, _I64, _I64, _I64, _PTR, _PTR]
_ROWS_ARGTYPES = [_I64, _I64, _I64, _I64, *[_PTR] * 5, _I64, _PTR]
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_NUMPY: dict[torch.dtype, np.dtype] = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}

_LIBRARY: ctypes.CDLL | None = None
_BUILD = ""  # how the loaded library was built (flags and compiler), for describe()
_TRIED = False
_LOCK = threading.Lock()


def compiler() -> list[str] | None:
    """The C compiler command to build with: ``$CC`` split as a shell would (``ccache gcc``;
    empty: none), else the first of cc, gcc, clang on PATH."""
    env = os.environ.get("CC")
    if env is not None:
        words = shlex.split(env)
        found = shutil.which(words[0]) if words else None
        return [found, *words[1:]] if found else None
    cc = next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
    return [cc] if cc else None


def cpu_key() -> str:
    """What a build depends on beyond its source and flags: the OS, the architecture and (Linux)
    the CPU's model and feature flags, so a cache folder shared by different machines holds the
    builds of each CPU kind apart."""
    parts = [sys.platform, platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def builds() -> list[tuple[tuple[str, ...], str]]:
    """The builds to try, best first: (flags, cache key); the key is the sha256 of the source,
    the flags and :func:`cpu_key`."""
    source, cpu = SOURCE.read_bytes(), cpu_key().encode()
    out: list[tuple[tuple[str, ...], str]] = []
    for flags in ((*FLAGS, NATIVE, OPENMP), (*FLAGS, OPENMP), (*FLAGS, NATIVE), FLAGS):
        out.append((flags, hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cpu])).hexdigest()[:16]))
    return out


def _compile(cc: list[str], flags: tuple[str, ...], out: Path) -> tuple[str, bool]:
    """Build SOURCE into ``out``: ("", _) on success, else (the compiler's last line of complaint,
    whether the compiler refused the build; False for a compiler that could not run or timed out)."""
    try:
        done = subprocess.run([*cc, *flags, "-o", str(out), str(SOURCE)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cc[0]}: {e}", False
    if done.returncode == 0 and out.exists():
        return "", False
    return f"{cc[0]}: " + (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1], True


def _load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its functions typed (OSError / AttributeError: not loadable)."""
    lib = ctypes.CDLL(str(path))
    for suffix in _SUFFIX.values():
        fn = getattr(lib, f"topk_rows_{suffix}")
        fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
        rth = getattr(lib, f"rth_largest_strided_{suffix}")
        rth.argtypes = [_PTR, _I64, _I64, _I64, _PTR]
        rth.restype = ctypes.c_float if suffix == "f32" else ctypes.c_double
        if hasattr(lib, f"topk_rows_fused_{suffix}"):  # older sources (benchmarks compare them) lack these
            fused = getattr(lib, f"topk_rows_fused_{suffix}")
            fused.argtypes, fused.restype = _FUSED_ARGTYPES, ctypes.c_int
            rows = getattr(lib, f"partition_rows_{suffix}")
            rows.argtypes, rows.restype = _ROWS_ARGTYPES, None
            getattr(lib, f"fused_form_{suffix}").restype = ctypes.c_int
    return lib


def _trusted(path: Path) -> bool:
    """Machine code is loaded from the cache folder only if this user owns the file and its
    folder and nobody else can write them (a planted file would run in every run)."""
    try:
        f, d = path.stat(), path.parent.stat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return True
    return f.st_uid == d.st_uid == os.getuid() and not f.st_mode & 0o022 and not d.st_mode & 0o002


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where no build works (a note on stderr says why, once).

    The builds of :func:`builds` are tried best first: one already in the cache folder is loaded
    (when :func:`_trusted`); else it is compiled, loaded, and copied into the folder for later
    processes; a build the compiler refuses leaves ``<key>.failed`` (its message) so that later
    processes go straight to the next one (remove the folder's ``topk_rows-*`` files to retry)."""
    global _LIBRARY, _BUILD, _TRIED
    with _LOCK:
        if _TRIED:
            return _LIBRARY
        folder, cc, failure = cache_dir(), compiler(), "no C compiler found; set CC"
        with tempfile.TemporaryDirectory(prefix="cocoef-kernel-") as tmp:
            for flags, key in builds():
                cached = folder / f"topk_rows-{key}.so" if folder is not None else None
                if cached is not None and cached.with_suffix(".failed").exists():
                    failure = cached.with_suffix(".failed").read_text(errors="replace").strip() or failure
                    continue
                if cached is not None and _trusted(cached):
                    try:
                        _LIBRARY, _BUILD = _load(cached), _describe(flags, _recorded(cached.with_suffix(".cc")))
                        break
                    except (OSError, AttributeError):  # damaged or foreign: built again below
                        pass
                if cc is None:
                    continue
                built = Path(tmp) / f"topk_rows-{key}.so"  # a fresh name: never a stale handle of dlopen
                failure, refused = _compile(cc, flags, built)
                if not failure:
                    try:
                        _LIBRARY = _load(built)  # before the temporary folder goes
                    except (OSError, AttributeError) as e:
                        failure, refused = f"{cc[0]}: built with {' '.join(flags)} but not loadable: {e}", True
                version = _version(cc) if _LIBRARY is not None else ""
                if cached is not None and (_LIBRARY is not None or refused):
                    _store(cached, built if _LIBRARY is not None else None, failure, version)
                if _LIBRARY is not None:
                    _BUILD = _describe(flags, version)
                    break
        _TRIED = True
        if _LIBRARY is None:
            _unavailable(failure)
        return _LIBRARY


def _store(cached: Path, built: Path | None, failure: str, version: str) -> None:
    """Keep a build (atomically: a concurrent process loads the old file or the whole new one,
    mode 0755) with the compiler's version beside it, or the failure's message; an unwritable
    folder only costs the build."""
    staged = cached.parent / f".{cached.name}.{os.getpid()}.tmp"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        if built is None:
            cached.with_suffix(".failed").write_text(failure + "\n")
            return
        cached.with_suffix(".cc").write_text(version + "\n")
        shutil.copyfile(built, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, cached)
    except OSError:
        with contextlib.suppress(OSError):
            staged.unlink()


def _version(cc: list[str]) -> str:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return " ".join(cc)


def _recorded(note: Path) -> str:
    """The compiler version kept beside a cached build."""
    try:
        return note.read_text().strip() or "compiler not recorded"
    except OSError:
        return "compiler not recorded"


def _describe(flags: tuple[str, ...], version: str) -> str:
    return f"{version}, {' '.join(f for f in flags if f not in ('-fPIC', '-shared'))}"


def describe() -> str:
    """The loaded kernel's build, in words: the compiler that built it and the flags, or that
    there is none."""
    return _BUILD if library() is not None else "not built (Top-k selects with torch)"


def _unavailable(why: str) -> None:
    """The one-line note on stderr that Top-k falls back to torch, and why."""
    print(
        f"cocoef: the compiled Top-k kernel is not available ({why}); Top-k selects over full rows with torch (exact, slower)",
        file=sys.stderr,
    )


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class Terms:
    """G's rows as the products and sums that form them, for :func:`topk_rows` to form each
    where it is added (``add=(adds, crow, col, val, Terms)``; G is then never stored): block b of
    partition j's row is L_b[j] (C_b, B) @ X_b[j] (B, F_b), flattened, for a product, or
    Σ_k L_b[j, k] (F_b entries) for a sum (X_b None), each entry summed as
    fma(l_0, x_0, +0), then fma(l_k, x_k, ·) for k ≥ 1 (a sum: +0 + l_0, then left to right). ``blocks``: (L_b, X_b) as
    :class:`~cocoef_cli.nets.PartitionTerms` holds them ((rows, C_b, B) with X_b (rows, B, F_b), or
    (rows, B, F_b) with None); they are made contiguous here and kept alive while this lives."""

    @staticmethod
    def samples(blocks: list[tuple[torch.Tensor, torch.Tensor | None]]) -> int:
        """B, the samples a partition, as the first block says (L's last axis for a product, its
        second for a sum)."""
        L, X = blocks[0]
        return L.shape[-1] if X is not None or L.dim() != 3 else L.shape[1]

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor | None]]):
        self._keep = [(L.contiguous(), None if X is None else X.contiguous()) for L, X in blocks]
        first = self._keep[0][0]
        self.dtype, self.rows, self.B = first.dtype, first.shape[0], self.samples(blocks)
        shapes = []  # (kind, C_b, F_b): 0 a product, 1 a sum
        for L, X in self._keep:
            if L.dim() != 3 or L.shape[0] != self.rows or L.dtype != self.dtype or L.device.type != "cpu":
                raise ValueError(f"terms must be CPU (rows={self.rows}, ·, ·) tensors in {self.dtype}")
            if X is None:
                shapes.append((1, 1, L.shape[2]))
                ok = L.shape[1] == self.B
            else:
                ok = X.dim() == 3 and X.shape[:2] == (self.rows, self.B) and L.shape[2] == self.B
                ok = ok and X.dtype == self.dtype and X.device.type == "cpu"
                shapes.append((0, L.shape[1], X.shape[-1]))
            if not ok or self.B < 1:
                raise ValueError(f"terms of {self.B} samples a partition do not match: {tuple(L.shape)}")
        self.kinds, self.cs, self.fs = (np.array(a, dtype=np.int64) for a in zip(*shapes))
        self.widths = self.cs * self.fs
        self.lptr = np.array([L.data_ptr() for L, _ in self._keep], dtype=np.int64)
        self.xptr = np.array([0 if X is None else X.data_ptr() for _, X in self._keep], dtype=np.int64)

    def _args(self) -> tuple:
        return (self.kinds.shape[0], _ptr(self.kinds), _ptr(self.cs), _ptr(self.fs), _ptr(self.lptr), _ptr(self.xptr))

    def rows_of(self, first: int, stop: int) -> np.ndarray:
        """G's rows [first, stop) as the kernel forms them, (stop − first, D), blocks side by side."""
        lib = library()
        assert lib is not None and fused(), "the compiled kernel cannot form G's rows here"
        if not 0 <= first <= stop <= self.rows:
            raise ValueError(f"rows [{first}, {stop}) are not within the terms' {self.rows} rows")
        out = np.empty((stop - first, int(self.widths.sum())), dtype=_NUMPY[self.dtype])
        fn = getattr(lib, f"partition_rows_{_SUFFIX[out.dtype]}")
        n, *ptrs = self._args()
        fn(first, stop, out.shape[1], n, *ptrs, self.B, _ptr(out))
        return out


def fused() -> bool:
    """Whether the loaded kernel can form G's rows itself at speed (:class:`Terms`): it has the
    function and a hardware FMA (else every fma is a library call)."""
    lib = library()
    return lib is not None and hasattr(lib, "topk_rows_fused_f32") and bool(lib.fused_form_f32())


def rth_largest_strided(row: np.ndarray, h: int, r: int) -> float:
    """The r-th largest of |row[::h]| (NaN as the largest; −1 when the sample has fewer than r
    entries): the threshold of :func:`topk_rows`, by radix selection over a copy of the sample."""
    lib = library()
    assert lib is not None, "the compiled kernel is not available"
    row = np.ascontiguousarray(row)
    sample = np.empty(-(-row.shape[0] // h), row.dtype)
    return getattr(lib, f"rth_largest_strided_{_SUFFIX[row.dtype]}")(_ptr(row), row.shape[0], h, r, _ptr(sample))


def topk_rows(
    x: np.ndarray,
    k: int,
    h: int,
    r: int,
    cap: int,
    threads: int,
    active: np.ndarray | None = None,
    add: tuple | None = None,
    subtract: bool = False,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) of the k largest |x_j| of every row of the C-contiguous float array x (n, D),
    and the values x_ij there (after the addition below).

    The threshold t of a row is the r-th largest of its strided sample x[::h]; the candidates
    |x_j| ≥ t (in index order) are selected exactly; a row with t ≤ 0 (t = −1 when the sample has
    fewer than r entries; t = +inf when r sampled entries are NaN), fewer than k or more than
    ``cap`` candidates is selected over the full row. ``threads``: how many ranges of rows run at
    once (one without OpenMP). ``active`` (n,) bool: rows marked False are not selected (their indices are 0..k−1).
    ``add`` = (adds, crow, col, val, g, gstart, gwidth): first, every row with ``adds[i]`` (bool)
    gets x_i += u_i in place, u_i = Σ_{e = crow[i]}^{crow[i+1]−1} val[e]·G[col[e]] (summed in entry
    order, then added), where G (rows, D) is stored as column blocks: block b is the C-contiguous
    (rows, gwidth[b]) array at g[gstart[b]:] (g flat, x's dtype; the blocks' widths sum to D).
    ``subtract``: last, every active row gets x_ij += −x_ij at its k positions (error feedback's
    e ← v − m with m = v there, as that sum), while the row is in cache; the values returned are
    those before. ``out``: the (n, k) arrays to return them in (int64 and x's dtype, C-contiguous).
    """
    lib = library()
    assert lib is not None, "the compiled kernel is not available"
    if x.dtype not in _SUFFIX or not x.flags.c_contiguous or not x.flags.writeable or x.ndim != 2:
        raise ValueError(f"x must be a writable C-contiguous 2-D float32/float64 array; got {x.dtype} {x.shape}")
    n, D = x.shape
    if not (1 <= k <= D and h >= 1 and r >= 1 and cap >= k):
        raise ValueError(f"need 1 ≤ k ≤ D, h ≥ 1, r ≥ 1, cap ≥ k; got k={k}, D={D}, h={h}, r={r}, cap={cap}")
    if out is None:
        out = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=x.dtype)
    elif any(a.shape != (n, k) or not a.flags.c_contiguous or not a.flags.writeable for a in out) or (
        out[0].dtype != np.int64 or out[1].dtype != x.dtype
    ):
        raise ValueError(f"out must be writable C-contiguous ({n}, {k}) int64 and {x.dtype} arrays")
    positions, picked = out
    act = np.ones(n, dtype=np.bool_) if active is None else np.ascontiguousarray(active, dtype=np.bool_)
    if add is not None and isinstance(add[-1], Terms):
        return _topk_rows_fused(x, k, h, r, cap, threads, act, add, subtract, positions, picked)
    if add is None:
        adds, crow = np.zeros(n, np.bool_), np.zeros(n + 1, np.int64)
        col, gstart, gwidth = (np.zeros(0, np.int64),) * 3
        val = g = np.zeros(0, x.dtype)
    else:
        adds = np.ascontiguousarray(add[0], np.bool_)
        crow, col, gstart, gwidth = (np.ascontiguousarray(a, np.int64) for a in (add[1], add[2], add[5], add[6]))
        val, g = (np.ascontiguousarray(a, x.dtype) for a in (add[3], add[4]))
    if act.shape != (n,) or adds.shape != (n,) or crow.shape != (n + 1,) or gstart.shape != gwidth.shape:
        raise ValueError("active, adds, crow or the block arrays do not match x's rows")
    fn = getattr(lib, f"topk_rows_{_SUFFIX[x.dtype]}")
    head = (_ptr(x), n, D, k, h, r, cap, _ptr(act), _ptr(adds), _ptr(crow), _ptr(col), _ptr(val), _ptr(g))
    tail = (gstart.shape[0], int(subtract), max(1, min(threads, n)), _ptr(positions), _ptr(picked))
    if fn(*head, _ptr(gstart), _ptr(gwidth), *tail):
        raise MemoryError("the Top-k kernel could not allocate its scratch memory")
    return positions, picked


def _topk_rows_fused(x, k, h, r, cap, threads, act, add, subtract, positions, picked):
    """:func:`topk_rows` with ``add=(adds, crow, col, val, Terms)``: G's rows formed in the kernel."""
    lib = library()
    assert lib is not None
    n, D = x.shape
    terms: Terms = add[4]
    adds = np.ascontiguousarray(add[0], np.bool_)
    crow, col = (np.ascontiguousarray(a, np.int64) for a in (add[1], add[2]))
    val = np.ascontiguousarray(add[3], x.dtype)
    if (
        act.shape != (n,)
        or adds.shape != (n,)
        or crow.shape != (n + 1,)
        or val.shape != col.shape
        or (n > 0 and (crow[0] != 0 or crow[-1] != col.size))
        or int(terms.widths.sum()) != D
        or (col.size > 0 and (col.min() < 0 or col.max() >= terms.rows))
    ):
        raise ValueError("active, adds, crow, col, val or the terms do not match x's rows")
    if _NUMPY.get(terms.dtype) != x.dtype:
        raise ValueError(f"the terms must be in x's dtype {x.dtype}; got {terms.dtype}")
    fn = getattr(lib, f"topk_rows_fused_{_SUFFIX[x.dtype]}")
    head = (_ptr(x), n, D, k, h, r, cap, _ptr(act), _ptr(adds), _ptr(crow), _ptr(col), _ptr(val))
    nb, *ptrs = terms._args()
    tail = (terms.B, int(subtract), max(1, min(threads, n)), _ptr(positions), _ptr(picked))
    if fn(*head, _ptr(terms.widths), nb, *ptrs, *tail):
        raise MemoryError("the Top-k kernel could not allocate its scratch memory")
    return positions, picked
