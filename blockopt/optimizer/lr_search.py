"""A short learning-rate search: walk a geometric grid of multipliers of a starting learning rate
and keep the one whose trial ends at the lowest loss.

The grid can be anchored at round values: :func:`grid_start` gives the multiplier that moves a
learning rate to the nearest power of ``factor`` (with the default factor, sqrt(10): ..., 1e-3,
3.16e-3, 1e-2, ...), so that the search returns round learning rates, which do not wobble with
the learning rate it started from and which a user can write down and keep.

Pure numerics, no model: ``trial(multiplier)`` is any callable returning the loss reached with
the learning rate times ``multiplier`` (the optimizer runs a few steps on its probe batch and puts
everything back). The walk starts at 1, steps by ``factor`` in the direction that improves and
stops at the first trial that does not; a non-finite loss counts as worse than any finite one.
The walk goes at most ``max_up`` steps upwards (``0``: only smaller learning rates) but as far
down as its budget allows: trials on one small batch favour large steps that memorise the batch,
so an increase is bounded while a decrease, the safe direction, is not.

:func:`recheck_multiplier` re-checks a rate found before. Short trials favour small rates once
training is under way (the short-horizon bias of greedy learning-rate tuning), and on a batch the
model already fits, every step only drifts its loss, so "lower while the trial improves" would
ratchet a good rate down by decades. A re-check therefore lowers the rate only to a rate that
lowers the batch's loss by at least ``min_gain`` of it, and, for SGD-like steps, only when its
trial shows the current rate unstable (the loss more than ``rise`` times what it was, or not
finite). Both are measured against ``max(|loss|, floor)``: once the loss is a tiny share of where
training started, its relative swings over a trial are noise, not instability.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_FACTOR",
    "MIN_GAIN",
    "RISE",
    "LrSearch",
    "grid_start",
    "recheck_multiplier",
    "search_multiplier",
]

DEFAULT_FACTOR = math.sqrt(10.0)  # half a decade per step
MIN_GAIN = 0.01  # a re-check moves to a rate whose trial lowers the loss by at least this share
RISE = 2.0  # a re-check calls a rate unstable when its trial ends above this multiple of the loss


@dataclass(frozen=True)
class LrSearch:
    """The outcome of :func:`search_multiplier`: the best multiplier of the starting learning
    rate, and every ``(multiplier, loss)`` tried, in order."""

    multiplier: float
    trials: tuple[tuple[float, float], ...]

    @property
    def loss(self) -> float:
        """The loss of the chosen multiplier's trial."""
        return dict(self.trials)[self.multiplier]


def grid_start(lr: float, factor: float = DEFAULT_FACTOR) -> float:
    """The multiplier that takes ``lr`` to the nearest power of ``factor`` (in log scale)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    _check_factor(factor)
    return factor ** round(math.log(lr) / math.log(factor)) / lr


def _check_factor(factor: float) -> None:
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
        raise ValueError(f"factor must be a finite number above 1, got {factor!r}")


def _check_walk(max_trials: int, min_gain: float) -> None:
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 2:
        raise ValueError(f"max_trials must be an int of at least 2, got {max_trials!r}")
    if not (isinstance(min_gain, (int, float)) and 0.0 <= min_gain < 1.0):
        raise ValueError(f"min_gain must be a number in [0, 1), got {min_gain!r}")


def search_multiplier(
    trial: Callable[[float], float],
    *,
    start: float = 1.0,
    factor: float = DEFAULT_FACTOR,
    max_trials: int = 8,
    max_up: int = 1,
    min_gain: float = 0.0,
    up_gain: float | None = None,
) -> LrSearch:
    """Walk multipliers ``start * factor**k`` from ``k = 0``: first up (at most to
    ``k = max_up``), then, if going up did not help, down, while each step lowers the trial
    loss below the best so far by more than ``min_gain`` of it (``up_gain`` of it for a step
    up, when given); at most ``max_trials`` calls of ``trial``.

    Ties keep the multiplier found first, so a learning rate changes only on a strict
    improvement."""
    _check_factor(factor)
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start > 0):
        raise ValueError(f"start must be a positive finite number, got {start!r}")
    _check_walk(max_trials, min_gain)
    up_gain = min_gain if up_gain is None else up_gain
    if not (isinstance(up_gain, (int, float)) and 0.0 <= up_gain < 1.0):
        raise ValueError(f"up_gain must be a number in [0, 1), got {up_gain!r}")
    if isinstance(max_up, bool) or not isinstance(max_up, int) or max_up < 0:
        raise ValueError(f"max_up must be a non-negative int, got {max_up!r}")
    tried: dict[float, float] = {}

    def run(k: int) -> float:
        m = start * factor**k
        value = float(trial(m))
        tried[m] = value if math.isfinite(value) else math.inf
        return tried[m]

    best_k, best = 0, run(0)
    directions = (1, -1) if max_up > 0 else (-1,)
    for direction in directions:
        k = direction
        moved = False
        gain = up_gain if direction > 0 else min_gain
        while len(tried) < max_trials and k <= max_up:
            value = run(k)
            if not value < (best - gain * abs(best) if math.isfinite(best) else best):
                break
            best_k, best, moved = k, value, True
            k += direction
        if moved or len(tried) >= max_trials:
            break
    return LrSearch(start * factor**best_k, tuple(tried.items()))


def recheck_multiplier(
    trial: Callable[[float], float],
    baseline: float,
    *,
    factor: float = DEFAULT_FACTOR,
    max_trials: int = 8,
    rise: float = RISE,
    min_gain: float = MIN_GAIN,
    floor: float = 0.0,
    keep_stable: bool = True,
) -> LrSearch:
    """With ``keep_stable``, keep the current rate (multiplier 1) unless its trial is unstable:
    not finite, or ending above ``baseline`` (the loss before any step) by more than
    ``(rise - 1) * size``, where ``size = max(|baseline|, floor)``. Then (or at once, without
    ``keep_stable``) walk ``factor**-k`` down while each trial ends lower than the best so far
    by more than ``min_gain`` of it, and move to the best rate found if it ends below
    ``baseline`` by more than ``min_gain * size``: a rate that makes no real progress is no
    better than the current one. At most ``max_trials`` calls of ``trial``; the baseline is
    recorded in ``trials`` as multiplier 0.

    ``keep_stable`` suits steps that shrink with the gradient (SGD): near a minimum a stable
    rate is not what holds the loss up. Normalised steps (Adam) keep a size the rate sets, so
    there a stall at a loss floor the rate sets is a reason to lower it."""
    _check_factor(factor)
    _check_walk(max_trials, min_gain)
    if not (isinstance(baseline, (int, float)) and math.isfinite(baseline)):
        raise ValueError(f"baseline must be a finite number, got {baseline!r}")
    if not (isinstance(rise, (int, float)) and math.isfinite(rise) and rise >= 1.0):
        raise ValueError(f"rise must be a finite number of at least 1, got {rise!r}")
    if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0.0):
        raise ValueError(f"floor must be a non-negative finite number, got {floor!r}")
    size = max(abs(baseline), floor)
    losses: dict[float, float] = {}

    def once(m: float) -> float:  # the walk asks again for the rate the gate tried
        if m not in losses:
            value = float(trial(m))
            losses[m] = value if math.isfinite(value) else math.inf
        return losses[m]

    multiplier = 1.0
    if not (keep_stable and once(1.0) <= baseline + (rise - 1.0) * size):
        found = search_multiplier(
            once, factor=factor, max_trials=max_trials, max_up=0, min_gain=min_gain
        )
        if found.loss < baseline - min_gain * size:
            multiplier = found.multiplier
    return LrSearch(multiplier, ((0.0, float(baseline)), *losses.items()))
