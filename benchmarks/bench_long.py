"""Benchmark: blockopt's wall time over long runs, ``auto`` against the best fixed mode.

The "Optimizer" benchmark (``bench_optimizer.py``) trains for a few hundred steps, where the
probes that let ``auto`` choose its mode are a large share of the wall time. This benchmark asks
what they cost over a long run: on the tiny GPT, the tiny ViT and the BatchNorm CNN of
``bench_optimizer.py``, it trains ``auto`` (``BlockOptimizer(model, probe)``, every option at its
default) and the task's best fixed mode at its tuned learning rate (from the "Optimizer"
section of docs/BENCHMARKS.md) for 5000 steps, and the GPT also for 1500 steps, and reports the
wall ratio (auto's training-loop seconds over the fixed mode's), auto's probe share and both
final losses. Each auto / fixed pair runs in one worker process, taking turns of one
evaluation interval each (:func:`take_turns`), after a short untimed warm-up of both, with
denormal floats flushed to zero (see :func:`_init`). It rewrites the
"Long runs" section of docs/BENCHMARKS.md:

    python benchmarks/bench_long.py     # --quick: smoke run, printed only; --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from bench_docs import write_section
from bench_optimizer import AUTO, BY_KEY, Result, _cpu_seconds, _loss, _path, train, training

from blockopt.workloads.tasks import TUNED_LRS

SECTION = "## Long runs"
COMMAND = "python benchmarks/bench_long.py"

TASK_KEYS = ("gpt", "vit", "cnn")
SHORT_TASK = "gpt"  # the task also run for --short-steps
STEPS = 5000
SHORT_STEPS = 1500
QUICK_STEPS, QUICK_SHORT_STEPS = 300, 100
WARMUP_STEPS = 20  # untimed steps of every method in a worker before its timed runs
# The best fixed mode per task (the "Targets" table of the "## Optimizer" section of
# docs/BENCHMARKS.md: python benchmarks/bench_optimizer.py, 400 steps, 3 seeds) at its tuned
# learning rate, and plain SGD's tuned learning rate (blockopt.workloads.tasks.TUNED_LRS).
BEST_MODE: dict[str, str] = {"gpt": "adam", "vit": "adam", "cnn": "block_sgd"}
BEST: dict[str, tuple[str, float]] = {k: (m, TUNED_LRS[k][m]) for k, m in BEST_MODE.items()}
SGD_LR: dict[str, float] = {k: TUNED_LRS[k]["sgd"] for k in TASK_KEYS}
LONG_TARGET = 1.03  # wall ratio at --steps, every task
SHORT_TARGET = 1.10  # wall ratio at --short-steps, SHORT_TASK
TOLERANCE = 0.02  # informational: auto's final loss at most 2% above the fixed mode's


@dataclass(frozen=True)
class Setting:
    """One task at one run length, with the wall-ratio target it is held to."""

    key: str
    steps: int
    target: float
    fixed: str
    lr: float


@dataclass
class Run:
    """One timed run, with how much of a core its process got: a CPU share well below 1 means
    it waited for a core (other load on the machine) and its wall time is inflated."""

    result: Result
    seconds: float  # wall seconds of the whole call (build and evaluations included)
    cpu_seconds: float  # this process's CPU seconds over the same call

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0


def _init(threads: int, flush_denormal: bool = True) -> None:
    """Set the worker's torch threads; 0 keeps torch's default (one per core), as a user's
    training script does, so that probes run their block products on both cores too. With
    ``flush_denormal``, denormal floats become zero (``torch.set_flush_denormal``): arithmetic on
    them is slow on x86, and how many a run meets depends on its trajectory (on the tiny GPT,
    AdamW at lr 0.0032 spent 9.6% longer per forward and backward than at 0.003), so that the
    wall ratio then measures the probes and not which learning rate met more denormals."""
    if threads > 0:
        torch.set_num_threads(threads)
    if flush_denormal:
        torch.set_flush_denormal(True)


def run_pair(setting: Setting, seed: int, sgd: bool, warmup: int = WARMUP_STEPS) -> dict[str, Run]:
    """Train auto and the fixed mode (then plain SGD if asked) in turns: each run makes one
    evaluation interval of steps, then hands over, and the order of the runs reverses at every
    turn (auto first on even seeds), so that a slow spell of the machine falls on all runs
    alike; first ``warmup`` untimed steps of each, so that no timed run pays for this process's
    first forward, backward and probe."""
    s = setting
    methods: list[tuple[str, str, float | None]] = [
        ("auto", "auto", None),
        ("fixed", s.fixed, s.lr),
    ]
    if seed % 2:
        methods.reverse()
    if sgd:
        methods.append(("sgd", "sgd", SGD_LR[s.key]))
    if warmup > 0:
        for _, method, lr in methods:
            train(s.key, seed, method, lr, warmup)
    return take_turns({name: training(s.key, seed, m, lr, s.steps) for name, m, lr in methods})


def take_turns(runs: dict[str, Generator[int, None, Result]]) -> dict[str, Run]:
    """Advance every run one pause at a time, in an order that reverses at each turn, until
    all have finished; each run's wall and CPU seconds are those of its own turns."""
    wall = dict.fromkeys(runs, 0.0)
    cpu = dict.fromkeys(runs, 0.0)
    done: dict[str, Result] = {}
    order = list(runs)
    while len(done) < len(runs):
        for name in order:
            if name in done:
                continue
            w, c = time.perf_counter(), time.process_time()
            try:
                next(runs[name])
            except StopIteration as finished:
                done[name] = finished.value
            wall[name] += time.perf_counter() - w
            cpu[name] += time.process_time() - c
        order.reverse()
    return {name: Run(done[name], wall[name], cpu[name]) for name in runs}


def run_all(
    settings: Sequence[Setting],
    seeds: Sequence[int],
    sgd: bool,
    jobs: int,
    threads: int,
    log: Callable[[str], None],
    warmup: int = WARMUP_STEPS,
    flush_denormal: bool = True,
) -> dict[Setting, list[dict[str, Run]]]:
    """Every (setting, seed) pair in a pool of ``jobs`` worker processes, longest first; the
    runs of each setting in seed order."""
    ctx = multiprocessing.get_context("spawn")
    futures: dict[tuple[Setting, int], Future] = {}
    order = sorted(settings, key=lambda s: -s.steps)
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_init, initargs=(threads, flush_denormal)
    ) as ex:
        for setting in order:
            for seed in seeds:
                futures[setting, seed] = ex.submit(run_pair, setting, seed, sgd, warmup)
        out: dict[Setting, list[dict[str, Run]]] = {s: [] for s in settings}
        for (setting, seed), fut in futures.items():
            runs = fut.result()
            out[setting].append(runs)
            a, f = runs["auto"].result, runs["fixed"].result
            log(
                f"{setting.key} {setting.steps} steps seed {seed}: auto {a.train_seconds:.1f} s "
                f"({a.probes} probes, {a.probe_seconds:.1f} s), {setting.fixed} "
                f"{f.train_seconds:.1f} s, ratio {a.train_seconds / f.train_seconds:.3f}"
            )
    return out


def _steps_made(r: Result) -> int:
    """Steps a run made, up to its last evaluation point (a diverged run stops early)."""
    return r.curve[-1][0]


def summarise(setting: Setting, pairs: list[dict[str, Run]]) -> dict[str, Any]:
    """Medians over seeds per method, and the paired ratios (per seed, then their median)."""
    methods = [m for m in ("auto", "fixed", "sgd") if m in pairs[0]]
    runs = [{m: p[m].result for m in methods} for p in pairs]
    med = statistics.median

    def per(m: str, f: Callable[[Result], float]) -> float:
        return med(f(r[m]) for r in runs)

    s: dict[str, Any] = {"methods": methods, "seeds": len(runs)}
    s["train"] = {m: per(m, lambda r: r.train_seconds) for m in methods}
    s["probe"] = {m: per(m, lambda r: r.probe_seconds) for m in methods}
    s["probes"] = {m: per(m, lambda r: r.probes) for m in methods}
    s["share"] = {m: per(m, lambda r: r.overhead) for m in methods}
    s["step_ms"] = {
        m: per(m, lambda r: 1e3 * (r.train_seconds - r.probe_seconds) / max(_steps_made(r), 1))
        for m in methods
    }
    s["final"] = {m: per(m, lambda r: r.final) for m in methods}
    s["cpu"] = {m: med(p[m].cpu_share for p in pairs) for m in methods}
    s["pair_cpu"] = med(min(p["auto"].cpu_share, p["fixed"].cpu_share) for p in pairs)
    s["paths"] = {m: sorted({_path(r[m].modes) for r in runs if r[m].modes}) for m in methods}
    ratios = [r["auto"].train_seconds / r["fixed"].train_seconds for r in runs]
    s["ratios"] = ratios
    s["ratio"] = med(ratios)
    s["holds"] = s["ratio"] <= setting.target
    losses = [
        r["auto"].final / r["fixed"].final if r["fixed"].final > 0 else math.inf for r in runs
    ]
    s["loss_ratio"] = med(losses)
    s["within"] = s["loss_ratio"] <= 1 + TOLERANCE
    return s


def _label(setting: Setting) -> str:
    return f"{BY_KEY[setting.key].label}, {setting.steps} steps"


def _method(name: str, setting: Setting) -> tuple[str, str]:
    if name == "auto":
        return "auto", f"{AUTO['lr']:g} (defaults)"
    if name == "fixed":
        return f"{setting.fixed} (fixed)", f"{setting.lr:g}"
    return "sgd (fixed)", f"{SGD_LR[setting.key]:g}"


def render(
    settings: Sequence[Setting],
    sums: dict[Setting, dict[str, Any]],
    seeds: Sequence[int],
    how: str,
    seconds: float,
    quick: bool,
    warmup: int = WARMUP_STEPS,
    flushed: bool = True,
) -> str:
    """The markdown section; ``flushed``: the runs flushed denormal floats to zero."""
    fixed = "; ".join(
        f"{BY_KEY[k].label}: {m} at {lr:g}" for k, (m, lr) in BEST.items() if k in TASK_KEYS
    )
    evals = "/".join(sorted({str(BY_KEY[s.key].evals) for s in settings}))
    lines = [
        SECTION,
        "",
        f"Regenerate: `{COMMAND}` ({how}"
        + ("; a `--quick` smoke run, the targets are set for 5000 and 1500 steps" if quick else "")
        + ").",
        "",
        "Wall time over long runs. `auto` is `BlockOptimizer(model, probe)` with every option at "
        f"its default (learning rate {AUTO['lr']:g}, starting in {AUTO['mode']}, the adaptive "
        "probe schedule), told the training loss through `observe_loss`; the fixed mode is each "
        'task\'s best fixed mode at its learning rate from the "Optimizer" section above '
        f"({fixed}); fixed `block_sgd` is itself a `BlockOptimizer` that probes for its per-block "
        'factors. Tasks, probes and losses are those of the "Optimizer" section; learning '
        "rates are constant. Training seconds: the wall time of the training loop (forward, "
        "backward, step, probes and learning-rate searches); the loss is evaluated at the "
        f"start and {evals} times during a run, untimed. Probe share: "
        "probe seconds over training seconds, same run. ms per step: training seconds without "
        "probe seconds, per step. CPU share: the worker's CPU seconds over the wall seconds of "
        "the run (build and evaluations included); well below 100% means the run waited for a "
        "core and its wall time is inflated. Each auto / fixed pair runs in one worker process, "
        "in turns: each run makes one evaluation interval of steps and hands over, in an "
        "order that reverses at every turn (auto first on even seeds), so that a slow spell "
        "of the machine falls on both runs alike (auto's training clock, which its probe "
        "budget reads, stops while the other runs take their turns, so that it budgets its "
        "own time as it would alone), "
        f"after {warmup} untimed steps of each; the wall ratio is auto's training seconds "
        "over the fixed mode's in the same pair, a median over seeds "
        f"{', '.join(map(str, seeds))}; every other number is a median over them. "
        + (
            "Every run flushes denormal floats to zero (`torch.set_flush_denormal(True)`; "
            "`--keep-denormals` keeps them): "
            if flushed
            else "These runs kept denormal floats (`--keep-denormals`; by default they are "
            "flushed to zero): "
        )
        + "arithmetic on them is slow on x86, and how many a run meets depends on its "
        "trajectory, so that with them the wall ratio also measures which learning rate met "
        "more (on the tiny GPT, AdamW at 0.0032, auto's searched rate, spent 9.6% longer per "
        "forward and backward than AdamW at 0.003).",
        "",
    ]
    for setting in settings:
        s = sums[setting]
        lines += [
            f"### {_label(setting)}",
            "",
            "| method | lr | training s | probe s | probes | probe share | ms per step "
            f"without probes | CPU share | final {BY_KEY[setting.key].loss_name} | modes (step "
            "of each switch) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in s["methods"]:
            name, lr = _method(m, setting)
            probes = s["probes"][m]
            lines.append(
                f"| {name} | {lr} | {s['train'][m]:.1f} | "
                + (
                    f"{s['probe'][m]:.1f} | {probes:g} | {s['share'][m]:.1%}"
                    if probes
                    else "- | - | -"
                )
                + f" | {s['step_ms'][m]:.2f} | {s['cpu'][m]:.0%} | {_loss(s['final'][m])} | "
                f"{'; '.join(s['paths'][m]) or '-'} |"
            )
        per_seed = ", ".join(f"{x:.3f}" for x in s["ratios"])
        lines += [
            "",
            f"Wall ratio auto / {setting.fixed}: {s['ratio']:.3f}"
            + (f" (per seed: {per_seed})" if len(s["ratios"]) > 1 else "")
            + f"; final loss auto / {setting.fixed}: {s['loss_ratio']:.3f}.",
            "",
        ]
    lines += [
        "### Targets",
        "",
        f"Wall ratio at most {LONG_TARGET:g} at {STEPS} steps on every task and at most "
        f"{SHORT_TARGET:g} at {SHORT_STEPS} steps on the {BY_KEY[SHORT_TASK].label}; auto's "
        f"probe share and whether its final loss is within {TOLERANCE:.0%} of the fixed mode's "
        "are informational.",
        "",
        "| setting | fixed mode | wall ratio | target | holds | CPU share (lower of the pair) "
        f"| auto probe share | final loss auto / fixed | within {TOLERANCE:.0%} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        s = sums[setting]
        lines.append(
            f"| {_label(setting)} | {setting.fixed} {setting.lr:g} | {s['ratio']:.3f} "
            f"| ≤ {setting.target:g} | {'holds' if s['holds'] else '**does not hold**'} "
            f"| {s['pair_cpu']:.0%} | {s['share']['auto']:.1%} | {_loss(s['final']['auto'])} / "
            f"{_loss(s['final']['fixed'])} = {s['loss_ratio']:.3f} "
            f"| {'yes' if s['within'] else '**no**'} |"
        )
    lines += [
        "",
        "A wall ratio of 1.03 means that training with `auto` from its defaults took 3% longer "
        "than training with the best fixed mode at its tuned learning rate for the same number "
        "of steps, probes and searches included; the learning-rate sweep that found the fixed "
        "mode's rate is not counted. A verdict from a pair with a CPU share well below 100% "
        "was measured while other work held the cores and says little.",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {date.today()}; the benchmark took {seconds / 60:.1f} minutes "
        f"({_cpu_seconds() / 60:.1f} CPU-minutes).",
    ]
    return "\n".join(lines).rstrip() + "\n"


def parse_best(text: str) -> tuple[str, tuple[str, float]]:
    """Parse ``--best KEY=MODE:LR``."""
    try:
        key, rest = text.split("=", 1)
        mode, lr = rest.split(":", 1)
        value = float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=MODE:LR, got {text!r}") from None
    if key not in TASK_KEYS or mode not in ("sgd", "block_sgd", "adam"):
        raise argparse.ArgumentTypeError(f"unknown task or mode in {text!r}")
    return key, (mode, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_STEPS} / {QUICK_SHORT_STEPS} steps, 1 seed, no write",
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the doc")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"steps of the long runs (default {STEPS}; 0: none)"
    )
    parser.add_argument(
        "--short-steps",
        type=int,
        default=None,
        help=f"steps of the short {SHORT_TASK} run (default {SHORT_STEPS}; 0: none)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument("--tasks", nargs="*", choices=TASK_KEYS, default=None)
    parser.add_argument(
        "--best",
        type=parse_best,
        action="append",
        default=[],
        metavar="KEY=MODE:LR",
        help="override a task's fixed mode and learning rate, e.g. gpt=adam:0.001",
    )
    parser.add_argument("--no-sgd", action="store_true", help="skip the plain SGD runs")
    parser.add_argument(
        "--warmup",
        type=int,
        default=WARMUP_STEPS,
        help=f"untimed steps of each method per worker call (default {WARMUP_STEPS})",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes (max 2; default 1, so that no run shares the cores with another)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per worker (default 0: torch's default, one per core)",
    )
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormal floats to zero (by default every run does: "
        "torch.set_flush_denormal(True))",
    )
    parser.add_argument("--json", type=Path, default=None, help="also save the raw results")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    steps = args.steps if args.steps is not None else QUICK_STEPS if args.quick else STEPS
    short = (
        args.short_steps
        if args.short_steps is not None
        else QUICK_SHORT_STEPS
        if args.quick
        else SHORT_STEPS
    )
    seeds = [0] if args.quick else list(range(args.seeds))
    jobs = max(1, min(args.jobs, 2))
    best = {**BEST, **dict(args.best)}
    keys = [k for k in TASK_KEYS if args.tasks is None or k in args.tasks]
    settings = [Setting(k, steps, LONG_TARGET, *best[k]) for k in keys if steps > 0]
    if short > 0 and SHORT_TASK in keys:
        settings.append(Setting(SHORT_TASK, short, SHORT_TARGET, *best[SHORT_TASK]))
    if not settings:
        parser.error("nothing to run")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - begin:6.0f} s] {msg}", file=sys.stderr, flush=True)

    outs = run_all(
        settings,
        seeds,
        not args.no_sgd,
        jobs,
        args.threads,
        log,
        args.warmup,
        not args.keep_denormals,
    )
    sums = {s: summarise(s, outs[s]) for s in settings}

    def count(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    how = (
        f"{count(jobs, 'worker process', 'worker processes in parallel')}, "
        + (
            f"{count(args.threads, 'torch thread', 'torch threads')} each, "
            if args.threads > 0
            else f"torch's default threads ({torch.get_num_threads()}) each, "
        )
        + count(len(seeds), "seed", "seeds")
        + (", denormals kept: `--keep-denormals`" if args.keep_denormals else "")
    )
    elapsed = time.perf_counter() - begin
    text = render(
        settings, sums, seeds, how, elapsed, args.quick, args.warmup, not args.keep_denormals
    )
    print(text)
    if args.json is not None:
        raw = [
            {
                **asdict(s),
                "summary": sums[s],
                "runs": [
                    {m: {**asdict(r.result), "cpu_share": r.cpu_share} for m, r in pair.items()}
                    for pair in outs[s]
                ],
            }
            for s in settings
        ]
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if not (args.no_write or args.quick):
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
