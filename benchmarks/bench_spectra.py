"""Benchmark: every block's Hessian spectrum of a tiny GPT, blockopt against its peers.

Measures, in one run and on one batch of real text, the wall time (median of repeats) to get every
parameter block's spectrum with 30 Lanczos steps and 1 start vector from:

- blockopt, one block per parameter tensor (as the peers), the default partition (fused Q/K/V
  split into thirds), and with vectorised (vmapped) Hessian-vector products;
- curvlinops: one ``HessianLinearOperator`` per parameter tensor with its Lanczos routine
  (``fast_lanczos``; and ``lanczos_approximate_spectrum``, which first estimates the spectrum's
  boundaries with SciPy's ``eigsh``);
- the reference procedure of Zhang et al. (2024) as described in their paper: per block, a fresh
  gradient graph, then one backward pass per Lanczos step, no reorthogonalisation;
- PyHessian for the whole-model numbers it offers (top eigenvalue, trace, density), against
  ``blockopt.model_spectrum``.

Agreement is the relative difference of each block's top Ritz value to blockopt's. Run it in an
environment that also has the peers (see docs/BENCHMARKS.md), then it rewrites that file's
"Blockwise spectra" section:

    benchmarks/.peers/venv/bin/python benchmarks/bench_spectra.py
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import date

import numpy as np
import torch
import torch.nn.functional as F
from bench_docs import write_section
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import blockopt
from blockopt.workloads.data import text_batches, text_corpus
from blockopt.workloads.models import TinyGPT

STEPS = 30
SECTION = "## Blockwise spectra"


class Flat(nn.Module):
    """TinyGPT with logits flattened to (batch * context, vocab), for tools that expect (N, C)."""

    def __init__(self, gpt: TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx).reshape(-1, self.gpt.head.out_features)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    gpt = TinyGPT()
    x, y = text_batches(text_corpus(64), 16, 32, generator=torch.Generator().manual_seed(seed))
    model = Flat(gpt)

    def probe() -> torch.Tensor:
        return F.cross_entropy(model(x), y.reshape(-1))

    return model, probe, x, y.reshape(-1)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _tridiagonal_top(alphas: list[float], betas: list[float]) -> float:
    t = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
    return float(np.linalg.eigvalsh(t.astype(np.float64))[-1])


def _plain_lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor) -> float:
    """Lanczos without reorthogonalisation (three-term recurrence only); the top Ritz value."""
    v = v / v.norm()
    v_prev, beta = torch.zeros_like(v), 0.0
    alphas, betas = [], []
    for _ in range(STEPS):
        w = matvec(v) - beta * v_prev
        alpha = float(w @ v)
        w -= alpha * v
        alphas.append(alpha)
        beta = float(w.norm())
        betas.append(beta)
        v_prev, v = v, w / beta
    return _tridiagonal_top(alphas, betas)


def paper_reference(model: nn.Module, probe: Callable[[], torch.Tensor], seed: int):
    """As described in the paper: per block, rebuild the gradient graph, then plain Lanczos with
    one backward pass per step, restricted to the block (``autograd.grad`` to its tensor)."""
    gen = torch.Generator().manual_seed(seed)
    tops = {}
    for name, p in model.named_parameters():
        with sdpa_kernel(SDPBackend.MATH):
            loss = probe()
        (g,) = torch.autograd.grad(loss, p, create_graph=True)

        def hvp(v: torch.Tensor, g=g, p=p) -> torch.Tensor:
            (hv,) = torch.autograd.grad(g, p, grad_outputs=v.view_as(p), retain_graph=True)
            return hv.reshape(-1)

        tops[name] = _plain_lanczos(hvp, torch.randn(p.numel(), generator=gen, dtype=p.dtype))
    return tops


def authors_code(model: nn.Module, probe: Callable[[], torch.Tensor], seed: int):
    """As the authors' published code does it: every Lanczos step rebuilds the gradient graph
    with ``loss.backward(create_graph=True)``, then each block's product is
    ``(g_b . v_b).backward()``, which fills ``.grad`` of every parameter, and keeps the block's
    own; plain Lanczos, all blocks in lockstep."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    v = {}
    for n, p in params.items():
        x = torch.randn(p.numel(), generator=gen, dtype=p.dtype)
        v[n] = x / x.norm()
    v_prev = {n: torch.zeros_like(x) for n, x in v.items()}
    beta = dict.fromkeys(params, 0.0)
    alphas: dict[str, list[float]] = {n: [] for n in params}
    betas: dict[str, list[float]] = {n: [] for n in params}
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):
            probe().backward(create_graph=True)
        g = {n: p.grad for n, p in params.items()}
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            (g[n] * v[n].view_as(p)).sum().backward(retain_graph=True)
            w = p.grad.detach().reshape(-1).clone() - beta[n] * v_prev[n]
            model.zero_grad(set_to_none=True)
            alpha = float(w @ v[n])
            w -= alpha * v[n]
            alphas[n].append(alpha)
            beta[n] = float(w.norm())
            betas[n].append(beta[n])
            v_prev[n], v[n] = v[n], w / beta[n]
        del g
    model.zero_grad(set_to_none=True)
    return {n: _tridiagonal_top(alphas[n], betas[n]) for n in params}


def curvlinops_blocks(model, x, y, *, boundaries: bool, progress: list[str] | None = None):
    """curvlinops takes forward-over-reverse products, which the default CPU attention kernel
    lacks as well: it runs under the math kernel too. ``progress`` collects finished blocks."""
    with sdpa_kernel(SDPBackend.MATH):
        return _curvlinops_blocks(model, x, y, boundaries=boundaries, progress=progress)


def _curvlinops_blocks(model, x, y, *, boundaries: bool, progress: list[str] | None):
    import curvlinops
    from curvlinops.papyan2020traces.spectrum import fast_lanczos

    tops = {}
    for name, p in model.named_parameters():
        op = curvlinops.HessianLinearOperator(
            model, nn.CrossEntropyLoss(), [p], [(x, y)], check_deterministic=False
        )
        if boundaries:
            # the library's spectrum routine: SciPy eigsh boundaries (tol 1e-2), then Lanczos
            curvlinops.lanczos_approximate_spectrum(op, ncv=STEPS)
            tops[name] = math.nan
        else:
            evals, _ = fast_lanczos(op, STEPS)
            tops[name] = float(evals.max())
        if progress is not None:
            progress.append(name)
    return tops


def eigsh_routine(model, x, y, budget: float) -> tuple[float, int]:
    """Seconds for curvlinops' own spectrum routine over every block, and how many blocks it
    finished; stopped (left running in a daemon thread) after ``budget`` seconds."""
    import threading

    done: list[str] = []
    start = time.perf_counter()
    worker = threading.Thread(
        target=curvlinops_blocks,
        args=(model, x, y),
        kwargs={"boundaries": True, "progress": done},
        daemon=True,
    )
    worker.start()
    worker.join(budget)
    return time.perf_counter() - start, len(done)


def pyhessian_numbers(model, x, y) -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        from pyhessian import hessian
    except ImportError as err:
        return {"import": f"not installed ({err})"}
    h = None
    calls: tuple[tuple[str, Callable[[object], object]], ...] = (
        ("construct", lambda _: hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)),
        ("eigenvalues", lambda h: h.eigenvalues(top_n=1)[0][0]),
        ("trace", lambda h: float(np.mean(h.trace(maxIter=30)))),
        ("density", lambda h: h.density(iter=STEPS, n_v=1)),
    )
    for label, call in calls:
        try:
            with sdpa_kernel(SDPBackend.MATH):
                start = time.perf_counter()
                value = call(h)
                seconds = time.perf_counter() - start
            if label == "construct":
                h = value
                out[label] = {"seconds": seconds}
            else:
                out[label] = {"value": value if label != "density" else "ok", "seconds": seconds}
        except Exception as err:  # report, do not patch
            line = traceback.format_exception_only(type(err), err)[-1].strip()
            out[label] = {"error": line[:200]}
            if label == "construct":
                break
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def dense_tops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_numel: int):
    """Top eigenvalue of every diagonal block of at most ``max_numel`` coordinates, from the
    dense block Hessian built by ``torch.func`` (reverse over reverse) in float64."""
    from torch.func import functional_call, grad, jacrev

    model64 = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in model64.named_parameters()}
    tops = {}
    for name, p in params.items():
        if p.numel() > max_numel:
            continue

        def loss(w: torch.Tensor, name: str = name) -> torch.Tensor:
            out = functional_call(model64, {**params, name: w}, (x,))
            return F.cross_entropy(out, y)

        with sdpa_kernel(SDPBackend.MATH):
            # reverse over reverse, 64 rows at a time (all at once needs tens of GB)
            h = jacrev(grad(loss), chunk_size=64)(p).reshape(p.numel(), p.numel())
        tops[name] = float(torch.linalg.eigvalsh(h)[-1])
    return tops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dense-max", type=int, default=4096, help="largest block given a dense reference"
    )
    parser.add_argument(
        "--eigsh-budget", type=float, default=180.0, help="seconds for curvlinops' eigsh routine"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the doc")
    args = parser.parse_args(argv)
    model, probe, x, y = setup()
    per_tensor = blockopt.partition(model, lambda name, p: name)
    default = blockopt.partition(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_blocks = len(per_tensor)
    rows, tops = [], {}

    def measure(label, fn, repeats, hvps, forwards, *, top=None):
        seconds, out = timed(fn, repeats)
        rows.append([label, seconds, hvps(out) if callable(hvps) else hvps, forwards])
        if top is not None:
            tops[label] = top(out)
        print(f"{label}: {seconds:.2f} s", file=sys.stderr, flush=True)
        return seconds, out

    def lambda_max(spectra) -> dict[str, float]:
        return {k: s.lambda_max for k, s in spectra.items()}

    t, _ = measure(
        "blockopt, per tensor",
        lambda: blockopt.block_spectra(model, probe, per_tensor, steps=STEPS),
        args.repeats,
        lambda s: s.hvps,
        1,
        top=lambda_max,
    )
    measure(
        "blockopt, per tensor, workers=1 (products one after another)",
        lambda: blockopt.block_spectra(model, probe, per_tensor, steps=STEPS, workers=1),
        args.repeats,
        lambda s: s.hvps,
        1,
        top=lambda_max,
    )
    measure(
        "blockopt, default partition (Q/K/V split)",
        lambda: blockopt.block_spectra(model, probe, default, steps=STEPS),
        args.repeats,
        lambda s: s.hvps,
        1,
    )
    measure(
        "blockopt, per tensor, vectorize=True",
        lambda: blockopt.block_spectra(model, probe, per_tensor, steps=STEPS, vectorize=True),
        max(1, args.repeats - 2),
        lambda s: s.hvps,
        1,
        top=lambda_max,
    )
    measure(
        "paper procedure as described (graph per block, backward to the block, no reorth.)",
        lambda: paper_reference(model, probe, 0),
        args.repeats,
        STEPS * n_blocks,
        n_blocks,
        top=dict,
    )
    measure(
        "paper procedure as in the authors' code (graph per step, backward to all tensors)",
        lambda: authors_code(model, probe, 0),
        max(1, args.repeats - 2),
        STEPS * n_blocks,
        STEPS,
        top=dict,
    )
    failures = []
    try:
        import curvlinops  # noqa: F401
    except ImportError as err:
        failures.append(f"curvlinops not installed: {err}")
    else:
        measure(
            "curvlinops, HessianLinearOperator + fast_lanczos",
            lambda: curvlinops_blocks(model, x, y, boundaries=False),
            1,
            STEPS * n_blocks,
            STEPS * n_blocks,
            top=dict,
        )
    t7, whole = timed(lambda: blockopt.model_spectrum(model, probe, steps=STEPS), args.repeats)
    ph = pyhessian_numbers(model, x, y)
    dense = dense_tops(model, x, y.reshape(-1), args.dense_max)
    base = tops["blockopt, per tensor"]
    if not failures:
        seconds, done = eigsh_routine(model, x, y, args.eigsh_budget)
        label = "curvlinops, lanczos_approximate_spectrum (eigsh boundaries + Lanczos)"
        if done < n_blocks:
            label += f": {done} of {n_blocks} blocks done when stopped at {seconds:.0f} s"
            seconds = math.inf
        rows.append([label, seconds, "30 + eigsh", "one per product"])
        print(f"{label}: {seconds:.2f} s", file=sys.stderr, flush=True)

    lines = [
        SECTION,
        "",
        "Regenerate: `benchmarks/.peers/venv/bin/python benchmarks/bench_spectra.py` after "
        "setting up the peers' environment (kept apart so that nothing pulls a CUDA build of "
        "torch):",
        "",
        "```bash",
        "python3 -m venv benchmarks/.peers/venv",
        "benchmarks/.peers/venv/bin/pip install torch==2.13.0 numpy scipy",
        "benchmarks/.peers/venv/bin/pip install --no-deps curvlinops-for-pytorch pyhessian \\",
        "    backpack-for-pytorch einconv einops linear_operator opt-einsum tqdm jaxtyping",
        "benchmarks/.peers/venv/bin/pip install --no-deps -e .",
        "```",
        "",
        f"Setup: `TinyGPT()` (2 layers, d_model 64, 4 heads, context 32, vocabulary 64; "
        f"{len(per_tensor)} parameter tensors, {n_params:,} parameters), one batch of 16 windows "
        "of `pydoc_data.topics` text, cross-entropy, float32, 30 Lanczos steps and 1 start "
        f"vector per block. {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {date.today()}; "
        f"median of {args.repeats} runs (vectorised: {max(1, args.repeats - 2)}; curvlinops with "
        "boundaries: 1).",
        "",
        "| method | blocks | seconds | vs blockopt per tensor | Hessian-vector products "
        "| forward passes |",
        "|---|---|---|---|---|---|",
    ]
    for name, seconds, hvps, forwards in rows:
        blocks = len(default) if "default" in name else n_blocks
        if math.isfinite(seconds):
            cells = f"{seconds:.2f} | {seconds / t:.2f}x"
        else:
            cells = f"> {args.eigsh_budget:.0f} | > {args.eigsh_budget / t:.0f}x"
        lines.append(f"| {name} | {blocks} | {cells} | {hvps} | {forwards} |")
    lines += [
        "",
        f"Accuracy: each block's top Ritz value against the top eigenvalue of the dense float64 "
        "block Hessian (`torch.func.jacrev` of `torch.func.grad`, `eigvalsh`) for the "
        f"{len(dense)} blocks of at most {args.dense_max:,} coordinates, and against blockopt "
        f"per tensor for all {n_blocks} blocks (relative differences):",
        "",
        "| method | vs dense: median | vs dense: max | vs blockopt: median | vs blockopt: max |",
        "|---|---|---|---|---|",
    ]
    for name, values in tops.items():
        d = [rel(values[k], dense[k]) for k in dense]
        b = [rel(values[k], base[k]) for k in base]
        lines.append(
            f"| {name} | {statistics.median(d):.1e} | {max(d):.1e} | "
            f"{statistics.median(b):.1e} | {max(b):.1e} |"
        )
    lines += [
        "",
        "Whole model (the full Hessian as one block), blockopt `model_spectrum` "
        f"({t7:.2f} s): top Ritz value {whole.lambda_max:.4g}, Hutchinson trace {whole.trace:.4g} "
        "(one start vector).",
        "",
        "PyHessian 0.1 (PyPI) on the same batch, through an adapter that flattens the logits:",
        "",
    ]
    for label, result in ph.items():
        lines.append(f"- `{label}`: {result}")
    lines += ["", *failures]
    text = "\n".join(lines).rstrip() + "\n"
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # curvlinops' eigsh routine may still run in its daemon thread past its budget; leave at once
    # rather than let interpreter shutdown abort on it.
    os._exit(status)
