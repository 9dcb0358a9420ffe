"""The documentation's links hold: every relative link in README.md and docs/*.md points at a
file that exists, every anchor at a heading of its page, and the README stays a front page.

No model, no imports of the project: the Markdown is read as text. Anchors follow GitHub's
rule (lowercase; punctuation but ``-`` and ``_`` dropped; spaces to ``-``; a repeated heading
gets ``-1``, ``-2``, ...). Links and headings inside fenced code blocks and inline code spans
do not count; ``http(s)://`` and ``mailto:`` links are not checked (no network in tests).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, each with its inline code spans blanked."""
    out, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"^\s*(```|~~~)", line)
        if marker:
            if fence is None:
                fence = marker.group(1)
            elif marker.group(1) == fence:
                fence = None
            out.append("")
            continue
        out.append("" if fence else line)
    return out


def strip_code_spans(line: str) -> str:
    return re.sub(r"(`+)(.+?)\1", lambda m: m.group(1) + "x" * len(m.group(2)) + m.group(1), line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and _
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every link and image in ``path``'s prose."""
    found = []
    for number, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), 1):
        for m in LINK.finditer(strip_code_spans(line)):
            found.append((number, m.group(1)))
    return found


def broken(path: Path) -> list[str]:
    """Every relative link of ``path`` whose file or anchor does not exist, as ``line: target (why)``."""
    bad = []
    for number, target in links(path):
        if target.startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            bad.append(f"{where} (no such file)")
        elif ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{where} (outside the repository)")
        elif anchor:
            if dest.suffix != ".md":
                bad.append(f"{where} (an anchor into a file that is not Markdown)")
            elif unquote(anchor) not in anchors(dest):
                bad.append(f"{where} (no heading with this anchor in {dest.relative_to(ROOT)})")
    return bad


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    assert not broken(path), "\n".join(broken(path))


def test_the_readme_fits_on_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"
    )


def test_every_docs_page_is_linked_from_the_readme():
    targets = {
        (ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md") if not t.startswith(EXTERNAL)
    }
    missing = [p.name for p in PAGES[1:] if p.resolve() not in targets]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize(
    "heading, anchor",
    [
        ("Quick start", "quick-start"),
        ("One machine: `--stages N`", "one-machine---stages-n"),
        ("Heads per setting (defaults that never lose)", "heads-per-setting-defaults-that-never-lose"),
        (
            "Devices: dtype and the compiled step (1 stage, 1 thread)",
            "devices-dtype-and-the-compiled-step-1-stage-1-thread",
        ),
        ("Early exit (AdaDecode)", "early-exit-adadecode"),
        (
            "Pipeline (2 ranks, 1 thread each, pinned one per core)",
            "pipeline-2-ranks-1-thread-each-pinned-one-per-core",
        ),
        ("runtime/", "runtime"),
        ("Simulator: calibration", "simulator-calibration"),
    ],
)
def test_slugs_follow_githubs_rule(heading, anchor):
    assert slug(heading) == anchor


def test_the_checker_finds_what_is_broken(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Two words\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n[ok](docs/a.md) [ok](docs/a.md#two-words) [ok](#top) [web](https://example.com/x)\n"
        "[gone](docs/b.md) [no anchor](docs/a.md#three) [self](#nowhere)\n"
        "`[in code](docs/c.md)`\n\n```\n[in a fence](docs/d.md)\n# not a heading\n```\n"
    )
    found = broken(page)
    assert [f.split(": ", 1)[1].split(" (")[0] for f in found] == ["docs/b.md", "docs/a.md#three", "#nowhere"]
