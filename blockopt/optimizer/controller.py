"""The probe controller: :func:`measure` takes one probe's spectra, score and block factors (a
frozen :class:`ProbeOutcome`), and :func:`decide` turns it into a :class:`Verdict` (the decision,
the mode to train in with its learning-rate factor, the policy after it), built aside so that
the optimizer commits it whole or not at all.

One ``heterogeneity`` call per probe; the block factors a loss spike must not raise are held
here (:func:`blockopt.analysis.tuning.held_factors`), so the outcome is what the decision reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blockopt.analysis.heterogeneity import Heterogeneity, heterogeneity, spread_lower_bound
from blockopt.analysis.tuning import DEFAULT_MAX_FACTOR, factors_of, held_factors
from blockopt.curvature.blocks import Block
from blockopt.curvature.spectra import Spectra, block_spectra, join_spectra
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
    "STAGE_SHARE",
    "ProbeOutcome",
    "ProbeSettings",
    "Verdict",
    "decide",
    "measure",
    "split_by_size",
]

# Decisions read each block's curvature scale, not its density: a Lanczos run may stop once its
# extreme Ritz values have settled to 2%. At 5%, in one of our runs, a block of the reference GPT
# after 300 steps of training stopped at a pause of its largest Ritz value, 32% short; at 2%
# every block factor of the reference GPT, ViT, CNN and quadratics stays within 7% of a 40-step
# probe's, at 0.4-0.85 of the products of 10 fixed steps (docs/BENCHMARKS.md, "Probe cost").
DEFAULT_TOL = 0.02
# A staged probe measures first the largest blocks that together hold this share of the
# parameters. Every block's product costs about the same (a pass through the model), and
# biases and normalisation gains are most of the blocks and few of the parameters: on the
# tiny GPT, 14 of 37 blocks hold 95% of its parameters, on the tiny ViT 15 of 40. The score
# weighs blocks by size with its quantiles at 5% and 95%, so the other 5% move it little, and
# a bound says when they cannot move the decision at all (:func:`spread_lower_bound`).
STAGE_SHARE = 0.95


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


def split_by_size(
    blocks: Sequence[Block], share: float = STAGE_SHARE
) -> tuple[list[Block], list[Block]]:
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
    spiked since they were measured) caps the new factors from above.

    With ``settles`` (the caller's decision rule: whether every score at or above a bound
    leads to the same decision, one that reads neither ``max_ratio`` nor block factors), the
    probe is staged: the largest blocks holding :data:`STAGE_SHARE` of the parameters are
    probed first, and the others only when the bound on the score they allow
    (:func:`spread_lower_bound`) does not settle the decision. A block's spectrum does not
    depend on which other blocks are probed with it (start vectors come from the seed and
    its name), so a staged probe that goes on measures what an unstaged one does."""
    large, small = split_by_size(blocks) if settles is not None else (list(blocks), [])
    spectra = _spectra(model, probe, large, settings, step, reduce, ddp_model)
    skipped: tuple[str, ...] = ()
    bound = None
    score = heterogeneity(spectra)
    if small:
        assert settles is not None
        unknown = sum(b.numel for b in small)
        bound = spread_lower_bound(spectra, unknown, score=score)
        if settles(bound):
            skipped = tuple(b.name for b in small)
        else:
            rest = _spectra(model, probe, small, settings, step, reduce, ddp_model)
            spectra = join_spectra(spectra, rest, [b.name for b in blocks])
            score, bound = heterogeneity(spectra), None
    factors = factors_of(score, spectra, settings.max_factor)
    held = 0
    if previous is not None:
        kept = held_factors(factors, previous)
        held, factors = sum(kept[b] < factors[b] for b in factors), kept
    return ProbeOutcome(step, spectra, score, factors, held, tuple(blocks), skipped, bound)


def _spectra(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    blocks: Sequence[Block],
    settings: ProbeSettings,
    step: int,
    reduce: Reduce | None,
    ddp_model: nn.Module,
) -> Spectra:
    sharded = fully_sharded(model)
    with no_sync(ddp_model):  # a closure calling the DDP wrapper prepares no reduction
        return block_spectra(
            model,
            probe,
            blocks,
            steps=settings.steps,
            probes=settings.probes,
            seed=settings.seed + step,
            tol=settings.tol,
            # a fully_shard model's probe already spans its ranks (blockopt.distributed.sharded)
            reduce=None if sharded else reduce,
            share=settings.share and isinstance(reduce, RankMean) and not sharded,
            backend=settings.backend,
        )


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
    policy = dataclasses.replace(policy)
    score, step, fixed = outcome.score, outcome.step, search.fixed
    notes: list[str] = []
    seconds = outcome.spectra.seconds

    def tuned(result: Tuned) -> ActiveMode:
        nonlocal seconds
        notes.extend(result.notes)
        seconds += result.seconds
        return result.active

    if hold is not None:
        decision = Decision(step, float(score), active.mode, active.mode, hold, score.max_ratio)
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
        notes.append(
            f"decided on the {kept} largest of {len(outcome.blocks)} blocks (at least "
            f"{STAGE_SHARE:.0%} of the parameters): whatever the other {len(outcome.skipped)} "
            f"hold, the score is at least {outcome.bound:.2f}, which settles it; the next "
            "probe measures them"
        )
    if outcome.held and active.mode == "block_sgd":
        notes.append(
            f"a loss spike since the last probe: {outcome.held} block factor(s) not raised"
        )
    decision = dataclasses.replace(decision, notes=tuple(notes))
    return Verdict(decision, active, policy, seconds)
