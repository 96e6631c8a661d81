"""Bad probes and bad arguments to block_spectra fail with messages that name the fix (the
cases of PROBE_ERROR_CASES, in tests/bad_input_cases.py, and a few more)."""

from __future__ import annotations

import pytest
import torch
from bad_input_cases import PROBE_ERROR_CASES, Case
from torch import nn

import blockopt

_model = nn.Linear(3, 2)
_x = torch.randn(4, 3)


@pytest.mark.parametrize("case", PROBE_ERROR_CASES, ids=lambda c: c.id)
def test_bad_probe_or_arguments(case: Case) -> None:
    assert case.error is not None
    with pytest.raises(case.error, match=case.message):
        case.call()


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


def test_a_probe_that_calls_backward_itself_is_named_with_either_backend() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(8, 3)

    def probe() -> torch.Tensor:
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"loss graph was already freed: the probe closure"):
        blockopt.block_spectra(model, probe, steps=3, backend="autograd")
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"the probe closure called backward\(\) itself"):
        blockopt.block_spectra(model, probe, steps=3, backend="fd")


def test_a_probe_that_frees_its_graph_without_grads_is_named_by_finite_differences() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(8, 3)

    def probe() -> torch.Tensor:
        loss = model(x).pow(2).mean()
        torch.autograd.grad(loss, list(model.parameters()))  # frees the graph, sets no .grad
        return loss

    with pytest.raises(RuntimeError, match=r"loss graph was already freed: the probe closure"):
        blockopt.block_spectra(model, probe, steps=3, backend="fd")
