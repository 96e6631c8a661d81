"""The probe controller's measuring half: one probe's spectra, score and block factors, as a
frozen :class:`ProbeOutcome` that the optimizer then acts on and commits.

One ``heterogeneity`` call per probe; the block factors a loss spike must not raise are held
here (:func:`blockopt.analysis.tuning.held_factors`), so the outcome is what the decision reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from blockopt.analysis.heterogeneity import Heterogeneity, heterogeneity
from blockopt.analysis.tuning import DEFAULT_MAX_FACTOR, block_lr_factors, held_factors
from blockopt.curvature.blocks import Block
from blockopt.curvature.spectra import Spectra, block_spectra
from blockopt.distributed.reductions import RankMean, Reduce
from blockopt.distributed.wrappers import no_sync

__all__ = ["DEFAULT_TOL", "ProbeOutcome", "ProbeSettings", "measure"]

# Decisions read each block's curvature scale, not its density: a Lanczos run may stop once its
# extreme Ritz values have settled to 2%. At 5%, in one of our runs, a block of the reference GPT
# after 300 steps of training stopped at a pause of its largest Ritz value, 32% short; at 2%
# every block factor of the reference GPT, ViT, CNN and quadratics stays within 7% of a 40-step
# probe's, at 0.4-0.85 of the products of 10 fixed steps (docs/BENCHMARKS.md, "Probe cost").
DEFAULT_TOL = 0.02


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe measures: Lanczos steps (at most), start vectors per block, the seed the
    probe at step ``t`` offsets by ``t``, the stopping tolerance, the bound on block factors,
    and whether ranks share the blocks under data parallelism."""

    steps: int = 10
    probes: int = 1
    seed: int = 0
    tol: float | None = DEFAULT_TOL
    max_factor: float = DEFAULT_MAX_FACTOR
    share: bool = True


@dataclass(frozen=True)
class ProbeOutcome:
    """What one probe measured: its step, spectra, score, the block factors to use (spike-held
    where ``held`` says how many were kept from rising) and the largest block curvature."""

    step: int
    spectra: Spectra
    score: Heterogeneity
    factors: Mapping[str, float]
    held: int

    @property
    def rho_max(self) -> float:
        return max(self.score.scales, default=0.0)


def measure(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    blocks: Sequence[Block],
    settings: ProbeSettings,
    step: int,
    reduce: Reduce | None,
    ddp_model: nn.Module,
    previous: Mapping[str, float] | None,
) -> ProbeOutcome:
    """Probe ``model``'s blocks at ``step``; ``previous`` (the factors in use, when a loss
    spiked since they were measured) caps the new factors from above."""
    with no_sync(ddp_model):  # a closure calling the DDP wrapper prepares no reduction
        spectra = block_spectra(
            model,
            probe,
            blocks,
            steps=settings.steps,
            probes=settings.probes,
            seed=settings.seed + step,
            tol=settings.tol,
            reduce=reduce,
            share=settings.share and isinstance(reduce, RankMean),
        )
    score = heterogeneity(spectra)
    factors = block_lr_factors(spectra, max_factor=settings.max_factor)
    held = 0
    if previous is not None:
        kept = held_factors(factors, previous)
        held, factors = sum(kept[b] < factors[b] for b in factors), kept
    return ProbeOutcome(step, spectra, score, factors, held)
