"""The learning-rate tuner: SGD's stability cap, the search and re-check of the active mode's
learning-rate factor with trials on the probe's batch, and the trial that a switch must beat
staying in the old mode.

All return a new :class:`~blockopt.optimizer.modeset.ActiveMode` and notes for the decision;
none changes the live optimizer, so a probe's decision can be committed or dropped whole.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from blockopt.analysis.tuning import UNSTABLE_FACTOR, sgd_lr_cap, sgd_stability_limit
from blockopt.curvature.blocks import Block
from blockopt.distributed.reductions import Reduce
from blockopt.distributed.wrappers import no_sync
from blockopt.optimizer.checkpoint import CheckpointDuringProbeError
from blockopt.optimizer.lr_search import (
    LrSearch,
    grid_start,
    recheck_multiplier,
    search_multiplier,
)
from blockopt.optimizer.lr_trials import trial_loss
from blockopt.optimizer.modes import BlockSGD
from blockopt.optimizer.modeset import ActiveMode, ModeSet, family, loss_sign
from blockopt.optimizer.policy import ProbeFaultWarning

__all__ = [
    "SEARCH_BACKOFF",
    "SEARCH_MAX_UP",
    "SEARCH_MAX_UP_HOLDOUT",
    "SEARCH_UP_GAIN_HOLDOUT",
    "SearchSettings",
    "Tuned",
    "cap_lr",
    "judge_switch",
    "search_lr",
]

# A search at a switch may raise the step-norm match by at most this many half-decades: trials on
# the probe's one batch reward steps that memorise it (on the digits CNN after 50 steps of
# training, 20 trial steps at ten times the match end 4 times lower on the probe's batch, and the
# training loss then rises fivefold), while the match already has the old mode's step size.
SEARCH_MAX_UP = 1
# With a held-out batch to judge the trials on (``holdout=``), memorising the probe's batch earns
# nothing, so the search climbs while the held-out loss keeps falling, up to its trial budget.
SEARCH_MAX_UP_HOLDOUT = 6
# ... but each step up must lower the held-out loss by this share: at the start of training,
# 10-step trials reward larger rates by a few percent that do not last (on the real-models
# benchmark, Llama's 4.8x -> 15x gained 2.4% and the TransformerEncoder's 2x -> 6.5x 2.0%, and
# both trained worse at the larger rate over 300 steps: 2.38 against 2.13, 0.38 against 0.13).
SEARCH_UP_GAIN_HOLDOUT = 0.05
# A switch into Adam's family takes the best trial's rate times this (a quarter of a decade
# down): ten steps reward the largest rate that is still stable on them, and the long run is
# better a little below it. On the real-models benchmark (300 steps, seeds 0-4) wrap(SGD) at the
# best trial's rate ended up to 19% above plain SGD on GPT-2 (3 seeds), BERT and the
# TransformerEncoder (one seed each), and at 0.56 of it 2% to 66% below on all 25 Transformer
# runs. Switches into SGD's family keep the best trial's rate: SGD's rate is capped by its
# stability limit and re-checked when unstable, and backing off there made the ResNet's
# wrap(AdamW) worse on two of five seeds.
SEARCH_BACKOFF = 10.0**-0.25


@dataclass(frozen=True)
class SearchSettings:
    """Whether to search a mode's learning rate after a probe's switch, with how many trial
    steps; modes in ``fixed`` keep the learning rate the user gave; ``clip``: the max gradient
    norm the trials clip to, as training does."""

    enabled: bool = True
    # 10 trial steps: 5 halve a search's cost but favour larger rates more (on the real-models
    # benchmark, seeds 0-4, the target held on 19 of 30 model-seed pairs against 24 with 10:
    # the held-out search climbed to rates at which GPT-2 and BERT ended up to 29% above plain
    # SGD's final loss)
    steps: int = 10
    fixed: frozenset[str] = frozenset()
    clip: float | None = None  # the gradient-norm clipping training applies, in trials too
    backoff: float = SEARCH_BACKOFF  # what a switch into Adam takes of the best trial's rate

    def __post_init__(self) -> None:
        if not (isinstance(self.backoff, (int, float)) and 0.0 < self.backoff <= 1.0):
            raise ValueError(f"backoff must be a number in (0, 1], got {self.backoff!r}")


@dataclass(frozen=True)
class Tuned:
    """A tuned mode, the notes that say what changed, and the seconds the trials took."""

    active: ActiveMode
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    loss: float = math.nan  # the chosen trial's loss (NaN: no trial ran)


def cap_lr(
    modes: ModeSet,
    active: ActiveMode,
    groups: Sequence[Mapping[str, Any]],
    rho_max: float,
    fixed: frozenset[str],
) -> Tuned:
    """Scale an SGD or block-SGD mode's learning rate down when ``lr * rho_max`` is far beyond
    SGD's stability limit (:func:`sgd_lr_cap`). Modes whose learning rate is fixed, and other
    classes, are left alone."""
    opt = active.optimizer
    if active.mode in fixed or not isinstance(opt, (torch.optim.SGD, BlockSGD)):
        return Tuned(active)
    modes.sync(active, groups)
    factor, worst, limit_used = 1.0, 0.0, math.inf
    for group in opt.param_groups:
        mu = group.get("momentum") or 0.0
        if not 0.0 <= mu < 1.0:  # heavy ball has no stable learning rate there
            continue
        limit = sgd_stability_limit(mu, group.get("dampening") or 0.0, bool(group.get("nesterov")))
        f = sgd_lr_cap(group["lr"], rho_max, limit)
        if f < factor:
            factor, worst, limit_used = f, group["lr"] * rho_max, limit
    if factor >= 1.0:
        return Tuned(active)
    capped = active.with_scale(factor)
    modes.sync(capped, groups)
    note = (
        f"{active.mode} learning rate times {factor:.3g}: lr * rho_max was {worst:.3g}, more "
        f"than {UNSTABLE_FACTOR:g} times the stability limit {limit_used:.3g}"
    )
    return Tuned(capped, (note,))


@dataclass(frozen=True)
class TrialSetup:
    """What trials run on: the model probed, its probe closure, the reduction over ranks, the
    blocks and factors a block-SGD scratch optimizer needs, the loss-noise floor, and the
    held-out closure the trials are judged on (``None``: the probe's batch)."""

    model: nn.Module
    probe: Callable[[], torch.Tensor]
    reduce: Reduce | None
    blocks: Sequence[Block]
    factors: Mapping[str, float]
    noise_floor: float
    ddp_model: nn.Module
    holdout: Callable[[], torch.Tensor] | None = None

    @property
    def judged_on(self) -> str:
        return "the held-out batch" if self.holdout is not None else "the probe's batch"


def search_lr(
    modes: ModeSet,
    active: ActiveMode,
    groups: Sequence[Mapping[str, Any]],
    settings: SearchSettings,
    setup: TrialSetup,
    recheck: bool,
) -> Tuned:
    """Search the active mode's learning-rate factor (:mod:`blockopt.optimizer.lr_search`)
    with trials on the probe's batch (:func:`trial_loss`), judged on ``setup.holdout`` when
    given: after a switch from the round rate nearest the current one, at most
    ``SEARCH_MAX_UP`` half-decades up (with a held-out batch, on which memorising the probe's
    batch earns nothing, up to ``SEARCH_MAX_UP_HOLDOUT`` while each step up gains at least
    ``SEARCH_UP_GAIN_HOLDOUT`` of the loss), and a switch into Adam's family then takes
    ``settings.backoff`` of the best trial's rate; at a later probe
    (``recheck``) only down, to a rate that makes real progress, and in the SGD modes only if a
    trial shows the rate unstable (changes below ``noise_floor`` count as noise). Trials run at
    the schedule's base learning rate (``initial_lr``, which schedulers set), so that a warmup
    or decay in progress does not skew the factor, which applies at every point of the
    schedule. With ``maximize`` the trials' losses count negated. A search that fails keeps
    the learning rate, warns and says why."""
    if not settings.enabled or active.mode in settings.fixed:
        return Tuned(active)
    start = time.perf_counter()
    try:
        found = _run_search(modes, active, groups, settings, setup, recheck)
    except CheckpointDuringProbeError:
        raise  # the caller's checkpoint failed, not the search
    except Exception as err:  # the probe itself succeeded; keep its result and the lr
        note = (
            f"{active.mode} learning-rate search failed ({type(err).__name__}: {err}); kept "
            f"{groups[0]['lr'] * active.scale:.3g}"
        )
        warnings.warn(note, ProbeFaultWarning, stacklevel=9)  # at the caller of step()
        return Tuned(active, (note,), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    searched = dataclasses.replace(active, searched=True)
    if found.multiplier == 1.0 and recheck:
        return Tuned(searched, (), seconds, found.loss)
    backoff = 1.0 if recheck or family(active.mode) == "sgd" else settings.backoff
    tuned = searched.with_scale(found.multiplier * backoff)
    modes.sync(tuned, groups)
    tried = ", ".join(
        f"{m:.3g}x: {loss:.4g}" if m else f"before: {loss:.4g}" for m, loss in found.trials
    )
    below = "" if backoff == 1.0 else f", {backoff:.3g} times the best trial's rate"
    note = (
        f"{active.mode} learning rate {groups[0]['lr'] * tuned.scale:.3g} "
        f"({found.multiplier * backoff:.3g} times the previous{below}) from "
        f"{settings.steps}-step trials on the probe's batch judged on {setup.judged_on} "
        f"({tried})"
    )
    return Tuned(tuned, (note,), seconds, found.loss)


def judge_switch(
    modes: ModeSet,
    before: ActiveMode,
    after: Tuned,
    groups: Sequence[Mapping[str, Any]],
    settings: SearchSettings,
    setup: TrialSetup,
) -> Tuned:
    """A switch whose best trial (``after.loss``, from the search) ends no lower than the loss
    before any step, where a trial of ``before`` as it is ends lower, is not made: ``before``
    is kept, with a note that says so. Only a trial that makes no progress at all vetoes a
    switch: short trials favour whatever lowers the stiffest directions first, which is the
    old mode on exactly the problems a switch to per-block or per-coordinate rates is for, so
    a new mode that merely progresses slower in a few steps keeps its switch. Without a trial
    of the new mode (no search, or a failed one) the switch stands as the policy made it."""
    if not settings.enabled or math.isnan(after.loss):
        return after
    start = time.perf_counter()
    try:
        with no_sync(setup.ddp_model):
            trial = _trial(modes, before, groups, settings, setup)
            baseline = trial(1.0, steps=0)
            if after.loss < baseline:
                return dataclasses.replace(
                    after, seconds=after.seconds + time.perf_counter() - start
                )
            stay = trial(1.0)
    except CheckpointDuringProbeError:
        raise
    except Exception:  # the search's trials ran; an error here keeps the switch
        return after
    seconds = after.seconds + time.perf_counter() - start
    if not stay < after.loss:
        return dataclasses.replace(after, seconds=seconds)
    note = (
        f"kept {before.mode}: {after.active.mode}'s best {settings.steps}-step trial ends at "
        f"{after.loss:.4g} on {setup.judged_on}, no lower than {baseline:.4g} before it, and "
        f"staying in {before.mode} at {stay:.4g}"
    )
    return Tuned(before, (*after.notes, note), seconds, stay)


def _trial(
    modes: ModeSet,
    active: ActiveMode,
    groups: Sequence[Mapping[str, Any]],
    settings: SearchSettings,
    setup: TrialSetup,
) -> Callable[..., float]:
    """``trial(multiplier, steps=None)``: the (sign-corrected) loss a scratch copy of
    ``active`` reaches at its base learning rates times ``multiplier``."""
    state = active.optimizer.state_dict()  # its lrs are replaced below
    base_lrs = [_start_lr(g) * active.scale for g in groups]
    params = [p for g in groups for p in g["params"] if p.requires_grad]
    sign = loss_sign(groups)

    def scratch(multiplier: float) -> Optimizer:
        opt = modes.build(active.mode, groups, active.scale, setup.blocks, setup.factors)
        opt.load_state_dict(copy.deepcopy(state))  # a copy: the live state stays as it is
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * multiplier
        return opt

    def trial(multiplier: float, steps: int | None = None) -> float:
        loss = trial_loss(
            setup.model,
            setup.probe,
            params,
            lambda: scratch(multiplier),
            settings.steps if steps is None else steps,
            setup.reduce,
            setup.holdout,
            settings.clip,
        )
        return sign * loss if math.isfinite(loss) else math.inf

    return trial


def _start_lr(group: Mapping[str, Any]) -> float:
    """The rate a search starts from: a scheduler's ``initial_lr`` where it set one, else
    ``lr``; a one-element tensor (torch optimizers accept them) as the number it holds."""
    return float(group.get("initial_lr", group["lr"]))


def _run_search(
    modes: ModeSet,
    active: ActiveMode,
    groups: Sequence[Mapping[str, Any]],
    settings: SearchSettings,
    setup: TrialSetup,
    recheck: bool,
) -> LrSearch:
    base_lr = _start_lr(groups[0]) * active.scale
    trial = _trial(modes, active, groups, settings, setup)
    with no_sync(setup.ddp_model):
        if recheck:  # from where the rate is, against the loss before any step
            baseline = trial(1.0, steps=0)
            if family(active.mode) == "sgd":  # stable SGD steps shrink near a minimum
                return recheck_multiplier(trial, baseline, floor=setup.noise_floor)
            return recheck_multiplier(trial, baseline, keep_stable=False)
        # after a switch, from the round learning rate nearest the step-norm match
        start = grid_start(base_lr) if base_lr > 0 else 1.0
        if setup.holdout is None:
            return search_multiplier(trial, start=start, max_up=SEARCH_MAX_UP)
        return search_multiplier(
            trial, start=start, max_up=SEARCH_MAX_UP_HOLDOUT, up_gain=SEARCH_UP_GAIN_HOLDOUT
        )
