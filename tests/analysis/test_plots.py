"""Plots: atomic PNG writes, token labels; importing reftkit (and its analyses) never imports matplotlib."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from reftkit.analysis.plots import heatmap, heatmaps, line_plot


def test_import_stays_light():
    code = ("import sys, reftkit, reftkit.analysis\n"
            "from reftkit.analysis import causal_trace, activation_patching, probe_layers, matrix_entropy\n"
            "import reftkit.cli\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pngs_are_written_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    grid = torch.rand(4, 6)
    path = heatmap(grid, tmp_path / "sub" / "h.png", tokens=list("abcdef"), marked=(1, 3), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heatmaps({"x": grid, "y": -grid}, tmp_path / "sub" / "two.png", center_zero=True)
    line_plot({"a": [0.1, 0.5, 0.9]}, tmp_path / "sub" / "line.png")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["h.png", "line.png", "two.png"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_pngs_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    pytest.importorskip("matplotlib")
    previous = os.umask(umask)
    try:
        path = heatmap(torch.rand(2, 3), tmp_path / f"h{umask:o}.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
