"""Audit of a built run: how its code conditions compression errors, and the fidelity warnings.

:func:`code_report` measures a code over straggler sets (decoding codes: residual, max|B_ij|,
max|a_i|, ‖a‖₂, see :func:`cocoef_cli.sim.codes.conditioning`) or over straggler draws
(fixed-weight codes, unbiased only in expectation: the spread of aᵀB − 1ᵀ, see
:func:`cocoef_cli.sim.codes.coverage_spread`). :func:`run_warnings` turns a report and the
method/compressor pair into one-line warnings (printed at config-check time, kept in run.json).

Bound: with exact weights, ĝ − ∇F = Σ_i a_i (m_i − u_i), so a compressor's error on one message
reaches ĝ multiplied by a_i. :data:`WEIGHT_BOUND` = 100 is the documented limit on the worst
max_i|a_i| beyond which a biased compressor is flagged. Measured (docs/codes.md, COCO-EF with
top-k 10%, 2 fixed stragglers, lr 0.05, 300 updates): frc (max|a| = 1) and crc cyclic_mds (max|a|
4.3 at M = 12, d = 3; 28 at M = 100, d = 4) end within 1.2× of each other, while Tandon's random
H (6.4·10^3 and 1.2·10^4) diverges to 10^86 and 10^54. At each code's tuned step size (figure 9)
crc cyclic_mds ends 3.4× (M = 12, Bernoulli) to 150× (M = 100, Bernoulli) above frc under
top-k with EF although its weights are below the bound: crc is warned about with every biased
compressor under error feedback (without it, crc ends level with frc).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.codes import CRC, Code, conditioning, coverage_spread, straggler_sets
from cocoef_cli.sim.compressors import Compressor
from cocoef_cli.sim.stragglers import build_straggler

#: Worst max_i |a_i| above which a decoding code with a biased compressor is warned about.
WEIGHT_BOUND = 100.0
#: Straggler sets (or draws) measured for run.json and the config-check warning.
RECORD_SETS = 100


def code_report(
    code: Code, code_cfg: Mapping, straggler_cfg: Mapping, seeds: list[int], max_sets: int = RECORD_SETS
) -> dict[str, Any]:
    """The conditioning of ``code`` (all its replicates): decoding codes over the straggler sets
    of size 0..d−1 (all of them when at most ``max_sets``, else ``max_sets`` drawn with numpy
    seed 0); fixed-weight codes over ``max_sets`` draws of the configured straggler model (a
    fresh copy of its stream: the run's draws are untouched)."""
    rep: dict[str, Any] = {"code": code.name, "M": code.M, "N": code.N, "d": code.d, "decode": code.decode_name}
    if code.name == "crc":
        rep["construction"] = CRC.construction(code_cfg, code.M, code.d)
    if code.fixed_weights:
        model = build_straggler(straggler_cfg, code.S.sum(-1), SeedRNG(seeds, "straggler"))
        rep.update(kind="expectation", draws=max_sets, **coverage_spread(code, [model.draw() for _ in range(max_sets)]))
        return rep
    sets, exhaustive = straggler_sets(code.M, range(min(code.d, code.M)), max_sets, seed=0)
    rep.update(kind="decoding", sets=len(sets), exhaustive=exhaustive, **conditioning(code, sets))
    return rep


def run_warnings(
    report: Mapping[str, Any] | None, compressor: Compressor, method_name: str, error_feedback: bool
) -> list[str]:
    """One-line warnings: a decoding code whose worst max|a_i| exceeds :data:`WEIGHT_BOUND`
    with a biased compressor; else crc (any construction) with a biased compressor under error
    feedback, whose measured final gap at tuned step sizes is a multiple of frc's (figure 9); unscaled ``sign``
    (not a δ-contraction) under error feedback."""
    out = []
    if (
        report is not None
        and report.get("kind") == "decoding"
        and not compressor.unbiased
        and report["max_abs_a_worst"] > WEIGHT_BOUND
    ):
        how = f" (construction={report['construction']})" if "construction" in report else ""
        options = ("code.construction=cyclic_mds",) * (report["code"] == "crc") + ("code=frc", "code=sgc")
        safer = [
            s
            for s in options
            if s != f"code.construction={report.get('construction')}" and s != f"code={report['code']}"
        ]
        out.append(
            f"code={report['code']}{how}: measured max|a_i| = {report['max_abs_a_worst']:.3g} > {WEIGHT_BOUND:g} "
            f"with the biased compressor {compressor.name}: compression errors are multiplied by the decoding "
            f"weights; safer: {', '.join(safer)}"
        )
    elif report is not None and report.get("code") == "crc" and not compressor.unbiased and error_feedback:
        out.append(
            f"code=crc (construction={report.get('construction')}) with the biased compressor {compressor.name}: "
            "its encoding coefficients have both signs, so each message is larger than what the decoded sum "
            "keeps and its compression error is too; measured (figure 9, docs/codes.md), COCO-EF with top-k "
            "10% at tuned step sizes ends 3.4-150x above frc; safer: code=frc, code=sgc, code=rgc"
        )
    if error_feedback and compressor.name == "sign":
        out.append(
            f"compressor=sign with method={method_name}: unscaled sign is not a δ-contraction "
            "(‖sign(x) − x‖ can exceed ‖x‖), error feedback has no guarantee; use scaled_sign or grouped_sign"
        )
    return out


def audit(
    code: Code | None,
    cfg: Mapping,
    seeds: list[int],
    compressor: Compressor,
    method_cls: type,
    max_sets: int = RECORD_SETS,
) -> tuple[dict[str, Any] | None, list[str]]:
    """(:func:`code_report` or None without a code, :func:`run_warnings`) for a built run."""
    from cocoef_cli.sim.methods import CocoEF

    with torch.no_grad():
        report = None if code is None else code_report(code, cfg["code"], cfg["straggler"], seeds, max_sets)
    return report, run_warnings(report, compressor, cfg["method"]["name"], issubclass(method_cls, CocoEF))


def audit_parts(parts: Any, cfg: Mapping, max_sets: int = RECORD_SETS) -> tuple[dict[str, Any] | None, list[str]]:
    """:func:`audit` of a run's :class:`~cocoef_cli.sim.engine.Assembly` (built at the smallest size:
    replicate 0, what ``run.json`` records and the config check prints)."""
    return audit(parts.code, cfg, parts.seeds, parts.compressor, type(parts.method), max_sets)


def audit_run(cfg: Mapping) -> tuple[dict[str, Any] | None, list[str]]:
    """:func:`audit_parts` of the run ``cfg`` assembled at the smallest size (replicate 0)."""
    from cocoef_cli.sim.engine import assemble

    return audit_parts(assemble(cfg, smallest=True), cfg)
