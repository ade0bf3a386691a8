"""Every relative link in README.md and docs/*.md points at a file that exists, and every ``#anchor`` at a heading.

Links are Markdown inline links and images, ``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``, and
reference definitions ``[label]: path``, outside fenced code blocks and inline code. Absolute URLs
(``https:``, ``mailto:``...) are not fetched. An anchor into a Markdown file must be the GitHub slug of one of its
headings (or an HTML ``id``/``name``): lower case, punctuation other than ``-`` and ``_`` dropped, spaces to ``-``,
``-1``, ``-2``... for repeated headings.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
HTML_ID = re.compile(r"""<[^>]+\b(?:id|name)\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links in code are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (as rendered: code, emphasis and link syntax removed)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers, not snake_case underscores
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file offers: its headings' slugs (repeats numbered) and HTML ids/names."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in HEADING.finditer(text):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(HTML_ID.findall(text))
    return found


def links(path: Path) -> list[str]:
    """Every link target in a Markdown file, in order."""
    text = strip_code(path.read_text(encoding="utf-8"))
    return [m.group(2) for m in INLINE_LINK.finditer(text)] + REFERENCE_DEF.findall(text)


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file is missing or whose anchor is no heading there, with why."""
    problems = []
    for target in links(path):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.is_file() and dest.suffix.lower() == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_every_relative_link_resolves(path):
    assert links(path) or path.name != "README.md", "no links found in README.md: the parser is broken"
    problems = broken_links(path)
    assert not problems, f"broken links in {path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md") if t.startswith("docs/")}
    assert not [p.name for p in FILES[1:] if p.resolve() not in linked], "docs pages the README does not link"


# The checker itself: it must fail on a broken link.
@pytest.mark.parametrize("heading, expected", [
    ("Speed: `fused_feat_loss` on a 2-core CPU", "speed-fused_feat_loss-on-a-2-core-cpu"),
    ("The demo: does DreamTeacher help here?", "the-demo-does-dreamteacher-help-here"),
    ("GAN / generator teachers", "gan--generator-teachers"),
    ("Latent teachers' text conditioning", "latent-teachers-text-conditioning"),
    ("Demo schedule (`bench_demo_schedule.py`)", "demo-schedule-bench_demo_schedulepy"),
    ("The **bold** [linked](x.md) part", "the-bold-linked-part"),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def test_the_checker_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A section\n\n## A section\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [ok](docs/page.md#a-section) [ok](docs/page.md#a-section-1) [ok](#top)\n"
        "[web](https://example.com/missing.md) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "# Top\n"
        "[gone](docs/missing.md) ![picture\nover two lines](docs/missing.png) [bad anchor](docs/page.md#nope)\n"
        "[ref]: docs/also-missing.md\n")
    assert [p.split(":")[0] for p in broken_links(readme)] == [
        "docs/missing.md", "docs/missing.png", "docs/page.md#nope", "docs/also-missing.md"]
