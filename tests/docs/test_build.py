"""`mkdocs build --strict` passes: the pages and the API reference render without a single warning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .markdown import ROOT

pytest.importorskip("mkdocs", reason="the docs extra is not installed (make docs installs it)")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed (make docs installs it)")


def test_mkdocs_build_strict_has_no_warnings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    warnings = [line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert result.returncode == 0 and not warnings, result.stderr[-4000:]
    assert (tmp_path / "api" / "engine.html").is_file()
