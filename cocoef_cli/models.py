"""Models (losses) and the objective F split into batched partition gradients.

F(θ) = (1/n) Σ_s ℓ(θ; x_s, y_s) + (λ/2)‖θ‖²,   g_j(θ) = (1/n) Σ_{s∈P_j} ∇ℓ_s(θ) + (|P_j|/n) λ θ,
so Σ_j g_j = ∇F exactly. θ is one flat vector of D parameters per replicate: shape (R, D).

Generalised linear models have closed-form gradients: with logits Z = X̃Wᵀ, W of shape (C, f̃)
(X̃ = [X, 1] when ``model.bias``), ∇_W ℓ_s = (μ(z_s) − y_s) x̃_sᵀ where μ is the identity (``linear``), the sigmoid
(``logistic``) or the softmax (``softmax``). All N partition gradients of all R replicates are two
batched matrix products over a padded (R, N, B, f) layout of the partitions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as Fn

from cocoef_cli.data import Dataset
from cocoef_cli.errors import ConfigError
from cocoef_cli.modules import Module
from cocoef_cli.nets import CNN, MLP, Model, PartitionTerms, Rows, cross_entropy_t, softmax_residual_t
from cocoef_cli.registry import Registry
from cocoef_cli.rng import SeedRNG

MODELS: Registry[type[Model]] = Registry("model", Model, common=("l2",))  # GLMs here, the networks of nets.py


class GLM(Model):
    """Base of the closed-form models: logits Z = X̃ Wᵀ with W of shape (C, f̃) (class-major, as
    torch.nn.Linear.weight with the bias as its last column), θ = vec(W)."""

    task = "classification"
    inits = ("zeros", "normal")

    def __init__(self, cfg: Mapping, data: Dataset):
        self.bias = bool(cfg.get("bias", True))
        self.init_name = cfg.get("init", "zeros")
        if self.init_name not in self.inits:
            raise ConfigError("model.init", self.init_name, self.inits, "unknown initialisation")
        self.init_scale = float(cfg.get("init_scale", 0.01))
        self.f = data.features + int(self.bias)
        self.C = self.outputs(data)
        self.D = self.f * self.C

    def outputs(self, data: Dataset) -> int:
        raise NotImplementedError

    def features(self, X: torch.Tensor) -> torch.Tensor:
        """X̃ = [X, 1] (bias) or X."""
        return torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=X.dtype, device=X.device)], -1) if self.bias else X

    def init(self, rng: SeedRNG, dtype: torch.dtype) -> torch.Tensor:
        """θ⁰ = 0 (``zeros``) or N(0, init_scale²) per coordinate (``normal``), shape (R, D)."""
        if self.init_name == "zeros":
            return torch.zeros(rng.R, self.D, dtype=dtype, device=rng.device)
        return self.init_scale * rng.randn(self.D, dtype=dtype)

    def logits_t(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Class-major logits Zᵀ = W Xᵀ, (R, C, n), for X (n, f̃) shared by the replicates or
        (R, n, f̃): with few outputs C about twice as fast on CPU as X Wᵀ (the long dimension n
        stays contiguous)."""
        W = theta.view(-1, self.C, self.f)
        return torch.matmul(W, X.T) if X.dim() == 2 else torch.bmm(W, X.transpose(1, 2))

    def logits(self, theta: torch.Tensor, Xf: torch.Tensor) -> torch.Tensor:
        """Z for features Xf of shape (n, f̃) shared by replicates, or (R, ..., f̃) per replicate."""
        if Xf.dim() == 2:
            return self.logits_t(theta, Xf).transpose(1, 2)  # (R, n, C)
        R = theta.shape[0]
        return self.logits_t(theta, Xf.reshape(R, -1, self.f)).transpose(1, 2).reshape(*Xf.shape[:-1], self.C)

    def residual(self, Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """μ(Z) − Y, the derivative of ℓ with respect to the logits."""
        raise NotImplementedError

    def residual_t(self, Zt: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """:meth:`residual` of class-major logits Zt (R, C, n): (R, C, n)."""
        return self.residual(Zt.transpose(1, 2), Y).transpose(1, 2)

    def losses(self, Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Per-sample ℓ."""
        raise NotImplementedError

    def losses_t(self, Zt: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """:meth:`losses` of class-major logits Zt (R, C, n): (R, n)."""
        return self.losses(Zt.transpose(1, 2), Y)

    def correct(self, Z: torch.Tensor, Y: torch.Tensor) -> torch.Tensor | None:
        """Per-sample 0/1 correctness (None for regression)."""
        return None

    @property
    def blocks(self) -> tuple[int, ...]:
        """Column blocks of the partition gradients (see :meth:`weighted_grads`): one, all of θ."""
        return (self.D,)

    def weighted_grads(
        self,
        theta: torch.Tensor,
        Xp: torch.Tensor,
        Yp: torch.Tensor,
        Wp: torch.Tensor,
        out: list[torch.Tensor] | None = None,
        rows: Rows | None = None,
    ) -> list[torch.Tensor]:
        """Σ_b w_{rjb} ∇ℓ(θ_r; x_{rjb}) for features Xp (R, N, B, f̃), targets Yp and weights Wp (R, N, B),
        as the column blocks (R, N, D_l) of ``blocks`` (here one, (R, N, D)), written into ``out``
        (contiguous tensors of those shapes) when given. Two batched products, class-major
        throughout: Zᵀ = W Xpᵀ, the residual Eᵀ = w ⊙ (μ(Z) − Y)ᵀ along the class axis, then
        ∇W = Eᵀ Xp per partition, written in place (the long dimensions stay contiguous; several
        times faster on CPU than Xp Wᵀ and Xpᵀ E, whose inner dimension is the short C).
        With ``rows`` (Xp as rows of one shared X̃) Zᵀ is one product on X̃ for all replicates."""
        return self._weighted(theta, Xp, Yp, Wp, out, False, rows)[0]

    def weighted_loss_grads(
        self,
        theta: torch.Tensor,
        Xp: torch.Tensor,
        Yp: torch.Tensor,
        Wp: torch.Tensor,
        out: list[torch.Tensor] | None = None,
        rows: Rows | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(:meth:`weighted_grads`, L) with L_r = Σ_{j,b} w_{rjb} ℓ(θ_r; x_{rjb}), (R,), from the
        same forward pass (with full partitions and w = 1/n, L = (1/n) Σ_s ℓ_s: F without l2)."""
        return self._weighted(theta, Xp, Yp, Wp, out, True, rows)  # type: ignore[return-value]

    def _weighted(
        self, theta, Xp, Yp, Wp, out, loss: bool, rows: Rows | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        terms, L = self._terms(theta, Xp, Yp, Wp, loss, rows)
        R, N = Xp.shape[:2]
        return [b.view(R, N, self.D) for b in terms.blocks(self.blocks, out, theta)], L

    def _terms(self, theta, Xp, Yp, Wp, loss: bool, rows: Rows | None) -> tuple[PartitionTerms, torch.Tensor | None]:
        """(:class:`PartitionTerms` of :meth:`weighted_grads`: the residuals Eᵀ (R·N, C, B) and the
        features (R·N, B, f̃), ∇W = Eᵀ Xp per partition when written; L when ``loss``)."""
        R, N, Bsz, f = Xp.shape
        if rows is None:
            Zt = self.logits_t(theta, Xp.reshape(R, N * Bsz, f))  # (R, C, N·B)
        else:  # one product W X̃ᵀ for all replicates on the shared rows, then each replicate's order
            Zt = self.logits_t(theta, rows.X)
            Zt = Zt.gather(2, rows.positions.unsqueeze(1).expand(R, self.C, N * Bsz))
        Y, W = Yp.reshape(R, N * Bsz), Wp.reshape(R, N * Bsz)
        L = (self.losses_t(Zt, Y) * W).sum(-1) if loss else None
        Et = self.residual_t(Zt, Y) * W.unsqueeze(1)
        Et = Et.view(R, self.C, N, Bsz).transpose(1, 2).reshape(R * N, self.C, Bsz)
        return PartitionTerms(R * N, [(Et, Xp.reshape(R * N, Bsz, f))]), L

    def weighted_terms(self, theta, Xp, Yp, Wp, rows: Rows | None = None) -> PartitionTerms:
        """The :class:`PartitionTerms` of :meth:`weighted_grads` (same arguments, same values)."""
        return self._terms(theta, Xp, Yp, Wp, False, rows)[0]

    def full_loss_grad(
        self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((1/n) Σ_s ℓ_s(θ), (1/n) Σ_s ∇ℓ_s(θ)) for shared features Xf (n, f̃): (R,), (R, D); one forward."""
        Z = self.logits(theta, Xf)
        E = self.residual(Z, Y) / Xf.shape[0]
        g = torch.matmul(E.transpose(1, 2), Xf).reshape(theta.shape[0], self.D)
        return self.losses(Z, Y).mean(-1), g

    def full_grad(self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_s ∇ℓ_s(θ) for shared features Xf (n, f̃): shape (R, D)."""
        return self.full_loss_grad(theta, Xf, Y)[1]

    def full_loss(self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_s ℓ_s(θ), (R,), computed as :meth:`full_loss_grad` computes it (same bits)."""
        return self.losses(self.logits(theta, Xf), Y).mean(-1)


@MODELS.register("linear")
class Linear(GLM):
    """Least squares ℓ = ½(xᵀw + b − y)² (regression)."""

    task = "regression"

    def outputs(self, data: Dataset) -> int:
        return 1

    def residual(self, Z, Y):
        return Z - Y.unsqueeze(-1)

    def losses(self, Z, Y):
        return 0.5 * (Z.squeeze(-1) - Y) ** 2


@MODELS.register("logistic")
class Logistic(GLM):
    """Binary logistic regression ℓ = log(1 + e^z) − y z, y ∈ {0, 1}."""

    def outputs(self, data: Dataset) -> int:
        if data.n_classes != 2:
            raise ConfigError(
                "model", "logistic", "softmax for this dataset", f"needs 2 classes, {data.name} has {data.n_classes}"
            )
        return 1

    def residual(self, Z, Y):
        return torch.sigmoid(Z) - Y.unsqueeze(-1).to(Z.dtype)

    def losses(self, Z, Y):
        z = Z.squeeze(-1)
        return Fn.softplus(z) - Y.to(z.dtype) * z

    def correct(self, Z, Y):
        return ((Z.squeeze(-1) > 0).long() == Y).to(Z.dtype)


@MODELS.register("softmax")
class Softmax(GLM):
    """Multinomial logistic regression ℓ = logsumexp(z) − z_y."""

    def outputs(self, data: Dataset) -> int:
        return data.n_classes

    def residual(self, Z, Y):
        P = torch.softmax(Z, -1)
        return P - Fn.one_hot(Y, self.C).to(Z.dtype)

    def residual_t(self, Zt, Y):
        return softmax_residual_t(Zt, Y)

    def losses(self, Z, Y):
        return torch.logsumexp(Z, -1) - Z.gather(-1, Y.expand(Z.shape[:-1]).unsqueeze(-1)).squeeze(-1)

    def losses_t(self, Zt, Y):
        return cross_entropy_t(Zt, Y)

    def correct(self, Z, Y):
        return (Z.argmax(-1) == Y).to(Z.dtype)


# the neural networks (nets.py), after the closed-form models
MODELS.register("mlp")(MLP)
MODELS.register("cnn")(CNN)
MODELS.register("module")(Module)  # any torch.nn.Module (modules.py)


def build_model(cfg: Mapping, data: Dataset) -> Model:
    """Instantiate ``model.name`` (or its ``_target_``, as ``cls(data, **keys)``) for ``data``
    (checks the model suits the dataset's task)."""
    cls = MODELS.entry(cfg)
    if cls.task is None:  # follows the dataset (model=module)
        return cls(cfg, data)  # type: ignore[call-arg]  # built-ins take (cfg, data)
    if cls.task == "regression" and data.task != "regression":
        raise ConfigError(
            "model", cfg.get("name"), "logistic, softmax", f"dataset {data.name} is a classification task"
        )
    if cls.task == "classification" and data.task != "classification":
        raise ConfigError("model", cfg.get("name"), "linear", f"dataset {data.name} is a regression task")
    return MODELS.build(cfg, data, builtin=lambda cls: cls(cfg, data))  # type: ignore[call-arg]  # built-ins take (cfg, data)


# ----------------------------------------------------------------------------------------------


@dataclass
class Metrics:
    """Per-replicate evaluation of θ, each of shape (R,) (None where it does not apply)."""

    train_loss: torch.Tensor
    grad_norm: torch.Tensor
    test_loss: torch.Tensor | None
    test_acc: torch.Tensor | None
    grad: torch.Tensor | None = None  # ∇F(θ), (R, D)


def _alongside(model: Model, name: str) -> Callable | None:
    """``model.<name>``, an optional other form of ``weighted_grads`` (``weighted_terms``,
    ``weighted_loss_grads``), where the class that defines it is the one that defines
    ``weighted_grads`` or a subclass of it; else None, so that a subclass overriding only
    ``weighted_grads`` (a plugin extending a built-in model) is not bypassed by a form it inherits."""

    def owner(attr: str) -> type | None:
        return next((c for c in type(model).__mro__ if attr in vars(c)), None)

    mine, grads = owner(name), owner("weighted_grads")
    if mine is None or grads is None or not issubclass(mine, grads):
        return None
    return getattr(model, name)


class PartitionGradients:
    """G = [g_j(θ_r)] of one θ, formed on demand: whole, into the objective's reused blocks
    (:meth:`blocks`), or, where the model offers :class:`~cocoef_cli.nets.PartitionTerms`
    (``by_rows``), a range of its R·N rows at a time into any buffer (:meth:`write`; row r·N + j
    is g_j(θ_r)), so that a consumer can use each range while it is in cache."""

    def __init__(
        self,
        objective: Objective,
        theta: torch.Tensor,
        terms: PartitionTerms | None,
        whole: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ):
        self.objective, self.theta, self.terms, self._whole = objective, theta, terms, whole
        self.rows = theta.shape[0] * objective.N
        self.widths: tuple[int, ...] = tuple(int(w) for w in objective.model.blocks)
        self.by_rows = terms is not None
        self._blocks: list[torch.Tensor] | None = None

    def blocks(self) -> list[torch.Tensor]:
        """All of G as the objective's reused blocks (R, N, D_l) (see
        :meth:`Objective.partition_grad_blocks`), formed on the first call."""
        if self._blocks is None:
            out = self.objective._buffers(self.theta)
            if self.terms is not None:
                self.terms.write(0, self.rows, out)
            else:
                assert self._whole is not None
                out = self._whole(out)
            self._blocks = self.objective._add_l2(self.theta, out)
        return self._blocks

    def write(self, first: int, stop: int, out: Sequence[torch.Tensor]) -> None:
        """G's rows [first, stop) into ``out``, one contiguous (stop − first, D_l) tensor per block."""
        if self.terms is None:
            raise ValueError("this model forms its partition gradients whole (no weighted_terms)")
        self.terms.write(first, stop, out)
        self.objective.add_l2_rows(self.theta, first, stop, out)

    def buffer(self, numel: int) -> torch.Tensor:
        """A flat tensor of ``numel`` entries in G's dtype to :meth:`write` into, reused (the
        objective's: a fresh one per θ would cost page faults)."""
        return self.objective._scratch(numel, self.theta)

    def kernel_terms(self) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
        """The terms of :meth:`write` (the model's :class:`~cocoef_cli.nets.PartitionTerms`, by
        block), for a consumer that forms G's rows itself; None where :meth:`write` adds more
        than they give (the l2 term) or the model forms G whole."""
        return None if self.terms is None or self.objective.l2 else self.terms.terms

    def holds_whole(self) -> bool:
        """Whether the objective's reused blocks of all of G exist for this θ's shape (an
        evaluation formed them): forming G whole then allocates nothing."""
        G = self.objective._G
        return G is not None and G[0].shape[0] == self.theta.shape[0] and G[0].dtype == self.theta.dtype


class Objective:
    """F and its partition gradients for one model, dataset and per-replicate partitioning.

    ``parts`` (R, N, B) holds training indices padded with n; ``batch_size`` = b draws per
    partition a uniform minibatch of min(b, |P_j|) samples without replacement, rescaled by
    |P_j|/min(b, |P_j|) so that g_j stays unbiased.
    """

    def __init__(
        self,
        model: Model,
        data: Dataset,
        parts: np.ndarray,
        l2: float,
        dtype: torch.dtype,
        device: torch.device,
        batch_size: int | None = None,
        batch_rng: SeedRNG | None = None,
    ):
        self.model, self.l2, self.batch_size, self.batch_rng = model, float(l2), batch_size, batch_rng
        self.n = data.n
        ydtype = torch.int64 if data.task == "classification" else dtype

        def t(a, dt=dtype):
            return torch.tensor(a, dtype=dt, device=device)  # a copy: the data are read-only

        self.X = model.features(t(data.X_train))  # (n, f̃)
        self.Y = t(data.y_train, ydtype)
        self.Xte = model.features(t(data.X_test)) if len(data.y_test) else None
        self.Yte = t(data.y_test, ydtype) if len(data.y_test) else None
        idx = torch.as_tensor(parts, device=device)  # (R, N, B), pad = n
        valid = idx < self.n
        Xpad = torch.cat([self.X, torch.zeros(1, self.X.shape[1], dtype=dtype, device=device)])
        Ypad = torch.cat([self.Y, torch.zeros(1, dtype=ydtype, device=device)])
        self.X = Xpad[: self.n]  # a view of the padded copy, not a second copy of the training set
        self.Xp, self.Yp = Xpad[idx], Ypad[idx]  # (R, N, B, f̃), (R, N, B)
        # with several replicates, a model whose partition gradients take ``rows`` (the built-in GLMs
        # and MLP) runs its first product once on the shared rows (one larger product: the same values
        # up to rounding); one replicate keeps its own
        R = idx.shape[0]
        fns = [model.weighted_grads, _alongside(model, "weighted_loss_grads") or model.weighted_grads]
        takes = all("rows" in inspect.signature(fn).parameters for fn in fns)
        self.rows = Rows(Xpad, idx.reshape(R, -1)) if R > 1 and takes else None
        self.valid = valid
        self.sizes = valid.sum(-1).to(dtype)  # |P_j|, (R, N)
        self.Wp = valid.to(dtype) / self.n  # full-partition weights 1/n
        self._G: list[torch.Tensor] | None = None  # blocks of the partition gradients, reused
        self._part_buffer: torch.Tensor | None = None  # rows of G written by parts (PartitionGradients.buffer)

    @property
    def R(self) -> int:
        return self.Xp.shape[0]

    @property
    def N(self) -> int:
        return self.Xp.shape[1]

    def partition_grad_blocks(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """G = [g_j(θ_r)] split by columns into the model's ``blocks``: tensors (R, N, D_l) whose
        concatenation along the last dim is G (one per parameter tensor for the MLP, so that each
        layer's gradients are written contiguously). Each partition gradient is computed once.

        The blocks are buffers this objective reuses on the next call (a fresh (R, N, D) tensor
        every iteration costs page faults): copy them to keep them. They lie one after the other
        in one storage (a kernel can read them as one flat array)."""
        return self.partition_gradients(theta).blocks()

    def partition_gradients(self, theta: torch.Tensor) -> PartitionGradients:
        """G at θ, formed when (and as far as) a consumer needs it (:class:`PartitionGradients`);
        a minibatch is drawn here."""
        X, Y, W = (self.Xp, self.Yp, self.Wp) if self.batch_size is None else self._minibatch()
        rows = self._rows() if self.batch_size is None else {}
        terms = _alongside(self.model, "weighted_terms")
        if terms is not None:
            return PartitionGradients(self, theta, terms(theta, X, Y, W, **rows))
        return PartitionGradients(
            self, theta, None, lambda out: self.model.weighted_grads(theta, X, Y, W, out=out, **rows)
        )

    def partition_loss_grad_blocks(self, theta: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(G, F(θ)) with full partitions (no minibatch): G as :meth:`partition_grad_blocks` gives
        it and F = Σ_{j,b} ℓ(θ; x_{jb})/n + ½ l2 ‖θ‖² from the same forward pass where the model
        offers ``weighted_loss_grads`` (the partitions cover the training set once), else
        :meth:`train_loss` (a second forward pass)."""
        both = _alongside(self.model, "weighted_loss_grads")
        if both is None:
            return self.partition_grad_blocks(theta), self.train_loss(theta)
        blocks, F = both(theta, self.Xp, self.Yp, self.Wp, out=self._buffers(theta), **self._rows())
        return self._add_l2(theta, blocks), (F + 0.5 * self.l2 * (theta * theta).sum(-1) if self.l2 else F)

    def _rows(self) -> dict[str, Rows]:
        return {} if self.rows is None else {"rows": self.rows}

    def _add_l2(self, theta: torch.Tensor, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """g_j += (l2/n) |P_j| θ: the l2 term split over the partitions by their share of the data."""
        self.add_l2_rows(theta, 0, theta.shape[0] * self.N, [b.view(-1, b.shape[-1]) for b in blocks])
        return blocks

    def add_l2_rows(self, theta: torch.Tensor, first: int, stop: int, blocks: Sequence[torch.Tensor]) -> None:
        """:meth:`_add_l2` for G's rows [first, stop) (flattened: row r·N + j is g_j(θ_r)), in
        ``blocks`` (stop − first, D_l)."""
        if not self.l2:
            return
        N = self.N
        for r in range(first // N, (stop - 1) // N + 1):
            a, b = max(first, r * N), min(stop, (r + 1) * N)
            scale = (self.l2 / self.n) * self.sizes[r, a - r * N : b - r * N].unsqueeze(-1)
            for block, th in zip(blocks, theta[r].split(list(self.model.blocks), -1)):
                block[a - first : b - first].add_(scale * th)

    def _buffers(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """The reused blocks of G (see :meth:`partition_grad_blocks`), (re)allocated on a change of shape."""
        R, N = theta.shape[0], self.N
        shapes = [(R, N, int(size)) for size in self.model.blocks]
        if (
            self._G is None
            or [tuple(b.shape) for b in self._G] != shapes
            or self._G[0].dtype != theta.dtype
            or self._G[0].device != theta.device
        ):
            flat = torch.empty(R * N * sum(self.model.blocks), dtype=theta.dtype, device=theta.device)
            self._G = [b.view(shape) for b, shape in zip(flat.split([math.prod(sh) for sh in shapes]), shapes)]
        return self._G

    def _scratch(self, numel: int, theta: torch.Tensor) -> torch.Tensor:
        """The reused buffer of :meth:`PartitionGradients.buffer`, (re)allocated when too small."""
        buf = self._part_buffer
        if buf is None or buf.numel() < numel or buf.dtype != theta.dtype or buf.device != theta.device:
            buf = self._part_buffer = torch.empty(numel, dtype=theta.dtype, device=theta.device)
        return buf[:numel]

    def partition_grads(self, theta: torch.Tensor) -> torch.Tensor:
        """G with G[r, j] = g_j(θ_r), shape (R, N, D) (a new tensor)."""
        return torch.cat(self.partition_grad_blocks(theta), -1)

    def _minibatch(self):
        """Per replicate and partition, min(b, |P_j|) distinct valid positions with weight |P_j|/(b_j n)."""
        b = min(self.batch_size, self.Xp.shape[2])
        keys = self.batch_rng.rand(*self.valid.shape[1:], dtype=self.Xp.dtype)
        keys = keys.masked_fill(~self.valid, 2.0)  # padding sorts last
        pos = keys.topk(b, dim=-1, largest=False, sorted=False).indices  # (R, N, b)
        vb = self.valid.gather(-1, pos)
        bj = self.sizes.clamp(max=b).clamp(min=1).unsqueeze(-1)
        W = vb.to(self.Xp.dtype) * self.sizes.unsqueeze(-1) / (bj * self.n)
        Xb = self.Xp.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, self.Xp.shape[-1]))
        return Xb, self.Yp.gather(-1, pos), W

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        """F(θ) per replicate, (R,)."""
        Z = self.model.logits(theta, self.X)
        F = self.model.losses(Z, self.Y).mean(-1)
        return F + 0.5 * self.l2 * (theta * theta).sum(-1) if self.l2 else F

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        """∇F(θ), (R, D)."""
        g = self.model.full_grad(theta, self.X, self.Y)
        return g + self.l2 * theta if self.l2 else g

    def loss_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F(θ), ∇F(θ)), (R,) and (R, D): from one forward pass where the model offers it
        (``full_loss_grad``)."""
        both = getattr(self.model, "full_loss_grad", None)
        if both is None:
            return self.loss(theta), self.grad(theta)
        F, g = both(theta, self.X, self.Y)
        if self.l2:
            F, g = F + 0.5 * self.l2 * (theta * theta).sum(-1), g + self.l2 * theta
        return F, g

    def evaluate(
        self, theta: torch.Tensor, G: list[torch.Tensor] | None = None, F: torch.Tensor | None = None
    ) -> Metrics:
        """Training objective, ∇F and its norm, and held-out mean loss / accuracy.

        ``G``, ``F``: the partition gradient blocks at θ and F(θ) (:meth:`partition_loss_grad_blocks`,
        full partitions, no minibatch), which the next update needs anyway: then ∇F = Σ_j g_j (the
        partitions cover the training set once, with weights 1/n and the l2 term |P_j|/n each), and
        the training set takes no pass of its own (with G alone, F takes one forward pass)."""
        te_loss = te_acc = None
        if self.Xte is not None and self.Yte is not None:
            Z = self.model.logits(theta, self.Xte)
            te_loss = self.model.losses(Z, self.Yte).mean(-1)
            c = self.model.correct(Z, self.Yte)
            te_acc = None if c is None else c.mean(-1)
        if G is None:
            F, g = self.loss_and_grad(theta)
        else:
            F, g = self.train_loss(theta) if F is None else F, torch.cat([block.sum(1) for block in G], -1)
        return Metrics(F, g.norm(dim=-1), te_loss, te_acc, g)

    def train_loss(self, theta: torch.Tensor) -> torch.Tensor:
        """F(θ), (R,), as :meth:`loss_and_grad` computes it (the model's ``full_loss``, the same bits
        as its ``full_loss_grad``), else :meth:`loss`."""
        full = getattr(self.model, "full_loss", None)
        if full is None:
            return self.loss(theta)
        F = full(theta, self.X, self.Y)
        return F + 0.5 * self.l2 * (theta * theta).sum(-1) if self.l2 else F

    def f_star(self) -> float | None:
        """min F in closed form (ridge normal equations, float64) for least squares; else None."""
        if not isinstance(self.model, Linear):
            return None
        X, y = self.X.double().cpu().numpy(), self.Y.double().cpu().numpy()
        n, f = X.shape
        A = X.T @ X / n + self.l2 * np.eye(f)
        w = np.linalg.lstsq(A, X.T @ y / n, rcond=None)[0]
        return float(0.5 * np.mean((X @ w - y) ** 2) + 0.5 * self.l2 * w @ w)
