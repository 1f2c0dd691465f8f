"""The compiled Top-k kernel's build: cached per source, flags and CPU; a missing compiler falls
back to torch's exact selection with a note; rows split over threads give the same result."""

import json
import os
import subprocess
import sys

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
    assert not set(keys) & {key for _, key in kernels.builds()}  # each CPU kind has its own builds


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
    lib = kernels.library()
    if lib is None or not lib.parallel_f32():
        pytest.skip("no OpenMP build of the kernel here")
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
    """Rows run on torch's own OpenMP threads: one libgomp in a process that loaded torch and the
    kernel (a second runtime's threads would compete with torch's spinning ones for the cores).
    Checked in a fresh process: a test process may hold other libraries' OpenMP (scikit-learn
    ships its own libgomp)."""
    lib = kernels.library()
    if lib is None or not lib.parallel_f32() or not os.path.exists("/proc/self/maps"):
        pytest.skip("no OpenMP build (or no /proc) here")
    probe = (
        "import json; from cocoef_cli.sim import kernels; assert kernels.library() is not None; "
        "print(json.dumps(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l or 'libiomp' in l})))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runtimes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(runtimes) == 1, runtimes


def _reset(monkeypatch):
    monkeypatch.setattr(kernels, "_TRIED", False)
    monkeypatch.setattr(kernels, "_LIBRARY", None)


def test_a_cached_lesser_build_does_not_hide_a_better_one(fresh, monkeypatch):
    cc = kernels.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    (best_flags, best), *_, (portable_flags, portable) = kernels.builds()
    fresh.mkdir(parents=True)
    assert kernels._compile(cc, portable_flags, fresh / f"topk_rows-{portable}.so") == ("", False)
    assert kernels.library() is not None
    if kernels._compile(cc, best_flags, fresh / "probe.so")[0]:
        pytest.skip("this compiler refuses the best build")
    assert (fresh / f"topk_rows-{best}.so").exists() and kernels.OPENMP in kernels.describe()


def test_a_refused_build_is_remembered_and_the_next_one_used(fresh, monkeypatch):
    if kernels.compiler() is None:
        pytest.skip("no C compiler")
    real = kernels._compile
    monkeypatch.setattr(
        kernels,
        "_compile",
        lambda cc, flags, out: ("cc: no openmp", True) if kernels.OPENMP in flags else real(cc, flags, out),
    )
    assert kernels.library() is not None and kernels.OPENMP not in kernels.describe()
    assert len(list(fresh.glob("*.failed"))) == 2  # both OpenMP builds
    _reset(monkeypatch)
    monkeypatch.setattr(kernels, "_compile", lambda *a: pytest.fail("compiled again"))
    assert kernels.library() is not None and kernels.NATIVE in kernels.describe()  # the cached native build


def test_a_build_that_does_not_load_falls_back_to_the_next(fresh, monkeypatch):
    if kernels.compiler() is None:
        pytest.skip("no C compiler")
    real, calls = kernels._load, []

    def first_fails(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("undefined symbol: GOMP_parallel")
        return real(path)

    monkeypatch.setattr(kernels, "_load", first_fails)
    assert kernels.library() is not None and len(calls) == 2
    assert "not loadable: undefined symbol" in next(fresh.glob("*.failed")).read_text()


def test_cc_may_carry_arguments(fresh, monkeypatch):
    cc = kernels.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CC", f"{cc[0]} -DCOCOEF_EXTRA=1")
    assert kernels.compiler() == [cc[0], "-DCOCOEF_EXTRA=1"] and kernels.library() is not None


def test_a_cached_build_others_can_write_is_not_loaded(fresh, monkeypatch):
    if kernels.compiler() is None or not hasattr(os, "getuid"):
        pytest.skip("no C compiler, or no file owners here")
    assert kernels.library() is not None
    (entry,) = fresh.glob("topk_rows-*.so")
    assert kernels._trusted(entry)
    entry.chmod(0o666)  # world-writable: someone else could have replaced it
    assert not kernels._trusted(entry)
    _reset(monkeypatch)
    compiled = []
    real = kernels._compile
    monkeypatch.setattr(kernels, "_compile", lambda *a: compiled.append(a) or real(*a))
    assert kernels.library() is not None and compiled  # built again, not loaded
    assert kernels._trusted(entry)  # and replaced by a private copy (0755)


def test_bad_scalars_are_refused_before_the_c_code_runs():
    if kernels.library() is None:
        pytest.skip("no C compiler builds the kernel here")
    x = np.zeros((4, 64), np.float32)
    for k, h, r, cap in [(0, 1, 2, 8), (65, 1, 2, 80), (2, 0, 2, 8), (2, 1, 0, 8), (8, 1, 2, 4)]:
        with pytest.raises(ValueError, match="need 1 ≤ k ≤ D"):
            kernels.topk_rows(x, k, h, r, cap, 1)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        kernels.topk_rows(x, 2, 1, 2, 8, 1)


#: Builds whose candidate masks take each of the kernel's three forms on an x86 CPU: AVX-512 (the
#: native build where the CPU has it), AVX without AVX-512 (as on an EPYC before Zen 4) and the
#: portable byte-packing loop (no -march: the x86-64 baseline has no AVX).
VECTOR_PATHS = {"native": ("-march=native",), "avx, no avx-512": ("-march=native", "-mno-avx512f"), "portable": ()}


def _cpu_flags() -> set[str]:
    """The first processor's feature flags (/proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _selection_cases(dtype: type) -> list[np.ndarray]:
    """Rows on which a wrong candidate mask or a wrong k-th largest shows: Gaussian rows of
    different scales, integer ties at the threshold, magnitudes over the whole exponent range
    (subnormals to the largest finite, ±inf), all-zero rows, and a length that is not a multiple
    of 64 (the last block takes the scalar tail)."""
    rng = np.random.default_rng(11)
    info = np.finfo(dtype)
    gauss = rng.standard_normal((6, 4096 + 37)) * rng.random((6, 1)) * 10.0 ** rng.integers(-3, 4, (6, 1))
    ties = rng.integers(-3, 4, (6, 4096 + 37)).astype(float)
    wide = np.exp(rng.uniform(np.log(info.smallest_subnormal), np.log(info.max), (6, 4096 + 37)))
    wide *= rng.choice([-1.0, 1.0], wide.shape)
    wide[1, ::97], wide[2, 5], wide[3] = np.inf, -np.inf, info.smallest_subnormal
    zeros = np.zeros((3, 4096 + 37))
    zeros[1, 4000:] = 1.0  # fewer nonzeros than the sample needs: the full-row selection
    with np.errstate(over="ignore"):
        return [np.ascontiguousarray(c.astype(dtype)) for c in (gauss, ties, wide, zeros)]


def _vector_build(path: str, tmp_path) -> object:
    """The kernel built with VECTOR_PATHS[path]'s flags and loaded (skips where the compiler does
    not take them)."""
    cc = kernels.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    flags, probe = (*kernels.FLAGS, *VECTOR_PATHS[path]), tmp_path / "probe.c"
    probe.write_text("int probe(void) { return 0; }\n")
    if subprocess.run([*cc, *flags, "-o", str(tmp_path / "probe.so"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"this compiler does not take {' '.join(VECTOR_PATHS[path]) or 'the plain flags'}")
    built = tmp_path / "variant.so"
    failure, _ = kernels._compile(cc, flags, built)
    assert not failure, failure  # the flags build: so must the kernel
    return kernels._load(built)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", list(VECTOR_PATHS))
def test_every_vector_form_of_the_kernel_selects_exactly(path, dtype, tmp_path, monkeypatch):
    """Each build (AVX-512, AVX, portable) gives the k largest |x_j| of every row, ties to the
    lower index, as a stable full sort does; and NaN counts as the largest."""
    monkeypatch.setattr(kernels, "_LIBRARY", _vector_build(path, tmp_path))
    monkeypatch.setattr(kernels, "_TRIED", True)
    k = 90
    h = k // 8
    r = int(k / h + 3 * np.sqrt(k / h)) + 2
    for x in _selection_cases(dtype):
        idx, picked = kernels.topk_rows(x.copy(), k, h, r, 8 * r * h, 1)
        want = np.sort(np.argsort(-np.abs(x), axis=1, kind="stable")[:, :k], axis=1)
        assert np.array_equal(np.sort(idx, axis=1), want)
        assert np.array_equal(picked, np.take_along_axis(x, idx, axis=1))
    x = _selection_cases(dtype)[0]
    x[2, 777] = np.nan
    x[3, x.shape[1] - 5] = np.nan  # in the last, partial block of 64 (the scalar tail)
    idx, _ = kernels.topk_rows(x.copy(), k, h, r, 8 * r * h, 1)
    assert 777 in idx[2] and x.shape[1] - 5 in idx[3]
    # the build took the form its flags ask for on this CPU (where /proc/cpuinfo says what it has)
    flags = _cpu_flags()
    if not flags:
        return
    want = {"native": 512 if "avx512f" in flags else 256 if "avx" in flags else 0, "portable": 0}
    want["avx, no avx-512"] = 256 if "avx" in flags else 0
    suffix = "f32" if dtype == np.float32 else "f64"
    assert getattr(kernels._LIBRARY, f"vector_form_{suffix}")() == want[path]


@pytest.mark.parametrize("path", list(VECTOR_PATHS))
def test_every_vector_form_of_the_kernel_forms_g_s_rows_with_the_same_bits(path, tmp_path):
    """G's rows formed in the kernel (products fma(l_0, x_0, +0) then fma, sums from +0) are the
    same bits in every build (AVX-512's 64 columns at a time, AVX2's 32, one at a time with fmaf),
    for even and odd class counts and widths that leave a tail of columns."""
    import torch

    native = kernels.library()
    if native is None or not kernels.fused():
        pytest.skip("no compiled kernel with a hardware FMA")
    variant = _vector_build(path, tmp_path)
    g = torch.Generator().manual_seed(3)
    for dtype, suffix, ints in [(torch.float32, "f32", np.int32), (torch.float64, "f64", np.int64)]:
        for C, F, B in [(10, 785, 4), (64, 131, 3), (3, 100, 1), (7, 64, 8)]:
            L, X = torch.randn(40, C, B, generator=g).to(dtype), torch.randn(40, B, F, generator=g).to(dtype)
            X[..., : F // 4] = 0.0  # exact zero products: +0 in every form
            S = torch.randn(40, B, 33, generator=g).to(dtype)
            terms = kernels.Terms([(L, X), (S, None)])
            n, *ptrs = terms._args()
            rows = []
            for lib in (native, variant):
                out = np.empty((40, C * F + 33), np.float32 if suffix == "f32" else np.float64)
                getattr(lib, f"partition_rows_{suffix}")(0, 40, out.shape[1], n, *ptrs, terms.B, kernels._ptr(out))
                rows.append(out.view(ints))
            assert np.array_equal(rows[0], rows[1]), (path, dtype, C, F, B)
            values = rows[0].view(out.dtype)
            assert not np.signbit(values[values == 0]).any()
