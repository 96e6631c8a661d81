"""What blockopt writes to TensorBoard at every probe, and how.

Tags (scalars grouped by the part before ``/``):

- ``blockopt/score``, ``blockopt/max_ratio``, ``blockopt/js``: the heterogeneity score and its
  companions; ``blockopt/mode``: 0 = sgd, 1 = block_sgd, 2 = adam;
  ``blockopt/probe_seconds``, ``blockopt/probe_hvps``, ``blockopt/probe_share``: the probe's cost
  and the share of training wall time spent probing so far (``BlockOptimizer.probe_share``,
  which its ``probe_budget`` bounds).
- ``blockopt.lambda_max/<block>``, ``blockopt.lambda_min/<block>``, ``blockopt.trace/<block>``,
  ``blockopt.lr/<block>``: per block, the extreme Ritz values, the trace estimate and the
  learning rate in effect.
- ``blockopt.density/<block>``: histograms of Ritz values weighted by their SLQ weights (times
  the block size, so bucket counts read as numbers of eigenvalues).
- ``blockopt/densities`` and ``blockopt/js_matrix``: figures of every block's density over
  ``|lambda|`` on log axes, and of the pairwise Jensen-Shannon distances.
- ``blockopt/switches``: a text entry at every switch, with the reason.

A custom-scalars layout groups the per-block curves; :meth:`TensorBoardLogger.close` writes the
run's hyperparameters and final metrics to the HParams tab. Any failure of the writer (an
unwritable directory, a full disk) gives one warning and turns logging off: training goes on.
Under ``torch.distributed`` only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blockopt.analysis.heterogeneity import Heterogeneity
from blockopt.curvature.spectra import BlockSpectrum, Spectra
from blockopt.optimizer.policy import MODES, Decision

__all__ = ["ProbeCost", "TensorBoardLogger", "histogram_buckets", "tensorboard_server"]

HISTOGRAM_BUCKETS = 64
QUANTITIES = ("lambda_max", "lambda_min", "trace", "lr")


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
    flushed, not closed). ``figures=False`` skips the matplotlib figures, the slowest part.
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        writer: Any = None,
        *,
        figures: bool = True,
    ) -> None:
        if (logdir is None) == (writer is None):
            raise ValueError(
                "give exactly one of logdir= (a directory) or writer= (a SummaryWriter)"
            )
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter (or have its methods), "
                f"got {type(writer).__name__}"
            )
        self.figures = figures
        self.enabled = _rank() == 0
        self._owns_writer = writer is None
        self._layout_written = False
        self.writer = writer
        if self.enabled and writer is None:
            self._guard("create the writer", lambda: self._open(logdir))

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
    ) -> None:
        """Everything one probe measured, at global step ``step``."""
        self._guard(
            "write the probe's scalars",
            lambda: self._scalars(step, spectra, score, mode, block_lrs, cost),
        )
        self._guard("write the spectral histograms", lambda: self._histograms(step, spectra))
        if not self._layout_written:
            self._guard("write the custom-scalars layout", lambda: self._layout(list(spectra)))
            self._layout_written = True
        if self.figures:
            self._guard("draw the probe's figures", lambda: self._figures(step, spectra, score))
        self._guard("flush the event file", lambda: self.writer.flush())

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

    def _scalars(self, step, spectra, score, mode, block_lrs, cost) -> None:
        w = self.writer
        w.add_scalar("blockopt/score", float(score.spread), step)
        w.add_scalar("blockopt/max_ratio", float(score.max_ratio), step)
        w.add_scalar("blockopt/js", float(score.js), step)
        w.add_scalar("blockopt/mode", float(MODES.index(mode)), step)
        w.add_scalar("blockopt/probe_seconds", float(cost.seconds), step)
        w.add_scalar("blockopt/probe_hvps", float(cost.hvps), step)
        w.add_scalar("blockopt/probe_share", float(cost.share), step)
        for name, s in spectra.items():
            w.add_scalar(f"blockopt.lambda_max/{name}", s.lambda_max, step)
            w.add_scalar(f"blockopt.lambda_min/{name}", s.lambda_min, step)
            w.add_scalar(f"blockopt.trace/{name}", s.trace, step)
            if name in block_lrs:
                w.add_scalar(f"blockopt.lr/{name}", float(block_lrs[name]), step)

    def _histograms(self, step, spectra) -> None:
        for name, s in spectra.items():
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

    def _layout(self, names: list[str]) -> None:
        """Custom Scalars: the score panel, then one chart per quantity with every block, then
        one chart per quantity and module (blocks sharing a name up to their last part)."""
        overview = {
            "heterogeneity score (decades)": [
                "Multiline",
                ["blockopt/score", "blockopt/max_ratio"],
            ],
            "mode (0 sgd, 1 block_sgd, 2 adam)": ["Multiline", ["blockopt/mode"]],
            "probe share of training time": ["Multiline", ["blockopt/probe_share"]],
            "probe seconds": ["Multiline", ["blockopt/probe_seconds"]],
        }
        layout: dict[str, dict[str, list[Any]]] = {"blockopt": overview}
        for q in QUANTITIES:
            layout[f"blockopt: {q} per block"] = {
                "all blocks": ["Multiline", [rf"blockopt\.{q}/.*"]],
                **{
                    module: ["Multiline", [rf"blockopt\.{q}/{_escape(module)}\..*"]]
                    for module in _modules(names)
                },
            }
        self.writer.add_custom_scalars(layout)

    def _figures(self, step, spectra, score) -> None:
        self.writer.add_figure("blockopt/densities", density_figure(spectra), step, close=False)
        if len(score.blocks) > 1:
            self.writer.add_figure("blockopt/js_matrix", js_figure(score), step, close=False)

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


def density_figure(spectra: Mapping[str, BlockSpectrum]):
    """Every block's smoothed spectral density over ``|lambda|``, log axes: blocks whose
    curvature differs by decades sit apart instead of piling up at zero. A plain matplotlib
    ``Figure`` (no pyplot, so no global state or GUI backend is touched)."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    mags = [abs(v) for s in spectra.values() for v in s.ritz_values if math.isfinite(v) and v != 0]
    if mags:
        top = max(mags)
        lo = max(min(mags), top * 1e-9)
        grid = np.linspace(math.log10(lo) - 0.5, math.log10(top) + 0.5, 600)
        peak = 0.0
        cmap = matplotlib.colormaps["viridis"].resampled(max(len(spectra), 2))
        for i, (name, s) in enumerate(spectra.items()):
            theta = np.abs(np.asarray(s.ritz_values, dtype=np.float64))
            keep = np.isfinite(theta) & (theta >= lo)
            if not keep.any():
                continue
            x = np.log10(theta[keep])
            w = np.asarray(s.ritz_weights, dtype=np.float64)[keep]
            kernel = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / 0.1) ** 2) / (
                0.1 * math.sqrt(2 * math.pi)
            )
            curve = kernel @ w
            peak = max(peak, float(curve.max()))
            ax.plot(10**grid, curve, color=cmap(i), lw=1.0, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if peak > 0:
            ax.set_ylim(1e-3 * peak, 2 * peak)
    ax.set_xlabel("|eigenvalue| of the diagonal Hessian block")
    ax.set_ylabel("density per decade")
    ax.set_title("Blockwise Hessian spectra (SLQ, Gaussian smoothing 0.1 decade)")
    if len(spectra) <= 40:
        ax.legend(fontsize=5, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def js_figure(score: Heterogeneity):
    """Heatmap of the pairwise Jensen-Shannon distances between the included blocks."""
    from matplotlib.figure import Figure

    n = len(score.blocks)
    size = min(3 + 0.22 * n, 12)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    image = ax.imshow(np.asarray(score.js_matrix), vmin=0.0, vmax=1.0, cmap="magma")
    ax.set_xticks(range(n), score.blocks, rotation=90, fontsize=5)
    ax.set_yticks(range(n), score.blocks, fontsize=5)
    ax.set_title(f"Pairwise JS distance between block densities (mean {score.js:.2f})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _modules(names: list[str]) -> list[str]:
    """Distinct owning modules of the blocks, in first-seen order (``a.b.weight`` -> ``a.b``)."""
    seen: dict[str, None] = {}
    for name in names:
        head, _, _ = name.rpartition(".")
        if head:
            seen.setdefault(head.removesuffix(".weight").removesuffix(".bias"), None)
    return list(seen)


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
