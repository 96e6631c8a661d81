"""From heterogeneity scores to a mode, and when to probe next.

Pure decision logic, no tensors and no clocks: :class:`SwitchPolicy` maps a score history to
``"sgd"``, ``"block_sgd"`` or ``"adam"`` with hysteresis, and :class:`ProbeSchedule` says at which
step the next probe runs, within a share of training time (:func:`budget_wait`) measured by the
caller and handed over as a :class:`Spend`.

Default thresholds (calibrated in docs/REPRODUCTION.md, "Calibration"): the score is the
``spread`` of :func:`blockopt.heterogeneity`, in decades.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from blockopt.curvature.scalars import plain

__all__ = [
    "Decision",
    "ProbeFault",
    "ProbeFaultWarning",
    "ProbeSchedule",
    "Spend",
    "SwitchPolicy",
    "Thresholds",
    "budget_grid",
    "budget_wait",
]

MODES = ("sgd", "block_sgd", "adam")
# Loss changes smaller than this share of the first loss seen are noise: near the end of a run
# that fits its data, the loss wobbles by multiples of itself at a tiny scale. Such a rise is no
# spike, and no sign that a learning rate has become unstable.
LOSS_NOISE = 0.01
# The budget never defers a probe by more steps than this: "no probe in this run".
MAX_BUDGET_WAIT = 2**40


@dataclass(frozen=True)
class Thresholds:
    """Scores below ``sgd_below`` suit SGD, above ``adam_above`` Adam, in between blockwise-lr
    SGD. ``block_ratio`` (off by default, ``None``): below ``sgd_below``, blockwise-lr SGD also
    when the block curvatures span more than ``block_ratio`` decades in all (``max_ratio``), as
    BatchNorm gains and biases do in CNNs. Per-block rates let those blocks learn faster and
    lower the training loss, but on BatchNorm CNNs they raised the held-out loss (see
    docs/REPRODUCTION.md), so plain SGD is the default there. A switch needs the score (or
    ``max_ratio``) beyond a boundary by ``margin`` decades, and at least ``min_interval`` steps
    since the last switch."""

    sgd_below: float = 1.0
    adam_above: float = 1.5
    margin: float = 0.25
    min_interval: int = 50
    block_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("sgd_below", "adam_above", "margin", "block_ratio", "min_interval"):
            object.__setattr__(self, name, plain(getattr(self, name)))  # numpy scalars pass
        for name in ("sgd_below", "adam_above", "margin", "block_ratio"):
            value = getattr(self, name)
            if name == "block_ratio" and value is None:
                continue  # the max_ratio rule is off
            off = " (or None: off)" if name == "block_ratio" else ""
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{name} must be a number{off}, got {type(value).__name__} {value!r}"
                )
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative finite number{off}, got {value!r}")
        if self.sgd_below > self.adam_above:
            raise ValueError(
                f"sgd_below ({self.sgd_below}) must not exceed adam_above ({self.adam_above}): "
                "scores below sgd_below choose SGD, scores above adam_above choose Adam"
            )
        if isinstance(self.min_interval, bool) or not isinstance(self.min_interval, int):
            raise TypeError(f"min_interval must be an int, got {self.min_interval!r}")
        if self.min_interval < 0:
            raise ValueError(f"min_interval must be non-negative, got {self.min_interval}")

    def target(self, score: float, max_ratio: float = 0.0) -> str:
        """The mode a score (and ``max_ratio``, both from :func:`blockopt.heterogeneity`)
        calls for, without hysteresis."""
        return _target(score, max_ratio, self.sgd_below, self.adam_above, self.block_ratio)

    def reason(self, score: float, max_ratio: float = 0.0) -> str:
        mode = self.target(score, max_ratio)
        if mode == "sgd":
            across = (
                ""
                if self.block_ratio is None
                else f" and {max_ratio:.2f} <= {self.block_ratio:g} over all blocks"
            )
            return (
                f"score {score:.2f} < {self.sgd_below:g}: block curvatures within "
                f"{self.sgd_below:g} decade(s) over the bulk of the parameters{across}, one "
                "learning rate suits every block"
            )
        if mode == "adam":
            return (
                f"score {score:.2f} > {self.adam_above:g}: block curvatures span more than "
                f"{self.adam_above:g} decades, per-coordinate learning rates needed"
            )
        if score < self.sgd_below:
            return (
                f"score {score:.2f} < {self.sgd_below:g} but max_ratio {max_ratio:.2f} > "
                f"{self.block_ratio:g}: some blocks sit more than {self.block_ratio:g} decades "
                "below the stiffest, one learning rate per block"
            )
        return (
            f"{self.sgd_below:g} <= score {score:.2f} <= {self.adam_above:g}: blocks differ in "
            "scale, one learning rate per block"
        )


@dataclass(frozen=True)
class Decision:
    """One policy decision, kept in the optimizer's history: the step, the score and
    ``max_ratio`` it read, the modes before and after, the policy's reason, and ``notes`` on
    what else the probe changed (a learning-rate cap or search, factors held after a spike)."""

    step: int
    score: float
    old_mode: str
    new_mode: str
    reason: str
    max_ratio: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def switched(self) -> bool:
        return self.old_mode != self.new_mode

    @property
    def text(self) -> str:
        """The reason and the notes, as one line for logs."""
        return "; ".join([self.reason, *self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "score": self.score,
            "old_mode": self.old_mode,
            "new_mode": self.new_mode,
            "reason": self.reason,
            "max_ratio": self.max_ratio,
            "notes": list(self.notes),
        }


class ProbeFaultWarning(RuntimeWarning):
    """A probe failed during ``step()`` and was discarded; training went on."""


@dataclass(frozen=True)
class ProbeFault:
    """One failed, discarded probe, kept in the optimizer's ``faults``: the step, the kind of
    failure (``"non_finite"``, ``"double_backward"``, ``"out_of_memory"`` or ``"probe_error"``)
    and the error's message."""

    step: int
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "message": self.message}


@dataclass
class SwitchPolicy:
    """Score -> mode with hysteresis: leave the current mode only when the score lies beyond the
    boundary by ``margin`` and ``min_interval`` steps have passed since the last switch.

    Only modes in ``allowed`` (the optimizer's ``modes=``) and not in ``refused`` (modes whose
    switch was undone because training got worse) are chosen; a score that calls for another
    mode takes the nearest usable one in the order sgd, block_sgd, adam."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    last_switch: int | None = None
    allowed: tuple[str, ...] = MODES
    refused: frozenset[str] = frozenset()

    def usable(self, wanted: str, mode: str) -> str:
        """``wanted``, or the usable mode nearest it (ties towards ``mode``; ``mode`` itself
        when nothing else is usable)."""
        usable = [m for m in self.allowed if m not in self.refused or m == mode]
        if wanted in usable:
            return wanted
        if not usable:
            return mode
        at = MODES.index(wanted)
        return min(usable, key=lambda m: (abs(MODES.index(m) - at), m != mode))

    def settles_adam(self, step: int, bound: float, mode: str) -> bool:
        """Whether every score at or above ``bound``, with any ``max_ratio``, takes this policy
        from ``mode`` to Adam at ``step`` (asked on copies: the policy is not changed). A
        staged probe stops when its lower bound on the score settles this."""
        if not math.isfinite(bound):
            return False
        return all(
            dataclasses.replace(self).decide(step, bound, mode, ratio).new_mode == "adam"
            for ratio in (0.0, 1e300)  # any max_ratio: decide needs it finite
        )

    def decide(self, step: int, score: float, mode: str, max_ratio: float = 0.0) -> Decision:
        """The mode to train in after a probe at ``step`` that scored ``score`` (``spread``)
        and ``max_ratio``, from ``mode``; switching sets ``last_switch``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        if not (math.isfinite(score) and math.isfinite(max_ratio)):
            return Decision(step, score, mode, mode, "stay: the score is not finite", max_ratio)
        t = self.thresholds
        wanted = t.target(score, max_ratio)
        if wanted != mode and self.usable(wanted, mode) == mode:
            return Decision(step, score, mode, mode, self._unusable(wanted, score), max_ratio)
        if wanted == mode:
            return Decision(
                step, score, mode, mode, f"stay: {t.reason(score, max_ratio)}", max_ratio
            )
        # Hysteresis: moving towards Adam needs the score (or max_ratio) above a boundary plus
        # the margin, moving towards SGD below a boundary minus the margin.
        shift = t.margin if MODES.index(wanted) > MODES.index(mode) else -t.margin
        ratio = None if t.block_ratio is None else t.block_ratio + shift
        confirmed = _target(score, max_ratio, t.sgd_below + shift, t.adam_above + shift, ratio)
        usable = self.usable(confirmed, mode)
        if usable == mode:
            reason = (
                f"stay: score {score:.2f} (max_ratio {max_ratio:.2f}) within the "
                f"{t.margin:g} margin"
                if confirmed == mode
                else self._unusable(confirmed, score)
            )
            return Decision(step, score, mode, mode, reason, max_ratio)
        if self.last_switch is not None and step - self.last_switch < t.min_interval:
            return Decision(
                step,
                score,
                mode,
                mode,
                f"stay: last switch {step - self.last_switch} steps ago, fewer than "
                f"min_interval={t.min_interval}",
                max_ratio,
            )
        self.last_switch = step
        reason = t.reason(score, max_ratio)
        if usable != confirmed:
            reason += f"; {self._unusable(confirmed, score, stay=False)}, so {usable}"
        return Decision(step, score, mode, usable, reason, max_ratio)

    def _unusable(self, wanted: str, score: float, stay: bool = True) -> str:
        why = (
            f"{wanted} was undone earlier because training got worse"
            if wanted in self.refused
            else f"{wanted} is not among modes={self.allowed}"
        )
        return f"stay: score {score:.2f} calls for {wanted}, but {why}" if stay else why


def _target(
    score: float,
    max_ratio: float,
    sgd_below: float,
    adam_above: float,
    block_ratio: float | None,
) -> str:
    if score > adam_above:
        return "adam"
    if score < sgd_below and (block_ratio is None or max_ratio <= block_ratio):
        return "sgd"
    return "block_sgd"


@dataclass(frozen=True)
class Spend:
    """Probe time spent so far, as the probe budget reads it: ``probe_seconds`` (P: every probe,
    learning-rate search and re-check, failed probes included), ``train_seconds`` (E: training
    wall time since the first step, probes included), the ``steps`` done, and ``cost`` (c: the
    seconds of the probe just taken, its search included)."""

    probe_seconds: float
    train_seconds: float
    steps: int
    cost: float

    @property
    def step_seconds(self) -> float:
        """tau: the mean seconds per step spent training, not probing."""
        return (self.train_seconds - self.probe_seconds) / max(self.steps, 1)


def budget_wait(budget: float, spend: Spend) -> int | None:
    """The fewest further steps ``k >= 0`` after which a probe keeps probing within ``budget``:
    ``P + c <= budget * (E + k * tau + c)``, with ``tau`` the mean non-probe seconds per step so
    far and the next probe taken to cost what this one did (``c``). ``None`` when no training
    time has been measured yet (no step done, or ``tau <= 0``): the budget cannot place the
    probe. At most ``MAX_BUDGET_WAIT``."""
    tau = spend.step_seconds
    if spend.steps < 1 or not tau > 0:
        return None
    need = spend.probe_seconds + spend.cost
    cost, elapsed = spend.cost, spend.train_seconds

    def fits(k: int) -> bool:
        return need <= budget * (elapsed + k * tau + cost)

    x = (need / budget - elapsed - cost) / tau
    if not x < MAX_BUDGET_WAIT:
        return MAX_BUDGET_WAIT
    k = max(0, math.ceil(x))
    # the division above rounds; settle on the smallest k the inequality itself accepts
    while k > 0 and fits(k - 1):
        k -= 1
    while not fits(k) and k < MAX_BUDGET_WAIT:
        k += 1
    return k


def budget_grid(k: int, base: int) -> int:
    """``k`` steps rounded up to the schedule's doubling grid ``base * 2**j`` (0 stays 0), so
    that timing noise rarely changes the step a budget chooses."""
    if k <= 0:
        return 0
    steps = base
    while steps < k:
        steps *= 2
    return steps


@dataclass
class ProbeSchedule:
    """When to probe: at step ``first``, then every ``every`` steps if given; otherwise at
    intervals that start at ``base``, grow by ``growth`` (up to ``max_interval``) while the score
    moves less than ``stable_tol`` decades between probes, and fall back to ``base`` after a
    switch. A loss spike (a loss above ``spike_factor`` times its running average, by more than
    ``noise_floor``, 1% of the first loss seen, so that the wobble of a loss near zero, or below
    it, does not count) brings the next probe forward to the next step. A failed probe is
    retried after the normal interval (``every``, or ``base``; at least 2 steps), doubling with
    each consecutive failure up to ``max_interval``, and spikes do not bring it forward; the
    first success starts over. ``spiked`` says whether a spike was seen since the last successful
    probe (with ``probe_every`` too), so that the probe can treat its readings with care.

    ``budget`` (a share in (0, 1), or ``None``) caps the share of training wall time that
    probing takes, with ``every`` unset (a fixed interval ignores it): each probe, failed or
    not, hands :meth:`after_probe` the :class:`Spend` so far, and the next probe waits
    :func:`budget_wait` steps, rounded up by :func:`budget_grid`, when that is longer than the
    normal interval (or backoff), even beyond ``max_interval``; ``budget_step`` is the earliest
    step the budget allows, and a spike brings the next probe forward no further than that.
    The probe at ``first`` always runs: it decides the starting mode. Its cost counts all the
    same. A probe taken before any training step was timed cannot be placed; its cost waits in
    ``pending_cost`` until the next probe falls due, where :meth:`place_pending` places it with
    the spend then. The schedule reads no clock: the caller measures and passes the times."""

    every: int | None = None
    first: int = 0
    base: int = 50
    max_interval: int = 1000
    growth: float = 2.0
    stable_tol: float = 0.25
    spike_factor: float = 2.0
    budget: float | None = None
    interval: int = 0
    next_step: int = 0
    last_score: float | None = None
    loss_avg: float | None = None
    losses_seen: int = 0
    loss_scale: float = 0.0  # the magnitude of the first loss seen
    failures: int = 0
    spiked: bool = False
    budget_step: int = 0  # the earliest step at which the budget allows the next probe
    pending_cost: float | None = None  # the cost of a probe the budget could not place yet
    last_cost: float | None = None  # the cost of the last probe the budget placed

    def __post_init__(self) -> None:
        for name in ("first", "base", "max_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.every is not None and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1
        ):
            raise ValueError(f"probe_every must be a positive int or None, got {self.every!r}")
        if self.base < 1 or self.max_interval < self.base:
            raise ValueError("need 1 <= base <= max_interval")
        if self.growth < 1 or self.spike_factor <= 1 or self.stable_tol < 0:
            raise ValueError("need growth >= 1, spike_factor > 1 and stable_tol >= 0")
        if self.budget is not None:
            if not is_share(self.budget):
                raise ValueError(
                    f"probe_budget must be a share of training time in (0, 1), e.g. 0.03 for "
                    f"3%, or None for no budget; got {self.budget!r}"
                )
            self.budget = float(self.budget)
        if not self.interval:
            self.interval = self.every or self.base
            self.next_step = self.first

    @property
    def budgeted(self) -> bool:
        """Whether the budget applies: one is set and the interval is not fixed."""
        return self.budget is not None and self.every is None

    @property
    def budget_pending(self) -> bool:
        """Whether a probe's cost waits to be placed (see :meth:`place_pending`)."""
        return self.budgeted and self.pending_cost is not None

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def after_probe(
        self, step: int, score: float | None, switched: bool, spend: Spend | None = None
    ) -> None:
        """Set the next probe step; ``score`` is None when the probe failed (then back off),
        NaN when it measured no block (no reading: the interval starts over at ``base``).
        ``spend`` (the time spent so far) lets the budget defer it; without it, or without a
        budget, or with ``every``, the normal schedule alone decides."""
        if score is None:
            self.failures += 1
            normal = max(self.every or self.base, 2)
            backoff = normal << min(self.failures - 1, 62)
            next_step = step + min(backoff, max(self.max_interval, normal))
            self.next_step = self._within_budget(step, next_step, spend)
            return
        recovered, self.failures = self.failures > 0, 0
        self.spiked = False
        if self.every is not None:
            self.interval = self.every
        elif recovered or switched or self.last_score is None:
            self.interval = self.base
        elif abs(score - self.last_score) <= self.stable_tol:
            self.interval = min(int(self.interval * self.growth), self.max_interval)
        else:
            self.interval = self.base
        self.last_score = score
        self.next_step = self._within_budget(step, step + self.interval, spend)

    def _within_budget(self, step: int, next_step: int, spend: Spend | None) -> int:
        """``next_step``, or the budget's step after a probe at ``step`` when that is later."""
        if not self.budgeted or spend is None:
            return next_step
        assert self.budget is not None
        k = budget_wait(self.budget, spend)
        if k is None:  # no training time measured yet: place it at the next due step
            self.pending_cost, self.budget_step = float(spend.cost), step
            return next_step
        self.pending_cost, self.last_cost = None, float(spend.cost)
        self.budget_step = step + budget_grid(k, self.base)
        return max(next_step, self.budget_step)

    @property
    def rechecks(self) -> bool:
        """Whether a due probe is checked against the budget again (:meth:`recheck`): a budget
        applies and the last probe's cost was placed."""
        return self.budgeted and self.last_cost is not None and self.pending_cost is None

    def recheck(self, step: int, spend: Spend) -> None:
        """At a step where a probe is due, check the budget again with the time really spent
        (``spend``, with no cost of its own): the step was placed by projecting the mean step
        time so far, which slow first steps (warm-up, a busy machine) inflate. When the probe,
        taken to cost what the last one did, no longer fits, it waits for the budget's step."""
        if not self.rechecks:
            return
        assert self.budget is not None and self.last_cost is not None
        k = budget_wait(self.budget, dataclasses.replace(spend, cost=self.last_cost))
        if not k:  # it fits (or nothing is measured): the probe runs now
            return
        self.budget_step = step + budget_grid(k, self.base)
        self.next_step = max(self.next_step, self.budget_step)

    def place_pending(self, step: int, spend: Spend) -> None:
        """At a step where a probe is due, place the cost of a probe that ran before any
        training step was timed (``pending_cost``, taken as the next probe's cost), now that
        ``spend`` has steps: the due probe runs now only if the budget allows it."""
        if not self.budget_pending:
            return
        assert self.budget is not None and self.pending_cost is not None
        k = budget_wait(self.budget, dataclasses.replace(spend, cost=self.pending_cost))
        if k is None:  # still nothing measured: the probe runs, and its own cost waits
            return
        self.pending_cost, self.last_cost = None, self.pending_cost
        self.budget_step = step + budget_grid(k, self.base)
        self.next_step = max(self.next_step, self.budget_step)

    @property
    def noise_floor(self) -> float:
        """Loss changes below this are noise: ``LOSS_NOISE`` of the first loss seen (0 before
        any loss is seen)."""
        return LOSS_NOISE * self.loss_scale

    def observe_loss(self, step: int, loss: float) -> None:
        """Track the training loss; a spike makes the next step a probe step, or the budget's
        step (``budget_step``) when that is later."""
        if not math.isfinite(loss):
            return
        if self.losses_seen == 0:
            self.loss_scale = abs(loss)
        spike = self.loss_avg is not None and loss - self.loss_avg > max(
            (self.spike_factor - 1) * abs(self.loss_avg), self.noise_floor
        )
        if spike and self.losses_seen >= 10:
            self.spiked = True
            if self.every is None and not self.failures:
                self.next_step = min(self.next_step, max(step + 1, self.budget_step))
                self.interval = self.base
        self.losses_seen += 1
        weight = max(0.05, 1.0 / self.losses_seen)
        self.loss_avg = (
            loss if self.loss_avg is None else (1 - weight) * self.loss_avg + weight * loss
        )

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(self.__dict__)
        if unknown:
            raise ValueError(f"unknown probe-schedule state keys: {sorted(unknown)}")
        self.__dict__.update(state)


def is_share(value: Any) -> bool:
    """A real number (bools excluded) strictly between 0 and 1: a valid ``budget``."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value < 1
    )
