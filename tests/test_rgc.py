"""The approximate sparse random graph code ``rgc`` (Charles et al. 2017): allocation, decoders, residual."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cocoef_cli.errors import ConfigError
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.codes import Code, allocate, build_code, conditioning, straggler_sets

F64 = torch.float64


def make(M: int, d: int, seeds=(0, 1), decode: str = "optimal") -> Code:
    cfg = {"name": "rgc", "d": d, "decode": decode}
    rng = SeedRNG(list(seeds), "code")
    S = allocate(cfg, M, rng)
    return build_code(cfg, S, torch.zeros(len(seeds), M, dtype=F64), rng, F64)


def survivors(M: int, stragglers, R: int) -> torch.Tensor:
    z = torch.ones(R, M, dtype=torch.bool)
    z[:, list(stragglers)] = False
    return z


@pytest.mark.parametrize("M,d", [(12, 3), (20, 4), (7, 1), (9, 9)])
def test_allocation_is_d_regular_seeded_and_random(M, d):
    code = make(M, d, seeds=(0, 1, 2))
    assert (code.S.sum(2) == d).all() and (code.S.sum(1) == d).all()  # d per device and per partition
    assert torch.equal(code.B, code.S.to(F64) / d)
    assert torch.equal(make(M, d, seeds=(0, 1, 2)).S, code.S)  # seeded
    assert torch.equal(make(M, d, seeds=(1,)).S[0], code.S[1])  # a replicate's S is its seed's
    if 1 < d < M:  # not every draw is the cyclic layout, and replicates differ
        assert not torch.equal(code.S[0], code.S[1])


def test_optimal_decoder_is_the_min_norm_least_squares_of_numpy():
    code, M = make(12, 3, seeds=(0, 1, 2)), 12
    gen = np.random.default_rng(5)
    for _ in range(20):
        st = gen.choice(M, size=int(gen.integers(0, 5)), replace=False)
        z = survivors(M, st, code.R)
        a, res = code.decode(z)
        for r in range(code.R):
            BF = code.B[r].numpy() * z[r].numpy()[:, None]
            want = np.linalg.lstsq(BF.T, np.ones(M), rcond=None)[0]  # min-norm solution
            np.testing.assert_allclose(a[r].numpy(), want, atol=1e-10)
            assert a[r, list(st)].abs().max().item() == 0 if len(st) else True
            r_want = np.linalg.norm(want @ BF - 1)
            assert res[r].item() == pytest.approx(r_want if r_want > 1e-9 else 0.0, abs=1e-10)


def test_residual_is_zero_without_stragglers_and_grows_on_nested_straggler_sets():
    code, M = make(12, 3, seeds=(0, 1, 2)), 12
    assert (code.decode(survivors(M, (), code.R))[1] == 0).all()
    order = torch.randperm(M, generator=torch.Generator().manual_seed(0)).tolist()
    prev = torch.zeros(code.R, dtype=F64)
    for s in range(1, 7):  # F' ⊂ F ⇒ ‖e(F')‖ ≥ ‖e(F)‖ (a smaller row span)
        res = code.decode(survivors(M, order[:s], code.R))[1]
        assert (res >= prev - 1e-12).all()
        prev = res
    assert (prev > 0.1).all()  # six stragglers of 12: not exact (an approximate code)


def test_onestep_weights_and_unbiasedness_over_every_straggler_set():
    M, d, s = 8, 3, 2
    one, opt = make(M, d, decode="onestep"), make(M, d, decode="optimal")
    cover = torch.zeros(one.R, M, dtype=F64)
    sets = list(itertools.combinations(range(M), s))
    for st in sets:
        z = survivors(M, st, one.R)
        a, res = one.decode(z)
        assert torch.allclose(a, z.to(F64) * M / (M - s))
        e = torch.einsum("rm,rmn->rn", a, one.B) - 1
        assert torch.allclose(res, torch.linalg.vector_norm(e, dim=-1))
        assert (opt.decode(z)[1] <= res + 1e-12).all()  # least squares is the smallest residual
        cover += e + 1
    assert torch.allclose(cover / len(sets), torch.ones_like(cover))  # E[aᵀB] = 1ᵀ over uniform sets


def test_conditioning_reports_small_weights_and_the_residual():
    code = make(12, 3, seeds=(0,))
    sets, exhaustive = straggler_sets(12, range(3), 5000)
    c = conditioning(code, sets)
    assert exhaustive and c["max_abs_B"] == pytest.approx(1 / 3)
    assert 1 <= c["max_abs_a_worst"] < 100 and c["worst_residual"] > 0.1


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "rgc", "d": 3, "decode": "exact"}, "code.decode"),
        ({"name": "rgc", "partitions": 10}, "code.partitions"),
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ConfigError) as e:
        allocate(cfg, 12, SeedRNG([0], "code"))
    assert e.value.key == key


def test_crc_presets_are_crc_with_a_construction_and_show_its_keys():
    """code=crc_random is code=crc code.construction=random: the same config, run_id and keys."""
    from cocoef_cli import config, explain
    from cocoef_cli.record import run_id

    for how in ("random", "best_random"):
        a, b = config.load([f"code=crc_{how}"]), config.load(["code=crc", f"code.construction={how}"])
        assert a["code"] == b["code"] and run_id(a) == run_id(b)
        text = explain.show("code", f"crc_{how}")
        assert f"code.construction  {how}" in text and "code.candidates" in text and "code.defaults" not in text
