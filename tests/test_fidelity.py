"""Fidelity details of issue 16: stale shifts (DIANA-PP / EF21-PP style), sgc's assumed p, dirichlet on regression."""

import numpy as np
import pytest
import torch

from cocoef_cli.data import partition_indices
from cocoef_cli.errors import ConfigError
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.codes import CodedSum, allocate, build_code
from cocoef_cli.sim.compressors import build_compressor
from cocoef_cli.sim.methods import METHODS

F64 = torch.float64


def _code(cfg, M, p=0.0):
    rng = SeedRNG([0], "code")
    S = allocate(cfg, M, rng)
    return build_code(cfg, S, torch.full((1, M), p, dtype=F64), rng, F64)


def _method(name, stale, D, M, comp="identity"):
    return METHODS.get(name)(
        {"stale_shifts": stale},
        build_compressor({"name": comp}, D),
        1,
        M,
        D,
        F64,
        torch.device("cpu"),
        SeedRNG([0], "compressor"),
    )


def test_full_weights_decode_every_code_without_stragglers():
    for cfg in [{"name": "crc", "d": 3}, {"name": "frc", "d": 2}, {"name": "sgc", "d": 3}, {"name": "uncoded"}]:
        code = _code(cfg, 6, p=0.2 if cfg["name"] == "sgc" else 0.0)
        abar = code.full_weights().to(F64)
        torch.testing.assert_close(abar[0] @ code.dense(F64)[0], torch.ones(6, dtype=F64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["coco_ef21", "coco_diana"])
def test_stale_shifts_keep_a_stragglers_last_shift_in_the_estimate(name):
    M, D = 4, 3
    code = _code({"name": "uncoded"}, M)
    G = torch.randn(1, M, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    z_all, z = torch.ones(1, M, dtype=torch.bool), torch.tensor([[True, True, True, False]])
    a_all = code.decode(z_all)[0]
    a = code.decode(z)[0]
    out = {}
    for stale in (False, True):
        m = _method(name, stale, D, M)
        m.coded_step(CodedSum(code, [G], z_all), z_all, a_all)  # every shift h_i = g_i (identity C)
        G2 = 2 * G
        out[stale] = m.coded_step(CodedSum(code, [G2], z), z, a)
        assert torch.equal(m.h[0, 3], G[0, 3])  # the straggler's shift stays as last received
    full = G2[0].sum(0)
    # default: the straggler's shift drops out (rescaled survivors); stale: it counts with its stale value
    torch.testing.assert_close(out[False][0], a[0] @ G2[0])
    if name == "coco_ef21":  # Σ_i ā_i h_i, h_3 stale
        torch.testing.assert_close(out[True][0], full - G2[0, 3] + G[0, 3])
    else:  # DIANA-PP: Σ_i ā_i h_i (all stored shifts) + Σ_i a_i Δ_i (the survivors' new differences)
        torch.testing.assert_close(out[True][0], G[0].sum(0) + a[0] @ (G2 - G)[0])


def test_stale_shifts_equal_the_default_when_everyone_answers():
    M, D = 6, 5
    code = _code({"name": "crc", "d": 3}, M)
    z = torch.ones(1, M, dtype=torch.bool)
    a = code.decode(z)[0]
    g = torch.Generator().manual_seed(1)
    ms = {s: _method("coco_ef21", s, D, M, comp="topk") for s in (False, True)}
    for _ in range(3):
        G = torch.randn(1, M, D, dtype=F64, generator=g)
        r = {s: m.coded_step(CodedSum(code, [G], z), z, a) for s, m in ms.items()}
        torch.testing.assert_close(r[True], r[False], atol=1e-10, rtol=0)


def test_stale_shifts_is_a_boolean():
    with pytest.raises(ConfigError, match=r"method\.stale_shifts"):
        _method("coco_ef21", "yes", 3, 2)


def test_sgc_p_assumed_rescales_the_weights():
    true_p = _code({"name": "sgc", "d": 3}, 6, p=0.2)
    assumed = _code({"name": "sgc", "d": 3, "p_assumed": 0.5}, 6, p=0.2)
    default = _code({"name": "sgc", "d": 3, "p_assumed": None}, 6, p=0.2)
    assert torch.equal(default.B, true_p.B)
    torch.testing.assert_close(assumed.B * 0.5, true_p.B * 0.8)  # 1/(c(1−p̂)) vs 1/(c(1−p))
    with pytest.raises(ConfigError, match=r"code\.p_assumed"):
        _code({"name": "sgc", "d": 3, "p_assumed": 1.0}, 6)


def test_dirichlet_partition_is_rejected_on_regression_and_kept_on_classes():
    with pytest.raises(ConfigError, match=r"dataset\.partition"):
        partition_indices(np.linspace(0, 1, 50), 5, {"partition": "dirichlet"}, [0])
    parts = partition_indices(np.arange(50) % 3, 5, {"partition": "dirichlet", "alpha": 0.5}, [0])
    assert sorted(parts[parts < 50].tolist()) == list(range(50))


def test_final_figure_draws_a_categorical_x_in_the_given_order(tmp_path):
    import pandas as pd

    from cocoef_cli.report import final_figure

    rows = pd.DataFrame(
        [
            {"label": "A", "code": c, "iter": t, "opt_gap": g * (1 + t), "seed": 0, "status": "completed", "run": c}
            for c, g in [("sgc", 1.0), ("frc", 2.0), ("crc", 3.0)]
            for t in (0, 10)
        ]
    )
    out = final_figure(rows, "code", "opt_gap", "label", tmp_path / "f.png", x_order=["frc", "crc", "sgc", "bgc"])
    assert out.exists() and out.stat().st_size > 1000
