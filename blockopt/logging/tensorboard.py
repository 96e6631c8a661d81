"""What blockopt writes to TensorBoard at every probe, and how.

Scalars (TensorBoard groups charts by the part of the tag before ``/``; the top-level section
``blockopt`` holds a handful of charts, one point per probe):

- ``blockopt/score``, ``blockopt/max_ratio``, ``blockopt/js``: the heterogeneity score and its
  companions; ``blockopt/mode``: 0 = sgd, 1 = block_sgd, 2 = adam;
  ``blockopt/probe_seconds``, ``blockopt/probe_hvps``, ``blockopt/probe_share``: the probe's cost
  and the share of training wall time spent probing so far (``BlockOptimizer.probe_share``,
  which its ``probe_budget`` bounds); ``blockopt/lr_max``, ``blockopt/lr_min``: the largest and
  smallest learning rate applied to a block with real curvature; ``blockopt.mode_lr/<mode>``:
  each mode's learning rate (``BlockOptimizer.mode_lrs``), in a section of its own.
- ``blockopt.lambda_max/<block>``, ``blockopt.lr/<block>``: per block, its largest Ritz value
  and the learning rate in effect, in two sections of their own below ``blockopt``, and only
  for the blocks the score includes: blocks of negligible curvature (round-off, e.g. an
  attention key bias at 1e-10) or unknown curvature (``Heterogeneity.excluded``) are left out
  (``all_blocks=True`` logs them too).

Histograms: ``blockopt/log10_scale``, the included blocks' curvature scales (log10, one count
per block, quarter-decade buckets: the Distributions tab shows the spread across probes), and
``blockopt.density/<block>`` per included block, its Ritz values weighted by their SLQ weights
(times the block size, so bucket counts read as numbers of eigenvalues; the histogram's ``min``
and ``sum`` are the block's smallest Ritz value and trace).

Images: ``blockopt/densities``, a heatmap with one row per block in model order (named; the
blocks the score leaves out grey and marked) against ``log10 |lambda|``, coloured by the SLQ
density per decade, with a dot at each block's curvature scale, and ``blockopt/js_matrix``,
the pairwise Jensen-Shannon distances, blocks ordered by curvature scale and labelled (up to
``JS_MAX_BLOCKS`` included blocks, beyond which its labels could not be read).
Text: ``blockopt/summary``, one table per probe with every block's exact values (left-out ones
last, with the reason), and ``blockopt/switches``, an entry at every switch with the reason.

A custom-scalars layout puts the overview first, then for ``lambda_max`` and ``lr`` one chart
of the stiffest and flattest few blocks and one chart per module (a handful of lines each);
:meth:`TensorBoardLogger.close` writes the run's hyperparameters and final metrics to the
HParams tab. Any failure of the writer (an unwritable directory, a full disk) gives one warning
and turns logging off: training goes on. Under ``torch.distributed`` only rank 0 writes.

Smoothing: the probe-by-probe series have one point per probe, often only a few, and
TensorBoard's default smoothing (0.6, an exponential moving average drawn as the bold line)
bends them towards their first values. ``blockopt.train/<name>`` therefore repeats the current
score, mode, switch count, probe share and applied learning rate every ``LOG_EVERY`` (10)
training steps, a dense series that smoothing leaves readable; set the "Smoothing" slider to 0
for the per-probe charts, or read their exact values in the ``blockopt/summary`` text.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blockopt.analysis.heterogeneity import Heterogeneity
from blockopt.curvature.spectra import BlockSpectrum, Spectra
from blockopt.logging import figures
from blockopt.logging.renderer import FigureJob, FigureRenderer, shared_renderer
from blockopt.optimizer.policy import MODES, Decision

__all__ = [
    "ProbeCost",
    "TensorBoardLogger",
    "block_groups",
    "density_figure",
    "density_matrix",
    "histogram_buckets",
    "js_figure",
    "summary_text",
    "tensorboard_server",
]

HISTOGRAM_BUCKETS = 64
QUANTITIES = ("lambda_max", "lr")
"""The per-block scalars, logged for the blocks the score includes."""
EXTREMES = 3
"""The custom-scalars chart of the extremes shows this many stiffest and flattest blocks."""
SCALE_BUCKET = 0.25
# The density heatmap: columns along log10 |lambda|, and the Gaussian smoothing in decades.
DENSITY_COLUMNS = 300
# The JS matrix figure is drawn up to this many blocks: at 20 inches a side, 0.08 in a row.
JS_MAX_BLOCKS = 250
DENSITY_SMOOTHING = 0.1
"""Width in decades of the buckets of the ``blockopt/log10_scale`` histogram."""


@dataclass(frozen=True)
class ProbeCost:
    """What one probe cost: wall seconds (its learning-rate search included), Hessian-vector
    products, and the share of training wall time spent probing so far (all probes, failed ones
    and searches included, in [0, 1]: ``BlockOptimizer.probe_share``)."""

    seconds: float
    hvps: int
    share: float


def histogram_buckets(
    spectrum: BlockSpectrum, buckets: int = HISTOGRAM_BUCKETS
) -> tuple[list[float], list[float]]:
    """Right bucket edges and weighted counts of the block's Ritz values: counts are SLQ weights
    times ``numel`` (estimated numbers of eigenvalues per bucket), summing to ``numel``."""
    values = np.asarray(spectrum.ritz_values, dtype=np.float64)
    weights = np.asarray(spectrum.ritz_weights, dtype=np.float64) * spectrum.numel
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return [hi], [float(weights.sum())]
    edges = np.linspace(lo, hi, buckets + 1)
    index = np.clip(np.searchsorted(edges, values, side="left") - 1, 0, buckets - 1)
    counts = np.bincount(index, weights=weights, minlength=buckets)
    return [float(e) for e in edges[1:]], [float(c) for c in counts]


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except (ImportError, RuntimeError):
        pass
    return 0


class TensorBoardLogger:
    """Writes blockopt's probes and decisions to TensorBoard.

    Give either ``logdir`` (a ``SummaryWriter`` is created there, and closed by :meth:`close`)
    or ``writer`` (your own ``SummaryWriter``, e.g. Lightning's ``logger.experiment``; it is
    flushed, not closed). ``figures=False`` skips the matplotlib figures. They are drawn in a
    separate process (:mod:`blockopt.logging.renderer`) while training goes on, and written at
    the next call that finds them done, at :meth:`close`, or at exit; a writer without
    ``_get_file_writer`` (not a ``SummaryWriter``) gets them drawn here, through ``add_figure``.
    ``all_blocks=True`` also writes the per-block scalars and histograms of the blocks the
    score leaves out (round-off and unknown curvature), which are skipped by default.
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        writer: Any = None,
        *,
        figures: bool = True,
        all_blocks: bool = False,
        renderer: FigureRenderer | None = None,
    ) -> None:
        if (logdir is None) == (writer is None):
            raise ValueError(
                "give exactly one of logdir= (a directory) or writer= (a SummaryWriter)"
            )
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(
                f"logdir must be a directory path (a str or pathlib.Path), got "
                f"{type(logdir).__name__} {logdir!r}"
            )
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter (or have its methods), "
                f"got {type(writer).__name__}"
            )
        self.figures = figures
        self.all_blocks = all_blocks
        self._renderer = renderer
        self._pending: list[tuple[str, int, FigureJob]] = []  # figures being drawn
        self.enabled = _rank() == 0
        self._owns_writer = writer is None
        self._layout_written = False
        self.writer = writer
        if self.enabled and writer is None:
            self._guard("create the writer", lambda: self._open(logdir))
        if self.enabled:
            _report_write_failures_once(self.writer)

    def _open(self, logdir: str | Path | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    @property
    def logdir(self) -> str | None:
        """The directory event files go to, or ``None`` when nothing is written."""
        getter = getattr(self.writer, "get_logdir", None)
        return getter() if self.enabled and callable(getter) else None

    def _guard(self, what: str, action) -> None:
        """Run one write; on any failure warn once, stop logging, and let training go on."""
        if not self.enabled:
            return
        try:
            action()
        except Exception as err:  # a logging failure must never stop training
            self.enabled = False
            warnings.warn(
                f"blockopt could not {what} for TensorBoard ({type(err).__name__}: {err}); "
                "TensorBoard logging is off from here on and training continues. Check that the "
                "log directory is writable and its disk is not full",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- what is logged ------------------------------------------------------------------------

    def log_probe(
        self,
        step: int,
        spectra: Spectra | Mapping[str, BlockSpectrum],
        score: Heterogeneity,
        mode: str,
        block_lrs: Mapping[str, float],
        cost: ProbeCost,
        mode_lrs: Mapping[str, float] | None = None,
    ) -> None:
        """Everything one probe measured, at global step ``step``; ``mode_lrs`` (each mode's
        learning rate, ``BlockOptimizer.mode_lrs``) is logged as ``blockopt.mode_lr/<mode>``."""
        self._guard(
            "write the probe's scalars",
            lambda: self._scalars(step, spectra, score, mode, block_lrs, cost),
        )
        lrs = {f"blockopt.mode_lr/{name}": lr for name, lr in (mode_lrs or {}).items()}
        self._guard("write the modes' learning rates", lambda: self._add_scalars(lrs, step))
        self._guard("write the spectral histograms", lambda: self._histograms(step, spectra, score))
        self._guard(
            "write the probe's summary",
            lambda: self.writer.add_text(
                "blockopt/summary", summary_text(spectra, score, mode, block_lrs, cost), step
            ),
        )
        if not self._layout_written:
            self._guard("write the custom-scalars layout", lambda: self._layout(score))
            self._layout_written = True
        if self.figures:
            self._guard("draw the probe's figures", lambda: self._figures(step, spectra, score))
        self._guard("write the probe's figures", lambda: self._drain(wait=False))
        self._guard("flush the event file", lambda: self.writer.flush())

    def log_training(self, step: int, metrics: Mapping[str, float]) -> None:
        """blockopt's current values (``BlockOptimizer.metrics()``, tags ``blockopt/<name>``)
        as ``blockopt.train/<name>`` at training step ``step``: a dense series, one point every
        few steps, that TensorBoard's smoothing does not bend the way it bends the few points
        a probe-by-probe series has."""
        values = {f"blockopt.train/{k.removeprefix('blockopt/')}": v for k, v in metrics.items()}
        self._guard("write the training values", lambda: self._add_scalars(values, step))
        if self._pending:
            self._guard("write the probe's figures", lambda: self._drain(wait=False))

    def _add_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def log_decision(self, decision: Decision) -> None:
        """A text entry for a switch (decisions that keep the mode are in the scalars)."""
        if decision.switched:
            text = (
                f"step {decision.step}: **{decision.old_mode} → {decision.new_mode}** "
                f"(score {decision.score:.2f}): {decision.text}"
            )
            self._guard(
                "write the switch text",
                lambda: self.writer.add_text("blockopt/switches", text, decision.step),
            )

    def log_event(self, step: int, text: str) -> None:
        """A free-text entry (e.g. a failed probe and how to fix it)."""
        self._guard(
            "write an event text", lambda: self.writer.add_text("blockopt/events", text, step)
        )

    def close(
        self,
        hparams: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        step: int | None = None,
    ) -> None:
        """Write ``hparams`` and final ``metrics`` (also as scalars at ``step``) to the HParams
        tab when given, then flush, and close the writer if this logger created it."""
        if self._pending:
            self._guard("write the probe's figures", lambda: self._drain(wait=True))
        if hparams:
            self._guard(
                "write the hyperparameters", lambda: self._hparams(hparams, metrics or {}, step)
            )
        self._guard(
            "close the event file",
            lambda: self.writer.close() if self._owns_writer else self.writer.flush(),
        )
        if self._owns_writer:
            self.enabled = False

    # -- how -------------------------------------------------------------------------------------

    def _scalars(
        self,
        step: int,
        spectra: Mapping[str, BlockSpectrum],
        score: Heterogeneity,
        mode: str,
        block_lrs: Mapping[str, float],
        cost: ProbeCost,
    ) -> None:
        w = self.writer
        if score.empty_reason is None:  # a score over no block is no reading: no point drawn
            w.add_scalar("blockopt/score", float(score.spread), step)
            w.add_scalar("blockopt/max_ratio", float(score.max_ratio), step)
            w.add_scalar("blockopt/js", float(score.js), step)
        w.add_scalar("blockopt/mode", float(MODES.index(mode)), step)
        w.add_scalar("blockopt/probe_seconds", float(cost.seconds), step)
        w.add_scalar("blockopt/probe_hvps", float(cost.hvps), step)
        w.add_scalar("blockopt/probe_share", float(cost.share), step)
        included = [name for name in score.blocks if name in spectra]
        lrs = [float(block_lrs[name]) for name in included if name in block_lrs]
        if lrs:
            w.add_scalar("blockopt/lr_max", max(lrs), step)
            w.add_scalar("blockopt/lr_min", min(lrs), step)
        for name in self._logged(spectra, score):
            w.add_scalar(f"blockopt.lambda_max/{name}", spectra[name].lambda_max, step)
            if name in block_lrs:
                w.add_scalar(f"blockopt.lr/{name}", float(block_lrs[name]), step)

    def _histograms(
        self, step: int, spectra: Mapping[str, BlockSpectrum], score: Heterogeneity
    ) -> None:
        scales = np.log10(np.asarray(score.scales, dtype=np.float64))
        scales = scales[np.isfinite(scales)]
        if scales.size:
            lo = math.floor(scales.min() / SCALE_BUCKET) * SCALE_BUCKET
            hi = max(math.ceil(scales.max() / SCALE_BUCKET) * SCALE_BUCKET, lo + SCALE_BUCKET)
            edges = np.arange(lo, hi + SCALE_BUCKET / 2, SCALE_BUCKET)
            counts, _ = np.histogram(scales, bins=edges)
            self.writer.add_histogram_raw(
                "blockopt/log10_scale",
                min=float(scales.min()),
                max=float(scales.max()),
                num=float(scales.size),
                sum=float(scales.sum()),
                sum_squares=float(scales @ scales),
                bucket_limits=[float(e) for e in edges[1:]],
                bucket_counts=[float(c) for c in counts],
                global_step=step,
            )
        for name in self._logged(spectra, score):
            s = spectra[name]
            values = np.asarray(s.ritz_values, dtype=np.float64)
            if not np.all(np.isfinite(values)):
                continue
            weights = np.asarray(s.ritz_weights, dtype=np.float64) * s.numel
            limits, counts = histogram_buckets(s)
            self.writer.add_histogram_raw(
                f"blockopt.density/{name}",
                min=float(values.min()),
                max=float(values.max()),
                num=float(weights.sum()),
                sum=float(weights @ values),
                sum_squares=float(weights @ values**2),
                bucket_limits=limits,
                bucket_counts=counts,
                global_step=step,
            )

    def _logged(self, spectra: Mapping[str, BlockSpectrum], score: Heterogeneity) -> list[str]:
        """The blocks given per-block scalars and histograms: those the score includes, or
        with ``all_blocks`` every block, in model order."""
        if self.all_blocks:
            return list(spectra)
        return [name for name in score.blocks if name in spectra]

    def _layout(self, score: Heterogeneity) -> None:
        """Custom Scalars: the overview, then per quantity a chart of the ``EXTREMES`` stiffest
        and flattest included blocks at this (the first) probe and one chart per module."""
        overview = {
            "heterogeneity score (decades)": [
                "Multiline",
                ["^blockopt/score$", "^blockopt/max_ratio$"],
            ],
            "mode (0 sgd, 1 block_sgd, 2 adam)": ["Multiline", ["^blockopt/mode$"]],
            "applied learning rates (largest, smallest)": [
                "Multiline",
                ["^blockopt/lr_max$", "^blockopt/lr_min$"],
            ],
            "every 10 training steps: score, mode, probe share": [
                "Multiline",
                [
                    r"^blockopt\.train/score$",
                    r"^blockopt\.train/mode$",
                    r"^blockopt\.train/probe_share$",
                ],
            ],
            "learning rate per mode": [
                "Multiline",
                [rf"^blockopt\.mode_lr/{mode}$" for mode in MODES],
            ],
            "probe share of training time": ["Multiline", ["^blockopt/probe_share$"]],
            "probe seconds": ["Multiline", ["^blockopt/probe_seconds$"]],
        }
        layout: dict[str, dict[str, list[Any]]] = {"blockopt": overview}
        order = sorted(zip(score.scales, score.blocks), reverse=True)
        k = min(EXTREMES, len(order) // 2)
        extremes = [name for _, name in order[:k] + order[len(order) - k :]] if k else []
        groups = block_groups(list(score.blocks))
        for q in QUANTITIES:
            charts: dict[str, list[Any]] = {}
            if extremes:
                charts[f"{k} stiffest and {k} flattest blocks"] = [
                    "Multiline",
                    [_exact(q, name) for name in extremes],
                ]
            for group, names in groups.items():
                charts[group] = ["Multiline", [_exact(q, name) for name in names]]
            layout[f"blockopt: {q} per block"] = charts
        self.writer.add_custom_scalars(layout)

    def _figures(
        self, step: int, spectra: Mapping[str, BlockSpectrum], score: Heterogeneity
    ) -> None:
        jobs = [("blockopt/densities", FigureJob("densities", density_arguments(spectra, score)))]
        if 1 < len(score.blocks) <= JS_MAX_BLOCKS:  # beyond, its labels could not be read
            jobs.append(("blockopt/js_matrix", FigureJob("js_matrix", js_arguments(score))))
        if not callable(getattr(self.writer, "_get_file_writer", None)):
            for tag, job in jobs:  # a writer of figures only: draw them here
                with _default_style():
                    figure = figures.KINDS[job.kind](**job.arguments)
                self.writer.add_figure(tag, figure, step, close=False)
            return
        _live.add(self)
        self._pending += [(tag, step, self._drawer.submit(job)) for tag, job in jobs]

    @property
    def _drawer(self) -> FigureRenderer:
        """The renderer given, else the process's shared one (started at the first figure)."""
        return self._renderer or shared_renderer()

    def _drain(self, *, wait: bool) -> None:
        """Write the figures that are drawn (with ``wait``, all of them, waiting as needed)."""
        pending, self._pending = self._pending, []
        for tag, step, job in pending:
            if wait or job.lost:
                self._drawer.wait(job)
            if not job.done:
                self._pending.append((tag, step, job))
                continue
            if job.error is not None:
                self._pending = []  # logging stops: the rest is not written
                raise RuntimeError(f"{tag} could not be drawn: {job.error}")
            self.writer._get_file_writer().add_summary(_image_summary(tag, job.data), step)
        if len(self._pending) < len(pending):
            self.writer.flush()

    def _hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int | None
    ) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: _hparam_value(v) for k, v in hparams.items()}
        final = {k: float(v) for k, v in metrics.items()}
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if not callable(file_writer):
            self.writer.add_hparams(clean, final, global_step=step)
            return
        for summary in hparams_summary(clean, final):
            file_writer().add_summary(summary, step)
        for k, v in final.items():
            self.writer.add_scalar(k, v, step)


def block_groups(names: list[str]) -> dict[str, list[str]]:
    """The blocks by owning module, in first-seen order: ``a.b.weight`` and ``a.b.bias`` fall
    in ``a.b``, a fused ``a.qkv.weight.q`` in ``a.qkv``, and a name without a dot in its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        head, _, _ = name.rpartition(".")
        group = head.removesuffix(".weight").removesuffix(".bias") if head else name
        groups.setdefault(group, []).append(name)
    return groups


def _short(name: str, group: str) -> str:
    """A block's name inside its group's panel: ``weight.q`` for ``a.qkv.weight.q``."""
    return name[len(group) + 1 :] if name.startswith(group + ".") else name


def _left_out(spectra: Mapping[str, BlockSpectrum], score: Heterogeneity) -> str:
    """One line naming the blocks the score (and so the figures) left out, and why."""
    if not score.excluded:
        return ""
    negligible = [n for n, _ in score.excluded if n in score.negligible]
    other = [n for n, _ in score.excluded if n not in score.negligible]
    parts = []
    if negligible:
        parts.append(f"negligible curvature (round-off): {', '.join(negligible)}")
    if other:
        parts.append(f"unknown curvature: {', '.join(other)}")
    return f"left out, {len(score.excluded)} of {len(spectra)} blocks: " + "; ".join(parts)


def density_matrix(
    spectra: Mapping[str, BlockSpectrum], score: Heterogeneity, columns: int = DENSITY_COLUMNS
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The heatmap's data: the block names in model order, the grid of ``log10 |lambda|``
    (``columns`` points spanning the included blocks' Ritz values, at most 9 decades below the
    largest, half a decade beyond), and per block its SLQ density per decade of ``|lambda|``
    (both signs pooled, smoothed by a Gaussian of 0.1 decade) on that grid; NaN rows for the
    blocks ``score`` leaves out."""
    names = list(spectra)
    included = set(score.blocks)
    mags = [
        abs(v)
        for n in names
        if n in included
        for v in spectra[n].ritz_values
        if math.isfinite(v) and v != 0
    ]
    if not mags:
        return names, np.zeros(0), np.full((len(names), 0), np.nan)
    top = max(mags)
    lo = max(min(mags), top * 1e-9)
    grid = np.linspace(math.log10(lo) - 0.5, math.log10(top) + 0.5, columns)
    matrix = np.full((len(names), columns), np.nan)
    for row, name in enumerate(names):
        if name not in included:
            continue
        s = spectra[name]
        theta = np.abs(np.asarray(s.ritz_values, dtype=np.float64))
        keep = np.isfinite(theta) & (theta >= lo)
        x = np.log10(theta[keep])
        w = np.asarray(s.ritz_weights, dtype=np.float64)[keep]
        kernel = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / DENSITY_SMOOTHING) ** 2)
        matrix[row] = kernel @ w / (DENSITY_SMOOTHING * math.sqrt(2 * math.pi))
    return names, grid, matrix


def density_arguments(spectra: Mapping[str, BlockSpectrum], score: Heterogeneity) -> dict[str, Any]:
    """What :func:`blockopt.logging.figures.draw_density` draws, as plain numbers."""
    names, grid, matrix = density_matrix(spectra, score)
    return {
        "names": names,
        "grid": grid.tolist(),
        "matrix": matrix.tolist(),
        "reasons": dict(score.excluded),
        "scales": dict(zip(score.blocks, score.scales)),
        "spread": score.spread,
    }


def js_arguments(score: Heterogeneity) -> dict[str, Any]:
    """What :func:`blockopt.logging.figures.draw_js` draws, as plain numbers."""
    return {
        "blocks": list(score.blocks),
        "scales": list(score.scales),
        "js_matrix": np.asarray(score.js_matrix, dtype=np.float64).tolist(),
        "js": score.js,
    }


def density_figure(spectra: Mapping[str, BlockSpectrum], score: Heterogeneity | None = None):
    """Every block's spectrum in one picture: a heatmap with one row per block, in model
    order and named, against ``log10 |lambda|`` (columns), coloured by the block's SLQ density
    per decade on a log colour scale (:func:`density_matrix`), with a dot at the block's
    curvature scale. Blocks whose curvature differs by decades sit decades apart along a row;
    blocks ``score`` leaves out are grey rows marked with why. ``score`` is computed when not
    given. A plain matplotlib ``Figure`` (no pyplot, so no global state or GUI backend)."""
    if score is None:
        from blockopt.analysis.heterogeneity import heterogeneity

        score = heterogeneity(spectra)
    return figures.draw_density(**density_arguments(spectra, score))


def js_figure(score: Heterogeneity):
    """Heatmap of the pairwise Jensen-Shannon distances between the included blocks, ordered
    from the stiffest to the flattest (:func:`blockopt.logging.figures.draw_js`)."""
    return figures.draw_js(**js_arguments(score))


def summary_text(
    spectra: Mapping[str, BlockSpectrum],
    score: Heterogeneity,
    mode: str,
    block_lrs: Mapping[str, float],
    cost: ProbeCost,
) -> str:
    """The probe as Markdown for TensorBoard's Text tab: the score, mode and cost, then a table
    of every block's exact values, included blocks from the stiffest down, left-out ones last
    with the reason. Unsmoothed, so short series read exactly."""
    empty = score.empty_reason
    reading = (
        f"**score {score.spread:.3g} decades** (max ratio {score.max_ratio:.3g}, JS {score.js:.3g})"
        if empty is None
        else f"**no score**: {empty}"
    )
    head = (
        f"{reading}, mode **{mode}**; {len(score.blocks)} of {len(spectra)} blocks "
        f"included; probe {cost.seconds:.3g} s, {cost.hvps} HVPs, "
        f"{100 * cost.share:.3g}% of training time"
    )
    rows = ["| block | scale | lambda_min | lambda_max | trace | lr |", "|---|---|---|---|---|---|"]

    def lr_of(name: str) -> str:
        return f"{block_lrs[name]:.3g}" if name in block_lrs else "-"

    for scale, name in sorted(zip(score.scales, score.blocks), reverse=True):
        s = spectra[name]
        rows.append(
            f"| {name} | {scale:.3g} | {s.lambda_min:.3g} | {s.lambda_max:.3g} | "
            f"{s.trace:.3g} | {lr_of(name)} |"
        )
    for name, why in score.excluded:
        s = spectra.get(name)
        values = f"{s.lambda_min:.3g} | {s.lambda_max:.3g} | {s.trace:.3g}" if s else "- | - | -"
        rows.append(f"| {name} (left out: {why}) | - | {values} | {lr_of(name)} |")
    return head + "\n\n" + "\n".join(rows)


def _exact(quantity: str, name: str) -> str:
    """A custom-scalars regex matching exactly the tag of ``quantity`` for block ``name``."""
    return f"^blockopt\\.{quantity}/{_escape(name)}$"


def _escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?{}[]\|()" else c for c in text)


def _hparam_value(value: Any) -> int | float | str | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@contextlib.contextmanager
def tensorboard_server(
    logdir: str | Path, *, run: str, timeout: float = 90.0, reload_interval: int | None = None
) -> Iterator[str]:
    """Serve ``logdir`` with a real ``tensorboard`` on a free localhost port; yields its URL once
    it lists ``run``, and stops the server on exit. Raises ``RuntimeError`` (with the end of the
    server's stderr) when the server exits or ``run`` does not show up within ``timeout`` s."""
    import socket
    import subprocess
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if reload_interval is not None:
        command += ["--reload_interval", str(reload_interval)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a long-lived server never blocks
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while run not in _runs(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    state = (
                        "exited"
                        if server.poll() is not None
                        else f"no run {run!r} in {timeout:g} s"
                    )
                    raise RuntimeError(f"tensorboard on {url}: {state}: {tail}")
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def _runs(url: str) -> list[str]:
    """The runs a TensorBoard server lists; none while it is not answering yet."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/data/runs", timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return []


def _image_summary(tag: str, png: bytes):
    """A TensorBoard image summary of an encoded PNG (its size read from the PNG header)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def _default_style() -> contextlib.AbstractContextManager:
    import matplotlib.style

    return matplotlib.style.context("default")


_live: weakref.WeakSet[TensorBoardLogger] = weakref.WeakSet()
"""Loggers with figures being drawn: at exit, the figures are written before the writer goes."""


@atexit.register
def _write_pending_figures() -> None:
    for logger in list(_live):
        if logger._pending:
            logger._guard("write the probe's figures", functools.partial(logger._drain, wait=True))


_quiet_threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def _report_write_failures_once(writer: Any) -> None:
    """A ``SummaryWriter`` writes on a thread of its own, which on a failed write (a full disk)
    prints the error's traceback as it ends; the writer's next call raises the same error, which
    the logger reports in its one warning. So a traceback from that thread is not printed; any
    other thread's still is."""
    try:
        thread = writer._get_file_writer().event_writer._async_writer._worker
    except AttributeError:  # another writer, or another version: its errors print as they do
        return
    if not isinstance(thread, threading.Thread):
        return
    _quiet_threads.add(thread)
    if getattr(threading.excepthook, "_blockopt", False):
        return
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if args.thread is not None and args.thread in _quiet_threads:
            return
        previous(args)

    hook._blockopt = True  # type: ignore[attr-defined]
    threading.excepthook = hook
