"""Per-block learning rates from blockwise spectra.

Rule: with ``rho_b`` a block's curvature scale (``max(|lambda_max|, |lambda_min|)``) and
``rho_max`` the largest among the blocks the heterogeneity score keeps, block ``b`` gets
``base_lr * clip(rho_max / rho_b, 1, max_factor)``. ``base_lr`` is the learning rate that suits
the stiffest block (what a tuned single learning rate is), and every other block is raised to the
same ``lr * rho`` product, so each block sits as close to its own stability limit as the
stiffest one does. The factor is bounded by ``max_factor`` (default 100) because curvature moves
during training; blocks with no measurable curvature (zero, unused, non-finite) keep ``base_lr``.

Stability of SGD's learning rate: on a quadratic with curvature ``lambda``, ``torch.optim.SGD``
converges iff ``lr * lambda`` is below :func:`sgd_stability_limit` (``2 (1 + mu) / (1 - d)`` with
momentum ``mu`` and dampening ``d``; ``2 (1 + mu) / (1 + 2 mu)`` with Nesterov). In block SGD every
block's ``lr * factor_b * rho_b`` is at most ``lr * rho_max``, so the same bound applies to the
base learning rate. :func:`sgd_lr_cap` turns a measured ``rho_max`` into a cap for learning rates
that are far beyond that bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .heterogeneity import heterogeneity
from .spectra import BlockSpectrum

__all__ = [
    "CAP_FRACTION",
    "DEFAULT_MAX_FACTOR",
    "UNSTABLE_FACTOR",
    "block_lr_factors",
    "sgd_lr_cap",
    "sgd_stability_limit",
    "tune_block_lrs",
]

DEFAULT_MAX_FACTOR = 100.0
# A learning rate is capped only when ``lr * rho_max`` exceeds the stability limit this many
# times over. Neural networks often start somewhat beyond it and still train well, because their
# sharpness drops in the first steps (the reference CNN on digits: twice the limit at step 0 at
# its best grid learning rate), so only a gross excess is taken as certain divergence.
UNSTABLE_FACTOR = 10.0
# The cap puts ``lr * rho_max`` at this fraction of the limit. With heavy-ball momentum ``mu``
# every curvature with ``lr * lambda`` in ``((1 - sqrt(mu))^2, (1 + sqrt(mu))^2)`` (nearly the
# whole stable range) converges at the same rate ``sqrt(mu)``, so a larger lr only helps the
# flatter directions; the factor 2 covers the probe's estimate of rho_max (Lanczos approaches it
# from below, and the diagonal blocks ignore the coupling between blocks).
CAP_FRACTION = 0.5


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


def sgd_stability_limit(
    momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """The largest ``lr * lambda`` at which ``torch.optim.SGD`` converges on a quadratic of
    curvature ``lambda`` (see the module docstring); ``inf`` when dampening cancels the step."""
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    if dampening >= 1.0:
        return math.inf
    return 2.0 * (1.0 + momentum) / (1.0 - dampening)


def sgd_lr_cap(
    lr: float,
    rho_max: float,
    limit: float,
    *,
    unstable_factor: float = UNSTABLE_FACTOR,
    fraction: float = CAP_FRACTION,
) -> float:
    """The factor (at most 1) to multiply ``lr`` by: 1 unless ``lr * rho_max`` exceeds
    ``unstable_factor * limit``, else the factor that brings it to ``fraction * limit``."""
    if not (math.isfinite(rho_max) and rho_max > 0 and math.isfinite(limit)) or lr <= 0:
        return 1.0
    if lr * rho_max <= unstable_factor * limit:
        return 1.0
    return fraction * limit / (lr * rho_max)
