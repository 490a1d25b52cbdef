"""The README and docs/ hold together: links and anchors resolve, every setting is documented.

No network and no servers: the Markdown files and ``describer/settings.py`` are read as text.
Anchors are computed the way GitHub computes them for headings, so a link that passes here
lands on the heading it names when the page is read on GitHub.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SETTINGS_PY = ROOT / "describer" / "settings.py"
SETTINGS_MD = DOCS / "settings.md"
DOC_FILES = (
    ROOT / "README.md",
    *sorted(DOCS.glob("*.md")),
    ROOT / "bench" / "README.md",
    ROOT / "deploy" / "README.md",
)

# What the front door may hold (STYLE.md point 13, issue 17).
README_MAX_LINES = 200
README_FIRST_SCREEN = 30

# The settings reader's methods, and the fewest names a working parser finds (there are ~37).
READER_METHODS = frozenset({"text", "flag", "integer", "number"})
MIN_SETTINGS_FOUND = 25

# Links that leave the repository are not checked: no network in the tests.
_EXTERNAL = re.compile(r"^(?:https?|mailto):", re.IGNORECASE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
# The "](target)" of an inline link or image, with an optional title; nested images included.
_INLINE_TARGET = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?")
_HTML_TARGET = re.compile(r"\b(?:href|src)=\"([^\"]+)\"")


@dataclass(frozen=True)
class Link:
    """One link or image target, and where it was written."""

    doc: Path
    line: int
    target: str

    def where(self) -> str:
        """The link's place, as `path:line: target`, for failure messages."""
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {self.target}"


def prose_lines(doc: Path) -> list[tuple[int, str]]:
    """The lines of a Markdown file outside fenced code blocks, numbered from 1."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
        else:
            lines.append((number, line))
    return lines


def links(doc: Path) -> list[Link]:
    """Every link and image target in a Markdown file, leaving out code blocks and code spans."""
    found: list[Link] = []
    for number, line in prose_lines(doc):
        text = _CODE_SPAN.sub("", line)
        for pattern in (_INLINE_TARGET, _REFERENCE_DEFINITION, _HTML_TARGET):
            found.extend(Link(doc, number, m.group(1)) for m in pattern.finditer(text))
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub derives from a heading's text, before duplicates are numbered."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text, not its target
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and underscores
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered -1, -2… as GitHub does."""
    occurrences: dict[str, int] = {}
    for _, line in prose_lines(doc):
        heading = _HEADING.match(line)
        if heading is None:
            continue
        slug = base = github_slug(heading.group(2))
        while slug in occurrences:  # github-slugger's numbering
            occurrences[base] += 1
            slug = f"{base}-{occurrences[base]}"
        occurrences[slug] = 0
    return set(occurrences)


def broken(link: Link) -> str | None:
    """Why a relative link does not resolve, or None when it lands on a file and heading."""
    path_part, _, fragment = link.target.partition("#")
    path_part = unquote(path_part)
    if not path_part:
        target = link.doc
    elif path_part.startswith("/"):
        target = ROOT / path_part.lstrip("/")
    else:
        target = link.doc.parent / path_part
    target = target.resolve()
    if not target.is_relative_to(ROOT):
        return f"{link.where()}: points outside the repository"
    if not target.exists():
        return f"{link.where()}: no such file {target.relative_to(ROOT)}"
    if fragment:
        if target.suffix != ".md":
            return f"{link.where()}: an anchor into a file that is not Markdown"
        if unquote(fragment) not in anchors(target):
            return f"{link.where()}: no heading #{fragment} in {target.relative_to(ROOT)}"
    return None


def settings_variables() -> set[str]:
    """The environment variables describer/settings.py reads, found in its syntax tree."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(SETTINGS_PY.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not isinstance(owner, ast.Name):
            continue
        reads = (owner.id == "reader" and node.func.attr in READER_METHODS) or (
            owner.id == "env" and node.func.attr == "get"
        )
        first = node.args[0] if node.args else None
        if reads and isinstance(first, ast.Constant) and isinstance(first.value, str):
            names.add(first.value)
    return names


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    """Every relative link and image in the file reaches an existing file and heading."""
    relative = [link for link in links(doc) if not _EXTERNAL.match(link.target)]
    failures = [reason for reason in map(broken, relative) if reason]
    assert not failures, "broken links:\n" + "\n".join(failures)


def test_docs_index_lists_every_page() -> None:
    """docs/README.md links every other page under docs/, so the index is the table of contents."""
    index = DOCS / "README.md"
    listed = {(index.parent / link.target.partition("#")[0]).resolve() for link in links(index)}
    pages = {page.resolve() for page in DOCS.glob("*.md")} - {index.resolve()}
    missing = sorted(page.name for page in pages - listed)
    assert not missing, f"pages missing from docs/README.md: {', '.join(missing)}"


def test_readme_is_a_front_door() -> None:
    """The README stays short and shows `make demo` on its first screen."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    first_screen = "\n".join(lines[:README_FIRST_SCREEN])
    assert "make demo" in first_screen, (
        f"`make demo` is not in README.md's first {README_FIRST_SCREEN} lines"
    )


def test_every_setting_is_documented() -> None:
    """Every environment variable describer/settings.py reads has a row of its own in the
    settings table of docs/settings.md: named in a row's first cell, not just mentioned."""
    names = settings_variables()
    assert len(names) >= MIN_SETTINGS_FOUND, f"found only {sorted(names)} in {SETTINGS_PY}"
    first_cells = " ".join(
        line.split("|")[1]
        for line in SETTINGS_MD.read_text(encoding="utf-8").splitlines()
        if line.startswith("|") and line.count("|") >= 3
    )
    missing = sorted(
        name for name in names if not re.search(rf"\b{re.escape(name)}\b", first_cells)
    )
    assert not missing, f"read by describer/settings.py, absent from docs/settings.md: {missing}"


def test_github_slug_matches_github() -> None:
    """The anchor rules match GitHub's on this project's kinds of heading, duplicates included."""
    assert (
        github_slug("Large batches: sharding and backfill") == "large-batches-sharding-and-backfill"
    )
    assert github_slug("describe_gcs (object finalized)") == "describe_gcs-object-finalized"
    assert github_slug("The Gemini budget: `--gemini-max-in-flight`") == (
        "the-gemini-budget---gemini-max-in-flight"
    )
    assert github_slug("Roles, and why each") == "roles-and-why-each"


def test_duplicate_headings_are_numbered(tmp_path: Path) -> None:
    """A repeated heading gets -1, -2… and headings inside code blocks get no anchor."""
    page = tmp_path / "page.md"
    page.write_text("# Logs\n\n## Logs\n\n```\n# Logs\n```\n\n### Logs ##\n", encoding="utf-8")
    assert anchors(page) == {"logs", "logs-1", "logs-2"}


def test_links_in_code_are_not_links(tmp_path: Path) -> None:
    """Links in code blocks and code spans are skipped, and images count as links."""
    page = tmp_path / "page.md"
    page.write_text(
        "`[a](missing.md)`\n\n```sh\n[b](missing.md)\n```\n\n![c](pic.png) and [d](x.md#y)\n",
        encoding="utf-8",
    )
    assert [link.target for link in links(page)] == ["pic.png", "x.md#y"]
