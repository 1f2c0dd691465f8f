"""The shared typed getters (cocoef_cli.checks) and the one final-row-per-seed function."""

import math

import numpy as np
import pandas as pd
import pytest

from cocoef_cli.checks import need_bool, need_choice, need_int, need_num
from cocoef_cli.errors import ConfigError
from cocoef_cli.record import final_rows


def message(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kw)
    return str(err.value)


def test_need_int_converts_and_names_key_value_and_bounds():
    assert need_int("k", np.int64(3), 1, 5) == 3 and type(need_int("k", np.int64(3), 1)) is int
    assert need_int("k", None, 1, none=True) is None
    assert message(need_int, "compressor.k", 0, 1, 10) == "compressor.k=0: out of range; accepted: integers 1..10"
    assert message(need_int, "seeds", True, 1) == "seeds=True: not an integer; accepted: integers ≥ 1"
    assert message(need_int, "seeds", 2.0, 1) == "seeds=2.0: not an integer; accepted: integers ≥ 1"
    assert "accepted: null or integers ≥ 1" in message(need_int, "batch_size", "x", 1, none=True)


def test_need_num_intervals_bools_nan_and_inf():
    assert (
        need_num("p", 0, 0, 1, hi_open=True) == 0.0
        and need_num("d", math.inf, 0, lo_open=True, finite=False) == math.inf
    )
    assert message(need_num, "p", 1.0, 0, 1, hi_open=True) == "p=1.0: out of range; accepted: numbers in [0, 1)"
    assert message(need_num, "lr", 0, 0, lo_open=True) == "lr=0: out of range; accepted: finite numbers > 0"
    assert message(need_num, "lr", math.inf, 0, lo_open=True).startswith("lr=inf: out of range")
    for bad in (True, "0.1", float("nan"), [1]):
        assert ": not a number;" in message(need_num, "lr", bad, 0, lo_open=True)


def test_need_bool_and_need_choice():
    assert need_bool("b", False) is False
    assert message(need_bool, "model.bias", 1) == "model.bias=1: not a boolean; accepted: true, false"
    assert need_choice("precision", "float64", ("float32", "float64")) == "float64"
    assert "did you mean float32?" in message(need_choice, "precision", "float23", ("float32", "float64"))


def test_final_rows_keep_a_diverged_seeds_last_finite_row():
    """Seed 1 diverged after iter 10 (the engine records no row after that): its final row is the
    one at iter 10, not dropped; seed 0's is at iter 20."""
    rows = pd.DataFrame({"seed": [0, 0, 0, 1, 1], "iter": [0, 10, 20, 0, 10], "opt_gap": [1.0, 0.5, 0.1, 1.0, 9.0]})
    fin = final_rows(rows)
    assert fin[["seed", "iter"]].values.tolist() == [[0, 20], [1, 10]]
    two = pd.concat([rows.assign(run="a"), rows.assign(run="b").iloc[:2]])  # per (run, seed)
    assert final_rows(two)[["run", "seed", "iter"]].values.tolist() == [["a", 0, 20], ["a", 1, 10], ["b", 0, 10]]
