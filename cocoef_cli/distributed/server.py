"""The server process: start (or wait for) the devices, run the iteration loop, decode and aggregate.

The loop, step sizes, momentum, evaluation and the metrics rows are the simulator's own
(:func:`cocoef_cli.sim.engine.simulate` driving :class:`DistributedSimulation`); only the coded
update differs. Per update t:

1. z^t: with ``runtime.replay=true`` the seeded straggler draw (the simulator's); the server's copy
   of the model is drawn every iteration either way (it yields ``sim_time`` for ``delay``).
2. θ^t (plus z^t and last update's acceptance) is sent to every device.
3. Messages are collected: replay — exactly from the devices with z_i = 1; otherwise until the
   deadline (``sgc``/``uncoded``: fixed or rescaled weights) or until the first M − s arrivals with
   s = d − 1 (``runtime.wait_for``; exact codes frc/crc/bgc), whichever is configured. Messages of an
   earlier iteration arriving now are late: dropped and counted (``n_late``). z^t := arrivals.
4. (a, residual) = decode(z^t) with the simulator's code; ĝ = the method's own step on the server with
   the compressor replaced by the delivered messages (so Σ a_i m_i, the DIANA shifts h_i + Δ_i, the
   EF21 sums are the simulator's formulas; device-only memories stay with the devices).

Extra columns: ``bytes_up`` (cumulative bytes of all uplink messages received: header, payload,
trailer; late ones included), ``n_late`` (cumulative dropped late messages), ``wall_time``
(cumulative wall seconds of the updates) and ``iter_time`` (wall seconds of update t).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, cast

import numpy as np
import torch

from cocoef_cli.distributed import transport as tp
from cocoef_cli.distributed.options import TOKEN_ENV, TOKEN_FILE_ENV, RuntimeOptions, run_token
from cocoef_cli.distributed.wire import CompressorStandIn, WireError, codec_for, message_iter, message_nbytes, unframe
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.compressors import Compressor
from cocoef_cli.sim.engine import RunParts, RunResult, Simulation, simulate
from cocoef_cli.sim.methods import message_compressor_config

EXACT_DECODERS = ("exact", "optimal")


class Delivered(CompressorStandIn):
    """A 'compressor' whose output is the messages the devices delivered (set before each step)."""

    def __init__(self, C: Any):
        super().__init__(C)
        self.messages: torch.Tensor | None = None

    def output(self, v: torch.Tensor, rng: Any) -> torch.Tensor:
        assert self.messages is not None, "the delivered messages are set before each step"
        return self.messages


def shard(exp: RunParts, own: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The objective restricted to partitions ``own``, as (JSON meta, arrays): the padded (R, N, ...)
    tensors :data:`~cocoef_cli.distributed.transport.SHARD` sliced on N, and what the device needs to
    rebuild the model (:func:`cocoef_cli.distributed.device.shard_objective`); no training/test data."""
    obj, data = exp.objective, exp.data
    meta = {
        "n": int(obj.n),
        "l2": float(obj.l2),
        "batch_size": obj.batch_size,
        "data": {
            "name": data.name,
            "task": data.task,
            "n_classes": int(data.n_classes),
            "features": int(data.features),
            "shape": list(data.shape) if data.shape else None,
        },
    }
    return meta, {name: getattr(obj, name)[:, own] for name in tp.SHARD}


class Cluster:
    """The server's end of the process group: device processes, receiver threads, shutdown."""

    def __init__(self, exp: RunParts, opts: RuntimeOptions):
        self.exp, self.opts = exp, opts
        self.M = int(exp.cfg["devices"])
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.pg: Any = None  # the gloo process group and its store, from start()
        self.store: Any = None
        self.inbox: queue.Queue = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.closed_devices: set[int] = set()
        self.late_after_end = 0  # messages that arrived after the last update

    # -- start
    def start(self, setups: list[tuple[dict, dict[str, torch.Tensor]]], msg_bytes: int) -> None:
        o, M = self.opts, self.M
        world = M + 1
        self.token = run_token(o.spawn)
        host = not tp.agent_store()
        port = o.master_port if o.master_port is not None else 0
        self.store = tp.connect(o.master_addr, port, world, o.timeout_s, host_store=host)
        if o.spawn:
            self._spawn(world, self.store.port)
        self.pg = tp.group(self.store, 0, world, o.timeout_s, o.master_addr)
        for i in range(M):  # every device proves the token before it is sent anything
            meta, _ = tp.recv_message(self.pg, i + 1, tp.HELLO, self.token, tp.HELLO_MAX)
            if meta.get("rank") != i + 1:
                raise WireError(f"rank {i + 1} says it is rank {meta.get('rank')!r} (refused)")
        for i, (meta, arrays) in enumerate(setups):
            tp.send_message(self.pg, i + 1, tp.SETUP, self.token, meta, arrays)
        self.msg_bytes = msg_bytes
        for i in range(M):
            th = threading.Thread(target=self._receive, args=(i,), name=f"uplink-{i}", daemon=True)
            th.start()
            self.threads.append(th)

    def _spawn(self, world: int, port: int) -> None:
        """One launcher process that imports torch once and forks the M device processes."""
        env = dict(
            os.environ,
            WORLD_SIZE=str(world),
            MASTER_ADDR=self.opts.master_addr,
            MASTER_PORT=str(port),
            COCOEF_TIMEOUT_S=str(self.opts.timeout_s),
            COCOEF_RANKS=f"1-{self.M}",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            **{TOKEN_ENV: self.token},
        )
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        env.pop(TOKEN_FILE_ENV, None)
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - kept open for the device, closed in run()
        self.logs.append(log)
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cocoef_cli.runtime.launch"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        )

    def _receive(self, i: int) -> None:
        """Uplink of device i: every message until the device says bye."""
        try:
            while True:
                buf = tp.recv_array(self.pg, self.msg_bytes, i + 1)
                if message_iter(buf) == tp.STOP_ITER:
                    self.closed_devices.add(i)
                    return
                self.inbox.put((i, buf))
        except BaseException as e:
            self.inbox.put((i, e))

    # -- talk
    def broadcast(self, buf: np.ndarray) -> None:
        """The same downlink to every device (sent before anybody's answer is awaited); a send that
        fails (a device died: gloo's "Connection closed by peer") raises as :meth:`get` does,
        naming the device."""
        works = [self.pg.send([torch.from_numpy(buf)], i + 1, 0) for i in range(self.M)]  # gloo fails at wait
        for i, w in enumerate(works):
            try:
                w.wait()
            except RuntimeError as e:
                self.check_devices()  # a device process that exited says so first, with its status
                raise RuntimeError(f"device {i}: connection failed: {e}" + self._log()) from e

    def get(self, timeout: float) -> tuple[int, np.ndarray] | None:
        """The next uplink message (None after ``timeout`` seconds); raises if a device failed."""
        end = time.perf_counter() + max(timeout, 0.0)
        while True:
            self.check_devices()
            try:
                item = self.inbox.get(timeout=min(0.2, max(end - time.perf_counter(), 0.0)))
            except queue.Empty:
                if time.perf_counter() >= end:
                    return None
                continue
            if isinstance(item[1], WireError):
                raise WireError(f"device {item[0]}: {item[1]}")
            if isinstance(item[1], BaseException):
                raise RuntimeError(f"device {item[0]}: connection failed: {item[1]}" + self._log())
            return item

    def check_devices(self) -> None:
        for p in self.procs:
            code = p.poll()
            if code not in (None, 0):
                raise RuntimeError(f"device processes exited with status {code}" + self._log())

    def _log(self) -> str:
        """The tail of the device processes' output (spawned devices only)."""
        if not self.logs:
            return ""
        try:
            self.logs[0].seek(0)
            tail = self.logs[0].read()[-500:].strip()
        except (OSError, ValueError):
            return ""
        return f"; its output: {tail}" if tail else ""

    # -- stop
    def close(self, stop_buf: np.ndarray | None) -> None:
        """Send STOP (if the run got that far), wait for every device to exit, kill stragglers of the
        shutdown, release the group. Never leaves a child process behind."""
        try:
            if stop_buf is not None and self.pg is not None:
                self.broadcast(stop_buf)
                end = time.perf_counter() + self.opts.timeout_s
                while len(self.closed_devices) < self.M and time.perf_counter() < end:
                    try:
                        item = self.inbox.get(timeout=0.05)  # late messages after the last update
                        if isinstance(item[1], BaseException):
                            break
                        self.late_after_end += 1
                    except queue.Empty:
                        if any(p.poll() not in (None, 0) for p in self.procs):
                            break
                for p in self.procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=max(end - time.perf_counter(), 1.0))
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.terminate()
            for p in self.procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for log in self.logs:
                log.close()
            if self.pg is not None:
                with contextlib.suppress(Exception):
                    if hasattr(self.pg, "abort"):
                        self.pg.abort()
            for th in self.threads:
                th.join(timeout=2)
            self.pg = None
            self.store = None


class DistributedSimulation(Simulation):
    """The simulator's run state with :meth:`coded_step` done by real device processes."""

    extra_columns = ("bytes_up", "n_late", "wall_time", "iter_time")

    def __init__(self, exp: RunParts, opts: RuntimeOptions, cluster: Cluster):
        super().__init__(exp)
        if len(exp.seeds) != 1:
            raise ValueError("DistributedSimulation runs one replicate")
        self.opts, self.cluster = opts, cluster
        cfg, code = exp.cfg, exp.code
        self.M, self.D = code.M, exp.objective.model.D
        C = exp.method.C
        self.codec = codec_for(C, exp.dtype)
        cls = type(exp.method)
        self.stateful = bool(cls.state_names)
        self.msg_bytes = message_nbytes(self.codec, self.stateful)
        self.delivered = Delivered(C)
        self.server_method = cls(
            cfg["method"],
            cast(Compressor, self.delivered),  # a duck-typed stand-in
            1,
            self.M,
            self.D,
            exp.dtype,
            torch.device("cpu"),
            SeedRNG(exp.seeds, "compressor"),
        )
        self.keys_rng = SeedRNG(exp.seeds, "compressor") if self.codec.needs_keys else None
        self.state_sq = np.zeros(self.M)  # committed ‖state_i‖² of every device
        self.accepted = np.zeros(self.M, dtype=bool)
        self.bytes, self.n_late, self.wall = 0, 0, 0.0
        self.iter_time: float | None = None
        # closing rule without replay
        self.exact = code.decode_name in EXACT_DECODERS
        self.wait_for = opts.wait_for if opts.wait_for is not None else max(self.M - (code.d - 1), 1)
        st = exp.straggler
        if opts.deadline_s is not None:
            self.deadline = opts.deadline_s
        elif st.timed:
            self.deadline = opts.time_scale * st.deadline if math.isfinite(st.deadline) else math.inf
        else:
            self.deadline = 1.0
        self.straggle_s = (
            opts.straggle_s
            if opts.straggle_s is not None
            else (2.0 * self.deadline if math.isfinite(self.deadline) else 1.0)
        )

    # -- set-up messages
    def setups(self) -> list[tuple[dict, dict[str, torch.Tensor]]]:
        """Per device the set-up message: (JSON meta, arrays)."""
        exp, cfg = self.exp, self.exp.cfg
        S, B = exp.code.S[0], exp.code.B[0]
        rt = {
            "slow_s": self.opts.slow_s,
            "slow_devices": list(self.opts.slow_devices),
            "time_scale": self.opts.time_scale,
            "straggle_s": self.straggle_s,
        }
        comp_cfg = message_compressor_config(cfg)
        loads = exp.code.S.sum(-1)  # (1, M) partitions per device
        out = []
        for i in range(self.M):
            own = torch.nonzero(S[i]).view(-1).tolist()
            shard_meta, arrays = shard(exp, own)
            out.append(
                (
                    {
                        "cfg": cfg,
                        "index": i,
                        "M": self.M,
                        "N": exp.code.N,
                        "D": self.D,
                        "dtype": str(exp.dtype).replace("torch.", ""),
                        "seed": exp.seeds[0],
                        "replay": self.opts.replay,
                        "comp_cfg": comp_cfg,
                        "own": own,
                        "shard": shard_meta,
                        "runtime": rt,
                    },
                    {"b_row": B[i, own], "loads": loads, **arrays},
                )
            )
        return out

    def downlink(self, cmd: int, z: np.ndarray) -> np.ndarray:
        return tp.pack_downlink(cmd, self.t, self.accepted, z, self.theta[0].to(self.exp.dtype))

    # -- the engine hooks
    def step(self) -> None:
        t0 = time.perf_counter()
        super().step()
        self.iter_time = time.perf_counter() - t0
        self.wall += self.iter_time

    def coded_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        exp, M, t = self.exp, self.M, self.t
        z_model = exp.straggler.draw()  # always drawn: replayed pattern / sim_time for delay
        keys = self.keys_rng.rand(M, self.D, dtype=exp.dtype)[0] if self.keys_rng is not None else None
        replay = self.opts.replay
        z_send = z_model[0].cpu().numpy() if replay else np.ones(M, dtype=bool)
        self.cluster.broadcast(self.downlink(tp.CMD_STEP, z_send))
        start = time.perf_counter()
        got: dict[int, np.ndarray] = {}
        while True:
            if replay:
                if len(got) == int(z_send.sum()):
                    break
                wait = self.opts.timeout_s
            else:
                if len(got) == M or (self.exact and len(got) >= self.wait_for):
                    break
                wait = (
                    self.opts.timeout_s
                    if self.exact or not math.isfinite(self.deadline)
                    else self.deadline - (time.perf_counter() - start)
                )
                if wait <= 0:
                    break
            item = self.cluster.get(wait)
            if item is None:
                if replay or self.exact or not math.isfinite(self.deadline):
                    raise RuntimeError(
                        f"update {t}: no message within runtime.timeout_s={self.opts.timeout_s}s "
                        f"(received from devices {sorted(got)})"
                    )
                break
            i, buf = item
            self.bytes += buf.size
            if message_iter(buf) > t:
                raise WireError(f"update {t}: device {i} sent a message of update {message_iter(buf)}")
            if message_iter(buf) != t:  # a late message of an earlier update: dropped
                self.n_late += 1
                continue
            if replay and not z_send[i]:
                raise RuntimeError(f"update {t}: device {i} answered although the replayed pattern says straggler")
            got[i] = buf
        z = np.zeros(M, dtype=bool)
        z[list(got)] = True
        msgs = torch.zeros(1, M, self.D, dtype=exp.dtype)
        for i, buf in got.items():
            _, m, sq = unframe(self.codec, buf, None if keys is None else keys[i], self.stateful)
            msgs[0, i] = m
            if sq is not None:
                self.state_sq[i] = sq
        if self.server_method.reset:
            self.state_sq[~z] = 0.0
        self.accepted = z
        zt = torch.from_numpy(z).unsqueeze(0)
        a, self.residual = exp.code.decode(zt)
        self.delivered.messages = msgs
        return self.server_method.step(msgs, zt, a), zt

    def state_norm(self) -> torch.Tensor | None:
        if not self.stateful:
            return None
        return torch.tensor([math.sqrt(float(self.state_sq.sum()))], dtype=self.exp.dtype)

    def row(self) -> dict[str, Any]:
        cols = super().row()
        cols.update(bytes_up=self.bytes, n_late=self.n_late, wall_time=self.wall, iter_time=self.iter_time)
        return cols


def run_one(exp: RunParts, run_id: str, progress=None) -> RunResult:
    """One replicate on M device processes (+ this process as the server)."""
    opts = RuntimeOptions.from_config(exp.cfg)
    cluster = Cluster(exp, opts)
    sim = DistributedSimulation(exp, opts, cluster)
    stop = None
    try:
        cluster.start(sim.setups(), sim.msg_bytes)
        result = simulate(exp, run_id, progress, sim=sim)
        stop = sim.downlink(tp.CMD_STOP, np.zeros(sim.M, dtype=bool))
        result.runtime = {
            "late_after_end": 0,
            "message_bytes": sim.msg_bytes,
            "payload_bytes": sim.codec.nbytes(),
            "deadline_s": sim.deadline,
        }
        return result
    finally:
        cluster.close(stop)
        if stop is not None:
            result.runtime["late_after_end"] = cluster.late_after_end


def run_distributed(exp: RunParts, run_id: str = "", progress=None) -> RunResult:
    """``runtime=torch_distributed``: each replicate seed in turn (a fresh set of processes each);
    the rows are concatenated as the simulator's would be."""
    if len(exp.seeds) == 1:
        return run_one(exp, run_id, progress)
    from cocoef_cli.record import Table
    from cocoef_cli.sim.engine import build_experiment

    results = []
    for s in exp.seeds:
        sub = build_experiment(dict(exp.cfg, seed=s, seeds=1))
        results.append(run_one(sub, run_id, progress))
    rows = Table.concat([r.rows for r in results])
    diverged = {k: v for r in results for k, v in r.diverged.items()}
    res = RunResult(rows, "diverged" if diverged else "completed", diverged, sum(r.wall_s for r in results))
    res.runtime = [r.runtime for r in results]
    return res
