"""Benchmark: what one probe costs, in training steps, and how close its decisions stay to a
40-step reference as the Lanczos levers are turned.

Models: the demo tasks (tiny GPT on ``pydoc_data.topics`` text, tiny ViT and BatchNorm CNN on
scikit-learn's digits; ``blockopt.workloads.tasks.DEMO_TASKS``) at initialisation and after 300
steps of AdamW (lr 3e-3, weight decay 0.01), and the heterogeneous and homogeneous quadratics of
``bench_optimizer.py`` (3 blocks of 30 coordinates; their curvature does not change, so they are
probed once).

For each model state, every setting's probe (``block_spectra`` on the optimizer's default
partition) is compared with a reference of 40 Lanczos steps and no tolerance on the same batch
and seed: the heterogeneity score and its ``max_ratio``, the mode ``Thresholds().target`` picks
and the block learning-rate factors of ``block_lr_factors``. A probe's cost is its wall time
(median of repeats, settings interleaved) over the median time of a training step (zero_grad,
forward, backward, SGD step at lr 0), both on one thread (torch's and numpy's BLAS). It
rewrites the "Probe cost" section of docs/BENCHMARKS.md:

    python benchmarks/bench_probe_cost.py     # --quick: smoke run, GPT only, printed only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

import torch
from bench_docs import write_section
from bench_optimizer import _quadratic
from probe_floor import MAX_STEPS, ORACLE_EPS, Floor, floor
from torch import nn

import blockopt
from blockopt.analysis.tuning import block_lr_factors
from blockopt.curvature.blocks import Block
from blockopt.optimizer.controller import STAGE_SHARES, staged_spectra
from blockopt.optimizer.policy import SwitchPolicy
from blockopt.workloads.tasks import DEMO_TASKS, PROBE_SHARE, TextTask

SECTION = "## Probe cost"
COMMAND = "python benchmarks/bench_probe_cost.py"

SEED = 0  # model, batches and Lanczos start vectors
TRAIN_STEPS = 300  # AdamW steps before the "trained" probes
TRAIN_LR = 3e-3
TIMED_STEPS = 30  # training steps timed, before and after a state's probes
REPEATS, QUICK_REPEATS = 3, 1
# Cheap probes (the quadratics: milliseconds) are repeated until a state's settings have run
# for about MIN_SECONDS, at most MAX_REPEATS times, so that their medians are not timer noise.
MIN_SECONDS, MAX_REPEATS = 2.0, 15
REFERENCE_STEPS = 40
# The small-batch settings probe the first 1/share of a training-size batch: a half (the demo's
# probe batch, tasks.PROBE_SHARE) and a quarter.
SHARES = (PROBE_SHARE, 4)
BATCH_NAMES = {1: "full", 2: "half", 4: "quarter"}
# The acceptance bar: "equal decisions" to the reference, and the cost goal.
SCORE_TOL = 0.1  # decades
FACTOR_TOL = 0.25  # relative
GOAL = 5.0  # times cheaper than setting 1 (the optimizer's previous default)


@dataclass(frozen=True)
class Setting:
    """One probe configuration. ``share``: probe the first 1/share of the batch; ``workers``: block
    products run on this many threads (2 means two cores, the rest run on one); ``staged``:
    the optimizer's staged probe from SGD at step 0 (the largest blocks first, the rest only
    when the bound on the score they leave does not settle Adam)."""

    label: str
    steps: int
    tol: float | None
    share: int = 1
    workers: int = 1
    staged: bool = False


SETTINGS = (
    Setting("1. previous default", 10, None),
    Setting("2. tol 0.02 (default)", 10, 0.02),
    Setting("3. tol 0.05", 10, 0.05),
    Setting("4. tol 0.1", 10, 0.1),
    Setting("5. 5 steps", 5, None),
    Setting("6. quarter batch, tol 0.02", 10, 0.02, share=4),
    Setting("7. tol 0.02, 2 cores", 10, 0.02, workers=2),
    Setting("8. staged, tol 0.02", 10, 0.02, staged=True),
    Setting("9. staged, tol 0.02, 2 cores (default)", 10, 0.02, workers=2, staged=True),
    Setting(
        "10. half batch, staged, tol 0.02, 2 cores (the demo's probe)",
        10,
        0.02,
        share=PROBE_SHARE,
        workers=2,
        staged=True,
    ),
)
BASELINE, DEFAULT_SETTING, TWO_CORES = SETTINGS[0], SETTINGS[1], SETTINGS[6]
STAGED = SETTINGS[7]
REFERENCE = Setting("reference", REFERENCE_STEPS, None)


@dataclass
class Case:
    """A model state to probe: its model, training loss, full-batch probe and (for the demo
    tasks) the probes on the first 1/share of the batch, by share."""

    key: str
    title: str
    model: nn.Module
    train_loss: Callable[[int], torch.Tensor]
    probe: Callable[[], torch.Tensor]
    part_probes: dict[int, Callable[[], torch.Tensor]]
    batch: str  # the probe batch in words
    state: str = "fixed curvature"


@dataclass
class Row:
    """One setting's measurements on one model state."""

    setting: str
    seconds: list[float]
    hvps: int
    score: float
    max_ratio: float
    mode: str
    factors: dict[str, float]
    cost_steps: float = 0.0
    score_diff: float = 0.0
    ratio_diff: float = 0.0
    same_mode: bool = True
    factor_error: float = 0.0
    equal: bool = True
    cheaper: float = 1.0  # setting 1's time over this one's
    hvp_cheaper: float = 1.0  # setting 1's products over this one's
    skipped: int = 0  # blocks a staged probe left out (their factors: not compared)

    def failures(self) -> str:
        """Which parts of the bar this row misses, in words."""
        out = []
        if abs(self.score_diff) > SCORE_TOL:
            out.append(f"score {self.score_diff:+.2f}")
        if not self.same_mode:
            out.append(f"mode {self.mode}")
        if self.factor_error > FACTOR_TOL:
            out.append(f"factor {self.factor_error:.0%}")
        return ", ".join(out)


@dataclass
class Table:
    """One model state: the training step's time, the reference and every setting."""

    key: str
    title: str
    state: str
    batch: str
    blocks: int
    params: int
    step_seconds: float
    repeats: int
    reference: Row
    rows: list[Row] = field(default_factory=list)
    floor: Floor | None = None  # how few products decide as the reference does (untimed)

    @property
    def short(self) -> str:
        """A short name of the model state, for the findings."""
        if self.state.startswith("after"):
            return f"{self.key} trained"
        return f"{self.key} init" if self.state.startswith("at ") else self.key

    def row(self, s: Setting) -> Row | None:
        return next((r for r in self.rows if r.setting == s.label), None)


# -- model states ---------------------------------------------------------------------------------


def demo_case(key: str, seed: int) -> Case:
    """Demo task ``key`` at initialisation, probed on a training-size batch, and on the first
    1/share of it for each of ``SHARES``."""
    task = replace(DEMO_TASKS[key], probe_size=DEMO_TASKS[key].batch)
    work = task.build(seed)
    assert work.probe_batch is not None and work.batch_loss is not None
    x, y = work.probe_batch
    loss = work.batch_loss

    def part(n: int) -> Callable[[], torch.Tensor]:
        px, py = x[:n], y[:n]
        return lambda: loss(px, py)

    sizes = {share: x.shape[0] // share for share in SHARES}
    unit = f"windows of {task.context} characters" if isinstance(task, TextTask) else "images"
    return Case(
        key,
        task.title,
        work.model,
        work.train_loss,
        work.probe,
        {share: part(n) for share, n in sizes.items()},
        f"{x.shape[0]} {unit} ({', '.join(f'{BATCH_NAMES[k]}: {n}' for k, n in sizes.items())})",
        "at initialisation",
    )


def quadratic_case(case: str, seed: int) -> Case:
    """A quadratic of bench_optimizer.py; its loss is exact, there is no batch."""
    task = _quadratic(case)
    work = task.build(seed)
    return Case(
        task.key,
        f"{task.title} (3 blocks of {task.dim})",
        work.model,
        work.train_loss,
        work.probe,
        {},
        "none (exact loss)",
    )


def train(case: Case, steps: int) -> None:
    """``steps`` steps of AdamW (lr ``TRAIN_LR``, torch's default weight decay 0.01) on the
    case's training loss."""
    opt = torch.optim.AdamW(case.model.parameters(), lr=TRAIN_LR)
    for i in range(steps):
        opt.zero_grad()
        case.train_loss(i).backward()
        opt.step()
    opt.zero_grad()


def step_times(case: Case, n: int, offset: int = 0) -> list[float]:
    """Wall times of ``n`` training steps at lr 0 (the weights do not move)."""
    opt = torch.optim.SGD(case.model.parameters(), lr=0.0)
    times = []
    for i in range(n):
        start = time.perf_counter()
        opt.zero_grad()
        case.train_loss(offset + i).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    opt.zero_grad()
    return times


# -- probes ---------------------------------------------------------------------------------------


def probe(case: Case, blocks: Sequence[Block], s: Setting) -> tuple[float, Row, blockopt.Spectra]:
    """One probe with setting ``s``: its wall time, what the optimizer would decide, and the
    spectra."""
    closure = case.probe if s.share == 1 else case.part_probes[s.share]

    def spectra_of(
        some: Sequence[Block], stages: Sequence[Sequence[int]], until: Callable[..., bool]
    ) -> blockopt.Spectra:
        return blockopt.block_spectra(
            case.model,
            closure,
            some,
            steps=s.steps,
            seed=SEED,
            tol=s.tol,
            workers=s.workers,
            stages=stages,
            until=until,
        )

    start = time.perf_counter()
    settles = settles_adam if s.staged else None
    spectra, h, skipped, _bound = staged_spectra(blocks, spectra_of, settles)
    seconds = time.perf_counter() - start
    score, ratio = float(h), float(h.max_ratio)
    mode = blockopt.Thresholds().target(score, ratio)
    row = Row(s.label, [], spectra.hvps, score, ratio, mode, block_lr_factors(spectra))
    row.skipped = len(skipped)
    return seconds, row, spectra


def settles_adam(bound: float) -> bool:
    """What the optimizer's staged probe asks at step 0 from SGD (the default policy)."""
    return SwitchPolicy().settles_adam(0, bound, "sgd")


def measure(case: Case, settings: Sequence[Setting], repeats: int) -> Table:
    """Time the training step and every setting (repeats interleaved, so that a slow spell of
    the machine falls on all settings alike), and compare each with the reference (its numbers
    do not depend on timing, so it is timed once, or ``REPEATS`` times where probes are cheap)."""
    blocks = blockopt.partition(case.model)
    usable = [s for s in settings if s.share == 1 or s.share in case.part_probes]
    step_times(case, 3)  # warm-up
    probe(case, blocks, usable[0])
    step_seconds = step_times(case, TIMED_STEPS)
    seconds, ref, ref_spectra = probe(case, blocks, REFERENCE)
    ref.seconds.append(seconds)
    rows: dict[str, Row] = {}
    done = 0
    while done < repeats:
        start = time.perf_counter()
        for s in usable:
            seconds, row, _ = probe(case, blocks, s)
            rows.setdefault(s.label, row).seconds.append(seconds)
        done += 1
        if done == 1 and repeats > 1:  # cheap probes: more repeats, an odd number of them
            more = math.ceil(MIN_SECONDS / max(time.perf_counter() - start, 1e-9))
            repeats = max(repeats, min(MAX_REPEATS, more + 1 - more % 2))
    while repeats > REPEATS and len(ref.seconds) < REPEATS:  # cheap: a median for it too
        ref.seconds.append(probe(case, blocks, REFERENCE)[0])
    step_seconds += step_times(case, TIMED_STEPS, offset=TIMED_STEPS)
    step = statistics.median(step_seconds)
    table = Table(
        case.key,
        case.title,
        case.state,
        case.batch,
        len(blocks),
        sum(b.numel for b in blocks),
        step,
        repeats,
        ref,
    )
    ref.cost_steps = statistics.median(ref.seconds) / step
    for row in rows.values():
        row.cost_steps = statistics.median(row.seconds) / step
        row.score_diff = row.score - ref.score
        row.ratio_diff = row.max_ratio - ref.max_ratio
        row.same_mode = row.mode == ref.mode
        row.factor_error = max(
            (abs(row.factors[b] / ref.factors[b] - 1) for b in ref.factors if b in row.factors),
            default=0.0,
        )
        row.equal = not row.failures()
        table.rows.append(row)
    table.floor = floor(
        case.model,
        case.probe,
        blocks,
        ref_spectra,
        seed=SEED,
        score_tol=SCORE_TOL,
        factor_tol=FACTOR_TOL,
    )
    first = table.rows[0]
    for row in table.rows:
        row.cheaper = first.cost_steps / row.cost_steps if row.cost_steps > 0 else math.inf
        row.hvp_cheaper = first.hvps / row.hvps if row.hvps else math.inf
    return table


# -- report ---------------------------------------------------------------------------------------


def _setting_of(label: str) -> Setting:
    return next(s for s in (REFERENCE, *SETTINGS) if s.label == label)


def _levers(s: Setting) -> str:
    tol = "none" if s.tol is None else f"{s.tol:g}"
    return f"{s.steps} | {tol} | {BATCH_NAMES[s.share]} | {s.workers}"


def _products(row: Row, t: Table) -> str:
    """Products, per block probed, and how many blocks a staged probe left out."""
    probed = t.blocks - row.skipped
    text = f"{row.hvps} ({row.hvps / probed:.1f})"
    return text + (f", {probed} of {t.blocks} blocks" if row.skipped else "")


def _goal(row: Row, s: Setting) -> str:
    if s == BASELINE:
        return "(baseline)"
    if not row.equal:
        return "no: decisions differ"
    if row.cheaper < GOAL:
        return f"no: {row.cheaper:.1f}x"
    return "yes, on 2 cores" if s.workers > 1 else "yes"


def render_table(t: Table) -> list[str]:
    ref = t.reference
    lines = [
        f"### {t.title}, {t.state}",
        "",
        f"{t.blocks} blocks, {t.params:,} parameters; probe batch: {t.batch}. A training step "
        f"takes {t.step_seconds * 1e3:.2f} ms (median of {2 * TIMED_STEPS}); probe times are "
        f"medians of {t.repeats}. Reference ({REFERENCE_STEPS} steps, no tolerance, "
        f"{_runs(len(ref.seconds))}): "
        f"score {ref.score:.3f}, max_ratio {ref.max_ratio:.3f}, mode {ref.mode}, {ref.hvps} "
        f"products, {ref.cost_steps:.0f} training steps.",
        "",
        "| setting | steps | tol | batch | workers | cost (training steps) | products (per block) "
        "| score diff (decades) | max_ratio diff | same mode | worst factor error "
        "| equal decisions | cheaper than 1. (time / products) | 5x goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in t.rows:
        s = _setting_of(row.setting)
        lines.append(
            f"| {row.setting} | {_levers(s)} | {row.cost_steps:.1f} "
            f"| {_products(row, t)} | {row.score_diff:+.3f} "
            f"| {row.ratio_diff:+.3f} | {'yes' if row.same_mode else 'no'} "
            f"| {row.factor_error:.1%} | {'yes' if row.equal else 'no'} "
            f"| {row.cheaper:.1f}x / {row.hvp_cheaper:.1f}x | {_goal(row, s)} |"
        )
    return [*lines, "", *render_floor(t.floor)]


def render_floor(f: Floor | None) -> list[str]:
    """What each fixed step count misses, and the oracle's floor, for one model state."""
    if f is None:
        return []
    steps = " | ".join(str(k) for k in range(1, MAX_STEPS + 1))
    misses = " | ".join(miss or "equal" for miss in f.fixed)
    if f.oracle_products is None:
        oracle = f"no oracle tolerance of {', '.join(f'{e:g}' for e in ORACLE_EPS)} decides alike"
    else:
        oracle = (
            f"the oracle decides alike at eps {f.oracle_eps:g} with {f.oracle_products:.1f} "
            f"products per block ({MAX_STEPS / f.oracle_products:.1f}x fewer than setting 1)"
        )
    return [
        "Fewest products at equal decisions (untimed): every block the same fixed number of "
        f"steps, what each misses; {oracle}.",
        "",
        f"| fixed steps | {steps} |",
        "|---|" + "---|" * MAX_STEPS,
        f"| misses | {misses} |",
        "",
    ]


def _runs(n: int) -> str:
    return "one run" if n == 1 else f"median of {n} runs"


def _span(values: Sequence[float], unit: str = "x") -> str:
    """``min`` to ``max`` (median ``m``) of ``values``."""
    lo, hi, mid = min(values), max(values), statistics.median(values)
    return f"{lo:.1f}{unit} to {hi:.1f}{unit} (median {mid:.1f}{unit})"


def findings(tables: Sequence[Table]) -> list[str]:
    """The findings, written from the numbers: the goal, then one line per lever."""
    rows = [(t, r) for t in tables for r in t.rows if r.setting != BASELINE.label]
    met = [(t, r) for t, r in rows if r.equal and r.cheaper >= GOAL]
    best_t, best = max(((t, r) for t, r in rows if r.equal), key=lambda tr: tr[1].cheaper)
    base = [t.row(BASELINE) for t in tables]
    per_product = [r.cost_steps / r.hvps for r in base if r is not None]
    if met:
        head = (
            f"The {GOAL:g}x goal at equal decisions is met on {len(met)} of {len(rows)} "
            f"setting and model-state pairs: "
            + "; ".join(f"{r.setting} on {t.short} ({r.cheaper:.1f}x)" for t, r in met)
            + "."
        )
    else:
        head = (
            f"No setting is {GOAL:g}x cheaper than the previous default at equal decisions on "
            f"any model state: the largest saving at equal decisions is {best.cheaper:.1f}x "
            f"({best.setting}, {best_t.short})."
        )
    out = [
        head + f" The previous default costs {_span([r.cost_steps for r in base if r], '')} "
        f"training steps per probe, {_span(per_product, '')} training steps per "
        f"Hessian-vector product; {GOAL:g}x cheaper in products would mean "
        f"{BASELINE.steps / GOAL:g} products per block.",
        "",
    ]
    for s in SETTINGS[1:]:
        mine = [(t, r) for t in tables if (r := t.row(s)) is not None]
        if not mine:
            continue
        equal = sum(r.equal for _, r in mine)
        per_block = [r.hvps / (t.blocks - r.skipped) for t, r in mine]
        text = (
            f"- **{s.label}**: equal decisions on {equal} of {len(mine)} model states; "
            f"{_span([r.cheaper for _, r in mine])} cheaper than setting 1 in time, "
            f"{_span([r.hvp_cheaper for _, r in mine])} in products "
            f"({min(per_block):.1f} to {max(per_block):.1f} per block)"
        )
        failed = [f"{t.short}: {r.failures()}" for t, r in mine if not r.equal]
        if failed:
            text += f"; decisions differ on {'; '.join(failed)}"
        staged = [(t, r) for t, r in mine if r.skipped]
        if staged:
            text += (
                "; it stopped after its largest blocks on "
                + ", ".join(f"{t.short} ({t.blocks - r.skipped} of {t.blocks})" for t, r in staged)
                + " and probed every block elsewhere"
            )
        if s == STAGED:
            pairs = [(t.row(DEFAULT_SETTING), r) for t, r in mine]
            speed = [a.cost_steps / r.cost_steps for a, r in pairs if a is not None]
            text += f"; setting 2's time over this one's (what staging gains): {_span(speed)}"
        if s == TWO_CORES:
            pairs = [(t.row(DEFAULT_SETTING), r) for t, r in mine]
            same = all(
                a is not None and (a.score, a.factors, a.hvps) == (r.score, r.factors, r.hvps)
                for a, r in pairs
            )
            speed = [a.cost_steps / r.cost_steps for a, r in pairs if a is not None]
            text += (
                f"; setting 2's time over this one's (what the second core gains): "
                f"{_span(speed)}; "
                + ("results identical to setting 2's" if same else "results differ from 2's")
            )
        out.append(text + ".")
    out += ["", floor_finding(tables)]
    return out


def floor_finding(tables: Sequence[Table]) -> str:
    """The floors over every model state: how far fewer products alone could go."""
    floors = [(t, t.floor) for t in tables if t.floor is not None]
    fewest = [f"{t.short} {f.fewest_steps or f'>{MAX_STEPS}'}" for t, f in floors]
    oracle = [f.oracle_products for _, f in floors if f.oracle_products is not None]
    text = (
        "**Floors.** The fewest steps, the same for every block, at equal decisions: "
        + ", ".join(fewest)
        + f" (the {GOAL:g}x goal in products would need {BASELINE.steps / GOAL:g})."
    )
    if oracle:
        text += (
            " Even an oracle that stops each block as soon as its curvature scale stays within "
            "a tolerance of its 40-step value (the loosest of "
            f"{', '.join(f'{e:g}' for e in ORACLE_EPS)} at equal decisions) needs "
            f"{_span(oracle, '')} products per block, so a stopping rule alone saves at most "
            f"{BASELINE.steps / max(oracle):.1f}x to {BASELINE.steps / min(oracle):.1f}x in "
            "products over setting 1 from these start vectors."
        )
    return text


def render(tables: Sequence[Table], seconds: float, note: str) -> str:
    lines = [
        SECTION,
        "",
        f"Regenerate: `{COMMAND}`{note}.",
        "",
        "What one probe costs in training steps, and whether the optimizer's decisions (the "
        "heterogeneity score, the mode `Thresholds().target(score, max_ratio)` picks, the "
        "block learning-rate factors of `block_lr_factors`) stay those of a "
        f"{REFERENCE_STEPS}-step probe without tolerance on the same batch and seed. A probe's "
        "cost is its wall time (median of the repeats, settings interleaved) over the median "
        "wall time of a training step (zero_grad, forward, backward, SGD step at lr 0), both on "
        "one thread (torch's, and numpy's BLAS for the Ritz values); settings 7 and 9 run the "
        "block products on two threads (two cores) against the same one-thread training step. "
        "Settings 8 and 9 probe as the optimizer does by default (`staged=True`): the largest "
        "blocks first, in stages (the fewest largest blocks that hold "
        f"{', '.join(f'{x:.0%}' for x in STAGE_SHARES)} of the parameters, then the rest), "
        "stopping after the first stage whose lower bound on the score, whatever the blocks "
        "not yet measured hold, takes the default policy from SGD to Adam at step 0, all "
        "through one gradient graph; where they stop early, the blocks left "
        "out have no factor, and their factors (which Adam does not read) are not compared. The "
        "demo tasks are probed at "
        f"initialisation and after {TRAIN_STEPS} steps of AdamW (lr {TRAIN_LR:g}, weight decay "
        "0.01), the "
        "quadratics once (their curvature is fixed), all on the optimizer's default partition. "
        "With `tol`, a block's Lanczos run stops after two steps in a row that moved neither "
        "extreme Ritz value by more than tol of their scale. Equal decisions: score within "
        f"{SCORE_TOL:g} decades of the reference, same mode, every block factor within "
        f"{FACTOR_TOL:.0%}. The goal: at least {GOAL:g}x cheaper than setting 1 (10 steps, no "
        "tolerance, the optimizer's previous default) at equal decisions.",
        "",
    ]
    for t in tables:
        lines += render_table(t)
    lines += ["Findings:", "", *findings(tables), ""]
    lines.append(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, 1 torch thread and 1 BLAS thread, {date.today()}; the benchmark "
        f"took {seconds / 60:.1f} minutes ({_cpu_seconds() / 60:.1f} CPU-minutes); load average "
        f"{os.getloadavg()[1]:.1f} over the last 5 minutes (the machine's other work shares "
        "the cores, the second one of setting 7 included)."
    )
    return "\n".join(lines).rstrip() + "\n"


def _cpu_seconds() -> float:
    """CPU time of this process (both cores count in setting 7)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


# -- main -----------------------------------------------------------------------------------------


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Limit numpy's BLAS to one thread (threadpoolctl comes with scikit-learn, which the digits
    need): on a busy machine its second thread can hold a 30x30 ``eigh`` for a scheduler tick,
    16 ms instead of 0.04, and the probes' Ritz values are computed with numpy."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def run(quick: bool, log: Callable[[str], None]) -> list[Table]:
    """Every model state's table (GPT only with ``quick``)."""
    repeats = QUICK_REPEATS if quick else REPEATS
    keys = ["gpt"] if quick else ["gpt", "vit", "cnn"]
    tables = []
    for key in keys:
        case = demo_case(key, SEED)
        log(f"{key}: at initialisation")
        tables.append(measure(case, SETTINGS, repeats))
        log(f"{key}: training {TRAIN_STEPS} steps")
        train(case, TRAIN_STEPS)
        case.state = f"after {TRAIN_STEPS} AdamW steps"
        tables.append(measure(case, SETTINGS, repeats))
    if not quick:
        for kind in ("heterogeneous", "homogeneous"):
            log(f"{kind} quadratic")
            tables.append(measure(quadratic_case(kind, SEED), SETTINGS, repeats))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repeat, GPT only; no write"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the doc")
    parser.add_argument("--json", type=Path, default=None, help="also save the raw results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    begin = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - begin:6.0f} s] {msg}", file=sys.stderr, flush=True)

    with torch.random.fork_rng(devices=[]), one_blas_thread():
        tables = run(args.quick, log)
    note = " (here a `--quick` smoke run: 1 repeat, GPT only)" if args.quick else ""
    text = render(tables, time.perf_counter() - begin, note)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(t) for t in tables], indent=1))
    if not (args.no_write or args.quick):
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
