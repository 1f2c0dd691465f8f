"""Gradient codes: allocations, encoding, decoders, validation (cocoef_cli/sim/codes.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from cocoef_cli.errors import ConfigError
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.codes import CODES, RESIDUAL_TOL, Code, allocate, build_code, num_partitions
from cocoef_cli.sim.stragglers import build_straggler

F64 = torch.float64


def make(cfg: dict, M: int, seeds=(0, 1), p: float | torch.Tensor = 0.0, dtype=F64) -> Code:
    rng = SeedRNG(list(seeds), "code")
    S = allocate(cfg, M, rng)
    if not torch.is_tensor(p):
        p = torch.full((len(seeds), M), float(p), dtype=F64)
    return build_code(cfg, S, p, rng, dtype)


def mask(R: int, M: int, stragglers) -> torch.Tensor:
    z = torch.ones(R, M, dtype=torch.bool)
    z[:, list(stragglers)] = False
    return z


def coverage(code: Code, a: torch.Tensor) -> torch.Tensor:
    """aᵀB per replicate, (R, N), in float64."""
    return torch.einsum("rm,rmn->rn", a.to(F64), code.B.to(F64))


def test_registry_lists_all_codes_with_descriptions():
    assert CODES.names() == ["uncoded", "sgc", "frc", "crc", "bgc", "rgc"]
    for name, line in CODES.describe():
        assert line, f"{name} has no one-line description"


# ----------------------------------------------------------------------------- fixtures from the papers
@pytest.mark.parametrize(
    "survivors,a_expected", [((0, 1), (2.0, -1.0, 0.0)), ((0, 2), (1.0, 0.0, 1.0)), ((1, 2), (0.0, 1.0, 2.0))]
)
def test_tandon_m3_d2_example_decodes(survivors, a_expected):
    code = Code.from_matrix([[0.5, 1.0, 0.0], [0.0, 1.0, -1.0], [0.5, 0.0, 1.0]], decode="exact")
    assert (code.M, code.N, code.d) == (3, 3, 2)
    z = torch.zeros(1, 3, dtype=torch.bool)
    z[0, list(survivors)] = True
    a, res = code.decode(z)
    torch.testing.assert_close(a[0], torch.tensor(a_expected, dtype=F64), atol=1e-12, rtol=0)
    assert res is not None and res.item() == 0.0


def test_fano_plane_allocation():
    S = allocate({"name": "sgc", "d": 3, "offsets": [0, 1, 3]}, 7, SeedRNG([0], "code"))[0].to(torch.int64)
    assert S.shape == (7, 7)
    assert (S.sum(0) == 3).all() and (S.sum(1) == 3).all()
    shared = S @ S.T
    off_diag = shared[~torch.eye(7, dtype=torch.bool)]
    assert (off_diag == 1).all(), "every pair of devices must share exactly one partition"


# ----------------------------------------------------------------------------- exact codes
@pytest.mark.parametrize("name,M,d", [("frc", 6, 3), ("frc", 8, 2), ("crc", 6, 3), ("crc", 8, 2), ("crc", 7, 4)])
def test_exact_codes_decode_every_pattern_of_at_most_d_minus_1_stragglers(name, M, d):
    code = make({"name": name, "d": d, "decode": "exact"}, M)
    n_patterns = 0
    for k in range(d):
        for F in itertools.combinations(range(M), k):
            z = mask(code.R, M, F)
            a, res = code.decode(z)
            assert res is not None and (res == 0.0).all(), (F, res)
            assert (a[~z] == 0).all()
            torch.testing.assert_close(coverage(code, a), torch.ones(code.R, M, dtype=F64), atol=1e-7, rtol=0)
            n_patterns += 1
    assert n_patterns == sum(len(list(itertools.combinations(range(M), k))) for k in range(d))


@pytest.mark.parametrize("construction", ["random", "cyclic_mds"])
def test_crc_decodes_exactly_at_realistic_size(construction):
    """M = 100: Tandon's random-H code is badly conditioned; sampled (d−1)-straggler sets still decode."""
    M, d, R = 100, 5, 4
    code = make({"name": "crc", "d": d, "construction": construction}, M, seeds=range(R))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        order = torch.rand(R, M, generator=g).argsort(-1)
        z = torch.ones(R, M, dtype=torch.bool).scatter(1, order[:, : d - 1], False)
        a, res = code.decode(z)
        assert (res == 0.0).all(), res
        assert (a[~z] == 0).all()


def test_crc_structure_follows_tandon_algorithm_2():
    M, d = 8, 3
    code = make({"name": "crc", "d": d, "construction": "random"}, M, seeds=(5,))
    B, S = code.B[0], code.S[0]
    assert torch.equal(torch.diagonal(B), torch.ones(M, dtype=F64))
    for i in range(M):
        assert S[i].nonzero().flatten().tolist() == sorted((i + o) % M for o in range(d))
    assert ((B != 0) <= S).all()
    # every row of B is in the null space of some H with H·1 = 0: rank(B) = M − (d − 1), and 1 ∈ rowspan(B)
    assert torch.linalg.matrix_rank(B).item() == M - (d - 1)


def test_frc_lost_group_contributes_nothing_and_optimal_matches_its_residual():
    M, d = 6, 2
    z = mask(1, M, [2, 3])  # the whole second group is lost
    ex = make({"name": "frc", "d": d, "decode": "exact"}, M, seeds=(0,))
    op = make({"name": "frc", "d": d, "decode": "optimal"}, M, seeds=(0,))
    a_ex, r_ex = ex.decode(z)
    a_op, r_op = op.decode(z)
    torch.testing.assert_close(a_ex[0], torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=F64))
    torch.testing.assert_close(a_op[0], torch.tensor([0.5, 0.5, 0, 0, 0.5, 0.5], dtype=F64))
    assert r_ex.item() == pytest.approx(2**0.5) and r_op.item() == pytest.approx(2**0.5)


def test_crc_falls_back_to_least_squares_beyond_d_minus_1_stragglers():
    M, d = 8, 2
    code = make({"name": "crc", "d": d}, M, seeds=(3,))
    z = mask(1, M, [0, 4, 5])
    a, res = code.decode(z)
    F = z[0]
    expected = torch.linalg.lstsq(code.B[0][F].T, torch.ones(M, 1, dtype=F64), driver="gelsd").solution[:, 0]
    r_expected = torch.linalg.vector_norm(code.B[0][F].T @ expected - 1)
    assert res.item() > 1e-3
    assert res.item() == pytest.approx(r_expected.item(), rel=1e-6)
    assert (a[0][~F] == 0).all()


@pytest.mark.parametrize(
    "cfg,M",
    [
        ({"name": "uncoded", "decode": "rescale"}, 5),
        ({"name": "uncoded", "decode": "unbiased"}, 5),
        ({"name": "sgc", "d": 3}, 7),
        ({"name": "sgc", "d": 2, "allocation": "random"}, 9),
        ({"name": "sgc", "d": 2, "partitions": 4}, 6),
        ({"name": "sgc", "d": 2, "partitions": 12, "allocation": "random"}, 8),
        ({"name": "frc", "d": 3}, 9),
        ({"name": "crc", "d": 3}, 9),
        ({"name": "crc", "d": 3, "decode": "optimal"}, 9),
        ({"name": "bgc", "d": 4}, 8),
    ],
)
def test_no_stragglers_gives_full_coverage(cfg, M):
    code = make(cfg, M, seeds=(0, 1, 2))
    a, res = code.decode(torch.ones(code.R, M, dtype=torch.bool))
    if code.fixed_weights:
        assert res is None
    else:
        assert (res == 0.0).all()
    torch.testing.assert_close(coverage(code, a), torch.ones(code.R, code.N, dtype=F64), atol=1e-8, rtol=0)


def test_uncoded_decoders():
    M = 4
    p = torch.tensor([[0.0, 0.2, 0.5, 0.75]], dtype=F64)
    z = torch.tensor([[True, False, True, True]])
    a, _ = make({"name": "uncoded", "d": 5}, M, seeds=(0,), p=p).decode(z)  # d is ignored for uncoded
    torch.testing.assert_close(a[0], torch.tensor([4 / 3, 0, 4 / 3, 4 / 3], dtype=F64))
    a, _ = make({"name": "uncoded"}, M, seeds=(0,), p=p).decode(torch.zeros(1, M, dtype=torch.bool))
    assert (a == 0).all() and torch.isfinite(a).all()
    a, _ = make({"name": "uncoded", "decode": "unbiased"}, M, seeds=(0,), p=p).decode(z)
    torch.testing.assert_close(a[0], torch.tensor([1.0, 0, 2.0, 4.0], dtype=F64))


def test_sgc_encoding_matrix_and_fixed_decoder():
    M = 7
    p = torch.linspace(0.0, 0.6, M, dtype=F64)[None]
    code = make({"name": "sgc", "d": 3}, M, seeds=(0,), p=p)
    assert code.fixed_weights and code.decode_name == "fixed"
    expected = code.S[0].to(F64) / (3 * (1 - p[0])[:, None])
    torch.testing.assert_close(code.B[0], expected)
    z = torch.tensor([[True, False, True, True, False, False, True]])
    a, res = code.decode(z)
    assert res is None and torch.equal(a, z.to(F64))


def test_sgc_is_unbiased_under_random_stragglers():
    """E[Σ_i a_i u_i] = Σ_j g_j with heterogeneous p_i and a random allocation."""
    M, D, draws = 9, 4, 6000
    rng_code = SeedRNG([11], "code")
    S = allocate({"name": "sgc", "d": 3, "allocation": "random"}, M, rng_code)
    strag = build_straggler({"name": "hetero", "p_min": 0.05, "p_max": 0.6}, S.sum(-1), SeedRNG([11], "straggler"))
    code = build_code({"name": "sgc", "d": 3}, S, strag.p, rng_code, F64)
    G = torch.randn(1, M, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    U = code.encode(G)[0]  # (M, D)
    Z = torch.cat([strag.draw() for _ in range(draws)])  # (draws, M)
    A = torch.stack([code.decode(z[None])[0][0] for z in Z[:50]])
    assert torch.equal(A, Z[:50].to(F64))  # fixed weights a = z
    ghat = Z.to(F64) @ U  # (draws, D)
    target = G[0].sum(0)
    se = ghat.std(0) / draws**0.5
    assert ((ghat.mean(0) - target).abs() <= 4 * se).all(), (ghat.mean(0), target, se)
    # and a biased decoder would be caught: ignoring the 1/(1-p) factor misses by many SEs
    biased = (Z.to(F64) @ (U * (1 - strag.p[0])[:, None])).mean(0)
    assert ((biased - target).abs() > 4 * se).any()


# ----------------------------------------------------------------------------- encoding
@pytest.mark.parametrize(
    "cfg,M",
    [
        ({"name": "uncoded"}, 6),
        ({"name": "sgc", "d": 3, "allocation": "random"}, 10),
        ({"name": "sgc", "d": 2, "partitions": 5}, 10),
        ({"name": "frc", "d": 2}, 6),
        ({"name": "crc", "d": 4}, 9),
        ({"name": "bgc", "d": 3, "partitions": 12}, 8),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_encode_equals_dense_product(cfg, M, dtype):
    code = make(cfg, M, seeds=(0, 1, 2), p=0.1, dtype=dtype)
    assert code.B.dtype == dtype and code.B.shape == code.S.shape
    assert ((code.B != 0) <= code.S).all()
    G = torch.randn(code.R, code.N, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    U = code.encode(G)
    assert U.shape == (code.R, M, 5) and U.dtype == dtype
    torch.testing.assert_close(U, torch.einsum("rmn,rnd->rmd", code.B, G))
    assert int(code.S.sum(-1).max()) >= code.K


@settings(max_examples=30, deadline=None)
@given(
    R=st.integers(1, 3),
    M=st.integers(1, 7),
    N=st.integers(1, 7),
    D=st.integers(1, 4),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_encode_matches_einsum_for_arbitrary_sparse_matrices(R, M, N, D, density, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(R, M, N, generator=g, dtype=F64) * (torch.rand(R, M, N, generator=g) < density)
    code = Code.from_matrix(B, decode="fixed")
    G = torch.randn(R, N, D, generator=g, dtype=F64)
    torch.testing.assert_close(code.encode(G), torch.einsum("rmn,rnd->rmd", B, G))


def test_encode_with_stragglers_and_accumulation():
    """encode(G, z) zeroes straggler rows; add_to accumulates B_z G in place and returns add_to."""
    code = make({"name": "sgc", "d": 3}, 8, seeds=(0, 1), p=0.2)
    g = torch.Generator().manual_seed(2)
    G = torch.randn(code.R, code.N, 6, generator=g, dtype=F64)
    z = torch.rand(code.R, code.M, generator=g) < 0.6
    expected = torch.einsum("rmn,rnd->rmd", code.B * z[..., None], G)
    torch.testing.assert_close(code.encode(G, z), expected)
    acc = torch.randn(code.R, code.M, 6, generator=g, dtype=F64)
    start = acc.clone()
    out = code.encode(G, z, add_to=acc)
    assert out is acc
    torch.testing.assert_close(acc, start + expected)
    with pytest.raises(ValueError, match="add_to"):
        code.encode(G, z, add_to=torch.zeros(code.R, code.M, 5, dtype=F64))


# ----------------------------------------------------------------------------- allocations
@pytest.mark.parametrize("M,d", [(12, 1), (12, 2), (12, 3), (12, 5), (10, 8), (30, 4)])
def test_random_sgc_allocations_are_d_regular(M, d):
    S = allocate({"name": "sgc", "d": d, "allocation": "random"}, M, SeedRNG(range(6), "code"))
    assert S.shape == (6, M, M) and S.dtype == torch.bool
    assert (S.sum(1) == d).all() and (S.sum(2) == d).all()
    if 1 < d < M - 1:
        assert len({tuple(s.flatten().tolist()) for s in S}) > 1, "replicates should get different allocations"


def test_random_sgc_with_more_partitions_than_devices():
    M, N, d = 6, 12, 3
    S = allocate({"name": "sgc", "d": d, "allocation": "random", "partitions": N}, M, SeedRNG([0, 1], "code"))
    assert S.shape == (2, M, N)
    assert (S.sum(2) == d).all()
    assert set(S.sum(1).unique().tolist()) <= {1, 2}  # M·d/N = 1.5: balanced columns


def test_frc_and_crc_allocations():
    S = allocate({"name": "frc", "d": 2}, 6, SeedRNG([0], "code"))[0]
    assert torch.equal(S, torch.block_diag(*[torch.ones(2, 2)] * 3).bool())
    S = allocate({"name": "crc", "d": 2}, 4, SeedRNG([0], "code"))[0]
    assert S.nonzero().tolist() == [[0, 0], [0, 1], [1, 1], [1, 2], [2, 2], [2, 3], [3, 0], [3, 3]]


def test_bgc_allocation_covers_every_partition():
    S = allocate({"name": "bgc", "d": 1, "partitions": 40}, 10, SeedRNG(range(8), "code"))
    assert S.shape == (8, 10, 40)
    assert S.any(1).all()
    # a column holds Bin(M, d/N) devices, plus one when that is 0: E = M·d/N + (1 − d/N)^M per column
    expected = (10 * 1 / 40 + (1 - 1 / 40) ** 10) / 10
    assert S.to(F64).mean().item() == pytest.approx(expected, abs=0.01)
    S = allocate({"name": "bgc", "d": 2}, 400, SeedRNG([0, 1], "code"))
    assert S.to(F64).mean().item() == pytest.approx(2 / 400, rel=0.05)


@pytest.mark.parametrize(
    "cfg", [{"name": "sgc", "d": 3, "allocation": "random"}, {"name": "bgc", "d": 2}, {"name": "crc", "d": 3}]
)
def test_replicates_are_independent_of_batching(cfg):
    M = 9
    both = make(cfg, M, seeds=(0, 1))
    one = [make(cfg, M, seeds=(s,)) for s in (0, 1)]
    assert torch.equal(both.S, torch.cat([c.S for c in one]))
    assert torch.equal(both.B, torch.cat([c.B for c in one]))


def test_accepts_omegaconf_config():
    cfg = OmegaConf.create(
        {"name": "sgc", "d": 3, "allocation": "cyclic", "offsets": [0, 1, 3], "decode": "fixed", "partitions": None}
    )
    code = make(cfg, 7)
    assert code.N == 7 and code.d == 3 and num_partitions(cfg, 7) == 7


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "cfg,M,key",
    [
        ({"name": "frc", "d": 4}, 6, "code.d"),
        ({"name": "crc", "d": 7}, 6, "code.d"),
        ({"name": "sgc", "d": 0}, 6, "code.d"),
        ({"name": "sgc", "d": 2.5}, 6, "code.d"),
        ({"name": "bgc", "d": "3"}, 6, "code.d"),
        ({"name": "crc", "d": 2, "decode": "fixed"}, 6, "code.decode"),
        ({"name": "uncoded", "decode": "optimal"}, 6, "code.decode"),
        ({"name": "sgc", "d": 2, "decode": "exact"}, 6, "code.decode"),
        ({"name": "sgc", "d": 2, "allocation": "spiral"}, 6, "code.allocation"),
        ({"name": "sgc", "d": 3, "offsets": [0, 1]}, 7, "code.offsets"),
        ({"name": "sgc", "d": 2, "offsets": [0, 7]}, 7, "code.offsets"),
        ({"name": "sgc", "d": 2, "offsets": [0, 1], "allocation": "random"}, 7, "code.offsets"),
        ({"name": "crc", "d": 2, "partitions": 8}, 6, "code.partitions"),
        ({"name": "sgc", "d": 2, "partitions": 0}, 6, "code.partitions"),
        ({"name": "sgc", "d": 2, "partitions": 20}, 6, "code.partitions"),
        ({"name": "sgc", "d": 2, "partitions": 20, "allocation": "random"}, 6, "code.partitions"),
        ({"name": "mds"}, 6, "code"),
    ],
)
def test_bad_config_raises_config_error_naming_the_key(cfg, M, key):
    with pytest.raises(ConfigError) as err:
        allocate(cfg, M, SeedRNG([0], "code"))
    assert err.value.key == key


def test_frc_error_lists_divisors():
    with pytest.raises(ConfigError) as err:
        allocate({"name": "frc", "d": 4}, 6, SeedRNG([0], "code"))
    assert err.value.accepted == "1, 2, 3, 6"


def test_d_above_devices_lists_range():
    with pytest.raises(ConfigError) as err:
        allocate({"name": "crc", "d": 9}, 6, SeedRNG([0], "code"))
    assert err.value.accepted == "integers 1..6"


def test_residual_tolerance_is_a_small_named_constant():
    assert 0 < RESIDUAL_TOL <= 1e-8


# ----------------------------------------------------------------------------- crc constructions, conditioning
@pytest.mark.parametrize("M,d", [(12, 2), (12, 3), (12, 4), (12, 5), (13, 2), (13, 3), (9, 4), (20, 3), (7, 6)])
def test_crc_cyclic_mds_is_exact_for_every_straggler_set(M, d):
    """Both parities of M − d (cyclic and negacyclic): every set of ≤ d−1 stragglers decodes."""
    from cocoef_cli.sim.codes import conditioning, straggler_sets

    code = make({"name": "crc", "d": d, "construction": "cyclic_mds"}, M, seeds=(0,))
    B, S = code.B[0], code.S[0]
    assert ((B != 0) <= S).all() and torch.equal(torch.diagonal(B), torch.ones(M, dtype=F64))
    assert torch.linalg.matrix_rank(B).item() == M - (d - 1)
    sets, exhaustive = straggler_sets(M, range(d), 10**6)
    assert exhaustive and len(sets) == sum(len(list(itertools.combinations(range(M), k))) for k in range(d))
    rep = conditioning(code, sets)
    assert rep["worst_residual"] <= 1e-6
    assert rep["max_abs_a_worst"] < 10, rep  # well conditioned at these sizes (Tandon's random H: thousands)


def test_crc_constructions_are_seeded_and_better_conditioned_than_random():
    from cocoef_cli.sim.codes import conditioning, straggler_sets

    M, d = 12, 3
    sets, _ = straggler_sets(M, range(d), 10**6)
    worst = {
        c: conditioning(make({"name": "crc", "d": d, "construction": c, "candidates": 8}, M, seeds=(0, 1)), sets)[
            "max_abs_a_worst"
        ]
        for c in ("random", "best_random", "cyclic_mds")
    }
    assert worst["cyclic_mds"] < worst["best_random"] <= worst["random"]
    a = make({"name": "crc", "d": d, "construction": "best_random", "candidates": 8}, M, seeds=(3,)).B
    b = make({"name": "crc", "d": d, "construction": "best_random", "candidates": 8}, M, seeds=(3,)).B
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "crc", "d": 3, "construction": "dft"}, "code.construction"),
        ({"name": "crc", "d": 3, "construction": "best_random", "candidates": 0}, "code.candidates"),
    ],
)
def test_crc_construction_keys_are_validated(cfg, key):
    with pytest.raises(ConfigError, match=key):
        allocate(cfg, 12, SeedRNG([0], "code"))


def test_conditioning_of_frc_uses_its_group_decoder_and_sgc_spread_is_unbiased():
    from cocoef_cli.sim.codes import conditioning, coverage_spread, straggler_sets

    frc = make({"name": "frc", "d": 3}, 12, seeds=(0,))
    rep = conditioning(frc, straggler_sets(12, range(3), 10**6)[0])
    assert rep["max_abs_a_worst"] == 1.0 and rep["worst_residual"] == pytest.approx(0.0, abs=1e-12)
    sgc = make({"name": "sgc", "d": 3}, 12, seeds=(0,), p=0.25)
    g = torch.Generator().manual_seed(0)
    draws = [torch.rand(1, 12, generator=g) >= 0.25 for _ in range(4000)]
    sp = coverage_spread(sgc, draws)
    assert sp["bias"] < 0.05 and 0.1 < sp["spread"] < 1.0 and sp["max_abs_a"] == 1.0


def test_best_random_searches_once_per_process_for_the_same_draws(monkeypatch):
    """The best_random search is kept per candidate draw: a second build with the same seeds (the
    config check, then the build, then the next job of a sweep worker) reuses it and gives the same
    B; another seed searches again; a replicate set that contains the first seed reuses its part."""
    from cocoef_cli.sim import codes

    monkeypatch.setattr(codes, "_BEST", {})
    calls = []
    real = codes._weights_over_sets
    monkeypatch.setattr(codes, "_weights_over_sets", lambda B, sets, *a: calls.append(B.shape) or real(B, sets, *a))
    cfg = {"name": "crc", "d": 3, "construction": "best_random", "candidates": 8}
    first = make(cfg, 12, seeds=(3,)).B
    assert len(calls) == 1 and torch.equal(make(cfg, 12, seeds=(3,)).B, first) and len(calls) == 1
    both = make(cfg, 12, seeds=(3, 4)).B
    assert len(calls) == 2 and torch.equal(both[0], first[0])
