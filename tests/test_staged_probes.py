"""Staged probes: the bound on the score that blocks still unprobed allow, the stages of
largest blocks, ``block_spectra`` measuring stage by stage until told to stop, and the
optimizer that stops after its largest blocks only when that bound settles the decision,
training exactly as an unstaged probe would."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from blockopt import BlockOptimizer, block_spectra, partition
from blockopt.analysis.heterogeneity import heterogeneity, spread_lower_bound
from blockopt.curvature.spectra import BlockSpectrum, Spectra
from blockopt.optimizer.controller import (
    STAGE_SHARES,
    next_probe_cost,
    split_by_size,
    stages_by_size,
)


def _block(name: str, numel: int, rho: float, kind: str = "real") -> BlockSpectrum:
    """A hand-made block of curvature scale ``rho``: ``real`` (round-off far below it),
    ``negligible`` (round-off of its size), ``unused`` or ``nan``."""
    if kind == "unused":
        return BlockSpectrum(name, numel, (0.0,), (1.0,), 0.0, 0.0, 0.0, status="unused")
    value = math.nan if kind == "nan" else rho
    roundoff = rho if kind == "negligible" else rho * 1e-7
    return BlockSpectrum(
        name, numel, (value / 3, value), (0.5, 0.5), value, value / 3, value, steps=2,
        roundoff=roundoff,
    )  # fmt: skip


def _spectra(blocks: list[BlockSpectrum]) -> Spectra:
    return Spectra(blocks, steps=10, probes=1, seed=0, dtype="float32")


_blocks = st.lists(
    st.tuples(
        st.integers(1, 5000),  # numel
        st.floats(-6, 6),  # log10 of the curvature scale
        st.sampled_from(["real", "real", "real", "negligible", "unused", "nan"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(_blocks, _blocks)
def test_the_bound_holds_whatever_the_blocks_that_join(probed, joining):
    first = [_block(f"a{i}", n, 10.0**e, k) for i, (n, e, k) in enumerate(probed)]
    second = [_block(f"b{i}", n, 10.0**e, k) for i, (n, e, k) in enumerate(joining)]
    bound = spread_lower_bound(_spectra(first), sum(b.numel for b in second))
    full = heterogeneity(_spectra(first + second)).spread
    assert full >= bound - 1e-9


@settings(max_examples=200, deadline=None)
@given(_blocks)
def test_with_nothing_to_join_the_bound_is_the_spread(probed):
    spectra = _spectra([_block(f"a{i}", n, 10.0**e, k) for i, (n, e, k) in enumerate(probed)])
    h = heterogeneity(spectra)
    bound = spread_lower_bound(spectra, 0)
    if h.blocks:
        assert bound == pytest.approx(h.spread, abs=1e-12)
    else:
        assert bound == -math.inf


def test_the_bound_is_tight_when_the_joining_blocks_sit_in_the_middle():
    # Scales 1 and 1e4 at the ends, 90 parameters of them; 10 more of any scale can pull
    # neither 5% quantile past the end blocks (5 parameters each at 5% of 100), so the bound
    # is the full 4 decades and a joining block in the middle scores exactly that.
    probed = [_block("lo", 45, 1.0), _block("hi", 45, 1e4)]
    bound = spread_lower_bound(_spectra(probed), 10)
    assert bound == pytest.approx(4.0)
    full = heterogeneity(_spectra([*probed, _block("mid", 10, 1e2)])).spread
    assert full == pytest.approx(4.0)


def test_a_tail_the_unknown_blocks_could_hold_leaves_no_bound():
    # 60 unknown parameters of 100 can hold both 5% tails: nothing can be said.
    probed = [_block("lo", 20, 1.0), _block("hi", 20, 1e4)]
    assert spread_lower_bound(_spectra(probed), 60) == pytest.approx(4.0)
    probed = [_block("only", 4, 1.0)]
    assert spread_lower_bound(_spectra(probed), 96) == -math.inf


def test_blocks_judged_by_the_relative_floor_give_no_bound():
    # Without a measured round-off level a block's inclusion depends on the largest scale,
    # which a joining block can change.
    hand = BlockSpectrum("w", 10, (1.0,), (1.0,), 1.0, 1.0, 1.0)
    assert hand.roundoff is None
    assert spread_lower_bound(_spectra([hand, _block("v", 10, 1e3)]), 1) == -math.inf


@pytest.mark.parametrize("unknown", [-1, 1.5, True])
def test_the_unknown_parameter_count_is_checked(unknown):
    with pytest.raises(ValueError, match="parameter count"):
        spread_lower_bound(_spectra([_block("w", 10, 1.0)]), unknown)


# -- the stages, and block_spectra taking them ----------------------------------------------------


class Scaled(nn.Module):
    """Three layers whose inputs are scaled apart, so that their weights' curvature differs by
    decades; the biases are few parameters in many blocks, as in real models."""

    def __init__(self, scale: float = 30.0) -> None:
        super().__init__()
        self.scale = scale
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 32)
        self.l3 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x * self.scale))
        return self.l3(torch.tanh(self.l2(h)) / self.scale)


def _task(scale: float = 30.0, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = Scaled(scale).to(dtype)
    x = torch.randn(64, 16, dtype=dtype)
    y = torch.randint(0, 4, (64,))

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    return model, loss


def test_the_split_takes_the_fewest_largest_blocks_that_hold_the_share():
    model, _ = _task()
    blocks = partition(model)  # l1: 512 + 32, l2: 1024 + 32, l3: 128 + 4 parameters
    large, small = split_by_size(blocks, 0.95)
    assert [b.name for b in large] == ["l1.weight", "l2.weight", "l3.weight"]
    assert [b.name for b in small] == ["l1.bias", "l2.bias", "l3.bias"]
    total = sum(b.numel for b in blocks)
    assert sum(b.numel for b in large) >= 0.95 * total
    # without l3.weight the others hold less than the share
    assert sum(b.numel for b in large[:2]) < 0.95 * total
    assert split_by_size(blocks, 1.0) == (blocks, [])


def test_the_stages_add_the_largest_blocks_share_by_share_then_the_rest():
    model, _ = _task()
    blocks = partition(model)
    names = [b.name for b in blocks]
    stages = stages_by_size(blocks)
    # 50%: l2.weight (59%); 70%: l1.weight (89%); 80% adds nothing; 90%: l3.weight (96%)
    assert [[names[i] for i in st] for st in stages] == [
        ["l2.weight"],
        ["l1.weight"],
        ["l3.weight"],
        ["l1.bias", "l2.bias", "l3.bias"],
    ]
    assert tuple(sorted(STAGE_SHARES)) == STAGE_SHARES and STAGE_SHARES[-1] < 1.0
    assert stages_by_size(blocks, ()) == [list(range(len(blocks)))]


class _Sized:
    """A stand-in block: a name and a size are all the stages read."""

    def __init__(self, i: int, numel: int) -> None:
        self.name, self.numel = f"b{i}", numel


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=40),
    shares=st.lists(st.floats(0.01, 0.99), max_size=6).map(sorted),
)
def test_the_stages_cut_where_the_split_cuts_at_every_share(sizes, shares):
    blocks = [_Sized(i, n) for i, n in enumerate(sizes)]
    stages = stages_by_size(blocks, shares)
    flat = [i for stage in stages for i in stage]
    assert sorted(flat) == list(range(len(blocks)))  # every block once
    assert all(stage and stage == sorted(stage) for stage in stages)
    # after the stage that reaches each share, the blocks taken are split_by_size's large set
    taken: set[int] = set()
    cuts = iter(stages)
    for share in shares:
        large, _ = split_by_size(blocks, share)
        want = {b.name for b in large}
        while {blocks[i].name for i in taken} != want:
            taken.update(next(cuts))
        assert {blocks[i].name for i in taken} == want


def test_block_spectra_in_stages_measures_what_one_stage_does():
    model, loss = _task(dtype=torch.float64)
    blocks = partition(model)
    stages = stages_by_size(blocks)
    kw = {"steps": 8, "seed": 3, "tol": 0.02}
    whole = block_spectra(model, loss, blocks, **kw)
    seen: list[list[str]] = []

    def never(partial: Spectra) -> bool:
        seen.append(list(partial))
        return False

    staged = block_spectra(model, loss, blocks, stages=stages, until=never, **kw)
    assert list(staged) == list(whole)
    for name in whole:  # start vectors depend on the seed and the block's name alone
        assert staged[name] == whole[name]
    assert staged.hvps == whole.hvps and staged.local_hvps == whole.local_hvps
    assert (staged.dtype, staged.tol, staged.backend) == (whole.dtype, whole.tol, whole.backend)
    # asked after every stage but the last, with the blocks so far in partition order
    assert seen == [
        ["l2.weight"],
        ["l1.weight", "l2.weight"],
        ["l1.weight", "l2.weight", "l3.weight"],
    ]


@settings(max_examples=25, deadline=None)
@given(st.permutations(range(6)), st.lists(st.booleans(), min_size=5, max_size=5))
def test_any_stages_measure_what_one_stage_does(order, cuts):
    """However the blocks are cut into stages and ordered, every block's spectrum, the
    products and the dtype are those of one stage (start vectors depend on the seed and the
    block's name alone, and every stage runs through the one gradient graph)."""
    stages: list[list[int]] = [[order[0]]]
    for i, cut in zip(order[1:], cuts):
        if cut:
            stages.append([])
        stages[-1].append(i)
    whole, staged = (
        block_spectra(_MODEL64, _LOSS64, _BLOCKS64, steps=6, seed=5, tol=0.02, stages=s)
        for s in (None, stages)
    )
    assert list(staged) == list(whole)
    assert all(staged[n] == whole[n] for n in whole)
    assert (staged.hvps, staged.dtype) == (whole.hvps, whole.dtype)


_MODEL64, _LOSS64 = _task(dtype=torch.float64)
_BLOCKS64 = partition(_MODEL64)


def test_block_spectra_stops_after_the_stage_until_accepts():
    model, loss = _task(dtype=torch.float64)
    blocks = partition(model)
    kw = {"steps": 8, "seed": 3, "tol": 0.02}
    whole = block_spectra(model, loss, blocks, **kw)
    two = block_spectra(
        model, loss, blocks, stages=stages_by_size(blocks), until=lambda p: len(p) >= 2, **kw
    )
    assert list(two) == ["l1.weight", "l2.weight"]
    assert all(two[n] == whole[n] for n in two)
    assert two.hvps == whole["l1.weight"].steps + whole["l2.weight"].steps < whole.hvps


@pytest.mark.parametrize(
    ("stages", "error", "match"),
    [
        ([[0, 1], [2, 3, 4]], ValueError, "exactly once"),
        ([[0, 1, 2], [2, 3, 4, 5]], ValueError, "exactly once"),
        ([[0, 1, 2, 3, 4, 5, 6]], ValueError, "exactly once"),
        ([[0, 1, 2], []], TypeError, "non-empty"),
        ([[0, 1.0, 2], [3, 4, 5]], TypeError, "ints"),
        ("012345", TypeError, "sequence of sequences"),
    ],
    ids=["missing", "twice", "unknown", "empty", "float", "string"],
)
def test_block_spectra_refuses_stages_that_do_not_cover_the_blocks(stages, error, match):
    model, loss = _task()
    with pytest.raises(error, match=match):
        block_spectra(model, loss, partition(model), steps=4, stages=stages)


# -- the optimizer ------------------------------------------------------------------------------


def _step_all(opt: BlockOptimizer, loss, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.zero_grad()
            value = loss()
            value.backward()
            opt.observe_loss(value)
            opt.step()


def _run(staged: bool, scale: float = 30.0, steps: int = 31, **kw):
    model, loss = _task(scale)
    opt = BlockOptimizer(model, loss, lr=0.05, probe_every=10, staged=staged, **kw)
    _step_all(opt, loss, steps)
    return model, opt


def test_a_probe_that_adam_settles_stops_after_the_largest_blocks_and_trains_the_same():
    model, opt = _run(True)
    ref_model, ref = _run(False)
    names = [b.name for b in opt.blocks]
    first, second = opt.spectra_history[0][1], opt.spectra_history[1][1]
    assert opt.history[0].new_mode == "adam"  # the scaled layers call for Adam
    # the first stage (l2.weight) bounds nothing; with l1.weight, 89% of the parameters, the
    # bound settles Adam
    assert list(first) == ["l1.weight", "l2.weight"]
    assert list(second) == names  # the probe after a staged one measures every block
    # and the one after that may stage again: in Adam, within min_interval of the switch,
    # no score leads elsewhere, so its first stage settles it
    assert list(opt.spectra_history[2][1]) == ["l2.weight"]
    first_note, third_note = (" ".join(opt.history[i].notes) for i in (0, 2))
    assert "decided on the 2 largest of 6 blocks (89% of the parameters)" in first_note
    assert "whatever the score" not in first_note  # the bound itself settled it
    assert "keeps adam whatever the score: too soon after the last switch" in third_note
    # the unstaged run measured the same blocks alike and took the same decisions
    whole = ref.spectra_history[0][1]
    assert list(whole) == names
    for name in first:
        assert first[name] == whole[name]
    assert [d.new_mode for d in opt.history] == [d.new_mode for d in ref.history]
    assert first.hvps < whole.hvps
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_the_bound_of_a_staged_probe_is_below_the_full_score():
    _, opt = _run(True, steps=1)
    _, ref = _run(False, steps=1)
    note = " ".join(opt.history[0].notes)
    bound = float(note.split("the score is at least ")[1].split(",")[0])
    assert bound <= float(ref.history[0].score) + 0.005  # printed to two decimals
    assert bound > opt.policy.thresholds.adam_above + opt.policy.thresholds.margin


def test_a_probe_that_does_not_call_for_adam_measures_every_block():
    # Without the input scaling the layers' curvatures sit close: no Adam, no staging.
    _, opt = _run(True, scale=1.0, steps=1)
    assert opt.history[0].new_mode != "adam"
    assert list(opt.spectra_history[0][1]) == [b.name for b in opt.blocks]
    assert not any("largest" in n for n in opt.history[0].notes)


@pytest.mark.parametrize(
    "kw", [{"staged": False}, {"pin_mode": "adam"}, {"monitor_only": True}], ids=str
)
def test_unstaged_pinned_and_monitored_runs_measure_every_block(kw):
    model, loss = _task()
    opt = BlockOptimizer(model, loss, lr=0.05, probe_every=10, **{"staged": True, **kw})
    _step_all(opt, loss, 1)
    assert list(opt.spectra_history[0][1]) == [b.name for b in opt.blocks]


def test_staged_is_a_flag():
    model, loss = _task()
    with pytest.raises(TypeError, match="staged"):
        BlockOptimizer(model, loss, staged="yes")
    assert BlockOptimizer(model, loss).hparams()["staged"] is True


def test_the_budget_prices_the_probe_after_a_staged_one_with_the_blocks_it_left_out():
    """The probe after a staged one measures the blocks it left out, so the budget takes it to
    cost this probe's seconds plus those blocks' products at this probe's seconds per block
    (taken alike, it would place that probe several times too early on the tiny GPT)."""
    model, loss = _task(30.0)
    opt = BlockOptimizer(model, loss, lr=0.05, staged=True)  # the budget's schedule
    _step_all(opt, loss, 1)
    spectra = opt.spectra_history[0][1]
    skipped = [b.name for b in opt.blocks if b.name not in spectra]
    assert len(spectra) == 2 and len(skipped) == 4  # the probe at step 0 stopped early
    # the first probe ran before any training step was timed: its cost waits to be placed
    expected = opt.probe_seconds + spectra.seconds * len(skipped) / len(spectra)
    assert opt.schedule.pending_cost == pytest.approx(expected, rel=1e-12)
    assert opt.schedule.pending_cost > opt.probe_seconds


class _Measured(dict):
    """What next_probe_cost reads of a probe's spectra: how many blocks, and their seconds."""

    def __init__(self, blocks: int, seconds: float) -> None:
        super().__init__({f"b{i}": None for i in range(blocks)})
        self.seconds = seconds


def test_next_probe_cost_adds_the_left_out_blocks_only():
    def outcome(blocks: int, seconds: float, skipped: tuple[str, ...]):
        return SimpleNamespace(spectra=_Measured(blocks, seconds), skipped=skipped)

    assert next_probe_cost(1.0, outcome(3, 0.6, ())) == 1.0  # every block measured
    # 6 left out at 0.2 s per measured block: 1.2 s more
    assert next_probe_cost(1.0, outcome(3, 0.6, tuple("abcdef"))) == pytest.approx(2.2)
    assert next_probe_cost(1.0, outcome(0, 0.0, ("a",))) == 1.0  # nothing to scale from
