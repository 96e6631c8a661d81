"""Bad probes and bad arguments to block_spectra fail with messages that name the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blockopt

_model = nn.Linear(3, 2)
_x = torch.randn(4, 3)


@pytest.mark.parametrize(
    ("probe", "kwargs", "error", "message"),
    [
        (lambda: _model(_x), {}, ValueError, r"shape \(4, 2\).*scalar"),
        (lambda: _model(_x).sum().item(), {}, TypeError, r"not a tensor.*loss\.item"),
        (lambda: _model(_x).sum().detach(), {}, ValueError, "does not depend on any trainable"),
        (lambda: torch.tensor(1.0, requires_grad=True), {}, ValueError, "does not depend"),
        (lambda: _model(_x).sum() * float("nan"), {}, FloatingPointError, "NaN/Inf"),
        ("loss", {}, TypeError, "zero-argument callable"),
        (lambda: _model(_x).sum(), {"steps": 0}, ValueError, "steps must be a positive"),
        (lambda: _model(_x).sum(), {"probes": -1}, ValueError, "probes must be a positive"),
        (lambda: _model(_x).sum(), {"steps": True}, ValueError, "steps must be a positive"),
        (lambda: _model(_x).sum(), {"seed": 1.5}, TypeError, "seed must be an int"),
        (lambda: _model(_x).sum(), {"blocks": []}, ValueError, "no blocks to probe"),
        (lambda: _model(_x).sum(), {"blocks": ["weight"]}, TypeError, "Block objects"),
        (lambda: _model(_x).sum(), {"blocks": "rows"}, ValueError, "unknown partition strategy"),
    ],
)
def test_bad_probe_or_arguments(probe, kwargs, error, message):
    with pytest.raises(error, match=message):
        blockopt.block_spectra(_model, probe, **kwargs)


def test_probe_result_that_depends_only_on_another_model_is_refused():
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not a parameter of this model"):
        blockopt.block_spectra(_model, lambda: other(_x).sum(), blockopt.partition(other))


def test_blocks_from_a_frozen_parameter_are_refused():
    model = nn.Linear(3, 2)
    blocks = blockopt.partition(model)
    model.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        blockopt.block_spectra(model, lambda: model(_x).pow(2).sum(), blocks)


def test_duplicate_block_names_are_refused():
    model = nn.Linear(3, 2)
    b = blockopt.partition(model)[0]
    with pytest.raises(ValueError, match="two blocks are named 'weight'"):
        blockopt.block_spectra(model, lambda: model(_x).pow(2).sum(), [b, b])


def test_unused_block_reported_as_unused_with_zero_spectrum():
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "idle": nn.Linear(3, 1)})
    spectra = blockopt.block_spectra(model, lambda: model["used"](_x).pow(2).mean(), steps=3)
    assert spectra["idle.weight"].status == "unused"
    assert spectra["idle.weight"].lambda_max == 0.0 and spectra["idle.weight"].trace == 0.0
    assert spectra["used.weight"].status == "ok" and spectra["used.weight"].lambda_max > 0
