"""threads=auto: how a run's torch thread count is resolved, recorded and kept out of run_id."""

import json

import pytest
import torch

from cocoef_cli import config, run
from cocoef_cli.errors import ConfigError
from cocoef_cli.record import run_id
from cocoef_cli.run import execute, rerun, resolve_threads

TINY = ["iters=4", "eval_every=2", "devices=6", "dataset.n=60", "dataset.dim=5"]


def test_an_integer_is_used_as_given_and_auto_follows_the_size_of_the_state(monkeypatch):
    monkeypatch.setattr(run, "usable_cores", lambda: 4)
    cfg = config.load(TINY)  # R·M·D = 1·6·6 = 36 values
    assert cfg["threads"] == "auto"
    assert resolve_threads({**cfg, "threads": 3}) == 3 and resolve_threads({**cfg, "threads": 3}, auto=1) == 3
    assert resolve_threads(cfg) == 1  # a small run: one thread
    assert resolve_threads(cfg, auto=1) == 1 and resolve_threads(cfg, auto=2) == 2  # what the caller says auto is
    monkeypatch.setattr(run, "AUTO_THREADS_MIN_WORK", 36)
    assert resolve_threads(cfg) == 4  # R·M·D at the bound: every usable core
    assert resolve_threads({**cfg, "devices": 5}) == 1  # 30 < 36
    assert resolve_threads({**cfg, "threads": None}) == 4  # null means auto


def test_usable_cores_is_a_positive_count():
    assert run.usable_cores() >= 1


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True])
def test_bad_thread_counts_name_the_key(value):
    cfg = config.load(TINY)
    with pytest.raises(ConfigError) as e:
        config.validate({**cfg, "threads": value})
    assert e.value.key == "threads" and "auto" in str(e.value)


def test_threads_are_not_part_of_run_id():
    cfg = config.load(TINY)
    assert run_id(cfg) == run_id({**cfg, "threads": 1}) == run_id({**cfg, "threads": 2})


def test_run_json_records_the_count_used_and_rerun_uses_it(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "AUTO_THREADS_MIN_WORK", 0)
    monkeypatch.setattr(run, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    seen = []
    build = run.build_experiment
    monkeypatch.setattr(
        run, "build_experiment", lambda cfg, model=None: seen.append(torch.get_num_threads()) or build(cfg, model)
    )
    cfg = config.load(TINY)
    execute(cfg, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["threads"] == 2 and seen == [2]
    assert torch.get_num_threads() == before  # restored
    execute(cfg, tmp_path / "b", threads=1)  # a sweep worker: auto means one thread
    assert json.loads((tmp_path / "b" / "run.json").read_text())["threads"] == 1 and seen[-1] == 1
    monkeypatch.setattr(run, "usable_cores", lambda: 1)  # another machine: rerun still uses the recorded 2
    res = rerun(tmp_path / "a")
    assert res["identical"] and seen[-1] == 2
