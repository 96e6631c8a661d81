"""What the optimizer remembers and reports: decisions, probe results and faults (bounded),
probe and training time (the budget's inputs), and the TensorBoard logger."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

from blockopt.analysis.heterogeneity import Heterogeneity
from blockopt.curvature.spectra import Spectra
from blockopt.distributed.reductions import Reduce
from blockopt.optimizer.policy import Decision, ProbeFault, Spend

__all__ = ["Recorder"]


class Recorder:
    """Histories capped at ``history`` entries each (the oldest dropped first), the time spent
    probing, and the training clock: wall time since the first step, plus what a loaded
    checkpoint had trained."""

    def __init__(self, history: int, logger: Any = None) -> None:
        self.history: deque[Decision] = deque(maxlen=history)
        self.spectra_history: deque[tuple[int, Spectra]] = deque(maxlen=history)
        self.faults: deque[ProbeFault] = deque(maxlen=history)
        self.last_score: Heterogeneity | None = None
        self.probe_seconds = 0.0
        self.logger = logger
        self.clock_start: float | None = None  # wall time of the first step (since a load)
        self.saved_train_seconds = 0.0  # training wall time before that: from a checkpoint

    def start_clock(self) -> None:
        """Start the training clock at the first step (after construction or a load)."""
        if self.clock_start is None:
            self.clock_start = time.perf_counter()

    def training_seconds(self) -> float:
        """Training wall time, probes included: since the first step (0 before it), plus what
        a loaded checkpoint had trained (counted from the first step after the load)."""
        running = 0.0 if self.clock_start is None else time.perf_counter() - self.clock_start
        return self.saved_train_seconds + running

    @property
    def probe_share(self) -> float:
        """``probe_seconds`` over the training wall time, in [0, 1]; 0.0 before the first step."""
        elapsed = self.training_seconds()
        return min(self.probe_seconds / elapsed, 1.0) if elapsed > 0 else 0.0

    def spend(self, cost: float, step: int, reduce: Reduce | None, device: Any) -> Spend:
        """The probe time so far for the budget, with ``cost`` the probe just taken's. Under
        DDP the times are averaged over the ranks (one all_reduce of [P, E, c]), so that every
        rank computes the same next probe step."""
        values = [self.probe_seconds, self.training_seconds(), cost]
        if reduce is not None:
            values = reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()
        return Spend(values[0], values[1], step, values[2])

    def record_probe(self, step: int, spectra: Spectra, score: Heterogeneity, decision: Decision):
        """Keep a probe's result and decision."""
        self.last_score = score
        self.spectra_history.append((step, spectra))
        self.history.append(decision)

    def restore(
        self,
        *,
        history: list[Decision],
        spectra: list[tuple[int, Spectra]],
        faults: list[ProbeFault],
        last_score: Heterogeneity | None,
        probe_seconds: float,
        train_seconds: float,
    ) -> None:
        """Install what a checkpoint held (checked before); the clock restarts at the next step."""
        for records, values in (
            (self.history, history),
            (self.spectra_history, spectra),
            (self.faults, faults),
        ):
            records.clear()
            records.extend(values)
        self.last_score = last_score
        self.probe_seconds = probe_seconds
        self.saved_train_seconds = train_seconds
        self.clock_start = None
