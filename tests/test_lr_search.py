"""The learning-rate search at a switch: the walk, the trials on the probe batch, and what the
optimizer does with them."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import blockopt
from blockopt.optimizer.lr_search import (
    DEFAULT_FACTOR,
    MIN_GAIN,
    RISE,
    grid_start,
    recheck_multiplier,
    search_multiplier,
)
from blockopt.optimizer.lr_trials import trial_loss
from blockopt.optimizer.tuner import SEARCH_BACKOFF, SEARCH_MAX_UP, SearchSettings

# -- the walk --------------------------------------------------------------------------------


def _walk_of(found):
    """The re-check's trial losses in walking order (multiplier 1, 1/r, 1/r**2, ...)."""
    trials = dict(found.trials)
    return [trials[m] for m in sorted(trials, reverse=True) if m > 0]


@settings(max_examples=300, deadline=None)
@given(
    st.floats(-1e6, 1e6),
    st.floats(0.0, 1e3),
    st.lists(st.floats(-1e7, 1e7, allow_nan=False) | st.just(math.inf), min_size=1, max_size=12),
    st.booleans(),
)
def test_recheck_moves_down_only_to_real_progress(base, floor, values, keep_stable):
    """Whatever the trials return: the rate never goes up; each step of the walk gained more
    than MIN_GAIN on the one before; a move lands on the walk's last rate, which lowers the
    loss by more than MIN_GAIN of max(|baseline|, floor); with keep_stable, a stable current
    rate is kept after one trial and only an unstable one moves; at most 8 trials."""
    it = iter(values + [math.inf] * 12)
    found = recheck_multiplier(lambda _m: next(it), base, floor=floor, keep_stable=keep_stable)
    size = max(abs(base), floor)
    trials = dict(found.trials)
    walk = _walk_of(found)
    assert trials[0.0] == base and 1 <= len(walk) <= 8 and found.multiplier <= 1.0
    accepted = walk if len(walk) == 8 else walk[:-1]  # the last one ended the walk
    for before, after in itertools.pairwise(accepted):
        assert after < (before - MIN_GAIN * abs(before) if math.isfinite(before) else before)
    stable = walk[0] <= base + (RISE - 1) * size
    if keep_stable and stable:
        assert found.multiplier == 1.0 and len(walk) == 1
    if found.multiplier != 1.0:
        k = round(-math.log(found.multiplier, DEFAULT_FACTOR))
        assert k == len(accepted) - 1 and trials[found.multiplier] < base - MIN_GAIN * size
        assert not (keep_stable and stable)


def test_recheck_examples():
    """A stalled-but-stable rate stays; a diverging one steps down to the best lower rate; a
    fitted batch (no rate makes real progress) keeps the rate; a floor turns the relative
    swings of a tiny loss into noise."""
    r = DEFAULT_FACTOR

    def table(values):
        return lambda m: values[round(-math.log(m, r))]

    assert recheck_multiplier(table({0: 1.9}), 1.0).multiplier == 1.0  # below 2x: stable
    found = recheck_multiplier(table({0: math.inf, 1: 3.0, 2: 0.5, 3: 0.7}), 1.0)
    assert found.multiplier == pytest.approx(r**-2) and len(found.trials) == 5
    fitted = recheck_multiplier(table({0: 3e-5, 1: 1.2e-5, 2: 1.0e-5, 3: 1.0e-5}), 1e-5)
    assert fitted.multiplier == 1.0  # 1e-5 -> 1e-5: no real progress anywhere
    drift = {0: 3e-4, 1: 1.5e-4, 2: 8e-5, 3: 9e-5}
    assert recheck_multiplier(table(drift), 1e-4).multiplier == pytest.approx(r**-2)
    assert recheck_multiplier(table(drift), 1e-4, floor=0.02).multiplier == 1.0
    # Adam (keep_stable=False): a stall at a floor its rate sets is a reason to go down
    stall = {0: 1.1e-5, 1: 2e-6, 2: 1.99e-6}
    assert recheck_multiplier(table(stall), 1e-5).multiplier == 1.0  # stable: SGD keeps it
    found = recheck_multiplier(table(stall), 1e-5, keep_stable=False)
    assert found.multiplier == pytest.approx(1 / r) and len(found.trials) == 4  # 0.5% < 1%
    drifting = recheck_multiplier(table({0: 1e-5, 1: 0.999e-5}), 1e-5, keep_stable=False)
    assert drifting.multiplier == 1.0  # 0.1% gained: noise, not progress


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": math.nan}, "baseline"),
        ({"rise": 0.5}, "rise"),
        ({"min_gain": 1.0}, "min_gain"),
        ({"floor": -1.0}, "floor"),
        ({"max_trials": 1}, "max_trials"),
        ({"factor": 1.0}, "factor"),
    ],
)
def test_recheck_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        recheck_multiplier(lambda m: m, **{"baseline": 1.0, **kwargs})


@settings(max_examples=200, deadline=None)
@given(st.floats(-3.9, 3.9))
def test_walk_finds_the_grid_minimum_of_a_unimodal_loss(target):
    """On a loss with one minimum in log-lr, the walk ends at the grid point nearest it, with
    exactly the trials the walk needs (up first, then down)."""
    assume(abs(target % 1 - 0.5) > 1e-6)  # halfway between grid points is a tie (tested below)
    calls = []

    def trial(m):
        calls.append(m)
        return (math.log10(m) * 2 - target) ** 2  # grid points m = sqrt(10)**k at log10 = k/2

    found = search_multiplier(trial, max_trials=20, max_up=20)
    k_best = round(target)
    assert found.multiplier == pytest.approx(DEFAULT_FACTOR**k_best)
    expected = k_best + 2 if k_best > 0 else (3 if k_best == 0 else 3 - k_best)
    assert len(calls) == expected == len(found.trials)
    assert len(set(calls)) == len(calls)  # no multiplier tried twice
    assert found.loss == min(loss for _m, loss in found.trials)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30))
def test_walk_never_exceeds_its_budget_and_keeps_the_best_finite(values):
    """Any sequence of trial results: at most ``max_trials`` calls, the choice is a tried
    multiplier with the lowest loss (non-finite losses count as worst), ties go to the first."""
    it = iter(values + [math.inf] * 30)
    found = search_multiplier(lambda _m: next(it), max_trials=5)
    assert 2 <= len(found.trials) <= 5
    losses = [loss for _m, loss in found.trials]
    assert all(not math.isnan(v) for v in losses)
    assert found.loss == min(losses)
    assert found.multiplier == next(m for m, loss in found.trials if loss == found.loss)


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-8, 1e3))
def test_grid_start_moves_to_the_nearest_round_rate(lr):
    rounded = lr * grid_start(lr)
    k = 2 * math.log10(rounded)
    assert k == pytest.approx(round(k), abs=1e-9)  # a power of sqrt(10)
    assert abs(math.log10(rounded / lr)) <= 0.25 + 1e-12  # the nearest one
    starts = []
    search_multiplier(lambda m: starts.append(m) or 1.0, start=grid_start(lr))
    assert starts[0] == grid_start(lr)  # the walk starts there


def test_ties_keep_the_learning_rate_found_first():
    assert search_multiplier(lambda m: 1.0).multiplier == 1.0
    two_best = {1.0: 3.0, DEFAULT_FACTOR: 2.0, DEFAULT_FACTOR**2: 2.0}
    assert search_multiplier(lambda m: two_best.get(m, 5.0), max_up=3).multiplier == DEFAULT_FACTOR


@pytest.mark.parametrize("max_up", [1, 2, 5])
def test_the_walk_goes_up_at_most_max_up_steps(max_up):
    tried = []
    found = search_multiplier(lambda m: tried.append(m) or -m, max_up=max_up)  # larger is better
    assert found.multiplier == pytest.approx(DEFAULT_FACTOR**max_up) == max(tried)
    assert min(tried) == 1.0  # going up helped, so it never went down


def test_downward_walk_never_tries_a_larger_learning_rate():
    tried = []
    found = search_multiplier(lambda m: tried.append(m) or m, max_up=0)  # smaller is better
    assert max(tried) == 1.0 and found.multiplier == min(tried) < 1.0
    assert len(tried) == 8  # it walked down to the budget
    assert search_multiplier(lambda m: -m, max_up=0).multiplier == 1.0  # larger is better


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"factor": 1.0}, "factor"),
        ({"factor": math.nan}, "factor"),
        ({"max_trials": 1}, "max_trials"),
        ({"max_up": -1}, "max_up"),
        ({"start": 0.0}, "start"),
        ({"min_gain": -0.1}, "min_gain"),
    ],
)
def test_walk_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        search_multiplier(lambda m: m, **kwargs)


# -- trials ----------------------------------------------------------------------------------


def _bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    return model, (lambda: F.cross_entropy(model(x), y)), x, y


def _adam_state(model, probe, steps=3):
    """An AdamW that has taken a few steps on ``model``, so trials start from real state."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        probe().backward()
        opt.step()
    return opt


def test_trial_matches_a_replay_and_leaves_everything_as_it_was():
    """The trial's loss equals training a copy by hand; afterwards parameters, .grad, buffers,
    train/eval modes, RNG streams and the live optimizer's state are bitwise as before."""
    model, probe, x, y = _bn_model()
    live = _adam_state(model, probe)
    model[3].eval()  # a module in eval mode stays so
    loss = probe()
    start_loss = float(loss.detach())
    loss.backward()  # .grad holds the training gradient the trial must not touch
    params = list(model.parameters())
    before = copy.deepcopy(
        {
            "params": [p.detach().clone() for p in params],
            "grads": [p.grad.clone() for p in params],
            "buffers": [b.clone() for b in model.buffers()],
            "state": live.state_dict(),
        }
    )
    grad_objects = [p.grad for p in params]
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    def scratch():
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        opt.load_state_dict(copy.deepcopy(live.state_dict()))
        for g in opt.param_groups:
            g["lr"] = 3e-2
        return opt

    got = trial_loss(model, probe, params, scratch, steps=7)

    replica = copy.deepcopy(model)
    ropt = torch.optim.AdamW(replica.parameters(), lr=1e-2, weight_decay=0.0)
    ropt.load_state_dict(copy.deepcopy(live.state_dict()))
    for g in ropt.param_groups:
        g["lr"] = 3e-2
    for _ in range(7):
        ropt.zero_grad()
        F.cross_entropy(replica(x), y).backward()
        ropt.step()
    with torch.no_grad():
        expected = float(F.cross_entropy(replica(x), y))
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got < start_loss  # the trial did train

    assert all(torch.equal(p, q) for p, q in zip(params, before["params"]))
    assert all(p.grad is g for p, g in zip(params, grad_objects))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before["grads"]))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), before["buffers"]))
    assert model[1].training and not model[3].training
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    after = live.state_dict()["state"]
    for key, st_before in before["state"]["state"].items():
        for name, value in st_before.items():
            assert torch.equal(torch.as_tensor(after[key][name]), torch.as_tensor(value))


def test_a_zero_step_trial_is_the_loss_where_the_parameters_are_and_builds_no_optimizer():
    """A re-check's baseline: the probe's loss as it stands, with no scratch optimizer built."""
    torch.manual_seed(0)
    model, x = nn.Linear(3, 1), torch.randn(8, 3)

    def probe():
        return model(x).pow(2).mean()

    def no_optimizer():
        raise AssertionError("a zero-step trial built an optimizer")

    with torch.no_grad():
        expected = float(probe())
    assert trial_loss(model, probe, list(model.parameters()), no_optimizer, 0) == expected


def test_a_diverging_trial_is_infinite_and_a_failing_one_restores_the_parameters():
    torch.manual_seed(0)
    line = nn.Linear(5, 1).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    params = list(line.parameters())
    saved = [p.detach().clone() for p in params]
    sgd = lambda: torch.optim.SGD(params, lr=1e3)  # noqa: E731  (lr * curvature far past 2)
    assert trial_loss(line, lambda: line(x).pow(2).mean(), params, sgd, steps=200) == math.inf
    assert all(torch.equal(p, q) for p, q in zip(params, saved))
    model, probe, _x, _y = _bn_model()
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the probe's data loader broke")
        return probe()

    with pytest.raises(RuntimeError, match="data loader"):
        trial_loss(model, flaky, params, lambda: torch.optim.SGD(params, lr=0.1), steps=5)
    assert all(torch.equal(p, q) for p, q in zip(params, saved))


# -- the optimizer ---------------------------------------------------------------------------


class StiffQuadratic(nn.Module):
    """Three blocks whose curvatures are 1, 100 and 10,000: four decades apart, so the policy
    switches to Adam at the first probe."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ws = nn.ParameterList(
            [nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64)) for _ in range(3)]
        )
        self.register_buffer("h", torch.tensor([1.0, 100.0, 10_000.0], dtype=torch.float64))
        self.targets = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3)]

    def forward(self):
        return sum(0.5 * h * ((w - t) ** 2).sum() for h, w, t in zip(self.h, self.ws, self.targets))


def _quadratic_run(steps, lr=1e-6, **options):
    """Train the stiff quadratic. SGD's default here, 1e-6, is far below what the stiff block
    allows, so the step-norm match gives Adam a learning rate a hundred times too small."""
    model = StiffQuadratic()
    opt = blockopt.BlockOptimizer(model, model, lr=lr, **options)
    for _ in range(steps):
        opt.zero_grad()
        model().backward()
        opt.step()
    with torch.no_grad():
        return float(model()), opt


def _replay_trial(lr, steps=10):
    """A 10-step AdamW trial (``search_steps``' default) from the quadratic's start, by hand
    (the state after the switch from SGD at step 0 is empty momentum, carried into an empty
    Adam state)."""
    model = StiffQuadratic()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        model().backward()
        opt.step()
    with torch.no_grad():
        return float(model())


def test_a_switch_searches_the_new_modes_learning_rate():
    """At the step-0 switch to Adam the learning rate moves from the step-norm match (0.0082) to
    the nearest round rate (0.01), then half a decade up (0.0316), the most a search may raise
    it, because that trial ends lower (checked by replaying the trials by hand), and takes a
    quarter decade below that best trial (0.0178); the decision's reason says so."""
    _loss, matched = _quadratic_run(1, lr_search=False)
    _loss, searched = _quadratic_run(1)
    assert matched.mode == searched.mode == "adam"
    base = matched.mode_lrs["adam"]
    # the match in closed form: SGD's first step lr * g against Adam's sign step of norm sqrt(n)
    q = StiffQuadratic()
    g = torch.cat([h * (w - t) for h, w, t in zip(q.h, q.ws, q.targets)]).detach()
    assert base == pytest.approx(1e-6 * g.norm().item() / math.sqrt(g.numel()), rel=1e-6)
    start = base * grid_start(base)
    assert start == pytest.approx(0.01, rel=1e-12) and 0.008 < base < 0.009
    best = start * DEFAULT_FACTOR**SEARCH_MAX_UP
    lr = searched.mode_lrs["adam"]
    assert lr == pytest.approx(best * SEARCH_BACKOFF, rel=1e-12)  # a quarter decade below
    assert _replay_trial(best) < _replay_trial(start) < _replay_trial(start / DEFAULT_FACTOR)
    text = searched.history[0].text
    assert "10-step trials on the probe's batch" in text
    assert "adam learning rate 0.0178 (2.16 times the previous, 0.562 times" in text
    assert "0.562 times the best trial's rate) from 10-step" in text
    assert "10-step" not in matched.history[0].text


def test_without_the_backoff_a_switch_takes_the_best_trials_rate():
    """``backoff=1`` keeps the best trial's rate, and the note says nothing of a backoff; any
    other backoff scales it by exactly that much."""
    lrs = {}
    for backoff in (1.0, 0.25):
        model = StiffQuadratic()
        opt = blockopt.BlockOptimizer(model, model, lr=1e-6)
        opt.search_settings = dataclasses.replace(opt.search_settings, backoff=backoff)
        opt.zero_grad()
        model().backward()
        opt.step()
        assert opt.mode == "adam"
        lrs[backoff] = opt.mode_lrs["adam"]
        assert ("times the best trial's rate" in opt.history[0].text) == (backoff != 1.0)
    assert lrs[1.0] == pytest.approx(0.01 * DEFAULT_FACTOR**SEARCH_MAX_UP, rel=1e-12)
    assert lrs[0.25] == pytest.approx(0.25 * lrs[1.0], rel=1e-12)


@pytest.mark.parametrize("backoff", [0.0, -0.5, 1.5, float("nan"), "0.5", None])
def test_search_settings_refuse_a_backoff_outside_zero_to_one(backoff):
    with pytest.raises(ValueError, match=r"backoff must be a number in \(0, 1\]"):
        SearchSettings(backoff=backoff)


def test_the_search_pays_off_on_the_stiff_quadratic():
    # 650 steps: at the backed-off rate the searched run is at 1.4e-9 after 600 steps
    searched_loss, _opt = _quadratic_run(650)
    plain_loss, _plain = _quadratic_run(650, lr_search=False)
    assert searched_loss < 1e-9 < 1.0 < plain_loss


def test_adam_rechecks_lower_a_rate_that_stalls_near_the_minimum():
    """Adam's step keeps a size its rate sets, so near the minimum the loss stalls at a floor
    the rate sets: later probes lower the searched rate (each step down gaining at least
    MIN_GAIN), and the run converges."""
    # probe_budget=None: the re-checks read here run at the adaptive schedule's steps, which a
    # budget would move by measured time (the quadratic's steps cost next to nothing)
    loss, opt = _quadratic_run(600, lr=1e-5, probe_budget=None)
    first_lr = float(opt.history[0].text.split("adam learning rate ")[1].split()[0])
    lowered = [d for d in list(opt.history)[1:] if "trials" in d.text]
    assert lowered and all("times the previous" in d.text for d in lowered)
    # a re-check moves by its trials alone: the backoff belongs to switches
    assert not any("best trial's rate" in d.text for d in lowered)
    assert opt.mode_lrs["adam"] < first_lr / 3 and loss < 1e-12


class _Bowl(nn.Module):
    """A homogeneous quadratic whose curvature the test can raise mid-run."""

    def __init__(self, n: int = 20):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.register_buffer("t", torch.linspace(1.0, 2.0, n, dtype=torch.float64))
        self.stiffness = 1.0

    def forward(self) -> torch.Tensor:
        return 0.5 * self.stiffness * ((self.w - self.t) ** 2).sum()


def _bowl_run(stiffen_at: int | None, monkeypatch) -> tuple[blockopt.BlockOptimizer, list]:
    """Start in Adam, switch to SGD at step 0 (score 0) and search its rate (0.316); from
    ``stiffen_at`` the curvature is 20 times larger, so lr * lambda is 6.3, past SGD's stability
    limit 3.8 but not the 10-times-past that caps the rate without a trial."""
    calls = []

    def spy(trial, baseline, **kwargs):
        found = recheck_multiplier(trial, baseline, **kwargs)
        calls.append((baseline, kwargs, found))
        return found

    monkeypatch.setattr(blockopt.optimizer.tuner, "recheck_multiplier", spy)
    model = _Bowl()
    opt = blockopt.BlockOptimizer(model, model, mode="adam", probe_every=40)
    for i in range(160):
        if i == stiffen_at:
            model.stiffness = 20.0
        opt.zero_grad()
        loss = model()
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
    return opt, calls


def test_a_recheck_lowers_a_rate_the_curvature_made_unstable(monkeypatch):
    steady, steady_calls = _bowl_run(None, monkeypatch)
    # the switch into SGD takes its best trial's rate: no backoff outside Adam's family
    assert steady.mode == "sgd" and steady.mode_lrs["sgd"] == pytest.approx(10**-0.5)
    assert "best trial's rate" not in steady.history[0].text
    assert len(steady_calls) == 3 and all(found.multiplier == 1.0 for *_, found in steady_calls)
    first_loss = 0.5 * float(((_Bowl().t) ** 2).sum())
    for baseline, kwargs, found in steady_calls:
        assert kwargs == {"floor": pytest.approx(0.01 * first_loss)}  # 1% of it
        assert len(found.trials) == 2 and found.trials[0] == (0.0, baseline)  # one trial
    stiff, calls = _bowl_run(110, monkeypatch)
    assert stiff.mode_lrs["sgd"] == pytest.approx(10**-1.0)  # half a decade down, at step 120
    baseline, _kwargs, found = calls[2]
    losses = dict(found.trials)
    assert found.multiplier == pytest.approx(DEFAULT_FACTOR**-1)
    assert losses[1.0] > 1e6 * baseline  # the old rate diverges within the trial
    assert losses[found.multiplier] < (1 - MIN_GAIN) * baseline
    assert "0.316 times the previous" in stiff.history[3].text
    assert stiff.history[3].step == 120


def test_fixed_rates_pins_and_monitoring_skip_the_search():
    _loss, fixed = _quadratic_run(1, lrs={"adam": 1e-3})
    assert fixed.mode == "adam" and fixed.mode_lrs["adam"] == pytest.approx(1e-3)
    assert "trials" not in fixed.history[0].text
    for options in ({"monitor_only": True}, {"pin_mode": "sgd"}):
        _loss, opt = _quadratic_run(60, **options)
        assert opt.mode == "sgd" and not any("trials" in d.text for d in opt.history)


def test_search_state_round_trips():
    _loss, opt = _quadratic_run(1)
    sd = opt.state_dict()
    assert sd["blockopt"]["lr_searched"] is True
    _loss, other = _quadratic_run(0)
    other.load_state_dict(sd)
    assert other.lr_searched is True and other.mode_lrs == opt.mode_lrs


def test_trials_use_the_usual_kernels():
    """Trials are first order: they keep cuDNN and fused attention; only probes give them up."""
    model = nn.Linear(2, 2)
    with torch.backends.cudnn.flags(enabled=True):
        with blockopt.curvature.isolation.isolated(model):
            assert not torch.backends.cudnn.enabled
        with blockopt.curvature.isolation.isolated(model, second_order=False):
            assert torch.backends.cudnn.enabled


def _switching_mlp(frozen=False, lr=1e-3, **options):
    """An MLP whose probe adds stiff ridges on its first layer, so the first probe switches to
    Adam, wrapped from an SGD over all its parameters (one of them frozen if asked)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    if frozen:
        model[2].bias.requires_grad_(False)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def probe():
        ridge = 1e3 * (model[0].weight ** 2).sum() + 1e-2 * (model[2].weight ** 2).sum()
        return F.cross_entropy(model(x), y) + ridge

    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt = blockopt.wrap(sgd, model, probe, **options)
    return model, opt, x, y


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_a_frozen_parameter_in_the_groups_does_not_block_the_search():
    model, opt, x, y = _switching_mlp(frozen=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fault, no failed search
        _step(model, opt, x, y)
    assert opt.mode == "adam" and not opt.faults
    assert "trials on the probe's batch" in opt.history[0].text


def test_a_failing_search_keeps_the_probe_and_the_step_norm_match():
    model, opt, x, y = _switching_mlp(staged=False)  # the spectra take one probe call
    calls = {"n": 0}
    probe = opt.probe

    def breaks_after_the_spectra():
        calls["n"] += 1
        if calls["n"] > 1:  # the spectra need one call; the trials fail
            raise MemoryError("no room for the trial's copies")
        return probe()

    opt.probe = breaks_after_the_spectra
    with pytest.warns(blockopt.ProbeFaultWarning, match="learning-rate search failed") as caught:
        _step(model, opt, x, y)
    assert caught[0].filename == __file__  # the warning points at the caller of step()
    _m, plain, _x, _y = _switching_mlp(lr_search=False, staged=False)
    _step(_m, plain, _x, _y)
    assert opt.mode == plain.mode == "adam" and not opt.faults and len(opt.spectra_history) == 1
    assert opt.mode_lrs["adam"] == plain.mode_lrs["adam"]
    assert "learning-rate search failed (MemoryError" in opt.history[0].text
    assert opt.lr_searched is False


def test_a_warmup_in_progress_does_not_change_the_searched_factor():
    """The factor is searched at the schedule's base rate, so a 100-fold warmup at the switch
    gives the factor a run without warmup gets (searched at the warmed-down rate, trials would
    all be too small and the walk would go up)."""
    scales = []
    for warmup in (False, True):
        model = StiffQuadratic()
        opt = blockopt.BlockOptimizer(model, model, lr=1e-4)  # Adam's match is about right here
        if warmup:
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=10)
            assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
        opt.zero_grad()
        model().backward()
        opt.step()
        assert opt.mode == "adam" and "trials on the probe's batch" in opt.history[0].text
        scales.append(opt.mode_scales["adam"])
    assert scales[1] == pytest.approx(scales[0], rel=1e-9)


def test_the_search_leaves_the_carried_state_alone():
    """Momentum carried into Adam is the same with and without the search: the trials worked
    on copies. After the switch step Adam's moments do not depend on the learning rate."""
    runs = []
    for search in (True, False):
        model, opt, x, y = _switching_mlp(lr_search=search, probe_every=3)
        # stay in SGD at step 0
        opt.policy.thresholds = blockopt.Thresholds(10.0, 10.0, block_ratio=100.0)
        _step(model, opt, x, y)
        _step(model, opt, x, y)
        _step(model, opt, x, y)  # SGD's momentum is not empty now
        opt.policy.thresholds = blockopt.Thresholds()
        _step(model, opt, x, y)  # the probe at step 3 switches to Adam, then Adam steps
        assert opt.mode == "adam"
        runs.append(opt.active_optimizer.state_dict()["state"])
    assert runs[0].keys() == runs[1].keys() and runs[0]
    for key, state in runs[0].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(state[name]), torch.as_tensor(runs[1][key][name]))


def test_training_resumed_after_a_search_is_bitwise_the_same():
    # probe_budget=None: a budget places probes by measured time, which no two runs share
    model, opt, x, y = _switching_mlp(probe_budget=None)
    _step(model, opt, x, y)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    for _ in range(5):
        _step(model, opt, x, y)
    model2, opt2, _x, _y = _switching_mlp(probe_budget=None)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(5):
        _step(model2, opt2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_a_step_up_must_gain_up_gain_and_a_step_down_min_gain():
    """Upward steps need ``up_gain`` of the best loss, downward ones ``min_gain``."""
    losses = {0: 1.0, 1: 0.97, 2: 0.5, 3: 0.6, -1: 1.01}
    found = search_multiplier(
        lambda m: losses[round(math.log10(m) * 2)], factor=10**0.5, max_up=3, up_gain=0.05
    )
    # 0.97 is a 3% gain: the walk does not go up; down, 1.01 is worse, so it stays
    assert found.multiplier == 1.0
    assert [round(math.log10(m) * 2) for m, _ in found.trials] == [0, 1, -1]
    found = search_multiplier(
        lambda m: losses[round(math.log10(m) * 2)], factor=10**0.5, max_up=3, up_gain=0.02
    )
    assert round(math.log10(found.multiplier) * 2) == 2
    with pytest.raises(ValueError, match="up_gain must be a number in"):
        search_multiplier(lambda m: 1.0, up_gain=1.5)
