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
The walk goes at most ``max_up`` steps upwards (``0``: only smaller learning rates, for
re-checking one found before) but as far down as its budget allows: trials on one small batch
favour large steps that memorise the batch, so an increase is bounded while a decrease, the safe
direction, is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_FACTOR", "LrSearch", "grid_start", "search_multiplier"]

DEFAULT_FACTOR = math.sqrt(10.0)  # half a decade per step


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


def search_multiplier(
    trial: Callable[[float], float],
    *,
    start: float = 1.0,
    factor: float = DEFAULT_FACTOR,
    max_trials: int = 8,
    max_up: int = 1,
) -> LrSearch:
    """Walk multipliers ``start * factor**k`` from ``k = 0``: first up (at most to
    ``k = max_up``), then, if going up did not help, down, while each step lowers the trial
    loss; at most ``max_trials`` calls of ``trial``.

    Ties keep the multiplier found first, so a learning rate changes only on a strict
    improvement."""
    _check_factor(factor)
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start > 0):
        raise ValueError(f"start must be a positive finite number, got {start!r}")
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 2:
        raise ValueError(f"max_trials must be an int of at least 2, got {max_trials!r}")
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
        while len(tried) < max_trials and k <= max_up:
            value = run(k)
            if not value < best:
                break
            best_k, best, moved = k, value, True
            k += direction
        if moved or len(tried) >= max_trials:
            break
    return LrSearch(start * factor**best_k, tuple(tried.items()))
