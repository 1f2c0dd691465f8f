"""The metrics Table (the simulator's rows without pandas): its CSV is pandas' to_csv byte for
byte, its concatenation widens types as pd.concat does, and its DataFrame is the same frame."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cocoef_cli.record import Table, nanmean


def _pandas(parts: list[dict], lengths: list[int]) -> pd.DataFrame:
    """What the engine did before the Table: a DataFrame per evaluation, then pd.concat."""
    frames = [
        pd.DataFrame({k: v if isinstance(v, np.ndarray | list) else [v] * n for k, v in d.items()})
        for d, n in zip(parts, lengths)
    ]
    return pd.concat(frames, ignore_index=True)


F32 = np.array([0.1, 1e-5, np.nan, np.inf, -0.0, 3e38, 1.2345678e-30, 7.0], np.float32)
F64 = np.array([0.1, 1e-5, np.nan, -np.inf, 1e16, 123456789.123, 2.5e-300, 21.15155042367737])
CASES = {
    "None then ints (n_received)": [dict(a=[None] * 2, b=F32[:2]), dict(a=np.array([79, 80]), b=F32[2:4])],
    "None then float32": [dict(a=[None] * 2), dict(a=F32[:4])],
    "None then float64": [dict(a=[None] * 2), dict(a=F64[:4])],
    "float32 then float64": [dict(a=F32[:3]), dict(a=F64[:3])],
    "ints then floats": [dict(a=np.array([1, 2])), dict(a=F64[:2])],
    "bools then ints": [dict(a=[True, False]), dict(a=np.array([1, 2]))],
    "text to quote, None": [dict(a=["x,y", 'q"z', "new\nline"]), dict(a=[None, "w", ""])],
    "an empty evaluation": [dict(a=F32[:0]), dict(a=F32[:3])],
    "every float32": [dict(a=F32), dict(a=F32)],
    "every float64": [dict(a=F64), dict(a=F64)],
    "scalars repeated": [dict(a=1.5, b="coco_ef", c=None, d=3), dict(a=2.5, b="coco_ef", c=None, d=4)],
    "numpy scalars": [dict(a=np.float32(0.1), b=np.int64(3)), dict(a=np.float32(0.2), b=np.int64(4))],
    "ints with None": [dict(a=[1, None]), dict(a=[2, 3])],
    "bools then floats": [dict(a=[True, False]), dict(a=F64[:2])],
}


@pytest.mark.parametrize("case", list(CASES))
def test_csv_and_frame_are_what_pandas_made(case):
    parts = CASES[case]
    lengths = [
        next(len(v) for v in d.values()) if any(isinstance(v, np.ndarray | list) for v in d.values()) else 3
        for d in parts
    ]
    want = _pandas(parts, lengths)
    table = Table.concat([Table.of(d, n) for d, n in zip(parts, lengths)])
    assert table.to_csv() == want.to_csv(index=False)
    pd.testing.assert_frame_equal(table.frame(), want)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.floats(
    allow_nan=True, allow_infinity=True
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(finite_or_not, min_size=1, max_size=8),
    st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=8),
    st.sampled_from([np.float32, np.float64]),
)
def test_any_numbers_print_as_pandas_prints_them(floats, ints, dtype):
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf
        f = np.array(floats, dtype=dtype)
    i = np.array(ints[: len(floats)] + [0] * (len(floats) - len(ints[: len(floats)])), dtype=np.int64)
    parts = [dict(x=f, y=i, z=[None] * len(f)), dict(x=f[::-1].copy(), y=i, z=list(f.astype(np.float64)))]
    want = _pandas(parts, [len(f), len(f)])
    table = Table.concat([Table.of(d, len(f)) for d in parts])
    assert table.to_csv() == want.to_csv(index=False)
    pd.testing.assert_frame_equal(table.frame(), want)


def test_a_table_survives_a_checkpoint_round_trip():
    from cocoef_cli.checkpoint import plain, unplain

    t = Table.of({"seed": [0, 1], "iter": 5, "x": np.array([0.1, np.nan], np.float32), "n": [None, 3], "s": "a,b"}, 2)
    back = unplain(plain(t))
    assert isinstance(back, Table) and back.to_csv() == t.to_csv()
    assert [a.dtype for a in back.columns.values()] == [a.dtype for a in t.columns.values()]


def test_sorting_last_rows_and_means():
    t = Table.of(
        {"seed": np.array([1, 0, 1, 0]), "iter": np.array([0, 0, 5, 5]), "loss": [None, 2.0, 1.0, math.nan]}, 4
    )
    s = t.sorted_by(["seed", "iter"])
    assert s["seed"].tolist() == [0, 0, 1, 1] and s["iter"].tolist() == [0, 5, 0, 5]
    last = t.take(np.array([True, True, True, False])).last_rows()  # seed 0 ends at iter 0 (diverged after)
    assert sorted(zip(last["seed"].tolist(), last["iter"].tolist())) == [(0, 0), (1, 5)]
    assert nanmean(t.floats("loss")) == 1.5 and math.isnan(nanmean(np.array([math.nan])))
    with pytest.raises(ValueError, match="different lengths"):
        Table({"a": np.zeros(2), "b": np.zeros(3)})
