"""Switching policy and probe schedule."""

from __future__ import annotations

import numpy as np
import pytest

from blockopt.optimizer.policy import (
    MAX_BUDGET_WAIT,
    ProbeSchedule,
    Spend,
    SwitchPolicy,
    Thresholds,
    budget_grid,
    budget_wait,
)


@pytest.mark.parametrize(
    ("score", "mode"),
    [(0.0, "sgd"), (0.99, "sgd"), (1.0, "block_sgd"), (1.5, "block_sgd"), (1.51, "adam")],
)
def test_targets(score, mode):
    assert Thresholds().target(score) == mode


@pytest.mark.parametrize(
    ("score", "max_ratio", "mode"),
    [
        (0.3, 0.0, "sgd"),
        (0.3, 2.0, "sgd"),  # at the boundary: one rate still suits every block
        (0.3, 3.1, "block_sgd"),  # the BatchNorm CNN: bulk at one scale, gains 3 decades below
        (1.2, 0.5, "block_sgd"),
        (2.0, 5.0, "adam"),  # the ratio never holds a model back from Adam
    ],
)
def test_targets_with_small_blocks_far_below(score, max_ratio, mode):
    assert Thresholds(block_ratio=2.0).target(score, max_ratio) == mode


@pytest.mark.parametrize("max_ratio", [0.0, 3.1, 1e300])
def test_block_ratio_is_off_by_default(max_ratio):
    """By default max_ratio never moves a score in SGD's band to block SGD (nor the reason
    mentions it); above sgd_below the score alone decides, as with the rule on."""
    t = Thresholds()
    assert t.block_ratio is None
    assert t.target(0.3, max_ratio) == "sgd"
    assert "max_ratio" not in t.reason(0.3, max_ratio) and "over all blocks" not in t.reason(
        0.3, max_ratio
    )
    assert (t.target(1.2, max_ratio), t.target(2.0, max_ratio)) == ("block_sgd", "adam")
    policy = SwitchPolicy(Thresholds(min_interval=0))
    assert not policy.decide(0, 0.3, "sgd", max_ratio=max_ratio).switched
    d = policy.decide(1, 0.3, "block_sgd", max_ratio=max_ratio)  # back to SGD on the score alone
    assert d.new_mode == "sgd" and d.switched


def test_small_blocks_far_below_switch_with_hysteresis():
    """Into block SGD needs max_ratio past block_ratio + margin, back to SGD both the score
    below sgd_below - margin and max_ratio below block_ratio - margin; the reasons say which."""
    policy = SwitchPolicy(Thresholds(block_ratio=2.0, margin=0.25, min_interval=0))
    d = policy.decide(0, 0.3, "sgd", max_ratio=2.1)  # past 2, not past 2.25
    assert not d.switched and "within the 0.25 margin" in d.reason and "max_ratio 2.10" in d.reason
    d = policy.decide(1, 0.3, "sgd", max_ratio=3.1)
    assert d.new_mode == "block_sgd"
    assert "max_ratio 3.10 > 2" in d.reason and "more than 2 decades below" in d.reason
    d = policy.decide(2, 0.3, "block_sgd", max_ratio=1.9)  # below 2, not below 1.75
    assert not d.switched
    d = policy.decide(3, 0.9, "block_sgd", max_ratio=1.0)  # the score is within its margin
    assert not d.switched
    d = policy.decide(4, 0.5, "block_sgd", max_ratio=1.0)
    assert d.new_mode == "sgd" and "1.00 <= 2 over all blocks" in d.reason
    d = policy.decide(5, 0.5, "adam", max_ratio=1.9)  # from Adam: 1.9 is not below 1.75
    assert d.new_mode == "block_sgd"
    assert not policy.decide(6, 0.5, "sgd", max_ratio=float("nan")).switched


def test_hysteresis_margin_and_min_interval():
    policy = SwitchPolicy(Thresholds(sgd_below=1.0, adam_above=2.0, margin=0.25, min_interval=10))
    d = policy.decide(0, 2.1, "sgd")  # beyond 2.0 but not 2.25: only the block boundary cleared
    assert (d.new_mode, d.switched) == ("block_sgd", True)
    d = policy.decide(5, 3.0, "block_sgd")  # clears the margin, but only 5 steps later
    assert not d.switched and "min_interval=10" in d.reason
    d = policy.decide(10, 3.0, "block_sgd")
    assert d.new_mode == "adam" and d.old_mode == "block_sgd" and "> 2" in d.reason
    d = policy.decide(30, 1.9, "adam")  # below 2.0 but within the margin
    assert not d.switched and "margin" in d.reason
    d = policy.decide(31, 0.5, "adam")
    assert d.new_mode == "sgd"
    assert policy.decide(100, 0.5, "sgd").reason.startswith("stay: score 0.50 < 1")
    assert not policy.decide(101, float("nan"), "sgd").switched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sgd_below": 3.0, "adam_above": 2.0}, "must not exceed"),
        ({"margin": -1.0}, "margin"),
        ({"sgd_below": float("nan")}, "sgd_below"),
        ({"min_interval": -1}, "min_interval"),
        ({"min_interval": 2.5}, "min_interval"),
        ({"block_ratio": -0.5}, "block_ratio"),
        ({"block_ratio": float("inf")}, "block_ratio"),
        ({"block_ratio": "2"}, r"block_ratio must be a number \(or None: off\)"),
    ],
)
def test_bad_thresholds(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Thresholds(**kwargs)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown mode 'rmsprop'"):
        SwitchPolicy().decide(0, 1.0, "rmsprop")


def test_schedule_grows_while_stable_and_resets_after_a_switch():
    s = ProbeSchedule(base=10, max_interval=40, growth=2.0, stable_tol=0.1)
    assert s.due(0) and not ProbeSchedule(first=5).due(4)
    s.after_probe(0, 1.0, switched=False)
    assert s.next_step == 10
    s.after_probe(10, 1.05, switched=False)
    assert s.next_step == 30
    s.after_probe(30, 1.0, switched=False)
    assert s.next_step == 70
    s.after_probe(70, 1.0, switched=False)
    assert s.next_step == 110  # capped at max_interval
    s.after_probe(110, 1.0, switched=True)
    assert s.next_step == 120
    s.after_probe(120, 2.0, switched=False)  # score moved: back to base
    assert s.next_step == 130


def test_schedule_takes_a_nan_score_for_no_reading():
    """A probe whose score keeps no block records NaN: never a stable score, so the interval
    starts over at base, and the next real score is compared with nothing."""
    s = ProbeSchedule(base=10, max_interval=40, growth=2.0, stable_tol=0.1)
    s.after_probe(0, 1.0, switched=False)
    s.after_probe(10, 1.0, switched=False)
    assert s.next_step == 30
    s.after_probe(30, float("nan"), switched=False)
    assert s.next_step == 40
    s.after_probe(40, float("nan"), switched=False)
    assert s.next_step == 50
    s.after_probe(50, 1.0, switched=False)
    assert s.next_step == 60
    s.after_probe(60, 1.0, switched=False)
    assert s.next_step == 80


def test_fixed_interval_and_loss_spike():
    fixed = ProbeSchedule(every=7)
    fixed.after_probe(0, 1.0, switched=True)
    assert fixed.next_step == 7
    s = ProbeSchedule(base=100)
    s.after_probe(0, 1.0, switched=False)
    for step in range(1, 20):
        s.observe_loss(step, 1.0)
    assert s.next_step == 100
    assert not s.spiked
    s.observe_loss(20, 5.0)
    assert s.next_step == 21 and s.spiked
    restored = ProbeSchedule()
    restored.load_state_dict(s.state_dict())
    assert restored == s
    with pytest.raises(ValueError, match="unknown probe-schedule state"):
        restored.load_state_dict({"bogus": 1})


def test_spiked_records_a_spike_until_the_next_successful_probe():
    """``spiked`` is set by any spike (with a fixed interval too, where it moves no probe),
    survives a failed probe and is cleared by a successful one."""
    for schedule in (ProbeSchedule(every=7), ProbeSchedule(base=100)):
        schedule.after_probe(0, 1.0, switched=False)
        for step in range(1, 10):
            schedule.observe_loss(step, 1.0)
        schedule.observe_loss(10, 50.0)  # the 10th loss: too early to call anything a spike
        assert not schedule.spiked
        schedule.observe_loss(11, 500.0)
        assert schedule.spiked
        assert schedule.next_step == (7 if schedule.every else 12)
        schedule.after_probe(12, None, switched=False)  # failed: the spike is still unread
        assert schedule.spiked
        schedule.after_probe(13, 1.0, switched=False)
        assert not schedule.spiked


@pytest.mark.parametrize(
    "kwargs", [{"every": 0}, {"base": 0}, {"max_interval": 5, "base": 10}, {"growth": 0.5}]
)
def test_bad_schedule(kwargs):
    with pytest.raises(ValueError):
        ProbeSchedule(**kwargs)


def test_losses_near_or_below_zero_are_not_spikes():
    """A loss that only wobbles near zero (or sits below zero) must not pull probes forward,
    even by multiples of itself; a rise by more than 1% of the first loss still does."""
    s = ProbeSchedule(base=1000)
    s.after_probe(0, 1.0, switched=False)
    s.observe_loss(0, 10.0)
    for step, loss in enumerate([1e-13, -2e-13, 3e-13, -1e-12, 2e-12] * 60, start=1):
        s.observe_loss(step, loss)  # the running average decays to round-off too
    assert s.next_step == 1000 and abs(s.loss_avg) < 1e-4
    s.observe_loss(301, 0.09)  # 90 times the average, but 0.9% of the first loss: noise
    assert s.next_step == 1000
    s.observe_loss(302, 0.5)  # 5% of the first loss: a real rise
    assert s.next_step == 303
    negative = ProbeSchedule(base=100)
    negative.after_probe(0, 1.0, switched=False)
    for step in range(1, 20):
        negative.observe_loss(step, -5.0)
    negative.observe_loss(20, -4.0)  # above the average, but not twice its magnitude above it
    assert negative.next_step == 100
    negative.observe_loss(21, 6.0)
    assert negative.next_step == 22


# -- the probe budget ---------------------------------------------------------------------------

# P = 10 s probed of E = 20 s trained over 100 steps: tau = (20 - 10) / 100 = 0.1 s a step. The
# next 10 s probe keeps a 3% budget when 10 + 10 <= 0.03 (20 + 0.1 k + 10), k >= 6366.67: 6367,
# on the grid 50 * 2**7 = 6400.
DEAR = Spend(probe_seconds=10.0, train_seconds=20.0, steps=100, cost=10.0)


def test_budget_wait_is_the_fewest_steps_that_keep_the_share():
    assert DEAR.step_seconds == pytest.approx(0.1)
    assert budget_wait(0.03, DEAR) == 6367
    # 8 s of 72.25 s over 450 steps (tau 0.125 s), an 8 s probe, 25%: k = 126 exactly, where
    # 8 + 16 = 0.25 (72.25 + 0.125 * 126 + 8) holds with equality
    assert budget_wait(0.25, Spend(16.0, 72.25, 450, 8.0)) == 126
    assert budget_wait(0.03, Spend(1.0, 1000.0, 1000, 1.0)) == 0  # 0.2% spent: probe at once
    assert budget_wait(0.03, Spend(10.0, 10.0, 0, 10.0)) is None  # no step timed yet
    assert budget_wait(0.03, Spend(10.0, 10.0, 5, 10.0)) is None  # no training time measured
    assert budget_wait(0.5, Spend(1.0, 1.0 + 2**-40, 1, 1.0)) == MAX_BUDGET_WAIT


@pytest.mark.parametrize(
    ("k", "steps"), [(0, 0), (1, 50), (50, 50), (51, 100), (100, 100), (101, 200), (6367, 6400)]
)
def test_budget_grid_rounds_up_to_base_times_a_power_of_two(k, steps):
    assert budget_grid(k, 50) == steps


def test_budget_defers_the_next_probe_beyond_max_interval():
    s = ProbeSchedule(budget=0.03)
    s.after_probe(100, 1.0, switched=False, spend=DEAR)
    assert (s.interval, s.budget_step, s.next_step) == (50, 6500, 6500)
    assert s.next_step - 100 > s.max_interval
    s.after_probe(6500, 1.0, switched=False, spend=Spend(20.0, 2000.0, 6500, 10.0))
    assert s.next_step == 6600  # 30 <= 0.03 * 2010: the budget allows it, the interval decides


def test_the_normal_interval_wins_when_it_is_longer():
    s = ProbeSchedule(base=50, budget=0.5)
    s.after_probe(0, 1.0, switched=False)
    s.after_probe(50, 1.0, switched=False)  # stable: the interval grows to 100
    # tau = 0.01 s; 2 <= 0.5 (2 + 0.01 k + 1) needs k >= 100: budget step 200, the interval 400
    for step, interval in ((150, 200), (350, 400)):
        s.after_probe(step, 1.0, switched=False, spend=Spend(1.0, 2.0, 100, 1.0))
        assert (s.interval, s.budget_step, s.next_step) == (interval, step + 100, step + interval)


def test_a_spike_brings_the_probe_forward_only_as_far_as_the_budget_allows():
    def run(budget):
        s = ProbeSchedule(base=100, budget=budget)
        s.after_probe(0, 1.0, switched=False)
        # tau = 0.01 s; 2 <= 0.5 (2 + 0.01 k + 1) needs k >= 100: the budget allows step 200
        s.after_probe(100, 1.0, switched=False, spend=Spend(1.0, 2.0, 100, 1.0))
        for step in range(101, 111):
            s.observe_loss(step, 1.0)
        s.observe_loss(111, 100.0)
        return s

    budgeted, free = run(0.5), run(None)
    assert budgeted.budget_step == 200 and budgeted.spiked and budgeted.next_step == 200
    assert free.budget_step == 0 and free.spiked and free.next_step == 112
    late = budgeted  # once the budget allows a probe at once, a spike brings it to the next step
    late.after_probe(200, 1.0, switched=False, spend=Spend(1.0, 1000.0, 200, 1.0))
    assert (late.budget_step, late.next_step) == (200, 400)
    for step in range(201, 230):
        late.observe_loss(step, 1.0)
    late.observe_loss(230, 100.0)
    assert late.next_step == 231


def test_the_first_probe_runs_and_its_cost_waits_for_a_step_time():
    s = ProbeSchedule(budget=0.03)
    assert s.due(0) and s.budget_step == 0  # whatever the first probe will cost
    s.after_probe(0, 1.0, switched=False, spend=Spend(10.0, 10.0, 0, 10.0))
    assert s.budget_pending and s.pending_cost == 10.0 and s.next_step == 50
    s.place_pending(50, Spend(10.0, 10.0, 50, 0.0))  # still no training time: the probe runs
    assert s.budget_pending and s.due(50)
    # tau = 5 / 50 = 0.1 s; 10 + 10 <= 0.03 (15 + 0.1 k + 10) needs k >= 6416.67: 6417, 12800
    s.place_pending(50, Spend(10.0, 15.0, 50, 0.0))
    assert not s.budget_pending and s.pending_cost is None
    assert (s.budget_step, s.next_step) == (12850, 12850) and not s.due(50)
    s.place_pending(60, Spend(10.0, 16.0, 60, 0.0))  # nothing pending: nothing changes
    assert s.next_step == 12850


def test_a_due_probe_is_rechecked_against_the_time_really_spent():
    """Placed from slow first steps (tau = 0.1 s), the probe falls due once steps got faster:
    the time really spent no longer fits it, so it waits; where it fits, it runs."""
    s = ProbeSchedule(base=50, budget=0.1)
    # 2 + 1 <= 0.1 (6 + 0.1 k + 1) needs k >= 230: 400 on the grid, step 450
    s.after_probe(50, 1.0, switched=False, spend=Spend(2.0, 6.0, 50, 1.0))
    assert (s.last_cost, s.next_step) == (1.0, 450) and s.due(450)
    # only 10 s spent by step 450 (tau = 8 / 450): 3 <= 0.1 (10 + tau k + 1) needs k >= 1069
    s.recheck(450, Spend(2.0, 10.0, 450, 0.0))
    assert (s.budget_step, s.next_step) == (450 + 1600, 2050) and not s.due(450)
    s.recheck(2050, Spend(2.0, 40.0, 2050, 0.0))  # 3 <= 0.1 (41): it fits, nothing changes
    assert s.next_step == 2050 and s.due(2050)
    unbudgeted = ProbeSchedule(base=50)
    unbudgeted.after_probe(50, 1.0, switched=False, spend=Spend(2.0, 6.0, 50, 1.0))
    unbudgeted.recheck(100, Spend(3.0, 10.0, 100, 0.0))
    assert unbudgeted.next_step == 100 and unbudgeted.last_cost is None


def test_a_failed_probe_backs_off_and_waits_for_the_budget():
    s = ProbeSchedule(base=50, budget=0.03)
    s.after_probe(100, None, switched=False, spend=DEAR)
    assert (s.failures, s.budget_step, s.next_step) == (1, 6500, 6500)
    cheap = ProbeSchedule(base=50, budget=0.03)  # a failure that cost a millisecond
    cheap.after_probe(100, None, switched=False, spend=Spend(0.1, 20.0, 100, 0.001))
    cheap.after_probe(150, None, switched=False, spend=Spend(0.1, 25.0, 150, 0.001))
    assert (cheap.failures, cheap.budget_step, cheap.next_step) == (2, 150, 250)


def test_a_fixed_interval_ignores_the_budget():
    s = ProbeSchedule(every=7, budget=0.03)
    assert not s.budgeted
    s.after_probe(100, 1.0, switched=False, spend=DEAR)
    assert (s.next_step, s.budget_step, s.pending_cost) == (107, 0, None)
    s.after_probe(107, None, switched=False, spend=DEAR)
    assert s.next_step == 114


def test_without_a_budget_the_spend_changes_nothing():
    plain, handed = ProbeSchedule(), ProbeSchedule(budget=None)
    for step, score in ((0, 1.0), (50, 1.1), (150, 1.1), (350, 2.0), (400, None), (450, 1.0)):
        plain.after_probe(step, score, switched=False)
        handed.after_probe(step, score, switched=False, spend=DEAR)
        for s in (plain, handed):
            for t in range(step + 1, step + 12):
                s.observe_loss(t, 1.0 if t % 11 else 50.0)
        assert plain == handed


@pytest.mark.parametrize("budget", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan"), True, "0.03"])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match=r"probe_budget must be a share .* or None"):
        ProbeSchedule(budget=budget)


def test_budget_accepts_numpy_floats_and_its_state_round_trips():
    s = ProbeSchedule(budget=np.float32(0.25))
    assert type(s.budget) is float and s.budget == pytest.approx(0.25)
    s.after_probe(0, 1.0, switched=False, spend=Spend(8.0, 8.0, 0, 8.0))
    s.place_pending(50, Spend(8.0, 14.25, 50, 0.0))
    s.after_probe(450, 1.0, switched=False, spend=Spend(16.0, 72.25, 450, 8.0))
    state = s.state_dict()
    assert state["budget_step"] == 650 and state["pending_cost"] is None
    restored = ProbeSchedule()
    restored.load_state_dict(state)
    assert restored == s and restored.budgeted
