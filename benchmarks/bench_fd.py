"""Benchmark: finite-difference block Hessian-vector products against autograd's.

Models: the demo's tiny GPT and BatchNorm CNN (``blockopt.workloads.tasks.DEMO_TASKS``, seed 0,
at initialisation), float32, one torch thread, their probe closures and the default
``"tensor"`` partition. For each operator, :class:`blockopt.BlockHessian` (``workers=1``) and
:class:`blockopt.curvature.fd_hvp.FiniteDifferenceHessian` with the central and the forward
scheme, it reports the seconds per product (``ROUNDS`` products of every block, after the
operator's construction; median of rounds), that in training steps (zero_grad, forward,
backward, AdamW step: median of ``TRAIN_STEPS``), the construction's cost, the probe's
forward-backward passes per product (the kink test's searches included), the wall time of
the Lanczos runs, and the accuracy of ``lambda_max`` per block from
``LANCZOS_STEPS`` Lanczos steps from the same start vectors: the relative difference to
autograd's, ``|fd - autograd| / max(|autograd|, 1e-3 * the model's largest)`` (the floor keeps
blocks of nearly zero curvature, a key bias or a bias before BatchNorm, from dividing round-off
by round-off), median and max over blocks. Prints a Markdown table:

    python benchmarks/bench_fd.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import blockopt
from blockopt.curvature.fd_hvp import FiniteDifferenceHessian
from blockopt.curvature.hvp import BlockHessian
from blockopt.curvature.isolation import isolated
from blockopt.curvature.lanczos import lanczos_many, random_start
from blockopt.workloads.tasks import DEMO_TASKS

TASKS = ("gpt", "cnn")
SEED = 0
TRAIN_STEPS = 20
ROUNDS = 3
LANCZOS_STEPS = 10
FLOOR = 1e-3  # relative differences are taken against at least this share of the largest


def _train_step_seconds(key: str) -> float:
    """The median wall time of a training step on a fresh copy of the task's model."""
    work = DEMO_TASKS[key].build(SEED)
    opt = torch.optim.AdamW(work.model.parameters(), lr=1e-3)
    times = []
    for i in range(TRAIN_STEPS + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        work.train_loss(i).backward()
        opt.step()
        if i >= 2:  # the first steps allocate the optimizer state
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(make: Callable[[], object], n: int, starts: list[torch.Tensor]) -> dict[str, object]:
    """Construction time, seconds per product, evaluations per product and the Lanczos runs
    of the operator ``make()`` builds."""
    start = time.perf_counter()
    op = make()
    setup = time.perf_counter() - start
    evaluations0 = getattr(op, "evaluations", 0)
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        op.matvec_many(list(range(n)), starts)
        rounds.append((time.perf_counter() - start) / n)
    per_product = getattr(op, "evaluations", 0) - evaluations0
    start = time.perf_counter()
    runs = lanczos_many(op.matvec_many, starts, LANCZOS_STEPS)
    lanczos = time.perf_counter() - start
    return {
        "setup": setup,
        "product": statistics.median(rounds),
        "evaluations": per_product / (ROUNDS * n),
        "lanczos": lanczos,
        "lambda_max": [r.ritz_values[-1] for r in runs],
    }


def _differences(exact: list[float], approx: list[float]) -> tuple[float, float]:
    floor = FLOOR * max(abs(x) for x in exact)
    d = [abs(a - e) / max(abs(e), floor) for e, a in zip(exact, approx)]
    return statistics.median(d), max(d)


def run_task(key: str) -> list[dict[str, object]]:
    step = _train_step_seconds(key)
    work = DEMO_TASKS[key].build(SEED)
    model, probe = work.model, work.probe
    blocks = blockopt.partition(model)
    starts = [
        random_start(
            b.numel, generator=torch.Generator().manual_seed(1000 * SEED + i), dtype=torch.float32
        )
        for i, b in enumerate(blocks)
    ]
    rows = []
    with isolated(model):
        autograd = _measure(lambda: BlockHessian(probe(), blocks, workers=1), len(blocks), starts)
    rows.append({"operator": "autograd", **autograd})
    for scheme in ("central", "forward"):
        with isolated(model, second_order=False):
            fd = _measure(
                lambda s=scheme: FiniteDifferenceHessian(model, probe, blocks, scheme=s),
                len(blocks),
                starts,
            )
        fd["accuracy"] = _differences(autograd["lambda_max"], fd["lambda_max"])
        rows.append({"operator": f"fd {scheme}", **fd})
    for row in rows:
        row.update(task=key, blocks=len(blocks), step=step)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    rows = [row for key in TASKS for row in run_task(key)]
    print(
        "| task | blocks | operator | setup (s) | s / product | training steps / product | "
        "evaluations / product | Lanczos (s) | lambda_max rel. diff. median | max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        median, worst = r.get("accuracy", (None, None))
        accuracy = "- | -" if median is None else f"{median:.1e} | {worst:.1e}"
        print(
            f"| {r['task']} | {r['blocks']} | {r['operator']} | {r['setup']:.3f} | "
            f"{r['product']:.4f} | {r['product'] / r['step']:.2f} | "
            f"{r['evaluations'] or '-':.3} | {r['lanczos']:.2f} | {accuracy} |"
        )
    for key in TASKS:
        step = next(r["step"] for r in rows if r["task"] == key)
        print(f"\n{key}: training step {1000 * step:.1f} ms (median of {TRAIN_STEPS})")


if __name__ == "__main__":
    main()
