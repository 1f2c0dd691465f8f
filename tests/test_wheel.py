"""`cocoef bench` from an installed wheel: built from the package files, installed outside the checkout."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # builds a wheel and imports torch in four processes: about 30 s of CPU
def test_bench_smoke_runs_from_an_installed_wheel(tmp_path):
    src = tmp_path / "src"  # what a wheel is built from (the checkout's build/ stays untouched)
    for name in ("cocoef_cli", "hydra_plugins", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path)], check=True)
    wheel = next(tmp_path.glob("cocoef-*.whl"))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(env_dir), str(wheel)],
        check=True,
    )
    py = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # the dependencies (torch, hydra, ...) from this interpreter's environment, after the wheel's own files
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "cocoef-test-deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COCOEF_CONFIG_DIR")}
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run(
        [py, "-c", "import cocoef_cli, cocoef_cli.config as c; print(cocoef_cli.__file__); print(c.config_dir())"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(purelib)  # the installed package, not the checkout
    assert Path(where[1]) == (env_dir / "share" / "cocoef" / "conf").resolve()  # the conf tree shipped as data
    assert (Path(where[0]).parent / "sim" / "topk_rows.c").is_file()  # the Top-k kernel's source, compiled on first use
    res = subprocess.run(
        [py, "-m", "cocoef_cli.cli", "bench", "--smoke", "--out", "bench.md"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    text = (work / "bench.md").read_text()
    assert "## (a) vectorised simulator vs a per-device Python loop" in text and "| logistic | 10 |" in text
    assert "nan" not in text  # every measurement ran (a failed scaling point records nan)
