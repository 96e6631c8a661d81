"""The optimizer's parts where they meet users' code: classes with ``**kwargs``, step norms
under ``maximize``, parameters frozen after wrapping, and probes that fail after a change."""

import pytest
import torch
from torch import nn

import blockopt
from blockopt.optimizer.step_norms import step_norm


def _task(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    return model, x, y, lambda: nn.functional.mse_loss(model(x), y)


def _train(opt, model, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


class _KwargsAdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)


def test_a_mode_class_taking_kwargs_builds_validates_and_steps():
    model, x, y, _probe = _task()
    opt = blockopt.BlockOptimizer(model, None, lr=0.05, optimizers={"adam": _KwargsAdamW})
    opt.switch("adam")
    _train(opt, model, x, y, 2)
    assert isinstance(opt.active_optimizer, _KwargsAdamW)
    assert opt.active_optimizer.state[model[0].weight]["step"] == 2
    with pytest.raises(ValueError, match=r"param group 1: mode 'adam' \(_KwargsAdamW\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "eps": -1.0})


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, maximize=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.5, maximize=True),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.0, maximize=True),
    ],
)
def test_step_norm_predicts_the_step_under_maximize(make):
    model, x, y, _probe = _task()
    opt = make(model.parameters())
    for _ in range(3):  # some momentum / moments first
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    predicted = step_norm(opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    actual = sum(
        float((p.detach() - b).double().pow(2).sum()) for p, b in zip(model.parameters(), before)
    )
    assert predicted == pytest.approx(actual**0.5, rel=1e-5)


def test_parameters_frozen_after_wrapping_leave_the_blocks_at_the_next_probe():
    model, x, y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.05, probe_every=2, lr_search=False)
    _train(opt, model, x, y, 2)
    model[0].requires_grad_(False)
    _train(opt, model, x, y, 1)  # the probe at step 2 sees the frozen layer
    assert [b.name for b in opt.blocks] == ["2.weight", "2.bias"] and not opt.faults
    saved = opt.state_dict()
    fresh_model, *_ = _task()
    fresh = blockopt.BlockOptimizer(fresh_model, None, lr=0.05, probe_every=2)
    with pytest.raises(ValueError, match=r"only saved: \[\], only here: \['0.weight', '0.bias'\]"):
        fresh.load_state_dict(saved)
    fresh_model[0].requires_grad_(False)  # frozen as when it was saved: loads
    fresh.load_state_dict(saved)
    assert [b.name for b in fresh.blocks] == ["2.weight", "2.bias"]


def test_a_probe_that_fails_after_a_freeze_leaves_blocks_and_factors_as_they_were():
    model, _x, _y, probe = _task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.05, pin_mode="block_sgd")
    opt.probe_now()
    blocks, factors = [b.name for b in opt.blocks], dict(opt.block_factors)
    scales = dict(opt.active_optimizer.factors)
    model[0].requires_grad_(False)

    def broken():
        raise RuntimeError("probe batch loader died")

    opt.probe = broken
    with pytest.raises(RuntimeError, match="loader died"):
        opt.probe_now()
    assert [b.name for b in opt.blocks] == blocks and opt.block_factors == factors
    assert opt.active_optimizer.factors == scales
    opt.probe = probe
    opt.probe_now()  # a probe that succeeds commits the new blocks
    assert [b.name for b in opt.blocks] == ["2.weight", "2.bias"]
    assert set(opt.active_optimizer.factors) == {"2.weight", "2.bias"}


@pytest.mark.parametrize("name", ["RAdam", "Ranger", "SWATS", "MADGRAD", "Apollo"])
def test_wrap_keeps_torch_optimizer_classes_whose_defaults_hold_state(name):
    """Their ``defaults`` hold entries that are not constructor arguments (RAdam's buffer,
    Ranger's step counter, ...): the wrapped optimizer steps exactly as the bare one."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    cls = getattr(torch_optimizer, name)
    runs = []
    for wrapped in (False, True):
        model, x, y, _probe = _task()
        opt = cls(model.parameters(), lr=1e-3)
        if wrapped:
            opt = blockopt.wrap(opt, model, None)
            assert type(opt.active_optimizer) is cls
        _train(opt, model, x, y, 3)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_wrap_refuses_optimizers_without_a_learning_rate_or_a_closure_free_step():
    torch_optimizer = pytest.importorskip("torch_optimizer")
    model, *_ = _task()
    with pytest.raises(TypeError, match="cannot wrap Adafactor: its lr is None"):
        blockopt.wrap(torch_optimizer.Adafactor(model.parameters()), model)
    with pytest.raises(ValueError, match="LBFGS cannot be a blockopt mode: LBFGS re-evaluates"):
        blockopt.wrap(torch.optim.LBFGS(model.parameters()), model)
    with pytest.raises(ValueError, match="LBFGS cannot be a blockopt mode"):
        blockopt.BlockOptimizer(model, None, optimizers={"sgd": "LBFGS"})
