"""A device process: its own partitions, its encoded gradient, the method's state, compact messages.

Device i holds only the partitions it stores (S_ij = 1), sent once by the server at set-up (after
the device's hello proved the run token, :mod:`~cocoef_cli.distributed.transport`). Per iteration t it
receives θ^t and computes

    g_j(θ^t) for its partitions j,   u_i = Σ_j B_ij g_j   (summed in the simulator's order),

then runs the configured method for itself alone — the simulator's own Method class with R = M = 1
(COCO-EF: v = u + e, m = C(v), e ← v − m; DIANA/EF21: Δ = C(u − h), h ← ...), with the compressor's
randomness taken from the run's seeded ``compressor`` stream: each device regenerates the full
(M, D) block the simulator draws per iteration and keeps its own row, so no key is ever sent — and
sends m (or Δ) framed by :mod:`cocoef_cli.distributed.wire`. The state change is tentative until the next
downlink says whether the server accepted the message: if not (a late message, dropped), the state is
rolled back (``method.straggler_state=freeze``) or zeroed (``reset``), exactly like a simulator
straggler. With ``runtime.replay=true`` a device the seeded pattern marks as straggler computes and
sends nothing (it only advances its random streams). Without replay the device sleeps its draw from the
straggler model (``delay``: time_scale × T_i; others: ``straggle_s`` when it straggles), cut short as
soon as the next model arrives, and then sends (the server drops a late message).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from typing import Any, cast

import numpy as np
import torch

from cocoef_cli.data import Dataset
from cocoef_cli.distributed import transport as tp
from cocoef_cli.distributed.options import TOKEN_ENV, TOKEN_HOW, env_token
from cocoef_cli.distributed.wire import HEADER, CompressorStandIn, codec_for, frame, header, message_nbytes
from cocoef_cli.errors import ConfigError
from cocoef_cli.models import Objective, build_model
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.compressors import Compressor, build_compressor
from cocoef_cli.sim.methods import build_method, method_class
from cocoef_cli.sim.stragglers import build_straggler


class SliceRNG:
    """A one-replicate stream that draws exactly what the simulator's full-size draw would and keeps
    the rows ``rows`` of the first drawn dimension: ``rand(len(rows), *rest)`` draws
    ``base.rand(full, *rest)`` (shape (1, full, *rest)) and returns ``[:, rows]``. ``last`` is the
    last returned block."""

    R = 1

    def __init__(self, base: SeedRNG, full: int, rows: list[int]):
        self.base, self.full = base, int(full)
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.device = base.device
        self.last: torch.Tensor | None = None

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if shape[0] != len(self.rows):
            raise ValueError(f"SliceRNG: first dim {shape[0]} != {len(self.rows)} rows")
        self.last = self.base.rand(self.full, *shape[1:], dtype=dtype)[:, self.rows]
        return self.last


class Capture(CompressorStandIn):
    """The compressor, recording its last output (the message a device sends)."""

    def __init__(self, C: Any):
        super().__init__(C)
        self.last: torch.Tensor | None = None

    def output(self, v: torch.Tensor, rng: Any) -> torch.Tensor:
        m = self.last = self.C.compress(v, rng)
        return m


def shard_objective(cfg: dict, meta: dict, arrays: dict[str, torch.Tensor], dtype: torch.dtype) -> Objective:
    """The objective of the partitions a device holds, from :func:`cocoef_cli.distributed.server.shard`'s
    message: the model rebuilt from ``cfg['model']`` and the dataset's description (no samples),
    the partition tensors :data:`~cocoef_cli.distributed.transport.SHARD` as received."""
    d = meta["data"]
    f = int(d["features"])
    empty = Dataset(
        str(d["name"]),
        np.zeros((0, f)),
        np.zeros(0, np.int64),
        np.zeros((0, f)),
        np.zeros(0, np.int64),
        str(d["task"]),
        int(d["n_classes"]),
        tuple(int(k) for k in d["shape"]) if d["shape"] else None,
    )
    obj = Objective(
        build_model(cfg["model"], empty),
        empty,
        np.zeros((1, 0, 0), np.int64),
        float(meta["l2"]),
        dtype,
        torch.device("cpu"),
        batch_size=meta["batch_size"],
    )
    obj.n = int(meta["n"])
    for name in tp.SHARD:
        setattr(obj, name, arrays[name])
    return obj


class Device:
    """The state and computation of device ``setup['index']`` (see the module docstring); ``arrays``
    are the set-up message's tensors."""

    def __init__(self, setup: dict, arrays: dict[str, torch.Tensor]):
        cfg = setup["cfg"]
        self.i, self.M, self.N, self.D = setup["index"], setup["M"], setup["N"], setup["D"]
        self.dtype = getattr(torch, setup["dtype"])
        self.replay = bool(setup["replay"])
        seed = setup["seed"]
        self.C = build_compressor(setup["comp_cfg"], self.D)
        self.codec = codec_for(self.C, self.dtype)
        cls = method_class(cfg)
        self.crng = SliceRNG(SeedRNG([seed], "compressor"), self.M, [self.i])
        self.capture = Capture(self.C)
        # the capture and the sliced stream are duck-typed stand-ins for a Compressor and a SeedRNG
        comp, crng = cast(Compressor, self.capture), cast(SeedRNG, self.crng)
        self.method = build_method(cfg, comp, 1, 1, self.D, self.dtype, torch.device("cpu"), crng)
        self.states = cls.state_names
        self.draws_keys = cls.compresses and self.C.randomized  # one (M, D) draw per step
        self.obj = shard_objective(cfg, setup["shard"], arrays, self.dtype)
        self.own = [int(j) for j in setup["own"]]
        if self.obj.batch_size:
            self.obj.batch_rng = cast(SeedRNG, SliceRNG(SeedRNG([seed], "batch"), self.N, self.own))
        self.b = arrays["b_row"]  # (n_own,) B_ij of the partitions held, ascending j
        self.pending: dict[str, torch.Tensor] | None = None
        self.msg_bytes = message_nbytes(self.codec, bool(self.states))
        rt = setup["runtime"]
        self.slow = float(rt["slow_s"]) if self.i in rt["slow_devices"] else 0.0
        self.time_scale, self.straggle_s = float(rt["time_scale"]), float(rt["straggle_s"])
        self.straggler = (
            None if self.replay else build_straggler(cfg["straggler"], arrays["loads"], SeedRNG([seed], "straggler"))
        )

    # -- per iteration
    def encoded_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """u_i = Σ_j B_ij g_j(θ) over the partitions held, (1, 1, D)."""
        G = self.obj.partition_grads(theta)  # (1, n_own, D)
        u = torch.zeros(1, 1, self.D, dtype=G.dtype)
        for k in range(G.shape[1]):  # the few partitions of THIS device (≤ d), as Code.encode sums them
            u.add_(self.b[k] * G[:, k : k + 1])
        return u

    def step(self, theta: torch.Tensor, t: int) -> np.ndarray:
        """Compute, compress and frame this device's message for update t (state change tentative)."""
        u = self.encoded_gradient(theta)
        self.pending = {n: getattr(self.method, n).clone() for n in self.states}
        self.capture.last = None
        one = torch.ones(1, 1, dtype=torch.bool)
        self.method.step(u, one, one.to(self.dtype))
        m = self.capture.last if self.capture.last is not None else u  # gc: full precision u_i
        keys = self.crng.last.reshape(-1) if self.codec.needs_keys and self.crng.last is not None else None
        sq = float(getattr(self.method, self.states[0]).double().pow(2).sum()) if self.states else None
        return frame(self.codec, t, m.reshape(-1), keys, sq)

    def commit(self, accepted: bool) -> None:
        """Keep the tentative state of the last step, or undo it (freeze) / zero it (reset)."""
        if self.pending is None:
            return
        if not accepted:
            for n, old in self.pending.items():
                setattr(self.method, n, torch.zeros_like(old) if self.method.reset else old)
        self.pending = None

    def skip(self) -> None:
        """A replayed straggler: nothing computed or sent; the random streams advance as in a step."""
        if self.draws_keys:
            self.crng.rand(1, self.D, dtype=self.dtype)
        if self.obj.batch_size and self.obj.batch_rng is not None:
            self.obj.batch_rng.rand(*self.obj.valid.shape[1:], dtype=self.obj.Xp.dtype)
        if self.method.reset:
            for n in self.states:
                setattr(self.method, n, torch.zeros_like(getattr(self.method, n)))

    def delay(self) -> float:
        """Wall seconds to sleep this iteration (no replay): the straggler model's draw (+ slow_s)."""
        st = self.straggler
        assert st is not None, "a replaying device has no straggler model"
        z = st.draw()
        if st.timed and st.last_delays is not None:
            d = self.time_scale * float(st.last_delays[0, self.i])
        else:
            d = 0.0 if bool(z[0, self.i]) else self.straggle_s
        return d + self.slow

    def bye(self) -> np.ndarray:
        return np.concatenate(
            [header(tp.STOP_ITER).view(np.uint8), np.zeros(self.msg_bytes - HEADER.itemsize, dtype=np.uint8)]
        )


def serve(pg: Any, dev: Device) -> None:
    """The device loop: downlinks arrive on a receiver thread (so a sleep can be cut short)."""
    down_n = tp.downlink_nbytes(dev.M, dev.D, dev.codec.vs)
    np_dtype = dev.codec.np_dtype
    inbox: queue.Queue = queue.Queue()

    def receive() -> None:
        try:
            while True:
                buf = tp.recv_array(pg, down_n, 0)
                inbox.put(buf)
                if tp.unpack_downlink(buf, dev.M, np_dtype)[0] == tp.CMD_STOP:
                    return
        except BaseException as e:  # the server is gone: let the main loop exit
            inbox.put(e)

    threading.Thread(target=receive, name="downlink", daemon=True).start()
    nxt = None
    while True:
        item = nxt if nxt is not None else inbox.get()
        nxt = None
        if isinstance(item, BaseException):
            raise item
        cmd, t, accepted, z, theta = tp.unpack_downlink(item, dev.M, np_dtype)
        dev.commit(bool(accepted[dev.i]))
        if cmd == tp.CMD_STOP:
            break
        if dev.replay and not z[dev.i]:
            dev.skip()
            continue
        msg = dev.step(theta, t)
        if not dev.replay:
            wait = dev.delay()
            if wait > 0:
                with contextlib.suppress(queue.Empty):
                    nxt = inbox.get(timeout=wait)  # the next model arrived first: this message is late
        tp.send_array(pg, msg, 0)
    tp.send_array(pg, dev.bye(), 0)


def main() -> int:
    """Entry of a device process (rank ≥ 1): RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the
    environment; everything else comes from the server."""
    rank, world, addr, port = tp.env_rank()
    try:
        token = env_token()
        if token is None:
            raise ConfigError(TOKEN_ENV, None, TOKEN_HOW, "not set")
    except ConfigError as e:
        print(f"error: cocoef device {rank - 1}: {e}", file=sys.stderr, flush=True)
        return 2
    timeout = float(os.environ.get("COCOEF_TIMEOUT_S", "600"))
    torch.set_num_threads(int(os.environ.get("COCOEF_DEVICE_THREADS", "1")))
    store = tp.connect(addr, port, world, timeout, host_store=False)
    pg = tp.group(store, rank, world, timeout, addr)
    try:
        tp.send_message(pg, 0, tp.HELLO, token, {"rank": rank})
        setup, arrays = tp.recv_message(pg, 0, tp.SETUP, token, max_body=1 << 62)
        serve(pg, Device(setup, arrays))
    except Exception as e:
        print(f"cocoef device {rank - 1}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        time.sleep(0.05)  # let the last send leave before the sockets close
    return 0
