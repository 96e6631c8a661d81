"""A probe leaves .grad, buffers, RNG streams and train/eval modes exactly as it found them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockopt


class DropBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Sequential(nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x)))).flatten(1)
        return self.out(self.drop(self.head(h)))


def _snapshot(model):
    return {
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "buffers": [(b, b.clone()) for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
    }


def _assert_unchanged(model, snap):
    for p, (obj, value) in zip(model.parameters(), snap["grads"]):
        assert p.grad is obj
        if value is not None:
            assert torch.equal(p.grad, value)
    for b, (obj, value) in zip(model.buffers(), snap["buffers"]):
        assert b is obj and torch.equal(b, value)
    assert [m.training for m in model.modules()] == snap["modes"]


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_probe_leaves_no_trace(mode):
    torch.manual_seed(0)
    model = DropBN()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()  # real gradients, and BN stats that have moved
    model.head[0].bias.grad = None  # a parameter without a gradient stays without one
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model.bn.eval()
    snap = _snapshot(model)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)

    def probe():
        # A probe drawing from every RNG, flipping a mode and touching grads, like careless
        # user code would.
        idx = torch.randint(0, 8, (6,))
        _ = np.random.rand(), random.random()
        model.train()
        return F.cross_entropy(model(x[idx]), y[idx])

    spectra = blockopt.block_spectra(model, probe, steps=5, probes=2)
    assert len(spectra) == 10
    _assert_unchanged(model, snap)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_probe_that_calls_backward_is_a_clear_error_and_leaves_no_trace():
    torch.manual_seed(0)
    model = DropBN()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    snap = _snapshot(model)

    def probe():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"called \.backward\(\)"):
        blockopt.block_spectra(model, probe, steps=2)
    _assert_unchanged(model, snap)


def test_state_restored_when_the_probe_raises():
    model = DropBN()
    snap = _snapshot(model)
    state = torch.get_rng_state()

    def probe():
        model.eval()
        torch.rand(3)
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):
        blockopt.block_spectra(model, probe)
    _assert_unchanged(model, snap)
    assert torch.equal(torch.get_rng_state(), state)


def test_probe_under_no_grad_still_works():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with torch.no_grad():
        spectra = blockopt.block_spectra(model, lambda: model(x).pow(2).mean(), steps=6)
    # d^2/dW^2 of mean((Wx+b)^2) over 8 outputs: 2/8 * kron(I, X^T X), known in closed form.
    xtx = x.T @ x * 2 / 8
    top = torch.linalg.eigvalsh(xtx.double())[-1].item()
    assert spectra["weight"].lambda_max == pytest.approx(top, rel=1e-5)
    assert spectra["bias"].lambda_max == pytest.approx(2 * 4 / 8, rel=1e-5)
