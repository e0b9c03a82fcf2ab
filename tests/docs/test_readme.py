"""The README's examples run and print what the README says, and its glossary names exactly what the code has."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from reftkit.archs import CANONICAL_COMPONENTS
from reftkit.interventions import REGISTRY
from reftkit.positions import Positions

from .markdown import README, blocks, section_text, table_rows

EXPECTED = re.compile(r"^\s*# expected: ?(.*)$")


def python_blocks(section: str) -> list[str]:
    found = [b.code for b in blocks(README) if b.language == "python" and b.section == section]
    assert found, f"README.md has no python block under {section!r}"
    return found


def run_and_compare(section: str) -> None:
    """Run the section's python blocks in one namespace; its printed lines must be the `# expected:` lines."""
    codes = python_blocks(section)
    expected = [m.group(1).rstrip() for code in codes for line in code.splitlines() if (m := EXPECTED.match(line))]
    out = io.StringIO()
    namespace: dict = {"__name__": "__readme__"}
    with contextlib.redirect_stdout(out):
        for code in codes:
            exec(compile(code, f"README.md ({section})", "exec"), namespace)
    assert [line.rstrip() for line in out.getvalue().splitlines()] == expected


@pytest.mark.real_model
def test_quickstart_runs_and_prints_what_the_readme_says():
    run_and_compare("Quickstart")


def test_binding_example_runs_and_prints_what_the_readme_says():
    run_and_compare("Building and binding an intervention")


def test_glossary_lists_every_canonical_component_once():
    text = section_text(README, "Glossary")
    listed = [name for row in table_rows(text) for name in re.findall(r"`([a-z_]+)`", row[0])
              if name in CANONICAL_COMPONENTS or name.endswith(("_output", "_input", "_activation"))]
    assert sorted(listed) == sorted(CANONICAL_COMPONENTS)


def test_glossary_lists_exactly_the_registered_intervention_names():
    text = section_text(README, "Glossary")
    lines = text[text.index("The registry names"):].split("\n\n")[1].splitlines()  # the list after that sentence
    items = [line for line in lines if line.startswith("- ")]
    for line in lines:
        if line.startswith("  "):
            items[-1] += line  # a wrapped item
    assert len(items) == 4, items
    listed = [name for line in items for name in re.findall(r"`([a-z_]+)`", line.partition(":")[2])]
    assert len(listed) == len(set(listed)), "a name is listed twice"
    assert sorted(listed) == sorted(REGISTRY)


def _resolve(spec: str, n_tokens: int, pad: int = 0) -> list[str]:
    """The tokens `spec` selects in a row of `n_tokens` real tokens (left-padded by `pad`), as 't0 t1 ...'."""
    mask = torch.tensor([[False] * pad + [True] * n_tokens])
    located = Positions.parse(spec).resolve(mask)
    picked = sorted({int(i) - pad for i, ok in zip(located.index[0], located.valid[0]) if ok})
    return [f"t{i}" for i in picked]


def test_positions_examples_select_what_the_glossary_says():
    text = section_text(README, "Glossary")
    checked = 0
    for row in table_rows(text):
        specs = re.findall(r'`"([^"`]+)"`', row[0])
        tokens = row[1].strip("`")
        if not specs or not re.fullmatch(r"t\d+( (t\d+|\.\.\.))*", tokens):
            continue
        if "..." in tokens:
            first, last = tokens.split(" ... ")
            tokens = " ".join(f"t{i}" for i in range(int(first[1:]), int(last[1:]) + 1))
        for spec in specs:
            for pad in (0, 3):  # left padding selects the same real tokens
                assert " ".join(_resolve(spec, 6, pad)) == tokens, (spec, pad)
            checked += 1
    assert checked >= 6
    # the clamping rule's worked example in prose
    m = re.search(r"`(f\d+\+l\d+)` on a (\d+)-token row selects `([t\d ]+)`", text)
    assert m, "the glossary's clamping example is missing"
    assert " ".join(_resolve(m.group(1), int(m.group(2)))) == m.group(3)
