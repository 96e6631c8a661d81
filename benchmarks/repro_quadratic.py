"""Reproduction (b): the quadratic case study, single-lr GD vs per-block lr vs Adam.

``L(w) = 1/2 w^T H w - h^T w`` with a block-diagonal ``H`` (3 blocks, each a random rotation of a
diagonal) of condition number 5000, in two cases holding the *same* eigenvalues: heterogeneous
(each block holds one of the ranges [1, 2], [99, 100], [4998, 5000]) and homogeneous (each block
holds a third of each range). For each case and seed it measures

- the blockwise spectra with :func:`blockopt.block_spectra` (Lanczos steps = block dimension, so
  the extreme Ritz values are the blocks' extreme eigenvalues) and their
  :func:`blockopt.heterogeneity` score;
- the iterations that single-lr GD (best lr on a grid, and the textbook ``2/(lambda_min +
  lambda_max)``), GD with one lr per block taken from blockopt's block extremes, and
  ``torch.optim.Adam`` (best lr on a grid, default betas) need to bring the relative loss gap
  ``(L - L*) / (L_0 - L*)`` below 1e-3 and 1e-6.

The lr grids run as one batched float64 computation (the gradient is ``H w - h``); a check runs
``torch.optim.Adam`` and ``torch.optim.SGD`` (one param group per block) on the ``nn.Module`` with
autograd gradients at the chosen lrs and reports how far their loss curves are from the batched
ones.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from repro_common import Section, save_figure, table
from torch import nn

import blockopt

RANGES = ((1.0, 2.0), (99.0, 100.0), (4998.0, 5000.0))
CASES = ("heterogeneous", "homogeneous")
TOLERANCES = (1e-3, 1e-6)
BETAS = (0.9, 0.999)
EPS = 1e-8
CHECK_STEPS = 300

CLAIM = (
    "**Paper's claim.** Zhang et al. (2024) study `L(w) = 1/2 wᵀHw - hᵀw` with a block-diagonal "
    "`H` of condition number 5000. When the blocks hold *different* eigenvalue ranges (e.g. "
    "[1, 2], [99, 100], [4998, 5000]: heterogeneous), gradient descent with one learning rate "
    "needs far more iterations than Adam; when every block holds the *same* spread of "
    "eigenvalues (homogeneous), GD and Adam are alike. Single-lr GD needs about `κ log(1/ε)` "
    "steps with `κ` the condition number of the whole `H`; a learning rate per block removes "
    "the cross-block part of `κ`, leaving only the largest within-block condition number."
)


@dataclass(frozen=True)
class Problem:
    """One quadratic: per-block Hessians ``H[b]`` (n x n), minimiser ``w_star`` and start ``w0``
    (both ``(B, n)``) and the eigenvalues each block was built from."""

    case: str
    seed: int
    H: torch.Tensor  # (B, n, n)
    w_star: torch.Tensor  # (B, n)
    w0: torch.Tensor  # (B, n)
    eigenvalues: tuple[tuple[float, ...], ...]

    @property
    def h(self) -> torch.Tensor:
        return (self.H @ self.w_star.unsqueeze(-1)).squeeze(-1)


class BlockQuadratic(nn.Module):
    """``1/2 w^T H w - h^T w`` with one parameter tensor per diagonal block of ``H``."""

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.blocks = nn.ParameterList(nn.Parameter(w.clone()) for w in problem.w0)
        self.register_buffer("H", problem.H.clone())
        self.register_buffer("h", problem.h.clone())

    def forward(self) -> torch.Tensor:
        loss = torch.zeros((), dtype=self.H.dtype)
        for b, w in enumerate(self.blocks):
            loss = loss + 0.5 * w @ (self.H[b] @ w) - self.h[b] @ w
        return loss


def make_problem(case: str, n: int, seed: int) -> Problem:
    """Eigenvalues drawn uniformly inside each range (its ends included, so the condition number
    is exactly 5000); the homogeneous case deals the same eigenvalues out round-robin, so both
    cases share one full spectrum and one set of rotations, and differ only in the blocks."""
    if n % len(RANGES) or n < 2 * len(RANGES):
        raise ValueError(
            f"the block dimension must be a multiple of {len(RANGES)}, at least 6; got {n}"
        )
    rng = np.random.default_rng(seed)
    ranges = []
    for lo, hi in RANGES:
        inner = np.sort(rng.uniform(lo, hi, n - 2))
        ranges.append(np.concatenate([[lo], inner, [hi]]))
    if case == "heterogeneous":
        eig = ranges
    elif case == "homogeneous":
        k = len(RANGES)
        eig = [np.sort(np.concatenate([r[b::k] for r in ranges])) for b in range(k)]
    else:
        raise ValueError(f"unknown case {case!r}")
    blocks = []
    for values in eig:
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        q = q * np.sign(np.diag(r))  # Haar-distributed rotation
        blocks.append((q * values) @ q.T)
    H = torch.tensor(np.stack(blocks), dtype=torch.float64)
    H = 0.5 * (H + H.transpose(1, 2))
    w_star = torch.tensor(rng.standard_normal((len(RANGES), n)), dtype=torch.float64)
    return Problem(
        case=case,
        seed=seed,
        H=H,
        w_star=w_star,
        w0=torch.zeros_like(w_star),
        eigenvalues=tuple(tuple(float(x) for x in e) for e in eig),
    )


def measure_spectra(problem: Problem) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """blockopt's view of the problem: its heterogeneity and each block's (lambda_min,
    lambda_max)."""
    model = BlockQuadratic(problem)
    n = problem.w0.shape[1]
    spectra = blockopt.block_spectra(model, lambda: model(), steps=n, seed=problem.seed)
    h = blockopt.heterogeneity(spectra)
    extremes = [(s.lambda_min, s.lambda_max) for s in spectra.values()]
    true = [(min(e), max(e)) for e in problem.eigenvalues]
    error = max(
        abs(m - t) / t for pair, ref in zip(extremes, true) for m, t in zip(pair, ref, strict=True)
    )
    e = problem.w0 - problem.w_star
    gap0 = 0.5 * (e * (problem.H @ e.unsqueeze(-1)).squeeze(-1)).sum(dim=1)  # per block
    info = {
        "initial_gap_share": [float(x) for x in gap0 / gap0.sum()],
        "spread": h.spread,
        "max_ratio": h.max_ratio,
        "js": h.js,
        "scales": list(h.scales),
        "blocks": list(h.blocks),
        "lambda_min": [lo for lo, _ in extremes],
        "lambda_max": [hi for _, hi in extremes],
        "max_rel_error_vs_true_extremes": error,
        "hvps": spectra.hvps,
    }
    return info, extremes


def run_grid(
    problems: list[Problem], gd_lrs: np.ndarray, adam_lrs: np.ndarray, iters: int
) -> np.ndarray:
    """Relative loss gaps, shape ``(iters + 1, P, G_gd + G_adam)``, of every problem under GD
    with per-block lrs ``gd_lrs`` ``(P, B, G_gd)`` and Adam with lrs ``adam_lrs`` ``(G_adam,)``.

    The Adam rows follow ``torch.optim.Adam``'s update (default betas and eps, bias
    correction), batched over problems and lrs in float64 numpy (for these many tiny steps
    numpy's per-operation cost is several times lower than torch's)."""
    H = np.stack([p.H.numpy() for p in problems])  # (P, B, n, n)
    w_star = np.stack([p.w_star.numpy() for p in problems])[:, :, None, :]  # (P, B, 1, n)
    h = w_star @ H
    g_gd, g_adam = gd_lrs.shape[-1], len(adam_lrs)
    w = np.repeat(np.stack([p.w0.numpy() for p in problems])[:, :, None, :], g_gd + g_adam, 2)
    gd_lr = np.asarray(gd_lrs, dtype=np.float64)[..., None]  # (P, B, G_gd, 1)
    adam_lr = np.asarray(adam_lrs, dtype=np.float64).reshape(1, 1, -1, 1)
    m = np.zeros_like(w[:, :, g_gd:])
    v = np.zeros_like(m)
    gaps = np.empty((iters + 1, len(problems), g_gd + g_adam))
    beta1, beta2 = BETAS
    for t in range(iters + 1):
        g = w @ H  # H symmetric: (w H)_i = (H w)_i
        g -= h
        gaps[t] = 0.5 * ((w - w_star) * g).sum(axis=(1, 3))
        if t == iters:
            break
        w[:, :, :g_gd] -= gd_lr * g[:, :, :g_gd]
        ga = g[:, :, g_gd:]
        m += (1 - beta1) * (ga - m)
        v *= beta2
        v += (1 - beta2) * ga * ga
        step = t + 1
        denom = np.sqrt(v) / math.sqrt(1 - beta2**step)
        denom += EPS
        w[:, :, g_gd:] -= (adam_lr / (1 - beta1**step)) * m / denom
    with np.errstate(invalid="ignore", divide="ignore"):
        return gaps / gaps[0]


def iterations_to(gaps: np.ndarray, tol: float, *, first: bool = False) -> int | None:
    """First iteration after which the relative gap stays at or below ``tol`` for the rest of
    the run (``None`` if it is above ``tol`` at the end or not finite); with ``first=True``,
    the first iteration at which it is at or below ``tol`` at all."""
    ok = gaps <= tol
    if first:
        hits = np.nonzero(ok)[0]
        return int(hits[0]) if hits.size else None
    if not ok[-1]:
        return None
    above = np.nonzero(~ok)[0]
    return int(above[-1] + 1) if above.size else 0


def _rank(gaps: np.ndarray, tol: float, *, first: bool = False) -> tuple[float, float]:
    """Sort key for picking a grid's best lr for ``tol``: fewest iterations, then the smallest
    final gap."""
    k = iterations_to(gaps, tol, first=first)
    final = float(gaps[-1]) if math.isfinite(float(gaps[-1])) else math.inf
    return (math.inf if k is None else float(k), final)


def check_with_torch_optim(
    problem: Problem, adam_lr: float, block_lrs: list[float], steps: int
) -> dict[str, float]:
    """Run torch.optim.Adam and torch.optim.SGD (one param group per block) on the module, with
    autograd gradients, and return the largest relative deviation of their loss gaps from the
    batched computation up to the first step where the batched gap falls below 1e-10 of its start
    (below that the module's ``L - L*`` is round-off)."""
    gd = np.asarray(block_lrs, dtype=np.float64).reshape(1, -1, 1)
    batched = run_grid([problem], gd, np.asarray([adam_lr]), steps)
    loss_star = float(-0.5 * (problem.h * problem.w_star).sum())
    out: dict[str, float] = {}
    for col, label in ((1, "adam"), (0, "sgd_per_block")):
        model = BlockQuadratic(problem)
        if label == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=adam_lr)
        else:
            opt = torch.optim.SGD(
                [{"params": [p], "lr": lr} for p, lr in zip(model.blocks, block_lrs)]
            )
        curve = []
        for t in range(steps + 1):
            opt.zero_grad()
            loss = model()
            curve.append(loss.detach().item() - loss_star)
            if t < steps:
                loss.backward()
                opt.step()
        rel = np.asarray(curve) / curve[0]
        ref = batched[:, 0, col]
        low = np.nonzero(~(ref > 1e-10))[0]
        stop = int(low[0]) if low.size else len(ref)
        out[label] = float(np.max(np.abs(rel[:stop] - ref[:stop]) / ref[:stop]))
    return out


def _fmt_iters(values: list[int | None], cap: int) -> str:
    reached = [v for v in values if v is not None]
    med = statistics.median(math.inf if v is None else v for v in values)
    text = f"> {cap:,}" if math.isinf(med) else f"{int(med):,}"
    if 0 < len(reached) < len(values):
        text += f" ({len(reached)}/{len(values)} seeds)"
    return text


def _fmt_gap(gap: float) -> str:
    return "< 1e-15 (round-off)" if abs(gap) < 1e-15 else f"{gap:.3g}"


def _fmt_lr(values: list[Any]) -> str:
    if isinstance(values[0], list):
        suffix = " (seed 0)" if len(values) > 1 else ""
        return ", ".join(f"{x:.3g}" for x in values[0]) + suffix
    return " / ".join(f"{x:.3g}" for x in sorted({float(f"{v:.3g}") for v in values}))


METHODS = (
    ("gd_grid", "GD, one lr (best on grid)"),
    ("gd_opt", "GD, one lr 2/(λmin+λmax)"),
    ("block_max", "GD, lr per block 1/λmax_b"),
    ("block_opt", "GD, lr per block 2/(λmin_b+λmax_b)"),
    ("adam", "Adam (best lr on grid)"),
    ("adam_first", "Adam, first time below ε (best lr for that)"),
)
PLOTTED = ("gd_grid", "gd_opt", "block_max", "block_opt", "adam", "adam_first")


def measure(
    seeds: list[int], n: int, iters: int, gd_grid: int, adam_grid: list[float]
) -> dict[str, Any]:
    """Spectra, heterogeneity and iteration counts for both cases and every seed, with the
    relative loss gap curves of seed ``seeds[0]`` at the chosen lrs."""
    problems = [make_problem(case, n, seed) for case in CASES for seed in seeds]
    grid_factors = np.geomspace(0.1, 1.99, gd_grid)
    spectra, gd_rows, kappas = [], [], []
    for p in problems:
        info, ext = measure_spectra(p)
        spectra.append(info)
        lo, hi = min(e[0] for e in ext), max(e[1] for e in ext)
        rows = [[c / hi] * len(ext) for c in grid_factors]
        rows.append([2.0 / (lo + hi)] * len(ext))
        rows.append([1.0 / b_hi for _, b_hi in ext])
        rows.append([2.0 / (b_lo + b_hi) for b_lo, b_hi in ext])
        gd_rows.append(np.asarray(rows).T)  # (B, G)
        kappas.append({"single": hi / lo, "per_block": max(b_hi / b_lo for b_lo, b_hi in ext)})
    gd_lrs = np.stack(gd_rows)
    gaps = run_grid(problems, gd_lrs, np.asarray(adam_grid), iters)
    adam_cols = list(range(gd_grid + 3, gd_grid + 3 + len(adam_grid)))
    families = {
        "gd_grid": list(range(gd_grid)),
        "gd_opt": [gd_grid],
        "block_max": [gd_grid + 1],
        "block_opt": [gd_grid + 2],
        "adam": adam_cols,
        "adam_first": adam_cols,
    }
    results: dict[str, Any] = {c: {"seeds": [], "spectra": [], "kappa": []} for c in CASES}
    curves: dict[str, dict[str, list[float]]] = {c: {} for c in CASES}
    sweep: dict[str, list[list[dict[str, Any]]]] = {c: [] for c in CASES}
    for i, p in enumerate(problems):
        res = results[p.case]
        res["seeds"].append(p.seed)
        res["spectra"].append(spectra[i])
        res["kappa"].append(kappas[i])
        for key, cols in families.items():
            first = key == "adam_first"
            entry = res.setdefault(key, {"final_gap": [], "min_gap": []})
            for tol in TOLERANCES:  # best lr per tolerance; the tightest one's run is kept
                best = min(cols, key=lambda j: _rank(gaps[:, i, j], tol, first=first))
                curve = gaps[:, i, best]
                if key.startswith("adam"):
                    lr: Any = adam_grid[best - adam_cols[0]]
                elif key.startswith("gd"):
                    lr = float(gd_lrs[i, 0, best])
                else:
                    lr = [float(x) for x in gd_lrs[i, :, best]]
                entry.setdefault(f"lr_{tol:g}", []).append(lr)
                entry.setdefault(f"iters_{tol:g}", []).append(
                    iterations_to(curve, tol, first=first)
                )
            entry["final_gap"].append(float(curve[-1]))
            entry["min_gap"].append(float(np.nanmin(curve)))
            if p.seed == seeds[0] and key in PLOTTED:
                curves[p.case][key] = [float(x) for x in curve]
        sweep[p.case].append(
            [
                {
                    "lr": adam_grid[k],
                    **{f"iters_{tol:g}": iterations_to(gaps[:, i, j], tol) for tol in TOLERANCES},
                    **{
                        f"first_{tol:g}": iterations_to(gaps[:, i, j], tol, first=True)
                        for tol in TOLERANCES
                    },
                    "final_gap": float(gaps[-1, i, j]),
                    "min_gap": float(np.nanmin(gaps[:, i, j])),
                }
                for k, j in enumerate(adam_cols)
            ]
        )
    check = {}
    for case in CASES:
        p = next(q for q in problems if q.case == case and q.seed == seeds[0])
        res = results[case]
        lr_key = f"lr_{TOLERANCES[-1]:g}"
        check[case] = check_with_torch_optim(
            p, res["adam"][lr_key][0], res["block_max"][lr_key][0], min(CHECK_STEPS, iters)
        )
    return {
        "results": results,
        "sweep": sweep,
        "curves": curves,
        "check": check,
        "gd_grid_factors": [float(c) for c in grid_factors],
    }


def _figure(curves: dict[str, dict[str, list[float]]], fig_dir: Path, seed: int) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = {
        "gd_grid": ("C0", "-"),
        "gd_opt": ("C0", ":"),
        "block_max": ("C2", "-"),
        "block_opt": ("C2", "--"),
        "adam": ("C3", "-"),
        "adam_first": ("C1", "-"),
    }
    labels = dict(METHODS)
    for ax, case in zip(axes, CASES):
        for key in PLOTTED:
            y = np.asarray(curves[case][key])
            x = np.arange(len(y))
            y = np.where(y > 1e-16, y, np.nan)  # below round-off: nothing left to plot
            color, ls = styles[key]
            thin = key == "adam_first"
            label = {
                "adam": "Adam, best lr to stay below ε",
                "adam_first": "Adam, best lr to first reach ε",
            }.get(key, labels[key])
            ax.plot(
                x[1:],
                y[1:],
                color=color,
                ls=ls,
                lw=0.8 if thin else 1.3,
                alpha=0.7 if thin else 1.0,
                zorder=3 if key == "gd_opt" else 2,
                label=label,
            )
        ax.axhline(TOLERANCES[-1], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(1e-14, 3)
        ax.set_title(f"{case} blocks (seed {seed})")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3, which="major")
    axes[0].set_ylabel("relative loss gap (L - L*) / (L0 - L*)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "Block-diagonal quadratic, κ = 5000, same full spectrum in both panels; "
        "dashed grey: ε = 1e-6",
        y=1.01,
    )
    return save_figure(fig, fig_dir, "b_quadratic")


def _median_iters(entry: dict[str, Any], tol: float) -> float:
    return statistics.median(math.inf if v is None else v for v in entry[f"iters_{tol:g}"])


def run(fig_dir: Path, *, quick: bool = False) -> Section:
    seeds = [0] if quick else [0, 1, 2]
    n = 12 if quick else 60
    iters = 2000 if quick else 20000
    gd_grid = 4 if quick else 9
    adam_grid = [1e-3, 1e-2, 1e-1, 1.0] if quick else [float(x) for x in np.logspace(-4, 0, 9)]
    out = measure(seeds, n, iters, gd_grid, adam_grid)
    res = out["results"]
    tight = TOLERANCES[-1]

    het_rows = []
    for case in CASES:
        sp = res[case]["spectra"]
        het_rows.append(
            [
                case,
                statistics.median(s["spread"] for s in sp),
                statistics.median(s["max_ratio"] for s in sp),
                statistics.median(s["js"] for s in sp),
                ", ".join(f"{x:.4g}" for x in sp[0]["lambda_min"]),
                ", ".join(f"{x:.4g}" for x in sp[0]["lambda_max"]),
                max(s["max_rel_error_vs_true_extremes"] for s in sp),
            ]
        )
    method_rows = []
    for case in CASES:
        r = res[case]
        for key, label in METHODS:
            e = r[key]
            if key.startswith("adam"):
                kappa = "-"
            else:
                kappa = f"{r['kappa'][0]['per_block' if key.startswith('block') else 'single']:.4g}"
            cells: list[Any] = [case, label, kappa]
            for tol in TOLERANCES:
                cells.append(_fmt_iters(e[f"iters_{tol:g}"], iters))
                cells.append(_fmt_lr(e[f"lr_{tol:g}"]))
            cells.append(_fmt_gap(statistics.median(e["final_gap"])))
            method_rows.append(cells)
    sweep_rows = []
    for k, lr in enumerate(adam_grid):
        row: list[Any] = [f"{lr:.3g}"]
        for case in CASES:
            per_seed = [seed_rows[k] for seed_rows in out["sweep"][case]]
            row.append(_fmt_iters([s[f"first_{tight:g}"] for s in per_seed], iters))
            row.append(_fmt_iters([s[f"iters_{tight:g}"] for s in per_seed], iters))
            row.append(_fmt_gap(statistics.median(s["final_gap"] for s in per_seed)))
        sweep_rows.append(row)

    check = out["check"]
    worst_check = max(v for c in check.values() for v in c.values())
    measurement = "\n\n".join(
        [
            "**Our measurement.** `L(w) = 1/2 wᵀHw - hᵀw`, float64, 3 blocks of "
            f"{n} coordinates, one parameter tensor per block; each block is `Q_b diag(λ) Q_bᵀ` "
            "with a random rotation `Q_b`; `w* ~ N(0, I)`, `h = Hw*`, start `w0 = 0`. "
            "Eigenvalues are uniform inside [1, 2], [99, 100] and [4998, 5000] (ends included, "
            "so κ = 5000 exactly). *Heterogeneous*: block b holds range b. *Homogeneous*: the same "
            "eigenvalues dealt out round-robin, so each block holds a third of every range and "
            "both cases have the same full spectrum. Seeds "
            f"{', '.join(map(str, seeds))} (eigenvalues, rotations, `w*`); medians over seeds.",
            f"Blockwise spectra from `blockopt.block_spectra(model, probe, steps={n})` (steps = "
            "block dimension, so `lambda_min`/`lambda_max` are the block extremes; last column: "
            "largest relative error against the eigenvalues the blocks were built from, over "
            "all seeds and blocks) and `blockopt.heterogeneity`:",
            table(
                [
                    "case",
                    "spread",
                    "max_ratio",
                    "js",
                    "λmin per block (seed 0)",
                    "λmax per block (seed 0)",
                    "extreme error",
                ],
                het_rows,
            ),
            "Iterations until the relative loss gap `(L - L*)/(L0 - L*)` falls to ε and stays "
            f"there for the rest of the run (cap {iters:,}; `> {iters:,}` = not reached). "
            f"Single-lr GD: best of {gd_grid} lrs `c/λmax`, `c` log-spaced in [0.1, 1.99] (2 is "
            "the stability limit), and the textbook `2/(λmin+λmax)`; per-block GD: `1/λmax_b` "
            "and `2/(λmin_b+λmax_b)`. Every λ here is blockopt's measured block extreme (the "
            "extremes of H are the extremes over its blocks). Adam: `torch.optim.Adam` update, "
            "default betas and eps, lrs "
            f"{', '.join(f'{x:.3g}' for x in adam_grid)}. Best lr = fewest iterations to each "
            "ε separately (ties: smallest final gap); `a / b` lists the different lrs chosen "
            "over seeds; the last column is the gap of the run chosen for ε = 1e-6. The last "
            "Adam row counts the first time the gap is at or below ε instead. κ: the condition "
            "number the method faces, λmax/λmin of H for one lr, the largest λmax_b/λmin_b for "
            "per-block lrs (seed 0).",
            table(
                [
                    "case",
                    "method",
                    "κ",
                    *(x for tol in TOLERANCES for x in (f"iters to {tol:g}", "lr")),
                    f"gap at {iters:,}",
                ],
                method_rows,
            ),
            f"Adam over its lr grid (ε = {tight:g}; medians over seeds):",
            table(
                [
                    "Adam lr",
                    "heterogeneous: first below ε",
                    "stays below ε",
                    f"gap at {iters:,}",
                    "homogeneous: first below ε",
                    "stays below ε",
                    f"gap at {iters:,}",
                ],
                sweep_rows,
            ),
            "The grids run as one batched float64 computation (gradient `Hw - h`). Check: "
            "`torch.optim.Adam` and `torch.optim.SGD` with one param group per block, on the "
            f"`nn.Module` with autograd gradients, at the chosen lrs (seed {seeds[0]}, first "
            f"{min(CHECK_STEPS, iters):,} steps) reproduce the batched loss gaps within a "
            f"relative {worst_check:.1e}.",
            _figure(out["curves"], fig_dir, seeds[0]),
        ]
    )
    return Section(
        key="b",
        title="Quadratic case study: GD vs per-block lr vs Adam",
        markdown="\n\n".join([CLAIM, measurement, _agreement(res, iters)]),
        data={
            "seeds": seeds,
            "block_dim": n,
            "blocks": len(RANGES),
            "ranges": [list(r) for r in RANGES],
            "iterations_cap": iters,
            "tolerances": list(TOLERANCES),
            "adam_lrs": adam_grid,
            "adam_betas": list(BETAS),
            "adam_eps": EPS,
            "gd_grid_factors": out["gd_grid_factors"],
            "results": res,
            "adam_sweep": out["sweep"],
            "check_torch_optim_max_rel_dev": check,
        },
    )


def _agreement(res: dict[str, Any], iters: int) -> str:
    loose, tight = TOLERANCES

    def it(case: str, key: str, tol: float = tight) -> float:
        return _median_iters(res[case][key], tol)

    def txt(x: float) -> str:
        return f"> {iters:,}" if math.isinf(x) else f"{int(x):,}"

    def ratio(a: float, b: float) -> str:  # GD / Adam
        if math.isinf(b):
            return "n/a"
        return f"> {iters / b:.0f}x" if math.isinf(a) else f"{a / b:.1f}x"

    het, hom = CASES
    sp = {c: statistics.median(s["spread"] for s in res[c]["spectra"]) for c in CASES}
    gd = {c: it(c, "gd_grid") for c in CASES}
    adam = {c: it(c, "adam") for c in CASES}
    first = {c: it(c, "adam_first") for c in CASES}
    gd_l = {c: it(c, "gd_grid", loose) for c in CASES}
    adam_l = {c: it(c, "adam", loose) for c in CASES}
    flat = statistics.median(s["initial_gap_share"][0] for s in res[het]["spectra"])
    # a run that never reached eps counts as cap + 1 iterations (a lower bound)
    gd_b = {c: min(gd[c], iters + 1) for c in CASES}
    adam_b = {c: min(adam[c], iters + 1) for c in CASES}
    adam_wins_het = math.isfinite(adam[het]) and gd_b[het] >= 3 * adam[het]
    alike_hom = max(adam_b[hom], gd_b[hom]) <= 3 * min(adam_b[hom], gd_b[hom])
    if adam_wins_het and alike_hom:
        verdict = "Agrees, at the tight tolerance"
    elif adam[het] < gd[het]:
        verdict = "Partly agrees"
    else:
        verdict = "Disagrees on Adam"
    block_het, block_hom = it(het, "block_max"), it(hom, "block_max")
    bound = math.log(1 / tight) * 5000 / 4
    parts = [
        f"**Agreement.** {verdict}. The score tells the cases apart although the full spectrum "
        f"is the same: spread {sp[het]:.2f} decades (heterogeneous) against {sp[hom]:.2f} "
        "(homogeneous).",
        f"To ε = {tight:g}, best single-lr GD needs {txt(gd[het])} (heterogeneous) and "
        f"{txt(gd[hom])} (homogeneous) iterations; Adam, counted until the gap stays below ε, "
        f"{txt(adam[het])} and {txt(adam[hom])} (GD/Adam {ratio(gd[het], adam[het])} and "
        f"{ratio(gd[hom], adam[hom])}); counted at the first time it reaches ε, "
        f"{txt(first[het])} and {txt(first[hom])} (GD/Adam {ratio(gd[het], first[het])} and "
        f"{ratio(gd[hom], first[hom])}). Under either count Adam's advantage is much larger "
        "with heterogeneous blocks, as claimed"
        + (
            "; with homogeneous blocks it is small or reversed, within the factor of 3 we call "
            "alike."
            if alike_hom
            else "; with homogeneous blocks the two still differ by more than a factor of 3."
        ),
        f"Two qualifications. First, the contrast is a late-phase effect: to {loose:g} every "
        f"method needs about as long in both cases (GD {txt(gd_l[het])} / {txt(gd_l[hom])}, "
        f"Adam {txt(adam_l[het])} / {txt(adam_l[hom])}), because the flattest block holds only "
        f"{flat:.1e} of the initial loss gap (the gap weighs each direction by its eigenvalue); "
        "the cases only part once the stiff directions are solved and the flat ones hold most "
        "of what is left. Second, constant-lr Adam does not settle at the minimum of a "
        "quadratic: at larger lrs it drives the gap far below ε, then, as the gradient and Adam's "
        "second-moment estimate decay, its effective step `lr/√v` grows until the iterate is "
        "thrown back out, and the gap keeps oscillating at a level that grows with the lr "
        "(sweep table, figure). A gap that must *stay* below ε needs a small lr, which slows "
        "the early phase; that is why the two Adam counts differ.",
        "Single-lr GD needs the same count in both cases: it is rotation-invariant and sees "
        "only the full spectrum, which the two cases share. Its count is well below the "
        f"worst-case `κ ln(1/ε)/4` ≈ {bound:,.0f} for the same reason as above, and the "
        "textbook `2/(λmin+λmax)`, which leaves the stiffest directions contracting by only "
        "`(κ-1)/(κ+1)` per step, is much slower than the best grid lr just below the "
        "stability limit.",
        "Per-block learning rates do exactly what the κ argument says: with heterogeneous "
        f"blocks, `1/λmax_b` from blockopt's spectra reaches ε in {txt(block_het)} iterations "
        "(κ per block at most 2); with homogeneous blocks they gain nothing "
        f"({txt(block_hom)}: `1/λmax_b` is half the best single lr, and "
        "`2/(λmin_b+λmax_b)` is no better than the single `2/(λmin+λmax)`), since every "
        "block spans κ ≈ 5000 itself. Adam's per-coordinate scaling sees a block's rotated "
        "coordinates, not its eigenvectors, so it can undo a block's overall scale but not "
        "the spread within a block: it acts roughly like a per-block lr, which is why it helps "
        "in the heterogeneous case only.",
    ]
    return " ".join(parts)
