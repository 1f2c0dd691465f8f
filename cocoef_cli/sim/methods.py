"""COCO-EF and the baselines: per-device state and one step, batched over (R, M, D).

Notation per iteration: U (R, M, D) encoded gradients u_i = Σ_j B_ij g_j of the devices that
answer (rows of stragglers are 0: they compute nothing), z (R, M)
the devices that answer, a (R, M) the decoding weights (zero for stragglers), C the compressor. A
step returns the server aggregate ĝ (R, D). Stragglers send nothing; their state is left
unchanged (``straggler_state=freeze``) or zeroed (``reset``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from cocoef_cli.checks import need_bool, need_num
from cocoef_cli.errors import ConfigError
from cocoef_cli.registry import Registry
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.codes import CodedSum
from cocoef_cli.sim.compressors import Compressor, build_compressor

STRAGGLER_STATES = ("freeze", "reset")


def method_class(cfg: Mapping) -> type[Method]:
    """The method class of the run ``cfg``: ``method.name`` or its ``method._target_``."""
    return METHODS.entry(cfg["method"])


def build_method(
    cfg: Mapping, compressor: Compressor, R: int, M: int, D: int, dtype: torch.dtype, device: torch.device, rng: SeedRNG
) -> Method:
    """The method of the run ``cfg`` for R replicates of M devices, messages in ℝ^D."""
    needs = (cfg["method"], compressor, R, M, D, dtype, device, rng)
    return METHODS.build(cfg["method"], *needs, builtin=lambda cls: cls(*needs))


def message_compressor_config(cfg: Mapping) -> Mapping:
    """The compressor config of the run's messages: ``compressor``, or the identity for a method
    that sends full precision (``compresses = False``)."""
    return cfg["compressor"] if method_class(cfg).compresses else {"name": "identity"}


def build_message_compressor(cfg: Mapping, D: int) -> Compressor:
    """The compressor of the run's messages (:func:`message_compressor_config`), checked against the
    method: a method that needs an unbiased compressor rejects a biased one unless
    ``method.allow_biased``."""
    comp_cfg = message_compressor_config(cfg)
    compressor = build_compressor(comp_cfg, D)
    if method_class(cfg).needs_unbiased and not compressor.unbiased and not cfg["method"].get("allow_biased", False):
        raise ConfigError(
            "compressor",
            comp_cfg["name"],
            "randk_unbiased, qsgd, onebit, terngrad with compressor.clip=null, natural, identity",
            f"method {cfg['method']['name']} needs an unbiased compressor (or method.allow_biased=true)",
        )
    return compressor


def aggregate(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ĝ = Σ_i a_i m_i: (R, M) × (R, M, D) → (R, D) as one batched product."""
    return torch.bmm(a.unsqueeze(1), m).squeeze(1)


class Method:
    """Base: no state. Subclasses set the class flags below and implement :meth:`step`.

    A plugin (``method._target_=pkg.mod.MyMethod``) subclasses it with ``__init__(self, cfg, C,
    R, M, D, dtype, device, rng, **keys)`` calling ``super().__init__(cfg, C, R, M, D, dtype,
    device, rng)`` (cfg: the method group, whose ``straggler_state`` the base reads; C the
    message :class:`Compressor`; rng the compressor stream; keys its own YAML keys), and
    implements ``step(self, U, z, a)`` → ĝ (R, D): U (R, M, D) the encoded gradients
    u_i = Σ_j B_ij g_j (zero rows for stragglers), z (R, M) bool the devices that answered,
    a (R, M) the decoding weights (zero on stragglers). Per-device states (R, M, D) named in
    ``state_names`` are allocated as zeros by the base; :meth:`_keep` applies straggler_state;
    :func:`aggregate` is ĝ = Σ_i a_i m_i. Compress with ``self.C.compress(v, self.rng)``.
    """

    code: ClassVar[str | None] = None  # forces this code (e.g. "uncoded") whatever `code=` says
    compresses: ClassVar[bool] = True  # False: messages are full precision (compressor = identity)
    centralized: ClassVar[bool] = False  # True: no devices at all (plain gradient descent)
    needs_unbiased: ClassVar[bool] = False  # rejects biased compressors unless method.allow_biased
    state_names: ClassVar[tuple[str, ...]] = ()  # per-device (R, M, D) states, reported as ef_norm

    def __init__(
        self,
        cfg: Mapping,
        compressor: Compressor,
        R: int,
        M: int,
        D: int,
        dtype: torch.dtype,
        device: torch.device,
        rng: SeedRNG,
    ):
        self.C, self.rng = compressor, rng
        self.reset = cfg.get("straggler_state", "freeze")
        if self.reset not in STRAGGLER_STATES:
            raise ConfigError("method.straggler_state", self.reset, STRAGGLER_STATES)
        self.reset = self.reset == "reset"
        for name in self.state_names:
            setattr(self, name, torch.zeros(R, M, D, dtype=dtype, device=device))

    def step(self, U: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def coded_step(self, U: CodedSum, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """:meth:`step` for U = B G not yet formed (what the simulator passes): forms U, unless the
        method can consume the sum on the fly (COCO-EF adds it to its error memory)."""
        return self.step(U.dense(), z, a)

    def _keep(self, z: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The state after the step: ``new`` for devices that answered, old (or 0) for stragglers."""
        return torch.where(z.unsqueeze(-1), new, torch.zeros((), dtype=old.dtype) if self.reset else old)

    def state_norm(self) -> torch.Tensor | None:
        """‖state‖_F per replicate, (R,), or None for stateless methods."""
        if not self.state_names:
            return None
        return getattr(self, self.state_names[0]).flatten(1).norm(dim=-1)


METHODS: Registry[type[Method]] = Registry("method", Method, common=("straggler_state", "allow_biased"))


@METHODS.register("coco_ef")
class CocoEF(Method):
    """COCO-EF (the paper): compressed coded gradients with error feedback.

    v_i = u_i + e_i,  m_i = C(v_i),  e_i ← v_i − m_i;   ĝ = Σ_i a_i m_i.
    Invariant for each device: Σ_t m_i^t + e_i^T = Σ_t u_i^t over the iterations it answered.
    """

    state_names = ("e",)

    def step(self, U, z, a):
        self.e.add_(U)  # a straggler's u is 0
        return self._send(z, a)

    def coded_step(self, U, z, a):
        return self._send(z, a, add=U)

    def _send(self, z, a, add=None):
        """m_i = C(v_i) with v = e (+ ``add``, added in place first), e ← v − m, ĝ = Σ a_i m_i."""
        v = self.e  # holds v = u + e from here on
        # stragglers' selections are never used; e ← v − m for the devices that sent m (v + (−m))
        sparse = self.C.sparse(v, self.rng, active=z, add=add, subtract=True)
        if sparse is None:
            m = self.C.compress(v, self.rng)
            g = aggregate(a, m)
            v.sub_(m.mul_(z.unsqueeze(-1)))  # e ← v − m, for the devices that sent m
        else:  # k coordinates per message: no dense (R, M, D) temporaries
            idx, vals = sparse
            m = vals.masked_fill(z.unsqueeze(-1).logical_not(), 0.0)  # m_i at idx; stragglers sent nothing (even inf)
            g = torch.zeros(v.shape[0], v.shape[2], dtype=v.dtype, device=v.device)
            g.scatter_add_(1, idx.flatten(1), (m * a.unsqueeze(-1)).flatten(1))
        if self.reset:
            v.mul_(z.unsqueeze(-1))
        return g


@METHODS.register("coco")
class Coco(Method):
    """COCO without error feedback: m_i = C(u_i), ĝ = Σ_i a_i m_i (with an unbiased C: the
    "unbiased compression in gradient coding" baseline)."""

    def step(self, U, z, a):
        return aggregate(a, self.C.compress(U, self.rng))


class _Shifts(Method):
    """Per-device shifts h_i kept by device and server. ``method.stale_shifts`` (default false):
    the server also uses the last shift it holds of a straggler (partial-participation variants
    in the style of DIANA-PP / EF21-PP), weighted by the full-participation weights ā (āᵀB = 1ᵀ,
    :meth:`~cocoef_cli.sim.codes.Code.full_weights`); false: a straggler's shift drops out of ĝ."""

    state_names = ("h",)

    def __init__(self, cfg, compressor, R, M, D, dtype, device, rng):
        super().__init__(cfg, compressor, R, M, D, dtype, device, rng)
        self.stale = need_bool("method.stale_shifts", cfg.get("stale_shifts", False))
        self.full: torch.Tensor | None = None  # ā, taken from the code at the first coded step

    def coded_step(self, U, z, a):
        if self.stale and self.full is None:
            self.full = U.code.full_weights()
        return super().coded_step(U, z, a)

    def _full(self) -> torch.Tensor:
        if self.full is None:
            raise RuntimeError("method.stale_shifts needs the code's full-participation weights (simulator runtime)")
        return self.full


@METHODS.register("coco_diana")
class CocoDiana(_Shifts):
    """Unbiased compression of gradient differences (DIANA shifts) under gradient coding.

    Δ_i = C(u_i − h_i),  ĝ = Σ_i a_i (h_i + Δ_i),  h_i ← h_i + α Δ_i,  α = 1/(ω + 1) by default.
    ``stale_shifts`` (DIANA-PP style): ĝ = Σ_i ā_i h_i + Σ_i a_i Δ_i, every stored shift counts.
    """

    needs_unbiased = True

    def __init__(self, cfg, compressor, R, M, D, dtype, device, rng):
        super().__init__(cfg, compressor, R, M, D, dtype, device, rng)
        alpha = cfg.get("alpha")
        if alpha is None:
            omega = compressor.omega()
            alpha = 1.0 if omega is None else 1.0 / (omega + 1.0)
        self.alpha = need_num("method.alpha", alpha, 0, 1, lo_open=True, accepted="numbers in (0, 1] or null (1/(ω+1))")

    def step(self, U, z, a):
        delta = self.C.compress(U - self.h, self.rng)
        g = aggregate(self._full(), self.h) + aggregate(a, delta) if self.stale else aggregate(a, self.h + delta)
        self.h = self._keep(z, self.h + self.alpha * delta, self.h)
        return g


@METHODS.register("coco_ef21")
class CocoEF21(_Shifts):
    """EF21 shifts under gradient coding (an extension): Δ_i = C(u_i − h_i), h_i ← h_i + Δ_i,
    ĝ = Σ_i a_i h_i over the devices that answered; ``stale_shifts`` (EF21-PP style):
    ĝ = Σ_i ā_i h_i over every device, a straggler's h_i as last received."""

    def step(self, U, z, a):
        self.h = self._keep(z, self.h + self.C.compress(U - self.h, self.rng), self.h)
        return aggregate(self._full() if self.stale else a, self.h)


@METHODS.register("gc")
class GC(Method):
    """Gradient coding in full precision: m_i = u_i, ĝ = Σ_i a_i u_i (compressor ignored)."""

    compresses = False

    def step(self, U, z, a):
        return aggregate(a, U)


@METHODS.register("ef_sgd")
class EFSGD(CocoEF):
    """Uncoded error feedback (d = 1, rescaled by M/Σz): COCO-EF with code=uncoded."""

    code = "uncoded"


@METHODS.register("ignore_stragglers")
class IgnoreStragglers(GC):
    """Uncoded full precision, stragglers ignored and the sum rescaled by M/Σz."""

    code = "uncoded"


@METHODS.register("gd")
class GD(Method):
    """Centralised full gradient descent: ĝ = ∇F, no devices, no communication."""

    compresses = False
    centralized = True

    def step(self, U, z, a):  # never called: the engine uses ∇F directly
        raise RuntimeError("gd has no device step")
