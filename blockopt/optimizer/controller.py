"""The probe controller: :func:`measure` takes one probe's spectra, score and block factors (a
frozen :class:`ProbeOutcome`), and :func:`decide` turns it into a :class:`Verdict` (the decision,
the mode to train in with its learning-rate factor, the policy after it), built aside so that
the optimizer commits it whole or not at all.

One ``heterogeneity`` call per probe; the block factors a loss spike must not raise are held
here (:func:`blockopt.analysis.tuning.held_factors`), so the outcome is what the decision reads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blockopt.analysis.heterogeneity import Heterogeneity, heterogeneity, spread_lower_bound
from blockopt.analysis.tuning import DEFAULT_MAX_FACTOR, factors_of, held_factors
from blockopt.curvature.blocks import Block
from blockopt.curvature.spectra import Spectra, block_spectra
from blockopt.distributed.reductions import RankMean, Reduce
from blockopt.distributed.wrappers import fully_sharded, no_sync
from blockopt.optimizer.modeset import ActiveMode, ModeSet
from blockopt.optimizer.policy import Decision, SwitchPolicy
from blockopt.optimizer.tuner import (
    SearchSettings,
    TrialSetup,
    Tuned,
    cap_lr,
    judge_switch,
    search_lr,
)

__all__ = [
    "DEFAULT_TOL",
    "STAGE_SHARES",
    "ProbeOutcome",
    "ProbeSettings",
    "Verdict",
    "decide",
    "measure",
    "next_probe_cost",
    "split_by_size",
    "staged_spectra",
    "stages_by_size",
]

# Decisions read each block's curvature scale, not its density: a Lanczos run may stop once its
# extreme Ritz values have settled to 2%. At 5%, in one of our runs, a block of the reference GPT
# after 300 steps of training stopped at a pause of its largest Ritz value, 32% short; at 2%
# every block factor of the reference GPT, ViT, CNN and quadratics stays within 7% of a 40-step
# probe's, at 0.4-0.85 of the products of 10 fixed steps (docs/BENCHMARKS.md, "Probe cost").
DEFAULT_TOL = 0.02
# A staged probe measures the largest blocks first, in stages: the fewest largest blocks that
# hold each of these shares of the parameters, then the rest, and stops after the first stage
# whose bound on the score settles the decision. Every block's product costs about the same (a
# pass through the model), and biases and normalisation gains are most of the blocks and few of
# the parameters: on the tiny GPT, 14 of 37 blocks hold 95% of its parameters and 10 hold 80%.
# The score weighs blocks by size with its quantiles at 5% and 95%, so a bound on it holds
# whatever the blocks not yet measured hold (:func:`spread_lower_bound`); the stages share one
# gradient graph, so a stage that does not settle it costs only its own products.
STAGE_SHARES = (0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe measures: Lanczos steps (at most), start vectors per block, the seed the
    probe at step ``t`` offsets by ``t``, the stopping tolerance, the bound on block factors,
    whether ranks share the blocks under data parallelism, and how products are taken."""

    steps: int = 10
    probes: int = 1
    seed: int = 0
    tol: float | None = DEFAULT_TOL
    max_factor: float = DEFAULT_MAX_FACTOR
    share: bool = True
    backend: str = "auto"
    staged: bool = True  # the largest blocks first, the rest only if the decision needs them


@dataclass(frozen=True)
class ProbeOutcome:
    """What one probe measured: its step, spectra, score, the block factors to use (spike-held
    where ``held`` says how many were kept from rising), the blocks of the partition (committed
    with the outcome), the largest block curvature, and, for a staged probe that stopped
    after its largest blocks, the blocks it left out and the bound on the score that settled
    the decision without them."""

    step: int
    spectra: Spectra
    score: Heterogeneity
    factors: Mapping[str, float]
    held: int
    blocks: tuple[Block, ...]  # the blocks of the partition (committed with the outcome)
    skipped: tuple[str, ...] = ()
    bound: float | None = None

    @property
    def rho_max(self) -> float:
        return max(self.score.scales, default=0.0)


def split_by_size(blocks: Sequence[Block], share: float) -> tuple[list[Block], list[Block]]:
    """``(large, small)``: the fewest largest blocks that hold ``share`` of the parameters
    (ties broken by partition order), and the rest, each in partition order."""
    total = sum(b.numel for b in blocks)
    ranked = sorted(range(len(blocks)), key=lambda i: -blocks[i].numel)
    chosen: set[int] = set()
    held = 0
    for i in ranked:
        if held >= share * total:
            break
        chosen.add(i)
        held += blocks[i].numel
    large = [b for i, b in enumerate(blocks) if i in chosen]
    small = [b for i, b in enumerate(blocks) if i not in chosen]
    return large, small


def stages_by_size(
    blocks: Sequence[Block], shares: Sequence[float] = STAGE_SHARES
) -> list[list[int]]:
    """The stages of a staged probe, as indices into ``blocks``: per share in ``shares``
    (ascending), the blocks that the fewest largest blocks holding it add, then the rest;
    each stage in partition order, none empty."""
    total = sum(b.numel for b in blocks)
    ranked = sorted(range(len(blocks)), key=lambda i: -blocks[i].numel)  # stable: ties in order
    stages: list[list[int]] = []
    held, taken = 0, 0
    for share in shares:  # the fewest largest blocks holding each share, as split_by_size cuts
        start = taken
        while taken < len(ranked) and held < share * total:
            held += blocks[ranked[taken]].numel
            taken += 1
        if taken > start:
            stages.append(sorted(ranked[start:taken]))
    if taken < len(ranked):
        stages.append(sorted(ranked[taken:]))
    return stages


SpectraOf = Callable[[Sequence[Block], Sequence[Sequence[int]], Callable[[Spectra], bool]], Spectra]
"""``spectra_of(blocks, stages, until)``: the spectra of ``blocks`` measured in ``stages``
until ``until`` says stop (:func:`blockopt.block_spectra`'s arguments of those names)."""


def staged_spectra(
    blocks: Sequence[Block],
    spectra_of: SpectraOf,
    settles: Callable[[float], bool] | None,
) -> tuple[Spectra, Heterogeneity, tuple[str, ...], float | None]:
    """Probe ``blocks`` with ``spectra_of``, staged when ``settles`` (whether every score at or
    above a bound leads to the same decision, one that reads neither ``max_ratio`` nor block
    factors) is given: largest blocks first (:func:`stages_by_size`), stopping after the first
    stage whose :func:`spread_lower_bound` settles it. Returns the spectra, their score, the
    blocks left out and the bound that settled it (``None`` when every block was measured)."""
    bounds: list[float] = []
    total = sum(b.numel for b in blocks)

    def until(partial: Spectra) -> bool:
        assert settles is not None
        unknown = total - sum(s.numel for s in partial.values())
        bound = spread_lower_bound(partial, unknown)
        bounds.append(bound)
        return settles(bound)

    if settles is None:
        spectra = spectra_of(blocks, [list(range(len(blocks)))], lambda _: False)
    else:
        spectra = spectra_of(blocks, stages_by_size(blocks), until)
    skipped = tuple(b.name for b in blocks if b.name not in spectra)
    bound = bounds[-1] if skipped else None
    return spectra, heterogeneity(spectra), skipped, bound


def measure(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    blocks: Sequence[Block],
    settings: ProbeSettings,
    step: int,
    reduce: Reduce | None,
    ddp_model: nn.Module,
    previous: Mapping[str, float] | None,
    settles: Callable[[float], bool] | None = None,
) -> ProbeOutcome:
    """Probe ``model``'s blocks at ``step``; ``previous`` (the factors in use, when a loss
    spiked since they were measured) caps the new factors from above. With ``settles`` the
    probe is staged (:func:`staged_spectra`). A block's spectrum does not depend on which
    other blocks are probed with it (start vectors come from the seed and its name), so a
    staged probe measures what an unstaged one does, of the blocks it measures."""
    sharded = fully_sharded(model)

    def spectra_of(
        some: Sequence[Block], stages: Sequence[Sequence[int]], until: Callable[[Spectra], bool]
    ) -> Spectra:
        with no_sync(ddp_model):  # a closure calling the DDP wrapper prepares no reduction
            return block_spectra(
                model,
                probe,
                some,
                steps=settings.steps,
                probes=settings.probes,
                seed=settings.seed + step,
                tol=settings.tol,
                # a fully_shard model's probe already spans its ranks (distributed.sharded)
                reduce=None if sharded else reduce,
                share=settings.share and isinstance(reduce, RankMean) and not sharded,
                backend=settings.backend,
                stages=stages,
                until=until,
            )

    spectra, score, skipped, bound = staged_spectra(blocks, spectra_of, settles)
    factors = factors_of(score, spectra, settings.max_factor)
    held = 0
    if previous is not None:
        kept = held_factors(factors, previous)
        held, factors = sum(kept[b] < factors[b] for b in factors), kept
    return ProbeOutcome(step, spectra, score, factors, held, tuple(blocks), skipped, bound)


def next_probe_cost(seconds: float, outcome: ProbeOutcome) -> float:
    """The seconds the budget takes the next probe to cost, after one that took ``seconds``
    (its search and logging included): as much, plus, when this one was staged and left
    blocks out, the products of those blocks, which the next probe measures (taken to cost
    what this probe's products did per block)."""
    measured = len(outcome.spectra)
    if not outcome.skipped or measured == 0:
        return seconds
    return seconds + outcome.spectra.seconds * len(outcome.skipped) / measured


@dataclass(frozen=True)
class Verdict:
    """What a probe decided: the decision (with its notes), the mode to train in (its
    optimizer and learning-rate factors), the switch policy after it, and the seconds the
    probe and its learning-rate trials took."""

    decision: Decision
    active: ActiveMode
    policy: SwitchPolicy
    seconds: float


def decide(
    outcome: ProbeOutcome,
    active: ActiveMode,
    policy: SwitchPolicy,
    *,
    modes: ModeSet,
    groups: Sequence[Mapping[str, Any]],
    search: SearchSettings,
    setup: TrialSetup,
    hold: str | None = None,
) -> Verdict:
    """Decide on ``outcome``: cap a grossly unstable SGD learning rate, ask the policy, switch
    (carrying state), search the new mode's learning rate and keep the switch only if its trial
    beats staying (:func:`judge_switch`), or re-check a searched one.
    ``hold`` (``"pinned mode"``, ``"monitor only"``) keeps the mode. Nothing live is changed:
    the policy is decided on a copy and the modes are new objects, for the caller to commit."""
    # a staged probe's note says so when the policy keeps Adam at any score (asked before it
    # decides: a switch to Adam now starts its min_interval)
    why = (
        " (here the policy keeps adam whatever the score: too soon after the last switch, or "
        "no other mode allowed)"
        if outcome.skipped and policy.settles_adam(outcome.step, 0.0, active.mode)
        else ""
    )
    policy = dataclasses.replace(policy)
    score, step, fixed = outcome.score, outcome.step, search.fixed
    notes: list[str] = []
    seconds = outcome.spectra.seconds

    def tuned(result: Tuned) -> ActiveMode:
        nonlocal seconds
        notes.extend(result.notes)
        seconds += result.seconds
        return result.active

    empty = score.empty_reason
    if hold is not None or empty is not None:
        reason = hold if hold is not None else f"stay: {empty}, so it says nothing of the mode"
        # a score over no block is no reading at all: NaN, not the 0 it is computed as
        value, ratio = (float(score), score.max_ratio) if empty is None else (math.nan, math.nan)
        decision = Decision(step, value, active.mode, active.mode, reason, ratio)
    else:
        # Cap a grossly unstable SGD learning rate first, so that a switch matches the step
        # SGD would really take; then the new mode's, if it is an SGD mode.
        active = tuned(cap_lr(modes, active, groups, outcome.rho_max, fixed))
        decision = policy.decide(step, float(score), active.mode, score.max_ratio)
        if decision.switched:
            before = active
            active = modes.switched(
                active, decision.new_mode, groups, fixed, setup.blocks, outcome.factors
            )
            active = tuned(cap_lr(modes, active, groups, outcome.rho_max, fixed))
            found = search_lr(modes, active, groups, search, setup, recheck=False)
            active = tuned(judge_switch(modes, before, found, groups, search, setup))
            if active is before:  # staying trained better in the trials: no switch
                decision = dataclasses.replace(
                    decision,
                    new_mode=before.mode,
                    reason=f"stay: the trials favour {before.mode} ({decision.reason})",
                )
        elif active.searched:
            active = tuned(search_lr(modes, active, groups, search, setup, recheck=True))
    if outcome.skipped:
        kept = len(outcome.blocks) - len(outcome.skipped)
        held = sum(b.numel for b in outcome.blocks if b.name in outcome.spectra)
        share = held / sum(b.numel for b in outcome.blocks)
        notes.append(
            f"decided on the {kept} largest of {len(outcome.blocks)} blocks ({share:.0%} of "
            f"the parameters): whatever the other {len(outcome.skipped)} hold, the score is at "
            f"least {outcome.bound:.2f}, and every score from there up leads to adam{why}; the "
            "next probe measures them"
        )
    if outcome.held and active.mode == "block_sgd":
        notes.append(
            f"a loss spike since the last probe: {outcome.held} block factor(s) not raised"
        )
    decision = dataclasses.replace(decision, notes=tuple(notes))
    return Verdict(decision, active, policy, seconds)
