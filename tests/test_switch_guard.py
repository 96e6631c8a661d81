"""Switching that never leaves training clearly worse: ``modes=``, trials judged on a held-out
batch, the no-progress veto of a switch, and the guard that undoes a switch that made training
worse (parameters and the old mode's state put back)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import blockopt
from blockopt.optimizer import tuner
from blockopt.optimizer.guard import GUARD_MARGIN, Watch, judge
from blockopt.optimizer.lr_trials import trial_loss
from blockopt.optimizer.modeset import ActiveMode
from blockopt.optimizer.policy import ProbeFaultWarning, SwitchPolicy, Thresholds
from blockopt.optimizer.tuner import SEARCH_MAX_UP, SearchSettings, Tuned, judge_switch


class Quadratic(nn.Module):
    """Three blocks of 6 coordinates with curvatures ``h``; a float64 quadratic loss."""

    def __init__(self, h=(1.0, 100.0, 10_000.0), seed=0, shift=0.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ws = nn.ParameterList(
            [nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64)) for _ in h]
        )
        self.register_buffer("h", torch.tensor(h, dtype=torch.float64))
        self.targets = [torch.randn(6, generator=gen, dtype=torch.float64) + shift for _ in h]

    def forward(self):
        return sum(0.5 * h * ((w - t) ** 2).sum() for h, w, t in zip(self.h, self.ws, self.targets))


def _train(opt, loss_of, steps):
    losses = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = loss_of()
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


# -- the policy: allowed and refused modes ---------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "refused", "wanted", "mode", "expected"),
    [
        (("sgd", "block_sgd", "adam"), (), "adam", "sgd", "adam"),
        (("sgd", "block_sgd"), (), "adam", "sgd", "block_sgd"),
        (("sgd",), (), "adam", "sgd", "sgd"),
        (("sgd", "adam"), (), "block_sgd", "adam", "adam"),  # tie: towards the current mode
        (("sgd", "adam"), (), "block_sgd", "sgd", "sgd"),
        (("sgd", "block_sgd", "adam"), ("adam",), "adam", "sgd", "block_sgd"),
        (("adam",), (), "sgd", "adam", "adam"),
    ],
)
def test_the_policy_takes_the_nearest_usable_mode(allowed, refused, wanted, mode, expected):
    policy = SwitchPolicy(allowed=allowed, refused=frozenset(refused))
    assert policy.usable(wanted, mode) == expected


def test_a_score_calling_for_a_mode_left_out_keeps_the_mode_and_says_why():
    policy = SwitchPolicy(Thresholds(min_interval=0), allowed=("adam",))
    decision = policy.decide(0, 0.1, "adam")  # a score that calls for SGD
    assert not decision.switched
    assert decision.reason == "stay: score 0.10 calls for sgd, but sgd is not among modes=('adam',)"
    refused = SwitchPolicy(Thresholds(min_interval=0), refused=frozenset({"adam"}))
    decision = refused.decide(0, 3.0, "block_sgd")
    assert not decision.switched
    assert "adam was undone earlier because training got worse" in decision.reason


def test_a_switch_to_a_left_out_mode_goes_to_the_nearest_allowed_one():
    policy = SwitchPolicy(Thresholds(min_interval=0), allowed=("sgd", "block_sgd"))
    decision = policy.decide(0, 3.0, "sgd")
    assert decision.new_mode == "block_sgd"
    assert decision.reason.endswith("adam is not among modes=('sgd', 'block_sgd'), so block_sgd")
    assert policy.last_switch == 0


def test_modes_keeps_a_wrapped_adamw_in_adam():
    """The stiff quadratic's score calls for Adam; a homogeneous one for SGD. With
    ``modes=("adam",)`` a wrapped AdamW stays Adam on the homogeneous one, and the decision
    says why."""
    model = Quadratic(h=(1.0, 1.0, 1.0))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = blockopt.wrap(adamw, model, probe=model, modes=("adam",), probe_every=5)
    _train(opt, model, 12)
    assert opt.mode == "adam"
    assert [d.switched for d in opt.history] == [False, False, False]
    assert "calls for sgd, but sgd is not among modes=('adam',)" in opt.history[0].reason
    model = Quadratic(h=(1.0, 1.0, 1.0))
    free = blockopt.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), model, probe=model)
    _train(free, model, 1)
    assert free.mode == "sgd"  # without modes=, the same score switches to SGD


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"modes": "adam"}, TypeError, r"write modes=\('adam',\) for one mode"),
        ({"modes": ("adam", "lion")}, ValueError, r"unknown: \['lion'\]"),
        ({"modes": ()}, ValueError, "one or more of"),
        ({"modes": ("adam",)}, ValueError, "leaves out 'sgd', the mode training starts in"),
        ({"holdout": 3}, TypeError, "holdout must be a zero-argument callable"),
        ({"guard_steps": 0}, ValueError, "guard_steps must be a positive int"),
        ({"guard_steps": True}, ValueError, "guard_steps must be a positive int"),
    ],
)
def test_bad_switching_arguments_are_refused(kwargs, error, message):
    model = Quadratic()
    with pytest.raises(error, match=message):
        blockopt.BlockOptimizer(model, model, lr=1e-3, **kwargs)


# -- trials judged on a held-out batch ----------------------------------------------------


def test_a_trial_is_judged_on_the_held_out_closure():
    """The trial trains on the probe's loss and reports the held-out loss at the end, which a
    replay by hand reproduces; the parameters are put back."""
    model = Quadratic()
    other = Quadratic(seed=1)
    start = [p.detach().clone() for p in model.parameters()]

    def holdout():  # the same parameters, another target: a batch the trial did not see
        return sum(
            0.5 * h * ((w - t) ** 2).sum() for h, w, t in zip(model.h, model.ws, other.targets)
        )

    params = list(model.parameters())
    got = trial_loss(
        model, model, params, lambda: torch.optim.SGD(params, lr=1e-5), 3, holdout=holdout
    )
    replay = Quadratic()
    sgd = torch.optim.SGD(replay.parameters(), lr=1e-5)
    for _ in range(3):
        sgd.zero_grad()
        replay().backward()
        sgd.step()
    with torch.no_grad():
        expected = sum(
            0.5 * h * ((w - t) ** 2).sum() for h, w, t in zip(replay.h, replay.ws, other.targets)
        )
    assert got == pytest.approx(float(expected), rel=1e-12)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))


def _adam_rate(held_out=False):
    model = Quadratic()
    holdout = model if held_out else None  # the same loss: it keeps falling as the rate grows
    opt = blockopt.BlockOptimizer(model, model, lr=1e-6, holdout=holdout)
    _train(opt, model, 1)
    assert opt.mode == "adam"
    (search,) = [n for n in opt.history[0].notes if "trials" in n]
    return opt.mode_lrs["adam"], search


def test_a_held_out_search_climbs_while_the_held_out_loss_falls():
    """Without a held-out batch the search goes at most ``SEARCH_MAX_UP`` half-decades above
    the round rate nearest the match; judged on a held-out closure (here the same quadratic,
    so the held-out loss keeps falling as the rate grows) it climbs further, and the note
    says what it was judged on."""
    plain, plain_text = _adam_rate()
    held, held_text = _adam_rate(held_out=True)
    assert "judged on the probe's batch" in plain_text
    assert "judged on the held-out batch" in held_text
    steps_up = round(math.log10(held / plain) * 2)
    assert SEARCH_MAX_UP == 1
    assert steps_up >= 1  # it went past the cap the probe's batch imposes
    tried = held_text.split("(")[-1]
    assert tried.count("x:") > plain_text.split("(")[-1].count("x:")


# -- the no-progress veto ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new_loss", "stay", "kept"),
    [
        (2.0, 0.5, True),
        (1.0, 0.5, True),
        (math.inf, 0.5, True),
        (0.9, 0.5, False),
        (2.0, 3.0, False),
    ],
)
def test_a_switch_whose_trials_make_no_progress_is_not_made(monkeypatch, new_loss, stay, kept):
    """Baseline 1.0 (the loss before any step): a switch whose best trial ends at or above it,
    where staying ends lower, keeps the old mode; a switch that makes progress stands, even
    when staying would have gone further in the trial's few steps."""
    calls = []

    def fake_trial(modes, active, groups, settings, setup):
        def trial(multiplier, steps=None):
            calls.append(steps)
            return 1.0 if steps == 0 else stay

        return trial

    monkeypatch.setattr(tuner, "_trial", fake_trial)
    before = ActiveMode("adam", torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), {})
    after = Tuned(ActiveMode("sgd", before.optimizer, {}), ("searched",), 0.0, new_loss)
    setup = tuner.TrialSetup(nn.Linear(1, 1), lambda: None, None, (), {}, 0.0, nn.Linear(1, 1))
    got = judge_switch(None, before, after, [], SearchSettings(), setup)
    assert (got.active is before) is kept
    assert calls == ([0] if new_loss < 1.0 else [0, None])
    if kept:
        assert got.notes[0] == "searched"
        assert got.notes[1].startswith("kept adam: sgd's best 10-step trial ends at")
    assert judge_switch(None, before, after, [], SearchSettings(enabled=False), setup) is after


# -- the guard --------------------------------------------------------------------------------


def _watch(reference, losses):
    return Watch(0, "adam", None, (), {}, (), (), reference, tuple(losses))


@pytest.mark.parametrize(
    ("reference", "losses", "sign", "floor", "expected"),
    [
        (1.0, [0.9] * 20, 1.0, 0.0, "keep"),
        (1.0, [1.0 + GUARD_MARGIN] * 20, 1.0, 0.0, "keep"),  # not above the margin
        (1.0, [1.2] * 20, 1.0, 0.0, "undo"),
        (1.0, [1.2] * 20, 1.0, 0.5, "keep"),  # within the loss-noise floor
        (1.0, [1.2] * 19, 1.0, 0.0, None),  # not judged yet
        (1.0, [0.5] * 9 + [math.nan] * 11, 1.0, 0.0, "undo"),  # non-finite counts as worst
        (-1.0, [-0.8] * 20, -1.0, 0.0, "keep"),  # maximize: the objective rose
        (-1.0, [-1.2] * 20, -1.0, 0.0, "undo"),
        (math.nan, [5.0] * 20, 1.0, 0.0, "keep"),
    ],
)
def test_the_guard_judges_the_median_against_the_loss_before(
    reference, losses, sign, floor, expected
):
    assert judge(_watch(reference, losses), 20, floor, sign) == expected


def test_a_watch_without_a_loss_before_starts_from_the_first_loss_after():
    watch = _watch(None, []).seen(2.0).seen(3.0)
    assert watch.reference == 2.0 and watch.losses == (3.0,)


def _diverging_switch(**options):
    """Block SGD at a fixed learning rate far past the stiff block's stability limit: the switch
    at step 0 (the probe runs before the first update) makes the loss explode."""
    model = Quadratic()
    opt = blockopt.BlockOptimizer(
        model,
        model,
        lr=1e-6,
        lrs={"block_sgd": 1e-3},
        thresholds=Thresholds(sgd_below=0.0, adam_above=100.0, min_interval=0),
        max_factor=1.0,
        probe_every=1000,
        **options,
    )
    return model, opt


def test_the_guard_undoes_a_switch_that_makes_training_worse():
    model, opt = _diverging_switch()
    start = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(opt, model, 21)
    assert opt.history[0].new_mode == "block_sgd"
    # the reference is the loss of step 0, seen before the probe switched; the losses of steps
    # 1..20 were watched, and at step 20 the guard put everything back, taking no step itself
    assert losses[20] > 10 * losses[0]
    undo = opt.history[-1]
    assert (undo.old_mode, undo.new_mode, undo.step) == ("block_sgd", "sgd", 20)
    assert undo.reason.startswith("undo: the median training loss over the 20 steps after the")
    assert opt.mode == "sgd" and opt.refused_modes == {"block_sgd"}
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert [str(w.message) for w in caught if w.category is ProbeFaultWarning] == [undo.reason]
    # training goes on in SGD from there, and no later probe switches back
    more = _train(opt, model, 3)
    assert more[0] == pytest.approx(losses[0], rel=1e-12)
    state = opt.state_dict()
    assert state["blockopt"]["refused"] == ["block_sgd"]
    fresh_model, fresh = _diverging_switch()
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    assert fresh.refused_modes == {"block_sgd"}
    decision = fresh.probe_now()
    assert not decision.switched
    assert "block_sgd was undone earlier" in decision.reason


def test_a_switch_that_trains_well_is_kept_and_the_copies_dropped():
    model = Quadratic()
    opt = blockopt.BlockOptimizer(model, model, lr=1e-6, probe_every=1000)
    _train(opt, model, 25)
    assert opt.mode == "adam" and opt.history[-1].switched
    assert opt._watch is None and not opt.refused_modes


def test_guard_steps_none_leaves_a_bad_switch_standing():
    model, opt = _diverging_switch(guard_steps=None)
    _train(opt, model, 25)
    assert opt.mode == "block_sgd" and len(opt.history) == 1


def test_the_guard_lets_go_of_its_copies():
    """A kept switch's copies are released when it is judged; with no training losses
    reported the watch ends ``2 * guard_steps`` steps after the switch and the switch stands."""
    import gc
    import weakref

    model = Quadratic()
    opt = blockopt.BlockOptimizer(model, model, lr=1e-6, probe_every=1000, guard_steps=5)
    _train(opt, model, 1)
    copies = [weakref.ref(v) for v in opt._watch.values]
    _train(opt, model, 5)
    gc.collect()
    assert opt._watch is None and all(ref() is None for ref in copies)
    model = Quadratic()
    opt = blockopt.BlockOptimizer(model, model, lr=1e-6, probe_every=1000, guard_steps=5)
    for step in range(12):  # no closure, no observe_loss
        opt.zero_grad()
        model().backward()
        opt.step()
        assert (opt._watch is None) == (step >= 10), step
    assert opt.mode == "adam"


def test_trials_clip_gradients_as_training_does():
    """With ``clip``, each trial step's gradient is clipped to that norm first: the trial
    matches a replay that clips by hand, and differs from one that does not."""
    params_of = Quadratic

    def run(clip, by_hand):
        model = params_of()
        params = list(model.parameters())
        if not by_hand:
            return trial_loss(
                model, model, params, lambda: torch.optim.SGD(params, lr=1e-4), 3, clip=clip
            )
        sgd = torch.optim.SGD(params, lr=1e-4)
        for _ in range(3):
            sgd.zero_grad()
            model().backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            sgd.step()
        with torch.no_grad():
            return float(model())

    assert run(1.0, False) == pytest.approx(run(1.0, True), rel=1e-12)
    assert run(None, False) == pytest.approx(run(None, True), rel=1e-12)
    assert run(1.0, False) != pytest.approx(run(None, False), rel=1e-3)
    model = Quadratic()
    opt = blockopt.BlockOptimizer(model, model, lr=1e-6)
    assert opt.trial_clip is None
    opt.trial_clip = 2
    assert opt.trial_clip == 2.0 and opt.search_settings.clip == 2.0
    for bad in (0, -1.0, math.inf, "1", True):
        with pytest.raises(ValueError, match="trial_clip must be a positive finite"):
            opt.trial_clip = bad
    assert opt.trial_clip == 2.0


def test_hparams_and_metrics_are_plain_values():
    model = Quadratic()
    opt = blockopt.BlockOptimizer(model, model, lr=1e-6, modes=("sgd", "adam"))
    _train(opt, model, 1)
    hp = opt.hparams()
    assert hp["modes"] == "sgd,adam" and hp["guard_steps"] == 20 and hp["holdout"] is False
    assert all(isinstance(v, (int, float, str, bool)) for v in hp.values())
    now = opt.metrics()
    assert now["blockopt/mode"] == 2.0  # adam
    assert now["blockopt/switches"] == 1.0
    assert now["blockopt/score"] == pytest.approx(opt.history[0].score)
    assert now["blockopt/lr_applied"] == pytest.approx(opt.applied_lrs[0])
    assert 0.0 < now["blockopt/probe_share"] <= 1.0
