"""The compiled Top-k kernel's build: cached per source, flags and CPU; a missing compiler falls
back to torch's exact selection with a note; rows split over threads give the same result."""

import os

import numpy as np
import pytest
import torch

from cocoef_cli.sim import compressors, kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has not looked for the library yet, with an empty cache folder."""
    monkeypatch.setenv("COCOEF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    monkeypatch.setattr(compressors, "USE_KERNELS", True)
    return tmp_path / "cache"


def test_the_kernel_builds_on_ci():
    """CI machines have a C compiler: there the kernel path must be the one tested."""
    if os.environ.get("CI") != "true":
        pytest.skip("only asserted on CI")
    assert kernels.library() is not None and compressors._kernels() is kernels


def test_a_build_is_cached_and_loaded_without_compiling(fresh, monkeypatch):
    if kernels.compiler() is None:
        pytest.skip("no C compiler")
    assert kernels.library() is not None
    built = list(fresh.glob("topk_rows-*.so"))
    assert len(built) == 1 and not list(fresh.glob(".*.tmp"))  # staged copy renamed into place
    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_LIBRARY", None)
    monkeypatch.setattr(kernels, "_compile", lambda *a: pytest.fail("compiled again"))
    assert kernels.library() is not None  # the second process only loads


def test_the_cache_key_follows_the_source_the_flags_and_the_cpu(monkeypatch, tmp_path):
    original, builds = kernels.SOURCE, kernels.builds()
    keys = [key for _, key in builds]
    assert len(set(keys)) == len(builds) == 4  # native or not, OpenMP or not: four different files
    edited = tmp_path / "topk_rows.c"
    edited.write_bytes(kernels.SOURCE.read_bytes() + b"\n/* edited */\n")
    monkeypatch.setattr(kernels, "SOURCE", edited)
    assert not set(keys) & {key for _, key in kernels.builds()}
    monkeypatch.setattr(kernels, "SOURCE", original)
    monkeypatch.setattr(kernels, "cpu_key", lambda: "another cpu")
    for (flags, key), old in zip(kernels.builds(), keys):
        assert (key != old) == (kernels.NATIVE in flags)  # a portable build runs on any CPU of the kind


def test_a_damaged_cache_entry_is_rebuilt(fresh):
    if kernels.compiler() is None:
        pytest.skip("no C compiler")
    fresh.mkdir(parents=True)
    for _, key in kernels.builds():
        (fresh / f"topk_rows-{key}.so").write_bytes(b"not a library")
    assert kernels.library() is not None


def test_without_a_compiler_top_k_is_still_exact_and_says_why(fresh, monkeypatch, capsys):
    monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that fails every build
    x = torch.randn(4, 2000, generator=torch.Generator().manual_seed(1))
    idx = compressors.topk_indices(x, 40)
    assert kernels.library() is None and compressors.USE_KERNELS is False
    err = capsys.readouterr().err
    assert "Top-k kernel is not available (/bin/false: exit status 1)" in err and "exact, slower" in err
    want = x.abs().topk(40, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.sort(-1).values, want)
    compressors.topk_indices(x, 40)
    assert capsys.readouterr().err == ""  # said once


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_split_over_threads_give_the_same_result(dtype):
    if kernels.library() is None:
        pytest.skip("no C compiler builds the kernel here")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((37, 4000)).astype(dtype)
    x[5, ::3] = np.nan
    x[9] = 0.0
    active = rng.random(37) < 0.8
    runs = [kernels.topk_rows(x.copy(), 64, 8, 18, 1152, t, active) for t in (1, 2, 5)]
    for idx, picked in runs[1:]:
        assert np.array_equal(idx, runs[0][0]) and np.array_equal(picked, runs[0][1], equal_nan=True)


def test_a_malformed_input_is_refused():
    if kernels.library() is None:
        pytest.skip("no C compiler builds the kernel here")
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.topk_rows(np.zeros((4, 64), np.float32)[:, ::2], 2, 1, 2, 8, 1)
    with pytest.raises(ValueError, match="do not match"):
        kernels.topk_rows(np.zeros((4, 64), np.float32), 2, 1, 2, 8, 1, active=np.ones(3, bool))


def test_the_kernel_shares_torchs_openmp_runtime():
    """Rows run on torch's own OpenMP threads: one libgomp in the process (a second runtime's
    threads would compete with torch's spinning ones for the cores)."""
    lib = kernels.library()
    if lib is None or not lib.parallel_f32() or not os.path.exists("/proc/self/maps"):
        pytest.skip("no OpenMP build (or no /proc) here")
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes
