"""Bad input to the public API: each case raises a clear exception naming the problem, and a
failed load_state_dict leaves the optimizer exactly as it was (docs/BAD_INPUT.md lists them)."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from torch import nn

import blockopt
from blockopt.workloads.models import MLP

_X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
_Y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(1))


def _mlp(widths: tuple[int, ...] = (6, 16, 4), seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(widths)


def _probe(model: nn.Module) -> Callable[[], torch.Tensor]:
    return lambda: F.cross_entropy(model(_X), _Y)


def _frozen() -> nn.Module:
    return _mlp().requires_grad_(False)


def _spectra() -> blockopt.Spectra:
    model = _mlp()
    return blockopt.block_spectra(model, _probe(model), steps=3)


def _spectra_dict(**change: Any) -> dict[str, Any]:
    data = _spectra().to_dict()
    block = data["blocks"][0]
    for key, value in change.items():
        if value is _DELETE:
            del block[key]
        else:
            block[key] = value
    return data


_DELETE = object()


def _opt(**kwargs: Any) -> blockopt.BlockOptimizer:
    model = _mlp()
    return blockopt.BlockOptimizer(model, _probe(model), **kwargs)


def _wrap_foreign() -> blockopt.BlockOptimizer:
    model, other = _mlp(), _mlp(seed=1)
    return blockopt.wrap(torch.optim.SGD(other.parameters(), lr=0.1), model, _probe(model))


# (call, exception type, message regex): calls with bad arguments to the public API.
API_CASES = {
    "partition/not-a-module": (
        lambda: blockopt.partition("model"),
        TypeError,
        r"partition\(\) needs an nn\.Module, got str",
    ),
    "partition/no-parameters": (
        lambda: blockopt.partition(nn.ReLU()),
        ValueError,
        r"ReLU has no trainable parameters: it has no parameters at all; pass the module",
    ),
    "partition/all-frozen": (
        lambda: blockopt.partition(_frozen()),
        ValueError,
        r"all 4 of its parameters are frozen .*requires_grad_\(True\)",
    ),
    "partition/unknown-strategy": (
        lambda: blockopt.partition(_mlp(), "nonsense"),
        ValueError,
        r"unknown partition strategy 'nonsense'; use one of",
    ),
    "partition/strategy-wrong-type": (
        lambda: blockopt.partition(_mlp(), 42),
        TypeError,
        r"strategy must be a name, a callable or a mapping, got int",
    ),
    "partition/bad-regex": (
        lambda: blockopt.partition(_mlp(), {"first": "net.0.("}),
        ValueError,
        r"partition regex for block 'first' is invalid",
    ),
    "block_spectra/non-scalar-probe": (
        lambda: blockopt.block_spectra(_mlp(), lambda: torch.ones(3, requires_grad=True)),
        ValueError,
        r"shape \(3,\); it must return a scalar loss",
    ),
    "block_spectra/probe-returns-float": (
        lambda: blockopt.block_spectra(_mlp(), lambda: 1.0),
        TypeError,
        r"returned float, not a tensor",
    ),
    "block_spectra/probe-independent-of-parameters": (
        lambda: blockopt.block_spectra(_mlp(), lambda: torch.tensor(2.0, requires_grad=True)),
        ValueError,
        r"the probe's loss does not depend on any parameter of the blocks probed",
    ),
    "block_spectra/probe-through-another-model": (
        lambda: blockopt.block_spectra(_mlp(), _probe(_mlp(seed=1))),
        ValueError,
        r"does not depend on any parameter of the blocks probed; compute it through the model",
    ),
    "block_spectra/negative-steps": (
        lambda: blockopt.block_spectra(_mlp(), lambda: torch.tensor(0.0), steps=-5),
        ValueError,
        r"steps must be a positive integer, got -5",
    ),
    "block_spectra/empty-model": (
        lambda: blockopt.block_spectra(nn.Sequential(), lambda: torch.tensor(0.0)),
        ValueError,
        r"Sequential has no trainable parameters",
    ),
    "heterogeneity/not-spectra": (
        lambda: blockopt.heterogeneity([1.0, 2.0]),
        TypeError,
        r"expected the Spectra from block_spectra\(\).*got list",
    ),
    "heterogeneity/values-not-spectra": (
        lambda: blockopt.heterogeneity({"net.0.weight": 3.0}),
        TypeError,
        r"spectra\['net\.0\.weight'\] is of type float, not a BlockSpectrum",
    ),
    "heterogeneity/quantiles-out-of-order": (
        lambda: blockopt.heterogeneity(_spectra(), quantiles=(0.95, 0.05)),
        ValueError,
        r"quantiles must satisfy 0 <= lo < hi <= 1",
    ),
    "tune_block_lrs/base-lr-string": (
        lambda: blockopt.tune_block_lrs(_spectra(), "0.1"),
        ValueError,
        r"base_lr must be a positive finite number, got '0\.1'",
    ),
    "tune_block_lrs/max-factor-below-1": (
        lambda: blockopt.tune_block_lrs(_spectra(), 0.1, max_factor=0.5),
        ValueError,
        r"max_factor must be a finite number >= 1",
    ),
    "tune_block_lrs/not-spectra": (
        lambda: blockopt.tune_block_lrs("spectra.json", 0.1),
        TypeError,
        r"expected the Spectra from block_spectra\(\)",
    ),
    "Thresholds/out-of-order": (
        lambda: blockopt.Thresholds(sgd_below=2.0, adam_above=1.0),
        ValueError,
        r"sgd_below \(2\.0\) must not exceed adam_above \(1\.0\)",
    ),
    "Thresholds/negative-margin": (
        lambda: blockopt.Thresholds(margin=-0.1),
        ValueError,
        r"margin must be a non-negative finite number",
    ),
    "Thresholds/min-interval-float": (
        lambda: blockopt.Thresholds(min_interval=2.5),
        TypeError,
        r"min_interval must be an int",
    ),
    "Thresholds/block-ratio-infinite": (
        lambda: blockopt.Thresholds(block_ratio=float("inf")),
        ValueError,
        r"block_ratio must be a non-negative finite number",
    ),
    "BlockOptimizer/model-not-a-module": (
        lambda: blockopt.BlockOptimizer([torch.zeros(2, requires_grad=True)]),
        TypeError,
        r"model must be an nn\.Module, got list",
    ),
    "BlockOptimizer/no-parameters": (
        lambda: blockopt.BlockOptimizer(nn.Identity()),
        ValueError,
        r"Identity has no trainable parameters: it has no parameters at all",
    ),
    "BlockOptimizer/all-frozen": (
        lambda: blockopt.BlockOptimizer(_frozen()),
        ValueError,
        r"are frozen \(requires_grad=False\); unfreeze the ones to train",
    ),
    "BlockOptimizer/lr-string": (
        lambda: _opt(lr="0.1"),
        TypeError,
        r"lr must be a number, got str '0\.1'",
    ),
    "BlockOptimizer/lr-negative": (
        lambda: _opt(lr=-0.1),
        ValueError,
        r"lr must be a positive finite number, got -0\.1",
    ),
    "BlockOptimizer/thresholds-tuple": (
        lambda: _opt(thresholds=(1.0, 1.5)),
        TypeError,
        r"thresholds must be a blockopt\.Thresholds, got tuple; build one with",
    ),
    "BlockOptimizer/unknown-optimizer-name": (
        lambda: _opt(optimizers={"adam": "NoSuchOpt"}),
        ValueError,
        r"unknown optimizer 'NoSuchOpt': not a class in torch\.optim or torch_optimizer",
    ),
    "BlockOptimizer/optimizers-not-a-mapping": (
        lambda: _opt(optimizers=["adam"]),
        TypeError,
        r"optimizers must be a mapping mode name -> setting",
    ),
    "BlockOptimizer/unknown-strategy": (
        lambda: _opt(strategy="nonsense"),
        ValueError,
        r"unknown partition strategy 'nonsense'",
    ),
    "BlockOptimizer/unknown-mode": (
        lambda: _opt(mode="rmsprop"),
        ValueError,
        r"unknown mode 'rmsprop'; modes are",
    ),
    "BlockOptimizer/unknown-pin-mode": (
        lambda: _opt(pin_mode="fast"),
        ValueError,
        r"unknown pin_mode 'fast'",
    ),
    "BlockOptimizer/probe-every-0": (
        lambda: _opt(probe_every=0),
        ValueError,
        r"probe_every must be a positive int or None, got 0",
    ),
    "BlockOptimizer/probe-budget-0": (
        lambda: _opt(probe_budget=0),
        ValueError,
        r"probe_budget must be the share of training wall time probes may take, a number in "
        r"\(0, 1\) such as 0\.03 for 3%, or None for no budget; got 0",
    ),
    "BlockOptimizer/probe-budget-1": (
        lambda: _opt(probe_budget=1.0),
        ValueError,
        r"probe_budget must be the share .* got 1\.0",
    ),
    "BlockOptimizer/probe-budget-bool": (
        lambda: _opt(probe_budget=True),
        ValueError,
        r"probe_budget must be the share .* got True",
    ),
    "BlockOptimizer/probe-budget-string": (
        lambda: _opt(probe_budget="3%"),
        ValueError,
        r"probe_budget must be the share .* got '3%'",
    ),
    "BlockOptimizer/history-0": (
        lambda: _opt(history=0),
        ValueError,
        r"history must be a positive int, got 0",
    ),
    "BlockOptimizer/negative-steps": (
        lambda: _opt(steps=-3),
        ValueError,
        r"steps must be a positive integer, got -3",
    ),
    "BlockOptimizer/tol-zero": (
        lambda: _opt(tol=0),
        ValueError,
        r"tol must be None or a number in \(0, 1\), e.g. 0.03, got 0",
    ),
    "BlockOptimizer/tol-string": (
        lambda: _opt(tol="5%"),
        TypeError,
        r"tol must be None or a number in \(0, 1\), got str",
    ),
    "BlockOptimizer/seed-string": (
        lambda: _opt(seed="0"),
        TypeError,
        r"seed must be an int, got str",
    ),
    "BlockOptimizer/betas-one-number": (
        lambda: _opt(betas=(0.9,)),
        ValueError,
        r"betas must be two numbers in \[0, 1\)",
    ),
    "BlockOptimizer/max-factor-below-1": (
        lambda: _opt(max_factor=0.5),
        ValueError,
        r"max_factor must be a finite number >= 1, got 0\.5",
    ),
    "BlockOptimizer/lr-search-not-bool": (
        lambda: _opt(lr_search=1),
        TypeError,
        r"lr_search must be True or False, got 1",
    ),
    "BlockOptimizer/search-steps-0": (
        lambda: _opt(search_steps=0),
        ValueError,
        r"search_steps must be a positive int, got 0",
    ),
    "BlockOptimizer/momentum-negative": (
        lambda: _opt(momentum=-1),
        ValueError,
        r"momentum must be a non-negative finite number, got -1",
    ),
    "BlockOptimizer/lrs-not-a-mapping": (
        lambda: _opt(lrs=[1e-3]),
        TypeError,
        r"lrs must be a mapping mode name -> setting, e\.g\. lrs=\{'adam': \.\.\.\}, got list",
    ),
    "BlockOptimizer/params-of-another-model": (
        lambda: blockopt.BlockOptimizer(_mlp(), params=_mlp(seed=1).parameters()),
        ValueError,
        r"4 of the optimizer's parameters .* are not parameters of the MLP passed as model",
    ),
    "BlockOptimizer/params-empty": (
        lambda: _opt(params=[]),
        ValueError,
        r"params is empty: the optimizer has nothing to train",
    ),
    "wrap/not-an-optimizer": (
        lambda: blockopt.wrap("sgd", _mlp()),
        TypeError,
        r"wrap\(\) needs a torch\.optim\.Optimizer, got str",
    ),
    "wrap/already-wrapped": (
        lambda: blockopt.wrap(_opt(), _mlp()),
        TypeError,
        r"already a BlockOptimizer",
    ),
    "wrap/parameters-not-in-model": (
        _wrap_foreign,
        ValueError,
        r"are not parameters of the MLP passed as model; build the optimizer",
    ),
    "Spectra.from_dict/not-a-dict": (
        lambda: blockopt.Spectra.from_dict(["blocks"]),
        ValueError,
        r"not a blockopt spectra dict: got a list",
    ),
    "Spectra.from_dict/string-for-numbers": (
        lambda: blockopt.Spectra.from_dict(_spectra_dict(ritz_values="1, 2")),
        ValueError,
        r"blocks\[0\]\['ritz_values'\] is '1, 2', not a list of numbers",
    ),
    "Spectra.from_dict/missing-field": (
        lambda: blockopt.Spectra.from_dict(_spectra_dict(numel=_DELETE)),
        ValueError,
        r"blocks\[0\] lacks 'numel'",
    ),
    "Spectra.from_dict/unpaired-weights": (
        lambda: blockopt.Spectra.from_dict(_spectra_dict(ritz_weights=[1.0])),
        ValueError,
        r"blocks\[0\] has 3 ritz_values but 1 ritz_weights",
    ),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_bad_argument_raises_a_clear_error(case: str) -> None:
    call, error, message = API_CASES[case]
    with pytest.raises(error, match=message):
        call()


# -- load_state_dict --------------------------------------------------------------------------


def _train(opt: blockopt.BlockOptimizer, model: nn.Module, start: int, stop: int) -> None:
    for i in range(start, stop):
        idx = torch.arange(i * 4, i * 4 + 16) % len(_Y)
        opt.zero_grad()
        F.cross_entropy(model(_X[idx]), _Y[idx]).backward()
        opt.step()


def _source_state() -> dict[str, Any]:
    """A state dict that holds every kind of entry: Adam and SGD state, decisions, spectra."""
    model = _mlp(seed=3)
    opt = blockopt.BlockOptimizer(model, _probe(model), lr=0.05, probe_every=2, monitor_only=True)
    _train(opt, model, 0, 4)
    opt.switch("adam")
    _train(opt, model, 4, 7)
    state = opt.state_dict()
    assert state["blockopt"]["inner"]["adam"]["state"] and state["blockopt"]["history"]
    return state


def _target(seed: int = 0) -> tuple[blockopt.BlockOptimizer, nn.Module]:
    """An optimizer in use (SGD momentum, a probe, its own history) to load into."""
    model = _mlp(seed=seed)
    opt = blockopt.BlockOptimizer(model, _probe(model), lr=0.1, probe_every=3, history=4)
    _train(opt, model, 0, 5)
    return opt, model


def _snapshot(opt: blockopt.BlockOptimizer) -> dict[str, Any]:
    """Everything load_state_dict may change, as plain values and cloned tensors."""

    def groups(o: torch.optim.Optimizer) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]

    def state(o: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
        index = {id(p): i for i, p in enumerate(p for g in o.param_groups for p in g["params"])}
        return {
            index[id(p)]: {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()
            }
            for p, s in o.state.items()
        }

    return {
        "mode": opt.mode,
        "scales": dict(opt.mode_scales),
        "lrs": [g["lr"] for g in opt.param_groups],
        "groups": groups(opt),
        "state": state(opt),
        "inner": (opt.mode, type(o := opt.active_optimizer), o, groups(o), state(o)),
        "step_count": opt.step_count,
        "history": list(opt.history),
        "spectra": [(t, s.to_dict()) for t, s in opt.spectra_history],
        "faults": list(opt.faults),
        "block_factors": dict(opt.block_factors),
        "schedule": opt.schedule.state_dict(),
        "last_switch": opt.policy.last_switch,
        "probe_seconds": opt.probe_seconds,
        "train_seconds": (opt.recorder.saved_train_seconds, opt.recorder.clock_start),
        "last_score": opt.last_score,
    }


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.optim.Optimizer):
        assert a is b, where  # the very same inner optimizer object
    else:
        assert a == b or (a != a and b != b), where  # NaN equals NaN here


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A corruption that sets (or, with _DELETE, deletes) the entry at a slash-separated path
    below the state dict's 'blockopt' entry."""

    def corrupt(sd: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = sd["blockopt"]
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is _DELETE:
            del node[key]
        else:
            node[key] = value(node[key]) if callable(value) else value

    return corrupt


def _first_adam_state(sd: dict[str, Any]) -> dict[str, Any]:
    return next(iter(sd["blockopt"]["inner"]["adam"]["state"].values()))


def _truncate_exp_avg(sd: dict[str, Any]) -> None:
    state = _first_adam_state(sd)
    state["exp_avg"] = state["exp_avg"].flatten()[:-1]


def _orphan_state(sd: dict[str, Any]) -> None:
    sd["blockopt"]["inner"]["adam"]["state"][99] = dict(_first_adam_state(sd))


def _extra_group(sd: dict[str, Any]) -> None:
    sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    del sd["blockopt"]["shapes"]  # as in a state saved before shapes were recorded


def _other_width(sd: dict[str, Any]) -> None:
    model = _mlp((6, 8, 4))
    other = blockopt.BlockOptimizer(model, _probe(model), lr=0.05)
    _train(other, model, 0, 2)
    sd.clear()
    sd.update(other.state_dict())


def _other_width_without_shapes(sd: dict[str, Any]) -> None:
    _other_width(sd)
    del sd["blockopt"]["shapes"]


def _other_architecture(sd: dict[str, Any]) -> None:
    model = _mlp((6, 8, 8, 4))
    sd.clear()
    sd.update(blockopt.BlockOptimizer(model, _probe(model)).state_dict())


def _two_groups(sd: dict[str, Any]) -> None:
    model = _mlp()
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": w}, {"params": b, "lr": 0.01}]
    sd.clear()
    sd.update(blockopt.BlockOptimizer(model, _probe(model), params=groups).state_dict())


def _plain_sgd(sd: dict[str, Any]) -> None:
    sd.clear()
    sd.update(torch.optim.SGD(_mlp().parameters(), lr=0.1).state_dict())


# (corruption of a valid state dict, exception type, message regex)
LOAD_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], type, str]] = {
    "plain-optimizer-state": (_plain_sgd, ValueError, r"not a blockopt optimizer state dict"),
    "other-version": (_set("version", 99), ValueError, r"no 'blockopt' entry of version 1"),
    "missing-scales": (_set("scales", _DELETE), ValueError, r"entry lacks 'scales'"),
    "missing-inner": (_set("inner", _DELETE), ValueError, r"entry lacks 'inner'"),
    "mode-wrong-type": (_set("mode", 2), ValueError, r"its mode 2 is not one of"),
    "mode-unknown": (_set("mode", "rmsprop"), ValueError, r"its mode 'rmsprop' is not one of"),
    "scale-string": (
        _set("scales/adam", "1.0"),
        ValueError,
        r"scales\['adam'\] is '1\.0', not a positive finite number",
    ),
    "scale-unknown-mode": (
        _set("scales/lbfgs", 1.0),
        ValueError,
        r"'scales' names 'lbfgs', which this optimizer does not have",
    ),
    "step-count-string": (
        _set("step_count", "7"),
        ValueError,
        r"'step_count' is '7', not a non-negative int",
    ),
    "step-count-negative": (_set("step_count", -1), ValueError, r"'step_count' is -1"),
    "last-switch-float": (_set("last_switch", 4.5), ValueError, r"'last_switch' is 4\.5"),
    "probe-seconds-negative": (_set("probe_seconds", -1.0), ValueError, r"'probe_seconds'"),
    "lr-searched-string": (
        _set("lr_searched", "yes"),
        ValueError,
        r"'lr_searched' is 'yes', not True or False",
    ),
    "schedule-loss-scale-negative": (
        _set("schedule/loss_scale", -1.0),
        ValueError,
        r"'schedule'\['loss_scale'\] is -1\.0, not a magnitude >= 0",
    ),
    "history-missing-field": (
        _set("history/0/reason", _DELETE),
        ValueError,
        r"history\[0\] is not a record with the fields step, score, old_mode",
    ),
    "history-unknown-mode": (
        _set("history/0/new_mode", "fast"),
        ValueError,
        r"history\[0\]\['new_mode'\] is 'fast', not a valid mode",
    ),
    "history-not-a-list": (_set("history", "none"), ValueError, r"'history' is str, not a list"),
    "spectra-corrupt": (
        _set("spectra/0/1/blocks/0/ritz_values", "lots"),
        ValueError,
        r"spectra\[0\] is not a spectra dict \(blocks\[0\]\['ritz_values'\] is 'lots'",
    ),
    "spectra-not-pairs": (_set("spectra", [[0]]), ValueError, r"not a list of \[step, spectra\]"),
    "faults-wrong-type": (
        _set("faults", [{"step": "1", "kind": "probe_error", "message": "x"}]),
        ValueError,
        r"faults\[0\]\['step'\] is '1'",
    ),
    "schedule-unknown-key": (
        _set("schedule/bogus", 1),
        ValueError,
        r"'schedule' has unknown keys \['bogus'\]",
    ),
    "schedule-wrong-type": (
        _set("schedule/next_step", "10"),
        ValueError,
        r"'schedule'\['next_step'\] is '10'",
    ),
    "schedule-invalid": (
        _set("schedule/base", 0),
        ValueError,
        r"'schedule' holds invalid settings",
    ),
    "schedule-negative-failures": (
        _set("schedule/failures", -1),
        ValueError,
        r"'schedule'\['failures'\] is -1, not a count >= 0",
    ),
    "schedule-negative-losses-seen": (
        _set("schedule/losses_seen", -1),
        ValueError,
        r"'schedule'\['losses_seen'\] is -1, not a count >= 0",
    ),
    "schedule-zero-interval": (
        _set("schedule/interval", 0),
        ValueError,
        r"'schedule'\['interval'\] is 0, not a step count >= 1",
    ),
    "schedule-nan-loss-average": (
        _set("schedule/loss_avg", float("nan")),
        ValueError,
        r"'schedule'\['loss_avg'\] is nan, not a finite number",
    ),
    "schedule-negative-budget-step": (
        _set("schedule/budget_step", -1),
        ValueError,
        r"'schedule'\['budget_step'\] is -1, not a count >= 0",
    ),
    "schedule-budget-step-float": (
        _set("schedule/budget_step", 2.5),
        ValueError,
        r"'schedule'\['budget_step'\] is 2\.5, not of type int",
    ),
    "schedule-budget-out-of-range": (
        _set("schedule/budget", 1.5),
        ValueError,
        r"'schedule'\['budget'\] is 1\.5, not a share in \(0, 1\) or None",
    ),
    "schedule-budget-string": (
        _set("schedule/budget", "0.03"),
        ValueError,
        r"'schedule'\['budget'\] is '0\.03', not of type float \| None",
    ),
    "schedule-negative-pending-cost": (
        _set("schedule/pending_cost", -2.0),
        ValueError,
        r"'schedule'\['pending_cost'\] is -2\.0, not seconds >= 0 or None",
    ),
    "train-seconds-negative": (
        _set("train_seconds", -1.0),
        ValueError,
        r"'train_seconds' is -1\.0, not a non-negative number",
    ),
    "schedule-spiked-not-a-bool": (
        _set("schedule/spiked", 1),
        ValueError,
        r"'schedule'\['spiked'\] is 1, not True or False",
    ),
    "block-factor-unknown-block": (
        _set("block_factors/net.9.weight", 2.0),
        ValueError,
        r"'block_factors' names 'net\.9\.weight'",
    ),
    "block-factor-zero": (
        _set("block_factors/net.0.weight", 0.0),
        ValueError,
        r"block_factors\['net\.0\.weight'\] is 0\.0",
    ),
    "blocks-wrong-type": (_set("blocks", "net"), ValueError, r"'blocks' is str, not a list"),
    "inner-unknown-mode": (
        _set("inner/lbfgs", {"state": {}, "param_groups": []}),
        ValueError,
        r"'inner' must map mode names",
    ),
    "inner-missing-param-groups": (
        _set("inner/adam/param_groups", _DELETE),
        ValueError,
        r"the state of mode 'adam' is not an optimizer state dict",
    ),
    "inner-lr-string": (
        _set("inner/adam/param_groups/0/lr", "fast"),
        ValueError,
        r"the state of mode 'adam': param group 0's 'lr' is 'fast'",
    ),
    "inner-betas-wrong": (
        _set("inner/adam/param_groups/0/betas", (0.9,)),
        ValueError,
        r"param group 0's 'betas' is \(0\.9,\)",
    ),
    "inner-truncated-moment": (
        _truncate_exp_avg,
        ValueError,
        r"'exp_avg' of a parameter of shape \(\d+(, \d+)?\) is \(\d+,\) \(truncated",
    ),
    "inner-state-for-unknown-parameter": (
        _orphan_state,
        ValueError,
        r"holds state for parameter id 99, which none of its param groups lists",
    ),
    "mismatched-param-groups": (
        _extra_group,
        ValueError,
        r"the state of the wrapper does not fit its parameters \(loaded state dict has a "
        r"different number of parameter groups\)",
    ),
    "mismatched-group-layout": (
        _two_groups,
        ValueError,
        r"the state dict has 2 param group\(s\) of \[2, 2\] parameters, this optimizer 1",
    ),
    "other-model-same-blocks": (
        _other_width,
        ValueError,
        r"saved for parameters of other shapes \(group 0, parameter 0: saved \[8, 6\], here "
        r"\[16, 6\]\): it is the checkpoint of another model",
    ),
    "other-model-same-blocks-no-shapes": (
        _other_width_without_shapes,
        ValueError,
        r"'momentum_buffer' of a parameter of shape \(16, 6\) is \(8, 6\)",
    ),
    "other-model-other-blocks": (
        _other_architecture,
        ValueError,
        r"saved with other blocks than this optimizer has \(6 against 4; .*load it into the "
        r"model it came from",
    ),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_bad_state_dict_raises_and_changes_nothing(case: str) -> None:
    corrupt, error, message = LOAD_CASES[case]
    sd = copy.deepcopy(_source_state())
    corrupt(sd)
    opt, model = _target()
    twin, twin_model = _target()  # the same run, never handed a bad state dict
    before = _snapshot(opt)
    with pytest.raises(error, match=message):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))
    # And it trains on exactly as if nothing had happened.
    _train(opt, model, 5, 9)
    _train(twin, twin_model, 5, 9)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
    assert opt.mode == twin.mode and len(opt.history) == len(twin.history)


def test_state_dict_that_is_not_a_dict_is_a_type_error() -> None:
    opt, _ = _target()
    before = _snapshot(opt)
    with pytest.raises(TypeError, match=r"load_state_dict\(\) needs the dict .* got list"):
        opt.load_state_dict([("blockopt", {})])
    _assert_same(before, _snapshot(opt))


def test_a_valid_state_still_loads_after_a_failed_one() -> None:
    sd = _source_state()
    opt, _ = _target()
    bad = copy.deepcopy(sd)
    _truncate_exp_avg(bad)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    opt.load_state_dict(sd)
    assert opt.mode == "adam" and opt.step_count == 7
    _assert_same(sd["blockopt"]["inner"], opt.state_dict()["blockopt"]["inner"])


# -- checkpoints load with weights_only=True --------------------------------------------------

_SAFE_LEAVES = (str, int, float, bool, type(None), torch.Tensor)


def _unsafe_leaves(value: Any, where: str = "state") -> list[str]:
    """Paths to values of types outside what torch.load(weights_only=True) is meant to read."""
    if isinstance(value, dict):
        bad = [f"{where} key {k!r}" for k in value if not isinstance(k, (str, int))]
        return bad + [x for k, v in value.items() for x in _unsafe_leaves(v, f"{where}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [x for i, v in enumerate(value) for x in _unsafe_leaves(v, f"{where}[{i}]")]
    if type(value) in _SAFE_LEAVES or type(value) is torch.Tensor:
        return []
    return [f"{where}: {type(value).__name__}"]


@pytest.mark.parametrize("inner", ["adamw", "lamb"])
def test_state_dict_holds_only_weights_only_types_and_round_trips(inner: str) -> None:
    model = _mlp(seed=2)
    calls = []

    def probe() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a failing probe, to record a fault")
        return _probe(model)()

    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = blockopt.wrap(
        base,
        model,
        probe,
        probe_every=2,
        optimizers={"adam": torch_optimizer.Lamb} if inner == "lamb" else None,
    )
    with pytest.warns(Warning):
        _train(opt, model, 0, 6)
    opt.switch("block_sgd")
    _train(opt, model, 6, 8)
    opt.switch("adam")
    _train(opt, model, 8, 10)
    sd = opt.state_dict()
    assert sd["blockopt"]["faults"] and sd["blockopt"]["spectra"] and sd["blockopt"]["history"]
    assert _unsafe_leaves(sd) == []
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    _assert_same(sd, loaded)
    fresh_model = _mlp(seed=2)
    fresh_model.load_state_dict(model.state_dict())
    fresh = blockopt.wrap(
        torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9),
        fresh_model,
        _probe(fresh_model),
        probe_every=2,
        optimizers={"adam": torch_optimizer.Lamb} if inner == "lamb" else None,
    )
    fresh.load_state_dict(loaded)
    _assert_same(sd, fresh.state_dict())


def test_nothing_in_blockopt_unpickles_or_evaluates_file_contents() -> None:
    """Checkpoints are read with weights_only=True and data files with json; no pickle, eval,
    exec or marshal anywhere in the package."""
    package = Path(blockopt.__file__).parent
    forbidden = re.compile(r"\b(pickle|marshal|shelve|dill)\b|(?<![.\w])(eval|exec)\(")
    for file in sorted(package.glob("*.py")):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{file.name}:{number}: {line.strip()}"
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{file.name}:{number}: {line.strip()}"
