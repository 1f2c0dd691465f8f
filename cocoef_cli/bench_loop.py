"""The straightforward COCO-EF implementation research code usually has: a Python loop over devices.

Each answering device computes its own d partition gradients with autograd, encodes them, adds its
error memory, compresses, keeps the new error, and the server sums a_i·m_i. Same algorithm, same
seeded draws as the vectorised simulator (``cocoef_cli.sim.engine.simulate``), so the two agree to
float tolerance; ``cocoef bench`` times both side by side. One replicate (seeds=1) only.
"""

from __future__ import annotations

import torch

from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.engine import RunParts, step_size


def loop_coco_ef(exp: RunParts, iters: int) -> list[torch.Tensor]:
    """Run ``iters`` COCO-EF updates device by device; returns θ after each update (each (D,))."""
    obj, code, C = exp.objective, exp.code, exp.method.C
    model, n, l2 = obj.model, obj.n, obj.l2
    assert obj.R == 1, "the loop baseline runs one replicate"
    M, D = code.M, model.D
    parts = [(obj.Xp[0, j][obj.valid[0, j]], obj.Yp[0, j][obj.valid[0, j]]) for j in range(code.N)]
    held = [torch.nonzero(code.S[0, i]).flatten().tolist() for i in range(M)]
    B = code.B[0]
    theta = model.init(SeedRNG(exp.seeds, "init", exp.device), exp.dtype)[0]
    errors = [torch.zeros(D, dtype=exp.dtype) for _ in range(M)]
    out = []
    for t in range(1, iters + 1):
        z = exp.straggler.draw()
        a, _ = code.decode(z)
        g = torch.zeros(D, dtype=exp.dtype)
        for i in range(M):
            if not z[0, i]:
                continue  # a straggler computes and sends nothing; its memory is kept
            u = torch.zeros(D, dtype=exp.dtype)
            for j in held[i]:
                X, Y = parts[j]
                th = theta.detach().requires_grad_(True)
                loss = model.losses(model.logits(th.unsqueeze(0), X), Y).sum() / n
                if l2:
                    loss = loss + 0.5 * l2 * len(Y) / n * th.dot(th)
                u += B[i, j] * torch.autograd.grad(loss, th)[0]
            v = u + errors[i]
            m = C.compress(v.view(1, 1, D), exp.method.rng).view(D)
            errors[i] = v - m
            g += a[0, i] * m
        theta = theta - step_size(exp.cfg["optim"], t) * g
        out.append(theta.detach().clone())
    return out
