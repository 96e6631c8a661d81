"""BlockOptimizer / wrap(): torch.optim conventions, switching, and non-perturbation."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from torch import nn

import blockopt
from blockopt.optimizer.modes import BlockSGD
from blockopt.workloads import data as bdata
from blockopt.workloads.models import MLP, SmallCNN, TinyGPT


def _task(seed=0):
    torch.manual_seed(seed)
    model = MLP((6, 16, 4))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    return model, x, y, (lambda: F.cross_entropy(model(x), y))


def _train(opt, model, x, y, steps, start=0):
    losses = []
    for i in range(start, start + steps):
        idx = torch.arange(i * 8, i * 8 + 16) % len(y)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_is_a_torch_optimizer_and_wrap_keeps_hyperparameters():
    model, _x, _y, probe = _task()
    sgd = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.8, weight_decay=1e-4, nesterov=True
    )
    opt = blockopt.wrap(sgd, model, probe)
    assert isinstance(opt, torch.optim.Optimizer) and opt.mode == "sgd"
    inner = opt.active_optimizer
    assert type(inner) is torch.optim.SGD
    g = inner.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.05, 0.8, 1e-4, True)
    adam = blockopt.wrap(
        torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.8, 0.99)), model, probe
    )
    assert adam.mode == "adam" and type(adam.active_optimizer) is torch.optim.Adam
    assert adam.active_optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    lamb = blockopt.wrap(torch_optimizer.Lamb(model.parameters(), lr=1e-2), model, probe)
    assert lamb.mode == "adam" and type(lamb.active_optimizer) is torch_optimizer.Lamb


def test_wrap_carries_the_existing_state():
    model, x, y, probe = _task()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(sgd, model, x, y, 3)
    buf = sgd.state[model.net[0].weight]["momentum_buffer"].clone()
    opt = blockopt.wrap(sgd, model, probe)
    assert torch.equal(opt.active_optimizer.state[model.net[0].weight]["momentum_buffer"], buf)


def test_monitor_only_probes_do_not_change_training_bitwise():
    runs = []
    for probing in (False, True):
        model, x, y, probe = _task()
        opt = blockopt.BlockOptimizer(
            model, probe if probing else None, lr=0.05, probe_every=3, monitor_only=True
        )
        _train(opt, model, x, y, 12)
        runs.append([p.detach().clone() for p in model.parameters()])
        if probing:
            assert len(opt.history) == 4 and not any(d.switched for d in opt.history)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_scheduler_factor_applies_to_the_active_mode():
    model, x, y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.1, lrs={"adam": 1e-3}, pin_mode=None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(opt, model, x, y, 2)
    sched.step()
    sched.step()  # two epochs: factor 0.25
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    opt.switch("adam")
    _train(opt, model, x, y, 1)
    assert opt.active_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    opt.switch("block_sgd")
    _train(opt, model, x, y, 1)
    assert opt.mode_lrs["block_sgd"] == opt.param_groups[0]["lr"] * opt.mode_scales["block_sgd"]
    assert opt.active_optimizer.param_groups[0]["lr"] == pytest.approx(opt.mode_lrs["block_sgd"])


def test_closure_called_exactly_once_and_loss_returned():
    model, x, y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    out = opt.step(closure)
    assert len(calls) == 1 and isinstance(out, torch.Tensor)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model, x, y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe)
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert (p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


def test_grad_scaler_and_gradient_accumulation_match_plain_sgd():
    results = []
    for use_blockopt in (False, True):
        model, x, y, probe = _task()
        if use_blockopt:
            opt = blockopt.BlockOptimizer(model, probe, lr=0.05, probe_every=2, monitor_only=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(4):
            opt.zero_grad()
            for micro in range(2):  # accumulate two micro-batches
                idx = torch.arange(16) + 16 * micro + step
                loss = F.cross_entropy(model(x[idx]), y[idx]) / 2
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_skipped_scaler_steps_are_tolerated():
    model, x, y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    (scaler.scale(F.cross_entropy(model(x), y)) * float("inf")).backward()
    scaler.step(opt)  # non-finite gradients: the step is skipped
    scaler.update()
    assert opt.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_frozen_parameters_and_param_groups():
    model, x, y, probe = _task()
    model.net[0].bias.requires_grad_(False)
    frozen = model.net[0].bias.detach().clone()
    groups = [
        {"params": [model.net[0].weight], "lr": 0.1},
        {"params": [model.net[2].weight, model.net[2].bias], "lr": 0.01, "momentum": 0.5},
    ]
    opt = blockopt.BlockOptimizer(model, probe, params=groups)
    assert [b.name for b in opt.blocks] == ["net.0.weight", "net.2.weight", "net.2.bias"]
    _train(opt, model, x, y, 2)
    inner = opt.active_optimizer.param_groups
    assert (inner[0]["lr"], inner[0]["momentum"]) == (0.1, 0.9)
    assert (inner[1]["lr"], inner[1]["momentum"]) == (0.01, 0.5)
    assert torch.equal(model.net[0].bias, frozen)


def test_compiled_model_is_probed_eagerly():
    model, x, y, _ = _task()
    compiled = torch.compile(model)
    opt = blockopt.BlockOptimizer(
        compiled, lambda: F.cross_entropy(compiled(x), y), lr=0.05, monitor_only=True
    )
    assert opt.probe_model is model
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(opt.spectra_history) == 1 and opt.last_score is not None


@pytest.mark.parametrize(("factory", "data"), [(SmallCNN, "digits"), (TinyGPT, "text")])
@pytest.mark.parametrize("path", [("sgd", "adam"), ("sgd", "block_sgd"), ("adam", "sgd")])
def test_forced_switch_keeps_the_loss_within_noise(factory, data, path):
    start, target = path
    torch.manual_seed(0)
    model = factory()
    gen = torch.Generator().manual_seed(0)
    if data == "digits":
        d = bdata.digits()

        def batch():
            idx = torch.randint(0, len(d.y_train), (64,), generator=gen)
            return d.x_train[idx], d.y_train[idx]

        def loss_of(xb, yb):
            return F.cross_entropy(model(xb), yb)

        lr = 0.05 if start != "adam" else 2e-3
    else:
        corpus = bdata.text_corpus()

        def batch():
            return bdata.text_batches(corpus, 16, 32, generator=gen)

        def loss_of(xb, yb):
            return F.cross_entropy(model(xb).flatten(0, 1), yb.flatten())

        lr = 0.3 if start != "adam" else 3e-3
    px, py = batch()
    opt = blockopt.BlockOptimizer(model, lambda: loss_of(px, py), lr=lr, mode=start, pin_mode=start)
    losses = []
    for step in range(60):
        if step == 40:
            opt.pin_mode = None
            opt.switch(target)
            assert opt.mode == target
        xb, yb = batch()
        opt.zero_grad()
        loss = loss_of(xb, yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    before = torch.tensor(losses[20:40])
    after = torch.tensor(losses[40:])
    noise = 3 * before.std().item() + 0.02 * before.mean().item()
    assert after.max().item() <= before[-10:].mean().item() + noise, (losses[30:], noise)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch, torch.nn.functional as F, blockopt
        from blockopt.workloads.models import MLP
        torch.manual_seed(0)
        model = MLP((6, 16, 4))
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 4, (64,), generator=gen)
        probe = lambda: F.cross_entropy(model(x), y)
        opt = blockopt.BlockOptimizer(model, probe, lr=0.05, probe_every=3,
                                      thresholds=blockopt.Thresholds(0.0, 0.0, 0.0, 0))
        sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.7)
        def run(start, stop):
            for i in range(start, stop):
                if i == 5:
                    opt.switch("block_sgd")
                idx = torch.arange(i * 8, i * 8 + 16) % 64
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
        mode, path = sys.argv[1], sys.argv[2]
        if mode == "straight":
            run(0, 20)
        elif mode == "save":
            run(0, 10)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict()}, path)
            sys.exit(0)
        else:
            ck = torch.load(path, weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
            run(10, 20)
        torch.save({"params": [p.detach() for p in model.parameters()],
                    "mode": opt.mode, "history": len(opt.history)}, path + "." + mode)
        """
    )
    file = tmp_path / "resume.py"
    file.write_text(script)
    ck = str(tmp_path / "ck.pt")
    for mode in ("straight", "save", "resume"):
        subprocess.run([sys.executable, str(file), mode, ck], check=True, timeout=120)
    a = torch.load(ck + ".straight", weights_only=True)
    b = torch.load(ck + ".resume", weights_only=True)
    assert a["mode"] == b["mode"] and a["history"] == b["history"] and a["history"] >= 6
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "rmsprop"}, ValueError, "unknown mode 'rmsprop'"),
        ({"lr": -1.0}, ValueError, "lr must be a positive"),
        ({"steps": 0}, ValueError, "steps must be a positive"),
        ({"optimizers": {"adam": "adahessian"}}, ValueError, "create_graph"),
        ({"optimizers": {"adam": ("lamb", {"lr": 1.0})}}, ValueError, "lrs="),
        ({"lrs": {"adam": 0.0}}, ValueError, "positive finite"),
        ({"probe": 3}, TypeError, "zero-argument callable"),
    ],
)
def test_bad_options(kwargs, error, message):
    model, *_ = _task()
    with pytest.raises(error, match=message):
        blockopt.BlockOptimizer(model, **kwargs)


def test_load_state_dict_refuses_foreign_states():
    model, x, _y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a blockopt optimizer state dict"):
        opt.load_state_dict(plain.state_dict())
    other = MLP((6, 8, 8, 4))
    other_opt = blockopt.BlockOptimizer(other, lambda: other(x).sum())
    with pytest.raises(ValueError, match="saved with other blocks than this optimizer has"):
        opt.load_state_dict(other_opt.state_dict())


def test_block_sgd_factors_follow_the_probe():
    model, x, y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.05, mode="block_sgd", pin_mode="block_sgd")
    _train(opt, model, x, y, 1)
    inner = opt.active_optimizer
    assert isinstance(inner, BlockSGD)
    assert inner.factors == opt.block_factors
    assert max(opt.block_factors.values()) > 1.0 and min(opt.block_factors.values()) == 1.0


def test_switch_to_adam_matches_the_step_norm():
    model, x, y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.05)
    _train(opt, model, x, y, 5)
    from blockopt.optimizer.step_norms import step_norm as _step_norm

    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = _step_norm(opt.active_optimizer)
    opt.switch("adam")
    after = _step_norm(opt.active_optimizer)
    assert after == pytest.approx(before, rel=1e-9)
    # The step actually taken has that norm (AdamW without weight decay).
    params = [p.detach().clone() for p in model.parameters()]
    opt.step()
    taken = sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), params)).sqrt().item()
    assert taken == pytest.approx(before, rel=1e-5)
    assert isinstance(nn.Module(), nn.Module) and Path(__file__).exists()


# -- the probe budget, on a fake clock ---------------------------------------------------------

STEP_SECONDS, PROBE_SECONDS = 0.125, 8.0  # powers of two: the fake times add up exactly


class FakeClock:
    """``time.perf_counter`` for the optimizer: it moves only when told to, so that the probe
    steps a budget chooses are exactly predictable."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("blockopt.optimizer.recorder.time.perf_counter", fake)
    return fake


def _budget_run(
    clock, steps, start=0, opt=None, fail_at=(), losses=None, step_seconds=None, **options
):
    """Train the MLP in monitor_only mode (no switch, so no learning-rate search) with a
    training step of STEP_SECONDS and a probe of PROBE_SECONDS on the fake clock; the probe
    raises after its time is spent when it runs at a step in ``fail_at``; ``losses`` (step ->
    loss) are reported with observe_loss; ``step_seconds(i)``, when given, times step i."""
    model, x, y, _probe = _task()
    if opt is None:
        opt = blockopt.BlockOptimizer(model, None, lr=0.05, monitor_only=True, **options)
    attempts = []

    def timed_probe():
        clock.advance(PROBE_SECONDS)
        attempts.append(opt.step_count)
        if opt.step_count in fail_at:
            raise RuntimeError("the probe's batch is gone")
        return F.cross_entropy(opt.probe_model(x), y)

    opt.probe = timed_probe
    for i in range(start, start + steps):
        idx = torch.arange(i * 8, i * 8 + 16) % len(y)
        opt.zero_grad()
        loss = F.cross_entropy(opt.probe_model(x[idx]), y[idx])
        loss.backward()
        clock.advance(STEP_SECONDS if step_seconds is None else step_seconds(i))
        if losses is not None:
            opt.observe_loss(losses.get(i, 1.0))
        opt.step()
    return opt, attempts


# With a 25% budget, 0.125 s steps and 8 s probes: the probe at step 0 runs before any step is
# timed; at step 50 (due by the interval) 8 + 8 <= 0.25 (14.25 + 0.125 k + 8) needs k >= 334,
# 400 on the grid: step 450. There 16 + 8 <= 0.25 (72.25 + 0.125 k + 8) needs k >= 126: 200
# steps, longer than the interval (100 or 50): step 650; likewise k = 118 there: step 850.
BUDGET_PROBES = [0, 450, 650, 850]


def test_the_budget_places_probes_on_the_fake_clock(clock):
    opt, attempts = _budget_run(clock, 0, probe_budget=0.25)
    assert opt.probe_share == 0.0  # before the first step
    opt, attempts = _budget_run(clock, 900, opt=opt)
    assert [t for t, _ in opt.spectra_history] == attempts == BUDGET_PROBES
    assert opt.probe_seconds == 4 * PROBE_SECONDS
    # the clock starts at the first step: 899 steps' training time after it
    assert opt.probe_share == 32.0 / (32.0 + 899 * STEP_SECONDS)
    assert (opt.schedule.budget_step, opt.schedule.next_step) == (1050, 1050)


def test_the_first_probe_runs_whatever_it_costs(clock):
    opt, attempts = _budget_run(clock, 60, probe_budget=0.01)
    # 8 s of 8 s at step 0; at step 50, 16 <= 0.01 (22.25 + 0.125 k) needs k >= 12622: 12800
    assert attempts == [0] and opt.schedule.next_step == 50 + 12800
    assert opt.probe_share == 8.0 / (8.0 + 59 * STEP_SECONDS)


def test_a_probe_placed_from_slow_first_steps_waits_when_it_falls_due(clock):
    """Steps 1-49 take 0.5 s, then 0.125 s: at step 50 the mean step time (0.5 s) places the
    next probe early, and when it falls due the time really spent no longer fits it."""
    opt, attempts = _budget_run(
        clock, 700, probe_budget=0.25, step_seconds=lambda i: 0.5 if i < 50 else 0.125
    )
    # step 50: P 8 s, E 32.625 s, tau 0.4925 s: 16 <= 0.25 (32.625 + 0.4925 k + 8) needs
    # k >= 48: step 100. There E is 38.875 s (tau 0.30875): k >= 56, step 200; there 51.375 s
    # (tau 0.2169): k >= 22, step 250; there 16 <= 0.25 (57.625 + 8): the probe runs. Without
    # the recheck it would have run at step 100, at 16 s of 46.875 (34%).
    assert attempts == [0, 250, 450, 650]
    assert opt.probe_share <= 0.25
    _free, free_attempts = _budget_run(
        clock, 400, probe_budget=None, step_seconds=lambda i: 0.5 if i < 50 else 0.125
    )
    assert free_attempts[:2] == [0, 50]


def test_a_spike_moves_the_probe_no_earlier_than_the_budget_allows(clock):
    spike = {i: 1.0 for i in range(900)} | {500: 100.0}
    budgeted, attempts = _budget_run(clock, 900, losses=spike, probe_budget=0.25)
    assert attempts == BUDGET_PROBES  # the spike at 500 waits for the budget's step 650
    assert [d.step for d in budgeted.history] == BUDGET_PROBES
    _free, attempts = _budget_run(clock, 600, losses=spike, probe_budget=None)
    assert attempts == [0, 50, 100, 200, 400, 501]  # to the next step, as without a budget


def test_a_failed_probe_counts_its_time_and_waits_for_the_budget(clock):
    with pytest.warns(blockopt.ProbeFaultWarning, match="next probe is at step 650"):
        opt, attempts = _budget_run(clock, 900, fail_at={450}, probe_budget=0.25)
    # the failed probe took 8 s like the others: the same steps as when it succeeds, not the
    # backoff's 500
    assert attempts == BUDGET_PROBES and [f.step for f in opt.faults] == [450]
    assert [t for t, _ in opt.spectra_history] == [0, 650, 850]
    assert opt.probe_seconds == 4 * PROBE_SECONDS


def test_a_fixed_interval_ignores_the_budget(clock):
    opt, attempts = _budget_run(clock, 301, probe_every=100, probe_budget=0.01)
    assert attempts == [0, 100, 200, 300] and opt.schedule.budget_step == 0
    assert opt.probe_share == 32.0 / (32.0 + 300 * STEP_SECONDS)


def test_without_a_budget_the_schedule_is_the_adaptive_one(clock):
    opt, attempts = _budget_run(clock, 800, probe_budget=None)
    replay = blockopt.optimizer.policy.ProbeSchedule()
    expected = []
    for decision in opt.history:  # the decisions' scores, fed to a schedule without a budget
        expected.append(replay.next_step)
        replay.after_probe(replay.next_step, decision.score, decision.switched)
    assert attempts == expected and attempts[:2] == [0, 50]
    assert opt.schedule == replay


def test_probes_time_is_averaged_over_the_ranks_before_the_budget_reads_it(clock):
    """Under DDP every rank must pick the same next probe: the [P, E, c] timing goes through
    the reduce hook (here one rank's identity) as one float64 tensor at every probe, at the
    step where the first probe's cost is placed, and where a placed probe falls due."""
    model, *_ = _task()
    opt = blockopt.BlockOptimizer(model, None, lr=0.05, monitor_only=True, probe_budget=0.25)
    timings = []

    def reduce(tensor):
        if tensor.dtype == torch.float64 and tensor.shape == (3,):
            timings.append(tensor.tolist())
        return tensor

    opt.reduce = reduce
    _budget_run(clock, 460, opt=opt)
    assert timings == [
        [8.0, 8.0, 8.0],  # the probe at step 0
        [8.0, 14.25, 0.0],  # step 50: the first probe's cost placed
        [8.0, 64.25, 0.0],  # step 450: the due probe checked against the time spent (it fits)
        [16.0, 72.25, 8.0],  # the probe at step 450
    ]


def test_probe_share_goes_to_tensorboard(clock):
    class Writer:
        def __init__(self):
            self.scalars, self.final = {}, {}

        def add_scalar(self, tag, value, step):
            self.scalars.setdefault(tag, []).append((step, value))

        def add_hparams(self, hparams, metrics, global_step=None):
            self.hparams, self.final = hparams, metrics

        def add_histogram_raw(self, *args, **kwargs):
            pass

        add_custom_scalars = add_text = add_figure = flush = close = add_histogram_raw

    writer = Writer()
    model, *_ = _task()
    opt = blockopt.BlockOptimizer(
        model, None, lr=0.05, monitor_only=True, probe_budget=0.25, writer=writer
    )
    _budget_run(clock, 500, opt=opt)
    opt.close()
    assert writer.scalars["blockopt/probe_share"] == [(0, 1.0), (450, 16.0 / 72.25)]
    assert writer.final["blockopt/final_probe_share"] == opt.probe_share == 16.0 / 78.375
    assert writer.hparams["probe_budget"] == 0.25


def test_the_budget_state_survives_a_checkpoint(clock):
    straight, attempts = _budget_run(clock, 900, probe_budget=0.25)
    first, _ = _budget_run(clock, 500, probe_budget=0.25)
    state = first.state_dict()
    assert state["blockopt"]["train_seconds"] == 16.0 + 499 * STEP_SECONDS
    assert state["blockopt"]["schedule"]["budget_step"] == 650
    assert state["blockopt"]["schedule"]["budget"] == 0.25
    model, *_ = _task()
    model.load_state_dict(first.probe_model.state_dict())
    # the schedule's settings are the constructor's: a checkpoint does not override them
    other = blockopt.BlockOptimizer(model, None, lr=0.05, monitor_only=True, probe_budget=0.1)
    other.load_state_dict(state)
    assert other.schedule.budget == 0.1 and other.schedule.budget_step == 650
    resumed = blockopt.BlockOptimizer(model, None, lr=0.05, monitor_only=True, probe_budget=0.25)
    resumed.load_state_dict(state)
    assert resumed.schedule == first.schedule and resumed.probe_share == 16.0 / 78.375
    clock.advance(1e6)  # time between save and load is no training time
    resumed, later = _budget_run(clock, 400, start=500, opt=resumed)
    assert later == [650, 850] == attempts[2:]
    assert resumed.probe_seconds == straight.probe_seconds
    assert resumed.schedule == straight.schedule


def test_a_checkpoint_saved_before_the_budget_still_loads(clock):
    opt, _ = _budget_run(clock, 60, probe_budget=0.25)
    state = opt.state_dict()
    for key in ("budget", "budget_step", "pending_cost", "last_cost"):
        del state["blockopt"]["schedule"][key]
    del state["blockopt"]["train_seconds"]
    model, *_ = _task()
    fresh = blockopt.BlockOptimizer(model, None, lr=0.05, monitor_only=True, probe_budget=0.5)
    fresh.schedule.budget_step = 77  # left from its own use: the state replaces it
    fresh.schedule.last_cost = 3.0  # likewise
    fresh.load_state_dict(state)
    assert fresh.schedule.budget == 0.5  # this optimizer's budget, unspent
    assert (fresh.schedule.budget_step, fresh.schedule.pending_cost) == (0, None)
    assert fresh.schedule.last_cost is None and not fresh.schedule.rechecks
    assert fresh.schedule.next_step == opt.schedule.next_step
    # the training time is taken as what the saved probe time would have kept within budget
    assert fresh.state_dict()["blockopt"]["train_seconds"] == 8.0 / 0.5
    assert fresh.probe_share == 0.5


def test_a_checkpoint_with_a_negative_probe_cost_is_refused(clock):
    opt, _ = _budget_run(clock, 60, probe_budget=0.25)
    state = opt.state_dict()
    assert state["blockopt"]["schedule"]["last_cost"] == PROBE_SECONDS
    state["blockopt"]["schedule"]["last_cost"] = -5.0
    model, *_ = _task()
    fresh = blockopt.BlockOptimizer(model, None, lr=0.05, monitor_only=True, probe_budget=0.25)
    with pytest.raises(ValueError, match=r"'schedule'\['last_cost'\] is -5.0, not seconds >= 0"):
        fresh.load_state_dict(state)


def test_ranks_agree_on_every_option_that_changes_a_probes_collectives():
    """The settings ranks compare before a probe differ between optimizers built with any
    option that changes which collectives a probe runs (here in one process)."""
    from blockopt.distributed.reductions import canonical

    model, _x, _y, probe = _task()
    base = dict(lr=0.05, steps=4)

    def settings(**options):
        opt = blockopt.BlockOptimizer(model, probe, **{**base, **options})
        return opt._rank_settings(opt._blocks_now())

    ref = settings()
    cases = {
        "probe_budget": ({"probe_budget": None}, "schedule"),
        "probe_every": ({"probe_every": 10}, "schedule"),
        "monitor_only": ({"monitor_only": True}, "hold"),
        "modes": ({"modes": ("sgd", "adam")}, "modes"),
        "guard_steps": ({"guard_steps": None}, "guard_steps"),
        "steps": ({"steps": 5}, "steps"),
        "thresholds": ({"thresholds": blockopt.Thresholds(block_ratio=2)}, "thresholds"),
    }
    for what, (options, key) in cases.items():
        other = settings(**options)
        assert [k for k in ref if ref[k] != other[k]] == [key], what
    same = settings(thresholds=blockopt.Thresholds(sgd_below=1, adam_above=np.float64(1.5)))
    assert same == ref  # 1 and 1.0, numpy and Python floats: the same setting
    assert canonical({"b": 1, "a": (2, None)}) == canonical({"a": [2.0, None], "b": 1.0})


@pytest.mark.parametrize("budget", [0.03, np.float64(0.03), np.float32(0.5), None])
def test_probe_budget_takes_shares_and_none(budget):
    model, *_ = _task()
    opt = blockopt.BlockOptimizer(model, None, probe_budget=budget)
    assert opt.schedule.budget == (None if budget is None else pytest.approx(float(budget)))
    assert opt.schedule.budget is None or type(opt.schedule.budget) is float


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_a_probe_whose_score_keeps_no_block_does_not_switch(base):
    """A loss linear in every parameter has no curvature: every block is left out and the score
    of 0 stands on nothing, so auto stays in the mode it has (it took wrap(AdamW) to SGD) and
    trains exactly as the optimizer it wraps."""
    torch.manual_seed(0)
    model, x = nn.Linear(3, 2), torch.randn(4, 3)
    twin = copy.deepcopy(model)

    def make(m):
        if base == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=1e-3)
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    opt = blockopt.wrap(make(model), model, probe=lambda: model(x).sum(), probe_every=2)
    plain = make(twin)
    for _ in range(5):
        for o, m in ((opt, model), (plain, twin)):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
    start = "adam" if base == "adamw" else "sgd"
    assert opt.mode == start and len(opt.history) >= 2
    for d in opt.history:
        assert not d.switched and d.new_mode == start
        assert d.reason == (
            "stay: the score keeps no block: all 2 left out (negligible curvature), so it says "
            "nothing of the mode"
        )
        assert math.isnan(d.score) and math.isnan(d.max_ratio)  # no reading, not a score of 0
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
