"""The docs hold together: links resolve, design citations name real sections, nothing points
outside the repository, and the README stays a front page."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 260
# "docs/design.md §4", "docs/design.md §1–§5"
CITATION = re.compile(r"docs/design\.md §(\d+)(?:\s*[–-]\s*§(\d+))?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


@cache
def tracked() -> list[Path]:
    """The text files git tracks (skips the test outside a git checkout, e.g. an installed sdist)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # figures, PDFs
            continue
        files.append(path)
    return files


def markdown_files() -> list[Path]:
    return [p for p in tracked() if p.suffix == ".md"]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return LINK.findall(INLINE_CODE.sub(lambda m: m.group(0).replace("(", " ").replace(")", " "), text))


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists() or root not in (dest, *dest.parents):
            bad.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.relative_to(root)})")
    return bad


def test_every_relative_link_resolves():
    assert (ROOT / "README.md") in markdown_files()
    bad = {str(p.relative_to(ROOT)): broken_links(p) for p in markdown_files()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_link_check_catches_broken_links(tmp_path):
    (tmp_path / "repo" / "docs").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("# outside\n")
    (tmp_path / "repo" / "docs" / "design.md").write_text((ROOT / "docs" / "design.md").read_text(encoding="utf-8"))
    page = tmp_path / "repo" / "docs" / "page.md"
    page.write_text(
        "[a](missing.md) [b](design.md#1-system-model) [c](design.md#no-such-section) [d](../../outside.md)\n"
        "[e](#here) `[f](nowhere.md)`\n\n## Here\n\n```\n[g](nowhere.md)\n```\n"
    )
    assert broken_links(page, tmp_path / "repo") == [
        "missing.md (no such file in the repository)",
        "design.md#no-such-section (no heading #no-such-section in docs/design.md)",
        "../../outside.md (no such file in the repository)",
    ]


def design_sections() -> set[int]:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, re.M)}


def test_design_citations_name_existing_sections():
    sections = design_sections()
    assert set(range(12)) <= sections  # §0 layout … §11 experiments
    cited, bad = 0, []
    for path in tracked():
        for m in CITATION.finditer(path.read_text(encoding="utf-8")):
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            cited += 1
            if lo > hi or not set(range(lo, hi + 1)) <= sections:
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert cited > 10  # the docstrings do cite it
    assert bad == []


def test_no_citation_of_a_design_file_outside_the_repository():
    old_style = re.compile(r"\bDESIGN(\.md)? §")
    hits = [str(p.relative_to(ROOT)) for p in tracked() if old_style.search(p.read_text(encoding="utf-8"))]
    assert hits == []


def machine_paths() -> list[str]:
    """Strings that only a file pointing outside the repository, or written on this machine, holds."""
    found = ["../" + "shared", "/" + "work/", str(ROOT) + "/"]
    home = str(Path.home())
    if home not in ("/", ""):
        found.append(home + "/")
    return found


def test_no_tracked_file_points_outside_the_repository():
    patterns = machine_paths()
    hits = [
        f"{p.relative_to(ROOT)}: {pat}"
        for p in tracked()
        if p != Path(__file__).resolve()
        for pat in patterns
        if pat in p.read_text(encoding="utf-8")
    ]
    assert hits == []


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "## Contents" in text
    for command in ("make demo", "make test"):
        assert command in text
    linked = {t.partition("#")[0] for t in links(ROOT / "README.md")}
    docs = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert docs <= linked, f"docs not reachable from the README: {sorted(docs - linked)}"
