"""``blockopt demo``: train the bundled models with fixed SGD, fixed Adam and blockopt's auto mode.

Tasks: the tiny ViT and the BatchNorm CNN on scikit-learn's digits, the tiny GPT on the text of
Python's ``pydoc_data.topics``: :data:`blockopt.workloads.tasks.DEMO_TASKS`, which the
benchmarks share. Every optimizer starts from the same initial weights and sees the same batches.
The fixed optimizers use the best learning rates of the grid in docs/BENCHMARKS.md
(:data:`LRS`); ``auto`` is ``BlockOptimizer(model, probe)`` with its defaults, stepped like any
optimizer (``zero_grad``, ``backward``, ``step``) and told each training loss (``observe_loss``),
so it probes on its default schedule, loss spikes included. Each run logs its losses to
TensorBoard (``auto`` also logs every probe), and :func:`run_demo` returns what the summary table
shows. Results depend only on the seed (and the machine's floating point).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from blockopt.analysis.heterogeneity import heterogeneity
from blockopt.curvature.spectra import block_spectra
from blockopt.optimizer.block_optimizer import BlockOptimizer
from blockopt.workloads import tasks
from blockopt.workloads.tasks import Task, Workload

__all__ = [
    "DEFAULT_STEPS",
    "LRS",
    "QUICK_STEPS",
    "TASKS",
    "RunResult",
    "Task",
    "Workload",
    "demo_logdir",
    "run_demo",
]

DEFAULT_STEPS = 400
QUICK_STEPS = 100
OPTIMIZERS = ("sgd", "adam", "auto")
MOMENTUM = tasks.MOMENTUM  # fixed SGD's momentum, as in the benchmark grid
# Best or near-best learning rates of the grid in docs/BENCHMARKS.md (400 steps, seed 0); where the
# best one sits at the edge of stability, its smaller neighbour.
LRS: dict[str, dict[str, float]] = tasks.DEMO_LRS
TASKS: dict[str, Task] = tasks.DEMO_TASKS
EVALS = 10  # evaluation points per run logged to TensorBoard
# One intra-op thread: the models are tiny, and on a busy machine two threads' spin-waiting
# made a ViT run several times slower (a probe still runs its block products side by side on
# two worker threads, see blockopt.curvature.hvp.default_workers).
MAX_THREADS = 1


@dataclass
class RunResult:
    """One training run. ``metrics`` holds ``train_loss``, ``held_out_loss`` and, on digits,
    ``held_out_accuracy``; ``modes`` is ``[(mode, step), ...]`` from the start; scores, probe
    times and ``reason`` (the policy's reason for auto's final mode, from the last probe that
    switched, else the last probe) are ``None`` for the fixed optimizers."""

    task: str
    optimizer: str
    lr: float
    steps: int
    metrics: dict[str, float]
    train_seconds: float
    logdir: Path
    modes: list[tuple[str, int]] = field(default_factory=list)
    end_lr: float | None = None
    first_score: float | None = None
    end_score: float | None = None
    probe_seconds: float | None = None
    probes: int = 0
    diverged_at: int | None = None  # the step whose loss was not finite; training stopped there
    reason: str | None = None  # why auto is in its final mode: the deciding probe's reason

    @property
    def overhead(self) -> float | None:
        """Probe seconds over the training loop's wall time (probes included)."""
        if self.probe_seconds is None or self.train_seconds <= 0:
            return None
        return self.probe_seconds / self.train_seconds


# -- runs -----------------------------------------------------------------------------------------

Progress = Callable[[str, int, int, float], None]  # label, step done, total steps, last loss


def demo_logdir(root: str | Path, now: datetime | None = None) -> Path:
    """A fresh directory ``root/demo-YYYYmmdd-HHMMSS`` (suffixed when taken), not yet created."""
    stamp = (now or datetime.now()).strftime("demo-%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Use at most ``n`` intra-op threads inside, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _modes(opt: BlockOptimizer) -> list[tuple[str, int]]:
    """The starting mode at step 0, then every switch's new mode at its step."""
    start = opt.history[0].old_mode if opt.history else opt.mode
    return [(start, 0)] + [(d.new_mode, d.step) for d in opt.history if d.switched]


def train_one(
    task: Task,
    optimizer: str,
    steps: int,
    seed: int,
    logdir: Path,
    progress: Progress | None = None,
) -> RunResult:
    """Train ``task`` with ``optimizer`` ("sgd", "adam" or "auto") for ``steps`` steps, logging
    to TensorBoard in ``logdir``. Only the training steps are timed, not the evaluations."""
    work = task.build(seed)
    auto = optimizer == "auto"
    if auto:
        opt: torch.optim.Optimizer = BlockOptimizer(work.model, work.probe, logdir=logdir)
        lr = float(opt.param_groups[0]["lr"])
        logger = opt.logger
        writer = logger.writer if logger is not None and logger.enabled else None
    else:
        from torch.utils.tensorboard import SummaryWriter

        lr = LRS[task.key][optimizer]
        opt = tasks.fixed_optimizer(optimizer, lr, work.model)
        writer = SummaryWriter(log_dir=str(logdir))
    label = f"{task.key} {optimizer}"
    every = max(1, steps // EVALS)
    seconds = 0.0
    diverged_at: int | None = None
    _log_metrics(writer, work.evaluate(), 0)
    for i in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = work.train_loss(i)
        loss.backward()
        value = float(loss.detach())
        if isinstance(opt, BlockOptimizer):
            opt.observe_loss(value)  # for its loss-spike detection
        opt.step()
        seconds += time.perf_counter() - start
        if writer is not None:
            writer.add_scalar("loss/train_batch", value, i)
        if (i + 1) % every == 0 or i + 1 == steps:
            _log_metrics(writer, work.evaluate(), i + 1)
        if not math.isfinite(value):  # diverged: stop here, and say so in the summary
            diverged_at = i
            if progress is not None:
                progress(label, i + 1, i + 1, value)
            break
        if progress is not None:
            progress(label, i + 1, steps, value)
    metrics = work.evaluate()
    result = RunResult(task.key, optimizer, lr, steps, metrics, seconds, logdir)
    result.diverged_at = diverged_at
    if auto:
        assert isinstance(opt, BlockOptimizer)
        _finish_auto(opt, work, result)
    elif writer is not None:
        writer.add_text("demo/settings", f"{optimizer}, lr {lr:g}, {steps} steps, seed {seed}")
        writer.close()
    return result


def _log_metrics(writer: Any, metrics: dict[str, float], step: int) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        kind, _, what = key.rpartition("_")
        writer.add_scalar(f"{what}/{kind}", value, step)


def _finish_auto(opt: BlockOptimizer, work: Workload, result: RunResult) -> None:
    """Fill in the auto run's modes, scores and probe cost, and close its TensorBoard run. The
    score at the end comes from one more probe of the trained model, with the optimizer's own
    settings; it is not counted as probe overhead."""
    result.modes = _modes(opt)
    result.end_lr = opt.mode_lrs[opt.mode]
    result.probe_seconds = opt.probe_seconds
    result.probes = len(opt.history)
    result.first_score = opt.history[0].score if opt.history else None
    switches = [d for d in opt.history if d.switched]
    deciding = switches[-1] if switches else (opt.history[-1] if opt.history else None)
    result.reason = deciding.reason if deciding is not None else None
    opt.close({f"final/{k}": v for k, v in result.metrics.items()})
    if result.diverged_at is not None:
        return  # no curvature at non-finite weights
    final = block_spectra(
        opt.probe_model,
        work.probe,
        opt.blocks,
        steps=opt.steps,
        probes=opt.probes,
        seed=opt.seed,
        tol=opt.tol,
    )
    result.end_score = float(heterogeneity(final))


def run_demo(
    tasks: Sequence[str],
    steps: int,
    logdir: str | Path,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[RunResult]:
    """Train every task in ``tasks`` with fixed SGD, fixed Adam and auto, logging each run to
    ``logdir/<task>/<optimizer>``. The caller's RNG states and thread count are restored."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; choose from {list(TASKS)}")
    results = []
    with _threads(MAX_THREADS), torch.random.fork_rng(devices=[]):
        for key in tasks:
            for optimizer in OPTIMIZERS:
                run_dir = Path(logdir) / key / optimizer
                results.append(train_one(TASKS[key], optimizer, steps, seed, run_dir, progress))
    return results
