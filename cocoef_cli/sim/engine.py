"""The iteration loop, vectorised over replicates (R) and devices (M).

Per update t = 1..T, for all replicates at once:
  G = [g_j(θ)]_j (R, N, D), each partition gradient once   U = B G (R, M, D)
  z ~ straggler model (R, M)      a, residual = decode(z)    ĝ = method.coded_step(U, z, a)
  θ ← θ − η_t ĝ   (heavy-ball buffer when optim.momentum > 0)
and every ``eval_every`` updates a row per replicate (docs/design.md §8). A replicate whose loss or
parameters stop being finite is marked diverged at that evaluation and records no further rows.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cocoef_cli.data import Dataset, load_dataset, partition_indices
from cocoef_cli.errors import ConfigError
from cocoef_cli.models import Objective, build_model
from cocoef_cli.record import LABEL_COLUMNS, Table
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.codes import Code, CodedSum, allocate, build_code
from cocoef_cli.sim.compressors import Compressor
from cocoef_cli.sim.methods import (
    Method,
    build_message_compressor,
    build_method,
    message_compressor_config,
    method_class,
)
from cocoef_cli.sim.stragglers import StragglerModel, build_straggler

COLUMNS = [  # docs/design.md §8
    *LABEL_COLUMNS,
    "train_loss",
    "test_loss",
    "test_acc",
    "grad_norm",
    "bits_up",
    "n_received",
    "decode_residual",
    "ef_norm",
    "sim_time",
]
EXTRA_COLUMNS = ["opt_gap"]  # F(θ) − F* where F* is known in closed form (least squares)
SCHEDULES = ("const", "inv_sqrt", "step")


def step_size(optim: Mapping, t: int) -> float:
    """η_t for update t ≥ 1: ``const`` η; ``inv_sqrt`` η/√t; ``step`` η·γ^⌊(t−1)/step_size⌋."""
    lr, sched = float(optim["lr"]), optim.get("schedule", "const")
    if sched == "const":
        return lr
    if sched == "inv_sqrt":
        return lr / math.sqrt(t)
    return lr * float(optim.get("gamma", 0.1)) ** ((t - 1) // int(optim.get("step_size", 100)))


@dataclass
class RunParts:
    """The built parts of one run (data, objective, code, stragglers, method): everything it needs,
    built and validated before anything is written."""

    cfg: Mapping
    seeds: list[int]
    data: Dataset
    objective: Objective
    method: Method
    labels: dict[str, Any]  # fixed CSV columns: method, code, ..., d, p
    code: Any = None  # None for centralised methods
    straggler: Any = None
    bits_per_message: int = 0
    f_star: float | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "cpu, auto (no CUDA device is available here)", "unavailable")
    return torch.device(name)


def code_config(cfg: Mapping, method_cls: type[Method]) -> Mapping:
    """The code a coded method runs: ``cfg.code``, or the method's own (``ef_sgd``: uncoded, rescaled)."""
    return cfg["code"] if method_cls.code is None else {"name": method_cls.code, "d": 1, "decode": "rescale"}


def code_and_stragglers(
    code_cfg: Mapping,
    straggler_cfg: Mapping,
    M: int,
    seeds: list[int],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[Code, StragglerModel]:
    """The code and the straggler model of M devices, one replicate per seed: the allocation S from
    the ``code`` stream, the straggler model on the loads S·1 (``straggler`` stream), then the
    encoding B for its marginals p (crc's random H from the ``code`` stream, after S)."""
    code_rng = SeedRNG(seeds, "code", device)
    S = allocate(code_cfg, M, code_rng)
    straggler = build_straggler(straggler_cfg, S.sum(-1), SeedRNG(seeds, "straggler", device))
    return build_code(code_cfg, S, straggler.p, code_rng, dtype), straggler


@dataclass
class Assembly:
    """A run's parts built from its config by :func:`assemble`: all but the objective's copies of
    the data (:class:`~cocoef_cli.models.Objective`, built by :func:`build_experiment`)."""

    seeds: list[int]
    data: Dataset
    model: Any
    compressor: Compressor  # the compressor of the messages
    method: Method
    partition: np.ndarray  # (R, N, B) training indices, padded with n
    labels: dict[str, Any]  # fixed CSV columns: method, code, ..., d, p
    code: Code | None = None  # None for centralised methods
    straggler: StragglerModel | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


PRECISION_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def assemble(cfg: Mapping, smallest: bool = False, model: Any = None) -> Assembly:
    """Dataset, model, message compressor, method, code and stragglers, partition of ``cfg``, each
    built (and so validated) by its component, in that order.

    ``smallest``: the least that runs every component's validator, for :func:`config.check`: the
    first seed only, the method state of one device, on the CPU (``device`` is still checked), so
    no R×M×D state. ``model``: the model already built for ``cfg`` (reused)."""
    dtype = PRECISION_DTYPES[cfg["precision"]]
    device = resolve_device(cfg["device"])
    if smallest:
        device = torch.device("cpu")
    R, M = (1 if smallest else int(cfg["seeds"])), int(cfg["devices"])
    seeds = [int(cfg["seed"]) + r for r in range(R)]
    method_cls = method_class(cfg)

    data = load_dataset(cfg["dataset"])
    model = build_model(cfg["model"], data) if model is None else model
    compressor = build_message_compressor(cfg, model.D)
    state_M = 1 if smallest or method_cls.centralized else M  # devices holding method state
    method = build_method(cfg, compressor, R, state_M, model.D, dtype, device, SeedRNG(seeds, "compressor", device))
    labels: dict[str, Any] = {
        "method": cfg["method"]["name"],
        "dataset": data.name,
        "model": cfg["model"]["name"],
        "devices": M,
        "compressor": message_compressor_config(cfg)["name"],
    }
    if method_cls.centralized:
        partition = partition_indices(data.y_train, 1, {"partition": "iid"}, seeds)
        labels.update(code="none", compressor="none", straggler="none", d=None, p=0.0)
        return Assembly(seeds, data, model, compressor, method, partition, labels, dtype=dtype, device=device)
    code, straggler = code_and_stragglers(code_config(cfg, method_cls), cfg["straggler"], M, seeds, dtype, device)
    partition = partition_indices(data.y_train, code.N, cfg["dataset"], seeds)
    labels.update(code=code.name, straggler=cfg["straggler"]["name"], d=code.d, p=straggler.mean_p())
    return Assembly(seeds, data, model, compressor, method, partition, labels, code, straggler, dtype, device)


def build_experiment(cfg: Mapping, model: Any = None) -> RunParts:
    """The run ``cfg`` at full size: :func:`assemble`, then the objective over its partition
    (minibatches from the ``batch`` stream when ``batch_size`` is set, coded methods only)."""
    p = assemble(cfg, model=model)
    batch = cfg.get("batch_size") if p.code is not None else None
    objective = Objective(
        p.model,
        p.data,
        p.partition,
        cfg["model"].get("l2", 0.0),
        p.dtype,
        p.device,
        batch_size=batch,
        batch_rng=SeedRNG(p.seeds, "batch", p.device) if batch else None,
    )
    bits = p.compressor.bits() if p.code is not None else 0
    return RunParts(
        cfg,
        p.seeds,
        p.data,
        objective,
        p.method,
        p.labels,
        p.code,
        p.straggler,
        bits,
        objective.f_star(),
        p.dtype,
        p.device,
    )


@dataclass
class RunResult:
    rows: Table  # the metrics rows
    status: str  # completed | diverged
    diverged: dict[int, int]  # seed -> iteration at which it diverged
    wall_s: float
    runtime: Any = None  # runtime=torch_distributed: its counters, a dict (a list of them for several seeds)

    @functools.cached_property
    def metrics(self) -> Any:
        """The metrics rows as a pandas DataFrame (pandas is imported on the first use; the
        record is written from ``rows`` without it)."""
        return self.rows.frame()


def keep_freed_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and never hand freed heap memory back to the
    OS (glibc ``mallopt``; process-wide, Linux only, a no-op elsewhere). Returns True if applied.

    An iteration allocates and frees several (R, M, D) temporaries. By default glibc maps each such
    block fresh from the kernel and unmaps it on free, so every iteration page-faults and zeroes
    it again: about half of an MLP iteration at M = 100 (20 of 41 ms, measured). With the freed
    memory kept, the next iteration reuses it; the resident size no longer shrinks between
    iterations (blocks above 32 MiB are still mapped and unmapped: the large per-iteration buffers
    are reused by their owners instead).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class Simulation:
    """The mutable state of a run (θ, momentum buffer, counters; the method holds the per-device
    state) and :meth:`step`, one update for all replicates.

    Other runtimes subclass it and override :meth:`coded_step` (and :meth:`state_norm`, :meth:`row`,
    ``extra_columns``): the loop, step sizes, momentum and bit accounting stay in one place.
    """

    extra_columns: tuple[str, ...] = ()  # columns a subclass's rows add after COLUMNS + EXTRA_COLUMNS

    def __init__(self, exp: RunParts):
        keep_freed_memory()
        self.exp, R = exp, len(exp.seeds)
        self.t = 0
        self.theta = exp.objective.model.init(SeedRNG(exp.seeds, "init", exp.device), exp.dtype)
        self.momentum = float(exp.cfg["optim"].get("momentum", 0.0))
        self.buf = torch.zeros_like(self.theta) if self.momentum else None
        self.bits = torch.zeros(R, dtype=torch.int64, device=exp.device)
        self.sim_time = torch.zeros(R, dtype=torch.float64, device=exp.device)
        self.timed = exp.straggler is not None and exp.straggler.timed
        self.upload_s = 0.0
        bandwidth = (exp.cfg.get("network") or {}).get("bandwidth_bps")
        if self.timed and bandwidth:
            self.upload_s = exp.bits_per_message / float(bandwidth)
        self.n_received: torch.Tensor | None = None  # of the last update
        self.residual: torch.Tensor | None = None
        # the gradients at θ^t an evaluation computed, for the next update to reuse: G (coded; full
        # partitions only, a minibatch draw cannot be made early) or ∇F (centralised)
        self.next_G: list[torch.Tensor] | None = None
        self.next_grad: torch.Tensor | None = None

    def step(self) -> None:
        """θ ← θ − η_t ĝ for update t = self.t + 1."""
        exp = self.exp
        self.t += 1
        if exp.code is None:  # centralised gradient descent
            g, self.next_grad = self.next_grad, None
            g = exp.objective.grad(self.theta) if g is None else g
        else:
            g, z = self.coded_step()
            self.n_received = z.sum(-1)
            self.bits += self.n_received * exp.bits_per_message
            if self.timed:
                self.sim_time += exp.straggler.last_time + self.upload_s
        if self.buf is not None:
            g = self.buf.mul_(self.momentum).add_(g)
        self.theta = self.theta - step_size(exp.cfg["optim"], self.t) * g

    def coded_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ĝ, z) of one coded update: G = [g_j(θ)]_j, U = B G, z ~ stragglers, (a, residual) =
        decode(z), ĝ = method.coded_step(U, z, a) (U = B G formed by the method, or fused into its
        pass over the messages). Sets ``self.residual``; mutates the method state."""
        exp = self.exp
        z = exp.straggler.draw()
        a, self.residual = exp.code.decode(z)
        G, self.next_G = self.next_G, None  # computed at θ^t by the evaluation, if there was one
        U = CodedSum(exp.code, exp.objective.partition_gradients(self.theta) if G is None else G, z)
        return exp.method.coded_step(U, z, a), z

    def state_norm(self) -> torch.Tensor | None:
        """‖state‖_F per replicate (the ``ef_norm`` column), None for stateless methods."""
        return self.exp.method.state_norm()

    def row(self) -> dict[str, Any]:
        """The metrics of θ^t per replicate (docs/design.md §8 columns that vary), as tensors or scalars.

        The gradients the evaluation needs are the next update's: with full partitions the
        partition gradients G at θ^t are computed here (∇F = Σ_j g_j, and F from their forward
        pass) and kept for that update, and a centralised run keeps ∇F, so an evaluation costs a
        forward pass on the test set (and, with minibatches, one on the training set) beyond the
        update's own work."""
        exp, obj = self.exp, self.exp.objective
        G = F = None
        if exp.code is not None and obj.batch_size is None:
            G, F = obj.partition_loss_grad_blocks(self.theta)
            self.next_G = G
        m = obj.evaluate(self.theta, G, F)
        if exp.code is None:
            self.next_grad = m.grad
        after = self.t > 0
        return {
            "seed": exp.seeds,
            "iter": self.t,
            "train_loss": m.train_loss,
            "test_loss": m.test_loss,
            "test_acc": m.test_acc,
            "grad_norm": m.grad_norm,
            "bits_up": None if exp.code is None else self.bits,
            "n_received": self.n_received if after else None,
            "decode_residual": self.residual if after else None,
            "ef_norm": self.state_norm(),
            "sim_time": self.sim_time if self.timed else None,
            "opt_gap": None if exp.f_star is None else m.train_loss.double() - exp.f_star,
        }


def simulate(
    exp: RunParts,
    run_id: str = "",
    progress: Callable[[int], None] | None = None,
    sim: Simulation | None = None,
    checkpoint: Any = None,
    on_record: Callable[[Table], None] | None = None,
) -> RunResult:
    """Run T updates for all replicates and return the metrics rows (docs/design.md §8).

    ``sim``: the run state to drive (default ``Simulation(exp)``, the vectorised simulator; the
    distributed runtime passes its own subclass). ``checkpoint`` (optional, see
    :class:`cocoef_cli.checkpoint.Checkpoint`): ``restore(sim)`` → the loop state saved by the last
    ``save(sim, state)`` (or None), called every ``checkpoint.every`` updates here in the loop.
    ``on_record`` (optional) receives the rows of each evaluation as they are recorded (live
    progress and loggers; the rows restored from a checkpoint are not replayed).

    Divergence: a replicate whose θ stops being finite after an update (checked every update on
    CPU, where it costs no sync; at evaluations on GPUs), whose loss is not finite at an
    evaluation, or whose loss blows up, F(θᵗ) > ``diverge_factor`` · F(θ⁰) at an evaluation
    (``diverge_factor: null`` turns that rule off), is marked diverged at that update and records
    no further rows (the row of that evaluation included); the loop stops when every replicate
    has diverged."""
    T, every, R = int(exp.cfg["iters"]), int(exp.cfg["eval_every"]), len(exp.seeds)
    t0 = time.perf_counter()
    sim = Simulation(exp) if sim is None else sim
    alive = np.ones(R, dtype=bool)
    diverged: dict[int, int] = {}
    rows: list[Table] = []
    per_update_check = exp.device.type == "cpu"  # a host read of R flags costs nothing on CPU

    def mark_diverged(finite: torch.Tensor) -> None:
        """Replicates alive so far whose ``finite`` flag (R,) is False diverged at update sim.t."""
        bad = alive & ~finite.cpu().numpy()
        for r in np.flatnonzero(bad):
            diverged[exp.seeds[r]] = sim.t
        alive[bad] = False

    def check_theta() -> None:
        mark_diverged(torch.isfinite(sim.theta).all(-1))

    factor = exp.cfg.get("diverge_factor")
    loss0: torch.Tensor | None = None  # F(θ⁰) per replicate, for the blow-up rule

    def record() -> None:
        nonlocal loss0
        cols = sim.row()
        loss = cols["train_loss"]
        ok = torch.isfinite(loss) & torch.isfinite(sim.theta).all(-1)
        if factor is not None:
            loss0 = loss.detach().clone() if loss0 is None else loss0
            ok &= ~(loss > float(factor) * loss0)  # blow-up: F(θᵗ) > diverge_factor · F(θ⁰)
        mark_diverged(ok)
        rows.append(Table.of(cols, R).take(alive))
        if on_record is not None:
            on_record(rows[-1])

    # parameters that decay geometrically become subnormal floats after thousands of updates, and
    # subnormal arithmetic is ~100x slower on CPUs: flush them to zero during the run (< 1e-38)
    torch.set_flush_denormal(True)
    try:
        saved = checkpoint.restore(sim) if checkpoint is not None else None
        if saved is None:
            record()
        else:  # resumed: the rows and divergence flags up to the checkpointed update
            rows, diverged = [Table.from_rows(r) for r in saved["rows"]], dict(saved["diverged"])
            alive[:] = saved["alive"]
            first = dict(zip(rows[0]["seed"].tolist(), rows[0]["train_loss"].tolist()))  # t = 0, replicates alive then
            loss0 = torch.tensor(
                [float(first.get(s, math.nan)) for s in exp.seeds], dtype=sim.theta.dtype, device=sim.theta.device
            )
        while sim.t < T and alive.any():
            sim.step()
            if per_update_check:
                check_theta()
            if sim.t % every == 0 or sim.t == T:
                record()
            if checkpoint is not None and sim.t % checkpoint.every == 0 and sim.t < T and alive.any():
                checkpoint.save(sim, {"rows": rows, "diverged": diverged, "alive": alive.copy()})
            if progress is not None:
                progress(sim.t)
    finally:
        torch.set_flush_denormal(False)

    table = Table.concat(rows)
    for k, v in exp.labels.items():
        table = table.with_constant(k, v)
    table = table.with_constant("run_id", run_id)
    table = table.select(COLUMNS + EXTRA_COLUMNS + list(sim.extra_columns)).sorted_by(["seed", "iter"])
    status = "diverged" if diverged else "completed"
    return RunResult(table, status, diverged, time.perf_counter() - t0)
