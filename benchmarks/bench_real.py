"""Benchmark: ``blockopt.wrap`` on real architectures, against the plain optimizer it wraps.

On six models nobody here wrote (``real_models.py``: Hugging Face's GPT-2, BERT (masked LM) and
Llama (grouped-query attention) on the text of ``pydoc_data.topics``, Hugging Face's ViT, a
classifier on torch's ``nn.TransformerEncoder`` and a small ResNet with BatchNorm on
scikit-learn's digits), each model trains for the same steps on the same batches from the same
initial weights with six optimizers:

- plain ``torch.optim.SGD(lr=0.1, momentum=0.9)`` and plain ``torch.optim.AdamW(lr=1e-3)``;
- ``blockopt.wrap(SGD(...), model, probe=probe)`` and ``blockopt.wrap(AdamW(...), ...)``, every
  other option at its default; the probe is a closure over one fixed training-size batch;
- the two wrapped runs again with ``holdout=``, a closure over a second fixed batch.

Training steps are ``opt.step(closure)`` (the closure zero-grads, computes the training loss on
``batch(t)`` and backprops), so the wrapper sees the training losses. Reported per model: the
final loss (the mean over the model's evaluation set at the end, under ``torch.no_grad`` and
``model.eval()``), each wrapped run's ratio to the plain optimizer it wraps, the modes it went
through, the first probe's heterogeneity score and cost in training steps (``opt.probe_seconds``
after step 0, learning-rate search included, over the run's median step time without probes)
and the probe share at the end. The target: every wrapped run ends within 2% of (or below) the
plain optimizer it wraps, on every model. It rewrites the "Real models" section of
docs/BENCHMARKS.md:

    python benchmarks/bench_real.py     # --quick: smoke run, printed only; --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
from bench_docs import write_section
from real_models import BUILDERS, RealModel, build

import blockopt

SECTION = "## Real models"
COMMAND = "python benchmarks/bench_real.py"

STEPS = 300
QUICK_STEPS = 30
THREADS = 1
SGD_LR, MOMENTUM = 0.1, 0.9
ADAMW_LR = 1e-3
TOLERANCE = 0.02  # the target: a wrapped run's final loss at most 2% above the plain one's
TEXT_CAP = 400  # characters of a decision's text shown in the doc


@dataclass(frozen=True)
class RunSpec:
    """One of the six optimizers a model trains with."""

    key: str
    label: str
    base: str  # "sgd" or "adamw": the torch optimizer built first
    wrapped: bool
    holdout: bool = False

    @property
    def plain(self) -> str:
        """The key of the plain run this one is compared with."""
        return self.base


RUNS: tuple[RunSpec, ...] = (
    RunSpec("sgd", "SGD", "sgd", False),
    RunSpec("adamw", "AdamW", "adamw", False),
    RunSpec("wrap_sgd", "wrap(SGD)", "sgd", True),
    RunSpec("wrap_adamw", "wrap(AdamW)", "adamw", True),
    RunSpec("wrap_sgd_holdout", "wrap(SGD), holdout", "sgd", True, True),
    RunSpec("wrap_adamw_holdout", "wrap(AdamW), holdout", "adamw", True, True),
)
BY_RUN = {r.key: r for r in RUNS}
WRAPPED = tuple(r for r in RUNS if r.wrapped)


@dataclass
class RunResult:
    """One training run of one model."""

    run: str
    final: float  # mean evaluation loss at the end
    initial: float  # mean evaluation loss before training
    last_train: float  # mean training loss over the last 10% of the steps
    steps: int  # steps made (fewer when the loss stopped being finite)
    seconds: float  # wall seconds of the training loop
    cpu_share: float  # process CPU seconds over those wall seconds
    step_ms: float  # median wall milliseconds of a step without probing
    diverged: bool = False
    first_score: float | None = None
    first_probe_seconds: float | None = None  # opt.probe_seconds right after step 0
    probe_seconds: float = 0.0
    probe_share: float | None = None
    probes: int = 0
    start_mode: str | None = None
    end_mode: str | None = None
    end_lr: float | None = None  # the learning rate the end mode applies (first group)
    modes: list[tuple[int, str]] = field(default_factory=list)  # (step, mode) at each switch
    switches: list[dict[str, Any]] = field(default_factory=list)  # switched decisions
    faults: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def probe_cost_steps(self) -> float | None:
        """The first probe's seconds in training steps of this run."""
        if self.first_probe_seconds is None or self.step_ms <= 0:
            return None
        return self.first_probe_seconds / (self.step_ms / 1e3)


def make_optimizer(spec: RunSpec, m: RealModel) -> torch.optim.Optimizer:
    """The run's optimizer: the plain torch one, or it wrapped by blockopt."""
    params = [p for p in m.model.parameters() if p.requires_grad]
    if spec.base == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=SGD_LR, momentum=MOMENTUM)
    else:
        opt = torch.optim.AdamW(params, lr=ADAMW_LR)
    if not spec.wrapped:
        return opt

    def probe() -> torch.Tensor:
        return m.loss(m.probe_batch)

    options: dict[str, Any] = {}
    if spec.holdout:

        def holdout() -> torch.Tensor:
            return m.loss(m.holdout_batch)

        options["holdout"] = holdout
    return blockopt.wrap(opt, m.model, probe=probe, **options)


def _finite(x: float) -> bool:
    return math.isfinite(x)


def train(key: str, spec: RunSpec, steps: int, seed: int = 0) -> RunResult:
    """Train model ``key`` (built from ``seed``) for ``steps`` steps with ``spec``'s optimizer;
    every run of one model and seed starts from the same weights and sees the same batches."""
    m = build(key, seed)
    torch.manual_seed(seed)
    opt = make_optimizer(spec, m)
    wrapped = isinstance(opt, blockopt.BlockOptimizer)
    initial = m.eval_loss()
    losses: list[float] = []
    plain_steps: list[float] = []
    first_probe: float | None = None
    diverged = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wall, cpu = time.perf_counter(), time.process_time()
        for t in range(steps):
            b = m.batch(t)

            def closure(b: dict[str, torch.Tensor] = b) -> torch.Tensor:
                opt.zero_grad()
                loss = m.loss(b)
                loss.backward()
                return loss

            before = opt.probe_seconds if wrapped else 0.0
            t0 = time.perf_counter()
            loss = opt.step(closure)
            dt = time.perf_counter() - t0
            after = opt.probe_seconds if wrapped else 0.0
            if t == 0 and wrapped:
                first_probe = after
            if after == before:
                plain_steps.append(dt)
            losses.append(float(loss.detach()))
            if not _finite(losses[-1]):
                diverged = True
                break
        seconds = time.perf_counter() - wall
        cpu_share = (time.process_time() - cpu) / seconds if seconds > 0 else 0.0
        final = m.eval_loss()
    tail = losses[-max(1, len(losses) // 10) :]
    result = RunResult(
        run=spec.key,
        final=final,
        initial=initial,
        last_train=sum(tail) / len(tail),
        steps=len(losses),
        seconds=seconds,
        cpu_share=cpu_share,
        step_ms=1e3 * statistics.median(plain_steps) if plain_steps else math.nan,
        diverged=diverged or not _finite(final),
        warnings=sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
    )
    if wrapped:
        assert isinstance(opt, blockopt.BlockOptimizer)
        history = list(opt.history)
        result.first_score = history[0].score if history else None
        result.first_probe_seconds = first_probe
        result.probe_seconds = opt.probe_seconds
        result.probe_share = opt.probe_share
        result.probes = len(opt.spectra_history)
        result.start_mode = history[0].old_mode if history else opt.mode
        result.end_mode = opt.mode
        result.end_lr = float(opt.applied_lrs[0])
        result.modes = [(0, result.start_mode)] + [
            (d.step, d.new_mode) for d in history if d.switched
        ]
        result.switches = [
            {"step": d.step, "old": d.old_mode, "new": d.new_mode, "score": d.score, "text": d.text}
            for d in history
            if d.switched
        ]
        result.faults = [f"step {f.step}: {f.kind}: {f.message}" for f in opt.faults]
    return result


def run_model(
    key: str, runs: Sequence[RunSpec], steps: int, seed: int, log: Callable[[str], None]
) -> dict[str, RunResult]:
    """Every run of one model, in ``runs``' order."""
    out: dict[str, RunResult] = {}
    for spec in runs:
        r = train(key, spec, steps, seed)
        out[spec.key] = r
        extra = ""
        if spec.wrapped:
            extra = (
                f", {path(r.modes)}, score {_num(r.first_score, '.2f')}, first probe "
                f"{_num(r.first_probe_seconds, '.2f')} s = {_num(r.probe_cost_steps, '.0f')} "
                f"steps, share {_pct(r.probe_share)}"
            )
        log(
            f"{key} {spec.label}: final {r.final:.4f} in {r.seconds:.1f} s "
            f"({r.step_ms:.1f} ms/step, CPU {r.cpu_share:.0%}){extra}"
        )
        for w in r.warnings:
            log(f"  warning: {w[:300]}")
        for f in r.faults:
            log(f"  fault: {f[:300]}")
    return out


# -- report -------------------------------------------------------------------------------------


def path(modes: Sequence[tuple[int, str]]) -> str:
    """``sgd → adam@0``: the starting mode and each switch with its step."""
    return " → ".join(m if i == 0 else f"{m}@{s}" for i, (s, m) in enumerate(modes)) or "-"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _loss(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def ratio(results: dict[str, RunResult], spec: RunSpec) -> float:
    """A wrapped run's final loss over the plain run it wraps."""
    plain = results[spec.plain].final
    mine = results[spec.key].final
    if not (math.isfinite(plain) and math.isfinite(mine)):
        return math.inf if not math.isfinite(mine) else 0.0
    return mine / plain if plain > 0 else math.inf


def verdict(results: dict[str, RunResult], runs: Sequence[RunSpec]) -> tuple[bool, list[str]]:
    """Whether every wrapped run of ``runs`` is within the tolerance, and the ones that are
    not, as ``label ratio`` strings."""
    misses = [
        f"{s.label} {ratio(results, s):.3f}"
        for s in runs
        if s.wrapped and s.plain in results and not ratio(results, s) <= 1 + TOLERANCE
    ]
    return not misses, misses


def _clip(text: str) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= TEXT_CAP else text[: TEXT_CAP - 1] + "…"


def render(
    keys: Sequence[str],
    runs: Sequence[RunSpec],
    results: dict[str, dict[str, RunResult]],
    meta: dict[str, Any],
    steps: int,
    seed: int,
    threads: int,
    seconds: float,
    quick: bool,
    others: dict[int, dict[str, dict[str, RunResult]]] | None = None,
) -> str:
    """The markdown section; ``others`` holds the same runs from more seeds, by seed."""
    others = others or {}
    wrapped = [s for s in runs if s.wrapped]
    models = {k: build(k, seed) for k in keys}
    lines = [
        SECTION,
        "",
        f"Regenerate: `{COMMAND}"
        + (f" --more-seeds {len(others)}" if others else "")
        + f"` ({steps} steps per run, seed {seed}, {threads} torch "
        f"thread{'s' if threads != 1 else ''}"
        + ("; a `--quick` smoke run" if quick else "")
        + ").",
        "",
        "`blockopt.wrap` on architectures nobody here wrote (`benchmarks/real_models.py`): "
        "Hugging Face `GPT2LMHeadModel` and `LlamaForCausalLM` (grouped-query attention, 4 query "
        "heads on 2 key/value heads) as next-character models and `BertForMaskedLM` as a masked "
        "character model (15% of the positions predicted, masks drawn per batch) on the text of "
        "`pydoc_data.topics` (vocabulary 128, 32 characters per sequence, 16 sequences per batch; "
        "evaluated on the last 10% of the text), and Hugging Face `ViTForImageClassification` "
        "(2x2 patches), a classifier on torch's `nn.TransformerEncoder` (image rows as tokens) "
        "and a small ResNet with BatchNorm on scikit-learn's 8x8 digits (64 images per batch; "
        "evaluated on the test split). Tiny configs (2 layers, width 64), random init, dropout "
        'off, `attn_implementation="eager"`. Per model, every run starts from the same weights '
        "and sees the same batches: plain `torch.optim.SGD(lr=0.1, momentum=0.9)`, plain "
        "`torch.optim.AdamW(lr=1e-3)`, each of them wrapped, `blockopt.wrap(opt, model, "
        "probe=probe)` with every other option at its default (the probe: a closure over one "
        "fixed training-size batch), and the wrapped runs again with `holdout=` (a closure "
        "over a second fixed batch, on which learning-rate searches judge their trials). "
        "Training steps are `opt.step(closure)`, the closure computing the training loss on "
        "step t's batch, so the wrapper sees the training losses. Nothing is tuned per model.",
        "",
        f"Threads: {threads} torch intra-op thread{'s' if threads != 1 else ''} for training "
        "(`--threads`; the default is 1 because on a busy 2-core machine 2 intra-op threads "
        "made the steps several times slower); blockopt's probes run their "
        "block products on up to 2 worker threads of one intra-op thread each.",
        "",
        "Final loss: the mean loss over the evaluation set after the last step, under "
        "`torch.no_grad()` and `model.eval()`. Ratio: a wrapped run's final loss over that of "
        "the plain optimizer it wraps. Modes: the mode the run started in and each switch, "
        "`mode@step` (from `opt.history`; a switch the guard undid shows as a switch back). "
        "First score: the heterogeneity score of the first probe (`opt.history[0].score`, "
        "decades). First probe: `opt.probe_seconds` after step 0 (the probe and the "
        "learning-rate search of its switch), and that in training steps, over the run's median "
        "wall time of a step without probing. Probe share: `opt.probe_share` at the end. CPU: "
        "the process's CPU seconds over the wall seconds of the training loop; well below "
        "100% means the run waited for a core and its times are inflated. One seed"
        + (f", and {len(others)} more in [Other seeds](#other-seeds)." if others else "."),
        "",
        "### Summary",
        "",
        "| model | parameters | initial loss | "
        + " | ".join(s.label for s in runs)
        + " | first score | first probe (steps) |",
        "|---|---|---|" + "---|" * len(runs) + "---|---|",
    ]
    for k in keys:
        r = results[k]
        probe = next((r[s.key] for s in wrapped if s.key in r), None)
        first = probe.first_score if probe else None
        cost = probe.probe_cost_steps if probe else None
        init = next(iter(r.values())).initial
        lines.append(
            f"| {models[k].title} | {models[k].parameters:,} | {_loss(init)} | "
            + " | ".join(_loss(r[s.key].final) for s in runs)
            + f" | {_num(first, '.2f')} | {_num(cost, '.0f')} |"
        )
    lines += [
        "",
        "### Targets",
        "",
        f"Wrapped run within {TOLERANCE:.0%} of (or below) the plain optimizer it wraps, on "
        "every model: the ratio at most "
        f"{1 + TOLERANCE:g} for every wrapped run.",
        "",
        "| model | "
        + " | ".join(f"{s.label} / {BY_RUN[s.plain].label}" for s in wrapped)
        + " | verdict |",
        "|---|" + "---|" * len(wrapped) + "---|",
    ]
    held = 0
    for k in keys:
        ok, misses = verdict(results[k], wrapped)
        held += ok
        lines.append(
            f"| {models[k].title} | "
            + " | ".join(f"{ratio(results[k], s):.3f}" for s in wrapped)
            + " | "
            + ("holds" if ok else "**does not hold** (" + ", ".join(misses) + ")")
            + " |"
        )
    by_run = []
    for s in wrapped:
        n = sum(ratio(results[k], s) <= 1 + TOLERANCE for k in keys)
        by_run.append(f"{s.label} on {n} of {len(keys)}")
    lines += [
        "",
        f"The target holds on {held} of {len(keys)} models"
        + (" (every model)" if held == len(keys) else "")
        + "; per wrapped run, within "
        f"{TOLERANCE:.0%}: " + ", ".join(by_run) + ".",
    ]
    costs = [
        (x.probe_cost_steps, x.probe_share)
        for k in keys
        for s in wrapped
        if (x := results[k][s.key]).probe_cost_steps is not None and x.probe_share is not None
    ]
    if costs:
        steps_lo, steps_hi = min(c for c, _ in costs), max(c for c, _ in costs)
        share_lo, share_hi = min(p for _, p in costs), max(p for _, p in costs)
        lines += [
            "",
            f"The first probe (with its search) cost {steps_lo:.0f} to {steps_hi:.0f} training "
            f"steps; after {steps} steps the probe share is {share_lo:.0%} to {share_hi:.0%}.",
        ]
    if others:
        lines += _other_seeds(keys, wrapped, seed, results, others, models)
    lines.append("")
    for k in keys:
        r, m = results[k], models[k]
        step_ms = statistics.median(x.step_ms for x in r.values() if math.isfinite(x.step_ms))
        lines += [
            f"### {m.title}",
            "",
            f"{m.parameters:,} parameters; initial loss {_loss(next(iter(r.values())).initial)}; "
            f"a step without probing takes {step_ms:.1f} ms (median over the runs' medians).",
            "",
            "| run | final loss | ratio | last 10% training loss | modes | end lr | first score "
            "| first probe | probes | probe share | training s | ms per step | CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in runs:
            x = r[s.key]
            final = _loss(x.final) + (" (diverged)" if x.diverged else "")
            if s.wrapped:
                probe = (
                    f"{_num(x.first_probe_seconds, '.2f')} s = "
                    f"{_num(x.probe_cost_steps, '.0f')} steps"
                )
                cells = [
                    f"{ratio(r, s):.3f}",
                    _loss(x.last_train),
                    path(x.modes),
                    _num(x.end_lr, ".3g"),
                    _num(x.first_score, ".2f"),
                    probe,
                    str(x.probes),
                    _pct(x.probe_share),
                ]
            else:
                lr = SGD_LR if s.base == "sgd" else ADAMW_LR
                cells = ["-", _loss(x.last_train), "-", f"{lr:g}", "-", "-", "-", "-"]
            lines.append(
                f"| {s.label} | {final} | "
                + " | ".join(cells)
                + f" | {x.seconds:.1f} | {x.step_ms:.1f} | {x.cpu_share:.0%} |"
            )
        notes = []
        for s in runs:
            x = r[s.key]
            if not s.wrapped and math.isfinite(x.final) and x.final >= 0.99 * x.initial:
                notes.append(
                    f"- plain {s.label} did not learn: final loss {_loss(x.final)} against "
                    f"{_loss(x.initial)} before training."
                )
            if s.wrapped and not x.switches and x.final == r[s.plain].final:
                notes.append(
                    f"- {s.label} never switched and ends at plain {BY_RUN[s.plain].label}'s "
                    "final loss to the bit: the wrapper probed and stepped it as it was."
                )
        for s in wrapped:
            x = r[s.key]
            notes += [
                f"- {s.label}, step {d['step']}, {d['old']} → {d['new']}: {_clip(d['text'])}"
                for d in x.switches
            ]
            notes += [f"- {s.label}, probe fault at {_clip(f)}" for f in x.faults]
        warned = sorted({w for x in r.values() for w in x.warnings})
        notes += [f"- warning: {_clip(w)}" for w in warned]
        if notes:
            lines += ["", *notes]
        lines.append("")
    lines += [
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, transformers {meta.get('transformers', '-')}, {date.today()}; "
        f"the benchmark took {seconds / 60:.1f} minutes.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def _other_seeds(
    keys: Sequence[str],
    wrapped: Sequence[RunSpec],
    seed: int,
    results: dict[str, dict[str, RunResult]],
    others: dict[int, dict[str, dict[str, RunResult]]],
    models: dict[str, RealModel],
) -> list[str]:
    """The ratios of the runs from more seeds, and how often the target holds over all."""
    seeds = [seed, *others]
    every = {seed: results, **others}
    lines = [
        "",
        "### Other seeds",
        "",
        f"The same runs from seeds {', '.join(map(str, others))} (other initial weights, batches "
        "and probe batches): each wrapped run's final loss over the plain run's.",
        "",
        "| model | seed | " + " | ".join(s.label for s in wrapped) + " | target |",
        "|---|---|" + "---|" * len(wrapped) + "---|",
    ]
    for k in keys:
        for sd, res in others.items():
            ok, _ = verdict(res[k], wrapped)
            lines.append(
                f"| {models[k].title} | {sd} | "
                + " | ".join(f"{ratio(res[k], s):.3f}" for s in wrapped)
                + f" | {'holds' if ok else '**does not hold**'} |"
            )
    pairs = len(keys) * len(seeds)
    held = sum(verdict(every[sd][k], wrapped)[0] for sd in seeds for k in keys)
    by_run = [
        f"{s.label} on {sum(ratio(every[sd][k], s) <= 1 + TOLERANCE for sd in seeds for k in keys)}"
        for s in wrapped
    ]
    medians = [
        f"{models[k].title} "
        + ", ".join(
            f"{statistics.median(ratio(every[sd][k], s) for sd in seeds):.3f}" for s in wrapped
        )
        for k in keys
    ]
    lines += [
        "",
        f"Over seeds {', '.join(map(str, seeds))}, the target holds on {held} of {pairs} "
        f"(model, seed) pairs; within {TOLERANCE:.0%}, of {pairs}: " + ", ".join(by_run) + ". "
        "Median ratios over the seeds, in the order of the columns: " + "; ".join(medians) + ".",
    ]
    return lines


def raw_results(results: dict[str, dict[str, RunResult]]) -> dict[str, Any]:
    """One seed's results as plain data: every run's fields, its probe cost in training steps
    and, for a wrapped run, its ratio to the plain run it wraps."""
    return {
        k: {
            name: {
                **asdict(x),
                "probe_cost_steps": x.probe_cost_steps,
                "ratio": ratio(per_model, BY_RUN[name]) if BY_RUN[name].wrapped else None,
            }
            for name, x in per_model.items()
        }
        for k, per_model in results.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps, no write"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the doc")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {STEPS})")
    parser.add_argument(
        "--models", nargs="*", choices=tuple(BUILDERS), default=None, help="default: all"
    )
    parser.add_argument(
        "--runs", nargs="*", choices=tuple(BY_RUN), default=None, help="default: all six"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--more-seeds",
        type=int,
        default=0,
        help="also run the next N seeds and report their ratios (default 0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch intra-op threads (default {THREADS}; blockopt's probes run their block "
        "products on 2 worker threads beside it)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also save the raw results")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    steps = args.steps if args.steps is not None else QUICK_STEPS if args.quick else STEPS
    if steps < 1:
        parser.error("--steps must be at least 1")
    keys = [k for k in BUILDERS if args.models is None or k in args.models]
    wanted = set(args.runs) if args.runs is not None else set(BY_RUN)
    wanted |= {BY_RUN[k].plain for k in wanted}  # a wrapped run needs its plain run
    runs = [s for s in RUNS if s.key in wanted]
    if not keys or not runs:
        parser.error("nothing to run")
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - begin:6.0f} s] {msg}", file=sys.stderr, flush=True)

    if args.more_seeds < 0:
        parser.error("--more-seeds must be a non-negative integer")
    results = {k: run_model(k, runs, steps, args.seed, log) for k in keys}
    others = {
        sd: {k: run_model(k, runs, steps, sd, log) for k in keys}
        for sd in range(args.seed + 1, args.seed + 1 + args.more_seeds)
    }
    import transformers

    meta = {"transformers": transformers.__version__}
    elapsed = time.perf_counter() - begin
    text = render(
        keys, runs, results, meta, steps, args.seed, args.threads, elapsed, args.quick, others
    )
    print(text)
    if args.json is not None:
        raw = {
            "steps": steps,
            "seed": args.seed,
            "threads": args.threads,
            "seconds": elapsed,
            **meta,
            "models": raw_results(results),
            "more_seeds": {str(sd): raw_results(per_seed) for sd, per_seed in others.items()},
        }
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if not (args.no_write or args.quick):
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
