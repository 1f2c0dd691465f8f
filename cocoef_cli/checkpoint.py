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
Checkpoint files are Python pickles (``torch.load(weights_only=False)``): load only your own.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from cocoef_cli.record import atomic_write
from cocoef_cli.sim.rng import SeedRNG

FILENAME = "checkpoint.pt"
FORMAT = 2  # 2: θ in torch.nn's layout (MLP weights (out, in), GLM weights (C, f̃)); older files are ignored
_SCALARS = (int, float, bool, str, type(None))


def _roots(sim: Any) -> dict[str, Any]:
    """The objects whose state changes during a run (the objective only for its generators)."""
    exp = sim.exp
    method = exp.method
    return {"sim": sim, "method": method, "compressor": getattr(method, "C", None), "straggler": exp.straggler,
            "code": exp.code, "objective": exp.objective}


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
                if isinstance(cur, torch.Tensor) and cur.shape == v.shape and cur.dtype == v.dtype \
                        and cur.device == v.device and not cur.is_inference():
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


def read(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when absent or unreadable (a torn file cannot exist
    under the final name, but an incompatible one may)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 — unreadable: treated as absent
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == FORMAT else None


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
        torch.save({"format": FORMAT, "run_id": self.run_id, "t": int(sim.t), "sim": capture(sim), "loop": loop}, buf)
        atomic_write(self.path, buf.getvalue())

    def restore(self, sim: Any) -> dict[str, Any] | None:
        if not self.resume:
            return None
        payload = read(self.path) if self.resume is True else self.resume
        if payload is None or payload.get("run_id") != self.run_id:
            return None
        apply(sim, payload["sim"])
        self.resumed_from = int(payload["t"])
        return payload["loop"]

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
