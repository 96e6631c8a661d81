"""The adversarial cases of the test suite, as tables: each case is an input, the call that makes
it, the exception it must raise (or ``None`` for a call that must work), the message it must
match and the fix. ``tests/test_bad_input*.py`` assert them; ``scripts/bad_input_doc.py`` runs
them and writes docs/BAD_INPUT.md from what they actually raise."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import blockopt
from blockopt.curvature.isolation import ProbeContractError
from blockopt.optimizer.checkpoint import CheckpointDuringProbeError
from blockopt.optimizer.policy import ProbeFaultWarning
from blockopt.workloads.models import MLP

__all__ = [
    "API_CASES",
    "CLI_AFTER",
    "DELETE",
    "INTRO",
    "LOAD_CASES",
    "OUTRO",
    "SECTIONS",
    "Case",
    "LoadCase",
    "Section",
    "mlp",
    "probe_of",
    "source_state",
    "target",
    "train",
]


@dataclass(frozen=True)
class Case:
    """A call with bad (or odd) input: ``call()`` raises ``error`` with a message that
    ``re.search``-es ``message``; with ``error=None`` it must work, ``message`` then says what
    it does and ``check`` (if given) asserts on the result."""

    id: str
    input: str  # Markdown: the input, as a user would write it
    call: Callable[[], Any]
    error: type[BaseException] | None
    message: str  # a regex for the error's message, or what a call that works does
    fix: str = ""
    check: Callable[[Any], object] | None = None
    warns: type[Warning] | None = None  # a call that works with this warning, matching message

    def run(self) -> Any:
        return self.call()


@dataclass(frozen=True)
class LoadCase:
    """A corruption of a valid state dict, which ``load_state_dict`` must refuse with ``error``
    and a message matching ``message``, changing nothing."""

    id: str
    input: str
    corrupt: Callable[[dict[str, Any]], None]
    error: type[BaseException]
    message: str
    fix: str = ""

    def run(self) -> Any:
        sd = source_state()
        self.corrupt(sd)
        opt, _ = target()
        return opt.load_state_dict(sd)


_X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
_Y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(1))


def _endless_probe() -> None:
    layer = nn.Linear(200, 100)
    blockopt.block_spectra(layer, lambda: layer(torch.ones(1, 200)).pow(2).sum(), steps=10**9)


def mlp(widths: tuple[int, ...] = (6, 16, 4), seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(widths)


def probe_of(model: nn.Module) -> Callable[[], torch.Tensor]:
    return lambda: F.cross_entropy(model(_X), _Y)


def _frozen() -> nn.Module:
    return mlp().requires_grad_(False)


def _spectra() -> blockopt.Spectra:
    model = mlp()
    return blockopt.block_spectra(model, probe_of(model), steps=3)


def _spectra_dict(**change: Any) -> dict[str, Any]:
    data = _spectra().to_dict()
    block = data["blocks"][0]
    for key, value in change.items():
        if value is DELETE:
            del block[key]
        else:
            block[key] = value
    return data


DELETE = object()


def _opt(**kwargs: Any) -> blockopt.BlockOptimizer:
    model = mlp()
    return blockopt.BlockOptimizer(model, probe_of(model), **kwargs)


def _wrap_foreign() -> blockopt.BlockOptimizer:
    model, other = mlp(), mlp(seed=1)
    return blockopt.wrap(torch.optim.SGD(other.parameters(), lr=0.1), model, probe_of(model))


# Calls with bad arguments to the public API.
API_CASES: list[Case] = [
    Case(
        "partition/not-a-module",
        '`partition("model")`',
        lambda: blockopt.partition("model"),
        TypeError,
        r"partition\(\) needs an nn\.Module, got str",
        "pass the model",
    ),
    Case(
        "partition/no-parameters",
        "`partition(nn.ReLU())`: no parameters at all",
        lambda: blockopt.partition(nn.ReLU()),
        ValueError,
        r"ReLU has no trainable parameters: it has no parameters at all; pass the module",
        "pass the whole model",
    ),
    Case(
        "partition/all-frozen",
        "`partition(model)` with every parameter frozen",
        lambda: blockopt.partition(_frozen()),
        ValueError,
        r"all 4 of its parameters are frozen .*requires_grad_\(True\)",
        "`p.requires_grad_(True)` on what should train",
    ),
    Case(
        "partition/unknown-strategy",
        '`partition(model, "nonsense")`',
        lambda: blockopt.partition(mlp(), "nonsense"),
        ValueError,
        r"unknown partition strategy 'nonsense'; use one of",
        "a known name, a callable or a `{block: regex}` mapping",
    ),
    Case(
        "partition/strategy-wrong-type",
        "`partition(model, 42)`",
        lambda: blockopt.partition(mlp(), 42),
        TypeError,
        r"strategy must be a name, a callable or a mapping, got int",
        "a name, a callable or a mapping",
    ),
    Case(
        "partition/bad-regex",
        '`partition(model, {"first": "net.0.("})`',
        lambda: blockopt.partition(mlp(), {"first": "net.0.("}),
        ValueError,
        r"partition regex for block 'first' is invalid",
        "fix the regex",
    ),
    Case(
        "block_spectra/non-scalar-probe",
        "`block_spectra(model, probe)`, the probe returns a non-scalar",
        lambda: blockopt.block_spectra(mlp(), lambda: torch.ones(3, requires_grad=True)),
        ValueError,
        r"shape \(3,\); it must return a scalar loss",
        "reduce it, e.g. `.mean()`",
    ),
    Case(
        "block_spectra/probe-returns-float",
        "the probe returns a float (`loss.item()`)",
        lambda: blockopt.block_spectra(mlp(), lambda: 1.0),
        TypeError,
        r"returned float, not a tensor",
        "return the loss tensor",
    ),
    Case(
        "block_spectra/probe-independent-of-parameters",
        "the probe returns a constant",
        lambda: blockopt.block_spectra(mlp(), lambda: torch.tensor(2.0, requires_grad=True)),
        ValueError,
        r"the probe's loss does not depend on any parameter of the blocks probed",
        "compute the loss through `model`",
    ),
    Case(
        "block_spectra/probe-through-another-model",
        "the probe computes another model's loss",
        lambda: blockopt.block_spectra(mlp(), probe_of(mlp(seed=1))),
        ValueError,
        r"does not depend on any parameter of the blocks probed; compute it through the model",
        "compute the loss through `model`",
    ),
    Case(
        "block_spectra/negative-steps",
        "`block_spectra(..., steps=-5)`",
        lambda: blockopt.block_spectra(mlp(), lambda: torch.tensor(0.0), steps=-5),
        ValueError,
        r"steps must be a positive integer, got -5",
        "`steps >= 1`",
    ),
    Case(
        "block_spectra/backend-unknown",
        '`block_spectra(..., backend="finite")`',
        lambda: blockopt.block_spectra(mlp(), lambda: torch.tensor(0.0), backend="finite"),
        ValueError,
        r"backend must be one of \('auto', 'autograd', 'fd'\)",
        '`"auto"`, `"autograd"` or `"fd"`',
    ),
    Case(
        "block_spectra/upcast-string",
        '`block_spectra(..., upcast="yes")`',
        lambda: blockopt.block_spectra(mlp(), lambda: torch.tensor(0.0), upcast="yes"),
        TypeError,
        r"upcast must be True or False, got str 'yes'",
        "`True` or `False`",
    ),
    Case(
        "block_spectra/endless-steps",
        "`block_spectra(model, probe, steps=10**9)` on a 20,000-coordinate block",
        lambda: _endless_probe(),
        ValueError,
        r"1,000,000,000 Lanczos steps with full reorthogonalisation would take about .* "
        r"ask for fewer steps",
        "10 to 100 steps",
    ),
    Case(
        "block_spectra/empty-model",
        "`block_spectra(nn.Sequential(), ...)`",
        lambda: blockopt.block_spectra(nn.Sequential(), lambda: torch.tensor(0.0)),
        ValueError,
        r"Sequential has no trainable parameters",
        "pass the whole model",
    ),
    Case(
        "heterogeneity/not-spectra",
        "`heterogeneity([1.0, 2.0])`",
        lambda: blockopt.heterogeneity([1.0, 2.0]),
        TypeError,
        r"expected the Spectra from block_spectra\(\).*got list",
        "pass `block_spectra(...)` or `Spectra.from_dict(json.load(f))`",
    ),
    Case(
        "heterogeneity/values-not-spectra",
        '`heterogeneity({"net.0.weight": 3.0})`',
        lambda: blockopt.heterogeneity({"net.0.weight": 3.0}),
        TypeError,
        r"spectra\['net\.0\.weight'\] is of type float, not a BlockSpectrum",
        "as above",
    ),
    Case(
        "heterogeneity/quantiles-out-of-order",
        "`heterogeneity(spectra, quantiles=(0.95, 0.05))`",
        lambda: blockopt.heterogeneity(_spectra(), quantiles=(0.95, 0.05)),
        ValueError,
        r"quantiles must satisfy 0 <= lo < hi <= 1",
        "`lo < hi`",
    ),
    Case(
        "tune_block_lrs/base-lr-string",
        '`tune_block_lrs(spectra, "0.1")`',
        lambda: blockopt.tune_block_lrs(_spectra(), "0.1"),
        ValueError,
        r"base_lr must be a positive finite number, got '0\.1'",
        "a number",
    ),
    Case(
        "tune_block_lrs/overflows",
        "`tune_block_lrs(spectra, 1e308)`",
        lambda: blockopt.tune_block_lrs(_spectra(), 1e308),
        ValueError,
        r"base_lr 1e\+308 times the factors of \d+ block\(s\) .* overflows to inf",
        "a learning rate whose largest factor stays finite",
    ),
    Case(
        "tune_block_lrs/max-factor-below-1",
        "`tune_block_lrs(spectra, 0.1, max_factor=0.5)`",
        lambda: blockopt.tune_block_lrs(_spectra(), 0.1, max_factor=0.5),
        ValueError,
        r"max_factor must be a finite number >= 1",
        "`max_factor >= 1`",
    ),
    Case(
        "tune_block_lrs/not-spectra",
        '`tune_block_lrs("spectra.json", 0.1)`',
        lambda: blockopt.tune_block_lrs("spectra.json", 0.1),
        TypeError,
        r"expected the Spectra from block_spectra\(\)",
        "pass `block_spectra(...)` or `Spectra.from_dict(json.load(f))`",
    ),
    Case(
        "Thresholds/out-of-order",
        "`Thresholds(sgd_below=2.0, adam_above=1.0)`",
        lambda: blockopt.Thresholds(sgd_below=2.0, adam_above=1.0),
        ValueError,
        r"sgd_below \(2\.0\) must not exceed adam_above \(1\.0\)",
        "`sgd_below <= adam_above`",
    ),
    Case(
        "Thresholds/negative-margin",
        "`Thresholds(margin=-0.1)`",
        lambda: blockopt.Thresholds(margin=-0.1),
        ValueError,
        r"margin must be a non-negative finite number",
        "`margin >= 0`",
    ),
    Case(
        "Thresholds/min-interval-float",
        "`Thresholds(min_interval=2.5)`",
        lambda: blockopt.Thresholds(min_interval=2.5),
        TypeError,
        r"min_interval must be an int",
        "an int",
    ),
    Case(
        "Thresholds/block-ratio-infinite",
        '`Thresholds(block_ratio=float("inf"))`',
        lambda: blockopt.Thresholds(block_ratio=float("inf")),
        ValueError,
        r"block_ratio must be a non-negative finite number \(or None: off\)",
        "a finite `block_ratio >= 0`, or `None` (the default: the score alone decides)",
    ),
    Case(
        "BlockOptimizer/model-not-a-module",
        "`BlockOptimizer([tensor])`",
        lambda: blockopt.BlockOptimizer([torch.zeros(2, requires_grad=True)]),
        TypeError,
        r"model must be an nn\.Module, got list",
        "pass the model; parameters go to `params=`",
    ),
    Case(
        "BlockOptimizer/no-parameters",
        "`BlockOptimizer(nn.Identity())`",
        lambda: blockopt.BlockOptimizer(nn.Identity()),
        ValueError,
        r"Identity has no trainable parameters: it has no parameters at all",
        "pass the whole model",
    ),
    Case(
        "BlockOptimizer/all-frozen",
        "`BlockOptimizer(model)` with every parameter frozen",
        lambda: blockopt.BlockOptimizer(_frozen()),
        ValueError,
        r"are frozen \(requires_grad=False\); unfreeze the ones to train",
        "`p.requires_grad_(True)` on what should train",
    ),
    Case(
        "BlockOptimizer/lr-string",
        '`BlockOptimizer(model, lr="0.1")`',
        lambda: _opt(lr="0.1"),
        TypeError,
        r"lr must be a number, got str '0\.1'",
        "a number",
    ),
    Case(
        "BlockOptimizer/lr-negative",
        "`BlockOptimizer(model, lr=-0.1)`",
        lambda: _opt(lr=-0.1),
        ValueError,
        r"lr must be a positive finite number, got -0\.1",
        "`lr > 0`",
    ),
    Case(
        "BlockOptimizer/thresholds-tuple",
        "`thresholds=(1.0, 1.5)`",
        lambda: _opt(thresholds=(1.0, 1.5)),
        TypeError,
        r"thresholds must be a blockopt\.Thresholds, got tuple; build one with",
        "`blockopt.Thresholds(sgd_below=..., adam_above=...)`",
    ),
    Case(
        "BlockOptimizer/unknown-optimizer-name",
        '`optimizers={"adam": "NoSuchOpt"}`',
        lambda: _opt(optimizers={"adam": "NoSuchOpt"}),
        ValueError,
        r"unknown optimizer 'NoSuchOpt': not a class in torch\.optim or torch_optimizer",
        'a class, or a name such as `"AdamW"`, `"Lamb"`',
    ),
    Case(
        "BlockOptimizer/optimizers-not-a-mapping",
        '`optimizers=["adam"]`',
        lambda: _opt(optimizers=["adam"]),
        TypeError,
        r"optimizers must be a mapping mode name -> setting",
        '`{"adam": ...}`',
    ),
    Case(
        "BlockOptimizer/unknown-strategy",
        '`strategy="nonsense"`',
        lambda: _opt(strategy="nonsense"),
        ValueError,
        r"unknown partition strategy 'nonsense'",
        "as for `partition`",
    ),
    Case(
        "BlockOptimizer/unknown-mode",
        '`mode="rmsprop"`',
        lambda: _opt(mode="rmsprop"),
        ValueError,
        r"unknown mode 'rmsprop'; modes are",
        "one of the modes; other classes go to `optimizers=`",
    ),
    Case(
        "BlockOptimizer/unknown-pin-mode",
        '`pin_mode="fast"`',
        lambda: _opt(pin_mode="fast"),
        ValueError,
        r"unknown pin_mode 'fast'",
        "one of the modes",
    ),
    Case(
        "BlockOptimizer/probe-every-0",
        "`probe_every=0`",
        lambda: _opt(probe_every=0),
        ValueError,
        r"probe_every must be a positive int or None, got 0",
        "`>= 1`, or `None` for the adaptive schedule",
    ),
    Case(
        "BlockOptimizer/probe-budget-0",
        "`probe_budget=0`",
        lambda: _opt(probe_budget=0),
        ValueError,
        r"probe_budget must be the share of training wall time probes may take, a number in "
        r"\(0, 1\) such as 0\.03 for 3%, or None for no budget; got 0",
        "a share in (0, 1), e.g. `0.03`, or `None` for no budget",
    ),
    Case(
        "BlockOptimizer/probe-budget-1",
        "`probe_budget=1.0`",
        lambda: _opt(probe_budget=1.0),
        ValueError,
        r"probe_budget must be the share .* got 1\.0",
        "as above",
    ),
    Case(
        "BlockOptimizer/probe-budget-bool",
        "`probe_budget=True`",
        lambda: _opt(probe_budget=True),
        ValueError,
        r"probe_budget must be the share .* got True",
        "as above",
    ),
    Case(
        "BlockOptimizer/probe-budget-string",
        '`probe_budget="3%"`',
        lambda: _opt(probe_budget="3%"),
        ValueError,
        r"probe_budget must be the share .* got '3%'",
        "as above",
    ),
    Case(
        "BlockOptimizer/history-0",
        "`history=0`",
        lambda: _opt(history=0),
        ValueError,
        r"history must be a positive int, got 0",
        "`>= 1`",
    ),
    Case(
        "BlockOptimizer/negative-steps",
        "`steps=-3`",
        lambda: _opt(steps=-3),
        ValueError,
        r"steps must be a positive integer, got -3",
        "`>= 1`",
    ),
    Case(
        "BlockOptimizer/tol-zero",
        "`tol=0`",
        lambda: _opt(tol=0),
        ValueError,
        r"tol must be None or a number in \(0, 1\), e.g. 0.03, got 0",
        "`None` or `0 < tol < 1`",
    ),
    Case(
        "BlockOptimizer/tol-string",
        '`tol="5%"`',
        lambda: _opt(tol="5%"),
        TypeError,
        r"tol must be None or a number in \(0, 1\), got str",
        "a number",
    ),
    Case(
        "BlockOptimizer/backend-unknown",
        '`backend="jax"`',
        lambda: _opt(backend="jax"),
        ValueError,
        r"backend must be one of \('auto', 'autograd', 'fd'\)",
        '`"auto"`, `"autograd"` or `"fd"`',
    ),
    Case(
        "BlockOptimizer/seed-string",
        '`seed="0"`',
        lambda: _opt(seed="0"),
        TypeError,
        r"seed must be an int, got str",
        "an int",
    ),
    Case(
        "BlockOptimizer/betas-one-number",
        "`betas=(0.9,)`",
        lambda: _opt(betas=(0.9,)),
        ValueError,
        r"betas must be two numbers in \[0, 1\)",
        "two numbers",
    ),
    Case(
        "BlockOptimizer/max-factor-below-1",
        "`max_factor=0.5`",
        lambda: _opt(max_factor=0.5),
        ValueError,
        r"max_factor must be a finite number >= 1, got 0\.5",
        "`>= 1`",
    ),
    Case(
        "BlockOptimizer/lr-search-not-bool",
        "`lr_search=1`",
        lambda: _opt(lr_search=1),
        TypeError,
        r"lr_search must be True or False, got 1",
        "`True` or `False`",
    ),
    Case(
        "BlockOptimizer/search-steps-0",
        "`search_steps=0`",
        lambda: _opt(search_steps=0),
        ValueError,
        r"search_steps must be a positive int, got 0",
        "`>= 1`",
    ),
    Case(
        "BlockOptimizer/momentum-negative",
        "`momentum=-1`",
        lambda: _opt(momentum=-1),
        ValueError,
        r"momentum must be a non-negative finite number, got -1",
        "`>= 0`",
    ),
    Case(
        "BlockOptimizer/lrs-not-a-mapping",
        "`lrs=[1e-3]`",
        lambda: _opt(lrs=[1e-3]),
        TypeError,
        r"lrs must be a mapping mode name -> setting, e\.g\. lrs=\{'adam': \.\.\.\}, got list",
        '`{"adam": 1e-3}`',
    ),
    Case(
        "BlockOptimizer/params-of-another-model",
        "`params=` of another model",
        lambda: blockopt.BlockOptimizer(mlp(), params=mlp(seed=1).parameters()),
        ValueError,
        r"4 of the optimizer's parameters .* are not parameters of the MLP passed as model",
        "build over `model.parameters()` of the model passed",
    ),
    Case(
        "BlockOptimizer/params-empty",
        "`params=[]`",
        lambda: _opt(params=[]),
        ValueError,
        r"params is empty: the optimizer has nothing to train",
        "pass parameters, or `params=None`",
    ),
    Case(
        "wrap/not-an-optimizer",
        '`wrap("sgd", model)`',
        lambda: blockopt.wrap("sgd", mlp()),
        TypeError,
        r"wrap\(\) needs a torch\.optim\.Optimizer, got str",
        "pass the optimizer",
    ),
    Case(
        "wrap/already-wrapped",
        "`wrap(block_optimizer, model)`",
        lambda: blockopt.wrap(_opt(), mlp()),
        TypeError,
        r"already a BlockOptimizer",
        "use it as it is",
    ),
    Case(
        "wrap/parameters-not-in-model",
        "`wrap(SGD(other.parameters()), model)`",
        _wrap_foreign,
        ValueError,
        r"are not parameters of the MLP passed as model; build the optimizer",
        "wrap an optimizer over `model`'s parameters, or pass their model",
    ),
    Case(
        "Spectra.from_dict/not-a-dict",
        '`Spectra.from_dict(["blocks"])`',
        lambda: blockopt.Spectra.from_dict(["blocks"]),
        ValueError,
        r"not a blockopt spectra dict: got a list",
        "pass what `Spectra.to_dict()` wrote",
    ),
    Case(
        "Spectra.from_dict/string-for-numbers",
        '`Spectra.from_dict` with `"ritz_values": "1, 2"`',
        lambda: blockopt.Spectra.from_dict(_spectra_dict(ritz_values="1, 2")),
        ValueError,
        r"blocks\[0\]\['ritz_values'\] is '1, 2', not a list of numbers",
        "fix or regenerate the file",
    ),
    Case(
        "Spectra.from_dict/missing-field",
        "`Spectra.from_dict` with a field missing",
        lambda: blockopt.Spectra.from_dict(_spectra_dict(numel=DELETE)),
        ValueError,
        r"blocks\[0\] lacks 'numel'",
        "fix or regenerate the file",
    ),
    Case(
        "Spectra.from_dict/unpaired-weights",
        "`Spectra.from_dict` with fewer weights than values",
        lambda: blockopt.Spectra.from_dict(_spectra_dict(ritz_weights=[1.0])),
        ValueError,
        r"blocks\[0\] has 3 ritz_values but 1 ritz_weights",
        "fix or regenerate the file",
    ),
]


# -- load_state_dict -----------------------------------------------------------------------------


def train(opt: blockopt.BlockOptimizer, model: nn.Module, start: int, stop: int) -> None:
    for i in range(start, stop):
        idx = torch.arange(i * 4, i * 4 + 16) % len(_Y)
        opt.zero_grad()
        F.cross_entropy(model(_X[idx]), _Y[idx]).backward()
        opt.step()


def source_state() -> dict[str, Any]:
    """A state dict that holds every kind of entry: Adam and SGD state, decisions, spectra (a
    fresh copy at every call)."""
    return copy.deepcopy(_source_state())


@functools.cache
def _source_state() -> dict[str, Any]:
    model = mlp(seed=3)
    # Adam's rate fixed: a step-norm match would put the last digits of this machine's
    # arithmetic into the messages docs/BAD_INPUT.md quotes.
    opt = blockopt.BlockOptimizer(
        model, probe_of(model), lr=0.05, lrs={"adam": 0.001}, probe_every=2, monitor_only=True
    )
    train(opt, model, 0, 4)
    opt.switch("adam")
    train(opt, model, 4, 7)
    state = opt.state_dict()
    assert state["blockopt"]["inner"]["adam"]["state"] and state["blockopt"]["history"]
    return state


def target(seed: int = 0) -> tuple[blockopt.BlockOptimizer, nn.Module]:
    """An optimizer in use (SGD momentum, a probe, its own history) to load into."""
    model = mlp(seed=seed)
    opt = blockopt.BlockOptimizer(model, probe_of(model), lr=0.1, probe_every=3, history=4)
    train(opt, model, 0, 5)
    return opt, model


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A corruption that sets (or, with DELETE, deletes) the entry at a slash-separated path
    below the state dict's 'blockopt' entry."""

    def corrupt(sd: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = sd["blockopt"]
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value(node[key]) if callable(value) else value

    return corrupt


def _first_adam_state(sd: dict[str, Any]) -> dict[str, Any]:
    return next(iter(sd["blockopt"]["inner"]["adam"]["state"].values()))


def truncate_exp_avg(sd: dict[str, Any]) -> None:
    state = _first_adam_state(sd)
    state["exp_avg"] = state["exp_avg"].flatten()[:-1]


def _orphan_state(sd: dict[str, Any]) -> None:
    sd["blockopt"]["inner"]["adam"]["state"][99] = dict(_first_adam_state(sd))


def _extra_group(sd: dict[str, Any]) -> None:
    sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    del sd["blockopt"]["shapes"]  # as in a state saved before shapes were recorded


def _other_width(sd: dict[str, Any]) -> None:
    model = mlp((6, 8, 4))
    other = blockopt.BlockOptimizer(model, probe_of(model), lr=0.05)
    train(other, model, 0, 2)
    sd.clear()
    sd.update(other.state_dict())


def _other_width_without_shapes(sd: dict[str, Any]) -> None:
    _other_width(sd)
    del sd["blockopt"]["shapes"]


def _other_architecture(sd: dict[str, Any]) -> None:
    model = mlp((6, 8, 8, 4))
    sd.clear()
    sd.update(blockopt.BlockOptimizer(model, probe_of(model)).state_dict())


def _two_groups(sd: dict[str, Any]) -> None:
    model = mlp()
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": w}, {"params": b, "lr": 0.01}]
    sd.clear()
    sd.update(blockopt.BlockOptimizer(model, probe_of(model), params=groups).state_dict())


def _plain_sgd(sd: dict[str, Any]) -> None:
    sd.clear()
    sd.update(torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict())


# Corruptions of a valid state dict.
LOAD_CASES: list[LoadCase] = [
    LoadCase(
        "plain-optimizer-state",
        "a plain `torch.optim` state dict",
        _plain_sgd,
        ValueError,
        r"not a blockopt optimizer state dict",
    ),
    LoadCase(
        "other-version",
        "`version` 99",
        _set("version", 99),
        ValueError,
        r"no 'blockopt' entry of version 1",
    ),
    LoadCase(
        "missing-scales",
        "`scales` missing",
        _set("scales", DELETE),
        ValueError,
        r"entry lacks 'scales'",
    ),
    LoadCase(
        "missing-inner",
        "`inner` missing",
        _set("inner", DELETE),
        ValueError,
        r"entry lacks 'inner'",
    ),
    LoadCase(
        "mode-wrong-type",
        "`mode` 2",
        _set("mode", 2),
        ValueError,
        r"its mode 2 is not one of",
    ),
    LoadCase(
        "mode-unknown",
        '`mode` `"rmsprop"`',
        _set("mode", "rmsprop"),
        ValueError,
        r"its mode 'rmsprop' is not one of",
    ),
    LoadCase(
        "scale-string",
        '`scales["adam"] = "1.0"`',
        _set("scales/adam", "1.0"),
        ValueError,
        r"scales\['adam'\] is '1\.0', not a positive finite number",
    ),
    LoadCase(
        "scale-unknown-mode",
        'a scale for mode `"lbfgs"`',
        _set("scales/lbfgs", 1.0),
        ValueError,
        r"'scales' names 'lbfgs', which this optimizer does not have",
    ),
    LoadCase(
        "step-count-string",
        '`step_count` `"7"`',
        _set("step_count", "7"),
        ValueError,
        r"'step_count' is '7', not a non-negative int",
    ),
    LoadCase(
        "step-count-negative",
        "`step_count` -1",
        _set("step_count", -1),
        ValueError,
        r"'step_count' is -1",
    ),
    LoadCase(
        "last-switch-float",
        "`last_switch` 4.5",
        _set("last_switch", 4.5),
        ValueError,
        r"'last_switch' is 4\.5",
    ),
    LoadCase(
        "probe-seconds-negative",
        "`probe_seconds` -1",
        _set("probe_seconds", -1.0),
        ValueError,
        r"'probe_seconds'",
    ),
    LoadCase(
        "lr-searched-string",
        '`lr_searched` `"yes"`',
        _set("lr_searched", "yes"),
        ValueError,
        r"'lr_searched' is 'yes', not True or False",
    ),
    LoadCase(
        "schedule-loss-scale-negative",
        "`schedule` with `loss_scale` -1",
        _set("schedule/loss_scale", -1.0),
        ValueError,
        r"'schedule'\['loss_scale'\] is -1\.0, not a magnitude >= 0",
    ),
    LoadCase(
        "history-missing-field",
        "a decision without `reason`",
        _set("history/0/reason", DELETE),
        ValueError,
        r"history\[0\] is not a record with the fields step, score, old_mode",
    ),
    LoadCase(
        "history-unknown-mode",
        'a decision with `new_mode` `"fast"`',
        _set("history/0/new_mode", "fast"),
        ValueError,
        r"history\[0\]\['new_mode'\] is 'fast', not a valid mode",
    ),
    LoadCase(
        "history-not-a-list",
        "`history` not a list",
        _set("history", "none"),
        ValueError,
        r"'history' is str, not a list",
    ),
    LoadCase(
        "spectra-corrupt",
        'a spectra entry with `ritz_values` `"lots"`',
        _set("spectra/0/1/blocks/0/ritz_values", "lots"),
        ValueError,
        r"spectra\[0\] is not a spectra dict \(blocks\[0\]\['ritz_values'\] is 'lots'",
    ),
    LoadCase(
        "spectra-not-pairs",
        "`spectra` not `[step, dict]` pairs",
        _set("spectra", [[0]]),
        ValueError,
        r"not a list of \[step, spectra\]",
    ),
    LoadCase(
        "faults-wrong-type",
        'a probe fault with `step` `"1"`',
        _set("faults", [{"step": "1", "kind": "probe_error", "message": "x"}]),
        ValueError,
        r"faults\[0\]\['step'\] is '1'",
    ),
    LoadCase(
        "schedule-unknown-key",
        "`schedule` with an unknown key",
        _set("schedule/bogus", 1),
        ValueError,
        r"'schedule' has unknown keys \['bogus'\]",
    ),
    LoadCase(
        "schedule-wrong-type",
        '`schedule` with `next_step` `"10"`',
        _set("schedule/next_step", "10"),
        ValueError,
        r"'schedule'\['next_step'\] is '10'",
    ),
    LoadCase(
        "schedule-invalid",
        "`schedule` with `base` 0",
        _set("schedule/base", 0),
        ValueError,
        r"'schedule' holds invalid settings",
    ),
    LoadCase(
        "schedule-negative-failures",
        "`schedule` with `failures` -1",
        _set("schedule/failures", -1),
        ValueError,
        r"'schedule'\['failures'\] is -1, not a count >= 0",
    ),
    LoadCase(
        "schedule-negative-losses-seen",
        "`schedule` with `losses_seen` -1",
        _set("schedule/losses_seen", -1),
        ValueError,
        r"'schedule'\['losses_seen'\] is -1, not a count >= 0",
    ),
    LoadCase(
        "schedule-zero-interval",
        "`schedule` with `interval` 0",
        _set("schedule/interval", 0),
        ValueError,
        r"'schedule'\['interval'\] is 0, not a step count >= 1",
    ),
    LoadCase(
        "schedule-nan-loss-average",
        "`schedule` with a NaN `loss_avg`",
        _set("schedule/loss_avg", float("nan")),
        ValueError,
        r"'schedule'\['loss_avg'\] is nan, not a finite number",
    ),
    LoadCase(
        "schedule-negative-budget-step",
        "`schedule` with `budget_step` -1",
        _set("schedule/budget_step", -1),
        ValueError,
        r"'schedule'\['budget_step'\] is -1, not a count >= 0",
    ),
    LoadCase(
        "schedule-budget-step-float",
        "`schedule` with `budget_step` 2.5",
        _set("schedule/budget_step", 2.5),
        ValueError,
        r"'schedule'\['budget_step'\] is 2\.5, not of type int",
    ),
    LoadCase(
        "schedule-budget-out-of-range",
        "`schedule` with `budget` 1.5",
        _set("schedule/budget", 1.5),
        ValueError,
        r"'schedule'\['budget'\] is 1\.5, not a share in \(0, 1\) or None",
    ),
    LoadCase(
        "schedule-budget-string",
        '`schedule` with `budget` `"0.03"`',
        _set("schedule/budget", "0.03"),
        ValueError,
        r"'schedule'\['budget'\] is '0\.03', not of type float \| None",
    ),
    LoadCase(
        "schedule-negative-pending-cost",
        "`schedule` with `pending_cost` -2",
        _set("schedule/pending_cost", -2.0),
        ValueError,
        r"'schedule'\['pending_cost'\] is -2\.0, not seconds >= 0 or None",
    ),
    LoadCase(
        "train-seconds-negative",
        "`train_seconds` -1",
        _set("train_seconds", -1.0),
        ValueError,
        r"'train_seconds' is -1\.0, not a non-negative number",
    ),
    LoadCase(
        "schedule-spiked-not-a-bool",
        "`schedule` with `spiked` 1",
        _set("schedule/spiked", 1),
        ValueError,
        r"'schedule'\['spiked'\] is 1, not True or False",
    ),
    LoadCase(
        "block-factor-unknown-block",
        "a block factor for an unknown block",
        _set("block_factors/net.9.weight", 2.0),
        ValueError,
        r"'block_factors' names 'net\.9\.weight'",
    ),
    LoadCase(
        "block-factor-zero",
        "a block factor 0.0",
        _set("block_factors/net.0.weight", 0.0),
        ValueError,
        r"block_factors\['net\.0\.weight'\] is 0\.0",
    ),
    LoadCase(
        "blocks-wrong-type",
        "`blocks` a string",
        _set("blocks", "net"),
        ValueError,
        r"'blocks' is str, not a list",
    ),
    LoadCase(
        "inner-unknown-mode",
        '`inner` naming mode `"lbfgs"`',
        _set("inner/lbfgs", {"state": {}, "param_groups": []}),
        ValueError,
        r"'inner' must map mode names",
    ),
    LoadCase(
        "inner-missing-param-groups",
        "a mode's state without `param_groups`",
        _set("inner/adam/param_groups", DELETE),
        ValueError,
        r"the state of mode 'adam' is not an optimizer state dict",
    ),
    LoadCase(
        "inner-lr-string",
        'a mode\'s `lr` `"fast"`',
        _set("inner/adam/param_groups/0/lr", "fast"),
        ValueError,
        r"the state of mode 'adam': param group 0's 'lr' is 'fast'",
    ),
    LoadCase(
        "inner-betas-wrong",
        "a mode's `betas` `(0.9,)`",
        _set("inner/adam/param_groups/0/betas", (0.9,)),
        ValueError,
        r"param group 0's 'betas' is \(0\.9,\)",
    ),
    LoadCase(
        "inner-truncated-moment",
        "a truncated moment tensor",
        truncate_exp_avg,
        ValueError,
        r"'exp_avg' of a parameter of shape \(\d+(, \d+)?\) is \(\d+,\) \(truncated",
    ),
    LoadCase(
        "inner-state-for-unknown-parameter",
        "state for a parameter id no group lists",
        _orphan_state,
        ValueError,
        r"holds state for parameter id 99, which none of its param groups lists",
    ),
    LoadCase(
        "mismatched-param-groups",
        "another number of param groups, no recorded shapes",
        _extra_group,
        ValueError,
        r"the state of the wrapper does not fit its parameters \(loaded state dict has a "
        r"different number of parameter groups\)",
    ),
    LoadCase(
        "mismatched-group-layout",
        "another number of param groups",
        _two_groups,
        ValueError,
        r"the state dict has 2 param group\(s\) of \[2, 2\] parameters, this optimizer 1",
    ),
    LoadCase(
        "other-model-same-blocks",
        "the checkpoint of another model with the same block names (another width)",
        _other_width,
        ValueError,
        r"saved for parameters of other shapes \(group 0, parameter 0: saved \[8, 6\], here "
        r"\[16, 6\]\): it is the checkpoint of another model",
    ),
    LoadCase(
        "other-model-same-blocks-no-shapes",
        "the same, saved without recorded shapes",
        _other_width_without_shapes,
        ValueError,
        r"'momentum_buffer' of a parameter of shape \(16, 6\) is \(8, 6\)",
    ),
    LoadCase(
        "other-model-other-blocks",
        "the checkpoint of another architecture",
        _other_architecture,
        ValueError,
        r"saved with other blocks than this optimizer has \(6 against 4; .*load it into the "
        r"model it came from",
    ),
]


# -- numbers: numpy scalars, bools, huge ints ----------------------------------------------------


def _built(**kwargs: Any) -> blockopt.BlockOptimizer:
    """``BlockOptimizer(model, probe, **kwargs)``, then one training step."""
    model = mlp()
    opt = blockopt.BlockOptimizer(model, probe_of(model), **kwargs)
    train(opt, model, 0, 1)
    return opt


def _is(expected: Any, read: Callable[[Any], Any]) -> Callable[[Any], None]:
    """A check that ``read(result)`` equals ``expected`` and has its (Python) type."""

    def check(result: Any) -> None:
        value = read(result)
        assert value == expected and type(value) is type(expected), (value, expected)

    return check


BIG = 10**400


def _logger(logdir: Any) -> Any:
    from blockopt.logging.tensorboard import TensorBoardLogger

    return TensorBoardLogger(logdir)


NUMBER_CASES: list[Case] = [
    Case(
        "numpy/thresholds-min-interval-int64",
        "`Thresholds(min_interval=np.int64(3))`",
        lambda: blockopt.Thresholds(min_interval=np.int64(3)),
        None,
        "works: taken as `min_interval=3`",
        check=_is(3, lambda t: t.min_interval),
    ),
    Case(
        "numpy/thresholds-margin-float32",
        "`Thresholds(margin=np.float32(0.5))`",
        lambda: blockopt.Thresholds(margin=np.float32(0.5)),
        None,
        "works: taken as `margin=0.5`",
        check=_is(0.5, lambda t: t.margin),
    ),
    Case(
        "bool/thresholds-margin",
        "`Thresholds(margin=True)`",
        lambda: blockopt.Thresholds(margin=True),
        TypeError,
        r"margin must be a number, got bool True",
        "a number of decades, e.g. `margin=0.25`",
    ),
    Case(
        "numpy/tune-base-lr-float32",
        "`tune_block_lrs(spectra, np.float32(0.5))`",
        lambda: blockopt.tune_block_lrs(_spectra(), np.float32(0.5)),
        None,
        "works: taken as `base_lr=0.5`; the rates are Python floats",
        check=lambda lrs: [type(v) for v in lrs.values()] == [float] * len(lrs) or 1 / 0,
    ),
    Case(
        "huge/tune-base-lr",
        "`tune_block_lrs(spectra, 10**400)`",
        lambda: blockopt.tune_block_lrs(_spectra(), BIG),
        ValueError,
        r"base_lr must be a positive finite number, got an int of 401 digits, too large for",
        "a learning rate that fits a float",
    ),
    Case(
        "bool/tune-base-lr",
        "`tune_block_lrs(spectra, True)`",
        lambda: blockopt.tune_block_lrs(_spectra(), True),
        ValueError,
        r"base_lr must be a positive finite number, got True",
        "a number",
    ),
    Case(
        "TensorBoardLogger/logdir-int",
        "`TensorBoardLogger(logdir=5)` (also `BlockOptimizer(..., logdir=5)`)",
        lambda: _logger(5),
        TypeError,
        r"logdir must be a directory path \(a str or pathlib\.Path\), got int 5",
        "a path, e.g. `logdir='runs/exp1'`",
    ),
    Case(
        "numpy/probe-every-int64",
        "`probe_every=np.int64(5)`",
        lambda: _built(probe_every=np.int64(5)),
        None,
        "works: taken as `probe_every=5`",
        check=_is(5, lambda o: o.schedule.every),
    ),
    Case(
        "numpy/steps-int64",
        "`steps=np.int64(4)`",
        lambda: _built(steps=np.int64(4)),
        None,
        "works: taken as `steps=4`",
        check=_is(4, lambda o: o.steps),
    ),
    Case(
        "numpy/probes-int32",
        "`probes=np.int32(2)`",
        lambda: _built(probes=np.int32(2)),
        None,
        "works: taken as `probes=2`",
        check=_is(2, lambda o: o.probes),
    ),
    Case(
        "numpy/lr-float32",
        "`lr=np.float32(0.1)`",
        lambda: _built(lr=np.float32(0.1)),
        None,
        "works: taken as the float it holds",
        check=_is(float(np.float32(0.1)), lambda o: o.param_groups[0]["lr"]),
    ),
    Case(
        "numpy/tol-float64",
        "`tol=np.float64(0.05)`",
        lambda: _built(tol=np.float64(0.05)),
        None,
        "works: taken as `tol=0.05`",
        check=_is(0.05, lambda o: o.tol),
    ),
    Case(
        "numpy/seed-int64",
        "`seed=np.int64(3)`",
        lambda: _built(seed=np.int64(3)),
        None,
        "works: taken as `seed=3`",
        check=_is(3, lambda o: o.seed),
    ),
    Case(
        "numpy/history-int32",
        "`history=np.int32(5)`",
        lambda: _built(history=np.int32(5)),
        None,
        "works: taken as `history=5`",
        check=_is(5, lambda o: o.history.maxlen),
    ),
    Case(
        "numpy/search-steps-int64",
        "`search_steps=np.int64(3)`",
        lambda: _built(search_steps=np.int64(3)),
        None,
        "works: taken as `search_steps=3`",
        check=_is(3, lambda o: o.search_steps),
    ),
    Case(
        "numpy/guard-steps-int64",
        "`guard_steps=np.int64(5)`",
        lambda: _built(guard_steps=np.int64(5)),
        None,
        "works: taken as `guard_steps=5`",
        check=_is(5, lambda o: o.guard_steps),
    ),
    Case(
        "numpy/momentum-float64",
        "`momentum=np.float64(0.5)`",
        lambda: _built(momentum=np.float64(0.5)),
        None,
        "works: taken as `momentum=0.5`",
        check=_is(0.5, lambda o: o.param_groups[0]["momentum"]),
    ),
    Case(
        "numpy/betas-numpy",
        "`betas=(np.float32(0.5), np.float64(0.99))`",
        lambda: _built(betas=(np.float32(0.5), np.float64(0.99))),
        None,
        "works: taken as `betas=(0.5, 0.99)`",
        check=_is((0.5, 0.99), lambda o: o.param_groups[0]["betas"]),
    ),
    Case(
        "numpy/lrs-float32",
        '`lrs={"adam": np.float32(0.5)}`',
        lambda: _built(lrs={"adam": np.float32(0.5)}),
        None,
        "works: Adam's learning rate is 0.5",
        check=_is(0.5, lambda o: o.mode_lrs["adam"]),
    ),
    Case(
        "numpy/probe-budget-float64",
        "`probe_budget=np.float64(0.05)`",
        lambda: _built(probe_budget=np.float64(0.05)),
        None,
        "works: taken as `probe_budget=0.05`",
        check=_is(0.05, lambda o: o.schedule.budget),
    ),
    Case(
        "numpy/block-spectra-settings",
        "`block_spectra(model, probe, steps=np.int64(3), probes=np.int64(2), seed=np.int64(1))`",
        lambda: blockopt.block_spectra(
            m := mlp(), probe_of(m), steps=np.int64(3), probes=np.int64(2), seed=np.int64(1)
        ),
        None,
        "works: the same spectra as with `steps=3, probes=2, seed=1`",
        check=lambda s: _same_spectra(s, steps=3, probes=2, seed=1),
    ),
    Case(
        "numpy/wrapped-sgd-lr",
        "`wrap(torch.optim.SGD(model.parameters(), lr=np.float32(0.5)), model, probe)`",
        lambda: _wrapped_numpy_lr(),
        None,
        "works: the groups' lr is the float 0.5",
        check=_is(0.5, lambda o: o.param_groups[0]["lr"]),
    ),
    Case(
        "numpy/add-param-group-lr",
        '`opt.add_param_group({"params": [...], "lr": np.float64(0.5), "betas": '
        "(np.float32(0.5), 0.9)})`",
        lambda: _added_numpy_group(),
        None,
        "works: the group's lr is 0.5 and its betas (0.5, 0.9)",
        check=_is(
            (0.5, (0.5, 0.9)), lambda o: (o.param_groups[1]["lr"], o.param_groups[1]["betas"])
        ),
    ),
    Case(
        "setter/seed-string",
        '`opt.seed = "3"`',
        lambda: setattr(_opt(), "seed", "3"),
        TypeError,
        r"seed must be an int, got str '3'",
        "an int",
    ),
    Case(
        "numpy/steps-float64",
        "`steps=np.float64(3.0)`",
        lambda: _opt(steps=np.float64(3.0)),
        ValueError,
        r"steps must be a positive integer, got 3\.0",
        "an int",
    ),
    Case(
        "numpy/probe-every-bool",
        "`probe_every=np.bool_(True)`",
        lambda: _opt(probe_every=np.bool_(True)),
        ValueError,
        r"probe_every must be a positive int or None, got np\.True_",
        "an int",
    ),
    Case(
        "huge/lr",
        "`lr=10**400`",
        lambda: _opt(lr=BIG),
        ValueError,
        r"lr must be a positive finite number, got an int of 401 digits, too large for a float",
        "a float such as 0.1",
    ),
    Case(
        "huge/momentum",
        "`momentum=10**400`",
        lambda: _opt(momentum=BIG),
        ValueError,
        r"momentum must be a non-negative finite number, got an int of 401 digits",
        "`0 <= momentum < 1`",
    ),
    Case(
        "huge/tol",
        "`tol=10**400`",
        lambda: _opt(tol=BIG),
        ValueError,
        r"tol must be None or a number in \(0, 1\), e\.g\. 0\.03, got an int of 401 digits",
        "`None` or `0 < tol < 1`",
    ),
    Case(
        "huge/max-factor",
        "`max_factor=10**400`",
        lambda: _opt(max_factor=BIG),
        ValueError,
        r"max_factor must be a finite number >= 1, got an int of 401 digits",
        "a finite `max_factor >= 1`",
    ),
    Case(
        "huge/lrs",
        '`lrs={"adam": 10**400}`',
        lambda: _opt(lrs={"adam": BIG}),
        ValueError,
        r"lrs\['adam'\] must be a positive finite number, got an int of 401 digits",
        "a float such as 1e-3",
    ),
    Case(
        "bool/lr",
        "`lr=True`",
        lambda: _opt(lr=True),
        TypeError,
        r"lr must be a number, got bool True",
        "a number",
    ),
    Case(
        "bool/momentum",
        "`momentum=True`",
        lambda: _opt(momentum=True),
        ValueError,
        r"momentum must be a non-negative finite number, got True",
        "a number",
    ),
    Case(
        "bool/steps",
        "`steps=True`",
        lambda: _opt(steps=True),
        ValueError,
        r"steps must be a positive integer, got True",
        "an int",
    ),
    Case(
        "bool/tol",
        "`tol=True`",
        lambda: _opt(tol=True),
        TypeError,
        r"tol must be None or a number in \(0, 1\), got bool",
        "a number",
    ),
    Case(
        "bool/seed",
        "`seed=True`",
        lambda: _opt(seed=True),
        TypeError,
        r"seed must be an int, got bool True",
        "an int",
    ),
    Case(
        "bool/betas",
        "`betas=(0.9, True)`",
        lambda: _opt(betas=(0.9, True)),
        ValueError,
        r"betas must be two numbers in \[0, 1\), e\.g\. \(0\.9, 0\.999\), got \(0\.9, True\)",
        "two numbers",
    ),
    Case(
        "nan/lr",
        '`lr=float("nan")`',
        lambda: _opt(lr=float("nan")),
        ValueError,
        r"lr must be a positive finite number, got nan",
        "a finite number",
    ),
    Case(
        "tensor/lr",
        "`lr=torch.tensor(0.1)`",
        lambda: _opt(lr=torch.tensor(0.1)),
        TypeError,
        r"lr must be a number, got Tensor",
        "`lr=0.1`, or `float(t)`",
    ),
]


def _wrapped_numpy_lr() -> blockopt.BlockOptimizer:
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=np.float32(0.5), momentum=0.9)
    opt = blockopt.wrap(sgd, model, probe_of(model))
    train(opt, model, 0, 1)
    return opt


def _split_mlp() -> tuple[blockopt.BlockOptimizer, nn.Module]:
    """An optimizer over the first layer only, to add the rest to."""
    model = mlp()
    first = list(model.net[0].parameters())
    return blockopt.BlockOptimizer(model, probe_of(model), params=first), model


def _added_numpy_group() -> blockopt.BlockOptimizer:
    opt, model = _split_mlp()
    group = {"params": list(model.net[2].parameters()), "lr": np.float64(0.5)}
    opt.add_param_group({**group, "betas": (np.float32(0.5), 0.9)})
    train(opt, model, 0, 1)
    return opt


def _added_foreign_group() -> None:
    opt, _ = _split_mlp()
    try:
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})
    finally:
        assert len(opt.param_groups) == 1  # nothing was added


def _same_spectra(spectra: blockopt.Spectra, **settings: Any) -> None:
    model = mlp()
    expected = blockopt.block_spectra(model, probe_of(model), **settings)
    assert spectra.keys() == expected.keys()
    for name, s in expected.items():
        assert spectra[name].ritz_values == s.ritz_values, name


# -- models blockopt cannot probe or train -----------------------------------------------------


class _Embedder(nn.Module):
    """Token embeddings (sparse or dense, or a bag) into a linear head."""

    def __init__(self, sparse: bool = True, bag: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        kind = nn.EmbeddingBag if bag else nn.Embedding
        self.tokens = kind(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.tokens(x) if isinstance(self.tokens, nn.Embedding) else self.tokens(x[None])
        return self.head(z).pow(2).mean()


_TOKENS = torch.arange(6)


def _complex() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Complex modules are a new feature"
        return nn.Linear(3, 2).to(torch.complex64)


def _complex_loss(model: nn.Module) -> Callable[[], torch.Tensor]:
    x = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    return lambda: model(x).abs().pow(2).mean()


def _sparse_opt(bag: bool = False) -> blockopt.BlockOptimizer:
    model = _Embedder(bag=bag)
    return blockopt.BlockOptimizer(model, lambda: model(_TOKENS))


SPARSE_MESSAGE = (
    r"parameter 'tokens\.weight' belongs to tokens, an embedding with sparse=True: its sparse "
    r"gradients have no Hessian-vector products.*build it with sparse=False"
)
COMPLEX_MESSAGE = (
    r"parameter 'weight' is complex64: blockopt probes the spectra of real Hessians.*"
    r"torch\.view_as_real"
)


def _replaced_layer(action: str) -> Any:
    """Train two steps, replace the first layer, then step or probe: refused, and the model's
    and optimizer's values are as they were."""
    model = mlp()
    opt = blockopt.BlockOptimizer(model, probe_of(model), probe_every=1, steps=3)
    train(opt, model, 0, 2)
    torch.manual_seed(5)
    model.net[0] = nn.Linear(6, 16)
    opt.zero_grad()
    F.cross_entropy(model(_X), _Y).backward()
    with _unchanged(opt, model):
        return opt.probe_now() if action == "probe_now" else opt.step()


def _frozen_after_wrapping() -> blockopt.BlockOptimizer:
    model = mlp()
    opt = blockopt.BlockOptimizer(model, probe_of(model), probe_every=1, steps=3)
    train(opt, model, 0, 2)
    model.net[0].weight.requires_grad_(False)
    frozen = model.net[0].weight.detach().clone()
    train(opt, model, 2, 4)
    assert torch.equal(model.net[0].weight, frozen)
    return opt


MODEL_CASES: list[Case] = [
    Case(
        "sparse/partition",
        "`partition(model)` with an `nn.Embedding(..., sparse=True)`",
        lambda: blockopt.partition(_Embedder()),
        ValueError,
        SPARSE_MESSAGE,
        "`sparse=False` (the default), or freeze the embedding",
    ),
    Case(
        "sparse/block-spectra",
        "`block_spectra(model, probe)` with a sparse embedding",
        lambda: blockopt.block_spectra(m := _Embedder(), lambda: m(_TOKENS)),
        ValueError,
        SPARSE_MESSAGE,
        "as above",
    ),
    Case(
        "sparse/BlockOptimizer",
        "`BlockOptimizer(model, probe)` with a sparse embedding",
        _sparse_opt,
        ValueError,
        SPARSE_MESSAGE,
        "as above",
    ),
    Case(
        "sparse/embedding-bag",
        "`BlockOptimizer(model, probe)` with an `nn.EmbeddingBag(..., sparse=True)`",
        lambda: _sparse_opt(bag=True),
        ValueError,
        SPARSE_MESSAGE,
        "as above",
    ),
    Case(
        "sparse/dense-embedding",
        "`BlockOptimizer(model, probe)` with a dense `nn.Embedding` (the default)",
        lambda: _built_on(_Embedder(sparse=False)),
        None,
        "works: probes and trains the embedding",
        check=lambda o: "tokens.weight" in {b.name for b in o.blocks},
    ),
    Case(
        "complex/partition",
        "`partition(model)` with complex64 parameters",
        lambda: blockopt.partition(_complex()),
        TypeError,
        COMPLEX_MESSAGE,
        "real parameters (`torch.view_as_real`, `view_as_complex` in `forward`)",
    ),
    Case(
        "complex/block-spectra",
        "`block_spectra(model, probe)` with complex64 parameters",
        lambda: blockopt.block_spectra(m := _complex(), _complex_loss(m)),
        TypeError,
        COMPLEX_MESSAGE,
        "as above",
    ),
    Case(
        "complex/BlockOptimizer",
        "`BlockOptimizer(model, probe)` with complex64 parameters",
        lambda: blockopt.BlockOptimizer(m := _complex(), _complex_loss(m)),
        TypeError,
        COMPLEX_MESSAGE,
        "as above",
    ),
    Case(
        "optimizers/lbfgs-by-name",
        '`optimizers={"sgd": "LBFGS"}`',
        lambda: _opt(optimizers={"sgd": "LBFGS"}),
        ValueError,
        r"LBFGS cannot be a blockopt mode: LBFGS re-evaluates the loss several times per step "
        r"through a closure.*use torch\.optim\.LBFGS directly",
        "a first-order class, or `torch.optim.LBFGS` on its own",
    ),
    Case(
        "optimizers/lbfgs-class",
        '`optimizers={"adam": torch.optim.LBFGS}`',
        lambda: _opt(optimizers={"adam": torch.optim.LBFGS}),
        ValueError,
        r"LBFGS cannot be a blockopt mode",
        "as above",
    ),
    Case(
        "optimizers/sparse-adam",
        '`optimizers={"adam": "SparseAdam"}`',
        lambda: _opt(optimizers={"adam": "SparseAdam"}),
        ValueError,
        r"SparseAdam cannot be a blockopt mode: SparseAdam takes only sparse gradients.*use "
        r"AdamW \(the default\) or Adam",
        "`AdamW` or `Adam`",
    ),
    Case(
        "changed/replaced-layer-step",
        "a layer replaced after wrapping (`model.net[0] = nn.Linear(...)`), then `step()`",
        lambda: _replaced_layer("step"),
        RuntimeError,
        r"the model changed after the optimizer was built: 2 of the optimizer's parameters "
        r"\(shapes \(16, 6\), \(16,\)\) are no longer parameters of the MLP \(a layer was "
        r"replaced or deleted\).*build the optimizer again",
        "build the optimizer again over the model as it is now; nothing was changed",
    ),
    Case(
        "changed/replaced-layer-probe-now",
        "a layer replaced after wrapping, then `probe_now()`",
        lambda: _replaced_layer("probe_now"),
        RuntimeError,
        r"the model changed after the optimizer was built",
        "as above",
    ),
    Case(
        "changed/add-param-group-foreign",
        '`opt.add_param_group({"params": [nn.Parameter(...)]})` with a parameter the model '
        "does not have",
        _added_foreign_group,
        ValueError,
        r"param group 1: 1 of its parameters \(shapes \(3,\)\) are not parameters of the MLP "
        r"this optimizer probes; add the layer to the model first",
        "add the layer to the model, then its parameters; nothing was added",
    ),
    Case(
        "meta/block-spectra",
        "`block_spectra(model, probe)` with parameters on the meta device",
        lambda: blockopt.block_spectra(
            m := nn.Linear(3, 2, device="meta"), lambda: m(torch.ones(1, 3, device="meta")).sum()
        ),
        ValueError,
        r"parameter 'weight' is on the meta device and holds no values to probe; materialise",
        "`model.to_empty(device=...)`, then load the weights",
    ),
    Case(
        "probe/takes-arguments",
        "`block_spectra(model, lambda batch: ...)`: a probe that takes an argument",
        lambda: blockopt.block_spectra(m := mlp(), lambda batch: F.cross_entropy(m(batch), _Y)),
        TypeError,
        r"the probe takes arguments \(batch\), but blockopt calls it with none; make it a "
        r"zero-argument closure",
        "close over the batch: `lambda: loss_fn(model(x), y)`",
    ),
    Case(
        "changed/frozen-after-wrapping",
        "a parameter frozen after wrapping (`requires_grad_(False)`)",
        _frozen_after_wrapping,
        None,
        "works: later probes re-partition without it, and it stays as it was",
        check=lambda o: [b.name for b in o.blocks] == ["net.0.bias", "net.2.weight", "net.2.bias"],
    ),
]


def _built_on(model: nn.Module) -> blockopt.BlockOptimizer:
    opt = blockopt.BlockOptimizer(model, lambda: model(_TOKENS), probe_every=1, steps=3)
    for _ in range(2):
        opt.zero_grad()
        model(_TOKENS).backward()
        opt.step()
    return opt


# -- probe closures that break the contract, and checkpoints during probes ---------------------


@contextlib.contextmanager
def _unchanged(opt: blockopt.BlockOptimizer, model: nn.Module) -> Iterator[None]:
    """Assert, however the body ends, that the model's parameters (values, ``requires_grad``,
    which they are), buffers and the optimizer's state dict are as before it."""
    params = [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    buffers = [b.clone() for b in model.buffers()]
    state = copy.deepcopy(opt.state_dict())
    state["blockopt"].pop("train_seconds")
    try:
        yield
    finally:
        now = list(model.named_parameters())
        assert [(n, id(p)) for n, p in now] == [(n, id(p)) for n, p, _, _ in params]
        for _, p, value, flag in params:
            assert torch.equal(p, value) and p.requires_grad == flag
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
        after = opt.state_dict()
        after["blockopt"].pop("train_seconds")
        assert_same(state, after)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """``a == b`` for nested dicts, lists and tensors (NaN equals NaN); an optimizer must be
    the very same object."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.optim.Optimizer):
        assert a is b, where
    else:
        assert a == b or (a != a and b != b), where


class _BNNet(nn.Module):
    """A linear layer, BatchNorm and a head: probes and trials move BatchNorm statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.fc(x))))


def _misbehaving(act: Callable[[nn.Module, int], None], **kwargs: Any) -> Any:
    """Train 3 steps with a probe that calls ``act(model, call)`` at every call; returns the
    optimizer, checking that training went on exactly as without a probe (every probe failed
    and was discarded, with the model put back as it was)."""
    runs = []
    for misbehave in (False, True):
        model = _BNNet()
        calls = [0]

        def probe(model: nn.Module = model, calls: list[int] = calls, on: bool = misbehave):
            calls[0] += 1
            if on:
                act(model, calls[0])
            return F.cross_entropy(model(_X), _Y)

        # the reference run does not probe: a run whose probes all fail trains just like it
        opt = blockopt.BlockOptimizer(
            model, probe if misbehave else None, probe_every=1, steps=3, **kwargs
        )
        for i in range(3):
            opt.zero_grad()
            F.cross_entropy(model(_X[i:]), _Y[i:]).backward()
            opt.step()
        runs.append((opt, model))
    (_, clean), (opt, model) = runs
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in clean.named_parameters()]
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q) and p.requires_grad and q.requires_grad
    return opt


def _freeze(model: nn.Module, call: int) -> None:
    model.fc.weight.requires_grad_(False)


def _edit(model: nn.Module, call: int) -> None:
    with torch.no_grad():
        model.head.bias.add_(1.0)


def _add_parameter(model: nn.Module, call: int) -> None:
    model.head.register_parameter("extra", nn.Parameter(torch.zeros(4)))


def _replace_parameter(model: nn.Module, call: int) -> None:
    model.head.weight = nn.Parameter(torch.zeros(4, 8))


def _drop_bias(model: nn.Module, call: int) -> None:
    model.fc.bias = None


def _default_dtype(model: nn.Module, call: int) -> None:
    torch.set_default_dtype(torch.float64)


def _interrupted() -> None:
    """A probe interrupted by Ctrl-C: the KeyboardInterrupt reaches the training loop (it is
    no probe fault), the model and optimizer are as before the step, and training goes on."""
    model = _BNNet()
    interrupt = [True]

    def probe() -> torch.Tensor:
        if interrupt[0]:
            interrupt[0] = False
            raise KeyboardInterrupt
        return F.cross_entropy(model(_X), _Y)

    opt = blockopt.BlockOptimizer(model, probe, probe_every=1, steps=3)
    opt.zero_grad()
    F.cross_entropy(model(_X), _Y).backward()
    try:
        with _unchanged(opt, model):
            opt.step()
    finally:
        assert not opt.faults
        opt.step()  # goes on: this step probes and trains
        assert opt.step_count == 1 and len(opt.spectra_history) == 1


def _faults_are(kind: str) -> Callable[[blockopt.BlockOptimizer], None]:
    def check(opt: blockopt.BlockOptimizer) -> None:
        assert [f.kind for f in opt.faults] == [kind] * len(opt.faults) and opt.faults

    return check


def _discarded(
    key: str,
    what: str,
    act: Callable[[nn.Module, int], None],
    message: str,
    fix: str,
    kind: str = "probe_error",
    also: Callable[[], None] | None = None,
) -> Case:
    """A probe closure that calls ``act`` inside ``step()``: every probe is discarded with a
    ``ProbeFaultWarning`` matching ``message`` and recorded as a fault of ``kind``, training
    goes on as without a probe (:func:`_misbehaving`), and ``also()`` passes."""
    faults = _faults_are(kind)

    def check(opt: blockopt.BlockOptimizer) -> None:
        faults(opt)
        if also is not None:
            also()

    return Case(
        key,
        what,
        lambda: _misbehaving(act),
        None,
        message,
        fix,
        check=check,
        warns=ProbeFaultWarning,
    )


def _default_dtype_restored() -> None:
    assert torch.get_default_dtype() == torch.float32


def _spectra_with(act: Callable[[nn.Module, int], None]) -> Any:
    model = _BNNet()

    def probe() -> torch.Tensor:
        act(model, 0)
        return F.cross_entropy(model(_X), _Y)

    params = [(p, p.detach().clone()) for p in model.parameters()]
    try:
        return blockopt.block_spectra(model, probe, steps=3)
    finally:
        for p, value in params:
            assert torch.equal(p, value) and p.requires_grad


def _raise_oom(message: str) -> Callable[[nn.Module, int], None]:
    def act(model: nn.Module, call: int) -> None:
        raise RuntimeError(message)

    return act


CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"
)
CONTRACT = r"the probe closure changed the model's parameters: it "


def _checkpoint_in_probe(during: str) -> Any:
    """``opt.state_dict()`` called from inside the probe closure (``during="probe"``), from
    the closure's calls in learning-rate trials only (``"trial"``), or from a signal handler
    that a signal raised inside the probe runs (``"signal"``): refused, nothing changed."""
    model = _BNNet()
    calls = [0]
    armed = [False]
    holder: dict[str, blockopt.BlockOptimizer] = {}

    def handler(signum: int, frame: Any) -> None:
        holder["opt"].state_dict()

    def probe() -> torch.Tensor:
        calls[0] += 1
        if armed[0] and (during == "probe" or (during == "trial" and calls[0] > 1)):
            holder["opt"].state_dict()
        if armed[0] and during == "signal":
            os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler right here
        return F.cross_entropy(model(_X), _Y)

    opt = blockopt.BlockOptimizer(
        model, probe, probe_every=1, steps=3, thresholds=_SWITCH_TO_ADAM, lr_search=True
    )
    holder["opt"] = opt
    if during != "trial":
        train(opt, model, 0, 1)
    armed[0] = True
    old = signal.signal(signal.SIGUSR1, handler) if during == "signal" else None
    opt.zero_grad()
    F.cross_entropy(model(_X), _Y).backward()
    try:
        with _unchanged(opt, model):
            opt.step()
    finally:
        armed[0] = False
        if old is not None:
            signal.signal(signal.SIGUSR1, old)
    return opt


_SWITCH_TO_ADAM = blockopt.Thresholds(sgd_below=0.0, adam_above=0.0, margin=0.0, min_interval=0)
CHECKPOINT_MESSAGE = (
    r"state_dict\(\) was called while a probe or a learning-rate trial runs \(from a signal "
    r"handler, or from inside the probe closure\): the model holds the trial's weights and "
    r"BatchNorm statistics.*set a flag and save after opt\.step\(\) returns"
)

PROBE_CASES: list[Case] = [
    _discarded(
        "contract/requires-grad-flipped",
        "a probe closure that calls `requires_grad_(False)` on a parameter",
        _freeze,
        CONTRACT + r"set fc\.weight\.requires_grad to False \(put back\)",
        "compute only the loss in the probe; the flag is put back and the probe discarded",
    ),
    _discarded(
        "contract/weight-edited",
        "a probe closure that edits a weight under `torch.no_grad()`",
        _edit,
        CONTRACT + r"changed the values of 'head\.bias' \(put back\)",
        "as above; the values are put back",
    ),
    _discarded(
        "contract/parameter-added",
        "a probe closure that registers a new parameter",
        _add_parameter,
        CONTRACT + r"added parameter 'head\.extra' \(removed again\)",
        "as above; the parameter is removed again",
    ),
    _discarded(
        "contract/parameter-replaced",
        "a probe closure that replaces a parameter (`model.head.weight = nn.Parameter(...)`)",
        _replace_parameter,
        CONTRACT + r"replaced parameter 'head\.weight' \(the original put back\)",
        "as above; the original is put back",
    ),
    _discarded(
        "contract/parameter-removed",
        "a probe closure that sets a bias to `None`",
        _drop_bias,
        CONTRACT + r"replaced parameter 'fc\.bias' \(the original put back\)",
        "as above",
    ),
    _discarded(
        "contract/default-dtype",
        "a probe closure that calls `torch.set_default_dtype(torch.float64)`",
        _default_dtype,
        CONTRACT + r"set the default dtype to torch\.float64 \(put back to torch\.float32\)",
        "as above; the default dtype is put back",
        also=_default_dtype_restored,
    ),
    Case(
        "faults/keyboard-interrupt",
        "Ctrl-C (`KeyboardInterrupt`) while the probe runs",
        _interrupted,
        KeyboardInterrupt,
        "^$",
        "none needed: it reaches the training loop, nothing was changed, training can go on",
    ),
    Case(
        "contract/block-spectra-requires-grad",
        "`block_spectra(model, probe)`, the probe calls `requires_grad_(False)`",
        lambda: _spectra_with(_freeze),
        ProbeContractError,
        CONTRACT + r"set fc\.weight\.requires_grad to False \(put back\)\. A probe may only "
        r"compute a loss through the model",
        "compute only the loss in the probe",
    ),
    Case(
        "contract/block-spectra-edit",
        "`block_spectra(model, probe)`, the probe edits a weight under `torch.no_grad()`",
        lambda: _spectra_with(_edit),
        ProbeContractError,
        CONTRACT + r"changed the values of 'head\.bias' \(put back\)",
        "as above",
    ),
    _discarded(
        "faults/cpu-out-of-memory",
        "a probe that fails with torch's CPU allocator error (`DefaultCPUAllocator: can't "
        "allocate memory`, a `RuntimeError`)",
        _raise_oom(CPU_OOM),
        r"the probe ran out of memory .*can't allocate memory.*Fix: probe a smaller batch \(in "
        r"the probe closure\), cut the largest blocks smaller",
        "a smaller probe batch or smaller blocks; training goes on",
        kind="out_of_memory",
    ),
    _discarded(
        "faults/out-of-memory-runtime-error",
        'a probe that raises `RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")`',
        _raise_oom("CUDA out of memory. Tried to allocate 2.00 GiB"),
        r"the probe ran out of memory \(RuntimeError: CUDA out of memory",
        "as above",
        kind="out_of_memory",
    ),
    Case(
        "checkpoint/state-dict-in-probe",
        "`opt.state_dict()` called from inside the probe closure",
        lambda: _checkpoint_in_probe("probe"),
        CheckpointDuringProbeError,
        CHECKPOINT_MESSAGE,
        "checkpoint between steps; nothing was changed",
    ),
    Case(
        "checkpoint/state-dict-in-trial",
        "`opt.state_dict()` called while a learning-rate trial runs",
        lambda: _checkpoint_in_probe("trial"),
        CheckpointDuringProbeError,
        CHECKPOINT_MESSAGE,
        "as above",
    ),
    Case(
        "checkpoint/signal-handler-during-probe",
        "`opt.state_dict()` from a signal handler (`SIGUSR1`) run during a probe",
        lambda: _checkpoint_in_probe("signal"),
        CheckpointDuringProbeError,
        CHECKPOINT_MESSAGE,
        "in the handler, set a flag; save after `opt.step()` returns",
    ),
]


# -- more state dicts ----------------------------------------------------------------------------


def _empty_active_state(sd: dict[str, Any]) -> None:
    sd["blockopt"]["inner"]["adam"]["state"] = {}


def _one_state_removed(sd: dict[str, Any]) -> None:
    state = sd["blockopt"]["inner"]["adam"]["state"]
    del state[next(iter(state))]


MORE_LOAD_CASES: list[LoadCase] = [
    LoadCase(
        "inner-active-state-removed",
        "the active mode's state emptied (`inner['adam']['state'] = {}`)",
        _empty_active_state,
        ValueError,
        r"the state of its active mode 'adam' holds state for 0 parameter\(s\), but it was "
        r"saved with state for 4: state was removed from it, and its moments would silently "
        r"restart",
    ),
    LoadCase(
        "inner-active-state-one-removed",
        "one parameter's state removed from the active mode's",
        _one_state_removed,
        ValueError,
        r"holds state for 3 parameter\(s\), but it was saved with state for 4",
    ),
    LoadCase(
        "active-state-string",
        '`active_state` `"4"`',
        _set("active_state", "4"),
        ValueError,
        r"'active_state' is '4', not a count >= 0",
    ),
    LoadCase(
        "fault-kind-unknown",
        'a probe fault of kind `"gremlins"`',
        _set("faults", [{"step": 1, "kind": "gremlins", "message": "x"}]),
        ValueError,
        r"faults\[0\]\['kind'\] is 'gremlins', not a valid fault kind \('non_finite'",
    ),
    LoadCase(
        "history-negative-step",
        "a decision at step -5",
        _set("history/0/step", -5),
        ValueError,
        r"history\[0\]\['step'\] is -5, not a valid step >= 0",
    ),
]


def _without_active_count() -> blockopt.BlockOptimizer:
    sd = source_state()
    del sd["blockopt"]["active_state"]  # as saved before the count was recorded
    opt, _ = target()
    opt.load_state_dict(sd)
    return opt


def _saved_right_after_a_switch() -> blockopt.BlockOptimizer:
    """SGD without momentum, switched by hand to Adam and saved before Adam's first step: its
    state is empty, and that is what was saved, so it loads."""
    model = mlp()
    opt = blockopt.BlockOptimizer(model, probe_of(model), momentum=0.0)
    train(opt, model, 0, 2)
    opt.switch("adam")
    sd = opt.state_dict()
    fresh = blockopt.BlockOptimizer(model, probe_of(model), momentum=0.0)
    fresh.load_state_dict(sd)
    return fresh


STATE_CASES: list[Case] = [
    Case(
        "load/without-active-state-count",
        "a state saved before `active_state` was recorded",
        _without_active_count,
        None,
        "works: loads, unchecked",
        check=lambda o: o.mode == "adam" and len(o.active_optimizer.state) == 4,
    ),
    Case(
        "load/empty-state-saved-empty",
        "a state saved right after a switch to Adam from SGD without momentum (no moments yet)",
        _saved_right_after_a_switch,
        None,
        "works: loads (its active mode had no state when saved)",
        check=lambda o: o.mode == "adam" and not o.active_optimizer.state,
    ),
]


# -- block_spectra's probe and arguments (tests/test_probe_errors.py) ---------------------------

_LINEAR = nn.Linear(3, 2)
_X3 = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))


def _spectra_of(probe: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: blockopt.block_spectra(_LINEAR, probe, **kwargs)


def _linear_loss() -> torch.Tensor:
    return _LINEAR(_X3).sum()


PROBE_ERROR_CASES: list[Case] = [
    Case(
        "probe/returns-a-batch",
        "the probe returns the model's output, not a loss",
        _spectra_of(lambda: _LINEAR(_X3)),
        ValueError,
        r"shape \(4, 2\).*scalar",
        "reduce it to the loss",
    ),
    Case(
        "probe/returns-item",
        "the probe returns `loss.item()`",
        _spectra_of(lambda: _LINEAR(_X3).sum().item()),
        TypeError,
        r"not a tensor.*loss\.item",
        "return the loss tensor",
    ),
    Case(
        "probe/returns-detached",
        "the probe returns `loss.detach()`",
        _spectra_of(lambda: _LINEAR(_X3).sum().detach()),
        ValueError,
        "does not depend on any trainable",
        "return the loss, not detached",
    ),
    Case(
        "probe/returns-a-leaf",
        "the probe returns a fresh tensor that requires grad",
        _spectra_of(lambda: torch.tensor(1.0, requires_grad=True)),
        ValueError,
        "does not depend",
        "compute the loss through the model",
    ),
    Case(
        "probe/nan-loss",
        "the probe's loss is NaN",
        _spectra_of(lambda: _LINEAR(_X3).sum() * float("nan")),
        FloatingPointError,
        "NaN/Inf",
        "check the batch and the parameters",
    ),
    Case(
        "probe/not-callable",
        'the probe is a string (`"loss"`)',
        _spectra_of("loss"),
        TypeError,
        "zero-argument callable",
        "a zero-argument callable",
    ),
    Case(
        "block_spectra/steps-0",
        "`block_spectra(..., steps=0)`",
        _spectra_of(_linear_loss, steps=0),
        ValueError,
        "steps must be a positive",
        "`steps >= 1`",
    ),
    Case(
        "block_spectra/probes-negative",
        "`block_spectra(..., probes=-1)`",
        _spectra_of(_linear_loss, probes=-1),
        ValueError,
        "probes must be a positive",
        "`probes >= 1`",
    ),
    Case(
        "block_spectra/steps-bool",
        "`block_spectra(..., steps=True)`",
        _spectra_of(_linear_loss, steps=True),
        ValueError,
        "steps must be a positive",
        "an int",
    ),
    Case(
        "block_spectra/seed-float",
        "`block_spectra(..., seed=1.5)`",
        _spectra_of(_linear_loss, seed=1.5),
        TypeError,
        "seed must be an int",
        "an int",
    ),
    Case(
        "block_spectra/no-blocks",
        "`block_spectra(..., blocks=[])`",
        _spectra_of(_linear_loss, blocks=[]),
        ValueError,
        "no blocks to probe",
        "`blocks=None` for all, or a list from `partition()`",
    ),
    Case(
        "block_spectra/blocks-of-names",
        '`block_spectra(..., blocks=["weight"])`',
        _spectra_of(_linear_loss, blocks=["weight"]),
        TypeError,
        "Block objects",
        "`Block`s from `partition()`",
    ),
    Case(
        "block_spectra/unknown-strategy",
        '`block_spectra(..., blocks="rows")`',
        _spectra_of(_linear_loss, blocks="rows"),
        ValueError,
        "unknown partition strategy",
        "a known strategy",
    ),
]


# -- docs/BAD_INPUT.md ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """A table of docs/BAD_INPUT.md: its title, the prose before and after it, its cases and the
    fix of the cases that name none."""

    title: str
    intro: str
    cases: list[Any]
    fix: str = ""
    after: str = ""


INTRO = """
# Bad input

Every wrong argument to blockopt's public API raises at once, with an exception that names the
problem and the fix; nothing fails later, far from its cause, and nothing is half-changed. Each
row below is a case of the tables in `tests/bad_input_cases.py` (the probe faults':
`FAULTS` in `tests/test_probe_faults.py`; the command line's: `BAD` in `tests/test_cli.py`),
which the tests assert: the exception type and the message, or the result (and the warning) of
a call that must work. This file is generated from those tables by running every case, so each
row shows what the call actually raised; do not edit it by hand, but regenerate it:

```bash
python scripts/bad_input_doc.py
```

(`tests/test_bad_input_doc.py`, and for the command-line table `tests/test_cli.py`, fail when
this file differs from what the script writes.) To run the cases:

```bash
OMP_NUM_THREADS=1 python -m pytest -q tests/test_bad_input.py tests/test_bad_input_more.py \\
    tests/test_probe_errors.py tests/test_probe_faults.py tests/test_cli.py
```

Messages are quoted from their start; `…` marks where they go on.
"""

LOAD_INTRO = """
`load_state_dict` checks everything and builds every piece (the wrapper's param groups on a
scratch optimizer, each mode's optimizer, the histories, the probe schedule) before it changes
anything; then it installs them in steps that cannot fail. A state dict that raises leaves the
optimizer exactly as it was: mode, learning-rate factors, param-group learning rates, every mode's
optimizer and state tensors, step count, histories and schedule, and training goes on bitwise as
if the call had not been made (the test checks all of these for every row).

Most messages read `cannot load this state dict: <problem>. Nothing was changed; load a state saved
by BlockOptimizer.state_dict() into an optimizer built the same way over the same model`; the
table gives the problem.
"""

LOAD_FIX = "load the state this optimizer's run saved, into an optimizer built the same way"

LOAD_AFTER = """
A state saved before the probe budget existed (no `budget`, `budget_step` or `pending_cost` in
its `schedule`, no `train_seconds`) is no bad input: it loads with this optimizer's
`probe_budget`, no probe deferred by it yet, and its training time taken as what its probe time
would have kept within that budget.
"""

OUTRO = """
## Checkpoints are read with `weights_only=True`

`BlockOptimizer.state_dict()` holds only dicts, lists, tuples, strings, ints, floats, bools,
`None` and tensors, so a checkpoint loads without unpickling arbitrary objects:

```python
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "ckpt.pt")
...
ckpt = torch.load("ckpt.pt", weights_only=True)
model.load_state_dict(ckpt["model"])
opt.load_state_dict(ckpt["opt"])
```

`tests/test_bad_input.py` checks those types, the `torch.save` / `torch.load(weights_only=True)`
round trip (with SGD, block SGD, AdamW and a `torch_optimizer` class, decisions, spectra and a
probe fault in the state) and that the package itself never uses `pickle`, `marshal`, `eval`,
`exec`, or `torch.load` without `weights_only=True`. Spectra files are JSON, read by
`Spectra.from_dict`, which checks every field.

## Command line

The CLI's bad input is tested in `tests/test_cli.py` (its `BAD` table); each case is one line on
stderr and exit status 2, with no traceback, and leaves no file behind. `{dir}` is the case's
own folder, `{ro}` a read-only one, `{file}` a regular file and `{factories}` the folder of the
test factories (`tinyfactory.py`, modules that fail on import):
"""

CLI_AFTER = """
Outputs (`probe --json`, `probe --plot`, `tune --out`) are written to what their path names
(`tests/test_cli.py` checks each for all three options): a regular file atomically, so that it
is whole or absent, keeping its permissions; a symbolic link to a file, a chain of links, or a
link to a file not there yet: the file it names, atomically, the link left a link; a FIFO, or
a link to one, and whatever lies under `/dev` or `/proc` or a link leads to there
(`/dev/stdout`, `/proc/self/fd/1`): written into as it is, never replaced by a regular file;
`-`: standard output, with the report on standard error (`--json -` with `--plot -` is
refused). Writing an output that fails (a full disk) is one error line, exit status 2, and no
temporary file is left.
"""

NUMBERS_INTRO = """
Every int or float argument takes Python numbers and numpy scalars alike (`np.int64(5)` is 5,
`np.float32(0.1)` the float it holds), never a bool (`True` is no learning rate), and an int
too large for a float (`10**400`) is refused naming its size, not with a raw `OverflowError`.
"""

MODELS_INTRO = """
Parameters that Hessian-vector products or blockopt's modes cannot handle are refused where the
model is first handed over (`partition`, `block_spectra`, `BlockOptimizer`, `wrap`), naming the
parameter; so are mode classes that cannot serve. A model changed after wrapping is caught at the
next probe: a replaced or deleted layer raises before anything is changed (the optimizer would
go on training tensors the model no longer uses), while a parameter frozen, unfrozen or added
with `add_param_group` since needs no rebuild, as probes re-partition.
"""

PROBES_INTRO = """
A probe closure may only compute a loss through the model. What it must not change is checked
after every probe (`blockopt.curvature.isolation.isolated`): the model's parameters as
registered in its modules (none added, removed or replaced), their `requires_grad` and their
values are put back where they changed, and the probe fails with a `ProbeContractError` naming
the change; during training that is a discarded probe with a `ProbeFaultWarning`, and training
goes on bitwise as without a probe (the tests compare every parameter). `.grad`, buffers
(BatchNorm statistics), train/eval modes and the RNG streams are restored as before.

Checkpoints cannot catch a probe half-way: `opt.state_dict()` raises
`CheckpointDuringProbeError` while the probe closure or a learning-rate trial runs (from a
signal handler, or from the closure itself), when the model holds a trial's weights and
BatchNorm statistics that a checkpoint would keep; the step that raised changed nothing, and
training can go on. Signals (`SIGINT`, `SIGTERM`, `SIGHUP`, `SIGUSR1`, `SIGUSR2`, `SIGALRM`)
that arrive while a probe's outcome is committed wait until it is whole, so a handler sees the
state before the probe or after it. Save checkpoints between steps: in a signal handler, set a
flag, and save after `opt.step()` returns.
"""

FAULTS_INTRO = """
A probe that fails during `step()` is discarded with a `ProbeFaultWarning` (and a TensorBoard
event) naming the cause and the fix; training goes on bitwise as without probing, and retries
back off (`tests/test_probe_faults.py` checks parameters, buffers, RNG streams and train/eval
modes against a run without a probe, for every fault below).
"""


def _fault_cases() -> list[Case]:
    """The faults of tests/test_probe_faults.py, each as a short training run that warns."""
    import test_probe_faults as faults

    def run(fault: Any) -> blockopt.BlockOptimizer:
        model, x, y, probe = faults._task(fault, {"on": True}, [])
        opt = blockopt.BlockOptimizer(model, probe, lr=0.05, probe_every=1, steps=3)
        faults._train(opt, model, x, y, 1)
        return opt

    return [
        Case(
            f"fault/{f.name}",
            f"a probe that fails: {f.name.replace('_', ' ')}",
            functools.partial(run, f),
            None,
            re.escape(f.cause),
            f"… {f.fix} …",
            warns=ProbeFaultWarning,
        )
        for f in faults.FAULTS
    ]


STATE_INTRO = """
State dicts that must load: checks that refuse lost state must not refuse these.
"""

SECTIONS = [
    Section(
        "Functions and constructors",
        "Wrong arguments to the public functions and constructors.",
        API_CASES,
        after="`Spectra.from_dict` reads JSON written by anything, so it checks every field's "
        "type and raises `ValueError` naming the field for any malformed content.",
    ),
    Section("Numbers", NUMBERS_INTRO, NUMBER_CASES),
    Section("Models", MODELS_INTRO, MODEL_CASES),
    Section(
        "`block_spectra`'s probe",
        "What the probe closure returns, and `block_spectra`'s own arguments.",
        PROBE_ERROR_CASES,
    ),
    Section("Probe closures, faults and checkpoints during probes", PROBES_INTRO, PROBE_CASES),
    Section("Probes that fail during training", FAULTS_INTRO, _fault_cases()),
    Section(
        "`BlockOptimizer.load_state_dict`",
        LOAD_INTRO,
        LOAD_CASES + MORE_LOAD_CASES,
        fix=LOAD_FIX,
        after=LOAD_AFTER,
    ),
    Section("State dicts that load", STATE_INTRO, STATE_CASES),
]
