"""Compressors (docs/design.md §4): reconstructions, conventions, unbiasedness, ω, bits, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cocoef_cli.errors import ConfigError
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim import compressors
from cocoef_cli.sim.codes import CodedSum, allocate, build_code
from cocoef_cli.sim.compressors import COMPRESSORS, SAMPLE_HITS, Compressor, build_compressor, topk_indices, topk_mask

ALL = [
    "identity",
    "topk",
    "randk",
    "randk_unbiased",
    "sign",
    "scaled_sign",
    "grouped_sign",
    "qsgd",
    "onebit",
    "terngrad",
    "natural",
]
UNBIASED = ["randk_unbiased", "qsgd", "onebit", "terngrad", "natural"]  # terngrad with clip=None
F64 = torch.float64


def make(name: str, D: int, **kw) -> Compressor:
    return build_compressor({"name": name, **kw}, D)


def rng(*seeds: int) -> SeedRNG:
    return SeedRNG(list(seeds), "compressor")


def row(*xs: float, dtype=F64) -> torch.Tensor:
    """One message as shape (R=1, M=1, D)."""
    return torch.tensor(xs, dtype=dtype).reshape(1, 1, -1)


# --------------------------------------------------------------------------------------------- registry


def test_registry_has_exactly_the_design_names_with_descriptions():
    assert COMPRESSORS.names() == ALL
    for name, line in COMPRESSORS.describe():
        assert line and "\n" not in line, name
        cls = COMPRESSORS.get(name)
        assert isinstance(cls.unbiased, bool)
    for name in ALL:
        c = make(name, 10, k=3)
        assert (c.omega() is None) == (not c.unbiased), name
        assert c.D == 10 and c.value_bits == 32


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R,M,D", [(1, 1, 1), (2, 3, 5), (3, 4, 64), (1, 2, 130)])
def test_shape_dtype_preserved_and_input_untouched(name, dtype, R, M, D):
    c = make(name, D, ratio=0.3, group=16)
    v = torch.randn(R, M, D, dtype=dtype, generator=torch.Generator().manual_seed(R * 100 + D))
    v0 = v.clone()
    out = c.compress(v, rng(*range(R)))
    assert out.shape == v.shape and out.dtype == dtype
    assert torch.equal(v, v0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_zero_vector_maps_to_zero_except_sign(name):
    c = make(name, 6, k=2)
    out = c.compress(torch.zeros(2, 3, 6, dtype=F64), rng(0, 1))
    if name == "sign":
        assert torch.equal(out, torch.ones_like(out))  # sign(0) = +1
    else:
        assert torch.equal(out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------- topk


@settings(max_examples=150, deadline=None)
@given(
    xs=st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=40),
    data=st.data(),
)
def test_topk_contraction_and_exactly_k_kept(xs, data):
    D = len(xs)
    k = data.draw(st.integers(1, D))
    x = row(*xs)
    c = make("topk", D, k=k)
    out = c.compress(x, None)
    err = ((out - x) ** 2).sum().item()
    assert err <= (1 - k / D) * (x**2).sum().item() + 1e-9
    mask = topk_mask(x, k)
    assert mask.sum().item() == k
    # kept values are the input values, the rest zero
    assert torch.equal(out, torch.where(mask, x, torch.zeros_like(x)))
    # every kept magnitude is >= every dropped magnitude
    if k < D:
        assert x.abs()[mask].min() >= x.abs()[~mask].max()


def test_topk_contraction_many_random_rows_with_ties():
    g = torch.Generator().manual_seed(0)
    D = 37
    x = torch.randint(-4, 5, (3, 500, D), generator=g).to(F64)  # many ties and zeros
    for k in (1, 5, 18, 36, 37):
        out = make("topk", D, k=k).compress(x, None)
        err = ((out - x) ** 2).sum(-1)
        assert (err <= (1 - k / D) * (x**2).sum(-1) + 1e-12).all()
        assert (topk_mask(x, k).sum(-1) == k).all()


def test_topk_tie_break_lower_index():
    x = row(1, 3, 3, 3, 2)
    out = make("topk", 5, k=2).compress(x, None)
    assert out.flatten().tolist() == [0, 3, 3, 0, 0]
    assert topk_mask(x, 2).flatten().tolist() == [False, True, True, False, False]
    # negative ties count by magnitude; lower index wins
    out = make("topk", 5, k=3).compress(row(-2, 5, 2, -2, 1), None)
    assert out.flatten().tolist() == [-2, 5, 2, 0, 0]


def test_topk_exactly_k_with_zeros_and_ties():
    x = row(0, 0, 7, 0, 0, 0)
    mask = topk_mask(x, 3)
    assert mask.flatten().tolist() == [True, True, True, False, False, False]
    out = make("topk", 6, k=3).compress(x, None)
    assert out.flatten().tolist() == [0, 0, 7, 0, 0, 0]
    x = torch.ones(2, 4, 9, dtype=torch.float32)
    out = make("topk", 9, k=4).compress(x, None)
    assert (out != 0).sum(-1).eq(4).all()
    assert torch.equal(out[..., :4], torch.ones(2, 4, 4)) and not out[..., 4:].any()


def _topk_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest |x_j| per row, ties to the lower index, by a stable full sort."""
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(-1).values


def _threshold_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    R, M, D = 2, 9, 6000
    gauss = torch.randn(R, M, D, generator=g) * torch.rand(R, M, 1, generator=g)  # rows of different scale
    ties = torch.randint(-3, 4, (R, M, D), generator=g).float()  # huge ties at the threshold
    zeros = torch.zeros(R, M, D)
    zeros[0, 1, 5] = 3.0  # all-zero rows and a single nonzero: the sampled threshold is 0
    periodic = 1e-3 * torch.rand(R, M, D, generator=g)  # the large entries sit exactly on the sample grid
    periodic[..., :: 200 // SAMPLE_HITS] += 1.0
    skewed = torch.rand(R, M, D, generator=g)
    skewed[..., D // 2 :] += 10.0  # every large entry in one half of the row
    sparse = gauss * (torch.rand(R, M, D, generator=g) < 0.5)  # half ±0, as pixels no image lights give
    sparse[1, :4] *= torch.rand(4, D, generator=g) < 0.02  # about as many non-zero samples as the threshold's rank
    return [
        ("gauss", gauss),
        ("ties", ties),
        ("zeros", zeros),
        ("periodic", periodic),
        ("skewed", skewed),
        ("sparse", sparse),
    ]


THRESHOLD_PATHS = ["torch", "kernel"] if compressors.USE_KERNELS and compressors._kernels() else ["torch"]


@pytest.fixture(params=THRESHOLD_PATHS)
def threshold_path(request, monkeypatch):
    """Select with the compiled per-row kernel, or over full rows with torch (its fallback)."""
    monkeypatch.setattr(compressors, "USE_KERNELS", request.param == "kernel")
    return request.param


@pytest.mark.parametrize("case", [c for c, _ in _threshold_cases()])
@pytest.mark.parametrize("k", [16, 200, 700])
def test_topk_threshold_path_is_exact(case, k, threshold_path):
    """The sampled-threshold selection (CPU, k ≥ 2·SAMPLE_HITS, D ≥ 8k) equals a full stable sort,
    including rows where the threshold fails and the row falls back to a full selection."""
    x = dict(_threshold_cases())[case]
    if k * 8 > x.shape[-1]:
        x = x[..., : max(k, x.shape[-1] // 4)]  # D < 8k: the direct path, same answer
    got = topk_indices(x, k)
    assert got.shape == (*x.shape[:-1], k)
    assert torch.equal(got.sort(-1).values, _topk_reference(x, k))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("threads", [1, 2])
def test_topk_kernel_and_torch_paths_agree(dtype, threads, monkeypatch):
    """Both implementations of the threshold path give the same sets, in float32 and float64,
    with one thread (serial kernel) and two (rows in parallel)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 40, 9000, generator=g) * torch.rand(3, 40, 1, generator=g)).to(dtype)
    x[0, 3] = 0.0
    x[1, :, ::50] = 4.0  # ties at the top
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = {}
        for path in THRESHOLD_PATHS:
            monkeypatch.setattr(compressors, "USE_KERNELS", path == "kernel")
            got[path] = topk_indices(x, 90).sort(-1).values
    finally:
        torch.set_num_threads(before)
    ref = _topk_reference(x, 90)
    for path in THRESHOLD_PATHS:
        assert torch.equal(got[path], ref)
    # rows marked inactive (stragglers' messages) may be skipped; the others stay exact
    active = torch.rand(3, 40, generator=g) < 0.7
    for path in THRESHOLD_PATHS:
        monkeypatch.setattr(compressors, "USE_KERNELS", path == "kernel")
        idx = topk_indices(x, 90, active=active)
        assert ((idx >= 0) & (idx < x.shape[-1])).all()
        assert torch.equal(idx.sort(-1).values[active], ref[active])


def test_topk_threshold_path_keeps_nan_like_torch_topk(threshold_path):
    x = torch.randn(1, 3, 4000, generator=torch.Generator().manual_seed(0))
    x[0, 1, 1234] = float("nan")
    got = topk_indices(x, 40)
    assert (got[0, 1] == 1234).any()  # NaN is the largest magnitude
    assert torch.equal(got[0, 0].sort().values, _topk_reference(x[0, 0], 40))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["one storage", "separate"])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
def test_topk_with_a_fused_coded_sum_equals_encoding_first(dtype, threads, layout, d, threshold_path):
    """sparse(e, add=U) (the kernel adds u_i = z_i Σ_j B_ij g_j to each row in its own pass) leaves
    e + U in e, also in rows whose selection is not asked for (``active`` ⊂ z), and selects what
    Top-k of e + U selects; G given as column blocks that lie in one storage (as the objective
    makes them) or apart (copied into one). The kernel sums u_i first and then adds it, exactly as
    a device of the distributed runtime does (d = 2 to 4 in one loop per chunk, others through an
    accumulator: each path is covered)."""
    code, blocks, z, e = _coded_sum_case(dtype, layout, d)
    U = CodedSum(code, blocks, z)
    active = z & (torch.rand(z.shape, generator=torch.Generator().manual_seed(1)) < 0.8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        v = e.clone()
        idx, vals = make("topk", v.shape[-1], k=90).sparse(v, active=active, add=U)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(v, e + U.dense(), rtol=1e-6, atol=1e-6)  # stragglers' rows: u = 0
    assert torch.equal(idx.sort(-1).values[active], _topk_reference(v, 90)[active])
    assert torch.equal(vals, v.gather(-1, idx))
    # with subtract, the same selection, and e ← v − m (v + (−m), stragglers untouched) in the same pass
    w = e.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        idx_s, vals_s = make("topk", w.shape[-1], k=90).sparse(w, active=active, add=U, subtract=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(idx_s, idx) and torch.equal(vals_s, vals)
    assert torch.equal(w, v.scatter_add(-1, idx, -vals.masked_fill(~active.unsqueeze(-1), 0.0)))
    if threshold_path == "kernel":  # summed in the device's order: equal to the last bit
        u = torch.zeros_like(e)
        cols = torch.cat(blocks, -1)
        for r, i, j in code._nz.tolist():
            u[r, i] += code.B[r, i, j] * cols[r, j]
        assert torch.equal(v, e + u * z.unsqueeze(-1))


def _coded_sum_case(dtype, layout, d=3):
    """An sgc code (R = 2, M = 10, d partitions a device), G as four column blocks (in one storage
    or apart), z, e."""
    g = torch.Generator().manual_seed(11)
    R, M = 2, 10
    rng_ = SeedRNG([0, 1], "code")
    S = allocate({"name": "sgc", "d": d}, M, rng_)
    code = build_code({"name": "sgc", "d": d}, S, torch.full((R, M), 0.2, dtype=F64), rng_, dtype)
    widths = [2000, 30, 4000, 7]
    if layout == "one storage":
        flat = torch.randn(R * code.N * sum(widths), generator=g).to(dtype)
        blocks = [b.view(R, code.N, w) for b, w in zip(flat.split([R * code.N * w for w in widths]), widths)]
    else:
        blocks = [torch.randn(R, code.N, w, generator=g).to(dtype) for w in widths]
    for b in blocks:  # columns where G and e are 0 (pixels no image lights): zeros in the sample
        b[..., : b.shape[-1] // 2] = 0.0
    z = torch.rand(R, M, generator=g) < 0.7
    e = torch.randn(R, M, sum(widths), generator=g).to(dtype) * 0.5
    e[0, 1, 100:140] = 3.0  # ties at the top
    e[..., widths[0] + widths[1] : widths[0] + widths[1] + widths[2] // 2] = 0.0
    return code, blocks, z, e


class _Rows:
    """A RowSource over given blocks (what PartitionGradients is to the kernel), counting writes
    and the times all of G was asked for."""

    def __init__(self, blocks):
        self._b, self.writes, self.wholes = blocks, 0, 0
        self.rows, self.widths, self.by_rows = (
            blocks[0].shape[0] * blocks[0].shape[1],
            tuple(b.shape[2] for b in blocks),
            True,
        )

    def blocks(self):
        self.wholes += 1
        return self._b

    def write(self, first, stop, out):
        self.writes += 1
        for o, b in zip(out, self._b):
            o.copy_(b.reshape(-1, b.shape[-1])[first:stop])

    def buffer(self, numel):
        return torch.full((numel,), float("nan"), dtype=self._b[0].dtype)

    def holds_whole(self):
        return self.whole_held

    whole_held = True


@pytest.mark.parametrize("code_name, d", [("sgc", 1), ("sgc", 2), ("sgc", 3), ("frc", 2), ("frc", 5), ("uncoded", 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_run_by_parts_of_g_is_the_whole_run(code_name, d, threads, monkeypatch):
    """COCO-EF's fused update with G formed a part of rows at a time (each part's partition
    gradients written just before its rows, the parts wrapping around sgc's cyclic allocation)
    leaves the same bits in e and selects the same entries with the same values as with G whole;
    a code whose rows share few partitions with their neighbours (rgc's random regular graph) has
    no row parts (so it is not run by parts); G of the wrong number of rows is refused."""
    from cocoef_cli.sim import codes as codes_mod

    if "kernel" not in THRESHOLD_PATHS:
        pytest.skip("no compiled kernel: G is formed whole")
    g = torch.Generator().manual_seed(4)
    R, M, widths = 2, 40, [500, 30, 1000, 7]
    ccfg = {"name": code_name, "d": d}
    rng_ = SeedRNG([0, 1], "code")
    S = allocate(ccfg, M, rng_)
    code = build_code(ccfg, S, torch.full((R, M), 0.2, dtype=F64), rng_, torch.float32)
    blocks = [torch.randn(R, code.N, w, generator=g) for w in widths]
    z = torch.rand(R, M, generator=g) < 0.7
    e = torch.randn(R, M, sum(widths), generator=g)
    monkeypatch.setattr(codes_mod, "PART_BYTES", 10 * 4 * sum(widths))  # parts of 10 rows (of R·M = 80)
    monkeypatch.setattr(codes_mod, "G_FORM", "parts")
    topk = make("topk", e.shape[-1], k=90)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole, parts = e.clone(), e.clone()
        ref = topk.sparse(whole, active=z, add=CodedSum(code, blocks, z), subtract=True)
        src = _Rows(blocks)
        got = topk.sparse(parts, active=z, add=CodedSum(code, src, z), subtract=True)
    finally:
        torch.set_num_threads(before)
    assert src.writes >= 8  # 8 parts, one or more runs each: G was formed by parts
    assert torch.equal(parts, whole) and torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(whole, e)
    rcfg = {"name": "rgc", "d": 3}
    rgc = build_code(rcfg, allocate(rcfg, M, rng_), torch.full((R, M), 0.2, dtype=F64), rng_, torch.float32)
    assert rgc.row_parts(10) is None and code.row_parts(10) is not None
    short = _Rows([b[:1] for b in blocks])  # one replicate's rows of two
    with pytest.raises(ValueError, match="rows"):
        topk.sparse(e.clone(), active=z, add=CodedSum(code, short, z), subtract=True)


class _Terms(_Rows):
    """A RowSource whose rows are products and sums of terms (what PartitionGradients is over a
    model's PartitionTerms), offering them to the kernel (``kernel_terms``). Its rows are
    torch's products, or with ``kernel_rows`` the kernel's own (equal to them on any CPU, for the
    tests of the fused update); ``shift`` is added to the last entry of the last row (a source
    that differs from its terms in one entry: the check must fail)."""

    def __init__(self, terms, widths, R, N, shift=0.0, kernel_rows=False):
        from cocoef_cli.nets import PartitionTerms
        from cocoef_cli.sim import kernels

        self.pt, self.shift = PartitionTerms(R * N, terms), shift
        self.kernel = kernels.Terms(terms) if kernel_rows else None
        super().__init__([terms[0][0].new_empty(R, N, w) for w in widths])
        self.write(0, R * N, [b.view(R * N, w) for b, w in zip(self._b, widths)])  # all of G as write() gives it
        self.writes, self.offered = 0, 0

    def kernel_terms(self):
        self.offered += 1
        return self.pt.terms

    def write(self, first, stop, out):
        self.writes += 1
        if self.kernel is None:
            self.pt.write(first, stop, out)
        else:
            rows, at = torch.from_numpy(self.kernel.rows_of(first, stop)), 0
            for o in out:
                o.copy_(rows[:, at : at + o.shape[1]])
                at += o.shape[1]
        if stop == self.rows:
            out[-1][-1, -1] += self.shift


def _terms_case(kind, R, N, B, dtype, g):
    """Terms as a GLM (one product) or the MLP (products and sums) makes them: ((L, X) by block,
    widths); a quarter of the inputs are 0 (pixels no image lights: products exactly ±0)."""
    if kind == "glm":
        X = torch.randn(R * N, B, 97, generator=g).to(dtype)
        X[..., :25] = 0.0
        return [(torch.randn(R * N, 10, B, generator=g).to(dtype), X)], [970]
    d1, d2 = torch.randn(R * N, B, 16, generator=g).to(dtype), torch.randn(R * N, B, 10, generator=g).to(dtype)
    A0, A1 = torch.randn(R * N, B, 200, generator=g).to(dtype), torch.randn(R * N, B, 16, generator=g).to(dtype)
    A0[..., :50] = 0.0
    d1[:, 0, :3] = -0.0  # sums of −0 terms (a ReLU's zero derivative times a negative error)
    d1[:, 1:, :3] = -0.0
    return [(d1.transpose(1, 2), A0), (d1, None), (d2.transpose(1, 2), A1), (d2, None)], [3200, 16, 160, 10]


def _bits(t):
    """t's bits as integers: equal bits, not equal values (−0 is not +0)."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


def _same_bits(a, b):
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["glm", "mlp"])
def test_the_kernel_forms_g_s_rows_as_torch_s_products_and_sums(dtype, kind):
    """The kernel's rows of G from their terms are the products l·x and the sums Σ_k l_k (close
    to torch's in value on any CPU; equal in bits where torch sums in the same order), and its
    exact zeros are torch's: +0, never −0 (both start from a +0 accumulator), whatever the order."""
    from cocoef_cli.nets import PartitionTerms
    from cocoef_cli.sim import kernels

    if not kernels.fused():
        pytest.skip("no compiled kernel with a hardware FMA: G's rows are formed by torch")
    g = torch.Generator().manual_seed(5)
    terms, widths = _terms_case(kind, 1, 50, 4, dtype, g)
    ref = [torch.empty(50, w, dtype=dtype) for w in widths]
    PartitionTerms(50, terms).write(0, 50, ref)
    want = torch.cat(ref, dim=1)
    got = torch.from_numpy(kernels.Terms(terms).rows_of(0, 50))
    torch.testing.assert_close(got, want)
    zero = want == 0
    assert zero.sum() > 1000 and _same_bits(got[zero], want[zero])
    assert not torch.signbit(got[zero]).any()
    with pytest.raises(ValueError, match="not within"):
        kernels.Terms(terms).rows_of(40, 51)


@pytest.mark.parametrize(
    "code_name, d", [("sgc", 1), ("sgc", 3), ("frc", 2), ("frc", 5), ("uncoded", 1), ("rgc", 3), ("bgc", 4)]
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["glm", "mlp"])
def test_the_kernel_forming_g_s_rows_itself_is_the_whole_run(code_name, d, threads, dtype, kind, monkeypatch):
    """With G's rows formed in the kernel from their terms (G never written; ``G_FORM = "fused"``)
    COCO-EF's fused update leaves the same bits in e and picks the same entries with the same
    values as with G whole, for one product block (a GLM) or products and sums (the MLP), d = 1
    to 5 terms a row, neighbouring partitions (sgc, frc, uncoded) or scattered ones (rgc, bgc:
    the ring of formed rows evicts while a row still holds its slots); the rows are checked
    against the source's once (a key per shapes, samples, dtype and threads)."""
    from cocoef_cli.sim import codes as codes_mod
    from cocoef_cli.sim import kernels

    if "kernel" not in THRESHOLD_PATHS or not kernels.fused():
        pytest.skip("no compiled kernel with a hardware FMA: G's rows are formed by torch")
    g = torch.Generator().manual_seed(6)
    R, M, B = 2, 30, 4
    ccfg = {"name": code_name, "d": d}
    rng_ = SeedRNG([0, 1], "code")
    code = build_code(ccfg, allocate(ccfg, M, rng_), torch.full((R, M), 0.2, dtype=F64), rng_, dtype)
    terms, widths = _terms_case(kind, R, code.N, B, dtype, g)
    calls, fused = [], kernels._topk_rows_fused
    monkeypatch.setattr(kernels, "_topk_rows_fused", lambda *a: calls.append(1) or fused(*a))
    monkeypatch.setattr(codes_mod, "G_FORM", "fused")
    monkeypatch.setattr(codes_mod, "PART_BYTES", 8 * 2**10 * 8)  # the check in ranges of a few rows
    topk = make("topk", sum(widths), k=90)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = _Terms(terms, widths, R, code.N, kernel_rows=True)
        e_whole = torch.randn(R, M, sum(widths), generator=g).to(dtype)
        e_fused = e_whole.clone()
        for _ in range(3):
            z = torch.rand(R, M, generator=g) < 0.7
            ref = topk.sparse(e_whole, active=z, add=CodedSum(code, src._b, z), subtract=True)
            got = topk.sparse(e_fused, active=z, add=CodedSum(code, src, z), subtract=True)
            assert _same_bits(e_fused, e_whole) and torch.equal(got[0], ref[0]) and _same_bits(got[1], ref[1])
    finally:
        torch.set_num_threads(before)
    assert len(calls) == 3 and src.wholes == 0  # fused every time; G whole never asked of the source
    assert list(code._fused_checked.values()) == [True] and src.writes > 1  # checked once, in ranges


def test_the_kernel_forms_g_s_rows_only_where_they_equal_torch_s(monkeypatch):
    """A source whose last entry differs from its terms' (checked in ranges of a few rows) fails
    the check: the run forms G by torch (by parts) and stays right; so does one of more than
    FUSED_TIMED_SAMPLES samples a partition (not offered to the kernel), G_FORM = "whole", a code
    whose rows share few partitions with their neighbours (rgc) at G_FORM = "faster", and terms
    the kernel does not take; an l2 term is never fused."""
    from cocoef_cli.sim import codes as codes_mod
    from cocoef_cli.sim import kernels

    if "kernel" not in THRESHOLD_PATHS or not kernels.fused():
        pytest.skip("no compiled kernel with a hardware FMA: G's rows are formed by torch")
    g = torch.Generator().manual_seed(7)
    R, M = 2, 30
    rng_ = SeedRNG([0, 1], "code")
    calls, fused = [], kernels._topk_rows_fused
    monkeypatch.setattr(kernels, "_topk_rows_fused", lambda *a: calls.append(1) or fused(*a))
    monkeypatch.setattr(codes_mod, "PART_BYTES", 8 * 2**10 * 8)
    cases = [
        ("sgc", 4, 1e-3, "faster", "mlp"),
        ("sgc", codes_mod.FUSED_TIMED_SAMPLES + 1, 0.0, "faster", "mlp"),
        ("sgc", 4, 0.0, "whole", "mlp"),
        ("rgc", 4, 0.0, "faster", "mlp"),
        ("sgc", 4, 0.0, "faster", "bad"),
    ]
    for name, B, shift, form, kind in cases:
        ccfg = {"name": name, "d": 3}
        code = build_code(ccfg, allocate(ccfg, M, rng_), torch.full((R, M), 0.2, dtype=F64), rng_, torch.float32)
        terms, widths = _terms_case("mlp", R, code.N, B, torch.float32, g)
        src = _Terms(terms, widths, R, code.N, shift=shift, kernel_rows=True)
        if kind == "bad":  # a plugin's terms of another contraction size in one block
            src.pt.terms = [terms[0], (terms[1][0][:, :-1], None), *terms[2:]]
        G = [b.clone() for b in src._b]  # G as the source writes it
        monkeypatch.setattr(codes_mod, "G_FORM", form)
        e_ref = torch.randn(R, M, sum(widths), generator=g)
        e_got, z = e_ref.clone(), torch.rand(R, M, generator=g) < 0.7
        topk = make("topk", sum(widths), k=90)
        ref = topk.sparse(e_ref, active=z, add=CodedSum(code, G, z), subtract=True)
        got = topk.sparse(e_got, active=z, add=CodedSum(code, src, z), subtract=True)
        assert _same_bits(e_got, e_ref) and torch.equal(got[0], ref[0]) and _same_bits(got[1], ref[1])
        assert not calls, (name, B, shift, form, kind)
        assert list(code._fused_checked.values()) == ([False] if shift else [])
    from cocoef_cli import config
    from cocoef_cli.sim.engine import Simulation, build_experiment

    for l2, offered in [(0.0, True), (0.01, False)]:
        cfg = config.load(["dataset=mnist5k", "model=softmax", "devices=100", f"model.l2={l2}", "iters=1"])
        sim = Simulation(build_experiment(cfg))
        assert (sim.exp.objective.partition_gradients(sim.theta).kernel_terms() is not None) == offered


def test_the_kernel_forms_g_s_rows_of_many_samples_where_it_was_the_faster(monkeypatch):
    """With more than FUSED_MAX_SAMPLES samples a partition (here 20) G_FORM = "faster" times G's
    rows formed in the kernel against torch's stored G on the run's first updates, alternating
    (the first of each a warm-up), then keeps the faster for every later update; e and the
    selections stay those of G whole throughout."""
    from cocoef_cli.sim import codes as codes_mod
    from cocoef_cli.sim import kernels

    if "kernel" not in THRESHOLD_PATHS or not kernels.fused():
        pytest.skip("no compiled kernel with a hardware FMA: G's rows are formed by torch")
    g = torch.Generator().manual_seed(8)
    R, M, B = 2, 30, 20
    monkeypatch.setattr(codes_mod, "PART_BYTES", 8 * 970 * 4)  # stored G by parts too: a second choice
    ccfg = {"name": "sgc", "d": 3}
    rng_ = SeedRNG([0, 1], "code")
    code = build_code(ccfg, allocate(ccfg, M, rng_), torch.full((R, M), 0.2, dtype=F64), rng_, torch.float32)
    terms, widths = _terms_case("glm", R, code.N, B, torch.float32, g)
    calls, fused = [], kernels._topk_rows_fused
    monkeypatch.setattr(kernels, "_topk_rows_fused", lambda *a: calls.append(1) or fused(*a))
    src = _Terms(terms, widths, R, code.N, kernel_rows=True)
    src.whole_held = True  # (the parts-or-whole choice is timed where G is held anyway)
    topk = make("topk", sum(widths), k=90)
    e_whole = torch.randn(R, M, sum(widths), generator=g)
    e_fused, pattern = e_whole.clone(), []
    for _ in range(2 * (1 + codes_mod.FasterForm.TRIALS) + 3):
        z = torch.rand(R, M, generator=g) < 0.7
        before = len(calls)
        ref = topk.sparse(e_whole, active=z, add=CodedSum(code, src._b, z), subtract=True)
        got = topk.sparse(e_fused, active=z, add=CodedSum(code, src, z), subtract=True)
        assert _same_bits(e_fused, e_whole) and torch.equal(got[0], ref[0]) and _same_bits(got[1], ref[1])
        pattern.append(len(calls) > before)
    choice = code.fused_choice()
    assert pattern[: 2 * (1 + codes_mod.FasterForm.TRIALS)] == [True, False] * (1 + codes_mod.FasterForm.TRIALS)
    assert choice.by_parts is not None and pattern[-3:] == [choice.by_parts] * 3
    if choice.by_parts:  # the stored forms' own choice may be unfinished: no stored form runs again
        assert not code.choosing()
    # at FUSED_MAX_SAMPLES samples the kernel forms G's rows every time, untimed; one more: timed
    for B, every_time in [(codes_mod.FUSED_MAX_SAMPLES, True), (codes_mod.FUSED_MAX_SAMPLES + 1, False)]:
        code = build_code(ccfg, allocate(ccfg, M, rng_), torch.full((R, M), 0.2, dtype=F64), rng_, torch.float32)
        terms, widths = _terms_case("glm", R, code.N, B, torch.float32, g)
        src, calls[:] = _Terms(terms, widths, R, code.N, kernel_rows=True), []
        for _ in range(4):
            z = torch.rand(R, M, generator=g) < 0.7
            topk.sparse(torch.randn(R, M, sum(widths), generator=g), active=z, add=CodedSum(code, src, z))
        assert (len(calls) == 4) == every_time and (len(calls) == 2) != every_time


def test_the_faster_form_alternates_then_keeps_the_lower_minimum():
    """FasterForm: parts first, then whole, alternating; the first time of each form is a warm-up,
    not counted; after TRIALS timed updates of each, the form with the lower minimum is kept."""
    from cocoef_cli.sim.codes import FasterForm

    for parts_s, whole_s, kept in [(1.0, 2.0, True), (2.0, 1.0, False)]:
        form, seen = FasterForm(), []
        for t in range(2 * (1 + FasterForm.TRIALS) + 4):
            by_parts = form.next()
            seen.append(by_parts)
            # a warm-up that would decide wrongly if it counted: the slower form's is the fastest
            seconds = (parts_s if by_parts else whole_s) + 0.01 * t
            form.record(by_parts, 1e-3 if t < 2 and seconds > 1.5 else seconds)
        trial = 2 * (1 + FasterForm.TRIALS)
        assert seen[:trial] == [True, False] * (1 + FasterForm.TRIALS)
        assert form.by_parts is kept and seen[trial:] == [kept] * 4


def test_the_timed_choice_of_g_s_form_leaves_the_bits_of_g_whole(monkeypatch):
    """With G_FORM = "faster" (the default) the updates alternate G by parts and G whole until
    the choice is made, then run in the kept form; every update leaves the bits of G whole. A
    source that does not hold all of G already is never timed: it runs by parts."""
    from cocoef_cli.sim import codes as codes_mod
    from cocoef_cli.sim.codes import FasterForm

    if "kernel" not in THRESHOLD_PATHS:
        pytest.skip("no compiled kernel: G is formed whole")
    assert codes_mod.G_FORM == "faster"
    g = torch.Generator().manual_seed(5)
    R, M, widths = 2, 40, [500, 30, 1000, 7]
    rng_ = SeedRNG([0, 1], "code")
    ccfg = {"name": "sgc", "d": 3}
    code = build_code(ccfg, allocate(ccfg, M, rng_), torch.full((R, M), 0.2, dtype=F64), rng_, torch.float32)
    blocks = [torch.randn(R, code.N, w, generator=g) for w in widths]
    monkeypatch.setattr(codes_mod, "PART_BYTES", 10 * 4 * sum(widths))  # parts of 10 rows
    topk = make("topk", sum(widths), k=90)
    e_whole = torch.randn(R, M, sum(widths), generator=g)
    e_timed, src, forms = e_whole.clone(), _Rows(blocks), []
    for _ in range(2 * (1 + FasterForm.TRIALS) + 3):
        z = torch.rand(R, M, generator=g) < 0.7
        writes, wholes = src.writes, src.wholes
        ref = topk.sparse(e_whole, active=z, add=CodedSum(code, blocks, z), subtract=True)
        got = topk.sparse(e_timed, active=z, add=CodedSum(code, src, z), subtract=True)
        assert torch.equal(e_timed, e_whole) and torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        by_parts, whole = src.writes > writes, src.wholes > wholes
        assert by_parts != whole
        forms.append(by_parts)
    trial = 2 * (1 + FasterForm.TRIALS)
    assert forms[:trial] == [True, False] * (1 + FasterForm.TRIALS)
    kept = code.form_choice(10).by_parts
    assert kept is not None and forms[trial:] == [kept] * 3
    # where all of G is not held already (no evaluation formed it) nothing is timed: by parts
    src.whole_held, unheld = False, build_code(ccfg, code.S, torch.full((R, M), 0.2, dtype=F64), rng_, torch.float32)
    for _ in range(3):
        z = torch.rand(R, M, generator=g) < 0.7
        writes, wholes = src.writes, src.wholes
        ref = topk.sparse(e_whole, active=z, add=CodedSum(unheld, blocks, z), subtract=True)
        got = topk.sparse(e_timed, active=z, add=CodedSum(unheld, src, z), subtract=True)
        assert torch.equal(e_timed, e_whole) and src.writes > writes and src.wholes == wholes
    assert not unheld.choosing()


def test_an_unknown_form_of_g_is_refused(monkeypatch):
    from cocoef_cli.sim import codes as codes_mod

    code, blocks, z, e = _coded_sum_case(torch.float32, "one storage")
    monkeypatch.setattr(codes_mod, "G_FORM", "part")
    with pytest.raises(ValueError, match="G_FORM must be one of faster, fused, parts, whole; got 'part'"):
        list(CodedSum(code, _Rows(blocks), z).kernel_parts(e.clone()))


def test_a_coded_sum_of_the_wrong_shape_is_refused(threshold_path):
    """Both paths refuse G blocks of the wrong number of partitions and a v of the wrong width
    (the kernel reads without bounds checks)."""
    code, blocks, z, e = _coded_sum_case(torch.float32, "one storage")
    topk = make("topk", e.shape[-1], k=90)
    with pytest.raises(ValueError):
        topk.sparse(e.clone(), active=z, add=CodedSum(code, [b[:, :-1] for b in blocks], z))
    wide = torch.zeros(*e.shape[:2], e.shape[-1] + 100)
    with pytest.raises(ValueError):
        make("topk", wide.shape[-1], k=90).sparse(wide, active=z, add=CodedSum(code, blocks, z))


# --------------------------------------------------------------------------------------------- signs


@pytest.mark.parametrize("name", ["sign", "scaled_sign", "grouped_sign"])
def test_sign_of_zero_is_plus_one(name):
    x = row(0.0, -2.0, 0.0, 3.0, -0.0, 1.0)  # every block of 2 has a nonzero scale
    out = make(name, 6, group=2).compress(x, None).flatten()
    assert out[0] > 0 and out[2] > 0 and out[4] > 0 and out[1] < 0 and out[3] > 0 and out[5] > 0


def test_sign_values():
    assert make("sign", 4).compress(row(-0.5, 0, 2, -3), None).flatten().tolist() == [-1, 1, 1, -1]


def test_scaled_sign_error_identity():
    g = torch.Generator().manual_seed(1)
    for D in (1, 2, 7, 50):
        x = torch.randn(2, 20, D, dtype=F64, generator=g)
        x[..., 0] = 0.0  # include zeros
        out = make("scaled_sign", D).compress(x, None)
        err = ((out - x) ** 2).sum(-1)
        expect = (x**2).sum(-1) - x.abs().sum(-1) ** 2 / D
        torch.testing.assert_close(err, expect, rtol=1e-10, atol=1e-10)


def test_grouped_sign_limits_and_short_last_block():
    g = torch.Generator().manual_seed(2)
    for D in (1, 5, 10, 64, 100):
        x = torch.randn(2, 3, D, dtype=F64, generator=g)
        torch.testing.assert_close(
            make("grouped_sign", D, group=D).compress(x, None),
            make("scaled_sign", D).compress(x, None),
            rtol=1e-12,
            atol=1e-12,
        )
        torch.testing.assert_close(
            make("grouped_sign", D, group=D + 7).compress(x, None),
            make("scaled_sign", D).compress(x, None),
            rtol=1e-12,
            atol=1e-12,
        )
        torch.testing.assert_close(make("grouped_sign", D, group=1).compress(x, None), x, rtol=1e-12, atol=1e-12)
    # D = 10, group = 4: blocks [0:4], [4:8], [8:10]; the last one is scaled by its own length 2
    x = torch.arange(1.0, 11.0, dtype=F64) * torch.tensor([1, -1] * 5, dtype=F64)
    out = make("grouped_sign", 10, group=4).compress(x.reshape(1, 1, 10), None).flatten()
    scales = [x[0:4].abs().mean(), x[4:8].abs().mean(), x[8:10].abs().mean()]
    expect = torch.cat([scales[0].repeat(4), scales[1].repeat(4), scales[2].repeat(2)]) * torch.sign(x)
    torch.testing.assert_close(out, expect)
    assert scales[2].item() == 9.5


# --------------------------------------------------------------------------------------------- randomised


def test_value_sets_of_random_quantisers():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 13, dtype=F64, generator=g)
    r = rng(4, 5)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    inf = x.abs().amax(-1, keepdim=True)
    s = 3
    q = make("qsgd", 13, levels=s).compress(x, r)
    lv = q.abs() * s / norm
    assert torch.allclose(lv, lv.round(), atol=1e-9) and (lv.round() <= s).all()
    assert ((q == 0) | (torch.sign(q) == torch.sign(x))).all()
    o = make("onebit", 13).compress(x, r)
    assert torch.allclose(o.abs(), inf.expand_as(o))
    t = make("terngrad", 13, clip=None).compress(x, r)
    assert ((t == 0) | (t.abs() == inf)).all() and ((t == 0) | (torch.sign(t) == torch.sign(x))).all()
    n = make("natural", 13).compress(x, r)
    lo = 2.0 ** torch.floor(torch.log2(x.abs()))
    assert ((n.abs() == lo) | (n.abs() == 2 * lo)).all() and (torch.sign(n) == torch.sign(x)).all()
    # powers of two are kept exactly by natural compression
    p2 = row(0.25, -4.0, 1.0, 0.0, 2.0**-40)
    assert torch.equal(make("natural", 5).compress(p2, rng(0)), p2)


@pytest.mark.parametrize("name", ["randk", "randk_unbiased"])
def test_randk_keeps_k_per_device_and_devices_differ(name):
    D, k, M = 20, 4, 300
    x = torch.ones(2, M, D, dtype=F64)
    out = make(name, D, k=k).compress(x, rng(0, 1))
    nz = out != 0
    assert (nz.sum(-1) == k).all()
    vals = out[nz]
    assert torch.allclose(vals, torch.full_like(vals, 1.0 if name == "randk" else D / k))
    # each device draws its own subset: not all masks equal; coverage ~ uniform
    assert not (nz == nz[:, :1]).all()
    freq = nz.to(F64).mean(dim=(0, 1))  # per-coordinate inclusion frequency, expectation k/D
    se = math.sqrt((k / D) * (1 - k / D) / (2 * M))
    assert ((freq - k / D).abs() < 5 * se).all()


@pytest.mark.parametrize("name", ["randk", "randk_unbiased"])
def test_randk_support_is_its_public_random_indices_of_the_keys(name):
    """The wire codec regenerates a random-k support from the shared keys through the public
    ``random_indices``: the nonzeros of C(x) are exactly the k largest of the stream's U[0,1) keys."""
    D, k, M = 30, 5, 8
    out = make(name, D, k=k).compress(torch.ones(2, M, D, dtype=F64), rng(3, 4))
    keys = rng(3, 4).rand(M, D, dtype=F64)  # the same stream, the same draw
    idx = make(name, D, k=k).random_indices(keys)
    assert idx.shape == (2, M, k)
    assert torch.equal(out != 0, torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx, True))


X_TEST = torch.tensor([0.9, -2.0, 0.0, 0.3, 1.7, -0.05, 3.1], dtype=F64)


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_mean_within_4_standard_errors(name):
    D, M = X_TEST.numel(), 40_000
    c = make(name, D, k=2, levels=2, clip=None)
    v = X_TEST.expand(1, M, D)
    out = c.compress(v, rng(11))[0]  # (M, D): M independent draws
    mean = out.mean(0)
    se = out.std(0) / math.sqrt(M)
    assert ((mean - X_TEST).abs() <= 4 * se + 1e-12).all(), (mean, X_TEST, se)


def test_randk_is_biased_by_k_over_d():
    D, M, k = 7, 40_000, 2
    out = make("randk", D, k=k).compress(X_TEST.expand(1, M, D), rng(12))[0]
    se = out.std(0) / math.sqrt(M)
    assert ((out.mean(0) - k / D * X_TEST).abs() <= 4 * se + 1e-12).all()


OMEGA_XS = {
    "gauss": torch.randn(16, dtype=F64, generator=torch.Generator().manual_seed(5)),
    "onehot": torch.eye(16, dtype=F64)[3] * 2.5,
    "flat": torch.full((16,), -0.7, dtype=F64),
}


@pytest.mark.parametrize(
    "name,kw",
    [
        ("randk_unbiased", {"k": 3}),
        ("qsgd", {"levels": 1}),
        ("qsgd", {"levels": 2}),
        ("qsgd", {"levels": 8}),
        ("onebit", {}),
        ("terngrad", {"clip": None}),
        ("natural", {}),
        ("identity", {}),
    ],
)
@pytest.mark.parametrize("xname", list(OMEGA_XS))
def test_omega_bound_holds_empirically(name, kw, xname):
    x = OMEGA_XS[xname]
    D, M = x.numel(), 20_000
    c = make(name, D, **kw)
    expected = {
        "randk_unbiased": D / 3 - 1,
        "onebit": D - 1,
        "terngrad": math.sqrt(D) - 1,
        "natural": 1 / 8,
        "identity": 0.0,
    }.get(name)
    if name == "qsgd":
        s = kw["levels"]
        expected = min(D / s**2, math.sqrt(D) / s)
    assert c.omega() == pytest.approx(expected)
    out = c.compress(x.expand(1, M, D), rng(21))[0]
    err = ((out - x) ** 2).sum(-1)  # (M,)
    bound = c.omega() * (x**2).sum()
    assert err.mean() <= bound + 4 * err.std() / math.sqrt(M) + 1e-12


# --------------------------------------------------------------------------------------------- bits


@pytest.mark.parametrize("D", [1, 2, 7, 64, 100, 1000, 1025])
def test_bits_match_design_formulas(D):
    k = max(1, math.ceil(0.1 * D))
    L = math.ceil(math.log2(D))
    expect = {
        "identity": 32 * D,
        "topk": k * (32 + L),
        "randk": 32 * k,
        "randk_unbiased": 32 * k,
        "sign": D,
        "scaled_sign": D + 32,
        "grouped_sign": D + 32 * math.ceil(D / 64),
        "qsgd": D * (1 + math.ceil(math.log2(4 + 1))) + 32,
        "onebit": D + 32,
        "terngrad": 2 * D + 32,
        "natural": 9 * D,
    }
    for name in ALL:
        c = make(name, D, k=None, ratio=0.1, group=64, levels=4)
        assert c.bits() == expect[name], name
        assert isinstance(c.bits(), int)
    assert make("topk", D, k=k, index_bits="32").bits() == k * (32 + 32)
    assert make("topk", D, k=k, index_bits=32).bits() == k * (32 + 32)
    assert make("topk", D, k=k, index_bits="bitmap").bits() == 32 * k + D
    for s in (1, 2, 3, 7, 8, 16):
        assert make("qsgd", D, levels=s).bits() == D * (1 + math.ceil(math.log2(s + 1))) + 32
    for g in (1, 3, 10):
        assert make("grouped_sign", D, group=g).bits() == D + 32 * math.ceil(D / g)


def test_value_bits_replace_32():
    D, k, vb = 100, 10, 16
    expect = {
        "identity": vb * D,
        "topk": k * (vb + 7),
        "randk": vb * k,
        "randk_unbiased": vb * k,
        "sign": D,
        "scaled_sign": D + vb,
        "grouped_sign": D + vb * 2,
        "qsgd": D * 4 + vb,
        "onebit": D + vb,
        "terngrad": 2 * D + vb,
        "natural": 9 * D,
    }
    for name in ALL:
        assert make(name, D, k=k, value_bits=vb, group=64, levels=4).bits() == expect[name], name
    assert make("topk", D, k=k, value_bits=vb, index_bits="bitmap").bits() == vb * k + D


# --------------------------------------------------------------------------------------------- config


def test_k_from_ratio():
    assert make("topk", 100, ratio=0.1).k == 10
    assert make("topk", 7, ratio=0.1).k == 1
    assert make("topk", 7, ratio=0.2).k == 2  # ceil(1.4)
    assert make("randk", 100, ratio=0.07).k == 7  # 0.07*100 = 7.000000000000001 in floats
    assert make("randk_unbiased", 1000, ratio=1e-6).k == 1
    assert make("topk", 33, ratio=1.0).k == 33
    assert make("topk", 100, k=5, ratio=0.5).k == 5  # k wins over ratio
    assert make("topk", 100).k == 10  # default ratio 0.1


def test_omegaconf_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {"name": "topk", "k": None, "ratio": 0.25, "index_bits": "bitmap", "value_bits": 32}
    )
    c = build_compressor(cfg, 40)
    assert c.k == 10 and c.bits() == 32 * 10 + 40


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "topk", "k": 0}, "compressor.k"),
        ({"name": "topk", "k": 11}, "compressor.k"),
        ({"name": "randk", "k": -1}, "compressor.k"),
        ({"name": "randk_unbiased", "k": 2.5}, "compressor.k"),
        ({"name": "topk", "k": "3"}, "compressor.k"),
        ({"name": "topk", "ratio": 0.0}, "compressor.ratio"),
        ({"name": "topk", "ratio": 1.5}, "compressor.ratio"),
        ({"name": "topk", "ratio": "x"}, "compressor.ratio"),
        ({"name": "grouped_sign", "group": 0}, "compressor.group"),
        ({"name": "grouped_sign", "group": 2.0}, "compressor.group"),
        ({"name": "qsgd", "levels": 0}, "compressor.levels"),
        ({"name": "topk", "index_bits": "log10"}, "compressor.index_bits"),
        ({"name": "topk", "index_bits": 16}, "compressor.index_bits"),
        ({"name": "sign", "value_bits": 0}, "compressor.value_bits"),
        ({"name": "nope"}, "compressor"),
    ],
)
def test_bad_config_raises_config_error_naming_the_key(cfg, key):
    with pytest.raises(ConfigError) as ei:
        build_compressor(cfg, 10)
    assert ei.value.key == key
    assert str(ei.value).startswith(f"{key}=")


def test_error_messages():
    with pytest.raises(ConfigError, match=r"compressor\.k=0: out of range; accepted: integers 1\.\.10"):
        build_compressor({"name": "topk", "k": 0}, 10)
    with pytest.raises(ConfigError, match=r"compressor\.k=11"):
        build_compressor({"name": "topk", "k": 11}, 10)
    with pytest.raises(ConfigError) as ei:
        build_compressor({"name": "bogus"}, 10)
    assert "compressor='bogus'" in str(ei.value) and "topk" in str(ei.value)


def test_randomised_needs_rng():
    with pytest.raises(ValueError):
        make("qsgd", 4).compress(torch.ones(1, 1, 4), None)
    with pytest.raises(ValueError):
        make("onebit", 4).compress(torch.ones(2, 1, 4), rng(0))  # R mismatch


# --------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", ALL)
def test_replicates_equal_separate_runs(name):
    D = 23
    c = make(name, D, k=5, group=4, levels=3)
    x = torch.randn(2, 6, D, dtype=F64, generator=torch.Generator().manual_seed(9))
    both, r0, r1 = rng(0, 1), rng(0), rng(1)
    for _ in range(3):  # repeated calls consume the streams identically
        joint = c.compress(x, both)
        sep = torch.cat([c.compress(x[:1], r0), c.compress(x[1:], r1)])
        assert torch.equal(joint, sep)
    # same seed, same draws; different seed, different draws
    assert torch.equal(c.compress(x, rng(0, 1)), c.compress(x, rng(0, 1)))
    if c.randomized:
        a = c.compress(x[:1], rng(0))
        b = c.compress(x[:1], rng(7))
        assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", ALL)
def test_error_feedback_invariant(name):
    R, M, D, T = 2, 4, 17, 25
    c = make(name, D, k=3, group=5, levels=2)
    g = torch.Generator().manual_seed(13)
    r = rng(3, 4)
    e = torch.zeros(R, M, D, dtype=F64)
    sum_m = torch.zeros_like(e)
    sum_u = torch.zeros_like(e)
    for _ in range(T):
        u = torch.randn(R, M, D, dtype=F64, generator=g)
        v = u + e
        m = c.compress(v, r)
        e = v - m
        sum_m += m
        sum_u += u
    # EF with a non-contractive compressor (randk_unbiased) lets e grow: 1e-10 relative to its scale
    scale = max(1.0, e.abs().max().item(), sum_m.abs().max().item())
    torch.testing.assert_close(sum_m + e, sum_u, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("D", [17, 4000])
def test_sparse_with_subtract_leaves_the_error_feedback_residual(name, D):
    """sparse(v, subtract=True) returns what sparse(v) returns and leaves v − C(v) on the active
    messages (v + (−m) at the k indices) and v on the others, whether the compressor fuses the
    subtraction (Top-k, in the kernel's pass for D = 4000) or not (the generic update after)."""
    c = make(name, D, k=3 if D == 17 else 40, group=5, levels=2)
    v = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(21))
    v[0, 1, 7] = float("inf")  # inf − inf = NaN, as v + (−m) gives it
    active = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    plain = c.sparse(v.clone(), rng(3, 4), active=active)
    w = v.clone()
    got = c.sparse(w, rng(3, 4), active=active, subtract=True)
    if plain is None:
        assert got is None and torch.equal(w, v)
        return
    idx, vals = got
    assert torch.equal(idx.sort(-1).values, plain[0].sort(-1).values)
    assert torch.equal(vals.gather(-1, idx.argsort(-1)), plain[1].gather(-1, plain[0].argsort(-1)))
    want = v.scatter_add(-1, idx, -vals.masked_fill(~active.unsqueeze(-1), 0.0))
    assert torch.equal(w.nan_to_num(7.0), want.nan_to_num(7.0))
    assert torch.equal(w[~active], v[~active])


def test_a_top_k_subclass_that_changes_its_values_keeps_them_under_subtract():
    """A plugin subclass of TopK that scales its values is not fused: sparse(subtract=True)
    returns its scaled values and leaves v − C(v) with them."""

    class Doubled(compressors.TopK):
        def _scale(self) -> float:
            return 2.0

    c = Doubled(4000, 40)
    assert not Doubled.fuses_subtract and compressors.TopK.fuses_subtract
    v = torch.randn(1, 3, 4000, generator=torch.Generator().manual_seed(2))
    w = v.clone()
    idx, vals = c.sparse(w, subtract=True)
    assert torch.equal(vals, 2.0 * v.gather(-1, idx))
    assert torch.equal(w, v.scatter_add(-1, idx, -vals))


def test_terngrad_clips_at_clip_sigma_by_default_and_is_then_biased():
    D, M = 8, 4000
    x = torch.tensor([10.0, 0.1, -0.2, 0.3, 0.1, -0.1, 0.2, 0.0], dtype=F64)
    sigma = x.pow(2).mean().sqrt()
    c = make("terngrad", D)
    assert c.clip == 2.5 and not c.unbiased and c.omega() is None
    out = c.compress(x.expand(1, M, D), rng(2))[0]
    assert torch.allclose(out.abs().amax(-1), torch.full((M,), 2.5 * float(sigma), dtype=F64))  # s = ‖clip(x)‖∞
    se = out.std(0) / math.sqrt(M)
    assert (out.mean(0)[0] - x[0]).abs() > 10 * se[0]  # biased on the clipped coordinate
    clipped = torch.clamp(x, -2.5 * sigma, 2.5 * sigma)
    assert ((out.mean(0) - clipped).abs() <= 4 * se + 1e-12).all()  # unbiased for clip(x)
    flat = make("terngrad", 3).compress(torch.full((1, 1, 3), 2.0, dtype=F64), rng(0))
    assert torch.equal(flat, torch.full((1, 1, 3), 2.0, dtype=F64))  # σ-clipping never zeroes a constant message
    with pytest.raises(ConfigError, match=r"compressor\.clip"):
        make("terngrad", D, clip=0)


def test_onebit_says_it_is_not_seide_1bit_sgd():
    line = dict(COMPRESSORS.describe())["onebit"]
    assert "Seide" in line and "unbiased" in line


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernels_threshold_is_the_rth_largest_sampled_magnitude(dtype):
    """The Top-k kernel's threshold: the r-th largest of |x[::h]| (NaN as the largest, as numpy's
    partition sorts it), and −1 when fewer than r of the sample are non-zero (the r-th largest is
    then 0: full selection either way)."""
    from cocoef_cli.sim import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler builds the kernel here")
    _rth_largest_strided = kernels.rth_largest_strided
    rng = np.random.default_rng(3)
    for D, h, r, zeros in [
        (1000, 7, 5, 0),
        (997, 1, 40, 0),
        (64, 9, 8, 0),
        (50, 3, 17, 0),
        (30, 4, 9, 0),
        (1000, 7, 5, 500),
        (997, 1, 40, 950),
        (997, 1, 40, 957),
        (997, 1, 40, 958),
    ]:
        x = rng.standard_normal(D).astype(dtype)
        x[rng.integers(0, D, 3)] = 2.5  # ties
        x[rng.permutation(D)[:zeros]] = rng.choice([0.0, -0.0], zeros)  # ±0 left out of the copy
        sample = np.abs(x[::h])
        nonzero = np.count_nonzero(sample)
        want = np.partition(sample, len(sample) - r)[len(sample) - r] if r <= nonzero else -1.0
        assert _rth_largest_strided(x, h, r) == want, (D, h, r, zeros)
    x = np.ones(100, dtype)
    x[::10][:3] = np.nan
    assert _rth_largest_strided(x, 10, 3) == np.inf and _rth_largest_strided(x, 10, 4) == 1.0
