"""The switch guard: a probe's switch that makes training worse is undone.

After a switch a probe made, the guard keeps the parameters and the old mode (a copy of its
state) as they were, and watches the next ``window`` training losses (from ``step(closure)`` or
``opt.observe_loss``). If their median ends above the training loss before the switch (the
schedule's running mean, or the first loss seen after it when none came before) by more than
``margin`` of it and the loss-noise floor, the parameters and the old mode are put back and the
mode switched to is not chosen again. Otherwise the copies are dropped.

Pure bookkeeping: the caller decides what to copy and how to put it back; this module says when.
With ``maximize``, losses count negated.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from blockopt.optimizer.modeset import ActiveMode

__all__ = ["GUARD_MARGIN", "GUARD_WINDOW", "Watch", "judge", "median_after"]

# Training losses seen after a switch before it is judged: twice the search's default trial
# length, enough for a median to see through batch-to-batch noise.
GUARD_WINDOW = 20
# A switch is undone when the median loss after it ends this share above the loss before it:
# clearly worse, not a noisy draw.
GUARD_MARGIN = 0.1


@dataclass(frozen=True)
class Watch:
    """A switch under watch: its step and mode, the mode it left (``previous``, whose optimizer
    holds a copy of that mode's state at the switch) with the blocks and factors it stepped
    with, the parameters with their values at the switch, the loss level before it (``None``:
    none seen yet) and the losses seen since."""

    step: int
    mode: str
    previous: ActiveMode
    previous_blocks: tuple[Any, ...]
    previous_factors: dict[str, float]
    params: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    reference: float | None
    losses: tuple[float, ...] = ()

    def seen(self, loss: float) -> Watch:
        """The watch with one more training loss."""
        if self.reference is None:  # the first loss after the switch is where it started
            return dataclasses.replace(self, reference=loss)
        return dataclasses.replace(self, losses=(*self.losses, loss))


def median_after(watch: Watch, window: int, sign: float) -> float:
    """The median of the first ``window`` losses after the switch, times ``sign`` (so lower is
    better); a non-finite loss counts as worse than any finite one, whatever the sign."""
    return statistics.median(
        sign * v if math.isfinite(v) else math.inf for v in watch.losses[:window]
    )


def judge(watch: Watch, window: int, noise_floor: float, sign: float) -> str | None:
    """``"undo"`` when the median of the first ``window`` losses after the switch ends above
    the reference by more than ``max(GUARD_MARGIN * |reference|, noise_floor)``, ``"keep"``
    when it does not, ``None`` while fewer than ``window`` losses were seen."""
    if len(watch.losses) < window or watch.reference is None:
        return None
    if not math.isfinite(watch.reference):
        return "keep"
    reference = sign * watch.reference
    after = median_after(watch, window, sign)
    allowed = max(GUARD_MARGIN * abs(reference), noise_floor)
    return "undo" if not after <= reference + allowed else "keep"
