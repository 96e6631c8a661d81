"""Draw the probe's figures in a separate process, so that training does not wait for them.

Drawing the two figures of a probe with matplotlib takes about a second, which on a small model
is more than the probe's block products. :class:`FigureRenderer` hands each figure to one
long-lived worker process (``python blockopt/logging/figures.py``, numpy and matplotlib only,
started at the first figure and shared by every logger of the process) and returns at once;
the logger writes the encoded image when it is done. The worker runs in blockopt's own
directory, so a ``matplotlibrc`` in the user's working directory is never read. If the worker
cannot start or dies, figures are drawn in the calling thread instead: nothing is lost.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockopt.logging import figures

__all__ = ["FigureJob", "FigureRenderer", "draw", "shared_renderer"]

# A worker that takes longer than this for one figure is given up on; the figure is then drawn
# in the caller's thread.
WAIT_SECONDS = 120.0
_BOOT = "import runpy, sys; sys.path.pop(0); runpy.run_path(sys.argv[1], run_name='__main__')"


@dataclass
class FigureJob:
    """One figure to draw: what (``kind``, ``arguments``, ``fmt``, ``dpi``), and once done its
    encoded bytes or the worker's one-line error."""

    kind: str
    arguments: Mapping[str, Any]
    fmt: str = "png"
    dpi: float = 100
    data: bytes | None = None
    error: str | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def lost(self) -> bool:
        """Done without a result: the worker died before drawing it; draw it here."""
        return self.done and self.data is None and self.error is None

    def finish(self, data: bytes | None, error: str | None) -> None:
        self.data, self.error = data, error
        self._done.set()

    def draw_here(self) -> None:
        """Draw the figure in this thread (when no worker does); errors are kept, not raised."""
        try:
            self.finish(figures.render(self.kind, self.arguments, self.fmt, self.dpi), None)
        except Exception as err:
            self.finish(None, f"{type(err).__name__}: {err}")


class FigureRenderer:
    """Draws :class:`FigureJob`\\ s in one worker process: :meth:`submit` returns at once,
    :meth:`wait` returns the job done (drawn here if the worker could not draw it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the jobs and the process
        self._sending = threading.Lock()  # one request at a time on the worker's input
        self._process: subprocess.Popen | None = None
        self._jobs: dict[int, FigureJob] = {}
        self._next_id = 0
        self._broken = False

    @property
    def alive(self) -> bool:
        """Whether figures are drawn by the worker (started, or not yet needed)."""
        return not self._broken

    def submit(self, job: FigureJob) -> FigureJob:
        """Send ``job`` to the worker; without one, draw it here and now."""
        request = {
            "kind": job.kind,
            "arguments": dict(job.arguments),
            "format": job.fmt,
            "dpi": job.dpi,
        }
        with self._lock:
            process = self._start()
            if process is not None:
                request["id"] = key = self._next_id
                self._jobs[key] = job
                self._next_id += 1
        if process is not None:
            try:  # not under the lock: the reader takes it for every reply it reads
                with self._sending:
                    figures.write_message(process.stdin, json.dumps(request).encode())
                return job
            except (OSError, ValueError):  # the worker is gone
                with self._lock:
                    self._jobs.pop(key, None)
                    self._give_up()
        job.draw_here()
        return job

    def wait(self, job: FigureJob, timeout: float = WAIT_SECONDS) -> FigureJob:
        """Block until ``job`` is done; if the worker does not finish it in ``timeout``
        seconds (or died), draw it here."""
        if not job._done.wait(timeout):
            with self._lock:
                for key, pending in list(self._jobs.items()):
                    if pending is job:
                        del self._jobs[key]
            job.draw_here()
        elif job.lost:
            job.draw_here()
        return job

    def close(self) -> None:
        """Stop the worker; figures still pending are drawn here."""
        with self._lock:
            process, self._process = self._process, None
            pending = list(self._jobs.values())
            self._jobs.clear()
        if process is not None:
            with self._sending:
                _stop(process)
        for job in pending:
            if not job.done or job.lost:
                job.draw_here()

    # -- the worker ----------------------------------------------------------------------------

    def _start(self) -> subprocess.Popen | None:
        """The running worker, started on first use; ``None`` once it cannot be had."""
        if self._broken:
            return None
        if self._process is not None and self._process.poll() is None:
            return self._process
        if self._process is not None:  # it died
            self._give_up()
            return None
        script = Path(figures.__file__).resolve()
        env = {**os.environ, "MPLBACKEND": "Agg"}
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=script.parent,
                env=env,
            )
        except (OSError, ValueError):  # no interpreter to start (embedded Python), no fork
            self._broken = True
            return None
        threading.Thread(
            target=self._read, args=(self._process,), name="blockopt-figures", daemon=True
        ).start()
        return self._process

    def _read(self, process: subprocess.Popen) -> None:
        """Collect the worker's replies; at its end, hand every pending job back to be drawn
        by its waiter."""
        while (header := figures.read_message(process.stdout)) is not None:
            data = figures.read_message(process.stdout)
            if data is None:  # the worker died mid-reply
                break
            reply = json.loads(header)
            with self._lock:
                job = self._jobs.pop(reply["id"], None)
            if job is not None:
                job.finish(data or None, reply["error"] or (None if data else "no image"))
        with self._lock:
            if self._process is process:
                self._give_up()

    def _give_up(self) -> None:
        """The worker is unusable: its pending jobs are marked lost (their waiters draw them)
        and figures are drawn by the callers from now on (the caller holds the lock)."""
        self._broken = True
        pending = list(self._jobs.values())
        self._jobs.clear()
        for job in pending:
            job.finish(None, None)


def _stop(process: subprocess.Popen) -> None:
    try:
        process.stdin.close()
        process.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()


_shared: FigureRenderer | None = None


def shared_renderer() -> FigureRenderer:
    """The process's renderer, created on first use and stopped at exit."""
    global _shared
    if _shared is None:
        _shared = FigureRenderer()
        atexit.register(_shared.close)
    return _shared


def draw(kind: str, arguments: Mapping[str, Any], fmt: str = "png", dpi: float = 100) -> bytes:
    """Figure ``kind`` encoded as ``fmt``, drawn by the worker (so neither this process nor the
    worker reads a ``matplotlibrc`` in the working directory) and waited for; drawn here if
    there is no worker. Raises ``RuntimeError`` if it cannot be drawn."""
    renderer = shared_renderer()
    job = renderer.wait(renderer.submit(FigureJob(kind, arguments, fmt, dpi)))
    if job.error is not None or job.data is None:
        raise RuntimeError(f"the {kind} figure could not be drawn: {job.error}")
    return job.data
