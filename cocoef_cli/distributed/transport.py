"""Connections and message layouts shared by the server and the device processes.

Ranks: 0 is the server, rank i + 1 is device i. The rendezvous is a ``torch.distributed.TCPStore``
on ``MASTER_ADDR:MASTER_PORT`` (hosted by the server, or by torchrun's agent when
``TORCHELASTIC_USE_AGENT_STORE`` is set), and messages go point to point over a
``ProcessGroupGloo`` built on it (no global default group: the server can live inside any process).

No pickle on the wire: nothing a peer sends is executed. Set-up: every device first sends a
*hello*, the server checks it and answers with the device's *set-up* (config, partitions); both are
envelope messages (:func:`send_message`): a fixed 80-byte header ``[magic "CCEF", version uint16,
kind uint16, body bytes uint64, proof 32 B, mac 32 B]`` with proof = HMAC-SHA256(token, kind), checked
(constant time) before the body is read — a peer without the run's token is refused — and mac =
HMAC-SHA256(token, body); the body is ``[JSON bytes uint64][JSON {"meta": ..., "arrays": [names]}]``
then per array a fixed 72-byte header ``[magic "CARR", version uint8, dtype code uint8, ndim uint8,
pad, shape 8 × uint64]`` and its raw little-endian values (:data:`DTYPES`). Anything else (size, magic,
version, kind, token, mac, JSON, array header) raises :class:`~cocoef_cli.distributed.wire.WireError`.

Downlink (server → every device, once per iteration), uint8:
``[magic uint32, cmd int32, t int32][accepted of update t−1: M bytes][z^t: M bytes][θ^t: D values]`` —
``accepted`` lets a device commit or roll back its tentative state, ``z`` is the replayed pattern
(all ones without replay). Uplink: a framed message (:mod:`cocoef_cli.distributed.wire`).
"""

from __future__ import annotations

import datetime
import hmac
import json
import math
import os
import struct
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cocoef_cli.distributed.wire import WireError

CMD_STOP, CMD_STEP = 0, 1
DOWN_MAGIC = 0xC0EFD0A1
DOWN_HEADER = np.dtype([("magic", "<u4"), ("cmd", "<i4"), ("t", "<i4")])
STOP_ITER = -1  # the header iteration of a device's last ("bye") message

MAGIC, ARRAY_MAGIC, VERSION = b"CCEF", b"CARR", 1
ENVELOPE = struct.Struct("<4sHHQ32s32s")  # magic, version, kind, body bytes, proof, mac
ARRAY = struct.Struct("<4sBBBx8Q")  # magic, version, dtype code, ndim, pad, shape
HELLO, SETUP = 1, 2
SHARD = ("Xp", "Yp", "Wp", "valid", "sizes")  # the objective's (R, N, ...) tensors a device gets sliced
KINDS = {HELLO: "hello", SETUP: "set-up"}
HELLO_MAX = 4096  # body bytes a hello may announce
ENVELOPE_ROOM = 1 << 16  # the envelope is received into this many bytes: a longer first message aborts (gloo)
DTYPES = {
    1: np.dtype("?"),
    2: np.dtype("u1"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("<f4"),
    6: np.dtype("<f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in DTYPES.items()} | {dt: code for code, dt in DTYPES.items()}


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
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in torch's stubs
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [
        dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
        if is_loopback(addr)
        else dist.ProcessGroupGloo.create_default_device()
    ]
    return dist.ProcessGroupGloo(dist.PrefixStore("cocoef", store), rank, world, opts)


def send_array(pg: Any, arr: np.ndarray, dst: int) -> None:
    pg.send([torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))], dst, 0).wait()


def recv_array(pg: Any, nbytes: int, src: int) -> np.ndarray:
    """The next message from ``src`` into ``nbytes`` bytes (gloo fills a shorter one with zeros and
    aborts the process on a longer one: every receiver knows the size it expects)."""
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    pg.recv([buf], src, 0).wait()
    return buf.numpy()


# ------------------------------------------------------------------ envelope messages (set-up)


def _digest(token: str, data: bytes) -> bytes:
    return hmac.new(token.encode(), data, "sha256").digest()


def encode_body(meta: dict, arrays: dict[str, Any]) -> bytes:
    """``meta`` as JSON and ``arrays`` (tensors or numpy arrays of :data:`DTYPES`) as typed buffers."""
    doc = json.dumps({"meta": meta, "arrays": list(arrays)}, allow_nan=True).encode()
    parts = [struct.pack("<Q", len(doc)), doc]
    for name, a in arrays.items():
        a = np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, order="C")  # 0-d stays 0-d
        code = _CODES.get(a.dtype)
        if code is None or a.ndim > 8:
            raise WireError(f"array {name}: dtype {a.dtype} / {a.ndim} dims cannot be sent")
        parts.append(ARRAY.pack(ARRAY_MAGIC, VERSION, code, a.ndim, *a.shape, *[0] * (8 - a.ndim)))
        parts.append(a.astype(DTYPES[code], copy=False).tobytes())
    return b"".join(parts)


def decode_body(body: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """Inverse of :func:`encode_body`; WireError for anything that is not such a body."""
    if len(body) < 8:
        raise WireError(f"a body of {len(body)} bytes")
    n = struct.unpack_from("<Q", body)[0]
    if n > len(body) - 8:
        raise WireError("a JSON length beyond the body")
    try:
        doc = json.loads(body[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"not JSON: {e}") from None
    names = doc.get("arrays") if isinstance(doc, dict) else None
    if (
        not isinstance(doc.get("meta") if isinstance(doc, dict) else None, dict)
        or not isinstance(names, list)
        or not all(isinstance(k, str) for k in names)
        or len(set(names)) != len(names)
    ):
        raise WireError("JSON is not {meta: {...}, arrays: [distinct names]}")
    off, arrays = 8 + n, {}
    for name in names:
        if len(body) - off < ARRAY.size:
            raise WireError(f"array {name}: header beyond the body")
        magic, version, code, ndim, *shape = ARRAY.unpack_from(body, off)
        off += ARRAY.size
        if magic != ARRAY_MAGIC or version != VERSION or code not in DTYPES or ndim > 8 or any(shape[ndim:]):
            raise WireError(f"array {name}: not a valid array header")
        count = math.prod(shape[:ndim])
        size = count * DTYPES[code].itemsize
        if size > len(body) - off:
            raise WireError(f"array {name}: {size} bytes beyond the body")
        a = np.frombuffer(body, dtype=DTYPES[code], count=count, offset=off).reshape(tuple(shape[:ndim]))
        arrays[name] = torch.from_numpy(a.astype(DTYPES[code].newbyteorder("=")))  # a copy, native order
        off += size
    if off != len(body):
        raise WireError(f"{len(body) - off} bytes after the last array")
    return doc["meta"], arrays


def send_message(pg: Any, dst: int, kind: int, token: str, meta: dict, arrays: dict[str, Any] | None = None) -> int:
    """Envelope + body (two gloo messages) to ``dst``; returns the bytes sent."""
    body = encode_body(meta, arrays or {})
    head = ENVELOPE.pack(MAGIC, VERSION, kind, len(body), _digest(token, b"kind %d" % kind), _digest(token, body))
    send_array(pg, np.frombuffer(head, dtype=np.uint8), dst)
    send_array(pg, np.frombuffer(body, dtype=np.uint8), dst)
    return len(head) + len(body)


def recv_message(pg: Any, src: int, kind: int, token: str, max_body: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The envelope message of ``kind`` from ``src``: (meta, arrays). The proof of the token is
    checked before the body is received; WireError names what is wrong."""
    head = recv_array(pg, ENVELOPE_ROOM, src)[: ENVELOPE.size].tobytes()  # room for a foreign first message
    magic, version, got, n, proof, mac = ENVELOPE.unpack(head)
    who = f"rank {src}"
    if magic != MAGIC:
        raise WireError(f"{who} sent something that is not a cocoef message (refused)")
    if version != VERSION or got != kind:
        raise WireError(
            f"{who} sent a version {version} {KINDS.get(got, got)} message, expected version {VERSION} "
            f"{KINDS[kind]} (refused)"
        )
    if not hmac.compare_digest(proof, _digest(token, b"kind %d" % kind)):
        raise WireError(f"{who} does not hold this run's token (refused; see COCOEF_TOKEN in docs/runtime.md)")
    if n > max_body:
        raise WireError(f"{who} announced a {KINDS[kind]} of {n} bytes, at most {max_body} (refused)")
    body = recv_array(pg, n, src).tobytes() if n else b""
    if not hmac.compare_digest(mac, _digest(token, body)):
        raise WireError(f"{who}: {KINDS[kind]} body corrupt or truncated (refused)")
    return decode_body(body)


def downlink_nbytes(M: int, D: int, value_bytes: int) -> int:
    return DOWN_HEADER.itemsize + 2 * M + D * value_bytes


def pack_downlink(cmd: int, t: int, accepted: np.ndarray, z: np.ndarray, theta: torch.Tensor) -> np.ndarray:
    head = np.zeros(1, dtype=DOWN_HEADER)
    head["magic"], head["cmd"], head["t"] = DOWN_MAGIC, cmd, t
    th = np.ascontiguousarray(theta.detach().cpu().numpy().reshape(-1))
    return np.concatenate([head.view(np.uint8), accepted.astype(np.uint8), z.astype(np.uint8), th.view(np.uint8)])


def unpack_downlink(
    buf: np.ndarray, M: int, np_dtype: np.dtype
) -> tuple[int, int, np.ndarray, np.ndarray, torch.Tensor]:
    """(cmd, t, accepted (M,) bool, z (M,) bool, θ (1, D)); WireError for a wrong header or size."""
    head = np.frombuffer(buf[: DOWN_HEADER.itemsize].tobytes(), dtype=DOWN_HEADER)[0]
    if (
        int(head["magic"]) != DOWN_MAGIC
        or int(head["cmd"]) not in (CMD_STOP, CMD_STEP)
        or int(head["t"]) < 0
        or (buf.size - DOWN_HEADER.itemsize - 2 * M) % np_dtype.itemsize
    ):
        raise WireError("a downlink message without a valid header (magic, command, iteration) or size")
    o = DOWN_HEADER.itemsize
    acc, z = buf[o : o + M].astype(bool), buf[o + M : o + 2 * M].astype(bool)
    theta = torch.from_numpy(np.frombuffer(buf[o + 2 * M :].tobytes(), dtype=np_dtype).copy()).unsqueeze(0)
    return int(head["cmd"]), int(head["t"]), acc, z, theta


def env_rank() -> tuple[int, int, str, int]:
    """(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from the environment (torchrun's protocol)."""
    try:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ["MASTER_PORT"]),
        )
    except KeyError as e:
        raise SystemExit(
            f"error: environment variable {e.args[0]} is not set (RANK, WORLD_SIZE, MASTER_PORT; torchrun sets them)"
        ) from None


def agent_store() -> bool:
    """True under torchrun: its agent already hosts the TCPStore on MASTER_PORT."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
