"""The mutation list of `make mutate` (tools/mutations.py) stays in step with the code: every
original snippet occurs exactly once in its file and every replacement changes it (a stale entry
stops `make mutate` before it tests anything)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutation_snippet_occurs_exactly_once():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from mutations import MUTATIONS
    finally:
        sys.path.remove(str(ROOT / "tools"))
    stale = [
        (m.file, m.original)
        for m in MUTATIONS
        if (ROOT / m.file).read_text().count(m.original) != 1 or m.original == m.replacement
    ]
    assert len(MUTATIONS) > 100 and not stale, stale
