"""The `csv` dataset: the user's own table, regression and classification."""

import numpy as np
import pandas as pd
import pytest

from cocoef_cli import config
from cocoef_cli.errors import ConfigError
from cocoef_cli.run import execute


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 3))
    df = pd.DataFrame(X, columns=["a", "b", "c"])
    df["y"] = X @ [1.0, -2.0, 0.5] + 0.01 * rng.standard_normal(300)
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return path


BASE = ["dataset=csv", "devices=5", "code.d=2", "iters=40", "eval_every=40", "precision=float64"]


def test_csv_regression_reaches_the_least_squares_optimum(table):
    cfg = config.load(
        BASE
        + [
            f"dataset.path={table}",
            "dataset.target=y",
            "optim.lr=0.5",
            "straggler=none",
            "method=gc",
            "iters=200",
            "eval_every=200",
        ]
    )
    exp, res = execute(cfg, None)
    assert exp.data.features == 3 and exp.objective.model.D == 4  # a, b, c + intercept
    assert res.metrics.opt_gap.iloc[-1] < 1e-8


def test_csv_classification(table):
    df = pd.read_csv(table)
    df["label"] = np.where(df.y > 0, "pos", "neg")
    df.drop(columns=["y"]).to_csv(table, index=False)
    cfg = config.load(
        BASE
        + [
            f"dataset.path={table}",
            "dataset.target=label",
            "dataset.task=classification",
            "model=logistic",
            "optim.lr=1.0",
        ]
    )
    _, res = execute(cfg, None)
    assert res.metrics.test_acc.iloc[-1] > 0.9


def test_csv_errors_name_the_key(table):
    with pytest.raises(ConfigError, match=r"^dataset.target='nope'.*accepted: a, b, c, y"):
        execute(config.load(BASE + [f"dataset.path={table}", "dataset.target=nope"]), None)
    pd.read_csv(table).assign(note="x").to_csv(table, index=False)
    with pytest.raises(ConfigError, match=r"^dataset.path=.*non-numeric"):
        execute(config.load(BASE + [f"dataset.path={table}", "dataset.target=y"]), None)
