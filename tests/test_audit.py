"""Conditioning records and fidelity warnings (cocoef_cli/sim/audit.py): stderr at config-check time, run.json."""

import json

import pytest
from typer.testing import CliRunner

from cocoef_cli.cli import app
from cocoef_cli.sim.audit import WEIGHT_BOUND

runner = CliRunner()
SMALL = [
    "dataset.n=240",
    "dataset.dim=6",
    "devices=12",
    "iters=4",
    "eval_every=2",
    "precision=float64",
    "straggler=fixed",
    "straggler.s=2",
]


def _run(tmp_path, *overrides):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", *SMALL, *overrides, "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return res, json.loads((out / "run.json").read_text())


def test_random_crc_with_a_biased_compressor_warns_on_stderr_and_in_run_json(tmp_path):
    res, rec = _run(tmp_path, "code=crc", "code.d=3", "code.construction=random", "compressor=topk")
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: code=crc")]
    assert len(lines) == 1 and "max|a_i|" in lines[0] and "cyclic_mds" in lines[0]
    cond = rec["code_conditioning"]
    assert cond["kind"] == "decoding" and cond["construction"] == "random" and cond["exhaustive"]
    assert cond["max_abs_a_worst"] > WEIGHT_BOUND and cond["worst_residual"] < 1e-6
    assert len(rec["warnings"]) == 1 and rec["warnings"][0] in lines[0]


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "code=crc",
            "code.d=3",
            "code.construction=random",
            "compressor=randk_unbiased",
            "method=coco",
        ],  # unbiased compressor
        ["code=frc", "code.d=3", "compressor=scaled_sign"],
        ["code=crc", "code.d=3", "compressor=topk", "method=coco"],  # no error feedback: crc ends level with frc
    ],
)
def test_no_warning_for_well_conditioned_codes_or_unbiased_compressors(tmp_path, overrides):
    res, rec = _run(tmp_path, *overrides)
    assert "warning:" not in res.stderr and rec["warnings"] == []
    assert rec["code_conditioning"]["kind"] == "decoding"


def test_the_default_crc_with_a_biased_compressor_warns_with_the_measured_figure(tmp_path):
    """Well-conditioned crc (weights below the bound) still ends a multiple of frc's gap under a
    biased compressor at tuned step sizes (figure 9): one warning naming safer codes, not the
    max|a_i| one; an unbiased compressor on the same code gives none."""
    res, rec = _run(tmp_path, "code=crc", "code.d=3", "compressor=topk")
    assert rec["code_conditioning"]["max_abs_a_worst"] < WEIGHT_BOUND
    (w,) = rec["warnings"]
    assert w.startswith("code=crc (construction=cyclic_mds) with the biased compressor topk") and "code=frc" in w
    assert "max|a_i|" not in w and f"warning: {w}" in res.stderr
    _, rec = _run(tmp_path / "u", "code=crc", "code.d=3", "compressor=randk_unbiased", "method=coco")
    assert rec["warnings"] == []


def test_sgc_records_the_spread_of_its_coverage(tmp_path):
    _, rec = _run(tmp_path, "code=sgc", "code.d=3")
    cond = rec["code_conditioning"]
    assert cond["kind"] == "expectation" and cond["draws"] > 0 and cond["spread"] > 0 and "max_abs_a_worst" not in cond


@pytest.mark.parametrize("method,warns", [("coco_ef", True), ("ef_sgd", True), ("coco", False)])
def test_unscaled_sign_under_error_feedback_warns(tmp_path, method, warns):
    res, rec = _run(tmp_path, f"method={method}", "compressor=sign", "code=frc", "code.d=3")
    hit = [w for w in rec["warnings"] if w.startswith("compressor=sign")]
    assert bool(hit) == warns and (f"warning: compressor=sign with method={method}" in res.stderr) == warns
