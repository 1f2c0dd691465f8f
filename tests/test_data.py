"""Datasets (offline loaders, official splits) and the partition schemes."""

import gzip
import itertools
import pickle
import random
import typing

import numpy as np
import pytest
from typer.testing import CliRunner

from cocoef_cli import data
from cocoef_cli.cli import app
from cocoef_cli.data import (
    CIFAR_FILES,
    DATASETS,
    IDX_FILES,
    Loaded,
    build_dataset,
    load_dataset,
    partition_indices,
    read_idx,
)
from cocoef_cli.errors import ConfigError

runner = CliRunner()


# ------------------------------------------------------------------------------------ partitions
def _labels(n=600, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)


def _parts(P, n):
    """Per replicate, the list of index arrays of the partitions (padding n removed)."""
    return [[p[p < n] for p in Pr] for Pr in P]


@pytest.mark.parametrize("scheme", ["iid", "label_sorted", "dirichlet"])
@pytest.mark.parametrize("N", [1, 7, 100])
def test_every_scheme_covers_each_sample_exactly_once(scheme, N):
    y = _labels(523)
    P = partition_indices(y, N, {"partition": scheme, "alpha": 0.5}, [0, 1, 2])
    assert P.shape[:2] == (3, N) and P.dtype == np.int64
    for parts in _parts(P, len(y)):
        allidx = np.concatenate(parts)
        assert np.array_equal(np.sort(allidx), np.arange(len(y)))
    # per replicate the partition differs; the same seed gives the same partition
    assert not np.array_equal(P[0], P[1]) or N == 1
    assert np.array_equal(P[1:], partition_indices(y, N, {"partition": scheme, "alpha": 0.5}, [1, 2]))


def test_iid_and_label_sorted_sizes_are_array_split_sizes():
    y = _labels(523)
    for scheme in ("iid", "label_sorted"):
        P = partition_indices(y, 10, {"partition": scheme}, [5])
        sizes = [len(p) for p in _parts(P, len(y))[0]]
        assert sizes == [len(a) for a in np.array_split(np.arange(523), 10)]


def test_label_sorted_partitions_are_contiguous_label_ranges():
    y = _labels(1000, classes=10)  # about 100 per class, 40 partitions of 25: at most 2 labels each
    P = partition_indices(y, 40, {"partition": "label_sorted"}, [0])
    parts = _parts(P, len(y))[0]
    for a, b in itertools.pairwise(parts):
        assert y[a].max() <= y[b].min()  # labels never decrease along the partitions
    assert max(len(np.unique(y[p])) for p in parts) <= 2
    iid = _parts(partition_indices(y, 40, {"partition": "iid"}, [0]), len(y))[0]
    assert np.mean([len(np.unique(y[p])) for p in iid]) > 6  # an iid partition mixes labels


def test_dirichlet_label_counts_follow_alpha():
    y = _labels(20000, classes=5, seed=1)
    N = 10

    def counts(alpha):
        parts = _parts(partition_indices(y, N, {"partition": "dirichlet", "alpha": alpha}, [0]), len(y))[0]
        return np.array([[np.sum(y[p] == c) for p in parts] for c in range(5)])  # (classes, N)

    for alpha in (1e-3, 1.0, 1e4):
        c = counts(alpha)
        assert np.array_equal(c.sum(1), np.bincount(y))  # each class fully distributed
    share = lambda c: c.max(1) / c.sum(1)  # noqa: E731 — the largest share of a class in one partition
    assert share(counts(1e-3)).mean() > 0.9  # tiny alpha: each class (almost) in one partition
    assert (np.abs(counts(1e4) / np.bincount(y)[:, None] - 1 / N) < 0.02).all()  # huge alpha: uniform q
    mid = share(counts(1.0))
    assert (mid > 1 / N + 0.05).all() and (mid < 0.95).all()


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"partition": "shards"}, "dataset.partition"),
        ({"partition": "dirichlet", "alpha": 0}, "dataset.alpha"),
        ({"partition": "dirichlet", "alpha": "x"}, "dataset.alpha"),
    ],
)
def test_bad_partition_config(cfg, key):
    with pytest.raises(ConfigError) as e:
        partition_indices(_labels(50), 5, cfg, [0])
    assert e.value.key == key


# ------------------------------------------------------------------------------------ loaders
def write_idx(path, arr, gz):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    data = header + arr.tobytes()
    (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb").write(data)


def idx_fixture(folder, gz, n_train=12, n_test=5, hw=(4, 3)):
    g = np.random.default_rng(0)
    arrays = {
        "train_x": g.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 3).astype(np.uint8),
        "test_x": g.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "test_y": (np.arange(n_test) % 3).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        write_idx(folder / IDX_FILES[key], arr, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_loader_reads_official_split(tmp_path, gz, name):
    arr = idx_fixture(tmp_path, gz)
    assert np.array_equal(read_idx(tmp_path / (IDX_FILES["train_x"] + (".gz" if gz else ""))), arr["train_x"])
    d = load_dataset({"name": name, "root": str(tmp_path), "standardize": False})
    assert (d.n, len(d.y_test), d.features, d.shape, d.n_classes) == (12, 5, 12, (1, 4, 3), 3)
    np.testing.assert_allclose(d.X_train, arr["train_x"].reshape(12, -1) / 255.0)  # row-major, scaled to [0, 1]
    np.testing.assert_allclose(d.X_test, arr["test_x"].reshape(5, -1) / 255.0)
    assert np.array_equal(d.y_train, arr["train_y"]) and np.array_equal(d.y_test, arr["test_y"])
    # official_split=false pools the 17 images and re-splits them with test_fraction
    r = load_dataset({"name": name, "root": str(tmp_path), "official_split": False, "test_fraction": 0.4})
    assert (r.n, len(r.y_test)) == (10, 7)


def test_idx_loader_finds_torchvision_layout_and_rejects_bad_files(tmp_path):
    idx_fixture(tmp_path / "MNIST" / "raw", gz=True)
    assert load_dataset({"name": "mnist", "root": str(tmp_path)}).n == 12
    bad = tmp_path / "bad"
    idx_fixture(bad, gz=False)
    p = bad / IDX_FILES["test_x"]
    p.write_bytes(p.read_bytes()[:-7])  # truncated
    with pytest.raises(ConfigError) as e:
        load_dataset({"name": "mnist", "root": str(bad)})
    assert e.value.key == "dataset.root" and "truncated" in str(e.value)


def write_cifar(folder, n=4):
    g = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(CIFAR_FILES):
        data = g.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(3 * i + k) % 10 for k in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f)
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("sub", ["cifar-10-batches-py", ""])
def test_cifar10_loader_reads_pickled_batches(tmp_path, sub):
    batches = write_cifar(tmp_path / sub if sub else tmp_path)
    d = load_dataset({"name": "cifar10", "root": str(tmp_path), "standardize": False})
    assert (d.n, len(d.y_test), d.features, d.shape, d.n_classes) == (20, 4, 3072, (3, 32, 32), 10)
    np.testing.assert_allclose(d.X_train[:4], batches["data_batch_1"][0] / 255.0)
    np.testing.assert_allclose(d.X_test, batches["test_batch"][0] / 255.0)
    assert d.y_train[4:8].tolist() == batches["data_batch_2"][1] and d.y_test.tolist() == batches["test_batch"][1]


def _run(tmp_path, *overrides):
    return runner.invoke(
        app, ["run", "model=softmax", "devices=4", "iters=2", *overrides, "--out", str(tmp_path / "o")]
    )


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_root_is_a_clean_exit_2(tmp_path, name):
    for root in ([], [f"dataset.root={tmp_path / 'nowhere'}"]):
        res = _run(tmp_path, f"dataset={name}", *root)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: dataset.root=") and "Traceback" not in res.output
        expected = "data_batch_1" if name == "cifar10" else "train-images-idx3-ubyte"
        assert expected in lines[0]
        assert not (tmp_path / "o").exists()


def test_incomplete_folder_is_a_clean_exit_2_naming_the_files(tmp_path):
    idx_fixture(tmp_path, gz=True)
    (tmp_path / (IDX_FILES["test_y"] + ".gz")).unlink()
    res = _run(tmp_path, "dataset=mnist", f"dataset.root={tmp_path}")
    assert res.exit_code == 2 and "t10k-labels-idx1-ubyte" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    res = _run(tmp_path, "dataset=cifar10", f"dataset.root={tmp_path / 'c'}")
    assert res.exit_code == 2 and "data_batch_3" in res.stderr


def test_a_tiny_idx_folder_trains_a_cnn_through_the_cli(tmp_path):
    idx_fixture(tmp_path / "m", gz=False, n_train=40, n_test=10, hw=(28, 28))
    res = runner.invoke(
        app,
        [
            "run",
            "dataset=mnist",
            f"dataset.root={tmp_path / 'm'}",
            "model=cnn",
            "devices=4",
            "code.d=2",
            "iters=3",
            "eval_every=1",
            "batch_size=4",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    import pandas as pd

    df = pd.read_csv(tmp_path / "o" / "metrics.csv")
    assert len(df) == 4 and df.test_acc.notna().all() and df.model.eq("cnn").all()


# ------------------------------------------------------------------------------------ shipped data
def test_mnist5k_is_real_scaled_digits():
    d = load_dataset({"name": "mnist5k", "seed": 0, "test_fraction": 0.2, "standardize": False})
    assert (d.n, len(d.y_test), d.features, d.shape, d.n_classes) == (4000, 1000, 784, (1, 28, 28), 10)
    assert d.X_train.min() == 0.0 and d.X_train.max() == 1.0
    assert np.bincount(np.concatenate([d.y_train, d.y_test])).tolist() == [500] * 10
    assert np.bincount(d.y_test).min() / 1000 > 0.05 and np.bincount(d.y_test).max() / 1000 < 0.15  # split is shuffled


def test_mnist1d_is_generated_offline_and_leaves_global_rng_alone():
    np.random.seed(123)
    random.seed(7)
    before, pybefore = np.random.get_state()[1].copy(), random.getstate()
    d = build_dataset({"name": "mnist1d", "standardize": False})  # not the process's kept copy
    assert np.array_equal(np.random.get_state()[1], before) and random.getstate() == pybefore
    assert (d.n, len(d.y_test), d.features, d.n_classes, d.shape) == (4000, 1000, 40, 10, None)
    again = build_dataset({"name": "mnist1d", "standardize": False})
    assert np.array_equal(d.X_train, again.X_train)
    with pytest.raises(ConfigError) as e:
        load_dataset({"name": "mnist1d", "official_split": "yes"})
    assert e.value.key == "dataset.official_split"


def test_digits_is_an_image_dataset_and_tabular_ones_are_not():
    d = load_dataset({"name": "digits", "test_fraction": 0.2})
    assert d.shape == (1, 8, 8) and d.features == 64
    assert load_dataset({"name": "wine"}).shape is None


def test_the_dataset_registry_type_covers_what_its_loaders_return():
    """DATASETS is typed Registry[Callable[[Mapping], R]]: every loader's result is an R (a
    Loaded or a plain (X, y, task) tuple), and build_dataset accepts exactly those."""
    loader = typing.get_args(typing.get_type_hints(data)["DATASETS"])[0]
    returns = typing.get_args(loader)[-1]
    accepted = tuple(typing.get_origin(r) or r for r in (typing.get_args(returns) or (returns,)))
    cfg = {"n": 20, "dim": 3, "test_fraction": 0.2}
    for name in ("synthetic_linreg", "synthetic_logreg", "digits", "iris"):
        assert isinstance(DATASETS.get(name)({"name": name, **cfg}), accepted), name
    assert Loaded in accepted and tuple in accepted


def test_a_loader_returning_anything_else_is_named(monkeypatch):
    monkeypatch.setitem(DATASETS._items, "weird", lambda cfg: load_dataset({"name": "iris"}))
    with pytest.raises(TypeError, match="'weird' returned a Dataset"):
        build_dataset({"name": "weird"})
