"""The documentation pages hold together: links point at files, code blocks compile, every `reftkit` command
line parses with the real parser, and the API pages cover the public names and modules."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import reftkit
from reftkit.cli import build_parser

from .markdown import DOCS, ROOT, blocks, links, pages, table_rows

# the modules whose API the reference must render (the command line has its own page, docs/cli.md)
NOT_API = ("reftkit.cli", "reftkit.__main__")  # the command line has its own page (docs/cli.md)


def public_modules() -> set[str]:
    """Every module of the package except the command line's."""
    found = set()
    for path in (ROOT / "src" / "reftkit").rglob("*.py"):
        parts = path.relative_to(ROOT / "src").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_API):
            found.add(name)
    return found


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path):
    broken = []
    for line, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(f"{page.name}:{line}: {target}")
    assert not broken


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_compile(page: Path):
    for block in blocks(page):
        if block.language == "python":
            compile(block.code, f"{page.name}:{block.line}", "exec")


def command_lines(page: Path) -> list[tuple[int, str]]:
    out = []
    for block in blocks(page):
        if block.language not in ("bash", "sh", "shell"):
            continue
        lines = block.code.replace("\\\n", " ").splitlines()
        for offset, line in enumerate(lines):
            if line.split()[:1] in (["reftkit"], [".venv/bin/reftkit"]):
                out.append((block.line + 1 + offset, shlex.split(line, comments=True)))
    return out


@pytest.mark.parametrize("page", [p for p in pages() if command_lines(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_command_lines_parse(page: Path):
    parser = build_parser()
    for line, words in command_lines(page):
        try:
            parser.parse_args(words[1:])
        except (SystemExit, Exception) as e:  # argparse exits, reftkit's parser raises
            pytest.fail(f"{page.name}:{line}: `{' '.join(words)}` does not parse: {e!r}")


def test_api_overview_lists_the_top_level_exports():
    text = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    listed = {}
    for cells in table_rows(text):
        m = re.fullmatch(r"\[`(\w+)`\]\[([\w.]+)\]", cells[0])
        if m:
            listed[m.group(1)] = cells[1].strip("`")
    assert listed == reftkit._EXPORTS


def test_api_sections_name_existing_modules_and_cover_the_public_ones():
    sections = [name for page in sorted((DOCS / "api").glob("*.md"))
                for name in re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), flags=re.M)]
    twice = sorted({name for name in sections if sections.count(name) > 1})
    assert not twice, f"modules rendered more than once in docs/api/: {twice}"
    documented = set(sections)
    src = ROOT / "src"
    modules = set()
    for path in (src / "reftkit").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    stale = sorted(documented - modules)
    assert not stale, f"API sections for modules that do not exist: {stale}"
    public = public_modules()
    assert {"reftkit.engine", "reftkit.steer.vector", "reftkit.serve.app"} <= public and "reftkit.cli" not in public
    missing = sorted(public - documented)
    assert not missing, f"public modules without an API section in docs/api/: {missing}"


def test_griffe_extension_keeps_code_and_adds_blank_lines_before_lists():
    pytest.importorskip("griffe", reason="the docs extra is not installed (make docs installs it)")
    spec = importlib.util.spec_from_file_location("breakless_lists", DOCS / "_griffe" / "breakless_lists.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    separate = module.separate_lists
    assert separate("Decisions:\n- a\n  b\n- c") == "Decisions:\n\n- a\n  b\n- c"
    assert separate("x\n```\ny:\n- 1\n```") == "x\n```\ny:\n- 1\n```"
    assert separate("text\n\n- a") == "text\n\n- a"
