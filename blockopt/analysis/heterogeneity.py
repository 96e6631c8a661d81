"""How heterogeneous are a model's blockwise Hessian spectra? ``heterogeneity(spectra)``.

A single learning rate ``eta`` must stay below ``2 / lambda_max`` of the stiffest block, so a block
whose curvature is ``d`` decades smaller learns ``10**d`` times slower than it could: differences of
*scale* between blocks are what defeat SGD (Zhang et al. 2024). The primary score is therefore
``spread``: the number of decades separating the curvature scales of the bulk of the parameters.

Definitions (all invariant to multiplying the loss by a positive constant, to scaling every block
by one factor, and to the order of the blocks):

- curvature scale of block ``b``: ``rho_b = max(|lambda_max|, |lambda_min|)``, its spectral norm.
- included blocks: finite, used by the loss, with a second derivative, and of curvature that is
  not negligible: ``rho_b > ROUNDOFF_MARGIN * r_b``, with ``r_b`` the round-off level of the
  block's own products (``BlockSpectrum.roundoff``) and ``ROUNDOFF_MARGIN = 1e3`` (less in
  float16), or, where ``r_b`` was not measured, ``rho_b > floor * max_c rho_c`` (the fallback
  below).
- ``spread`` (primary): ``log10(Q_hi / Q_lo)`` over parameter-weighted quantiles of ``rho_b``
  (each block weighs its ``numel``): ``Q_lo`` is the smallest ``rho_b`` whose cumulative weight
  counted from the smallest reaches ``lo``, ``Q_hi`` the largest whose cumulative weight counted
  from the largest reaches ``1 - hi``, with ``(lo, hi) = (0.05, 0.95)``: a block holding 5% of the
  parameters at either end counts. Weighting by size keeps small blocks (biases, LayerNorm gains)
  from deciding the score alone.
- ``max_ratio``: ``log10(max rho / min rho)`` over included blocks, the paper's simpler predictor;
  single small blocks dominate it, so it is not the score: the policy reads it only below
  ``sgd_below``, to choose block SGD over SGD when small blocks sit far below the rest.
- ``js``: the mean pairwise Jensen-Shannon distance (base 2, in [0, 1]) between the blocks'
  spectral densities (the paper's JS0 idea), on a common axis in decades: each Ritz value
  ``theta`` maps to ``sign(theta) log10(1 + |theta| / tau)``, ``tau = min(floor * max rho, min
  rho)`` over the included blocks, smoothed by a Gaussian of ``JS_BANDWIDTH`` decades on a grid
  with ``JS_STEP`` decades spacing spanning ``+-(log10(1 + max rho / tau) + 0.5)``. On this axis
  blocks differ both by shape and by scale.

Negligible curvature. Some blocks are exactly zero in exact arithmetic: a bias feeding BatchNorm
(BatchNorm subtracts the batch mean), an attention key bias (softmax ignores a shift common to
all keys). Their computed products are not zero but the round-off of terms that should cancel,
of any size: 1e-22 to 1e-7 on the models below. Comparing a block with the stiffest one (the
rule before this one: ``rho_b <= 10 eps * max_c rho_c``) drops real curvature more than ``1 /
(10 eps)`` below the stiffest, 8e5 in float32, although its products are exact to many digits:
ResNet-18's last BatchNorm gains in training (8e-3 against 1e4), the query biases of BERT and
GPT-2 (4e-8 of the largest block in a tiny BERT at initialisation, 2.6e-7 in a tiny GPT-2). So
the floor comes from the block's own products:

- The exact ``H_bb`` is symmetric, so ``v_{j-1} . (H v_j) = v_j . (H v_{j-1})`` for any two
  vectors, consecutive Lanczos vectors among them. The computed products ``y_j = H v_j + e_j``
  miss this by ``d_j = v_{j-1} . e_j - v_j . e_{j-1}``, and ``|d_j| <= |e_{j-1}| + |e_j|``: the
  round-off level ``r_b = max |d_j|`` over the steps and start vectors (measured for free by
  :func:`blockopt.curvature.lanczos.lanczos_many`, two dot products per step summed in
  float64) bounds the errors of the block's products from below, ``max_j |e_j| >= r_b / 2``.
- For an exactly-zero block, ``y_j = e_j``: the products are all round-off, which has no symmetry
  of its own, so its antisymmetric part is of the size of its symmetric part, which is all
  that the Ritz values see. ``rho_b / r_b`` is of order 1 (i.i.d. noise matrices: 1.3 to 4.4 over
  3000 of them; noise whose symmetric part is ``k`` times its antisymmetric part: about ``3 k``).
- For a real block, ``r_b`` is the round-off of products of size ``rho_b``: ``rho_b / r_b`` is
  about ``1 / eps``, less the digits lost to cancellation inside the products.

Measured ``rho_b / r_b`` (random initialisation, ``blockopt.partition``, float32 and float64
probes; a scratch ResNet with BatchNorm and conv biases, transformers' GPT-2 and BERT built
from tiny configs, the bundled tiny GPT, ViT and CNN, each probed with 2, 3, 5, 10 and 30
steps, ``tol`` 0.02 and 0.1, 1 and 3 start vectors, 8 seeds: 392 probes of exactly-zero blocks
and 3121 of real ones; then GPT-2 of width 384 and BERT of width 768 with their full
vocabularies, embeddings of 1.9e7 and 2.3e7 coordinates, and a ResNet-18 of width 64)::

                       exactly-zero blocks   real blocks
    small, float32     0.07 .. 21            >= 1.8e6
    small, float64     0.17 .. 44            >= 1.5e8 (GPT-2: its loss casts the logits to
                                             float32), >= 9.9e14 otherwise
    larger, float32    1.2 .. 7.6            >= 4.0e6
    larger, float64    1.3 .. 4.1            >= 3.4e9 (GPT-2), >= 2.4e15 otherwise

A block is negligible iff ``rho_b <= ROUNDOFF_MARGIN * r_b``, ``ROUNDOFF_MARGIN = 1e3``: more
than 20 times the largest ratio of an exactly-zero block, more than three decades below the
smallest of a real one; a block is kept when its curvature stands three digits above its own
round-off. A block whose products are exactly zero (``rho_b = 0``) is negligible too.

Every real block above measured at least ``1 / (5 eps)`` times its round-off (``eps`` of its
dtype), so in a narrower type the margin shrinks to ``min(1e3, 1 / (20 eps))``
(:func:`roundoff_margin`, the spectra's dtype): 51 in float16, where the scratch ResNet's and
the bundled CNN's exactly-zero blocks measured 0.8 to 11 and their real blocks 319 and more.
In bfloat16 (``eps = 2^-7``) Lanczos breaks down after one step, so no round-off is measured
and the fallback below decides.

Fallback, where ``r_b`` cannot be measured: a run of one step compares no pair of vectors, so
a block of one coordinate, a block whose start vectors were all eigenvectors (the run breaks
down at once), spectra built by hand and dicts written before the round-off level was recorded
have ``roundoff=None``. There the relative floor decides, the rule before this one: negligible
iff ``rho_b <= floor * max_c rho_c``, ``floor = 10 eps`` of the spectra's dtype by default
(:func:`default_floor`: 1.2e-6 in float32, 2.2e-15 in float64). It cannot tell real curvature
far below the stiffest block from round-off; a 1-coordinate block of real curvature 1e-9 of the
largest is left out in float32. A ``floor`` passed to :func:`heterogeneity` applies to every
block, on top of the round-off rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from blockopt.curvature.spectra import BlockSpectrum

__all__ = [
    "JS_BANDWIDTH",
    "JS_STEP",
    "ROUNDOFF_MARGIN",
    "Heterogeneity",
    "default_floor",
    "heterogeneity",
    "roundoff_margin",
    "spread_lower_bound",
]

DEFAULT_QUANTILES = (0.05, 0.95)
JS_BANDWIDTH = 0.1  # decades
JS_STEP = 0.01  # decades
ROUNDOFF_MARGIN = 1e3
"""A block is negligible when its curvature scale is at most this many times the round-off
level of its own products, in float32 and float64 (see :func:`roundoff_margin` for narrower
types, and the module docstring for the measurements behind it)."""


@dataclass(frozen=True)
class Heterogeneity:
    """Heterogeneity of blockwise spectra; ``float(h)`` is ``h.spread``, the primary score.

    ``blocks`` lists the included blocks in spectra order, ``scales`` their curvature scales and
    ``js_matrix`` their pairwise JS distances; ``excluded`` pairs each left-out block with why,
    and ``negligible`` names those of them left out for negligible curvature (the others are
    of unknown curvature: unused by the loss, without a second derivative, or non-finite).
    """

    spread: float
    max_ratio: float
    js: float
    js_matrix: tuple[tuple[float, ...], ...]
    blocks: tuple[str, ...]
    scales: tuple[float, ...]
    excluded: tuple[tuple[str, str], ...]
    negligible: tuple[str, ...] = ()

    @property
    def score(self) -> float:
        return self.spread

    def __float__(self) -> float:
        return self.spread

    @property
    def empty_reason(self) -> str | None:
        """Why the score stands on no block at all (every block left out), else ``None``: a
        score of 0 over no block says nothing about the mode to train in."""
        if self.blocks:
            return None
        why = sorted({reason.split(":")[0] for _, reason in self.excluded})
        return (
            f"the score keeps no block: all {len(self.excluded)} left out "
            f"({'; '.join(why) or 'none measured'})"
        )

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
            "negligible": list(self.negligible),
        }


def heterogeneity(
    spectra: Mapping[str, BlockSpectrum],
    *,
    floor: float | None = None,
    quantiles: tuple[float, float] = DEFAULT_QUANTILES,
) -> Heterogeneity:
    """Score how far apart the blockwise spectra are (see the module docstring for definitions).

    ``floor`` is the relative floor: ``None`` (the default) applies :func:`default_floor` of the
    spectra's dtype to the blocks whose round-off level was not measured, and a number given
    here applies to every block, on top of the round-off rule (a block below ``floor`` times
    the largest curvature scale is then left out even if its curvature is measurable).
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
    explicit = floor is not None
    dtype = getattr(spectra, "dtype", "float32")
    margin = roundoff_margin(dtype)
    if floor is None:
        floor = default_floor(dtype)
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
        if s.roundoff is not None:
            values += (s.roundoff,)
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
    negligible: list[str] = []
    for s, rho in candidates:
        reason = _negligible(s, rho, top, floor, explicit, margin)
        if reason is None:
            included.append((s, rho))
        else:
            excluded.append((s.name, f"negligible curvature: {reason}"))
            negligible.append(s.name)
    names = tuple(s.name for s, _ in included)
    scales = tuple(rho for _, rho in included)
    if not included:
        return Heterogeneity(0.0, 0.0, 0.0, (), (), (), tuple(excluded), tuple(negligible))
    log_scales = np.log10(np.asarray(scales))
    weights = np.asarray([s.numel for s, _ in included], dtype=np.float64)
    spread = _weighted_range(log_scales, weights, lo, hi)
    max_ratio = float(log_scales.max() - log_scales.min())
    # The axis' unit: floor times the largest scale, or the smallest included scale if lower
    # (a block of real curvature below the relative floor, kept by the round-off rule).
    tau = min(floor * top, min(scales))
    matrix = _js_matrix(np.stack([_log_axis_density(s, tau, top) for s, _ in included]))
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
        negligible=tuple(negligible),
    )


def spread_lower_bound(
    spectra: Mapping[str, BlockSpectrum],
    unknown: int,
    *,
    score: Heterogeneity | None = None,
    quantiles: tuple[float, float] = DEFAULT_QUANTILES,
) -> float:
    """The least ``spread`` that ``spectra`` can score once blocks holding ``unknown`` more
    parameters join them, whatever those blocks' curvature and whether or not the score keeps
    them; ``-inf`` when nothing can be said. ``score``: ``heterogeneity(spectra)``, when the
    caller has it already.

    Blocks that join only add weight: the lower quantile can move down and the upper one up by
    at most what ``unknown`` parameters at either end shift, so the bound is the spread of
    ``spectra`` with both quantile positions taken in their weight plus ``unknown``. It needs
    each block's inclusion to be its own affair (its round-off level measured): a block judged
    against the largest scale (the relative floor) could drop out when a stiffer block joins,
    so spectra holding such a block get ``-inf``."""
    if isinstance(unknown, bool) or not isinstance(unknown, int) or unknown < 0:
        raise ValueError(f"unknown must be a parameter count >= 0, got {unknown!r}")
    if any(s.status == "ok" and s.roundoff is None for s in spectra.values()):
        return -math.inf
    h = heterogeneity(spectra, quantiles=quantiles) if score is None else score
    if not h.blocks:
        return -math.inf
    lo, hi = quantiles
    values = np.log10(np.asarray(h.scales))
    weights = np.asarray([spectra[name].numel for name in h.blocks], dtype=np.float64)
    total = weights.sum() + unknown
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    below, above = np.cumsum(w), np.cumsum(w[::-1])[::-1]
    reach_lo = np.nonzero(below >= lo * total * (1 - 1e-12))[0]
    reach_hi = np.nonzero(above >= (1.0 - hi) * total * (1 - 1e-12))[0]
    if not (len(reach_lo) and len(reach_hi)):
        return -math.inf  # the blocks that join could hold a whole tail
    return float(max(v[reach_hi[-1]] - v[reach_lo[0]], 0.0))


def default_floor(dtype: str) -> float:
    """``10 * eps`` of the named floating-point dtype: the relative floor of the blocks whose
    round-off level was not measured (see the module docstring)."""
    return 10.0 * float(torch.finfo(getattr(torch, dtype)).eps)


def roundoff_margin(dtype: str) -> float:
    """How many times its own round-off level a block's curvature scale must exceed to count:
    ``min(ROUNDOFF_MARGIN, 1 / (20 eps))`` of the named dtype, 1e3 in float32 and float64, 51
    in float16, whose real blocks stand only about ``1 / (5 eps)`` above their round-off."""
    return min(ROUNDOFF_MARGIN, 1.0 / (20.0 * float(torch.finfo(getattr(torch, dtype)).eps)))


def _negligible(
    s: BlockSpectrum, rho: float, top: float, floor: float, explicit: bool, margin: float
) -> str | None:
    """Why block ``s`` (curvature scale ``rho``, largest ``top``) is negligible, or ``None``
    when its curvature counts (see the module docstring for the rules)."""
    if rho == 0.0:
        return "its products are exactly zero"
    if s.roundoff is not None and rho <= margin * s.roundoff:
        return (
            f"{rho:.3g}, within {margin:g} times the round-off of its own products "
            f"({s.roundoff:.3g})"
        )
    if (s.roundoff is None or explicit) and rho <= floor * top:
        return f"below {floor:g} of the largest block"
    return None


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


def _log_axis_density(s: BlockSpectrum, tau: float, top: float) -> np.ndarray:
    """The block's smoothed density on the common symmetric-log axis, as grid probabilities."""
    reach = math.log10(1.0 + top / tau) + 0.5
    grid = np.linspace(-reach, reach, 2 * math.ceil(reach / JS_STEP) + 1)
    theta = np.asarray(s.ritz_values)
    x = np.sign(theta) * np.log10(1.0 + np.abs(theta) / tau)
    kernel = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / JS_BANDWIDTH) ** 2)
    density = kernel @ np.asarray(s.ritz_weights)
    return density / density.sum()


def _js_matrix(densities: np.ndarray) -> np.ndarray:
    """The symmetric matrix of Jensen-Shannon distances (the square root of the divergence in
    bits, in [0, 1]) between the rows of ``densities`` (one density per row), one row against
    all later rows at a time: a probe of dozens of blocks computes its hundreds of pairs in as
    many numpy calls as it has blocks, not pairs."""
    n = densities.shape[0]
    matrix = np.zeros((n, n))
    for i in range(n - 1):
        p, rest = densities[i], densities[i + 1 :]
        m = 0.5 * (p + rest)  # may underflow to zero where both densities are denormal
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            kl_p = np.where((p > 0) & (m > 0), p * np.log2(p / m), 0.0).sum(axis=1)
            kl_q = np.where((rest > 0) & (m > 0), rest * np.log2(rest / m), 0.0).sum(axis=1)
        row = np.sqrt(np.clip(0.5 * (kl_p + kl_q), 0.0, 1.0))
        matrix[i, i + 1 :] = matrix[i + 1 :, i] = row
    return matrix
