"""Straggler models: marginals, draws, state and validation (cocoef_cli/sim/stragglers.py)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from cocoef_cli.errors import ConfigError
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.stragglers import STRAGGLERS, build_straggler

F64 = torch.float64


def build(cfg, M: int = 10, seeds=(0,), loads: torch.Tensor | None = None):
    if loads is None:
        loads = torch.ones(len(seeds), M)
    return build_straggler(cfg, loads, SeedRNG(list(seeds), "straggler"))


def stragglers_over(model, draws: int) -> torch.Tensor:
    """(draws, R, M) bool, True = straggled."""
    return ~torch.stack([model.draw() for _ in range(draws)])


def test_registry_lists_all_models_with_descriptions():
    assert STRAGGLERS.names() == ["none", "bernoulli", "fixed", "hetero", "markov", "delay"]
    assert all(line for _, line in STRAGGLERS.describe())


def test_none_never_straggles():
    m = build({"name": "none"}, M=5, seeds=(0, 1))
    assert m.p.shape == (2, 5) and m.p.dtype == F64 and m.mean_p() == 0.0
    z = m.draw()
    assert z.shape == (2, 5) and z.dtype == torch.bool and z.all()
    assert m.last_time is None


def test_bernoulli_marginals():
    p, M, R, T = 0.3, 20, 2, 1500
    m = build({"name": "bernoulli", "p": p}, M=M, seeds=range(R))
    assert torch.equal(m.p, torch.full((R, M), p, dtype=F64)) and m.mean_p() == pytest.approx(p)
    freq = stragglers_over(m, T).to(F64).mean(0)  # (R, M)
    sd = math.sqrt(p * (1 - p) / T)
    assert (freq - p).abs().max() < 5 * sd
    assert abs(freq.mean().item() - p) < 5 * sd / math.sqrt(R * M)
    assert m.last_time is None


def test_hetero_marginals_linspace_and_list():
    M, T = 8, 3000
    m = build({"name": "hetero", "p_min": 0.0, "p_max": 0.7, "p_list": None}, M=M)
    expected = torch.linspace(0.0, 0.7, M, dtype=F64)
    torch.testing.assert_close(m.p[0], expected)
    freq = stragglers_over(m, T).to(F64).mean(0)[0]
    sd = (expected * (1 - expected) / T).sqrt()
    assert ((freq - expected).abs() <= 5 * sd + 1e-12).all(), (freq, expected)
    assert freq[0] == 0.0
    m = build({"name": "hetero", "p_list": [0.5, 0.1, 0.0, 0.9]}, M=4)
    torch.testing.assert_close(m.p[0], torch.tensor([0.5, 0.1, 0.0, 0.9], dtype=F64))
    freq = stragglers_over(m, T).to(F64).mean(0)[0]
    assert (freq - m.p[0]).abs().max() < 0.04


def test_fixed_has_exactly_s_stragglers_every_draw():
    M, s, T = 12, 5, 800
    m = build({"name": "fixed", "s": s}, M=M, seeds=(0, 1, 2))
    assert m.mean_p() == pytest.approx(s / M)
    st = stragglers_over(m, T)
    assert (st.sum(-1) == s).all()
    freq = st.to(F64).mean(0)
    assert (freq - s / M).abs().max() < 5 * math.sqrt((s / M) * (1 - s / M) / T)
    assert (build({"name": "fixed", "s": 0}, M=M).draw()).all()


def test_markov_stationary_mean_and_persistence():
    p, stay, M, R, T = 0.25, 0.7, 50, 4, 1000
    m = build({"name": "markov", "p": p, "stay": stay}, M=M, seeds=range(R))
    assert m.mean_p() == pytest.approx(p)
    st = stragglers_over(m, T)  # (T, R, M)
    assert abs(st.to(F64).mean().item() - p) < 0.015
    assert abs(st[0].to(F64).mean().item() - p) < 0.1  # the first draw is already stationary
    prev, nxt = st[:-1], st[1:]
    stay_hat = (prev & nxt).sum().item() / prev.sum().item()
    q = p * (1 - stay) / (1 - p)
    q_hat = (~prev & nxt).sum().item() / (~prev).sum().item()
    assert stay_hat == pytest.approx(stay, abs=0.015)
    assert q_hat == pytest.approx(q, abs=0.01)


def test_markov_state_persists_unlike_bernoulli():
    st = stragglers_over(build({"name": "markov", "p": 0.3, "stay": 0.95}, M=40, seeds=(1,)), 400)
    agree = (st[1:] == st[:-1]).to(F64).mean().item()
    assert agree > 0.9  # i.i.d. with p = 0.3 would agree only 58% of the time


def test_delay_marginals_and_time():
    t0, mu, deadline, T = 1.0, 1.0, 6.0, 4000
    loads = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 3.0, 3.0, 3.0, 0.0]])
    m = build({"name": "delay", "t0": t0, "mu": mu, "deadline": deadline}, seeds=(0, 1), loads=loads)
    slack = deadline / loads - t0
    expected = torch.where(slack > 0, torch.exp(-mu * slack), torch.ones_like(slack))
    torch.testing.assert_close(m.p, expected.to(F64))
    assert m.p[1, 4] == 0.0  # a device with no partitions is never late
    z_all, times = [], []
    for _ in range(T):
        z = m.draw()
        z_all.append(z)
        times.append(m.last_time.clone())
    Z, times = torch.stack(z_all), torch.stack(times)  # (T, R, M), (T, R)
    freq = (~Z).to(F64).mean(0)
    sd = (expected * (1 - expected) / T).sqrt().to(F64)
    assert ((freq - m.p).abs() <= 5 * sd + 1e-12).all(), (freq, m.p)
    late = (~Z).any(-1)
    assert times.shape == (T, 2) and times.dtype == F64
    assert (times[late] == deadline).all()
    on_time = times[~late]
    assert on_time.numel() > 0 and (on_time <= deadline).all()
    assert (times[~late[:, 0], 0] >= t0 * 5).all()  # the slowest device has load 5 and needs ≥ 5·t0


def test_delay_without_deadline_never_straggles():
    loads = torch.full((1, 6), 3.0)
    for deadline in (None, math.inf, ".inf"):
        m = build({"name": "delay", "t0": 1.0, "mu": 2.0, "deadline": deadline}, loads=loads)
        assert m.mean_p() == 0.0
        assert m.draw().all() and (m.last_time >= 3.0).all()


def test_delay_rejects_hopeless_deadline():
    with pytest.raises(ConfigError) as err:
        build({"name": "delay", "t0": 1.0, "mu": 1.0, "deadline": 2.5}, loads=torch.tensor([[1.0, 3.0]]))
    assert err.value.key == "straggler.deadline"


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "bernoulli", "p": 0.3},
        {"name": "fixed", "s": 3},
        {"name": "hetero", "p_min": 0.1, "p_max": 0.5},
        {"name": "markov", "p": 0.3, "stay": 0.6},
        {"name": "delay", "t0": 0.5, "mu": 1.0, "deadline": 3.0},
    ],
)
def test_replicates_are_independent_of_batching(cfg):
    loads = torch.tensor([[1.0, 2, 3, 1, 2, 3, 1], [2.0, 2, 2, 2, 2, 2, 2]])  # (R=2, M=7)
    both = build_straggler(cfg, loads, SeedRNG([0, 1], "straggler"))
    single = [build_straggler(cfg, loads[r : r + 1], SeedRNG([r], "straggler")) for r in (0, 1)]
    for _ in range(5):
        zb = both.draw()
        zs = torch.cat([s.draw() for s in single])
        assert torch.equal(zb, zs)
        if both.last_time is not None:
            assert torch.equal(both.last_time, torch.cat([s.last_time for s in single]))
    assert torch.equal(both.p, torch.cat([s.p for s in single]))
    assert not torch.equal(stragglers_over(single[0], 20), stragglers_over(single[1], 20))


def test_accepts_omegaconf_config():
    m = build(OmegaConf.create({"name": "hetero", "p_min": 0.0, "p_max": 0.4, "p_list": None}), M=5)
    torch.testing.assert_close(m.p[0], torch.linspace(0, 0.4, 5, dtype=F64))


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "bernoulli", "p": 1.0}, "straggler.p"),
        ({"name": "bernoulli", "p": -0.1}, "straggler.p"),
        ({"name": "bernoulli", "p": "high"}, "straggler.p"),
        ({"name": "fixed", "s": 10}, "straggler.s"),
        ({"name": "fixed", "s": -1}, "straggler.s"),
        ({"name": "fixed", "s": 2.5}, "straggler.s"),
        ({"name": "hetero", "p_min": 0.5, "p_max": 0.1}, "straggler.p_max"),
        ({"name": "hetero", "p_min": 0.0, "p_max": 1.0}, "straggler.p_max"),
        ({"name": "hetero", "p_list": [0.1, 0.2]}, "straggler.p_list"),
        ({"name": "hetero", "p_list": [0.1] * 9 + [1.0]}, "straggler.p_list"),
        ({"name": "markov", "p": 0.2, "stay": 1.0}, "straggler.stay"),
        ({"name": "markov", "p": 0.9, "stay": 0.5}, "straggler.stay"),
        ({"name": "markov", "p": 1.0, "stay": 0.5}, "straggler.p"),
        ({"name": "delay", "t0": -1.0, "mu": 1.0, "deadline": 6.0}, "straggler.t0"),
        ({"name": "delay", "t0": 1.0, "mu": 0.0, "deadline": 6.0}, "straggler.mu"),
        ({"name": "delay", "t0": 1.0, "mu": 1.0, "deadline": -2.0}, "straggler.deadline"),
        ({"name": "slowpoke"}, "straggler"),
    ],
)
def test_bad_config_raises_config_error_naming_the_key(cfg, key):
    with pytest.raises(ConfigError) as err:
        build(cfg, M=10)
    assert err.value.key == key


def test_every_purpose_has_its_own_stream():
    """(seed, purpose) seeds differ across purposes and across seeds, and repeat for the same pair:
    the straggler pattern a seed sees never depends on the compressor's draws."""
    from cocoef_cli.rng import STREAMS, stream_seed

    seeds = {(s, p): stream_seed(s, p) for s in (0, 1, 7) for p in STREAMS}
    assert len(set(seeds.values())) == len(seeds)
    assert all(stream_seed(s, p) == v for (s, p), v in seeds.items())
