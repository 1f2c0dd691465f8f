"""Straggler models: per-iteration answer masks z and per-device marginals p, batched over R.

Every model has ``p`` (R, M) float64 — the marginal P(device i straggles) that ``sgc`` and
``uncoded/unbiased`` use — and ``draw()`` → z (R, M) bool, True = the device answers in time.
``draw`` advances the model's generator (and, for ``markov``, its state). ``last_time`` (R,)
float64 is the simulated compute time of the last draw for ``delay`` and ``None`` otherwise.

Public API: :data:`STRAGGLERS` (the registry, one model class per entry, math in its docstring),
:func:`build_straggler`, :class:`StragglerModel`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from cocoef_cli.checks import is_num, need_int, need_num
from cocoef_cli.errors import ConfigError
from cocoef_cli.registry import Registry
from cocoef_cli.rng import SeedRNG

F64 = torch.float64


# ----------------------------------------------------------------------------- config helpers
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _prob(cfg: Any, key: str, default: float) -> float:
    """``straggler.<key>`` as a probability in [0, 1)."""
    return need_num(f"straggler.{key}", _get(cfg, key, default), 0, 1, hi_open=True)


# ----------------------------------------------------------------------------- base model
class StragglerModel:
    """Base: constant marginals ``p`` (R, M) float64; ``draw()`` → z (R, M) bool (True = answers).

    A plugin (``straggler._target_=pkg.mod.MyModel``) subclasses it with
    ``__init__(self, loads, rng, **keys)``: ``loads`` (R, M) the number of partitions each device
    holds, ``rng`` the straggler stream (a SeedRNG over the R replicates), keys the group's YAML
    keys. It calls ``super().__init__(p, rng)`` with p (R, M) its marginals P(device i straggles)
    (used by ``sgc`` and the unbiased decoders), and overrides ``draw(self)`` → z (R, M) bool,
    True = device i answers this iteration, drawing only from ``self.rng`` (e.g.
    ``self.rng.rand(self.M, dtype=torch.float64)`` is (R, M) uniforms); the default ``draw`` is
    independent Bernoulli(p_i) stragglers.
    """

    name: ClassVar[str] = "base"
    timed: ClassVar[bool] = False  # True when draws also simulate compute time (``last_time``)

    def __init__(self, p: torch.Tensor, rng: SeedRNG):
        self.p = p.to(F64)
        self.rng = rng
        self.R, self.M = (int(s) for s in p.shape)
        self.last_time: torch.Tensor | None = None
        self.last_delays: torch.Tensor | None = None  # (R, M) compute times of the last draw (timed models)

    @classmethod
    def from_config(cls, cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> StragglerModel:
        raise NotImplementedError

    def mean_p(self) -> float:
        """The mean marginal straggling probability over devices and replicates."""
        return float(self.p.mean())

    def draw(self) -> torch.Tensor:
        """Independent draws: device i straggles with probability p_i (one uniform per device)."""
        return self.rng.rand(self.M, dtype=F64) >= self.p

    def __repr__(self) -> str:
        return f"{type(self).__name__}(R={self.R}, M={self.M}, mean_p={self.mean_p():.4g})"


STRAGGLERS: Registry[type[StragglerModel]] = Registry("straggler", StragglerModel)


def _full(loads: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    return torch.zeros(loads.shape, dtype=F64, device=loads.device) + value


@STRAGGLERS.register("none")
class NoStragglers(StragglerModel):
    """Nobody straggles: z = 1, p = 0 (no random draws)."""

    name = "none"

    @classmethod
    def from_config(cls, cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> NoStragglers:
        return cls(_full(loads, 0.0), rng)

    def draw(self) -> torch.Tensor:
        return torch.ones(self.R, self.M, dtype=torch.bool, device=self.p.device)


@STRAGGLERS.register("bernoulli")
class Bernoulli(StragglerModel):
    """I.i.d. stragglers: z_i ~ Bernoulli(1 − p) independently across devices and iterations.

    Key ``straggler.p`` ∈ [0, 1); marginals p_i = p.
    """

    name = "bernoulli"

    @classmethod
    def from_config(cls, cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> Bernoulli:
        return cls(_full(loads, _prob(cfg, "p", 0.2)), rng)


@STRAGGLERS.register("fixed")
class Fixed(StragglerModel):
    """Exactly s stragglers per iteration, a uniformly random s-subset of the M devices.

    Key ``straggler.s`` ∈ {0, …, M−1}; marginals p_i = s/M. Device i straggles iff π(i) < s for a
    fresh uniform permutation π.
    """

    name = "fixed"

    def __init__(self, p: torch.Tensor, rng: SeedRNG, s: int):
        super().__init__(p, rng)
        self.s = s

    @classmethod
    def from_config(cls, cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> Fixed:
        M = loads.shape[1]
        s = need_int("straggler.s", _get(cfg, "s", 0), 0, M - 1, accepted=f"integers 0..{M - 1} (s < devices={M})")
        return cls(_full(loads, s / M), rng, s)

    def draw(self) -> torch.Tensor:
        return self.rng.randperm(self.M).to(self.p.device) >= self.s


@STRAGGLERS.register("hetero")
class Hetero(StragglerModel):
    """Heterogeneous independent stragglers: device i straggles with its own p_i each iteration.

    p_i = ``straggler.p_list``[i] (length M) if given, else evenly spaced
    linspace(``p_min``, ``p_max``, M) with 0 ≤ p_min ≤ p_max < 1.
    """

    name = "hetero"

    @classmethod
    def from_config(cls, cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> Hetero:
        M = loads.shape[1]
        p_list = _get(cfg, "p_list")
        if p_list is not None:
            acc = f"null or a list of {M} numbers in [0, 1)"
            if isinstance(p_list, (str, bytes)) or not hasattr(p_list, "__iter__"):
                raise ConfigError("straggler.p_list", p_list, acc, "must be a list")
            vals = list(p_list)
            if len(vals) != M:
                raise ConfigError("straggler.p_list", p_list, acc, f"has {len(vals)} entries for devices={M}")
            for v in vals:
                if not is_num(v) or not 0.0 <= float(v) < 1.0:
                    raise ConfigError("straggler.p_list", p_list, acc, f"entry {v!r} is not in [0, 1)")
            p = torch.tensor([float(v) for v in vals], dtype=F64, device=loads.device)
        else:
            lo, hi = _prob(cfg, "p_min", 0.0), _prob(cfg, "p_max", 0.4)
            if lo > hi:
                raise ConfigError("straggler.p_max", hi, f"numbers in [{lo:g}, 1) (>= p_min)", "p_max < p_min")
            p = torch.linspace(lo, hi, M, dtype=F64, device=loads.device)
        return cls(_full(loads, p), rng)


@STRAGGLERS.register("markov")
class Markov(StragglerModel):
    """Persistent stragglers: a two-state Markov chain per device with stationary mean p.

    P(straggler → straggler) = ``stay``, P(ok → straggler) = q = p(1 − stay)/(1 − p), so the
    stationary law is P(straggler) = q/(q + 1 − stay) = p (needs q ≤ 1, i.e.
    stay ≥ (2p − 1)/p). The first draw samples the stationary law; each later draw makes one
    transition. Keys ``straggler.p`` ∈ [0, 1), ``straggler.stay`` ∈ [0, 1). Marginals p_i = p.
    """

    name = "markov"

    def __init__(self, p: torch.Tensor, rng: SeedRNG, stay: float, q: float):
        super().__init__(p, rng)
        self.stay, self.q = stay, q
        self.state: torch.Tensor | None = None  # (R, M) bool, True = straggling

    @classmethod
    def from_config(cls, cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> Markov:
        p = _prob(cfg, "p", 0.2)
        stay = _prob(cfg, "stay", 0.8)
        q = p * (1.0 - stay) / (1.0 - p)
        if q > 1.0:
            lo = (2.0 * p - 1.0) / p
            raise ConfigError(
                "straggler.stay",
                stay,
                f"numbers in [{lo:.6g}, 1) for p={p:g}",
                f"P(ok → straggler) = p(1−stay)/(1−p) = {q:.4g} > 1",
            )
        return cls(_full(loads, p), rng, stay, q)

    def draw(self) -> torch.Tensor:
        """Advance every device's chain one step (the first call samples the stationary law)."""
        u = self.rng.rand(self.M, dtype=F64)
        if self.state is None:
            self.state = u < self.p
        else:
            self.state = torch.where(self.state, u < self.stay, u < self.q)
        return ~self.state


@STRAGGLERS.register("delay")
class Delay(StragglerModel):
    """Random compute delays against a deadline (units: seconds of simulated time per partition).

    T_i = load_i·(t0 + E_i), E_i ~ Exp(rate mu), load_i = partitions stored on device i; device i
    straggles iff T_i > deadline (``deadline: null`` or ``.inf`` = nobody ever straggles).
    Marginal p_i = exp(−mu·(deadline/load_i − t0)) if deadline/load_i > t0 else 1; a deadline
    that makes some p_i = 1 is rejected. ``last_time`` = the deadline if someone straggled, else
    max_i T_i. Keys ``straggler.t0`` ≥ 0, ``straggler.mu`` > 0, ``straggler.deadline`` > 0.
    """

    name = "delay"
    timed = True

    def __init__(self, p: torch.Tensor, rng: SeedRNG, loads: torch.Tensor, t0: float, mu: float, deadline: float):
        super().__init__(p, rng)
        self.loads, self.t0, self.mu, self.deadline = loads.to(F64), t0, mu, deadline

    @classmethod
    def from_config(cls, cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> Delay:
        t0 = need_num("straggler.t0", _get(cfg, "t0", 1.0), 0)
        mu = need_num("straggler.mu", _get(cfg, "mu", 1.0), 0, lo_open=True)
        deadline = _get(cfg, "deadline", None)
        if isinstance(deadline, str) and deadline.strip().lower() in ("inf", "+inf", ".inf", "infinity"):
            deadline = math.inf
        if deadline is None:
            deadline = math.inf
        else:
            deadline = need_num(
                "straggler.deadline", deadline, 0, lo_open=True, finite=False, accepted="null, inf or numbers > 0"
            )
        loads = loads.to(F64)
        if bool((loads < 0).any()):
            raise ValueError("delay: loads must be nonnegative")
        slack = deadline / loads - t0  # +inf for load 0 or an infinite deadline
        p = torch.where(slack > 0, torch.exp(-mu * slack.clamp_min(0.0)), torch.ones_like(slack))
        if bool((p >= 1.0).any()):
            need = t0 * float(loads.max())
            raise ConfigError(
                "straggler.deadline",
                deadline,
                f"null, .inf or numbers > {need:g} (t0 × max load)",
                "some device misses this deadline with probability 1",
            )
        return cls(p, rng, loads, t0, mu, deadline)

    def draw(self) -> torch.Tensor:
        u = self.rng.rand(self.M, dtype=F64)
        T = self.loads * (self.t0 - torch.log1p(-u) / self.mu)  # Exp(mu) by inversion
        late = self.deadline < T
        self.last_delays = T  # (R, M) compute times of this draw (the distributed runtime sleeps them)
        self.last_time = torch.where(late.any(-1), torch.full_like(T[:, 0], self.deadline), T.max(-1).values)
        return ~late


# ----------------------------------------------------------------------------- entry point
def build_straggler(cfg: Any, loads: torch.Tensor, rng: SeedRNG) -> StragglerModel:
    """The straggler model named by ``cfg.name`` for loads (R, M) (partitions per device)."""
    name = _get(cfg, "name")
    if name is None:
        raise ConfigError("straggler", None, STRAGGLERS.names(), "no straggler model given")
    loads = torch.as_tensor(loads)
    if loads.dim() != 2 or loads.shape[0] != rng.R:
        raise ValueError(f"loads must be (R={rng.R}, M); got {tuple(loads.shape)}")
    # a _target_ class: cls(loads, rng, **keys); a name: its from_config
    return STRAGGLERS.build(cfg, loads, rng, builtin=lambda cls: cls.from_config(cfg, loads, rng))
