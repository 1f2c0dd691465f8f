"""Datasets (offline only) and their partitioning across the N data partitions.

A dataset is loaded once per run (its train/test split drawn from ``dataset.seed``, shared by
every replicate, so all replicates optimise the same F). The partition of the training samples into
P_1..P_N is drawn per replicate seed from its ``partition`` stream.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from cocoef_cli.errors import ConfigError
from cocoef_cli.registry import Registry
from cocoef_cli.sim.rng import stream_seed

DATASETS: Registry[Callable[[Mapping], "Dataset"]] = Registry("dataset")
PARTITIONS = ("iid", "label_sorted", "dirichlet")


@dataclass
class Dataset:
    """Features/targets as float64 / int64 numpy arrays; ``task`` is regression or classification."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    task: str  # "regression" | "classification"
    n_classes: int = 0  # 0 for regression

    @property
    def n(self) -> int:
        return len(self.y_train)

    @property
    def features(self) -> int:
        return self.X_train.shape[1]


# ----------------------------------------------------------------------------------------------
# loading: registry entries return (X, y, task); the split/standardisation is shared below


def load_dataset(cfg: Mapping) -> Dataset:
    """Load ``cfg.name``, split train/test with ``dataset.seed``, standardise with train statistics."""
    name = cfg.get("name")
    X, y, task = DATASETS.get(name)(cfg)
    X = np.asarray(X, dtype=np.float64)
    if task == "classification":
        classes, y = np.unique(np.asarray(y), return_inverse=True)
        n_classes = len(classes)
        y = y.astype(np.int64)
    else:
        y, n_classes = np.asarray(y, dtype=np.float64), 0
    frac = cfg.get("test_fraction", 0.2)
    if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise ConfigError("dataset.test_fraction", frac, "numbers in [0, 1)", "out of range")
    rng = np.random.default_rng(stream_seed(int(cfg.get("seed", 0)), "split"))
    perm = rng.permutation(len(y))
    n_test = int(round(frac * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    if len(train) < 1:
        raise ConfigError("dataset.test_fraction", frac, "a fraction leaving training samples", "no training data")
    Xtr, Xte = X[train], X[test]
    if cfg.get("standardize", True):
        mu, sd = Xtr.mean(0), Xtr.std(0)
        sd[sd == 0] = 1.0
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    return Dataset(name, Xtr, y[train], Xte, y[test], task, n_classes)


def _ill_conditioned_features(rng: np.random.Generator, n: int, dim: int, cond: float) -> np.ndarray:
    """x = Q diag(s) z with z ~ N(0, I), s_j² log-spaced in [1/cond, 1], Q a random rotation:
    the feature covariance has condition number ``cond``."""
    if not cond >= 1:
        raise ConfigError("dataset.cond", cond, "numbers ≥ 1", "out of range")
    s = cond ** (-0.5 * np.linspace(0.0, 1.0, dim))
    Q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (rng.standard_normal((n, dim)) * s) @ Q.T


def _positive_int(cfg: Mapping, key: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"dataset.{key}", v, "positive integers", "invalid")
    return v


@DATASETS.register("synthetic_linreg")
def synthetic_linreg(cfg: Mapping):
    """Synthetic least squares y = xᵀw* + noise·ε, x with covariance of condition number `cond`."""
    n, dim = _positive_int(cfg, "n"), _positive_int(cfg, "dim")
    rng = np.random.default_rng(stream_seed(int(cfg.get("seed", 0)), "data"))
    X = _ill_conditioned_features(rng, n, dim, float(cfg.get("cond", 1.0)))
    w = rng.standard_normal(dim)
    y = X @ w + float(cfg.get("noise", 0.1)) * rng.standard_normal(n)
    return X, y, "regression"


@DATASETS.register("synthetic_logreg")
def synthetic_logreg(cfg: Mapping):
    """Synthetic binary classification, P(y=1|x) = σ(xᵀw*), x with covariance of condition number `cond`."""
    n, dim = _positive_int(cfg, "n"), _positive_int(cfg, "dim")
    rng = np.random.default_rng(stream_seed(int(cfg.get("seed", 0)), "data"))
    X = _ill_conditioned_features(rng, n, dim, float(cfg.get("cond", 1.0)))
    w = rng.standard_normal(dim) * 2.0 / np.sqrt(dim)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(X @ w)))).astype(np.int64)
    return X, y, "classification"


def _sklearn(loader_name: str):
    def load(cfg: Mapping):
        import sklearn.datasets

        X, y = getattr(sklearn.datasets, loader_name)(return_X_y=True)
        return X, y, "classification"

    return load


for _name, _loader, _doc in [
    ("digits", "load_digits", "8×8 handwritten digits, 1,797 samples, 10 classes (shipped in scikit-learn)."),
    ("breast_cancer", "load_breast_cancer", "Breast cancer Wisconsin, 569 samples, 30 features, binary (scikit-learn)."),
    ("wine", "load_wine", "Wine recognition, 178 samples, 13 features, 3 classes (scikit-learn)."),
    ("iris", "load_iris", "Iris, 150 samples, 4 features, 3 classes (scikit-learn)."),
]:
    _fn = _sklearn(_loader)
    _fn.__doc__ = _doc
    DATASETS.register(_name)(_fn)


@DATASETS.register("csv")
def csv_dataset(cfg: Mapping):
    """Your own table: numeric feature columns plus a `target` column, from `dataset.path`."""
    import pandas as pd

    path = cfg.get("path")
    if not path:
        raise ConfigError("dataset.path", path, "a path to a CSV file", "missing")
    if not os.path.isfile(str(path)):
        raise ConfigError("dataset.path", str(path), "a path to an existing CSV file", "file not found")
    task = cfg.get("task", "regression")
    if task not in ("regression", "classification"):
        raise ConfigError("dataset.task", task, "regression, classification")
    df = pd.read_csv(str(path))
    target = cfg.get("target")
    if target not in df.columns:
        raise ConfigError("dataset.target", target, list(map(str, df.columns)), "not a column of the CSV")
    feats = df.drop(columns=[target])
    bad = [c for c in feats.columns if not pd.api.types.is_numeric_dtype(feats[c])]
    if bad:
        raise ConfigError("dataset.path", str(path), "numeric feature columns", f"non-numeric columns {bad}")
    if feats.isna().any().any() or df[target].isna().any():
        raise ConfigError("dataset.path", str(path), "a CSV without missing values", "missing values")
    return feats.to_numpy(np.float64), df[target].to_numpy(), task


# ----------------------------------------------------------------------------------------------
# partitioning


def partition_indices(y: np.ndarray, N: int, cfg: Mapping, seeds: Sequence[int]) -> np.ndarray:
    """Per replicate, split range(n) into N disjoint partitions; returns (R, N, B) int64 indices,
    padded with n (an index one past the data) where a partition has fewer than B samples.

    ``iid``: a seeded permutation, cut by ``numpy.array_split``; ``label_sorted``: the permutation
    stably sorted by label, then cut (non-IID); ``dirichlet``: for each class, proportions
    q ~ Dirichlet(alpha·1_N) of its (permuted) samples go to the partitions.
    """
    scheme = cfg.get("partition", "iid")
    if scheme not in PARTITIONS:
        raise ConfigError("dataset.partition", scheme, PARTITIONS, "unknown partition scheme")
    n = len(y)
    parts_per_seed = []
    for seed in seeds:  # set-up only: one permutation per replicate
        rng = np.random.default_rng(stream_seed(seed, "partition"))
        perm = rng.permutation(n)
        if scheme == "iid":
            parts = np.array_split(perm, N)
        elif scheme == "label_sorted":
            parts = np.array_split(perm[np.argsort(y[perm], kind="stable")], N)
        else:
            alpha = cfg.get("alpha", 0.5)
            if not isinstance(alpha, (int, float)) or alpha <= 0:
                raise ConfigError("dataset.alpha", alpha, "positive numbers", "invalid")
            labels = y[perm].astype(np.int64) if np.issubdtype(y.dtype, np.integer) else np.zeros(n, np.int64)
            buckets: list[list[np.ndarray]] = [[] for _ in range(N)]
            for c in np.unique(labels):
                members = perm[labels == c]
                q = rng.dirichlet(np.full(N, float(alpha)))
                cuts = np.round(np.cumsum(q)[:-1] * len(members)).astype(int)
                for j, chunk in enumerate(np.split(members, cuts)):
                    buckets[j].append(chunk)
            parts = [np.concatenate(b) for b in buckets]
        parts_per_seed.append(parts)
    B = max(1, max(len(p) for parts in parts_per_seed for p in parts))
    out = np.full((len(seeds), N, B), n, dtype=np.int64)
    for r, parts in enumerate(parts_per_seed):
        for j, p in enumerate(parts):
            out[r, j, : len(p)] = p
    return out
