"""The steering page's example runs and prints what the page says."""

from __future__ import annotations

import contextlib
import io

from .markdown import ROOT, blocks
from .test_readme import EXPECTED

PAGE = ROOT / "docs" / "steering.md"


def test_steering_example_runs_and_prints_what_the_page_says(tmp_path, monkeypatch):
    codes = [b.code for b in blocks(PAGE) if b.language == "python"]
    assert codes, "docs/steering.md has no python block"
    expected = [m.group(1).rstrip() for code in codes for line in code.splitlines() if (m := EXPECTED.match(line))]
    monkeypatch.chdir(tmp_path)  # the example saves its vector under runs/
    out = io.StringIO()
    namespace: dict = {"__name__": "__steering_page__"}
    with contextlib.redirect_stdout(out):
        for code in codes:
            exec(compile(code, "docs/steering.md", "exec"), namespace)
    assert [line.rstrip() for line in out.getvalue().splitlines()] == expected
    assert (tmp_path / "runs" / "steer-doc" / "positive" / "vector_config.json").is_file()
