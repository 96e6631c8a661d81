"""The mode optimizers and state transfer between them."""

from __future__ import annotations

import pytest
import torch
import torch_optimizer

import blockopt
from blockopt.optimizer.modes import BlockSGD, resolve_optimizer_class, transfer_state
from blockopt.workloads.models import TinyGPT


def _grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("nesterov", [False, True])
def test_block_sgd_with_unit_factors_is_torch_sgd(nesterov):
    torch.manual_seed(0)
    a = TinyGPT(n_layers=1).double()
    b = TinyGPT(n_layers=1).double()
    b.load_state_dict(a.state_dict())
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": nesterov}
    ref = torch.optim.SGD(a.parameters(), foreach=False, **kw)
    ours = BlockSGD(b.parameters(), blockopt.partition(b), **kw)
    for step in range(4):
        _grads(a, step)
        _grads(b, step)
        ref.step()
        ours.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_block_sgd_factors_apply_to_their_slices_only():
    torch.manual_seed(0)
    model = TinyGPT(n_layers=1).double()
    blocks = blockopt.partition(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = BlockSGD(model.parameters(), blocks, {"blocks.0.attn.qkv.weight.k": 10.0}, lr=0.1)
    _grads(model, 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    w = model.blocks[0].attn.qkv.weight
    step = before["blocks.0.attn.qkv.weight"] - w.detach()
    g = grads["blocks.0.attn.qkv.weight"]
    assert torch.allclose(step[64:128], 1.0 * g[64:128], rtol=1e-12)  # k slice: 0.1 * 10
    assert torch.allclose(step[:64], 0.1 * g[:64], rtol=1e-12)
    assert torch.allclose(step[128:], 0.1 * g[128:], rtol=1e-12)
    head = before["head.weight"] - model.head.weight.detach()
    assert torch.allclose(head, 0.1 * grads["head.weight"], rtol=1e-12)


@pytest.mark.parametrize(
    ("factors", "message"),
    [({"nope": 2.0}, "unknown blocks"), ({"head.weight": 0.0}, "must be positive")],
)
def test_block_sgd_rejects_bad_factors(factors, message):
    model = TinyGPT(n_layers=1)
    with pytest.raises(ValueError, match=message):
        BlockSGD(model.parameters(), blockopt.partition(model), factors)


def test_momentum_survives_a_round_trip_through_adam():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        _grads(model, step)
        sgd.step()
    buffers = [sgd.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    assert transfer_state(sgd, adam) == 2
    for p, b in zip(model.parameters(), buffers):
        st = adam.state[p]
        assert torch.allclose(st["exp_avg"], 0.1 * b, rtol=1e-12)
        assert torch.equal(st["exp_avg_sq"], torch.maximum(st["exp_avg"] ** 2, p.grad**2))
        assert st["step"].item() == 5000.0
        # Both bias corrections are within 1% of 1 at that step count.
        assert 1 - 0.999**5000 > 0.99 and 1 - 0.9**5000 > 0.99
    sgd2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    transfer_state(adam, sgd2)
    for p, b in zip(model.parameters(), buffers):
        assert torch.allclose(sgd2.state[p]["momentum_buffer"], b, rtol=1e-12)


def test_transfer_without_momentum_starts_fresh():
    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    _grads(model, 0)
    sgd.step()
    adam = torch.optim.AdamW(model.parameters())
    assert transfer_state(sgd, adam) == 0 and len(adam.state) == 0
    lamb = torch_optimizer.Lamb(model.parameters())
    assert transfer_state(adam, lamb) == 0 and len(lamb.state) == 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_adam_from_sgd_without_a_running_mean_steps_as_a_new_adam(momentum):
    # Before SGD's first step (or without momentum) there is no mean to carry: Adam starts as a
    # new Adam, so its steps are exactly a fresh AdamW's, the first one a full sign step.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    twin = torch.nn.Linear(4, 3).double()
    twin.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    if not momentum:
        _grads(model, 0)
        sgd.step()
        twin.load_state_dict(model.state_dict())
    adam = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    transfer_state(sgd, adam)
    fresh = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(1, 4):
        before = model.weight.detach().clone()
        for m, opt in ((model, adam), (twin, fresh)):
            _grads(m, step)
            opt.step()
        assert torch.equal(model.weight, twin.weight)
        if step == 1:
            moved = (model.weight - before).abs()
            assert torch.allclose(moved, torch.full_like(moved, 1e-2), rtol=1e-6)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sgd", torch.optim.SGD),
        ("AdamW", torch.optim.AdamW),
        ("radam", torch.optim.RAdam),
        ("lamb", torch_optimizer.Lamb),
        ("Yogi", torch_optimizer.Yogi),
        (torch_optimizer.AdaBelief, torch_optimizer.AdaBelief),
    ],
)
def test_resolve_optimizer_class(spec, expected):
    assert resolve_optimizer_class(spec) is expected


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("adahessian", ValueError, "create_graph=True"),
        (torch_optimizer.Adahessian, ValueError, "create_graph=True"),
        ("lookahead", ValueError, "wraps another optimizer"),
        ("adamm", ValueError, "unknown optimizer 'adamm'"),
        (dict, TypeError, "not a torch.optim.Optimizer"),
        (3, TypeError, "class or a name"),
    ],
)
def test_resolve_refuses_clearly(spec, error, message):
    with pytest.raises(error, match=message):
        resolve_optimizer_class(spec)
