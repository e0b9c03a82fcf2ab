"""Heatmaps of analysis grids, written as PNG files.

Decisions:
- matplotlib is imported here only, when a plot is asked for (it is the optional `[plot]` extra), and through
  its object API (`Figure` + the Agg canvas): no pyplot, so no global figure state and no display backend.
- A PNG is written to a temporary file beside its destination and renamed into place, so a crash never leaves a
  truncated image under the final name. The file gets the mode a plain `open` would give it (0666 less the
  umask, usually 0644), not the private 0600 of the temporary file.
- Grids are `[layer, position]`; the plot puts tokens on the vertical axis (top to bottom, as they are read)
  and layers on the horizontal axis, as in the causal-tracing figures of Meng et al. (2022). A marked token
  range (the subject) gets a `*` after its labels.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import MissingDependencyError


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("plots need matplotlib; install it with pip install 'reftkit[plot]'") from exc
    return Figure, FigureCanvasAgg


def save_png(figure, path: "str | os.PathLike") -> Path:
    """Write a matplotlib `Figure` to `path` atomically."""
    _, canvas_class = _matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_class(figure)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=figure.dpi, bbox_inches="tight")
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes a private file; give it the mode a plain open would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _labels(tokens, n: int, marked: "tuple[int, int] | None") -> list[str]:
    labels = list(tokens) if tokens is not None else [str(i) for i in range(n)]
    if len(labels) != n:
        labels = [str(i) for i in range(n)]
    out = []
    for i, label in enumerate(labels):
        label = repr(label)[1:-1] if isinstance(label, str) else str(label)
        out.append(f"{label}*" if marked is not None and marked[0] <= i < marked[1] else label)
    return out


def _draw(ax, grid: torch.Tensor, tokens, title: str, colorbar: str, cmap: str, marked, layers, center_zero):
    grid = torch.as_tensor(grid, dtype=torch.float32).detach().cpu()
    data = grid.T.numpy()  # [position, layer]
    kwargs = {}
    if center_zero:
        bound = float(grid.abs().max()) or 1.0
        kwargs = {"vmin": -bound, "vmax": bound}
    image = ax.imshow(data, cmap=cmap, aspect="auto", interpolation="nearest", **kwargs)
    n_pos, n_layers = data.shape
    ax.set_yticks(range(n_pos))
    ax.set_yticklabels(_labels(tokens, n_pos, marked))
    layer_ids = list(layers) if layers is not None else list(range(n_layers))
    step = max(1, n_layers // 10)
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xticklabels([str(layer_ids[i]) for i in range(0, n_layers, step)])
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=10)
    bar = ax.figure.colorbar(image, ax=ax)
    bar.set_label(colorbar)


def heatmap(grid, path, *, tokens=None, title: str = "", colorbar: str = "", cmap: str = "Purples",
            marked: "tuple[int, int] | None" = None, layers=None, center_zero: bool = False) -> Path:
    """One `[layer, position]` grid as a PNG heatmap; returns the path written."""
    figure_class, _ = _matplotlib()
    grid = torch.as_tensor(grid)
    n_pos = grid.shape[1]
    fig = figure_class(figsize=(max(4.0, 0.22 * grid.shape[0] + 2.5), max(2.5, 0.32 * n_pos + 1.2)), dpi=110)
    _draw(fig.add_subplot(1, 1, 1), grid, tokens, title, colorbar, cmap, marked, layers, center_zero)
    return save_png(fig, path)


def heatmaps(grids: dict, path, *, tokens=None, titles: dict | None = None, colorbar: str = "",
             cmaps: dict | None = None, marked=None, layers=None, center_zero: bool = False) -> Path:
    """Several `[layer, position]` grids side by side in one PNG (one panel per key of `grids`)."""
    figure_class, _ = _matplotlib()
    n = len(grids)
    first = torch.as_tensor(next(iter(grids.values())))
    width = max(3.5, 0.14 * first.shape[0] + 2.2)
    fig = figure_class(figsize=(width * n, max(2.8, 0.34 * first.shape[1] + 1.6)), dpi=110)
    for k, (name, grid) in enumerate(grids.items()):
        ax = fig.add_subplot(1, n, k + 1)
        cmap = (cmaps or {}).get(name, "Purples")
        _draw(ax, grid, tokens if k == 0 else None, (titles or {}).get(name, name), colorbar, cmap, marked, layers,
              center_zero)
        if k:
            ax.set_yticklabels([])
    return save_png(fig, path)


def line_plot(series: dict, path, *, xlabel: str = "layer", ylabel: str = "", title: str = "") -> Path:
    """Curves `{name: [values]}` over a shared x axis (e.g. per-layer probe accuracy)."""
    figure_class, _ = _matplotlib()
    fig = figure_class(figsize=(6, 3.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in series.items():
        values = torch.as_tensor(values, dtype=torch.float32).cpu().tolist()
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path)
