"""An independent plain-numpy simulator of one run, for the trajectory tests (test_reference_*.py).

It follows docs/design.md §1–§5 and the published updates, one device at a time, in float64:
  g_j = (1/n) Σ_{s∈P_j} ∇ℓ_s(θ) + (|P_j|/n) λ θ,   u_i = Σ_j B_ij g_j,
  COCO-EF / EF (Stich et al. 2018, Karimireddy et al. 2019): v = u + e, m = C(v), e ← v − m;
  DIANA (Mishchenko et al. 2019): Δ = C(u − h), message h + Δ, h ← h + αΔ;
  EF21 (Richtárik et al. 2021): h ← h + C(u − h), message h;
  ĝ = Σ_i a_i m_i,  buf ← μ buf + ĝ (μ = 0: buf = ĝ),  θ ← θ − η_t buf.
Only what is data or randomness comes from the package: the dataset (``load_dataset``), the
partition indices (``partition_indices``) and the straggler masks z^t, drawn by a fresh copy of the
run's straggler model on the same seeded stream (``SeedRNG(seeds, "straggler")``), which is exactly
what the run draws, and, with ``model.init=normal``, the standard normal draws of the init stream. Codes (S, B), decoding weights, compressors, bits, losses, gradients, schedules
and updates are written here again.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cocoef_cli.data import load_dataset, partition_indices
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.stragglers import build_straggler

UNCODED_METHODS = {"ef_sgd": "coco_ef", "ignore_stragglers": "gc"}  # docs/design.md §5: uncoded, rescaled


# ------------------------------------------------------------------------------------- models
def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def softmax(Z):
    E = np.exp(Z - Z.max(-1, keepdims=True))
    return E / E.sum(-1, keepdims=True)


class Model:
    """ℓ and ∇ℓ of the GLMs with θ = vec(W), W (C, f+1) class-major, bias as the last column."""

    def __init__(self, name: str, C: int):
        self.name, self.C = name, C

    def logits(self, theta, X):
        return X @ theta.reshape(self.C, -1).T  # (n, C)

    def losses(self, theta, X, y):
        Z = self.logits(theta, X)
        if self.name == "linear":
            return 0.5 * (Z[:, 0] - y) ** 2
        if self.name == "logistic":
            z = Z[:, 0]
            return np.logaddexp(0.0, z) - y * z
        m = Z.max(-1)
        return m + np.log(np.exp(Z - m[:, None]).sum(-1)) - Z[np.arange(len(y)), y]

    def grad_sum(self, theta, X, y):
        """Σ_s ∇ℓ_s(θ) over the rows of X."""
        Z = self.logits(theta, X)
        if self.name == "linear":
            E = Z - y[:, None]
        elif self.name == "logistic":
            E = sigmoid(Z) - y[:, None]
        else:
            E = softmax(Z) - np.eye(self.C)[y]
        return (E.T @ X).ravel()

    def correct(self, theta, X, y):
        Z = self.logits(theta, X)
        if self.name == "linear":
            return None
        pred = (Z[:, 0] > 0).astype(int) if self.name == "logistic" else Z.argmax(-1)
        return (pred == y).mean()


# ------------------------------------------------------------------------------------- compressors
def sgn(v):
    return np.where(v < 0, -1.0, 1.0)


def compress(cfg: dict, v: np.ndarray) -> np.ndarray:
    """C(v) of one message (docs/design.md §4), deterministic compressors only."""
    name, D = cfg["name"], len(v)
    if name == "identity":
        return v.copy()
    if name == "topk":
        keep = np.argsort(-np.abs(v), kind="stable")[: topk_k(cfg, D)]  # ties: the lower index first
        out = np.zeros(D)
        out[keep] = v[keep]
        return out
    if name == "sign":
        return sgn(v)
    if name == "scaled_sign":
        return np.abs(v).sum() / D * sgn(v)
    if name == "grouped_sign":
        out, g = np.empty(D), cfg["group"]
        for s in range(0, D, g):
            out[s : s + g] = np.abs(v[s : s + g]).mean() * sgn(v[s : s + g])
        return out
    raise ValueError(f"no numpy reference for compressor {name}")


def topk_k(cfg: dict, D: int) -> int:
    return cfg["k"] if cfg.get("k") is not None else max(1, math.ceil(round(cfg["ratio"] * D, 9)))


def bits(cfg: dict, D: int) -> int:
    """Bits of one message (docs/design.md §4, value_bits 32, topk index_bits log2)."""
    name = cfg["name"]
    if name == "identity":
        return 32 * D
    if name == "topk":
        return topk_k(cfg, D) * (32 + math.ceil(math.log2(D)))
    if name == "sign":
        return D
    if name == "scaled_sign":
        return D + 32
    return D + 32 * math.ceil(D / cfg["group"])  # grouped_sign


# ------------------------------------------------------------------------------------- codes
def encoding(code: dict, M: int, p: float) -> np.ndarray:
    """B (M, N = M) of docs/design.md §2: uncoded I; sgc cyclic S/(d(1−p)); frc block-diagonal ones."""
    d = code.get("d", 1)
    if code["name"] == "uncoded":
        return np.eye(M)
    S = np.zeros((M, M))
    for i in range(M):
        if code["name"] == "sgc":
            S[i, [(i + o) % M for o in range(d)]] = 1.0
        else:  # frc: group ⌊i/d⌋ holds partitions of that group
            g = i // d
            S[i, g * d : (g + 1) * d] = 1.0
    return S / (d * (1.0 - p)) if code["name"] == "sgc" else S


def decode(code: dict, z: np.ndarray, p: float) -> np.ndarray:
    """Decoding weights a (M,): sgc a = z; uncoded rescale z·M/Σz or unbiased z/(1−p); frc weight 1
    on the lowest-index survivor of every group."""
    M = len(z)
    zf = z.astype(float)
    if code["name"] == "sgc":
        return zf
    if code["name"] == "uncoded":
        if code.get("decode", "rescale") == "unbiased":
            return zf / (1.0 - p)
        return zf * M / zf.sum() if zf.sum() > 0 else np.zeros(M)
    a, d = np.zeros(M), code["d"]
    for g in range(M // d):
        alive = np.flatnonzero(z[g * d : (g + 1) * d])
        if len(alive):
            a[g * d + alive[0]] = 1.0
    return a


# ------------------------------------------------------------------------------------- schedule
def lr(optim: dict, t: int) -> float:
    eta = optim["lr"]
    if optim["schedule"] == "const":
        return eta
    if optim["schedule"] == "inv_sqrt":
        return eta / math.sqrt(t)
    return eta * optim["gamma"] ** ((t - 1) // optim["step_size"])


# ------------------------------------------------------------------------------------- the run
def straggler_masks(cfg: dict, loads: np.ndarray, seeds: list[int], T: int) -> list[np.ndarray]:
    """z^1..z^T (R, M) bool from a fresh copy of the run's straggler model on its seeded stream."""
    model = build_straggler(cfg["straggler"], torch.as_tensor(loads), SeedRNG(seeds, "straggler"))
    return [model.draw().numpy() for _ in range(T)]


def simulate(cfg: dict) -> list[dict]:
    """The metrics rows of ``cfg`` (full partition gradients), one dict per (seed, evaluated t)."""
    method, mcfg = cfg["method"]["name"], cfg["method"]
    T, every, M = cfg["iters"], cfg["eval_every"], cfg["devices"]
    seeds = [cfg["seed"] + r for r in range(cfg["seeds"])]
    data = load_dataset(cfg["dataset"])
    model = Model(cfg["model"]["name"], 1 if cfg["model"]["name"] != "softmax" else data.n_classes)
    lam = cfg["model"].get("l2", 0.0)
    X = np.hstack([data.X_train, np.ones((data.n, 1))])
    Xte = np.hstack([data.X_test, np.ones((len(data.y_test), 1))])
    y, yte, n = data.y_train, data.y_test, data.n
    D = X.shape[1] * model.C
    code = {"name": "uncoded", "d": 1} if method in UNCODED_METHODS else cfg["code"]
    kind = UNCODED_METHODS.get(method, method)
    comp = cfg["compressor"] if kind in ("coco_ef", "coco", "coco_diana", "coco_ef21") else {"name": "identity"}
    p = cfg["straggler"].get("p", 0.0) if cfg["straggler"]["name"] != "none" else 0.0
    B = encoding(code, M, p)
    alpha = mcfg.get("alpha") or 1.0  # DIANA: explicit α, or 1/(ω+1) = 1 for the identity (ω = 0)
    reset = mcfg.get("straggler_state", "freeze") == "reset"
    optim = cfg["optim"]
    mu = optim.get("momentum", 0.0)
    parts = partition_indices(y, M, cfg["dataset"], seeds) if method != "gd" else None
    masks = straggler_masks(cfg, np.tile(B.astype(bool).sum(1), (len(seeds), 1)), seeds, T) if method != "gd" else None

    def F(th):
        return model.losses(th, X, y).mean() + 0.5 * lam * th @ th

    def gradF(th):
        return model.grad_sum(th, X, y) / n + lam * th

    f_star = None
    if model.name == "linear":  # min F: the ridge normal equations (XᵀX/n + λI) w = Xᵀy/n
        w = np.linalg.lstsq(X.T @ X / n + lam * np.eye(X.shape[1]), X.T @ y / n, rcond=None)[0]
        f_star = F(w)

    rows = []
    for r, seed in enumerate(seeds):
        theta, buf = np.zeros(D), np.zeros(D)
        if cfg["model"].get("init") == "normal":  # θ⁰ = init_scale · N(0, I), drawn from the run's init stream
            theta = cfg["model"]["init_scale"] * SeedRNG([seed], "init").randn(D, dtype=torch.float64).numpy()[0]
        state = np.zeros((M, D))  # e (EF) or h (DIANA, EF21)
        sent_bits, received = 0, None
        for t in range(T + 1):
            if t > 0:
                if method == "gd":
                    g = gradF(theta)
                else:
                    z = masks[t - 1][r]
                    a = decode(code, z, p)
                    P = [idx[idx < n] for idx in parts[r]]
                    G = np.stack([model.grad_sum(theta, X[i], y[i]) / n + len(i) / n * lam * theta for i in P])
                    g = np.zeros(D)
                    for i in range(M):
                        if not z[i]:
                            if reset:
                                state[i] = 0.0
                            continue
                        u = B[i] @ G
                        if kind == "coco_ef":
                            v = u + state[i]
                            m = compress(comp, v)
                            state[i] = v - m
                        elif kind == "coco":
                            m = compress(comp, u)
                        elif kind == "coco_diana":
                            delta = compress(comp, u - state[i])
                            m = state[i] + delta
                            state[i] = state[i] + alpha * delta
                        elif kind == "coco_ef21":
                            state[i] = state[i] + compress(comp, u - state[i])
                            m = state[i]
                        else:  # gc
                            m = u
                        g += a[i] * m
                    received = int(z.sum())
                    sent_bits += received * bits(comp, D)
                buf = mu * buf + g if mu else g
                theta = theta - lr(optim, t) * buf
            if t % every == 0 or t == T:
                rows.append(
                    {
                        "seed": seed,
                        "iter": t,
                        "train_loss": F(theta),
                        "grad_norm": np.linalg.norm(gradF(theta)),
                        "test_loss": model.losses(theta, Xte, yte).mean(),
                        "test_acc": model.correct(theta, Xte, yte),
                        "ef_norm": np.linalg.norm(state) if kind in ("coco_ef", "coco_diana", "coco_ef21") else None,
                        "bits_up": None if method == "gd" else sent_bits,
                        "n_received": None if t == 0 or method == "gd" else received,
                        "opt_gap": None if f_star is None else F(theta) - f_star,
                    }
                )
    return rows
