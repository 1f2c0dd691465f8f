"""Connections and message layouts shared by the server and the device processes.

Ranks: 0 is the server, rank i + 1 is device i. The rendezvous is a ``torch.distributed.TCPStore``
on ``MASTER_ADDR:MASTER_PORT`` (hosted by the server, or by torchrun's agent when
``TORCHELASTIC_USE_AGENT_STORE`` is set), and messages go point to point over a
``ProcessGroupGloo`` built on it (no global default group: the server can live inside any process).

Downlink (server → every device, once per iteration), uint8:
``[cmd int32, t int32][accepted of update t−1: M bytes][z^t: M bytes][θ^t: D values]`` —
``accepted`` lets a device commit or roll back its tentative state, ``z`` is the replayed pattern
(all ones without replay). Uplink: a framed message (:mod:`cocoef_cli.runtime.wire`).
"""
from __future__ import annotations

import datetime
import os
import pickle
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

CMD_STOP, CMD_STEP = 0, 1
DOWN_HEADER = np.dtype([("cmd", "<i4"), ("t", "<i4")])
STOP_ITER = -1  # the header iteration of a device's last ("bye") message


def connect(addr: str, port: int, world: int, timeout_s: float, host_store: bool):
    """The rendezvous TCPStore; ``host_store``: this process hosts it (port 0 = any free port, the
    chosen one is ``store.port``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(addr, port, world, host_store, timeout=timeout, wait_for_workers=False)


def is_loopback(addr: str) -> bool:
    return addr == "localhost" or addr.startswith("127.") or addr == "::1"


def group(store: Any, rank: int, world: int, timeout_s: float, addr: str):
    """The gloo process group over ``store`` (under a cocoef prefix). With a loopback ``addr`` gloo
    binds 127.0.0.1 (nothing leaves the machine); otherwise gloo's default device (the host name's
    address, or ``GLOO_SOCKET_IFNAME``)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if is_loopback(addr)
                     else dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(dist.PrefixStore("cocoef", store), rank, world, opts)


def send_array(pg: Any, arr: np.ndarray, dst: int) -> None:
    pg.send([torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))], dst, 0).wait()


def send_object(pg: Any, obj: Any, dst: int) -> int:
    """Pickle ``obj`` and send it length-prefixed; returns the bytes sent."""
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    send_array(pg, np.array([data.size], dtype="<i8").view(np.uint8), dst)
    send_array(pg, data, dst)
    return data.size + 8


def recv_array(pg: Any, nbytes: int, src: int) -> np.ndarray:
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    pg.recv([buf], src, 0).wait()
    return buf.numpy()


def recv_object(pg: Any, src: int) -> Any:
    n = int(recv_array(pg, 8, src).view("<i8")[0])
    return pickle.loads(recv_array(pg, n, src).tobytes())


def downlink_nbytes(M: int, D: int, value_bytes: int) -> int:
    return DOWN_HEADER.itemsize + 2 * M + D * value_bytes


def pack_downlink(cmd: int, t: int, accepted: np.ndarray, z: np.ndarray, theta: torch.Tensor) -> np.ndarray:
    head = np.zeros(1, dtype=DOWN_HEADER)
    head["cmd"], head["t"] = cmd, t
    th = np.ascontiguousarray(theta.detach().cpu().numpy().reshape(-1))
    return np.concatenate([head.view(np.uint8), accepted.astype(np.uint8), z.astype(np.uint8),
                           th.view(np.uint8)])


def unpack_downlink(buf: np.ndarray, M: int, np_dtype: np.dtype) -> tuple[int, int, np.ndarray, np.ndarray, torch.Tensor]:
    """(cmd, t, accepted (M,) bool, z (M,) bool, θ (1, D))."""
    head = np.frombuffer(buf[: DOWN_HEADER.itemsize].tobytes(), dtype=DOWN_HEADER)[0]
    o = DOWN_HEADER.itemsize
    acc, z = buf[o: o + M].astype(bool), buf[o + M: o + 2 * M].astype(bool)
    theta = torch.from_numpy(np.frombuffer(buf[o + 2 * M:].tobytes(), dtype=np_dtype).copy()).unsqueeze(0)
    return int(head["cmd"]), int(head["t"]), acc, z, theta


def env_rank() -> tuple[int, int, str, int]:
    """(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from the environment (torchrun's protocol)."""
    try:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ.get("MASTER_ADDR", "127.0.0.1"),
                int(os.environ["MASTER_PORT"]))
    except KeyError as e:
        raise SystemExit(f"error: environment variable {e.args[0]} is not set (RANK, WORLD_SIZE, MASTER_PORT; "
                         "torchrun sets them)") from None


def agent_store() -> bool:
    """True under torchrun: its agent already hosts the TCPStore on MASTER_PORT."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
