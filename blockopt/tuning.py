"""Per-block learning rates from blockwise spectra.

Rule: with ``rho_b`` a block's curvature scale (``max(|lambda_max|, |lambda_min|)``) and
``rho_max`` the largest among the blocks the heterogeneity score keeps, block ``b`` gets
``base_lr * clip(rho_max / rho_b, 1, max_factor)``. ``base_lr`` is the learning rate that suits
the stiffest block (what a tuned single learning rate is), and every other block is raised to the
same ``lr * rho`` product, so each block sits as close to its own stability limit as the
stiffest one does. The factor is bounded by ``max_factor`` (default 100) because curvature moves
during training; blocks with no measurable curvature (zero, unused, non-finite) keep ``base_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .heterogeneity import heterogeneity
from .spectra import BlockSpectrum

__all__ = ["DEFAULT_MAX_FACTOR", "block_lr_factors", "tune_block_lrs"]

DEFAULT_MAX_FACTOR = 100.0


def block_lr_factors(
    spectra: Mapping[str, BlockSpectrum], *, max_factor: float = DEFAULT_MAX_FACTOR
) -> dict[str, float]:
    """Block name -> learning-rate factor in ``[1, max_factor]`` (see the module docstring)."""
    if not (math.isfinite(max_factor) and max_factor >= 1):
        raise ValueError(f"max_factor must be a finite number >= 1, got {max_factor!r}")
    h = heterogeneity(spectra)
    factors = dict.fromkeys(spectra, 1.0)
    if h.scales:
        top = max(h.scales)
        for name, rho in zip(h.blocks, h.scales):
            factors[name] = min(max(top / rho, 1.0), max_factor)
    return factors


def tune_block_lrs(
    spectra: Mapping[str, BlockSpectrum],
    base_lr: float,
    *,
    max_factor: float = DEFAULT_MAX_FACTOR,
) -> dict[str, float]:
    """Block name -> learning rate: ``base_lr`` times :func:`block_lr_factors`."""
    if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr must be a positive finite number, got {base_lr!r}")
    return {
        name: base_lr * f for name, f in block_lr_factors(spectra, max_factor=max_factor).items()
    }
