"""Nothing a file or a peer sends runs code: crafted checkpoints, CIFAR-10 batches and wire messages
are refused with one clean line, and leave no marker file behind (issue 19)."""

import contextlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cocoef_cli import checkpoint, config
from cocoef_cli.cli import app
from cocoef_cli.data import read_cifar_batch
from cocoef_cli.distributed import transport as tp
from cocoef_cli.distributed.wire import HEADER, WireError, codec_for, frame, unframe
from cocoef_cli.errors import ConfigError
from cocoef_cli.record import run_id
from cocoef_cli.run import execute
from cocoef_cli.sim.compressors import build_compressor

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


class Marker:
    """Unpickling this creates the file ``path`` (what an attacker's payload would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_live(make, tmp_path) -> None:
    """``make(path)`` builds a payload whose plain ``pickle.loads``/``torch.load`` creates ``path``."""
    probe = tmp_path / "probe"
    blob = make(probe)
    with contextlib.suppress(Exception):  # the payload may fail after creating its marker
        torch.load(io.BytesIO(blob), weights_only=False) if blob[:2] == b"PK" else pickle.loads(blob)
    assert probe.exists(), "the crafted payload should create its marker when unpickled unsafely"
    probe.unlink()


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ------------------------------------------------------------------------------- checkpoints

RUN = ["iters=20", "eval_every=5", "checkpoint_every=5"]


def _evil_checkpoint(marker, rid):
    buf = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "run_id": rid, "t": 5, "sim": Marker(marker), "loop": {}}, buf)
    return buf.getvalue()


def test_crafted_checkpoint_is_refused_not_run(tmp_path):
    rid = run_id(config.load(RUN))
    assert_live(lambda p: _evil_checkpoint(p, rid), tmp_path)
    out, marker = tmp_path / "out", tmp_path / "marker"
    out.mkdir()
    (out / checkpoint.FILENAME).write_bytes(_evil_checkpoint(marker, rid))
    res = runner.invoke(app, ["run", *RUN, "--out", str(out), "-q"])
    assert res.exit_code == 2, res.output
    line = one_line(res.stderr)
    assert line.startswith("error: --out=") and "checkpoint.pt" in line and "nothing in it was run" in line
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == [checkpoint.FILENAME]  # nothing written
    with pytest.raises(ConfigError):  # the sweep path (execute resumes by itself): refused too
        execute(config.load(RUN), out)
    assert not marker.exists()
    # --force starts afresh (the file is never read) and replaces it
    res = runner.invoke(app, ["run", *RUN, "--out", str(out), "-q", "--force"])
    assert res.exit_code == 0, res.output
    assert not marker.exists() and not (out / checkpoint.FILENAME).exists()
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("kind", ["truncated", "garbage", "old_format", "other_format", "malformed"])
def test_corrupt_or_foreign_checkpoints_are_one_line_exit_2(tmp_path, monkeypatch, kind):
    out = tmp_path / "out"
    cfg = config.load(RUN)
    real = checkpoint.Checkpoint.save
    blobs = []

    def keep(self, sim, loop):
        real(self, sim, loop)
        blobs.append(self.path.read_bytes())

    monkeypatch.setattr(checkpoint.Checkpoint, "save", keep)
    execute(cfg, tmp_path / "good")
    good = blobs[0]
    assert checkpoint.unplain(torch.load(io.BytesIO(good), weights_only=True))["t"] == 5
    buf = io.BytesIO()
    blob = {"truncated": good[: len(good) // 2], "garbage": os.urandom(300)}.get(kind)
    if kind == "old_format":  # what cocoef wrote before format 3: a pickled DataFrame in the loop state
        torch.save(
            {"format": 2, "run_id": run_id(cfg), "t": 5, "sim": {}, "loop": {"rows": [pd.DataFrame({"a": [1]})]}}, buf
        )
    elif kind == "other_format":
        torch.save({"format": 99, "run_id": run_id(cfg), "t": 5, "sim": {}, "loop": {}}, buf)
    elif kind == "malformed":
        torch.save({"format": checkpoint.FORMAT, "run_id": run_id(cfg), "t": "five", "sim": {}, "loop": {}}, buf)
    blob = blob if blob is not None else buf.getvalue()
    out.mkdir()
    (out / checkpoint.FILENAME).write_bytes(blob)
    res = runner.invoke(app, ["run", *RUN, "--out", str(out), "-q"])
    assert res.exit_code == 2, res.output
    assert "checkpoint.pt is not a readable cocoef checkpoint" in one_line(res.stderr)
    assert (out / checkpoint.FILENAME).read_bytes() == blob  # left as it was


def test_checkpoint_file_is_plain_data_and_round_trips_exactly(tmp_path):
    loop = {
        "rows": [
            pd.DataFrame(
                {
                    "seed": np.array([0, 1]),
                    "x": np.array([1.5, np.nan], np.float32),
                    "o": np.array([None, 2.0], dtype=object),
                    "s": ["a", "b"],
                }
            )
        ],
        "diverged": {3: 7},
        "alive": np.array([True, False]),
        "scalar": np.float32(0.1),
    }
    path = tmp_path / "c.pt"
    torch.save(checkpoint.plain(loop), path)
    back = checkpoint.unplain(torch.load(path, weights_only=True))
    a, b = loop["rows"][0], back["rows"][0]
    assert list(a.dtypes) == list(b.dtypes) and a.equals(b)
    assert back["diverged"] == {3: 7} and back["alive"].tolist() == [True, False]
    assert type(back["scalar"]) is np.float32 and back["scalar"] == loop["scalar"]


# ------------------------------------------------------------------------------------ CIFAR-10


def _batches(folder, first: bytes | None = None, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"batch_label": name.encode(),
            b"labels": [1, 2],
            b"data": g.integers(0, 256, (2, 3072), dtype=np.uint8),
            b"filenames": [b"a.png", b""],
        }
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
    if first is not None:
        (folder / "data_batch_1").write_bytes(first)


def test_crafted_cifar_batch_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "marker"

    def craft(path):
        return pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": Marker(path)})

    assert_live(craft, tmp_path)
    _batches(tmp_path / "c", craft(marker))
    res = runner.invoke(
        app,
        [
            "run",
            "dataset=cifar10",
            f"dataset.root={tmp_path / 'c'}",
            "model=softmax",
            "devices=4",
            "iters=2",
            "--out",
            str(tmp_path / "o"),
            "-q",
        ],
    )
    assert res.exit_code == 2, res.output
    line = one_line(res.stderr)
    assert line.startswith("error: dataset.root=") and "data_batch_1" in line and "refused global io.open" in line
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_official_batch_layouts_still_load(tmp_path, protocol):
    """Every pickle protocol, and the numpy-1 names of the official (Python 2, protocol 2) files."""
    d = {b"batch_label": b"x", b"labels": [3, 4], b"data": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    blob = pickle.dumps(d, protocol=protocol)
    old = blob.replace(b"numpy._core.", b"numpy.core.")  # GLOBAL opcodes (protocols 2, 3) are newline-terminated
    for variant in [blob] + ([old] if protocol < 4 and old != blob else []):
        (tmp_path / "b").write_bytes(variant)
        X, y = read_cifar_batch(tmp_path / "b")
        assert X.tolist() == [[0, 1, 2], [3, 4, 5]] and y.tolist() == [3, 4]


@pytest.mark.parametrize(
    "blob",
    [
        pickle.dumps([1, 2]),
        pickle.dumps({b"data": "s", b"labels": [1]}),
        b"\x80\x02}q",
        pickle.dumps({b"data": np.zeros(2), b"labels": [1]}),
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",
    ],
    ids=["list", "no-array", "truncated", "float-data", "codec"],
)
def test_malformed_cifar_batches_are_config_errors(tmp_path, blob):
    (tmp_path / "b").write_bytes(blob)
    with pytest.raises(ConfigError) as e:
        read_cifar_batch(tmp_path / "b")
    assert e.value.key == "dataset.root" and str(tmp_path / "b") in str(e.value)


# --------------------------------------------------------------------------------- wire units


def test_envelope_body_round_trips_every_dtype():
    arrays = {
        "b": torch.tensor([True, False]),
        "u": torch.arange(6, dtype=torch.uint8).view(2, 3),
        "i": torch.tensor([-1, 2], dtype=torch.int32),
        "l": torch.arange(24).view(2, 3, 4),
        "f": torch.randn(3, dtype=torch.float32),
        "d": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 5),
    }
    meta = {"cfg": {"a": [1, 2.5, None, True, "s"], "inf": float("inf")}}
    m, back = tp.decode_body(tp.encode_body(meta, arrays))
    assert m == meta and list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def _mutations(body: bytes):
    n = int.from_bytes(body[:8], "little")
    at = 8 + n  # the first array header
    yield "empty", b""
    yield "truncated", body[:-1]
    yield "trailing", body + b"\0"
    yield "json length", (10**9).to_bytes(8, "little") + body[8:]
    yield "not json", body[:8] + b"\xff" * n + body[at:]
    yield "array magic", body[:at] + b"XXXX" + body[at + 4 :]
    yield "dtype code", body[: at + 5] + b"\x63" + body[at + 6 :]
    yield "ndim", body[: at + 6] + b"\x09" + body[at + 7 :]
    yield "shape", body[: at + 8] + (10**12).to_bytes(8, "little") + body[at + 16 :]


@pytest.mark.parametrize("what", [w for w, _ in _mutations(tp.encode_body({"k": 1}, {"a": torch.ones(2, 2)}))])
def test_malformed_bodies_are_wire_errors(what):
    body = dict(_mutations(tp.encode_body({"k": 1}, {"a": torch.ones(2, 2)})))[what]
    with pytest.raises(WireError):
        tp.decode_body(body)


def test_malformed_uplink_and_downlink_messages_are_wire_errors():
    C = build_compressor({"name": "topk", "k": 2, "index_bits": "32"}, 8)
    codec = codec_for(C, torch.float32)
    good = frame(codec, 3, torch.tensor([0, 5.0, 0, 0, -1.0, 0, 0, 0]))
    assert unframe(codec, good)[0] == 3
    bad_tag = good.copy()
    bad_tag[6:8] = 0
    bad_flags = good.copy()
    bad_flags[4] = 6
    out_of_range = good.copy()
    out_of_range[HEADER.itemsize + 8 : HEADER.itemsize + 12] = np.frombuffer(np.uint32(99).tobytes(), np.uint8)
    for buf in (bad_tag, bad_flags, out_of_range, good[:-1], np.zeros_like(good)):
        with pytest.raises(WireError):
            unframe(codec, buf)
    bitmap = codec_for(build_compressor({"name": "topk", "k": 2, "index_bits": "bitmap"}, 8), torch.float32)
    msg = frame(bitmap, 1, torch.tensor([0, 5.0, 0, 0, -1.0, 0, 0, 0]))
    msg[-1] = 0xFF  # 8 positions where k = 2
    with pytest.raises(WireError):
        unframe(bitmap, msg)
    down = tp.pack_downlink(tp.CMD_STEP, 4, np.ones(2, bool), np.ones(2, bool), torch.zeros(1, 3))
    assert tp.unpack_downlink(down, 2, np.dtype("<f4"))[:2] == (tp.CMD_STEP, 4)
    for buf in (np.zeros_like(down), np.concatenate([down[:4], np.full(4, 7, np.uint8), down[8:]])):
        with pytest.raises(WireError):
            tp.unpack_downlink(buf, 2, np.dtype("<f4"))


# --------------------------------------------------------------------------- rogue processes

ROGUE = textwrap.dedent("""
    # a process that joins the rendezvous as rank RANK and sends bytes of its choosing
    import os, sys, time, pickle
    sys.path.insert(0, {repo!r})
    import numpy as np
    from cocoef_cli.distributed import transport as tp
    rank, world, port, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    marker = {marker!r}
    payload = pickle.dumps(type("M", (), {{"__reduce__": lambda s: (open, (marker, "w"))}})(), protocol=0)
    store = tp.connect("127.0.0.1", port, world, 20, host_store=(rank == 0))
    pg = tp.group(store, rank, world, 20, "127.0.0.1")
    dst = 1 if rank == 0 else 0
    if rank == 0:  # the device's hello
        n = tp.ENVELOPE.unpack(tp.recv_array(pg, tp.ENVELOPE_ROOM, 1)[: tp.ENVELOPE.size].tobytes())[3]
        tp.recv_array(pg, n, 1)
    if mode == "raw":  # a bare pickle, longer than an envelope
        tp.send_array(pg, np.frombuffer(payload + b" " * 2000, np.uint8), dst)
    elif mode == "pickle":  # the old wire format: an 8-byte length, then the pickle
        tp.send_array(pg, np.array([len(payload)], "<i8").view(np.uint8), dst)
        tp.send_array(pg, np.frombuffer(payload, np.uint8), dst)
    elif mode == "envelope":  # a well-formed envelope without the token's proof, a pickle as body
        head = tp.ENVELOPE.pack(tp.MAGIC, tp.VERSION, tp.SETUP if rank == 0 else tp.HELLO, len(payload),
                                b"x" * 32, b"x" * 32)
        tp.send_array(pg, np.frombuffer(head, np.uint8), dst)
        tp.send_array(pg, np.frombuffer(payload, np.uint8), dst)
    time.sleep(3)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(token=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COCOEF_TOKEN")}
    env.update(PYTHONPATH=str(REPO), COCOEF_TIMEOUT_S="20", **extra)
    if token is not None:
        env["COCOEF_TOKEN"] = token
    return env


def _device(rank, port, world, token=None, **extra):
    env = _env(token, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
    return subprocess.Popen(
        [sys.executable, "-m", "cocoef_cli.runtime"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _rogue(tmp_path, rank, port, world, mode):
    script = tmp_path / "rogue.py"
    script.write_text(ROGUE.format(repo=str(REPO), marker=str(tmp_path / "marker")))
    return subprocess.Popen(
        [sys.executable, str(script), str(rank), str(world), str(port), mode],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(*procs, grace=60.0):
    """(stdout, stderr) of each process, killed after ``grace`` seconds (a refused peer may wait for
    its own timeout: the test does not)."""
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=grace))
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate())
    return outs


SERVER = [
    "dataset.n=120",
    "dataset.dim=3",
    "devices=2",
    "iters=4",
    "eval_every=2",
    "code=sgc",
    "code.d=2",
    "straggler=none",
    "runtime=torch_distributed",
    "runtime.spawn=false",
    "runtime.replay=true",
    "runtime.timeout_s=20",
]


def _server(port, tmp_path, monkeypatch, token="the-run-token"):
    monkeypatch.setenv("COCOEF_TOKEN", token)
    return runner.invoke(app, ["run", *SERVER, f"runtime.master_port={port}", "--out", str(tmp_path / "o"), "-q"])


def test_external_devices_with_the_token_run_and_match_the_simulator(tmp_path, monkeypatch):
    port = free_port()
    (tmp_path / "tok").write_text("the-run-token\n")
    devs = [_device(1, port, 3, "the-run-token"), _device(2, port, 3, COCOEF_TOKEN_FILE=str(tmp_path / "tok"))]
    res = _server(port, tmp_path, monkeypatch)
    outs = _finish(*devs)
    assert res.exit_code == 0, (res.output, outs)
    assert [d.returncode for d in devs] == [0, 0], outs
    _, sim = execute(config.load([s for s in SERVER if not s.startswith("runtime")]), None)
    dist = pd.read_csv(tmp_path / "o" / "metrics.csv")
    np.testing.assert_allclose(dist.train_loss, sim.metrics.train_loss, rtol=1e-5)


def test_a_device_with_a_wrong_token_is_refused(tmp_path, monkeypatch):
    port = free_port()
    devs = [_device(1, port, 3, "the-run-token"), _device(2, port, 3, "a-guess")]
    res = _server(port, tmp_path, monkeypatch)
    _finish(*devs, grace=2.0)
    assert res.exit_code == 1
    line = one_line(res.stderr)
    assert line.startswith("run failed: WireError: rank 2 does not hold this run's token"), line
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "failed"
    assert not (tmp_path / "o" / "metrics.csv").exists()


def test_spawn_false_without_a_token_is_exit_2(tmp_path, monkeypatch):
    monkeypatch.delenv("COCOEF_TOKEN", raising=False)
    monkeypatch.delenv("COCOEF_TOKEN_FILE", raising=False)
    res = runner.invoke(app, ["run", *SERVER, "runtime.master_port=29999", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and one_line(res.stderr).startswith("error: COCOEF_TOKEN=None")
    assert not (tmp_path / "o").exists()
    proc = _device(1, 29999, 3)  # a device without a token does not even connect
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and one_line(err).startswith("error: cocoef device 0: COCOEF_TOKEN=None")


@pytest.mark.parametrize("mode", ["raw", "pickle", "envelope"])
def test_a_rogue_device_sending_a_crafted_payload_is_refused(tmp_path, monkeypatch, mode):
    port = free_port()
    dev = _device(1, port, 3, "the-run-token")
    rogue = _rogue(tmp_path, 2, port, 3, mode)
    res = _server(port, tmp_path, monkeypatch)
    outs = _finish(dev, rogue, grace=2.0)
    assert res.exit_code == 1, (res.output, outs)
    line = one_line(res.stderr)
    expected = "does not hold this run's token" if mode == "envelope" else "not a cocoef message"
    assert line.startswith("run failed: WireError: rank 2") and expected in line, line
    assert not (tmp_path / "marker").exists()
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("mode", ["pickle", "envelope"])
def test_a_rogue_server_sending_a_crafted_payload_is_refused_by_the_device(tmp_path, mode):
    port = free_port()
    rogue = _rogue(tmp_path, 0, port, 2, mode)
    dev = _device(1, port, 2, "the-run-token")
    ((_, err),) = _finish(dev)
    _finish(rogue, grace=2.0)
    assert dev.returncode == 1
    line = one_line(err)
    expected = "not a cocoef message" if mode == "pickle" else "does not hold this run's token"
    assert line.startswith("cocoef device 0: WireError: rank 0") and expected in line, line
    assert not (tmp_path / "marker").exists()
