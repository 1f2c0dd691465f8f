"""``model=module``: any torch.nn.Module as the model, its partition gradients by torch.func.

``model._target_`` names a factory (a function or an nn.Module class) by dotted path. It is called
as ``factory(input_shape=(C, H, W) or (f,), num_outputs=K, **keys)`` — ``input_shape`` and
``num_outputs`` only if its signature names them (or takes ``**kwargs``); ``keys`` are the
group's other keys (all but ``name``, ``_target_``, ``l2``) — and returns an nn.Module mapping a
batch (S, *input_shape) to outputs (S, K): K = the number of classes (classification, loss
cross-entropy ℓ = logsumexp(z) − z_y) or K = 1 (regression, ℓ = ½(z − y)², as ``model=linear``).

θ of one replicate is the module's parameters, flattened in ``named_parameters()`` order;
θ⁰ is what the factory returns, the factory being called once per replicate with torch's global
generator seeded from that replicate's ``init`` stream (its default initialisation is reproducible
per seed; a module that zero-initialises stays zero). Buffers (e.g. a fixed mask or projection)
are kept per replicate and passed to the forward, never trained.

The partition gradients Σ_b w_{rjb} ∇ℓ(θ_r; x_{rjb}, y_{rjb}) of all N partitions of all R
replicates are one call of ``vmap`` (over R) of ``vmap`` (over N) of ``grad`` of the weighted
loss of the functional module (``torch.func.functional_call``): the forward of the R·N·B samples
runs batched, each partition gradient is computed once, and padding rows carry w = 0, so unequal
partition sizes are exact. The forward must treat samples independently: BatchNorm in training
mode (batch statistics) and dropout in training mode (random) are rejected; a factory that
returns ``net.eval()`` has BatchNorm use its running statistics (fixed buffers: an affine map).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from cocoef_cli.data import Dataset
from cocoef_cli.errors import ConfigError, closest
from cocoef_cli.nets import Model
from cocoef_cli.registry import import_target
from cocoef_cli.rng import SeedRNG

OWN_KEYS = ("name", "_target_", "l2")  # the group's keys that are not the factory's
GIVEN = ("input_shape", "num_outputs")  # what the factory is given besides its keys


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]


class Module(Model):
    """Any torch.nn.Module built by the factory ``model._target_`` (its keys as keyword arguments);
    loss by the dataset's task; partition gradients by torch.func (vmap over replicates and
    partitions)."""

    task = None  # follows the dataset (set per instance)
    chunk = 4096  # samples per chunk in full-data passes (bounds their memory)

    def __init__(self, cfg: Mapping, data: Dataset):
        self.target = cfg.get("_target_")
        self.factory = import_target("model._target_", self.target)
        if not callable(self.factory):
            raise ConfigError("model._target_", self.target, "a factory returning a torch.nn.Module", "not callable")
        self.task = data.task
        self.input_shape = tuple(int(s) for s in data.shape) if data.shape is not None else (data.features,)
        self.C = data.n_classes if data.task == "classification" else 1
        self.kwargs = self._arguments({k: v for k, v in cfg.items() if k not in OWN_KEYS})
        template = self._build(0)
        self.names = [n for n, _ in template.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in template.named_parameters()]
        if not self.names:
            raise ConfigError("model._target_", self.target, "a module with parameters", "it has no parameters")
        self.template = template
        self.buffers: dict[str, torch.Tensor] | None = None  # per replicate (R, ...), set by init
        self._grads = vmap(vmap(grad(self._wloss), in_dims=(None, None, 0, 0, 0)), in_dims=(0, 0, 0, 0, 0))
        self._grad_value_shared = vmap(grad_and_value(self._wloss), in_dims=(0, 0, None, None, None))
        self._check_forward(template)

    # -- the factory ---------------------------------------------------------------------------

    def _arguments(self, keys: dict) -> dict:
        """The factory's keyword arguments: ``input_shape``/``num_outputs`` where its signature takes
        them, then ``keys``, each checked against the signature (an unknown or missing one exits 2)."""
        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):  # no signature (a builtin): pass everything
            return {"input_shape": self.input_shape, "num_outputs": self.C, **keys}
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        given = {"input_shape": self.input_shape, "num_outputs": self.C}
        for k in GIVEN:
            if k in keys:
                raise ConfigError(f"model.{k}", keys[k], "the factory's own keys", "given by the dataset")
        out = {k: v for k, v in given.items() if var_kw or k in named}
        own = [n for n in named if n not in GIVEN]
        for k, v in keys.items():
            if not var_kw and k not in named:
                near = closest(k, own)
                raise ConfigError(
                    f"model.{k}",
                    v,
                    [f"model.{n}" for n in own] or f"none ({self.target} takes no keys)",
                    f"not an argument of {self.target}",
                    f"did you mean +model.{near}?" if near else None,
                )
            out[k] = v
        for n, p in params.items():
            required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            if required and n not in out:
                raise ConfigError(f"model.{n}", None, f"a value: +model.{n}=...", f"required by {self.target}, missing")
        return out

    def _build(self, seed: int) -> nn.Module:
        """factory(**kwargs) with torch's global generator seeded by ``seed`` (its state outside is kept)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                module = self.factory(**self.kwargs)
            except Exception as e:
                call = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
                raise ConfigError(
                    "model._target_",
                    self.target,
                    "a factory returning a torch.nn.Module",
                    f"({call}) raised {_one_line(e)}",
                ) from None
        if not isinstance(module, nn.Module):
            raise ConfigError(
                "model._target_",
                self.target,
                "a factory returning a torch.nn.Module",
                f"it returned {type(module).__name__}",
            )
        for name, sub in module.named_modules():
            what = (
                "BatchNorm in training mode (batch statistics couple the samples of a partition)"
                if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training
                else "dropout in training mode (a random forward)"
                if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0
                else None
            )
            if what:
                raise ConfigError(
                    "model._target_",
                    self.target,
                    "modules whose forward treats samples independently and deterministically "
                    "(GroupNorm/LayerNorm instead, or return net.eval(): BatchNorm then uses its running statistics)",
                    f"{name or 'the module'} is {what}",
                )
        return module

    def _check_forward(self, module: nn.Module) -> None:
        """The forward maps (2, *input_shape) to (2, num_outputs)."""
        x, shape = torch.zeros(2, *self.input_shape), ", ".join(map(str, self.input_shape))
        try:
            with torch.no_grad():
                z = module(x)
        except Exception as e:
            raise ConfigError(
                "model._target_", self.target, f"a module taking batches (S, {shape})", _one_line(e)
            ) from None
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != (2, self.C):
            out = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ConfigError(
                "model._target_",
                self.target,
                f"a module mapping (S, {shape}) to (S, {self.C})",
                f"its output for S = 2 is {out}",
            )
        theta = torch.cat([p.detach().reshape(1, -1) for p in module.parameters()], 1)
        theta = theta.expand(2, -1)  # two replicates, two partitions of one sample each
        y = torch.zeros(2, 2, 1, dtype=torch.int64 if self.task == "classification" else x.dtype)
        try:  # as the run calls it: vmap over replicates and partitions of grad (in-place updates fail here)
            X = x[:1].reshape(1, 1, 1, -1).expand(2, 2, 1, -1)
            self._grads(self._params(theta), self._buffers(theta), X, y, torch.ones(2, 2, 1))
        except Exception as e:
            raise ConfigError(
                "model._target_",
                self.target,
                "a forward torch.func can differentiate and vmap (no in-place updates of buffers, no .item())",
                f"its partition gradient failed: {_one_line(e)}",
            ) from None

    # -- the model interface of cocoef_cli.models ---------------------------------------------

    @property
    def D(self) -> int:  # type: ignore[override]  # derived from the module's parameters: read-only
        return sum(math.prod(s) for s in self.shapes)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Column blocks of the partition gradients: one per parameter tensor, in θ's order."""
        return tuple(math.prod(s) for s in self.shapes)

    def features(self, X: torch.Tensor) -> torch.Tensor:
        """The features as they are (flat; reshaped to ``input_shape`` in the forward)."""
        return X

    def init(self, rng: SeedRNG, dtype: torch.dtype) -> torch.Tensor:
        """θ⁰ (R, D): the parameters of factory(**kwargs) called once per replicate, torch's generator
        seeded from its ``init`` stream; also keeps each replicate's buffers."""
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in rng.gens]
        modules = [self._build(s) for s in seeds]
        for m in modules:
            if [(n, tuple(p.shape)) for n, p in m.named_parameters()] != list(zip(self.names, self.shapes)):
                raise ConfigError("model._target_", self.target, "a factory", "its parameters differ between calls")

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(rng.device, dtype if t.is_floating_point() else t.dtype)

        self.template = self.template.to(rng.device)
        self.buffers = {
            n: torch.stack([cast(dict(m.named_buffers())[n]) for m in modules]) for n, _ in modules[0].named_buffers()
        }
        return torch.stack([torch.cat([cast(p.detach()).reshape(-1) for p in m.parameters()]) for m in modules])

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of θ (..., D) as the parameter tensors (..., *shape)."""
        return {n: t.unflatten(-1, s) for n, s, t in zip(self.names, self.shapes, theta.split(list(self.blocks), -1))}

    def _buffers(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The buffers of the first R = len(θ) replicates, (R, ...); before ``init``: the template's."""
        R = theta.shape[0]
        if self.buffers is None:
            return {
                n: b.to(theta.device, theta.dtype if b.is_floating_point() else b.dtype).expand(R, *b.shape).clone()
                for n, b in self.template.named_buffers()
            }
        return {n: b[:R] for n, b in self.buffers.items()}

    def _forward(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        """Outputs (S, K) of one replicate on flat samples x (S, f)."""
        return functional_call(self.template, (params, buffers), (x.reshape(x.shape[0], *self.input_shape),))

    def _wloss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_b w_b ℓ(θ; x_b, y_b) of one replicate and one group of samples."""
        return (w * self.losses(self._forward(params, buffers, x), y)).sum()

    def logits(self, theta: torch.Tensor, Xf: torch.Tensor) -> torch.Tensor:
        """z for Xf (n, f) shared by the replicates → (R, n, K), or (R, ..., f) → (R, ..., K)."""
        P, Bf = self._params(theta), self._buffers(theta)
        if Xf.dim() == 2:
            each = vmap(self._forward, in_dims=(0, 0, None))
            return torch.cat([each(P, Bf, Xc) for Xc in Xf.split(self.chunk)], 1)
        R = theta.shape[0]
        Z = vmap(self._forward, in_dims=(0, 0, 0))(P, Bf, Xf.reshape(R, -1, Xf.shape[-1]))
        return Z.reshape(*Xf.shape[:-1], self.C)

    def weighted_grads(
        self,
        theta: torch.Tensor,
        Xp: torch.Tensor,
        Yp: torch.Tensor,
        Wp: torch.Tensor,
        out: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Σ_b w_{rjb} ∇ℓ(θ_r; x_{rjb}, y_{rjb}) for Xp (R, N, B, f), Yp, Wp (R, N, B): one block
        (R, N, size) per parameter tensor (copied into ``out`` when given)."""
        R, N = Xp.shape[:2]
        G = self._grads(self._params(theta), self._buffers(theta), Xp, Yp, Wp)
        blocks = [G[n].reshape(R, N, -1) for n in self.names]
        return blocks if out is None else [o.copy_(b) for o, b in zip(out, blocks)]

    def full_loss_grad(
        self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((1/n) Σ_s ℓ_s(θ), (1/n) Σ_s ∇ℓ_s(θ)) for shared Xf (n, f): (R,), (R, D), over chunks of samples."""
        n = Xf.shape[0]
        w = torch.full((n,), 1.0 / n, dtype=Xf.dtype, device=Xf.device)
        P, Bf = self._params(theta), self._buffers(theta)
        F: Any = 0
        g: Any = 0
        for Xc, Yc, wc in zip(Xf.split(self.chunk), Y.split(self.chunk), w.split(self.chunk)):
            gc, Fc = self._grad_value_shared(P, Bf, Xc, Yc, wc)
            F, g = F + Fc, g + torch.cat([gc[k].flatten(1) for k in self.names], 1)
        return F, g

    def full_grad(self, theta: torch.Tensor, Xf: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """(1/n) Σ_s ∇ℓ_s(θ) for shared Xf (n, f): (R, D)."""
        return self.full_loss_grad(theta, Xf, Y)[1]
