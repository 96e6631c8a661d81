"""The probe's two figures, drawn from plain numbers: :func:`draw_density` and :func:`draw_js`.

Drawing a figure takes about a second, as long as the block products of a small model's probe,
so :class:`blockopt.logging.renderer.FigureRenderer` draws them in a separate process while
training goes on; this module is that process's whole program (``python figures.py`` serves
requests on its standard input, see :func:`serve`), which is why it needs only numpy and
matplotlib: no torch, nothing else from blockopt. Figures are drawn under matplotlib's default
style, whatever ``matplotlibrc`` the user has, so that no setting (``text.usetex`` runs LaTeX)
changes or breaks them.
"""

from __future__ import annotations

import io
import json
import math
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

__all__ = ["KINDS", "draw_density", "draw_js", "render", "serve"]

_HEADER = struct.Struct("<I")  # each message: its length in bytes, then the bytes


def draw_density(
    names: Sequence[str],
    grid: Sequence[float],
    matrix: Sequence[Sequence[float]],
    reasons: Mapping[str, str],
    scales: Mapping[str, float],
    spread: float,
):
    """The density heatmap: one row per block (``names``, model order) against ``log10
    |lambda|`` (``grid``), coloured by ``matrix`` (density per decade, NaN rows for the blocks
    ``reasons`` says are left out and why) on a log colour scale, a dot at each block's
    curvature scale (``scales``). A plain matplotlib ``Figure`` (no pyplot: no global state)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    names = list(names)
    grid = np.asarray(grid, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64).reshape(len(names), grid.size)
    rows = max(len(names), 1)
    label_size = 7 if rows <= 60 else 5
    labels = [n if n not in reasons else f"{n} ({reasons[n].split(':')[0]})" for n in names]
    longest = max((len(label) for label in labels), default=8) + 1  # the widest label, notes too
    left = min(0.055 * label_size * longest / 7 + 0.3, 5.0)
    width = left + 7.5
    height = min(0.16 * rows + 1.5, 40.0) if label_size == 7 else min(0.11 * rows + 1.5, 40.0)
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, 0.75 / height, 6.3 / width, 1 - 1.2 / height))
    cmap = colormaps["magma"].with_extremes(bad="0.88")
    finite = matrix[np.isfinite(matrix)]
    peak = float(finite.max()) if finite.size else 1.0
    shown = np.where(np.isfinite(matrix), np.maximum(matrix, 1e-3 * peak), np.nan)
    if grid.size:
        image = ax.imshow(
            shown,
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            norm=LogNorm(vmin=1e-3 * peak, vmax=peak),
            extent=(grid[0], grid[-1], rows - 0.5, -0.5),
        )
        colorbar = fig.colorbar(
            image, cax=fig.add_axes((1 - 0.9 / width, 0.75 / height, 0.15 / width, 0.5))
        )
        colorbar.set_label("density per decade", fontsize=8)
        colorbar.ax.tick_params(labelsize=7)
        ys = [r for r, n in enumerate(names) if scales.get(n, 0.0) > 0]
        xs = [math.log10(scales[names[r]]) for r in ys]
        ax.scatter(xs, ys, s=6, color="white", edgecolors="none", zorder=3)
        decades = range(math.ceil(grid[0]), math.floor(grid[-1]) + 1)
        ax.set_xticks(list(decades), [f"1e{d}" for d in decades], fontsize=7)
    ax.set_yticks(range(len(names)), labels, fontsize=label_size)
    for tick, name in zip(ax.get_yticklabels(), names):
        if name in reasons:
            tick.set_color("0.45")
    ax.set_xlabel("|eigenvalue| of the diagonal Hessian block (log scale)", fontsize=8)
    ax.set_title(
        f"Blockwise Hessian spectra: spread {spread:.2f} decades\n"
        "one row per block, SLQ density smoothed 0.1 decade; dot: the block's curvature scale",
        fontsize=9,
        loc="left",
    )
    return fig


def draw_js(
    blocks: Sequence[str],
    scales: Sequence[float],
    js_matrix: Sequence[Sequence[float]],
    js: float,
):
    """Heatmap of the pairwise Jensen-Shannon distances ``js_matrix`` between ``blocks``,
    ordered from the stiffest to the flattest by ``scales`` (blocks of similar scale and shape
    form dark squares on the diagonal). Rows are labelled ``index name (scale)`` and columns by
    index; the figure grows with the number of blocks so that labels stay readable; values are
    printed in the cells when there are few blocks; ``js`` is the mean, for the title."""
    from matplotlib.figure import Figure

    n = len(blocks)
    order = sorted(range(n), key=lambda i: -scales[i])
    matrix = np.asarray(js_matrix, dtype=np.float64).reshape(n, n)[np.ix_(order, order)]
    side = min(max(0.2 * n, 3.0), 20.0)
    font = min(max(0.55 * 72 * side / max(n, 1), 4.0), 9.0)
    labels = [f"{k} {blocks[i]} ({scales[i]:.1e})" for k, i in enumerate(order)]
    label_width = max((len(t) for t in labels), default=0) * font * 0.62 / 72 + 0.3
    width, height = max(side + label_width + 1.3, 6.0), side + 1.2
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((label_width / width, 0.45 / height, side / width, side / height))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
    ax.set_xticks(range(n), [str(k) for k in range(n)], fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.tick_params(length=2, pad=1)
    if n <= 12:
        for r in range(n):
            for c in range(n):
                v = matrix[r, c]
                color = "white" if v < 0.6 else "black"
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.suptitle(
        f"Pairwise JS distance between block densities (mean {js:.2f})\n"
        "blocks ordered by curvature scale, stiffest first",
        fontsize=10,
        y=1 - 0.08 / height,
    )
    cax = fig.add_axes(
        ((label_width + side + 0.25) / width, 0.45 / height, 0.2 / width, side / height)
    )
    fig.colorbar(image, cax=cax).ax.tick_params(labelsize=8)
    return fig


KINDS: dict[str, Callable[..., Any]] = {"densities": draw_density, "js_matrix": draw_js}
"""The figures by name: each takes its drawing function's arguments as keywords."""


def render(kind: str, arguments: Mapping[str, Any], fmt: str = "png", dpi: float = 100) -> bytes:
    """Draw figure ``kind`` (a key of :data:`KINDS`) from ``arguments`` and return it encoded
    as ``fmt`` ("png", "svg", "pdf", ...), under matplotlib's default style."""
    import matplotlib.style

    with matplotlib.style.context("default"):
        figure = KINDS[kind](**arguments)
        out = io.BytesIO()
        figure.savefig(out, format=fmt, dpi=dpi)
    return out.getvalue()


def write_message(stream: BinaryIO, data: bytes) -> None:
    """Send one message: its length, then its bytes."""
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_message(stream: BinaryIO) -> bytes | None:
    """Receive one message, or ``None`` at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    return data if len(data) == size else None


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Draw figures until the end of ``requests``: each request is a JSON object ``{"id",
    "kind", "arguments", "format", "dpi"}``; each reply a JSON header ``{"id", "error"}`` (the
    error is ``null`` or a one-line description) followed by a message with the encoded figure
    (empty on error)."""
    while (message := read_message(requests)) is not None:
        request = json.loads(message)
        try:
            data = render(request["kind"], request["arguments"], request["format"], request["dpi"])
            error = None
        except Exception as err:  # report it; the parent warns and goes on
            data, error = b"", f"{type(err).__name__}: {err}"
        write_message(replies, json.dumps({"id": request["id"], "error": error}).encode())
        write_message(replies, data)


if __name__ == "__main__":
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed goes to stderr, never into the replies
    serve(sys.stdin.buffer, replies)
