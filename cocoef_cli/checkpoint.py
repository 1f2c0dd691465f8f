"""Checkpoints of a long single run: save the whole run state every ``checkpoint_every`` updates,
resume from the last one with results identical, row for row, to an uninterrupted run.

What a checkpoint holds (``OUT/checkpoint.pt``, written atomically: temporary file, fsync, rename):

* the :class:`~cocoef_cli.sim.engine.Simulation` state: θ, the momentum buffer, the update
  counter ``t``, cumulative bits and simulated time, the last ``n_received``/``decode_residual``;
* the mutable state of every component: the method's per-device states (error memory, shifts),
  the straggler model's state (the Markov chain, the last draw's times), the compressor's and
  the code's tensors — every tensor or scalar attribute of these objects, so a new attribute
  added by a component is saved without touching this file;
* the state of every ``torch.Generator`` of the run (one per replicate and stream: stragglers,
  compressor, minibatches, ...), found by walking the same objects;
* the loop state: metrics rows recorded so far, which replicates diverged and when.

The dataset and the partition tensors are not saved: they are rebuilt from the config (the
checkpoint is tied to the run's ``run_id``, the hash of its results-relevant config).

Safe to read whoever wrote it: the file holds only tensors, numbers, strings, lists and dicts
(numpy arrays and scalars as raw bytes + dtype + shape, the metrics rows as such columns, see
:func:`plain`) and is read with ``torch.load(weights_only=True)``, which builds nothing else, so a
crafted file cannot run code. A file that does not load that way, or is not of this ``FORMAT``
(corrupt, truncated, foreign, or written by cocoef before format 3, whose pickles cannot be read
safely), is refused with a :class:`~cocoef_cli.errors.ConfigError` (exit 2): delete it, or pass
``--force`` to start afresh (it is then overwritten).
"""

from __future__ import annotations

import io
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cocoef_cli.errors import ConfigError
from cocoef_cli.record import Table, atomic_write
from cocoef_cli.rng import SeedRNG

FILENAME = "checkpoint.pt"
# 2: θ in torch.nn's layout (MLP weights (out, in), GLM weights (C, f̃)); 3: plain data only, read with
# weights_only=True (older files are refused: they can only be read by unpickling)
FORMAT = 3
_SCALARS = (int, float, bool, str, type(None))
_KINDS = "biufc"  # numpy dtype kinds stored as raw bytes: bool, (unsigned) integers, floats, complex


def plain(x: Any) -> Any:
    """``x`` with numpy arrays/scalars, metrics Tables and DataFrames replaced by tagged dicts of tensors, numbers,
    strings and lists (loadable with ``weights_only=True``); :func:`unplain` inverts it exactly
    (dtype, shape, bytes). Tensors, scalars, lists and dicts pass through (recursively)."""
    if isinstance(x, Table):
        return {"__table__": list(x.columns), "columns": [plain(a) for a in x.columns.values()]}
    pd = sys.modules.get("pandas")  # not imported: x is no DataFrame (pandas stays off the run's path)
    if pd is not None and isinstance(x, pd.DataFrame):
        return {
            "__frame__": [str(c) for c in x.columns],
            "index": plain(x.index.to_numpy()),
            "columns": [plain(x[c].to_numpy()) for c in x.columns],
        }
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        if a.dtype.kind == "O":
            return {"__objects__": [plain(v) for v in a.reshape(-1).tolist()], "shape": list(a.shape)}
        if a.dtype.kind not in _KINDS:
            raise TypeError(f"checkpoint: cannot store numpy dtype {a.dtype}")
        raw = torch.from_numpy(np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": a.dtype.str, "shape": list(a.shape), "data": raw, "scalar": isinstance(x, np.generic)}
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def unplain(x: Any) -> Any:
    """Inverse of :func:`plain` (raises ValueError/TypeError/KeyError on a malformed tag)."""
    if isinstance(x, dict):
        if "__ndarray__" in x:
            dt = np.dtype(str(x["__ndarray__"]))
            if dt.kind not in _KINDS:
                raise TypeError(f"dtype {dt} not allowed")
            shape = tuple(int(n) for n in x["shape"])
            a = np.frombuffer(x["data"].numpy().tobytes(), dtype=dt).reshape(shape).copy()
            return a[()] if x.get("scalar") else a
        if "__objects__" in x:
            vals = [unplain(v) for v in x["__objects__"]]
            a = np.empty(len(vals), dtype=object)
            a[:] = vals
            return a.reshape(tuple(int(n) for n in x["shape"]))
        if "__table__" in x:
            return Table(dict(zip(x["__table__"], [unplain(c) for c in x["columns"]], strict=True)))
        if "__frame__" in x:  # a checkpoint of an older release
            import pandas as pd

            cols = [unplain(c) for c in x["columns"]]
            return pd.DataFrame(dict(zip(x["__frame__"], cols, strict=True)), index=unplain(x["index"]))
        return {k: unplain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [unplain(v) for v in x]
    return x


def _roots(sim: Any) -> dict[str, Any]:
    """The objects whose state changes during a run (the objective only for its generators)."""
    exp = sim.exp
    method = exp.method
    return {
        "sim": sim,
        "method": method,
        "compressor": getattr(method, "C", None),
        "straggler": exp.straggler,
        "code": exp.code,
        "objective": exp.objective,
    }


def _attrs(obj: Any) -> dict[str, Any]:
    return dict(vars(obj)) if obj is not None and hasattr(obj, "__dict__") else {}


def capture(sim: Any) -> dict[str, Any]:
    """The run state of ``sim`` (and of its experiment's components) as plain tensors/scalars."""
    state: dict[str, dict[str, Any]] = {}
    gens: dict[str, list[torch.Tensor]] = {}
    for name, obj in _roots(sim).items():
        values: dict[str, Any] = {}
        for k, v in _attrs(obj).items():
            if isinstance(v, SeedRNG):
                gens[f"{name}.{k}"] = [g.get_state() for g in v.gens]
            elif name == "objective":
                continue  # data and partitions: rebuilt from the config
            elif isinstance(v, torch.Tensor):
                values[k] = v.detach().clone()
            elif isinstance(v, _SCALARS) and k != "exp":
                values[k] = v
        state[name] = values
    return {"state": state, "generators": gens}


def apply(sim: Any, saved: dict[str, Any]) -> None:
    """Restore :func:`capture`'s output into a freshly built ``sim`` (same config). Tensors are
    copied in place when shape, dtype and device agree (aliases stay aliases), else rebound."""
    roots = _roots(sim)
    for name, values in saved["state"].items():
        obj = roots.get(name)
        if obj is None:
            continue
        for k, v in values.items():
            cur = getattr(obj, k, None)
            if isinstance(v, torch.Tensor):
                if (
                    isinstance(cur, torch.Tensor)
                    and cur.shape == v.shape
                    and cur.dtype == v.dtype
                    and cur.device == v.device
                    and not cur.is_inference()
                ):
                    with torch.no_grad():
                        cur.copy_(v)
                else:
                    setattr(obj, k, v.clone())
            else:
                setattr(obj, k, v)
    for path, states in saved["generators"].items():
        name, _, attr = path.partition(".")
        rng = getattr(roots.get(name), attr, None)
        if not isinstance(rng, SeedRNG) or len(rng.gens) != len(states):
            raise ValueError(f"checkpoint: generator {path} does not match the run")
        for g, s in zip(rng.gens, states):
            g.set_state(s)


def _refuse(path: Path, why: str) -> ConfigError:
    return ConfigError(
        "--out",
        str(path.parent),
        f"a folder without {path.name}, a checkpoint of this run written "
        f"by this cocoef (format {FORMAT}), or --force (start afresh, overwriting it)",
        f"{path.name} is not a readable cocoef checkpoint ({why}); nothing in it was run",
    )


def read(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (decoded by :func:`unplain`), or None when absent. Raises
    :class:`ConfigError` when the file is not one of ours of this format (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on a foreign pickle protocol
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler met something else than plain data
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        raise _refuse(
            path, "it holds more than tensors, numbers, strings, lists and dicts" + (f": {why[:160]}" if why else "")
        ) from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise _refuse(path, f"corrupt or truncated: {type(e).__name__}: {first[:120]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise _refuse(path, f"format {fmt!r}")
    try:
        out = unplain(payload)
        if not (
            isinstance(out["run_id"], str)
            and isinstance(out["t"], int)
            and isinstance(out["sim"], dict)
            and isinstance(out["loop"], dict)
        ):
            raise TypeError("run_id, t, sim, loop")
    except (KeyError, TypeError, ValueError) as e:
        raise _refuse(path, f"malformed: {e}") from None
    return out


class Checkpoint:
    """The ``checkpoint`` argument of :func:`cocoef_cli.sim.engine.simulate` for one run folder.

    ``every``: save after every ``every``-th update (None: never save, only resume).
    ``resume``: restore from ``path`` when it holds a checkpoint of the same ``run_id``; a dict is
    that file already read (:func:`read`), False starts afresh."""

    def __init__(self, path: Path, every: int | None, run_id: str, resume: bool | dict[str, Any] = True):
        self.path, self.run_id, self.resume = Path(path), run_id, resume
        self.every = int(every) if every else 1 << 62
        self.resumed_from: int | None = None

    def save(self, sim: Any, loop: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(
            plain({"format": FORMAT, "run_id": self.run_id, "t": int(sim.t), "sim": capture(sim), "loop": loop}), buf
        )
        atomic_write(self.path, buf.getvalue())

    def restore(self, sim: Any) -> dict[str, Any] | None:
        if not self.resume:
            return None
        payload = read(self.path) if self.resume is True else self.resume
        if payload is None or payload.get("run_id") != self.run_id:
            return None
        try:
            apply(sim, payload["sim"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _refuse(self.path, f"does not match this run: {e}") from None
        self.resumed_from = int(payload["t"])
        return payload["loop"]

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
