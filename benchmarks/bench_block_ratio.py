"""Benchmark: block SGD for models whose score is in SGD's band (``Thresholds(block_ratio=2)``).

On the two BatchNorm CNNs of the other benchmarks (the bundled one, as ``blockopt demo`` trains
it, and the small ResNet of ``real_models.py``), both on scikit-learn's digits, each seed trains
from the same weights on the same batches with plain SGD (lr 0.1, momentum 0.9), with
``BlockOptimizer``/``wrap`` of it at the defaults (``block_ratio`` off: the score alone decides)
and with ``block_ratio=2`` (the score in SGD's band, but BatchNorm's blocks more than 2 decades
below the stiffest: block SGD). Reported per seed: the final training and held-out losses.
It rewrites the "Block SGD in SGD's band" section of docs/BENCHMARKS.md:

    python benchmarks/bench_block_ratio.py     # --seeds N (default 5); --no-write
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

import torch
from bench_docs import write_section
from real_models import build

import blockopt
from blockopt.workloads.tasks import DEMO_TASKS

SECTION = "## Block SGD in SGD's band"
COMMAND = "python benchmarks/bench_block_ratio.py"
STEPS = {"cnn": 400, "resnet": 300}  # as blockopt demo and bench_real train them
LR, MOMENTUM = 0.1, 0.9
RUNS = ("sgd", "default", "block_ratio=2")


@dataclass(frozen=True)
class Run:
    """One training run's final losses and the modes it went through."""

    train: float
    held_out: float
    modes: str


def _optimizer(kind: str, model: torch.nn.Module, probe: Callable[[], torch.Tensor]):
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    if kind == "sgd":
        return sgd
    options = {} if kind == "default" else {"thresholds": blockopt.Thresholds(block_ratio=2.0)}
    return blockopt.wrap(sgd, model, probe=probe, **options)


def _modes(opt: torch.optim.Optimizer) -> str:
    if not isinstance(opt, blockopt.BlockOptimizer):
        return "-"
    start = opt.history[0].old_mode if opt.history else opt.mode
    return " → ".join([start] + [f"{d.new_mode}@{d.step}" for d in opt.history if d.switched])


def run_cnn(kind: str, seed: int) -> Run:
    """The bundled BatchNorm CNN as ``blockopt demo`` trains it; held out: the test digits."""
    work = DEMO_TASKS["cnn"].build(seed)
    torch.manual_seed(seed)
    opt = _optimizer(kind, work.model, work.probe)
    for i in range(STEPS["cnn"]):
        opt.zero_grad()
        loss = work.train_loss(i)
        loss.backward()
        if isinstance(opt, blockopt.BlockOptimizer):
            opt.observe_loss(float(loss.detach()))
        opt.step()
    metrics = work.evaluate()
    return Run(metrics["train_loss"], metrics["held_out_loss"], _modes(opt))


def run_resnet(kind: str, seed: int) -> Run:
    """The real-models benchmark's ResNet; held out: its evaluation set (the test digits)."""
    m = build("resnet", seed)
    torch.manual_seed(seed)
    opt = _optimizer(kind, m.model, lambda: m.loss(m.probe_batch))
    losses = []
    for t in range(STEPS["resnet"]):
        b = m.batch(t)

        def closure(b: dict[str, torch.Tensor] = b) -> torch.Tensor:
            opt.zero_grad()
            loss = m.loss(b)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    tail = losses[-STEPS["resnet"] // 10 :]
    return Run(sum(tail) / len(tail), m.eval_loss(), _modes(opt))


MODELS = {
    "cnn": (
        "BatchNorm CNN (bundled, `blockopt demo`)",
        run_cnn,
        "the loss on all training digits (eval mode)",
    ),
    "resnet": ("ResNet (BatchNorm), `real_models.py`", run_resnet, "mean of the last 10% steps"),
}


def render(results: dict[str, dict[int, dict[str, Run]]], minutes: float) -> str:
    lines = [
        SECTION,
        "",
        f"Regenerate: `{COMMAND}` (seeds 0 to {len(next(iter(results.values()))) - 1}, 1 torch "
        "thread).",
        "",
        "Below `sgd_below` the score says one learning rate suits the bulk of the weights, but "
        "a BatchNorm CNN's gains and biases sit 2.5 to 3.4 decades below its stiffest blocks "
        "(`max_ratio`). `Thresholds(block_ratio=2)` sends such a model to block SGD, whose "
        "per-block rates (up to `max_factor=100` times the stiffest block's) let those blocks "
        "learn faster; the default (`block_ratio=None`) keeps SGD. Each seed trains from the same "
        "weights on the same batches with plain `torch.optim.SGD(lr=0.1, momentum=0.9)`, with it "
        "wrapped at the defaults, and wrapped with `block_ratio=2`. Held out: the test digits. "
        "Ratio: the held-out loss over plain SGD's on the same seed.",
    ]
    for key, per_seed in results.items():
        title, _, train_what = MODELS[key]
        lines += [
            "",
            f"### {title}",
            "",
            f"{STEPS[key]} steps; train: {train_what}.",
            "",
            "| seed | SGD train / held out | default: modes, train / held out, ratio | "
            "block_ratio=2: modes, train / held out, ratio |",
            "|---|---|---|---|",
        ]
        ratios: dict[str, list[float]] = {k: [] for k in RUNS[1:]}
        for seed, runs in per_seed.items():
            sgd = runs["sgd"]
            cells = [str(seed), f"{sgd.train:.2g} / {sgd.held_out:.4f}"]
            for k in RUNS[1:]:
                r = runs[k]
                ratio = r.held_out / sgd.held_out
                ratios[k].append(ratio)
                cells.append(f"{r.modes}, {r.train:.2g} / {r.held_out:.4f}, {ratio:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        medians = ", ".join(
            f"{k} {statistics.median(v):.3f} ({sum(x > 1.02 for x in v)} of {len(v)} above 1.02)"
            for k, v in ratios.items()
        )
        lines += ["", f"Median held-out ratio to plain SGD: {medians}."]
    lines += [
        "",
        f"{platform.machine()}, torch {torch.__version__}, {date.today()}; the benchmark took "
        f"{minutes:.1f} minutes.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be a positive integer, got {args.seeds}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: dict[str, dict[int, dict[str, Run]]] = {}
    for key, (_, run, _) in MODELS.items():
        results[key] = {}
        for seed in range(args.seeds):
            results[key][seed] = {k: run(k, seed) for k in RUNS}
            cells = ", ".join(
                f"{k} {r.train:.2g}/{r.held_out:.4f} ({r.modes})"
                for k, r in results[key][seed].items()
            )
            print(f"{key} seed {seed}: {cells}", flush=True)
    text = render(results, (time.perf_counter() - start) / 60)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
