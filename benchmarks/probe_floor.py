"""How few Lanczos products a probe can take and still decide as a 40-step probe does.

Start vectors depend only on the seed and the block's name, so ``block_spectra(steps=k)`` is
the first ``k`` steps of every longer run from the same vectors: probing once per ``k`` gives
each block's whole convergence history. Two floors follow, both against the reference's
decisions (score, mode, block factors) under the bar of ``bench_probe_cost.py``:

- fixed steps: the fewest steps ``k``, the same for every block, at equal decisions;
- an oracle stopping rule: each block stops at the first step from which its curvature scale
  stays within ``eps`` of the 40-step value, which no real rule can know; the cheapest ``eps``
  at equal decisions bounds what any per-block stopping rule could save from these vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import blockopt
from blockopt.analysis.tuning import block_lr_factors
from blockopt.curvature.blocks import Block
from blockopt.curvature.spectra import BlockSpectrum, Spectra

MAX_STEPS = 10  # the optimizer's step cap: the floors are searched below it
ORACLE_EPS = (0.02, 0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Decisions:
    """What a probe decides: the score, ``max_ratio``, the mode and every block's factor."""

    score: float
    max_ratio: float
    mode: str
    factors: Mapping[str, float]

    @classmethod
    def of(cls, spectra: Mapping[str, BlockSpectrum]) -> Decisions:
        h = blockopt.heterogeneity(spectra)
        score, ratio = float(h), float(h.max_ratio)
        mode = blockopt.Thresholds().target(score, ratio)
        return cls(score, ratio, mode, block_lr_factors(spectra))

    def misses(self, ref: Decisions, score_tol: float, factor_tol: float) -> str:
        """The parts of the bar these decisions miss against ``ref``, in words ('' if none)."""
        out = []
        if abs(self.score - ref.score) > score_tol:
            out.append(f"score {self.score - ref.score:+.2f}")
        if self.mode != ref.mode:
            out.append(f"mode {self.mode}")
        error = max((abs(self.factors[b] / ref.factors[b] - 1) for b in ref.factors), default=0.0)
        if error > factor_tol:
            out.append(f"factor {error:.0%}")
        return ", ".join(out)


@dataclass(frozen=True)
class Floor:
    """One model state's floors: per fixed step count, what it misses (in order from 1 to
    ``MAX_STEPS``); the fewest fixed steps at equal decisions (``None``: none below the cap);
    the oracle's cheapest ``eps`` at equal decisions and its products per block."""

    blocks: int
    fixed: tuple[str, ...]
    fewest_steps: int | None
    oracle_eps: float | None
    oracle_products: float | None  # per block, at oracle_eps


def _scale(s: BlockSpectrum) -> float:
    return max(abs(s.lambda_max), abs(s.lambda_min))


def floor(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    blocks: Sequence[Block],
    reference: Spectra,
    *,
    seed: int,
    score_tol: float,
    factor_tol: float,
) -> Floor:
    """The floors of one model state against ``reference`` (a longer probe from ``seed``)."""
    ref = Decisions.of(reference)
    runs = [
        blockopt.block_spectra(model, probe, blocks, steps=k, seed=seed, tol=None)
        for k in range(1, MAX_STEPS + 1)
    ]
    fixed = tuple(Decisions.of(s).misses(ref, score_tol, factor_tol) for s in runs)
    fewest = next((k for k, miss in enumerate(fixed, 1) if not miss), None)
    oracle_eps = oracle_products = None
    for eps in sorted(ORACLE_EPS, reverse=True):  # loosest first: the cheapest that holds
        chosen, products = [], 0
        for name in reference:
            target = _scale(reference[name])
            stop = MAX_STEPS
            for k in range(MAX_STEPS, 0, -1):  # the first step from which it stays within eps
                if abs(_scale(runs[k - 1][name]) - target) > eps * target:
                    break
                stop = k
            chosen.append(runs[stop - 1][name])
            products += runs[stop - 1][name].steps
        mixed = Spectra(chosen, steps=MAX_STEPS, probes=1, seed=seed, dtype=reference.dtype)
        if not Decisions.of(mixed).misses(ref, score_tol, factor_tol):
            oracle_eps, oracle_products = eps, products / len(chosen)
            break
    return Floor(len(blocks), fixed, fewest, oracle_eps, oracle_products)
