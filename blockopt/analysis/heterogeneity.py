"""How heterogeneous are a model's blockwise Hessian spectra? ``heterogeneity(spectra)``.

A single learning rate ``eta`` must stay below ``2 / lambda_max`` of the stiffest block, so a block
whose curvature is ``d`` decades smaller learns ``10**d`` times slower than it could: differences of
*scale* between blocks are what defeat SGD (Zhang et al. 2024). The primary score is therefore
``spread``: the number of decades separating the curvature scales of the bulk of the parameters.

Definitions (all invariant to multiplying the loss by a positive constant, to scaling every block
by one factor, and to the order of the blocks):

- curvature scale of block ``b``: ``rho_b = max(|lambda_max|, |lambda_min|)``, its spectral norm.
- included blocks: finite, used by the loss, with a second derivative, and ``rho_b > floor *
  max_c rho_c``. By default ``floor = 10 * eps`` of the dtype the spectra were computed in
  (1.2e-6 in float32, 2.2e-15 in float64): blocks that are exactly zero in exact arithmetic, such
  as a bias feeding BatchNorm or an attention key bias, measure 1e-13..2e-8 of the largest block
  in float32 on the reference models, while the smallest real block curvature there (attention
  query/key biases and LayerNorm gains) is above 1e-6.
- ``spread`` (primary): ``log10(Q_hi / Q_lo)`` over parameter-weighted quantiles of ``rho_b``
  (each block weighs its ``numel``): ``Q_lo`` is the smallest ``rho_b`` whose cumulative weight
  counted from the smallest reaches ``lo``, ``Q_hi`` the largest whose cumulative weight counted
  from the largest reaches ``1 - hi``, with ``(lo, hi) = (0.05, 0.95)``: a block holding 5% of the
  parameters at either end counts. Weighting by size keeps small blocks (biases, LayerNorm gains)
  from deciding the score alone.
- ``max_ratio``: ``log10(max rho / min rho)`` over included blocks, the paper's simpler predictor;
  reported, not used, because single small blocks dominate it.
- ``js``: the mean pairwise Jensen-Shannon distance (base 2, in [0, 1]) between the blocks'
  spectral densities (the paper's JS0 idea), on a common axis in decades: each Ritz value
  ``theta`` maps to ``sign(theta) log10(1 + |theta| / (floor * max rho))``, smoothed by a Gaussian
  of ``JS_BANDWIDTH`` decades on a grid with ``JS_STEP`` decades spacing spanning
  ``+-(log10(1 + 1/floor) + 0.5)``. On this axis blocks differ both by shape and by scale.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from blockopt.curvature.spectra import BlockSpectrum

__all__ = ["JS_BANDWIDTH", "JS_STEP", "Heterogeneity", "default_floor", "heterogeneity"]

DEFAULT_QUANTILES = (0.05, 0.95)
JS_BANDWIDTH = 0.1  # decades
JS_STEP = 0.01  # decades


@dataclass(frozen=True)
class Heterogeneity:
    """Heterogeneity of blockwise spectra; ``float(h)`` is ``h.spread``, the primary score.

    ``blocks`` lists the included blocks in spectra order, ``scales`` their curvature scales and
    ``js_matrix`` their pairwise JS distances; ``excluded`` pairs each left-out block with why.
    """

    spread: float
    max_ratio: float
    js: float
    js_matrix: tuple[tuple[float, ...], ...]
    blocks: tuple[str, ...]
    scales: tuple[float, ...]
    excluded: tuple[tuple[str, str], ...]

    @property
    def score(self) -> float:
        return self.spread

    def __float__(self) -> float:
        return self.spread

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.spread,
            "spread": self.spread,
            "max_ratio": self.max_ratio,
            "js": self.js,
            "js_matrix": [list(row) for row in self.js_matrix],
            "blocks": list(self.blocks),
            "scales": list(self.scales),
            "excluded": [list(pair) for pair in self.excluded],
        }


def heterogeneity(
    spectra: Mapping[str, BlockSpectrum],
    *,
    floor: float | None = None,
    quantiles: tuple[float, float] = DEFAULT_QUANTILES,
) -> Heterogeneity:
    """Score how far apart the blockwise spectra are (see the module docstring for definitions).

    ``floor`` defaults to :func:`default_floor` of the spectra's dtype.
    """
    if not isinstance(spectra, Mapping):
        raise TypeError(
            "expected the Spectra from block_spectra() (a mapping block name -> BlockSpectrum), "
            f"got {type(spectra).__name__}"
        )
    for name, s in spectra.items():
        if not isinstance(s, BlockSpectrum):
            raise TypeError(
                f"spectra[{name!r}] is of type {type(s).__name__}, not a BlockSpectrum; pass the "
                "Spectra from block_spectra() or Spectra.from_dict()"
            )
    if floor is None:
        floor = default_floor(getattr(spectra, "dtype", "float32"))
    if not (isinstance(floor, (int, float)) and 0.0 < floor < 1.0):
        raise ValueError(f"floor must be a number in (0, 1), got {floor!r}")
    if not (isinstance(quantiles, (tuple, list)) and len(quantiles) == 2):
        raise ValueError(f"quantiles must be a pair (lo, hi), got {quantiles!r}")
    lo, hi = quantiles
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or not (
        0.0 <= lo < hi <= 1.0
    ):
        raise ValueError(f"quantiles must satisfy 0 <= lo < hi <= 1, got {quantiles!r}")
    excluded: list[tuple[str, str]] = []
    candidates: list[tuple[BlockSpectrum, float]] = []
    for name, s in spectra.items():
        values = (s.lambda_max, s.lambda_min, *s.ritz_values, *s.ritz_weights)
        if s.status == "unused":
            excluded.append((name, "unused: the loss does not depend on it"))
        elif s.status == "no_graph":
            excluded.append((name, "no second derivative: its gradient carries no graph"))
        elif not all(math.isfinite(v) for v in values):
            excluded.append((name, "non-finite curvature values"))
        else:
            candidates.append((s, max(abs(s.lambda_max), abs(s.lambda_min))))
    top = max((rho for _, rho in candidates), default=0.0)
    included: list[tuple[BlockSpectrum, float]] = []
    for s, rho in candidates:
        if top > 0 and rho > floor * top:
            included.append((s, rho))
        else:
            excluded.append((s.name, f"negligible curvature: below {floor:g} of the largest block"))
    names = tuple(s.name for s, _ in included)
    scales = tuple(rho for _, rho in included)
    if not included:
        return Heterogeneity(0.0, 0.0, 0.0, (), (), (), tuple(excluded))
    log_scales = np.log10(np.asarray(scales))
    weights = np.asarray([s.numel for s, _ in included], dtype=np.float64)
    spread = _weighted_range(log_scales, weights, lo, hi)
    max_ratio = float(log_scales.max() - log_scales.min())
    densities = [_log_axis_density(s, floor * top, floor) for s, _ in included]
    matrix = np.zeros((len(included), len(included)))
    for i, j in itertools.combinations(range(len(included)), 2):
        matrix[i, j] = matrix[j, i] = _js_distance(densities[i], densities[j])
    pairs = len(included) * (len(included) - 1) // 2
    js = float(matrix[np.triu_indices(len(included), 1)].sum() / pairs) if pairs else 0.0
    return Heterogeneity(
        spread=float(spread),
        max_ratio=max_ratio,
        js=js,
        js_matrix=tuple(tuple(float(x) for x in row) for row in matrix),
        blocks=names,
        scales=scales,
        excluded=tuple(excluded),
    )


def default_floor(dtype: str) -> float:
    """``10 * eps`` of the named floating-point dtype: curvature below this fraction of the
    largest block's is indistinguishable from round-off in Hessian-vector products."""
    return 10.0 * float(torch.finfo(getattr(torch, dtype)).eps)


def _weighted_range(values: np.ndarray, weights: np.ndarray, lo: float, hi: float) -> float:
    """``Q_hi - Q_lo``: ``Q_lo`` is the smallest value whose cumulative weight from below reaches
    ``lo``, ``Q_hi`` the largest whose cumulative weight from above reaches ``1 - hi``."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order] / weights.sum()
    below = np.cumsum(w)
    above = np.cumsum(w[::-1])[::-1]
    low = v[min(int(np.searchsorted(below, lo - 1e-12, side="left")), len(v) - 1)]
    high = v[np.nonzero(above >= (1.0 - hi) - 1e-12)[0][-1]]
    return float(max(high - low, 0.0))


def _log_axis_density(s: BlockSpectrum, tau: float, floor: float) -> np.ndarray:
    """The block's smoothed density on the common symmetric-log axis, as grid probabilities."""
    reach = math.log10(1.0 + 1.0 / floor) + 0.5
    grid = np.linspace(-reach, reach, 2 * math.ceil(reach / JS_STEP) + 1)
    theta = np.asarray(s.ritz_values)
    x = np.sign(theta) * np.log10(1.0 + np.abs(theta) / tau)
    kernel = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / JS_BANDWIDTH) ** 2)
    density = kernel @ np.asarray(s.ritz_weights)
    return density / density.sum()


def _js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """sqrt of the Jensen-Shannon divergence in bits, in [0, 1]."""
    m = 0.5 * (p + q)
    divergence = 0.0
    for a in (p, q):
        mask = (a > 0) & (m > 0)  # m underflows only where a does
        divergence += 0.5 * float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))
    return math.sqrt(min(max(divergence, 0.0), 1.0))
