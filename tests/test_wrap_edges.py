"""What a user of ``wrap`` and ``step`` passes that the plain torch optimizer takes: per-group
learning rates with no top-level one, a tensor learning rate, a closure returning a float, a
scheduler built before wrapping, a checkpoint of the other family."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import blockopt


def _task(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(32, 4)
    y = 2 * x[:, :1] - x[:, 1:2]
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)), x, y


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: ((model(x) - y) ** 2).mean()


def test_a_fixed_rate_is_the_first_groups_rate_whatever_the_unused_default():
    """torch's SGD defaults to lr 1e-3, which no group below uses: ``lrs={"adam": 1e-3}`` is
    the rate the first group applies in Adam, and the second keeps its ratio to it."""
    model, x, y = _task()
    sgd = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.05},
            {"params": model[2].parameters(), "lr": 0.01},
        ],
        momentum=0.9,
    )
    assert sgd.defaults["lr"] == pytest.approx(1e-3)
    opt = blockopt.wrap(sgd, model, probe=_probe(model, x, y), lrs={"adam": 1e-3})
    opt.switch("adam")
    assert opt.mode_lrs["adam"] == pytest.approx(1e-3)
    assert opt.applied_lrs == pytest.approx([1e-3, 2e-4])
    assert opt.hparams()["lr"] == pytest.approx(0.05)  # the rate the first group trains at


def test_block_optimizer_fixes_rates_against_its_first_group_too():
    model, x, y = _task()
    opt = blockopt.BlockOptimizer(
        model,
        _probe(model, x, y),
        lr=0.1,
        params=[{"params": model[0].parameters(), "lr": 0.02}, {"params": model[2].parameters()}],
        lrs={"adam": 1e-3},
    )
    opt.switch("adam")
    assert opt.applied_lrs == pytest.approx([1e-3, 5e-3])  # the second group: 0.1 / 0.02 times


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.AdamW])
def test_a_tensor_learning_rate_is_searched_as_the_number_it_holds(cls):
    model, x, y = _task()
    kwargs = {"momentum": 0.9} if cls is torch.optim.SGD else {}
    inner = cls(model.parameters(), lr=torch.tensor(0.05), **kwargs)
    opt = blockopt.wrap(inner, model, probe=_probe(model, x, y), probe_every=5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    faults = [w for w in seen if issubclass(w.category, blockopt.ProbeFaultWarning)]
    assert not faults, [str(w.message) for w in faults]
    assert not opt.faults and len(opt.history) == 3
    switches = [d for d in opt.history if d.switched]
    for d in switches:  # the switch's rate came from trials, not from a failed search
        assert any("trials" in n for n in d.notes), d.notes


@pytest.mark.parametrize(
    "value", [0.5, 1, np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5)]
)
def test_a_closure_returning_a_number_is_observed(value):
    model, x, y = _task()
    opt = blockopt.BlockOptimizer(model, None)

    def closure():
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        return value

    assert opt.step(closure) is value
    assert opt.schedule.losses_seen == 1
    opt.observe_loss(value)
    assert opt.schedule.losses_seen == 2


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "None"), ("0.5", "str"), (torch.ones(3), r"shape \(3,\)"), (True, "True")],
)
def test_observe_loss_names_what_it_got(value, shown):
    model, _x, _y = _task()
    opt = blockopt.BlockOptimizer(model, None)
    with pytest.raises(TypeError, match=rf"observe_loss needs .* got .*{shown}"):
        opt.observe_loss(value)
    assert opt.schedule.losses_seen == 0


def test_a_closure_returning_something_else_is_returned_unobserved():
    """torch's own optimizers return whatever the closure returns; so does this one."""
    model, _x, _y = _task()
    opt = blockopt.BlockOptimizer(model, None)
    out = {"loss": 1.0}
    assert opt.step(lambda: out) is out
    assert opt.schedule.losses_seen == 0


def test_wrap_warns_of_a_scheduler_built_on_the_optimizer_it_wraps():
    model, x, y = _task()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.1)
    with pytest.warns(UserWarning, match="build the scheduler on the optimizer wrap"):
        blockopt.wrap(sgd, model, probe=_probe(model, x, y))


def test_a_scheduler_built_on_the_wrapper_drives_it_without_a_warning():
    model, x, y = _task()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = blockopt.wrap(sgd, model, probe=_probe(model, x, y), probe_every=1000)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for _ in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()
    assert opt.applied_lrs == pytest.approx([0.001])


def test_a_checkpoint_of_the_other_family_is_refused_unchanged():
    """SGD's weight_decay is L2, AdamW's decoupled: a state saved by a wrapped SGD must not load
    into a wrapped AdamW, where the same key means another thing."""
    model, x, y = _task()
    saved = blockopt.wrap(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
        model,
        probe=_probe(model, x, y),
    )
    state = saved.state_dict()
    assert state["blockopt"]["family"] == "sgd"
    other = blockopt.wrap(
        torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05),
        model,
        probe=_probe(model, x, y),
    )
    before = [dict(g) for g in other.param_groups]
    with pytest.raises(ValueError, match=r"started in the sgd family .* adam family"):
        other.load_state_dict(state)
    assert [g["weight_decay"] for g in other.param_groups] == [b["weight_decay"] for b in before]
    # the same family loads, and a state saved before the family was recorded still does
    same = blockopt.wrap(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, probe=_probe(model, x, y)
    )
    same.load_state_dict(state)
    del state["blockopt"]["family"]
    other_old = blockopt.wrap(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, probe=_probe(model, x, y)
    )
    other_old.load_state_dict(state)
    assert other_old.param_groups[0]["weight_decay"] == pytest.approx(1e-4)


def test_rmsprop_with_momentum_starts_in_the_adaptive_mode():
    """RMSprop has momentum and no betas, but scales each coordinate by its second moment: it
    is wrapped as the Adam mode's class, with SGD's momentum under its prefixed key."""
    model, x, y = _task()
    inner = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)
    opt = blockopt.wrap(inner, model, probe=_probe(model, x, y), probe_every=1000)
    assert opt.mode == "adam" and isinstance(opt.active_optimizer, torch.optim.RMSprop)
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9 and "alpha" in group and "sgd_momentum" in group
    opt.switch("sgd")
    assert type(opt.active_optimizer) is torch.optim.SGD


def test_lrs_naming_the_starting_mode_sets_its_rate_and_fixes_it():
    model, x, y = _task()
    opt = blockopt.BlockOptimizer(model, _probe(model, x, y), lr=0.1, lrs={"sgd": 0.01})
    assert opt.mode_lrs["sgd"] == pytest.approx(0.01)
    assert opt.applied_lrs == pytest.approx([0.01])
    assert "sgd" in opt.fixed_lrs
    pinned = blockopt.BlockOptimizer(
        model, None, lr=0.1, pin_mode="block_sgd", lrs={"block_sgd": 1.0}
    )
    assert pinned.mode_lrs["block_sgd"] == pytest.approx(1.0)
