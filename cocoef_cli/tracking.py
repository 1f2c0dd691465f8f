"""Experiment tracking (the ``logger`` group): TensorBoard event files or an MLflow run, beside
the CSV/JSON record, which stays the source of truth and is written exactly as without a logger.

A logger sees a run through three calls from :func:`cocoef_cli.run.execute`: ``log(frame)`` with
the rows of each evaluation as the simulator records them (seed, iter and the metric columns of
``metrics.csv``), then ``close(status, metrics, out)`` with the final rows, which it uses to log
whatever it has not seen (rows restored from a checkpoint, or a runtime that does not stream).
Scalars are named ``seed{s}/{column}`` (e.g. ``seed0/train_loss``) at step = ``iter``.

Both loggers work offline and come with the optional extra ``pip install -e '.[tracking]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cocoef_cli.checks import is_num
from cocoef_cli.errors import ConfigError
from cocoef_cli.record import LABEL_COLUMNS, Table
from cocoef_cli.registry import Registry

LOGGERS: Registry[type[Logger]] = Registry("logger")
EXTRA = "pip install -e '.[tracking]'"


def flatten(cfg: dict) -> dict[str, Any]:
    """{"optim.lr": 0.2, ...}: a nested config as dotted keys (the report's flattening), with
    lists and None as text (what TensorBoard's hparams and MLflow's params take)."""
    from cocoef_cli.record import flatten as flat

    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat(cfg).items()}


def scalars(frame: Any) -> Iterator[tuple[str, int, float]]:
    """(tag ``seed{s}/{column}``, iter, value) of every finite metric in a frame of metrics rows."""
    cols = [c for c in frame.columns if c not in LABEL_COLUMNS]
    for row in frame.itertuples(index=False):
        r = row._asdict()
        for c in cols:
            v = r[c]
            if is_num(v) and math.isfinite(float(v)):
                yield f"seed{int(r['seed'])}/{c}", int(r["iter"]), float(v)


class Logger:
    """No tracking: the CSV/JSON record only."""

    requires: tuple[str, ...] = ()  # importable modules the logger needs (the tracking extra)

    def __init__(self, cfg: dict, out: Path, run_id: str):
        self.cfg, self.out, self.run_id = cfg, Path(out), run_id
        self.seen: set[tuple[int, int]] = set()  # (seed, iter) already logged

    @classmethod
    def check(cls, lcfg: dict) -> None:
        """Refuse before any work: a missing package (exit 2 naming the pip command), bad keys."""
        for mod in cls.requires:
            if importlib.util.find_spec(mod) is None:
                raise ConfigError(
                    "logger", lcfg.get("name"), f"{EXTRA} (or pip install {mod})", f"{mod} is not installed"
                )

    def log(self, frame: Any) -> None:
        """The rows of one evaluation (a Table or a DataFrame)."""
        if not self.tracks():
            return
        if isinstance(frame, Table):
            frame = frame.frame()
        new = [(int(s), int(t)) for s, t in zip(frame["seed"], frame["iter"])]
        rows = frame[[k not in self.seen for k in new]]
        self.seen.update(new)
        if len(rows):
            self._guard(self._log, list(scalars(rows)))

    def close(self, status: str, metrics: Any | None, error: str | None = None) -> None:
        """Log the rows not seen yet, the final values, the status; release the writer."""
        if not self.tracks():
            return
        if isinstance(metrics, Table):
            metrics = metrics.frame()
        if metrics is not None:
            self.log(metrics)
        self._guard(self._close, status, metrics, error)

    def tracks(self) -> bool:
        """Whether this logger records anything beyond the run's files (it overrides ``_log`` or
        ``_close``); the base logger never looks at the rows (nor imports pandas)."""
        return type(self)._log is not Logger._log or type(self)._close is not Logger._close

    def _guard(self, fn: Any, *args: Any) -> None:
        """A tracker that fails never fails the run (its record is the source of truth): one
        warning on stderr, and no more tracking."""
        if getattr(self, "broken", False):
            return
        try:
            fn(*args)
        except Exception as e:
            self.broken = True
            print(
                f"warning: logger={self.cfg['logger']['name']} stopped tracking: {type(e).__name__}: {e} "
                f"(the run and its record go on)",
                file=sys.stderr,
            )

    def _log(self, points: list[tuple[str, int, float]]) -> None:
        pass

    def _close(self, status: str, metrics: Any | None, error: str | None) -> None:
        pass


def final_values(metrics: Any | None) -> dict[str, float]:
    """The last row's metrics averaged over seeds (``final/train_loss``, ...): the hparams view."""
    if metrics is None or not len(metrics):
        return {}
    last = metrics[metrics["iter"] == metrics.groupby("seed")["iter"].transform("max")]
    out = {}
    for c in last.columns:
        if c not in LABEL_COLUMNS and last[c].notna().any():
            v = float(last[c].astype(float).mean())
            if math.isfinite(v):
                out[f"final/{c}"] = v
    return out


def open_logger(cfg: dict, out: Path | None, run_id: str) -> Logger:
    """The logger the config selects (``logger=none`` or no ``logger`` group: no tracking; no
    ``out``: nothing to write beside, no tracking either)."""
    lcfg = cfg.get("logger") or {"name": "none"}
    cls = LOGGERS.get(lcfg.get("name", "none"))
    if out is None:
        cls = Logger
    cls.check(lcfg)  # a missing extra or a bad key: ConfigError (exit 2), before any work
    where = Path(out) if out is not None else Path(".")
    try:
        return cls(cfg, where, run_id)
    except Exception as e:
        print(
            f"warning: logger={lcfg.get('name')} could not start: {type(e).__name__}: {e} "
            f"(the run and its record go on, untracked)",
            file=sys.stderr,
        )
        return Logger(cfg, where, run_id)


def check(cfg: dict) -> None:
    """Validate the ``logger`` group (when present) before any work."""
    lcfg = cfg.get("logger")
    if lcfg is None:
        return
    cls = LOGGERS.get(lcfg.get("name"))
    for key in ("tracking_uri", "experiment", "folder"):
        v = lcfg.get(key)
        if key in lcfg and v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"logger.{key}", v, "null or a non-empty string", "not a string")
    cls.check(lcfg)


LOGGERS.register("none")(Logger)


@LOGGERS.register("tensorboard")
class TensorBoardLogger(Logger):
    """TensorBoard event files in OUT/<logger.folder>: a scalar per metric, seed and evaluation
    (``seed0/train_loss`` at step = iter), the resolved config as text and as hparams (with the
    final values, mean over seeds, as its metrics). View: ``tensorboard --logdir OUT`` (a sweep
    folder shows every job)."""

    requires = ("tensorboard",)

    def __init__(self, cfg: dict, out: Path, run_id: str):
        super().__init__(cfg, out, run_id)
        from torch.utils.tensorboard import SummaryWriter

        from cocoef_cli.record import to_yaml

        self.writer = SummaryWriter(log_dir=str(self.out / cfg["logger"].get("folder", "tensorboard")))
        self.writer.add_text("config", "```\n" + to_yaml(cfg) + f"\n```\nrun_id: {run_id}", 0)

    def _log(self, points: list[tuple[str, int, float]]) -> None:
        for tag, step, v in points:
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def _close(self, status: str, metrics: Any | None, error: str | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        final = final_values(metrics)
        if metrics is not None:  # else final is empty
            for tag, v in final.items():
                self.writer.add_scalar(tag, v, int(metrics["iter"].max()))
        params = {k: v for k, v in flatten(self.cfg).items() if not k.startswith("logger.")}
        file_writer = self.writer.file_writer  # None only after close()
        if file_writer is not None:
            for summary in hparams({**params, "status": status}, final):
                file_writer.add_summary(summary)
        self.writer.add_text("status", status + (f": {error}" if error else ""), 0)
        self.writer.close()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise the writers of a local SQLite store (sweep jobs in parallel worker processes
    share one): an exclusive lock on ``<db>.lock`` beside it; other stores are not locked."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///") :] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sweep_root(out: Path) -> Path | None:
    """The sweep folder when ``out`` is the folder of the Hydra multirun job running now."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if Path(hc.runtime.output_dir).resolve() == out.resolve():
                return Path(hc.sweep.dir).resolve()
    except Exception:
        pass
    return None


@LOGGERS.register("mlflow")
class MLflowLogger(Logger):
    """An MLflow run (experiment ``logger.experiment``) in the store ``logger.tracking_uri`` (any URI
    MLflow accepts; null: ``sqlite:///DIR/mlflow.db``, DIR = the sweep folder for a sweep job, else
    OUT; a local SQLite store keeps its artifacts in mlartifacts/ beside it). Params: the resolved config (dotted keys); metrics:
    ``seed{s}/{column}`` at step = iter, plus ``final/{column}`` (mean over seeds); artifacts:
    ``metrics.csv`` and the run record as ``cocoef-run.json`` (never named run.json, so that the
    store's folders are never taken for runs); tags: ``status`` (running, completed, diverged,
    failed), ``cocoef.run_id``, ``cocoef.out``."""

    requires = ("mlflow",)

    def __init__(self, cfg: dict, out: Path, run_id: str):
        super().__init__(cfg, out, run_id)
        lcfg = cfg["logger"]
        root = _sweep_root(self.out) or self.out.resolve()
        self.uri = lcfg.get("tracking_uri") or f"sqlite:///{root / 'mlflow.db'}"
        # a local SQLite store keeps its artifacts beside it (MLflow's default: ./mlruns in the cwd)
        db = Path(self.uri[len("sqlite:///") :]) if self.uri.startswith("sqlite:///") else None
        artifacts = (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # no INFO lines on a run's stderr (creating a store)
            logging.getLogger(name).setLevel(logging.WARNING)

        self.out.mkdir(parents=True, exist_ok=True)
        with _store_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
            name = lcfg.get("experiment") or "cocoef"
            exp = self.client.get_experiment_by_name(name)
            eid = exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=artifacts)
            run = self.client.create_run(
                eid,
                run_name=self.out.name,
                tags={"status": "running", "cocoef.run_id": run_id, "cocoef.out": str(self.out.resolve())},
            )
            self.id = run.info.run_id
            params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.id, params=params[i : i + 100])

    def _log(self, points: list[tuple[str, int, float]]) -> None:
        from mlflow.entities import Metric

        ms = [Metric(tag, v, 0, step) for tag, step, v in points]
        with _store_lock(self.uri):
            for i in range(0, len(ms), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(self.id, metrics=ms[i : i + 1000])

    def _close(self, status: str, metrics: Any | None, error: str | None) -> None:
        import shutil
        import tempfile

        from mlflow.entities import Metric

        step = int(metrics["iter"].max()) if metrics is not None and len(metrics) else 0
        with _store_lock(self.uri):
            final = [Metric(k, v, 0, step) for k, v in final_values(metrics).items()]
            if final:
                self.client.log_batch(self.id, metrics=final)
            with tempfile.TemporaryDirectory() as tmp:
                for src, name in (("metrics.csv", "metrics.csv"), ("run.json", "cocoef-run.json")):
                    if (self.out / src).exists():
                        shutil.copy(self.out / src, Path(tmp) / name)
                        self.client.log_artifact(self.id, str(Path(tmp) / name))
            self.client.set_tag(self.id, "status", status)
            if error:
                self.client.set_tag(self.id, "error", error[:5000])
            self.client.set_terminated(self.id, "FAILED" if status == "failed" else "FINISHED")
