"""Benchmark: blockopt's automatic mode choice against each mode fixed, on five small tasks.

Tasks: a block-diagonal quadratic with heterogeneous blocks and one with homogeneous blocks (the
problems of ``repro_quadratic.py``), a BatchNorm CNN and a tiny ViT on scikit-learn's digits, and
a tiny GPT on the text of ``pydoc_data.topics``. Methods:

- fixed ``sgd`` (``torch.optim.SGD``, momentum 0.9), fixed ``block_sgd`` (``BlockOptimizer`` with
  ``pin_mode="block_sgd"``, which probes on the default schedule for its per-block factors) and
  fixed ``adam`` (``torch.optim.AdamW`` with weight decay 0, blockopt's Adam mode), each at its
  best learning rate from one grid shared by every mode and task;
- ``auto``: ``BlockOptimizer(model, probe)`` with every option at its default (learning rate 0.1,
  momentum 0.9, starting in SGD, default thresholds and probe schedule) and no tuning. It is told
  the training loss (``observe_loss``), so its loss-spike detection works as documented.

Reported per task and method (medians over seeds): final loss, steps to a target loss, test
accuracy (digits), optimizer-state memory (bytes of the tensors the optimizer holds at the end)
and probe overhead (time in probes over the training loop's wall time, in the same run). The
CNN trains at the edge of stability, where a single run's final loss depends on the seed more
than three seeds show, so it is also run on more seeds (``--spread-seeds``), every method at
the learning rate its sweep chose, and the spread of its final losses is reported. The
thresholds are read from ``blockopt.Thresholds()``, so the benchmark follows their defaults. It
rewrites the "Optimizer" section of docs/BENCHMARKS.md:

    python benchmarks/bench_optimizer.py     # --quick: smoke run, printed only; --no-write
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
from bench_docs import write_section
from repro_quadratic import BlockQuadratic, make_problem

import blockopt
from blockopt.optimizer.modes import BlockSGD
from blockopt.optimizer.tuner import SEARCH_BACKOFF
from blockopt.workloads import tasks
from blockopt.workloads.tasks import (
    BENCH_TASKS,
    CONTEXT,
    IMAGE_BATCH,
    MOMENTUM,
    PROBE_SHARE,
    TEXT_BATCH,
    Workload,
)

SECTION = "## Optimizer"
COMMAND = "python benchmarks/bench_optimizer.py"

GRID = tasks.LR_GRID
QUICK_GRID = (3e-4, 3e-3, 3e-2, 0.3)
FIXED = ("sgd", "block_sgd", "adam")
METHODS = (*FIXED, "auto")
TOLERANCE = 0.02  # the target: auto's final loss at most 2% above the best fixed mode's
PATIENCE = 2  # the lr grid is walked upwards until this many lrs in a row do no better
SPREAD_TASK = "cnn"  # the task also run on --spread-seeds seeds
SPREAD_SEEDS = 20
# auto's defaults, read from the signature so that the text follows them
AUTO = {
    k: v.default
    for k, v in inspect.signature(blockopt.BlockOptimizer).parameters.items()
    if k in ("lr", "momentum", "mode", "search_steps")
}


@dataclass(frozen=True)
class Task:
    """A benchmark task: a task of the shared registry (``BENCH_TASKS``) or a quadratic, and how
    it is run. ``target``: a fixed target loss, or None for 90% of the way from the initial loss
    to the best fixed mode's final loss. ``floor``: losses below it are round-off and count as
    equal."""

    spec: tasks.Task
    steps: int
    quick_steps: int
    evals: int  # evaluation points per run
    loss_name: str
    target: float | None = None
    floor: float = 0.0

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def label(self) -> str:
        return self.spec.title

    def build(self, seed: int) -> Workload:
        return self.spec.build(seed)


@dataclass
class Result:
    """One training run."""

    final: float
    curve: list[tuple[int, float]]
    accuracy: float | None
    state_bytes: int
    train_seconds: float
    probe_seconds: float
    probes: int = 0
    modes: list[tuple[int, str]] = field(default_factory=list)
    end_lr: float | None = None  # the learning rate of the mode the run ended in (blockopt)
    notes: list[str] = field(default_factory=list)
    diverged: bool = False

    @property
    def overhead(self) -> float:
        return self.probe_seconds / self.train_seconds if self.train_seconds > 0 else 0.0


# -- tasks ----------------------------------------------------------------------------------------

QUAD_DIM = 30  # coordinates per block (3 blocks)
EVAL_IMAGES = BENCH_TASKS["cnn"].eval_images  # the training digits of the reported loss
EVAL_WINDOWS = BENCH_TASKS["gpt"].eval_windows  # the text windows of the reported loss


@dataclass(frozen=True)
class QuadraticTask(tasks.Task):
    """A block-diagonal quadratic of ``repro_quadratic.py`` (``case`` heterogeneous or
    homogeneous, 3 blocks of ``dim``), trained on its gap ``L - L*``; the demo has none."""

    case: str = "heterogeneous"
    dim: int = QUAD_DIM

    def build(self, seed: int) -> Workload:
        problem = make_problem(self.case, self.dim, seed)
        model = BlockQuadratic(problem)
        with torch.no_grad():
            l_star = float(-0.5 * (problem.h * problem.w_star).sum())
            gap0 = float(model()) - l_star

        def loss() -> torch.Tensor:  # the gap L - L*: same gradient and Hessian, never negative
            return model() - l_star

        def relative_gap() -> float:
            with torch.no_grad():
                return max(float(loss()) / gap0, 0.0)

        return Workload(model, lambda _i: loss(), loss, relative_gap, limit=1e8 * gap0)


def _quadratic(case: str) -> QuadraticTask:
    """The ``case`` quadratic as a task: key ``quad_het`` or ``quad_hom``."""
    return QuadraticTask(f"quad_{case[:3]}", f"{case.capitalize()} quadratic", case)


TASKS = (
    Task(_quadratic("heterogeneous"), 2000, 300, 200, "relative gap", target=1e-6, floor=1e-12),
    Task(_quadratic("homogeneous"), 2000, 300, 200, "relative gap", target=1e-6, floor=1e-12),
    Task(BENCH_TASKS["cnn"], 400, 60, 20, "training loss"),
    Task(BENCH_TASKS["vit"], 400, 40, 20, "training loss"),
    Task(BENCH_TASKS["gpt"], 400, 40, 20, "held-out loss"),
)
BY_KEY = {t.key: t for t in TASKS}


# -- runs -----------------------------------------------------------------------------------------


def make_optimizer(method: str, lr: float | None, setup: Workload) -> torch.optim.Optimizer:
    """The optimizer of ``method``; ``auto`` ignores ``lr`` and takes blockopt's defaults."""
    if method in ("sgd", "adam"):
        assert lr is not None
        return tasks.fixed_optimizer(method, lr, setup.model)
    if method == "block_sgd":
        return blockopt.BlockOptimizer(
            setup.model, setup.probe, lr=lr, momentum=MOMENTUM, pin_mode="block_sgd"
        )
    if method == "auto":
        return blockopt.BlockOptimizer(setup.model, setup.probe)
    raise ValueError(f"unknown method {method!r}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps between steps: its per-parameter state (momentum,
    moments, step counts) and, in block SGD, the factor tensors of blocks that are slices."""
    inner = opt.active_optimizer if isinstance(opt, blockopt.BlockOptimizer) else opt
    tensors: list[torch.Tensor] = []
    for o in {id(opt): opt, id(inner): inner}.values():
        for st in o.state.values():
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
        if isinstance(o, BlockSGD):
            tensors += o.scale_tensors()
    unique = {(t.data_ptr(), t.numel(), t.element_size()) for t in tensors}
    return sum(n * size for _, n, size in unique)


def train(key: str, seed: int, method: str, lr: float | None, steps: int) -> Result:
    """Train task ``key`` for ``steps`` steps with ``method``; stop early if the loss diverges.
    Only the training steps (probes included) are timed, not the evaluations."""
    run = training(key, seed, method, lr, steps)
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


def training(
    key: str, seed: int, method: str, lr: float | None, steps: int
) -> Generator[int, None, Result]:
    """:func:`train` as a generator that pauses after each evaluation, yielding the steps made,
    and returns the result: runs in one process can take turns (``bench_long.py``)."""
    task = BY_KEY[key]
    setup = task.build(seed)
    opt = make_optimizer(method, lr, setup)
    every = max(1, steps // task.evals)
    curve = [(0, setup.eval_loss())]
    seconds = 0.0
    diverged = False
    auto = isinstance(opt, blockopt.BlockOptimizer)
    modes = [(0, opt.mode)] if auto else []
    for i in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = setup.train_loss(i)
        loss.backward()
        value = float(loss.detach())
        if auto:
            opt.observe_loss(value)
        opt.step()
        seconds += time.perf_counter() - start
        if auto and opt.mode != modes[-1][1]:
            modes.append((i, opt.mode))
        if not math.isfinite(value) or value > setup.limit:
            diverged = True
            break
        if (i + 1) % every == 0 or i + 1 == steps:
            curve.append((i + 1, setup.eval_loss()))
            paused = time.perf_counter()
            yield i + 1
            if auto and opt.recorder.clock_start is not None:
                # the other runs' turns are not this run's training time: the probe budget,
                # which reads the optimizer's training clock, must not count them
                opt.recorder.clock_start += time.perf_counter() - paused
    final = math.inf if diverged else curve[-1][1]
    if not math.isfinite(final):
        final, diverged = math.inf, True
    return Result(
        final=final,
        curve=curve,
        accuracy=None if diverged else setup.accuracy(),
        state_bytes=state_bytes(opt),
        train_seconds=seconds,
        probe_seconds=opt.probe_seconds if auto else 0.0,
        probes=len(opt.history) if auto else 0,
        modes=modes,
        end_lr=opt.mode_lrs[opt.mode] if auto else None,
        notes=[n for d in opt.history for n in d.notes if "stability" in n] if auto else [],
        diverged=diverged,
    )


def steps_to(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step at which the loss is at or below ``target``."""
    return next((s for s, v in curve if v <= target), None)


def _rank(task: Task, r: Result, lr: float) -> tuple[float, float, float]:
    """Grid order: lowest final loss (round-off counts as equal), then fewest steps to the fixed
    target if the task has one, then the smaller lr."""
    hit = steps_to(r.curve, task.target) if task.target is not None else None
    return (max(r.final, task.floor), math.inf if hit is None else hit, lr)


def sweep(key: str, seed: int, mode: str, grid: Sequence[float], steps: int) -> dict:
    """Walk the lr grid upwards, stopping once ``PATIENCE`` lrs in a row do no better than the
    best so far; returns every run made, keyed by lr."""
    task = BY_KEY[key]
    runs: dict[float, Result] = {}
    best: tuple[float, float, float] | None = None
    worse = 0
    for lr in sorted(grid):
        runs[lr] = train(key, seed, mode, lr, steps)
        rank = _rank(task, runs[lr], lr)
        if best is None or rank[:2] < best[:2]:
            best, worse = rank, 0
        else:
            worse += 1
        if worse >= PATIENCE and math.isfinite(best[0]):
            break
    return runs


# -- the benchmark --------------------------------------------------------------------------------


def _init(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def run_all(
    tasks: Sequence[Task],
    seeds: Sequence[int],
    grid: Sequence[float],
    steps: dict[str, int],
    jobs: int,
    threads: int | None,
    log: Callable[[str], None],
    spread_seeds: int = 0,
) -> dict[str, dict[str, Any]]:
    """Sweep the grid on the first seed for every fixed mode (and run auto on every seed) in
    parallel, then run each fixed mode's best lr on the other seeds; for ``SPREAD_TASK``, also
    every method on the seeds after ``seeds`` up to ``spread_seeds`` (``out[key]["spread"]``
    then holds every method's runs on all of them)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init, initargs=(threads,)) as ex:
        sweeps: dict[tuple[str, str], Future] = {}
        autos: dict[tuple[str, int], Future] = {}
        for task in reversed(tasks):  # the slow tasks first, so the pool stays busy
            for mode in FIXED:
                sweeps[task.key, mode] = ex.submit(
                    sweep, task.key, seeds[0], mode, grid, steps[task.key]
                )
            for seed in seeds:
                autos[task.key, seed] = ex.submit(
                    train, task.key, seed, "auto", None, steps[task.key]
                )
        out: dict[str, dict[str, Any]] = {
            t.key: {"sweep": {}, "best_lr": {}, "runs": {m: [] for m in METHODS}} for t in tasks
        }
        rest: dict[tuple[str, str, int], Future] = {}
        extra: dict[tuple[str, int], Future] = {}
        extra_seeds = range(max(seeds) + 1, spread_seeds) if SPREAD_TASK in steps else range(0)
        for seed in extra_seeds:
            extra["auto", seed] = ex.submit(
                train, SPREAD_TASK, seed, "auto", None, steps[SPREAD_TASK]
            )
        for (key, mode), fut in sweeps.items():
            runs = fut.result()
            task = BY_KEY[key]
            best = min(runs, key=lambda lr: _rank(task, runs[lr], lr))
            out[key]["sweep"][mode] = {lr: r.final for lr, r in runs.items()}
            out[key]["best_lr"][mode] = best
            out[key]["runs"][mode].append(runs[best])
            log(f"{key} {mode}: best lr {best:g} of {sorted(runs)}, final {runs[best].final:.4g}")
            for seed in seeds[1:]:
                rest[key, mode, seed] = ex.submit(train, key, seed, mode, best, steps[key])
            if key == SPREAD_TASK:
                for seed in extra_seeds:
                    extra[mode, seed] = ex.submit(train, key, seed, mode, best, steps[key])
        for (key, mode, _seed), fut in rest.items():
            out[key]["runs"][mode].append(fut.result())
        for (key, seed), fut in autos.items():
            r = fut.result()
            out[key]["runs"]["auto"].append(r)
            log(f"{key} auto seed {seed}: final {r.final:.4g}, modes {r.modes}, {r.probes} probes")
        if extra:
            spread = {m: list(out[SPREAD_TASK]["runs"][m]) for m in METHODS}
            for (mode, _seed), fut in extra.items():
                spread[mode].append(fut.result())
            out[SPREAD_TASK]["spread"] = spread
            log(f"{SPREAD_TASK}: every method on {len(spread['auto'])} seeds")
    return out


def summarise(task: Task, out: dict[str, Any]) -> dict[str, Any]:
    """Medians over seeds, the target loss, and the verdicts on auto."""
    runs: dict[str, list[Result]] = out["runs"]

    def floored(x: float) -> float:
        return max(x, task.floor)

    final = {m: statistics.median(floored(r.final) for r in runs[m]) for m in METHODS}
    best_fixed = min(FIXED, key=lambda m: final[m])
    best = final[best_fixed]
    start = statistics.median(r.curve[0][1] for r in runs["auto"])
    target = task.target if task.target is not None else start + 0.9 * (best - start)
    s: dict[str, Any] = {"final": final, "best_fixed": best_fixed, "target": target}
    s["steps"] = {}
    for m in METHODS:
        hits = [steps_to(r.curve, target) for r in runs[m]]
        s["steps"][m] = (
            statistics.median(math.inf if h is None else h for h in hits),
            sum(h is not None for h in hits),
            len(hits),
        )
    acc = {m: [r.accuracy for r in runs[m] if r.accuracy is not None] for m in METHODS}
    s["accuracy"] = {m: statistics.median(v) if v else None for m, v in acc.items()}
    s["memory"] = {m: statistics.median(r.state_bytes for r in runs[m]) for m in METHODS}
    s["overhead"] = {m: statistics.median(r.overhead for r in runs[m]) for m in METHODS}
    s["probes"] = {m: statistics.median(r.probes for r in runs[m]) for m in METHODS}
    s["seconds"] = {m: statistics.median(r.train_seconds for r in runs[m]) for m in METHODS}
    auto = runs["auto"]
    s["auto_modes"] = [r.modes for r in auto]
    s["auto_end_lr"] = [r.end_lr for r in auto]
    s["auto_notes"] = sorted({n for r in auto for n in r.notes})
    s["per_seed"] = {m: [floored(r.final) for r in runs[m]] for m in METHODS}
    s["lowest"] = {  # the lowest evaluated loss along each run, and its step
        m: [
            min(((floored(v), step) for step, v in r.curve), default=(math.inf, 0)) for r in runs[m]
        ]
        for m in METHODS
    }
    s["ratio"] = final["auto"] / best if best > 0 else math.inf
    s["within"] = final["auto"] <= best * (1 + TOLERANCE)
    s["worst"] = all(final["auto"] > final[m] for m in FIXED)
    s["end_modes"] = [r.modes[-1][1] for r in auto]
    return s


def spread_summary(task: Task, spread: dict[str, list[Result]]) -> dict[str, dict[str, float]]:
    """Per method, over the spread's seeds: the median, the 90th percentile and the largest
    final loss, and on how many seeds the method is the worst of the four."""
    finals = {m: [max(r.final, task.floor) for r in spread[m]] for m in METHODS}
    n = len(finals["auto"])
    worst = [max(METHODS, key=lambda m, i=i: finals[m][i]) for i in range(n)]
    return {
        m: {
            "median": statistics.median(v),
            "p90": statistics.quantiles(v, n=10, method="inclusive")[-1] if n > 1 else v[0],
            "max": max(v),
            "worst_of_four": sum(w == m for w in worst),
            "seeds": n,
        }
        for m, v in finals.items()
    }


def _loss(x: float, floor: float = 0.0) -> str:
    if not math.isfinite(x):
        return "diverged"
    if floor and x <= floor:
        return f"≤ {floor:g}"
    return f"{x:.4g}" if x >= 1e-3 else f"{x:.2e}"


def _steps(s: tuple[float, int, int]) -> str:
    med, reached, total = s
    text = "not reached" if math.isinf(med) else f"{int(med)}"
    if 0 < reached < total:
        text += f" ({reached}/{total} seeds)"
    return text


def _path(modes: list[tuple[int, str]]) -> str:
    return " → ".join(m if i == 0 else f"{m} ({i})" for i, m in modes)


def render(
    tasks: Sequence[Task],
    outs: dict[str, dict[str, Any]],
    sums: dict[str, dict[str, Any]],
    seeds: Sequence[int],
    grid: Sequence[float],
    steps: dict[str, int],
    seconds: float,
    settings: str,
) -> str:
    """The markdown section."""
    t = blockopt.Thresholds()
    lines = [
        SECTION,
        "",
        f"Regenerate: `{COMMAND}`{settings}.",
        "",
        "Each fixed mode gets its best learning rate from one grid shared by every mode and "
        f"task, {', '.join(f'{x:g}' for x in grid)}, on seed {seeds[0]} (lowest final loss; "
        f"the grid is walked upwards until {PATIENCE} learning rates in a row do no better). "
        f"Fixed `sgd` is `torch.optim.SGD` with momentum {MOMENTUM}; fixed `adam` is "
        "`torch.optim.AdamW` with weight decay 0 (blockopt's Adam mode); fixed `block_sgd` is "
        '`BlockOptimizer(model, probe, lr=lr, pin_mode="block_sgd")`, which probes on the '
        "default schedule for its per-block factors. `auto` is `BlockOptimizer(model, probe)` "
        f"with every option at its default and no tuning: learning rate {AUTO['lr']:g}, "
        f"momentum {AUTO['momentum']:g}, "
        f"starting in {AUTO['mode']}, thresholds `sgd_below={t.sgd_below:g}`, "
        f"`adam_above={t.adam_above:g}`, "
        + ("`block_ratio` off" if t.block_ratio is None else f"`block_ratio={t.block_ratio:g}`")
        + f", margin {t.margin:g}, at least {t.min_interval} steps between switches, the adaptive "
        "probe schedule, the learning-rate search at a switch; it is told the training loss "
        "through `observe_loss`. Learning rates "
        "are constant (no schedule). The probe is the loss on one fixed batch of training "
        f"examples, half a training batch ({IMAGE_BATCH // PROBE_SHARE} of "
        f"{IMAGE_BATCH} images; {TEXT_BATCH // PROBE_SHARE} of "
        f"{TEXT_BATCH} text windows of {CONTEXT} characters).",
        "",
        "Final loss: the relative gap `(L - L*)/(L0 - L*)` for the quadratics (3 blocks of "
        f"{QUAD_DIM} coordinates, κ = 5000; gaps below 1e-12 are round-off and count as equal), "
        f"the loss on {EVAL_IMAGES} fixed training images (eval mode) for the CNN and ViT, the "
        f"loss on {EVAL_WINDOWS} fixed text windows for the GPT. Target loss: a relative gap of "
        "1e-6 for the quadratics, otherwise 90% of the way from the initial loss to the best "
        "fixed mode's final loss; steps to it are counted at the evaluation points (every 10 "
        "steps for the quadratics, 20 per run otherwise). Test accuracy: the 449 held-out "
        "digits. Optimizer state: bytes of the tensors the optimizer holds at the end of the "
        "run. Probe overhead: time in probes and learning-rate searches over the wall time of "
        "the training loop (forward, backward, step, probes), same run. Every number is a "
        "median over seeds "
        f"{', '.join(map(str, seeds))}.",
        "",
    ]
    for task in tasks:
        out, s = outs[task.key], sums[task.key]
        n_params = sum(p.numel() for p in task.build(seeds[0]).model.parameters())
        lines += [
            f"### {task.label}",
            "",
            f"{n_params:,} parameters, {steps[task.key]} steps; {task.loss_name} at the start "
            f"{_loss(statistics.median(r.curve[0][1] for r in out['runs']['auto']))}, target "
            f"{_loss(s['target'])}. Best fixed mode in bold.",
            "",
            "| method | lr | final loss | steps to target | test accuracy | optimizer state "
            "| probes | probe overhead |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in METHODS:
            if m in FIXED:
                lr = f"{out['best_lr'][m]:g}"
            else:
                ends = sorted({f"{r:.2g}" for r in s["auto_end_lr"] if r is not None})
                lr = f"{AUTO['lr']:g} (ends at {' / '.join(ends)})"
            acc = s["accuracy"][m]
            name = f"**{m}**" if m == s["best_fixed"] else m
            probes = s["probes"][m]
            share = f"{s['overhead'][m]:.0%}" if probes else "-"
            lines.append(
                f"| {name} | {lr} | {_loss(s['final'][m], task.floor)} "
                f"| {_steps(s['steps'][m])} | {'-' if acc is None else f'{acc:.1%}'} "
                f"| {s['memory'][m] / 1024:.1f} KiB | {f'{probes:g}' if probes else '-'} "
                f"| {share} |"
            )
        paths = sorted({_path(p) for p in s["auto_modes"]})
        lines += ["", f"auto's modes (step of each switch): {'; '.join(paths)}."]
        if s["auto_notes"]:
            lines.append(f"Learning-rate caps: {'; '.join(s['auto_notes'])}.")
        sw = out["sweep"]
        lines += [
            "",
            "Grid, final loss on seed 0: "
            + "; ".join(
                f"{m} "
                + ", ".join(f"{lr:g}: {_loss(v, task.floor)}" for lr, v in sorted(sw[m].items()))
                for m in FIXED
            )
            + ".",
            "",
        ]
    lines += [
        "### Targets",
        "",
        f"auto within {TOLERANCE:.0%} of the best fixed mode's final loss on every task, in SGD "
        "(half Adam's optimizer memory) on the CNN, and never the worst:",
        "",
        "| task | best fixed (lr) | auto (lr at the end) | auto / best | within 2% "
        "| worst of four | auto ends in |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        s = sums[task.key]
        b = s["best_fixed"]
        ratio = f"{s['ratio']:.3f}" if s["ratio"] < 10 else f"{s['ratio']:.2g}"
        ends = " / ".join(sorted({f"{r:.2g}" for r in s["auto_end_lr"] if r is not None}))
        lines.append(
            f"| {task.label} | {b} {_loss(s['final'][b], task.floor)} "
            f"({outs[task.key]['best_lr'][b]:g}) | {_loss(s['final']['auto'], task.floor)} "
            f"({ends}) | {ratio} "
            f"| {'yes' if s['within'] else '**no**'} | {'**yes**' if s['worst'] else 'no'} "
            f"| {', '.join(sorted(set(s['end_modes'])))} |"
        )
    lines += [
        "",
        "The medians hide the spread; the final losses per seed ("
        + ", ".join(map(str, seeds))
        + "):",
        "",
        "| task | best fixed | auto | lowest along the run (step), best fixed | auto |",
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        s = sums[task.key]
        per, low, b = s["per_seed"], s["lowest"], s["best_fixed"]
        lines.append(
            f"| {task.label} | {b}: {', '.join(_loss(x, task.floor) for x in per[b])} | "
            f"{', '.join(_loss(x, task.floor) for x in per['auto'])} | "
            + " | ".join(
                ", ".join(f"{_loss(v, task.floor)} ({step})" for v, step in low[m])
                for m in (b, "auto")
            )
            + " |"
        )
    if "spread" in outs.get(SPREAD_TASK, {}):
        task, out = BY_KEY[SPREAD_TASK], outs[SPREAD_TASK]
        sp = spread_summary(task, out["spread"])
        n = sp["auto"]["seeds"]
        lines += [
            "",
            f"### Seeds ({task.label})",
            "",
            f"The CNN trains near the edge of stability, so one run's final loss depends on the "
            f"seed more than {len(seeds)} seeds can show. Every method, at the learning rate "
            f"above, on seeds 0 to {n - 1}:",
            "",
            "| method | lr | median final loss | 90th percentile | worst seed "
            "| seeds on which it is the worst of four |",
            "|---|---|---|---|---|---|",
        ]
        for m in METHODS:
            lr = f"{out['best_lr'][m]:g}" if m in FIXED else f"{AUTO['lr']:g} (defaults)"
            v = sp[m]
            lines.append(
                f"| {m} | {lr} | {_loss(v['median'], task.floor)} | {_loss(v['p90'], task.floor)} "
                f"| {_loss(v['max'], task.floor)} | {v['worst_of_four']} of {n} |"
            )
    if "cnn" in sums:
        s = sums["cnn"]
        lines += [
            "",
            f"CNN optimizer state: auto {s['memory']['auto'] / 1024:.1f} KiB (it ends in "
            f"{', '.join(sorted(set(s['end_modes'])))}), fixed SGD "
            f"{s['memory']['sgd'] / 1024:.1f} KiB, fixed block SGD "
            f"{s['memory']['block_sgd'] / 1024:.1f} KiB, fixed Adam "
            f"{s['memory']['adam'] / 1024:.1f} KiB. Block SGD is SGD with one learning rate per "
            "block: the same momentum buffer, no second moment.",
        ]
    lines += [
        "",
        f"Where auto's learning rates come from: it starts in {AUTO['mode']} at {AUTO['lr']:g}. "
        "A mode it switches to starts from the learning rate whose first step has the norm "
        "SGD's next step would have had (at step 0 SGD's momentum is still empty, so Adam's is "
        f"{AUTO['lr']:g} times the root mean square of the first gradient), then auto searches: "
        f"{AUTO['search_steps']}-step trials of the new mode on the probe's batch on the round "
        "rates 10^(k/2) (..., 0.001, 0.0032, 0.01, ...), from the one nearest that match, at most "
        "one step up and down for as long as the trials keep improving, and a switch into "
        f"Adam takes {SEARCH_BACKOFF:.3g} times the best trial's rate (a quarter decade below: "
        "ten steps reward the largest rate still stable on them); later probes re-check a "
        "searched rate downwards, to a rate that lowers the probe's loss by at least 1%, and in "
        "the SGD modes only when a trial shows the rate unstable (the loss more than doubled, "
        "by more than 1% of the first training loss). A probe that finds "
        "`lr * rho_max` more than 10 times past SGD's stability limit first cuts SGD's learning "
        "rate to half the limit (on the quadratics, whose curvature reaches 5000). The trials "
        "see only the probe's batch, never the evaluation data; their time counts as probe "
        "time. The grid lines above show how much each fixed mode's loss moves between "
        "neighbouring learning rates.",
    ]
    lines += [
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {date.today()}; the benchmark took {seconds / 60:.1f} minutes "
        f"({_cpu_seconds() / 60:.1f} CPU-minutes).",
    ]
    return "\n".join(lines).rstrip() + "\n"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers, so that a run on a busy machine
    still tells what it would take on an idle one."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, short runs, 4-point grid; no write"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the doc")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per task (default 3)")
    parser.add_argument("--tasks", nargs="*", choices=[t.key for t in TASKS], default=None)
    parser.add_argument(
        "--spread-seeds",
        type=int,
        default=SPREAD_SEEDS,
        help=f"run every method on the {SPREAD_TASK} on this many seeds (default "
        f"{SPREAD_SEEDS}; 0: only --seeds)",
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--json", type=Path, default=None, help="also save the raw results")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    tasks = [t for t in TASKS if args.tasks is None or t.key in args.tasks]
    seeds = [0] if args.quick else list(range(args.seeds))
    grid = QUICK_GRID if args.quick else GRID
    steps = {t.key: t.quick_steps if args.quick else t.steps for t in tasks}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - begin:6.0f} s] {msg}", file=sys.stderr, flush=True)

    spread = 0 if args.quick else args.spread_seeds
    outs = run_all(tasks, seeds, grid, steps, args.jobs, args.threads, log, spread)
    sums = {t.key: summarise(t, outs[t.key]) for t in tasks}
    settings = (
        f" ({args.jobs} worker processes, {args.threads} torch thread(s) each"
        + ("; a `--quick` smoke run" if args.quick else "")
        + ")"
    )
    text = render(tasks, outs, sums, seeds, grid, steps, time.perf_counter() - begin, settings)
    print(text)
    if args.json is not None:
        raw = {
            k: {
                "best_lr": o["best_lr"],
                "sweep": {m: {str(lr): v for lr, v in sw.items()} for m, sw in o["sweep"].items()},
                "runs": {m: [asdict(r) for r in rs] for m, rs in o["runs"].items()},
                "spread": {m: [r.final for r in rs] for m, rs in o.get("spread", {}).items()},
            }
            for k, o in outs.items()
        }
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if not (args.no_write or args.quick):
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
