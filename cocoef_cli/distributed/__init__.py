"""``runtime=torch_distributed``: a server process and M device processes on torch.distributed (gloo).

docs/design.md §10. The server (rank 0, the process that runs ``cocoef run``) holds the model θ, the code's
decoder and the evaluation data; device i (rank i + 1, its own process) holds only its partitions,
computes u_i = Σ_j B_ij g_j, applies the method (error feedback included) and sends a compact message
(:mod:`~cocoef_cli.distributed.wire`). With ``runtime.replay=true`` the straggler pattern is the
simulator's seeded draw and ``metrics.csv`` equals the simulator's; without it stragglers are real
(sleeps and a deadline). Modules: ``options`` (validated keys), ``wire`` (payload codecs),
``transport`` (rendezvous, the token-checked set-up messages — JSON and typed arrays, no pickle — and
the message layouts; docs/runtime.md), ``device`` (a device process), ``server`` (the server
and the process lifecycle). The commands that start ranks are in :mod:`cocoef_cli.runtime`
(``python -m cocoef_cli.runtime`` under torchrun: rank 0 = server, which takes the overrides and
``--out``, or one device process per host).
"""

from __future__ import annotations


def run_distributed(exp, run_id: str = "", progress=None):
    """Run ``exp`` on real processes; returns the simulator's RunResult (+ ``runtime`` details)."""
    from cocoef_cli.distributed.server import run_distributed as _run

    return _run(exp, run_id, progress)


__all__ = ["run_distributed"]
