"""BlockOptimizer's param_groups as the single source of truth for every mode's hyperparameters:
values changed mid-run, schedulers (every LRScheduler class), applied learning rates, added
param groups, validation, copying, state-dict hooks and the probe schedule's settings."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler

import blockopt
from blockopt.workloads.models import MLP

MODES = ("sgd", "block_sgd", "adam")
# The group key of each inner key, per mode, for a wrapper started in either family.
SGD_KEYS = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")
ADAM_KEYS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")


def _group_key(start: str, mode: str, key: str) -> str:
    """The wrapper's group key that feeds ``key`` of ``mode``'s optimizer (modeset.py doc)."""
    fam, start_fam = ("adam" if mode == "adam" else "sgd"), ("adam" if start == "adam" else "sgd")
    if key == "weight_decay" and fam != start_fam:
        return f"{fam}_weight_decay"
    return key


def _inner_keys(mode: str) -> tuple[str, ...]:
    return ADAM_KEYS if mode == "adam" else SGD_KEYS


def _task(seed: int = 0, sizes: tuple[int, ...] = (4, 8, 3)):
    torch.manual_seed(seed)
    model = MLP(sizes)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(32, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (32,), generator=gen)
    return model, x, y


def _twin(model: nn.Module) -> nn.Module:
    """An identical, independent copy of ``model`` (a module, not an optimizer, may be copied)."""
    return copy.deepcopy(model)


def _loss(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _step(opt, model, x, y) -> float:
    opt.zero_grad()
    loss = _loss(model, x, y)
    loss.backward()
    opt.step()
    return loss.item()


def _two_groups(model, lr):
    first, last = model.net[0], model.net[-1]
    return [
        {"params": list(first.parameters())},
        {"params": list(last.parameters()), "lr": lr / 2},
    ]


def _inner_value(opt, key: str, index: int = 0):
    return opt.active_optimizer.param_groups[index][key]


# -- 1. every hyperparameter is applied from param_groups in every mode ---------------------------

ROUND_A = {
    "momentum": 0.5,
    "dampening": 0.0,
    "nesterov": True,
    "sgd_wd": 0.01,
    "betas": (0.8, 0.95),
    "eps": 1e-6,
    "adam_wd": 0.02,
    "amsgrad": True,
    "maximize": True,
}
ROUND_B = {
    "momentum": 0.3,
    "dampening": 0.1,
    "nesterov": False,
    "sgd_wd": 0.001,
    "betas": (0.7, 0.9),
    "eps": 1e-5,
    "adam_wd": 0.05,
    "amsgrad": True,  # not flipped back: see _set_round
    "maximize": False,
}


def _set_round(opt, start: str, values: dict, skip_amsgrad: bool, index: int) -> None:
    g = opt.param_groups[index]
    for key, value in values.items():
        if key == "sgd_wd":
            g[_group_key(start, "sgd", "weight_decay")] = value
        elif key == "adam_wd":
            g[_group_key(start, "adam", "weight_decay")] = value
        elif key == "amsgrad" and skip_amsgrad:
            # torch's own AdamW fails (KeyError 'max_exp_avg_sq') when amsgrad is turned on
            # after its state exists, so it is only turned on before Adam has state.
            continue
        else:
            g[key] = value


def _expected(values: dict, mode: str, key: str):
    if key == "weight_decay":
        return values["adam_wd" if mode == "adam" else "sgd_wd"]
    return values[key]


def _build(model, start: str, **kwargs):
    return blockopt.BlockOptimizer(model, None, lr=0.05, mode=start, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("start", ["sgd", "adam"])
def test_every_hyperparameter_changed_mid_run_reaches_every_mode(start, mode):
    model, x, y = _task()
    opt = _build(model, start, params=_two_groups(model, 0.05))
    for _ in range(2):
        _step(opt, model, x, y)
    adam_has_state = start == "adam"
    # Round A, in both groups: changed while in the starting mode, then switched to ``mode``.
    for index in (0, 1):
        _set_round(opt, start, ROUND_A, skip_amsgrad=adam_has_state, index=index)
    opt.switch(mode)
    _step(opt, model, x, y)
    assert opt.mode == mode
    a = dict(ROUND_A, amsgrad=not adam_has_state)
    for index in (0, 1):
        for key in _inner_keys(mode):
            assert _inner_value(opt, key, index) == _expected(a, mode, key), (index, key)
    assert [g["lr"] for g in opt.active_optimizer.param_groups] == pytest.approx(
        opt.applied_lrs, rel=1e-12
    )
    # Round B, in the second group only: changed while in ``mode``, applied at the next step.
    _set_round(opt, start, ROUND_B, skip_amsgrad=True, index=1)
    _step(opt, model, x, y)
    b = dict(ROUND_B, amsgrad=a["amsgrad"])
    for key in _inner_keys(mode):
        assert _inner_value(opt, key, 0) == _expected(a, mode, key), key
        assert _inner_value(opt, key, 1) == _expected(b, mode, key), key
    if mode == "adam" and a["amsgrad"]:  # amsgrad really in use: its state is kept
        p = next(model.parameters())
        assert "max_exp_avg_sq" in opt.active_optimizer.state[p]
    # The other family's values stay in the groups under their own names.
    g = opt.param_groups[1]
    assert g[_group_key(start, "adam", "weight_decay")] == ROUND_B["adam_wd"]
    assert g[_group_key(start, "sgd", "weight_decay")] == ROUND_B["sgd_wd"]


@pytest.mark.parametrize("mode", MODES)
def test_mid_run_changes_step_like_the_plain_torch_class(mode):
    """Started (and staying) in ``mode``: a plain torch optimizer on a twin model, given the same
    mid-run changes, takes the same steps (bitwise for SGD and AdamW, which are the inner
    classes; to rounding for block SGD against torch's SGD)."""
    model, x, y = _task()
    ref_model = _twin(model)
    opt = _build(model, mode, momentum=0.9)
    if mode == "adam":
        ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.0)
        changes = [
            {"betas": (0.8, 0.95)},
            {"eps": 1e-5, "maximize": True},
            {"weight_decay": 0.05, "maximize": False},
        ]
    else:
        ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
        changes = [
            {"momentum": 0.5},
            {"nesterov": True, "weight_decay": 0.01},
            {"nesterov": False, "dampening": 0.2, "maximize": True},
        ]
    for change in [{}, *changes]:
        opt.param_groups[0].update(change)
        ref.param_groups[0].update(change)
        _step(opt, model, x, y)
        _step(ref, ref_model, x, y)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            if mode == "block_sgd":
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p, q)


def test_block_sgd_step_with_momentum_changed_mid_run_is_the_hand_computed_sgd_step():
    model, x, y = _task()
    lr = 0.05
    opt = _build(model, "block_sgd", momentum=0.9)
    for _ in range(2):
        _step(opt, model, x, y)
    inner = opt.active_optimizer
    opt.param_groups[0]["momentum"] = 0.5
    before = {
        p: (p.detach().clone(), inner.state[p]["momentum_buffer"].clone()) for p in inner.state
    }
    assert len(before) == len(list(model.parameters()))
    opt.zero_grad()
    _loss(model, x, y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    for p in model.parameters():
        assert inner.scale_of(p) == 1.0  # no probe: every block factor is 1
        p0, buf0 = before[p]
        buf = 0.5 * buf0 + grads[p]  # b <- mu b + (1 - dampening) g, mu the new momentum
        torch.testing.assert_close(inner.state[p]["momentum_buffer"], buf, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p.detach(), p0 - lr * buf, rtol=1e-6, atol=1e-7)
    # and not the step the old momentum would have given
    p = next(model.parameters())
    p0, buf0 = before[p]
    assert not torch.allclose(p.detach(), p0 - lr * (0.9 * buf0 + grads[p]), atol=1e-6)


def _adamw_by_hand(p, g, state, group, lr):
    """One AdamW step (maximize and amsgrad included) from the state before it."""
    b1, b2 = group["betas"]
    g = -g if group["maximize"] else g
    t = float(state["step"]) + 1
    m = b1 * state["exp_avg"] + (1 - b1) * g
    v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    if group["amsgrad"]:
        v = torch.maximum(state["max_exp_avg_sq"], v)
    denom = (v / (1 - b2**t)).sqrt() + group["eps"]
    return p * (1 - lr * group["weight_decay"]) - lr * (m / (1 - b1**t)) / denom


@pytest.mark.parametrize("mode", ["block_sgd", "adam"])
def test_maximize_set_mid_run_goes_uphill(mode):
    model, x, y = _task()
    lr = 0.01
    # no momentum (beta1 = 0 for Adam): the step after the flip follows this gradient alone
    opt = _build(model, mode, momentum=0.0, betas=(0.0, 0.99))
    opt.param_groups[0]["lr"] = lr
    losses = [_step(opt, model, x, y) for _ in range(3)]
    assert losses[-1] < losses[0]  # descending before
    opt.param_groups[0]["maximize"] = True
    inner = opt.active_optimizer
    before = {p: p.detach().clone() for p in model.parameters()}
    states = {p: {k: v.clone() for k, v in inner.state[p].items()} for p in inner.state}
    opt.zero_grad()
    start = _loss(model, x, y)
    start.backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    assert inner.param_groups[0]["maximize"] is True
    for p in model.parameters():
        delta = p.detach() - before[p]
        assert (delta * grads[p]).sum() > 0  # along +grad
        if mode == "block_sgd":
            expected = before[p] + lr * grads[p]  # no momentum: p <- p + lr g
        else:
            expected = _adamw_by_hand(before[p], grads[p], states[p], inner.param_groups[0], lr)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    after = [_step(opt, model, x, y) for _ in range(3)]
    assert _loss(model, x, y).item() > start.item()
    assert after[-1] > after[0]


def test_amsgrad_turned_on_in_the_groups_is_used_by_adam():
    """amsgrad set while in SGD: the Adam mode switched to keeps ``max_exp_avg_sq`` and steps
    by it (the hand-computed AMSGrad step)."""
    model, x, y = _task()
    opt = _build(model, "sgd", lrs={"adam": 1e-3})
    _step(opt, model, x, y)
    opt.param_groups[0]["amsgrad"] = True
    opt.param_groups[0]["betas"] = (0.9, 0.5)  # a short second-moment memory: the max bites
    opt.switch("adam")
    for _ in range(3):
        _step(opt, model, x, y)
    inner = opt.active_optimizer
    group = inner.param_groups[0]
    assert group["amsgrad"] is True and group["lr"] == pytest.approx(1e-3)
    before = {p: p.detach().clone() for p in model.parameters()}
    states = {p: {k: v.clone() for k, v in inner.state[p].items()} for p in inner.state}
    assert all("max_exp_avg_sq" in st for st in states.values())
    opt.zero_grad()
    _loss(model, x, y).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt.step()
    differs = []
    for p in model.parameters():
        expected = _adamw_by_hand(before[p], grads[p], states[p], group, group["lr"])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        plain = _adamw_by_hand(before[p], grads[p], states[p], {**group, "amsgrad": False}, 1e-3)
        delta, plain_delta = p.detach() - before[p], plain - before[p]
        differs.append(not torch.allclose(delta, plain_delta, rtol=1e-2, atol=0.0))
    assert any(differs)  # the maximum really changed the step


# -- 2. momentum schedulers ------------------------------------------------------------------------


def _one_cycle(opt, lr):
    return lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=12, cycle_momentum=True)


def _cyclic(opt, lr):
    return lr_scheduler.CyclicLR(
        opt, base_lr=lr / 10, max_lr=lr, step_size_up=3, cycle_momentum=True
    )


@pytest.mark.parametrize("make", [_one_cycle, _cyclic], ids=["OneCycleLR", "CyclicLR"])
def test_cycled_momentum_is_applied_by_sgd(make):
    model, x, y = _task()
    ref_model = _twin(model)
    opt = blockopt.BlockOptimizer(model, None, lr=0.1, momentum=0.9)
    assert "momentum" in opt.defaults and "betas" not in opt.defaults
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    sched, ref_sched = make(opt, 0.1), make(ref, 0.1)
    seen = []
    for i in range(10):
        if i == 6:
            opt.switch("block_sgd")
        _step(opt, model, x, y)
        _step(ref, ref_model, x, y)
        g, r = opt.param_groups[0], ref.param_groups[0]
        # the momentum the step used is the one the scheduler set
        assert _inner_value(opt, "momentum") == g["momentum"] == r["momentum"]
        seen.append(g["momentum"])
        if opt.mode == "sgd":  # the inner SGD is torch's: the very same steps
            for p, q in zip(model.parameters(), ref_model.parameters()):
                assert torch.equal(p, q)
        sched.step()
        ref_sched.step()
        assert g["momentum"] == r["momentum"] and g["lr"] == r["lr"]
    assert len(set(seen)) >= 4 and min(seen) < 0.9


@pytest.mark.parametrize("make", [_one_cycle, _cyclic], ids=["OneCycleLR", "CyclicLR"])
def test_cycled_betas_are_applied_by_wrapped_adamw(make):
    model, x, y = _task()
    ref_model = _twin(model)
    opt = blockopt.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), model)
    assert opt.mode == "adam"
    assert "betas" in opt.defaults and "momentum" not in opt.defaults
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    sched, ref_sched = make(opt, 1e-2), make(ref, 1e-2)
    seen = []
    for _ in range(8):
        _step(opt, model, x, y)
        _step(ref, ref_model, x, y)
        g, r = opt.param_groups[0], ref.param_groups[0]
        assert _inner_value(opt, "betas") == g["betas"] == r["betas"]
        seen.append(g["betas"][0])
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(p, q)
        sched.step()
        ref_sched.step()
        assert g["betas"] == r["betas"] and g["lr"] == r["lr"]
    assert len(set(seen)) >= 3 and min(seen) < 0.9
    assert opt.param_groups[0]["momentum"] == 0.9  # the SGD family's key is left alone


# -- 3. every LRScheduler class, across switches ---------------------------------------------------


def _scheduler_names() -> list[str]:
    return sorted(
        name
        for name, cls in inspect.getmembers(lr_scheduler, inspect.isclass)
        if issubclass(cls, lr_scheduler.LRScheduler) and name not in ("LRScheduler", "_LRScheduler")
    )


SCHEDULERS = {
    "LambdaLR": lambda o, lr, fam: lr_scheduler.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda o, lr, fam: lr_scheduler.MultiplicativeLR(o, lambda e: 0.9),
    "StepLR": lambda o, lr, fam: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o, lr, fam: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.5),
    "ConstantLR": lambda o, lr, fam: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o, lr, fam: lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=5),
    "ExponentialLR": lambda o, lr, fam: lr_scheduler.ExponentialLR(o, gamma=0.8),
    "SequentialLR": lambda o, lr, fam: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.8)],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o, lr, fam: lr_scheduler.ChainedScheduler(
        [lr_scheduler.StepLR(o, step_size=2, gamma=0.5), lr_scheduler.ExponentialLR(o, 0.9)]
    ),
    "CosineAnnealingLR": lambda o, lr, fam: lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o, lr, fam: lr_scheduler.CosineAnnealingWarmRestarts(
        o, T_0=3
    ),
    "CyclicLR": lambda o, lr, fam: lr_scheduler.CyclicLR(
        o, base_lr=lr / 10, max_lr=lr, step_size_up=2, cycle_momentum=fam == "sgd"
    ),
    "OneCycleLR": lambda o, lr, fam: lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=20),
    "PolynomialLR": lambda o, lr, fam: lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
    "ReduceLROnPlateau": lambda o, lr, fam: lr_scheduler.ReduceLROnPlateau(
        o, factor=0.5, patience=0
    ),
}


def test_the_scheduler_table_knows_exactly_torchs_classes():
    assert set(SCHEDULERS) == set(_scheduler_names())


def _check_applied(opt):
    scale = opt.mode_scales[opt.mode]
    expected = [g["lr"] * scale for g in opt.param_groups]
    assert opt.applied_lrs == pytest.approx(expected, rel=1e-12)
    return expected


@pytest.mark.parametrize("start", ["sgd", "adam"])
@pytest.mark.parametrize("name", _scheduler_names())
def test_every_scheduler_drives_the_applied_lr_across_switches(name, start):
    if name not in SCHEDULERS:
        pytest.fail(f"torch has a new LRScheduler class {name}: add a builder to SCHEDULERS")
    make = SCHEDULERS[name]
    model, x, y = _task()
    ref_model = _twin(model)
    if start == "sgd":
        lr, order = 0.1, ["sgd", "adam", "block_sgd"]
        opt = blockopt.BlockOptimizer(
            model, None, lr=lr, params=_two_groups(model, lr), lrs={"adam": 1e-3}
        )
        ref = torch.optim.SGD(_two_groups(ref_model, lr), lr=lr, momentum=0.9)
    else:
        lr, order = 1e-3, ["adam", "sgd", "block_sgd"]
        base = torch.optim.AdamW(_two_groups(model, lr), lr=lr)
        opt = blockopt.wrap(base, model, lrs={"sgd": 0.1})
        ref = torch.optim.AdamW(_two_groups(ref_model, lr), lr=lr)
    fam = "adam" if start == "adam" else "sgd"
    known = {"sgd": 1.0, "adam": 0.01} if start == "sgd" else {"adam": 1.0, "sgd": 100.0}
    sched, ref_sched = make(opt, lr, fam), make(ref, lr, fam)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    lrs_seen = set()
    for i in range(9):
        if i % 3 == 0 and i:  # a switch sets the new mode's groups at once
            opt.switch(order[i // 3])
            assert opt.mode == order[i // 3]
            expected = _check_applied(opt)
            inner = [g["lr"] for g in opt.active_optimizer.param_groups]
            assert inner == pytest.approx(expected, rel=1e-12)
        _step(opt, model, x, y)
        _step(ref, ref_model, x, y)
        # the step used group["lr"] times the mode's factor
        expected = _check_applied(opt)
        inner = [g["lr"] for g in opt.active_optimizer.param_groups]
        assert inner == pytest.approx(expected, rel=1e-12)
        if opt.mode in known:  # the starting mode's factor is 1, the fixed mode's lrs[m] / lr
            ref_lrs = [known[opt.mode] * g["lr"] for g in ref.param_groups]
            assert inner == pytest.approx(ref_lrs, rel=1e-12)
        if name == "ReduceLROnPlateau":
            sched.step(1.0)
            ref_sched.step(1.0)
        else:
            sched.step()
            ref_sched.step()
        # the scheduler moved the wrapper's lr as it moves a plain optimizer's
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [g["lr"] for g in ref.param_groups], rel=1e-12
        )
        _check_applied(opt)
        lrs_seen.add(opt.param_groups[0]["lr"])
    assert len(lrs_seen) >= 2  # the schedule did move the lr
    assert {m: opt.mode_scales[m] for m in known} == pytest.approx(known)


# -- 4. applied_lrs --------------------------------------------------------------------------------


def test_applied_lrs_are_the_inner_optimizers_and_differ_from_group_lr_in_adam():
    model, x, y = _task()
    opt = blockopt.BlockOptimizer(
        model, None, lr=0.1, params=_two_groups(model, 0.1), lrs={"adam": 1e-3}
    )
    _step(opt, model, x, y)
    assert opt.applied_lrs == [g["lr"] for g in opt.active_optimizer.param_groups]
    assert opt.applied_lrs == pytest.approx([0.1, 0.05])
    opt.switch("adam")
    for stepped in (False, True):
        if stepped:
            _step(opt, model, x, y)
        assert type(opt.active_optimizer) is torch.optim.AdamW
        assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
        assert opt.applied_lrs == pytest.approx([1e-3, 5e-4], rel=1e-12)
        assert opt.applied_lrs == pytest.approx(
            [g["lr"] for g in opt.active_optimizer.param_groups], rel=1e-12
        )
        assert opt.applied_lrs[0] != opt.param_groups[0]["lr"]
        assert opt.mode_scales["adam"] == pytest.approx(0.01)
        assert opt.mode_lrs["adam"] == pytest.approx(1e-3)


# -- 5. add_param_group ----------------------------------------------------------------------------


def test_added_param_group_trains_in_every_mode_and_joins_the_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    backbone = list(model[0].parameters())
    backbone_names = ["0.weight", "0.bias"]
    for p in backbone:
        p.requires_grad_(False)
    opt = blockopt.BlockOptimizer(
        model,
        lambda: _loss(model, x, y),
        lr=0.1,
        momentum=0.7,
        weight_decay=1e-4,
        betas=(0.8, 0.99),
        eps=1e-7,
        adam_weight_decay=0.03,
        probe_every=1000,
        monitor_only=True,
    )
    _step(opt, model, x, y)  # probes at step 0, over the head only
    assert len(opt.history) == 1
    assert not set(backbone_names) & {b.name for b in opt.blocks}
    for p in backbone:
        p.requires_grad_(True)
    # bad groups are refused and leave no trace
    for bad in ({"lr": -1.0}, {"momentum": 1.5}, {"nesterov": "no"}):
        with pytest.raises((ValueError, TypeError), match="param group 1"):
            opt.add_param_group({"params": backbone, **bad})
        assert len(opt.param_groups) == 1
        assert len(opt.active_optimizer.param_groups) == 1
    opt.add_param_group({"params": backbone, "lr": 0.01})
    new = opt.param_groups[1]
    expected = {
        "lr": 0.01,
        "momentum": 0.7,
        "dampening": 0.0,
        "weight_decay": 1e-4,
        "nesterov": False,
        "maximize": False,
        "betas": (0.8, 0.99),
        "eps": 1e-7,
        "adam_weight_decay": 0.03,
        "amsgrad": False,
    }
    assert {k: new[k] for k in expected} == expected
    assert set(opt.param_groups[0]) <= set(new)  # every mode's keys, as the first group has
    assert "betas" not in opt.defaults  # still SGD's defaults
    for mode in ("sgd", "adam", "block_sgd"):
        opt.switch(mode)
        before = [p.detach().clone() for p in backbone]
        _step(opt, model, x, y)
        inner = opt.active_optimizer.param_groups
        assert len(inner) == 2 and all(any(p is q for q in inner[1]["params"]) for p in backbone)
        assert inner[1]["lr"] == pytest.approx(0.01 * opt.mode_scales[mode], rel=1e-12)
        for p, b in zip(backbone, before):
            assert not torch.equal(p, b), mode
    assert len(opt.history) == 1  # no probe yet: the blocks are still the head's
    opt.probe_now()
    names = [b.name for b in opt.blocks]
    assert set(backbone_names) <= set(names) and set(backbone_names) <= set(opt.block_factors)
    assert set(backbone_names) <= set(opt.active_optimizer.factors)  # block SGD uses them
    assert set(backbone_names) <= set(opt.spectra_history[-1][1])
    before = [p.detach().clone() for p in backbone]
    _step(opt, model, x, y)
    assert all(not torch.equal(p, b) for p, b in zip(backbone, before))


# -- 6. validation ---------------------------------------------------------------------------------

# (id, family, values, torch refuses them)
CASES = [
    ("lr=-1", "sgd", {"lr": -1.0}, True),
    ("adam lr=-1", "adam", {"lr": -1.0}, True),
    ("momentum=-0.1", "sgd", {"momentum": -0.1}, True),
    ("momentum=1.5", "sgd", {"momentum": 1.5}, False),
    ("nesterov='no'", "sgd", {"nesterov": "no"}, False),
    ("dampening with nesterov", "sgd", {"nesterov": True, "dampening": 0.1}, True),
    ("weight_decay=-1", "sgd", {"weight_decay": -1.0}, True),
    ("adam weight_decay=-1", "adam", {"weight_decay": -1.0}, True),
    ("betas=(1.0, 0.999)", "adam", {"betas": (1.0, 0.999)}, True),
    ("betas=(0.9, 1.5)", "adam", {"betas": (0.9, 1.5)}, True),
    ("eps=-1", "adam", {"eps": -1.0}, True),
]


# add_param_group / per-group values: these pass through (see the report).
def _torch_native(fam: str, params, values: dict):
    if fam == "sgd":
        return torch.optim.SGD(params, **{"lr": 0.1, "momentum": 0.9, **values})
    return torch.optim.AdamW(params, **{"lr": 1e-3, **values})


def _blockopt_kwargs(fam: str, values: dict) -> dict:
    if fam == "adam" and "weight_decay" in values:
        values = dict(values)
        values["adam_weight_decay"] = values.pop("weight_decay")
    return values


def _case_params(group_path: bool):
    out = []
    for cid, fam, values, refused in CASES:
        out.append(pytest.param(fam, values, refused, id=cid))
    return out


@pytest.mark.parametrize(("fam", "values", "refused"), _case_params(False))
def test_torch_refuses_these_values_except_the_two_blockopt_adds(fam, values, refused):
    params = [torch.zeros(2, requires_grad=True)]
    if refused:
        with pytest.raises(ValueError):
            _torch_native(fam, params, values)
    else:  # torch 2.13 takes momentum=1.5 and nesterov="no"; blockopt refuses them by choice
        inner = _torch_native(fam, params, values)
        assert all(inner.param_groups[0][k] == v for k, v in values.items())
        key = next(iter(values))
        error = TypeError if key == "nesterov" else ValueError
        model, _x, _y = _task()
        with pytest.raises(error, match=key):
            blockopt.BlockOptimizer(model, None, **values)
        with pytest.raises(error, match=key):
            blockopt.wrap(_torch_native(fam, model.parameters(), values), model)


@pytest.mark.parametrize(("fam", "values", "refused"), _case_params(False))
@pytest.mark.parametrize("start", ["sgd", "adam"])
def test_block_optimizer_refuses_them(start, fam, values, refused):
    model, _x, _y = _task()
    with pytest.raises((ValueError, TypeError)):
        blockopt.BlockOptimizer(model, None, mode=start, **_blockopt_kwargs(fam, values))


@pytest.mark.parametrize(("fam", "values", "refused"), _case_params(False))
def test_wrap_of_the_native_class_refuses_them(fam, values, refused):
    """wrap(SGD(..., momentum=...)) / wrap(AdamW(...)) holding the value: built so where torch
    accepts it, otherwise set in its defaults and groups as torch would have kept it."""
    model, _x, _y = _task()
    if refused:
        inner = _torch_native(fam, model.parameters(), {})
        inner.defaults.update(values)
        for g in inner.param_groups:
            g.update(values)
    else:
        inner = _torch_native(fam, model.parameters(), values)
    with pytest.raises((ValueError, TypeError)):
        blockopt.wrap(inner, model)


@pytest.mark.parametrize(("fam", "values", "refused"), _case_params(False))
def test_wrap_of_the_other_family_refuses_them_as_options(fam, values, refused):
    if "lr" in values:
        pytest.skip("wrap takes the starting lr from the wrapped optimizer")
    model, _x, _y = _task()
    other = _torch_native("adam" if fam == "sgd" else "sgd", model.parameters(), {})
    with pytest.raises((ValueError, TypeError)):
        blockopt.wrap(other, model, **_blockopt_kwargs(fam, values))


def _group_values(start: str, fam: str, values: dict) -> dict:
    """The values under the wrapper's group keys (weight decay prefixed for the other family)."""
    return {
        (_group_key(start, "adam" if fam == "adam" else "sgd", k) if k == "weight_decay" else k): v
        for k, v in values.items()
    }


@pytest.mark.parametrize(("fam", "values", "refused"), _case_params(True))
@pytest.mark.parametrize("start", ["sgd", "adam"])
def test_add_param_group_refuses_them(start, fam, values, refused):
    model, _x, _y = _task()
    first, last = list(model.net[0].parameters()), list(model.net[-1].parameters())
    opt = blockopt.BlockOptimizer(model, None, lr=0.05, mode=start, params=first)
    with pytest.raises((ValueError, TypeError), match="param group 1"):
        opt.add_param_group({"params": last, **_group_values(start, fam, values)})
    assert len(opt.param_groups) == 1
    assert len(opt.active_optimizer.param_groups) == 1


@pytest.mark.parametrize(("fam", "values", "refused"), _case_params(True))
def test_wrap_refuses_them_in_a_param_group(fam, values, refused):
    """torch takes any value in a param group (it checks only its constructor's arguments):
    wrap must refuse the ones the class refuses, naming the group."""
    model, _x, _y = _task()
    first, last = list(model.net[0].parameters()), list(model.net[-1].parameters())
    inner = _torch_native(fam, [{"params": first}, {"params": last, **values}], {})
    with pytest.raises((ValueError, TypeError), match="param group 1"):
        blockopt.wrap(inner, model)


@pytest.mark.parametrize(("fam", "values", "refused"), _case_params(True))
@pytest.mark.parametrize("start", ["sgd", "adam"])
def test_block_optimizer_refuses_them_in_a_param_group(start, fam, values, refused):
    model, _x, _y = _task()
    first, last = list(model.net[0].parameters()), list(model.net[-1].parameters())
    groups = [{"params": first}, {"params": last, **_group_values(start, fam, values)}]
    with pytest.raises((ValueError, TypeError), match="param group 1"):
        blockopt.BlockOptimizer(model, None, lr=0.05, mode=start, params=groups)


# -- 7. copying --------------------------------------------------------------------------------


def _probed_task(seed=0):
    model, x, y = _task(seed)
    return model, x, y, (lambda: _loss(model, x, y))


def _probing_opt(model, probe, **kwargs):
    return blockopt.BlockOptimizer(model, probe, lr=0.05, probe_every=2, lr_search=False, **kwargs)


@pytest.mark.parametrize("copier", [copy.deepcopy, copy.copy, pickle.dumps])
def test_copy_and_pickle_are_refused_pointing_to_state_dict(copier):
    model, _x, _y, probe = _probed_task()
    opt = _probing_opt(model, probe)
    with pytest.raises(TypeError, match="state_dict"):
        copier(opt)


def test_a_loaded_state_dict_steps_like_the_original_bitwise():
    model, x, y, probe = _probed_task()
    opt = _probing_opt(model, probe)
    for _ in range(3):
        _step(opt, model, x, y)
    opt.switch("adam")
    _step(opt, model, x, y)  # saved in Adam, with its moments and factor
    twin = _twin(model)
    twin_opt = _probing_opt(twin, lambda: _loss(twin, x, y))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert (twin_opt.mode, twin_opt.step_count) == (opt.mode, opt.step_count) == ("adam", 4)
    assert twin_opt.mode_scales == opt.mode_scales
    for _ in range(3):  # the probes at steps 4 and 6 decide (and switch) alike
        assert _step(opt, model, x, y) == _step(twin_opt, twin, x, y)
        assert twin_opt.mode == opt.mode and twin_opt.mode_scales == opt.mode_scales
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert [d.to_dict() for d in twin_opt.history] == [d.to_dict() for d in opt.history]
    assert [d.step for d in opt.history] == [0, 2, 4, 6]


# -- 8. state-dict hooks ---------------------------------------------------------------------------


def test_state_dict_hooks_see_and_edit_the_whole_state():
    model, x, y, probe = _probed_task()
    opt = _probing_opt(model, probe)
    for _ in range(3):
        _step(opt, model, x, y)
    calls = []

    def pre(o):
        calls.append("pre")
        assert o is opt
        o.param_groups[0]["lr"] = 0.033  # before the state is gathered: it is in it

    def post_in_place(o, state):
        calls.append("post_in_place")
        assert state["blockopt"]["step_count"] == 3 and state["blockopt"]["mode"] == opt.mode
        assert state["param_groups"][0]["lr"] == 0.033
        state["blockopt"]["probe_seconds"] = 1.5

    def post_returning(o, state):
        calls.append("post_returning")
        assert state["blockopt"]["probe_seconds"] == 1.5  # the earlier hook's edit
        new = dict(state)
        new["blockopt"] = {**state["blockopt"], "step_count": 40}
        new["user"] = {"epoch": 7}
        return new

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post_in_place)
    opt.register_state_dict_post_hook(post_returning)
    sd = opt.state_dict()
    assert calls == ["pre", "post_in_place", "post_returning"]  # each exactly once
    assert sd["user"] == {"epoch": 7}
    assert sd["blockopt"]["step_count"] == 40 and sd["blockopt"]["probe_seconds"] == 1.5
    assert sd["param_groups"][0]["lr"] == 0.033
    assert opt.step_count == 3  # the optimizer itself is not edited by the hooks' dict edits
    # what the hooks made loads
    twin = _twin(model)
    other = _probing_opt(twin, lambda: _loss(twin, x, y))
    other.load_state_dict(sd)
    assert other.step_count == 40 and other.param_groups[0]["lr"] == 0.033


def test_load_state_dict_hooks_see_the_whole_dict_and_run_after_install():
    model, x, y, probe = _probed_task()
    opt = _probing_opt(model, probe, monitor_only=True)  # the probes leave it in Adam
    for _ in range(4):
        _step(opt, model, x, y)
    opt.switch("adam")
    _step(opt, model, x, y)
    sd = opt.state_dict()
    twin = _twin(model)
    fresh = _probing_opt(twin, lambda: _loss(twin, x, y), monitor_only=True)
    assert (fresh.mode, fresh.step_count) == ("sgd", 0)
    seen = []

    def pre(o, state):
        seen.append(("pre", state["blockopt"]["step_count"], state["blockopt"]["mode"]))
        assert "state" in state and "param_groups" in state
        assert (o.step_count, o.mode) == (0, "sgd")  # nothing installed yet
        new = dict(state)
        new["blockopt"] = {**state["blockopt"], "step_count": 42}
        return new

    def post(o):
        seen.append(("post", o.step_count, o.mode, type(o.active_optimizer).__name__))
        assert o.active_optimizer.state  # Adam's moments already there

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(post)
    fresh.load_state_dict(sd)
    assert seen == [("pre", 5, "adam"), ("post", 42, "adam", "AdamW")]
    assert fresh.step_count == 42 and fresh.mode == "adam"
    assert sd["blockopt"]["step_count"] == 5  # the caller's dict is not edited


# -- 9. the probe schedule's settings stay the constructor's ------------------------------------


def test_a_loaded_checkpoint_keeps_the_constructors_probe_every_and_budget():
    model, x, y, probe = _probed_task()
    opt = blockopt.BlockOptimizer(
        model, probe, lr=0.05, probe_every=5, probe_budget=0.05, monitor_only=True
    )
    for _ in range(6):
        _step(opt, model, x, y)
    assert [d.step for d in opt.history] == [0, 5]
    sd = opt.state_dict()
    twin = _twin(model)
    other = blockopt.BlockOptimizer(
        twin,
        lambda: _loss(twin, x, y),
        lr=0.05,
        probe_every=7,
        probe_budget=0.2,
        monitor_only=True,
    )
    other.load_state_dict(copy.deepcopy(sd))
    assert other.schedule.every == 7 and other.schedule.budget == 0.2
    assert other.step_count == 6 and other.schedule.next_step == 10
    for _ in range(12):  # steps 6..17: the saved next probe (10), then every 7
        _step(other, twin, x, y)
    assert [d.step for d in other.history] == [0, 5, 10, 17]
    third = blockopt.BlockOptimizer(
        _twin(model), None, lr=0.05, probe_every=None, probe_budget=None
    )
    third.load_state_dict(copy.deepcopy(sd))
    assert third.schedule.every is None and third.schedule.budget is None
    assert third.schedule.next_step == 10  # where the schedule stood is loaded
