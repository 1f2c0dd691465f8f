"""Neural networks for the simulator: ``mlp`` and ``cnn``, trained with softmax cross-entropy.

The parameters of one replicate are one flat vector θ ∈ ℝ^D (layer by layer: weight, then bias);
the simulator holds θ for R replicates as (R, D). Both networks implement the model interface of
:mod:`cocoef_cli.models` (``features``, ``init``, ``logits``, ``weighted_grads``, ``losses``,
``correct``, ``full_grad``), with the loss

    ℓ(θ; x, y) = logsumexp(z) − z_y,   z = f_θ(x) ∈ ℝ^C   (C classes),

and the per-partition gradients Σ_b w_{rjb} ∇ℓ(θ_r; x_{rjb}, y_{rjb}) of all N partitions of all R
replicates computed in one batched pass (no loop over partitions or replicates):

- ``mlp``: a hand-written batched backward. The forward and the back-propagated errors
  δ_l = ∂(Σ w ℓ)/∂z_l are per sample and do not depend on the partition, so they are computed once
  for all R·N·B rows with R-batched products (with R > 1 the first layer is one product on the
  shared training set, :class:`Rows`); only the weight gradients are reduced per partition,
  ∇W_l[r, j] = δ_l[r, j]ᵀ A_{l−1}[r, j] (W_l stored (out, in); one ``bmm`` over the R·N partitions) and
  ∇b_l[r, j] = Σ_b δ_l[r, j, b]. Padding rows carry w = 0, hence δ = 0: sizes may differ exactly.
- ``cnn``: ``torch.func.vmap`` (over R, then over N) of ``torch.func.grad`` of the functional net.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as Fn

from cocoef_cli.checks import is_int, need_int
from cocoef_cli.data import Dataset
from cocoef_cli.errors import ConfigError
from cocoef_cli.rng import SeedRNG

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
# σ'(z) written with the activation a = σ(z), so the backward needs no pre-activations (relu's
# comparison writes floats: on CPU a bool tensor and then its cast cost ≈ 8× that)
DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda a: torch.gt(a, 0, out=torch.empty_like(a)),  # 1[a > 0] in a's dtype, written directly
    "tanh": lambda a: 1 - a * a,
    "sigmoid": lambda a: a * (1 - a),
}
INITS = ("torch", "kaiming", "xavier")


class PartitionTerms:
    """The partition gradients of one θ before their reduction per partition: the products and sums
    that form them from what a model computes once for every sample (its forward pass and errors),
    so that :meth:`write` can form any range of the R·N partition gradients (flattened: row
    r·N + j is g_j(θ_r)) when a consumer needs it. Block b of G is ``L_b[rows] @ X_b[rows]``
    (one batched product; X_b 2-D: shared by the rows) or, with X_b None, ``L_b[rows].sum(1)``."""

    def __init__(self, rows: int, terms: Sequence[tuple[torch.Tensor, torch.Tensor | None]]):
        self.rows, self.terms = rows, list(terms)

    def write(self, first: int, stop: int, out: Sequence[torch.Tensor]) -> None:
        """The blocks of G's rows [first, stop) into ``out`` (contiguous, stop − first rows each).
        A range of fewer rows than torch's threads is formed within a range of that many (or of all
        rows) and copied out: a batched product of fewer matrices than threads shares a matrix
        between threads and can round otherwise than the same matrix in a larger batch."""
        n = stop - first
        wide = min(self.rows, max(2, torch.get_num_threads()))
        if n < wide:
            lo = max(0, min(first, self.rows - wide))
            wider = [torch.empty((wide, *o.shape[1:]), dtype=o.dtype, device=o.device) for o in out]
            self.write(lo, lo + wide, wider)
            for o, w in zip(out, wider):
                o.copy_(w[first - lo : stop - lo])
            return
        for (L, X), o in zip(self.terms, out):
            if X is None:
                torch.sum(L[first:stop], 1, out=o.view(n, L.shape[2]))
            elif X.dim() == 2:
                torch.matmul(L[first:stop], X, out=o.view(n, L.shape[1], X.shape[1]))
            else:
                torch.bmm(L[first:stop], X[first:stop], out=o.view(n, L.shape[1], X.shape[2]))

    def blocks(self, widths: Sequence[int], out: list[torch.Tensor] | None, like: torch.Tensor) -> list[torch.Tensor]:
        """All of G as blocks (R, N, w) of the given widths, written into ``out`` (allocated when None)."""
        if out is None:
            out = [torch.empty(self.rows, w, dtype=like.dtype, device=like.device) for w in widths]
        self.write(0, self.rows, out)
        return out


class Rows(NamedTuple):
    """Per-replicate rows of one shared matrix: replicate r's rows are X[positions[r]], X (n + 1, f)
    (the training set and a zero padding row), positions (R, S). A model's first product then runs
    once on X for all replicates (X read once, not R times) and is gathered into each replicate's
    order; its results equal the per-replicate product up to the rounding of one larger product."""

    X: torch.Tensor
    positions: torch.Tensor


def softmax_residual_t(Zt: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """softmax(z) − onehot(y) of class-major logits Zt (R, C, n) for labels Y (R, n) or (n,):
    (R, C, n). The softmax runs along the class axis, vectorised along n (with few classes about
    ten times faster on CPU than along the last axis of (R, n, C))."""
    R, n = Zt.shape[0], Zt.shape[2]
    P = torch.softmax(Zt, 1)
    minus_one = torch.full((R, 1, n), -1.0, dtype=P.dtype, device=P.device)
    return P.scatter_add_(1, Y.expand(R, n).unsqueeze(1), minus_one)  # p − 1 at the label: bits of p − onehot


def cross_entropy_t(Zt: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """ℓ = logsumexp(z) − z_y of class-major logits Zt (R, C, n) for labels Y (R, n) or (n,): (R, n)."""
    R, n = Zt.shape[0], Zt.shape[2]
    return torch.logsumexp(Zt, 1) - Zt.gather(1, Y.expand(R, n).unsqueeze(1)).squeeze(1)


def _int_list(cfg: Mapping, key: str, allow_empty: bool = True) -> list[int]:
    v = cfg.get(key)
    if not isinstance(v, (list, tuple)) or not all(is_int(h) and h >= 1 for h in v) or (not allow_empty and not v):
        raise ConfigError(f"model.{key}", v, "a list of positive integers, e.g. [64] or [128, 64]", "invalid")
    return [int(h) for h in v]


class Model:
    """Base of every model: D parameters θ (one flat vector per replicate, (R, D)) and a loss ℓ.

    A plugin (``model=custom model._target_=pkg.mod.MyModel``) subclasses it with
    ``__init__(self, data, **keys)`` (data: the :class:`~cocoef_cli.data.Dataset`, with
    ``features``, ``n_classes``, ``task``, ``shape``; keys its own YAML keys; ``model.l2`` is read
    by the framework), sets ``self.D`` (and ``self.C``, the number of outputs), the class flag
    ``task`` ("classification" or "regression", checked against the dataset), and implements
    ``forward(self, theta, X)`` → Z (n, C): the outputs of ONE replicate, theta (D,), X (n, f).
    The rest has defaults built on ``forward`` (override for speed):

    * ``logits(theta (R, D), X (n, f) or (R, ..., f))`` → Z (R, ..., C), vmap of ``forward``;
    * ``losses(Z, Y)`` per sample: cross-entropy logsumexp(z) − z_y (classification) or
      ½(z − y)² (regression); ``correct(Z, Y)`` 1[argmax z = y] (None for regression);
    * ``weighted_grads(theta, Xp, Yp, Wp, out=None)``: per partition Σ_b w_{rjb} ∇ℓ(θ_r; x_{rjb}),
      Xp (R, N, B, f), Yp / Wp (R, N, B), as ``[G]`` with G (R, N, D) (``torch.func``: grad,
      vmapped over the partitions and the replicates; padding rows have w = 0);
    * ``init(rng, dtype)`` θ⁰ = 0, (R, D); ``features(X)`` = X; ``full_grad`` (1/n) Σ_s ∇ℓ_s.
    """

    task: str | None = "classification"  # None: follows the dataset
    D: int  # the number of parameters (an attribute, or a property in a subclass)

    def forward(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def features(self, X: torch.Tensor) -> torch.Tensor:
        return X

    @property
    def blocks(self) -> tuple[int, ...]:
        return (self.D,)

    def init(self, rng: SeedRNG, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(rng.R, self.D, dtype=dtype, device=rng.device)

    def logits(self, theta: torch.Tensor, Xf: torch.Tensor) -> torch.Tensor:
        if Xf.dim() == 2:
            return torch.func.vmap(self.forward, in_dims=(0, None))(theta, Xf)
        R = theta.shape[0]
        Z = torch.func.vmap(self.forward)(theta, Xf.reshape(R, -1, Xf.shape[-1]))
        return Z.reshape(*Xf.shape[:-1], Z.shape[-1])

    def losses(self, Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":
            return 0.5 * (Z.squeeze(-1) - Y) ** 2
        return torch.logsumexp(Z, -1) - Z.gather(-1, Y.expand(Z.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    def correct(self, Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor | None:
        return None if self.task == "regression" else (Z.argmax(-1) == Y).to(Z.dtype)

    def _weighted_loss(self, theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """Σ_b w_b ℓ(θ; x_b, y_b) for one replicate and one partition."""
        return (W * self.losses(self.forward(theta, X), Y)).sum()

    def weighted_grads(
        self,
        theta: torch.Tensor,
        Xp: torch.Tensor,
        Yp: torch.Tensor,
        Wp: torch.Tensor,
        out: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        g = torch.func.grad(self._weighted_loss)
        G = torch.func.vmap(torch.func.vmap(g, in_dims=(None, 0, 0, 0)))(theta, Xp, Yp, Wp)  # (R, N, D)
        if out is None:
            return [G]
        out[0].copy_(G)
        return out

    def full_grad(self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        R, n = theta.shape[0], Xf.shape[0]
        W = torch.full((R, 1, n), 1.0 / n, dtype=theta.dtype, device=theta.device)
        return self.weighted_grads(theta, Xf.expand(R, 1, *Xf.shape), Y.expand(R, 1, n), W)[0][:, 0]


class Network(Model):
    """Base of the networks: flat θ ↔ layer tensors, initialisation, softmax cross-entropy."""

    task = "classification"

    def __init__(self, cfg: Mapping, data: Dataset):
        if data.task != "classification" or data.n_classes < 2:
            raise ConfigError("model", cfg.get("name"), "linear", f"dataset {data.name} is not a classification task")
        self.activation = cfg.get("activation", "relu")
        if self.activation not in ACTIVATIONS:
            raise ConfigError("model.activation", self.activation, list(ACTIVATIONS), "unknown activation")
        self.init_name = cfg.get("init", "torch")
        if self.init_name not in INITS:
            raise ConfigError("model.init", self.init_name, INITS, "unknown initialisation")
        self.C = data.n_classes
        # (name, shape, fan_in, fan_out) per tensor, weights before biases, layer by layer
        self.params: list[tuple[str, tuple[int, ...], int, int]] = []

    def _add(self, name: str, shape: Sequence[int], fan_in: int, fan_out: int) -> None:
        self.params.append((name, tuple(int(s) for s in shape), fan_in, fan_out))

    @property
    def D(self) -> int:  # type: ignore[override]  # derived from the layers: read-only here
        return sum(math.prod(s) for _, s, _, _ in self.params)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Column blocks of the partition gradients: one, all of θ."""
        return (self.D,)

    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """Views of θ (..., D) as the layer tensors (..., *shape), in ``params`` order."""
        out, off = [], 0
        for _, shape, _, _ in self.params:
            size = math.prod(shape)
            out.append(theta[..., off : off + size].unflatten(-1, shape))
            off += size
        return out

    def features(self, X: torch.Tensor) -> torch.Tensor:
        """Networks take the features as they are (no bias column)."""
        return X

    def init(self, rng: SeedRNG, dtype: torch.dtype) -> torch.Tensor:
        """θ⁰ per replicate from its ``init`` stream, uniform U(−c, c) per tensor: ``torch`` (PyTorch's
        nn.Linear/Conv2d default) c = 1/√fan_in for weights and biases; ``kaiming`` (He) c = √(6/fan_in)
        for weights, biases 0; ``xavier`` (Glorot) c = √(6/(fan_in + fan_out)), biases 0. (R, D)."""
        bounds = []
        for name, shape, fan_in, fan_out in self.params:
            is_bias = name.endswith("bias")
            if self.init_name == "torch":
                c = 1.0 / math.sqrt(fan_in)
            elif is_bias:
                c = 0.0
            elif self.init_name == "kaiming":
                c = math.sqrt(6.0 / fan_in)
            else:
                c = math.sqrt(6.0 / (fan_in + fan_out))
            bounds.append(torch.full((math.prod(shape),), c, dtype=dtype, device=rng.device))
        return (2 * rng.rand(self.D, dtype=dtype) - 1) * torch.cat(bounds)

    def losses(self, Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Per-sample ℓ = logsumexp(z) − z_y."""
        return torch.logsumexp(Z, -1) - Z.gather(-1, Y.expand(Z.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    def correct(self, Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Per-sample 1[argmax z = y]."""
        return (Z.argmax(-1) == Y).to(Z.dtype)


class MLP(Network):
    """Multilayer perceptron: hidden widths model.hidden, activation model.activation; batched backward.

    z_0 = x, a_l = σ(a_{l−1} W_lᵀ + b_l) for the hidden layers, logits z = a_{L−1} W_Lᵀ + b_L; W_l is
    stored (out, in), as in torch.nn.Linear. ∂ℓ/∂z = softmax(z) − onehot(y);
    δ_{l−1} = (δ_l W_l) ⊙ σ'(a_{l−1}); ∇W_l = δ_lᵀ a_{l−1} (rows of a contiguous: the batched
    product over partitions is about a fifth faster than a_{l−1}ᵀ δ_l into (in, out)).
    """

    def __init__(self, cfg: Mapping, data: Dataset):
        super().__init__(cfg, data)
        self.hidden = _int_list(cfg, "hidden")
        self.sizes = [data.features, *self.hidden, self.C]
        for l, (i, o) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            self._add(f"fc{l}.weight", (o, i), i, o)
            self._add(f"fc{l}.bias", (o,), i, o)
        self.act, self.dact = ACTIVATIONS[self.activation], DERIVATIVES[self.activation]

    @property
    def blocks(self) -> tuple[int, ...]:
        """Column blocks of the partition gradients: one per parameter tensor (W_0, b_0, W_1, …)."""
        return tuple(math.prod(shape) for _, shape, _, _ in self.params)

    def _forward(
        self, theta: torch.Tensor, X: torch.Tensor, class_major: bool = False, rows: Rows | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (R, S, C), or (R, C, S) if ``class_major``, and the layer inputs [a_0 = X, a_1, …]
        for X (S, f) shared or (R, S, f); with ``rows`` (X (R, S, f) as rows of a shared matrix)
        the first layer is one product on the shared rows."""
        P = self.unflatten(theta)
        A, acts = X, []
        L = len(self.sizes) - 1
        for l in range(L):
            acts.append(A)
            W, b = P[2 * l], P[2 * l + 1]
            if l == 0 and rows is not None:
                Z = self._first_layer(W, b, rows, class_major and L == 1)
            elif l == L - 1 and class_major:  # Zᵀ = W Aᵀ + b
                At = A.transpose(-2, -1)
                return (
                    torch.baddbmm(b.unsqueeze(-1), W, At) if A.dim() == 3 else torch.matmul(W, At) + b.unsqueeze(-1)
                ), acts
            else:
                Wt = W.transpose(-2, -1)
                Z = torch.baddbmm(b.unsqueeze(1), A, Wt) if A.dim() == 3 else torch.matmul(A, Wt) + b.unsqueeze(1)
            A = self.act(Z) if l < L - 1 else Z
        return A, acts

    @staticmethod
    def _first_layer(W: torch.Tensor, b: torch.Tensor, rows: Rows, class_major: bool) -> torch.Tensor:
        """a_0 W_0ᵀ + b_0 of every replicate's rows, (R, S, o) (class-major (R, o, S)), from one
        product X [W_0 of every replicate]ᵀ + [b_0 …] of shape (n + 1, R·o) on the shared X."""
        R, o = W.shape[0], W.shape[1]
        Z = torch.addmm(b.reshape(-1), rows.X, W.reshape(R * o, -1).T)  # (n + 1, R·o)
        flat = (rows.positions * R + torch.arange(R, device=rows.positions.device).unsqueeze(1)).reshape(-1)
        Z = Z.view(-1, o).index_select(0, flat).view(R, -1, o)
        return Z.transpose(1, 2).contiguous() if class_major else Z

    def logits(self, theta: torch.Tensor, Xf: torch.Tensor) -> torch.Tensor:
        """z for Xf (n, f) shared by the replicates → (R, n, C), or (R, ..., f) → (R, ..., C)."""
        if Xf.dim() == 2:
            return self._forward(theta, Xf)[0]
        R = theta.shape[0]
        return self._forward(theta, Xf.reshape(R, -1, Xf.shape[-1]))[0].view(*Xf.shape[:-1], self.C)

    def _backward(
        self,
        theta: torch.Tensor,
        X: torch.Tensor,
        Y: torch.Tensor,
        w: torch.Tensor,
        N: int,
        out: list[torch.Tensor] | None = None,
        rows: Rows | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Σ_b w ∇ℓ per group of S/N consecutive rows: X (R, S, f) or (S, f) (then N = 1),
        Y, w (R, S) or (S,) → (one block (R, N, size) per parameter tensor (``blocks``), written in
        place into ``out`` (allocated when None); the logits Z of the forward pass). ``rows``: X
        as rows of a shared matrix (:class:`Rows`), for the forward's first layer."""
        terms, Z = self._terms(theta, X, Y, w, N, rows)
        blocks = terms.blocks(self.blocks, out, Z)
        R = Z.shape[0]
        return [b.view(R, N, -1) for b in blocks], Z

    def _terms(
        self, theta: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, N: int, rows: Rows | None
    ) -> tuple[PartitionTerms, torch.Tensor]:
        """(:class:`PartitionTerms` of :meth:`_backward`'s blocks, the logits Z (R, S, C)): the forward
        pass and every layer's errors δ_l, computed once; ∇W_l = δ_lᵀ a_{l−1} and ∇b_l = Σ_b δ_l
        per group of S/N rows when written."""
        Zt, acts = self._forward(theta, X, class_major=True, rows=rows)
        R, S = Zt.shape[0], Zt.shape[2]
        delta = (softmax_residual_t(Zt, Y) * w.unsqueeze(-2)).transpose(1, 2).contiguous()  # (R, S, C), weighted
        Bsz = S // N
        P = self.unflatten(theta)
        terms: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # by block: W_0, b_0, W_1, …
        for l in range(len(self.sizes) - 2, -1, -1):
            A = acts[l]
            i, o = self.sizes[l], self.sizes[l + 1]
            d = delta.reshape(R * N, Bsz, o)
            if A.dim() == 2:  # shared inputs, one group: δᵀ A per replicate
                terms[2 * l] = (delta.transpose(1, 2), A)
            else:
                terms[2 * l] = (d.transpose(1, 2), A.reshape(R * N, Bsz, i))
            terms[2 * l + 1] = (d, None)
            if l > 0:
                delta = torch.bmm(delta, P[2 * l]) * self.dact(A)
        return PartitionTerms(R * N, [terms[b] for b in range(len(terms))]), Zt.transpose(1, 2)

    def weighted_terms(
        self, theta: torch.Tensor, Xp: torch.Tensor, Yp: torch.Tensor, Wp: torch.Tensor, rows: Rows | None = None
    ) -> PartitionTerms:
        """The :class:`PartitionTerms` of :meth:`weighted_grads` (same arguments, same values)."""
        R, N, Bsz, f = Xp.shape
        S = N * Bsz
        return self._terms(theta, Xp.reshape(R, S, f), Yp.reshape(R, S), Wp.reshape(R, S), N, rows)[0]

    def weighted_grads(
        self,
        theta: torch.Tensor,
        Xp: torch.Tensor,
        Yp: torch.Tensor,
        Wp: torch.Tensor,
        out: list[torch.Tensor] | None = None,
        rows: Rows | None = None,
    ) -> list[torch.Tensor]:
        """Σ_b w_{rjb} ∇ℓ(θ_r; x_{rjb}, y_{rjb}) for Xp (R, N, B, f), Yp, Wp (R, N, B), as one block
        (R, N, size) per parameter tensor, written into ``out`` when given (``rows``: Xp as rows
        of a shared matrix, :class:`Rows`)."""
        R, N, Bsz, f = Xp.shape
        S = N * Bsz
        return self._backward(theta, Xp.reshape(R, S, f), Yp.reshape(R, S), Wp.reshape(R, S), N, out, rows)[0]

    def weighted_loss_grads(
        self,
        theta: torch.Tensor,
        Xp: torch.Tensor,
        Yp: torch.Tensor,
        Wp: torch.Tensor,
        out: list[torch.Tensor] | None = None,
        rows: Rows | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(:meth:`weighted_grads`, L) with L_r = Σ_{j,b} w_{rjb} ℓ(θ_r; x_{rjb}, y_{rjb}), (R,), from
        the logits of the same forward pass."""
        R, N, Bsz, f = Xp.shape
        Y, W = Yp.reshape(R, N * Bsz), Wp.reshape(R, N * Bsz)
        blocks, Z = self._backward(theta, Xp.reshape(R, N * Bsz, f), Y, W, N, out, rows)
        return blocks, (cross_entropy_t(Z.transpose(1, 2), Y) * W).sum(-1)  # Z.transpose: (R, C, S), contiguous

    def full_loss_grad(
        self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((1/n) Σ_s ℓ_s(θ), (1/n) Σ_s ∇ℓ_s(θ)) for shared Xf (n, f): (R,), (R, D); one forward."""
        w = torch.full((Xf.shape[0],), 1.0 / Xf.shape[0], dtype=Xf.dtype, device=Xf.device)
        blocks, Z = self._backward(theta, Xf, Y, w, 1)
        return self.losses(Z, Y).mean(-1), torch.cat(blocks, -1)[:, 0]

    def full_grad(self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_s ∇ℓ_s(θ) for shared Xf (n, f): (R, D)."""
        return self.full_loss_grad(theta, Xf, Y)[1]

    def full_loss(self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_s ℓ_s(θ) for shared Xf (n, f), (R,): the forward of :meth:`full_loss_grad` (same bits)."""
        Zt = self._forward(theta, Xf, class_major=True)[0]
        return self.losses(Zt.transpose(1, 2), Y).mean(-1)


class CNN(Network):
    """LeNet-5-size convolutional net for image datasets (1×28×28, 3×32×32, digits' 1×8×8), vmap(grad).

    conv k×k (``channels[0]``) → σ → max-pool 2 → conv k×k (``channels[1]``) → σ → max-pool 2 →
    flatten → fully connected ``hidden`` (σ after each) → C logits. The first convolution pads by
    (32 − H)/2 on images smaller than 32×32 (MNIST: 2, giving LeNet's 16×5×5 = 400 features).
    """

    chunk = 4096  # samples per chunk in evaluation (bounds the memory of full-data passes)

    def __init__(self, cfg: Mapping, data: Dataset):
        super().__init__(cfg, data)
        if data.shape is None or len(data.shape) != 3:
            raise ConfigError(
                "model",
                "cnn",
                "mlp, softmax (or an image dataset: mnist5k, mnist, fashion_mnist, cifar10)",
                f"dataset {data.name} has no image shape",
            )
        self.shape = tuple(data.shape)
        Cin, H, W = self.shape
        self.channels = _int_list(cfg, "channels", allow_empty=False)
        self.hidden = _int_list(cfg, "hidden")
        self.kernel = k = need_int("model.kernel", cfg.get("kernel", 5), 1)
        self.pad = max(0, (32 - min(H, W)) // 2)
        h, wd, c = H, W, Cin
        for l, co in enumerate(self.channels):
            p = self.pad if l == 0 else 0
            h, wd = (h + 2 * p - k + 1) // 2, (wd + 2 * p - k + 1) // 2
            if h < 1 or wd < 1:
                raise ConfigError(
                    "model.channels",
                    self.channels,
                    "fewer convolution layers for this image size",
                    f"{H}×{W} images shrink to nothing",
                )
            self._add(f"conv{l}.weight", (co, c, k, k), c * k * k, co * k * k)
            self._add(f"conv{l}.bias", (co,), c * k * k, co * k * k)
            c = co
        self.flat = c * h * wd
        sizes = [self.flat, *self.hidden, self.C]
        for l, (i, o) in enumerate(itertools.pairwise(sizes)):
            self._add(f"fc{l}.weight", (o, i), i, o)
            self._add(f"fc{l}.bias", (o,), i, o)
        self.act = ACTIVATIONS[self.activation]
        nconv = len(self.channels)

        def net(th: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            """Logits (S, C) of one θ (D,) on flat images x (S, f)."""
            P = self.unflatten(th)
            a = x.reshape(x.shape[0], *self.shape)
            for l in range(nconv):
                a = Fn.max_pool2d(self.act(Fn.conv2d(a, P[2 * l], P[2 * l + 1], padding=self.pad if l == 0 else 0)), 2)
            a = a.flatten(1)
            nfc = len(self.params) // 2 - nconv
            for l in range(nfc):
                a = Fn.linear(a, P[2 * (nconv + l)], P[2 * (nconv + l) + 1])
                if l < nfc - 1:
                    a = self.act(a)
            return a

        def wloss(th, x, y, w):
            z = net(th, x)
            return (w * (torch.logsumexp(z, -1) - z.gather(-1, y.unsqueeze(-1)).squeeze(-1))).sum()

        g = torch.func.grad(wloss)
        self._net = net
        self._grads = torch.func.vmap(torch.func.vmap(g, in_dims=(None, 0, 0, 0)), in_dims=(0, 0, 0, 0))
        self._grad_shared = torch.func.vmap(g, in_dims=(0, None, None, None))
        self._logits_shared = torch.func.vmap(net, in_dims=(0, None))
        self._logits_each = torch.func.vmap(net, in_dims=(0, 0))

    def logits(self, theta: torch.Tensor, Xf: torch.Tensor) -> torch.Tensor:
        """z for Xf (n, f) shared by the replicates → (R, n, C), or (R, ..., f) → (R, ..., C)."""
        if Xf.dim() == 2:
            return torch.cat([self._logits_shared(theta, Xc) for Xc in Xf.split(self.chunk)], 1)
        R = theta.shape[0]
        return self._logits_each(theta, Xf.reshape(R, -1, Xf.shape[-1])).view(*Xf.shape[:-1], self.C)

    def weighted_grads(
        self,
        theta: torch.Tensor,
        Xp: torch.Tensor,
        Yp: torch.Tensor,
        Wp: torch.Tensor,
        out: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Σ_b w_{rjb} ∇ℓ(θ_r; x_{rjb}, y_{rjb}) for Xp (R, N, B, f), Yp, Wp (R, N, B) as one block
        (R, N, D) (copied into ``out[0]`` when given)."""
        G = self._grads(theta, Xp, Yp, Wp)
        return [G] if out is None else [out[0].copy_(G)]

    def full_grad(self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_s ∇ℓ_s(θ) for shared Xf (n, f): (R, D), accumulated over chunks of samples."""
        n = Xf.shape[0]
        w = torch.full((n,), 1.0 / n, dtype=Xf.dtype, device=Xf.device)
        return sum(
            self._grad_shared(theta, Xc, Yc, wc)
            for Xc, Yc, wc in zip(Xf.split(self.chunk), Y.split(self.chunk), w.split(self.chunk))
        )
