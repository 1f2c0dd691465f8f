import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MPLBACKEND", "Agg")
# derived dataset caches (data.cache_dir) go to a folder of this test session, not the user's
os.environ.setdefault("COCOEF_CACHE_DIR", tempfile.mkdtemp(prefix="cocoef-test-cache-"))


@pytest.fixture
def small() -> list[str]:
    """A tiny least-squares problem: fast enough for many runs per test."""
    return ["dataset.n=240", "dataset.dim=5", "devices=6", "iters=20", "eval_every=5", "precision=float64"]
