"""Switching policy and probe schedule."""

from __future__ import annotations

import pytest

from blockopt.policy import ProbeSchedule, SwitchPolicy, Thresholds


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
    assert Thresholds().target(score, max_ratio) == mode


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
