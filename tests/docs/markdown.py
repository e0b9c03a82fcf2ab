"""Reading the project's Markdown pages for the documentation tests: fenced blocks, sections, links, tables.

Small on purpose: the pages are written by hand in plain CommonMark (ATX headings, ``` fences, inline links,
pipe tables), so a line-based reader is enough and has no dependency.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(```|~~~)\s*([\w+-]*)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")


def pages() -> list[Path]:
    """README.md and every Markdown page of the documentation site."""
    return [README, *sorted(DOCS.rglob("*.md"))]


@dataclass
class Block:
    language: str
    code: str
    line: int  # 1-based line of the opening fence
    section: str  # the nearest heading above the block


def blocks(path: Path) -> list[Block]:
    """Fenced code blocks, each with the heading it sits under."""
    out, section, fence, lang, start, body = [], "", None, "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            m = _FENCE.match(stripped)
            if m:
                fence, lang, start, body = m.group(1), m.group(2), number, []
                continue
            h = _HEADING.match(line)
            if h:
                section = h.group(2)
        elif stripped == fence:
            out.append(Block(lang, "\n".join(body) + "\n", start, section))
            fence = None
        else:
            body.append(line)
    return out


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line outside fenced code, with code spans blanked out."""
    out, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = _FENCE.match(line.strip())
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if line.strip() == fence:
                fence = None
            continue
        out.append((number, _CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line)))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link outside code."""
    return [(n, m.group(1)) for n, text in prose_lines(path) for m in _LINK.finditer(text)]


def section_text(path: Path, heading: str) -> str:
    """The text from the heading named `heading` to the next heading of the same or a higher level."""
    lines = path.read_text(encoding="utf-8").splitlines()
    level, out = None, []
    for line in lines:
        h = _HEADING.match(line)
        if level is None:
            if h and h.group(2) == heading:
                level = len(h.group(1))
            continue
        if h and len(h.group(1)) <= level:
            break
        out.append(line)
    if level is None:
        raise AssertionError(f"{path.name} has no heading {heading!r}")
    return "\n".join(out)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of every pipe table in `text`, as lists of stripped cells (header and rule rows dropped)."""
    rows, previous_was_rule = [], False
    table: list[list[str]] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                previous_was_rule = True
                continue
            table.append(cells)
        else:
            if table and previous_was_rule:
                rows.extend(table[1:])  # the first row is the header
            table, previous_was_rule = [], False
    return rows
