"""Probes measure the loss's Hessian, whatever gradient hooks the model carries, and a hook with
state sees training's gradients only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import blockopt
from blockopt.curvature.hooks import without_gradient_hooks


def _model() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return model, lambda: F.cross_entropy(model(x), y)


def _hooked(model: nn.Module, calls: list[str]) -> list:
    handles = []
    for name, p in model.named_parameters():
        handles.append(p.register_hook(lambda g, n=name: (calls.append(n), 0.5 * g)[1]))
        handles.append(p.register_post_accumulate_grad_hook(lambda p: calls.append("acc")))
    handles.append(model[0].register_full_backward_hook(lambda *a: calls.append("module")))
    handles.append(model[2].register_full_backward_pre_hook(lambda *a: calls.append("pre")))
    return handles


def _values(spectra) -> dict[str, tuple[float, ...]]:
    return {name: spectra[name].ritz_values for name in spectra}


def test_set_aside_hooks_do_not_run_and_come_back_in_order():
    model, probe = _model()
    plain = blockopt.block_spectra(model, probe, steps=6)
    calls: list[str] = []
    handles = _hooked(model, calls)
    before = [list(p._backward_hooks.values()) for p in model.parameters()]
    with without_gradient_hooks(model):
        inside = blockopt.block_spectra(model, probe, steps=6)
        late = model[0].weight.register_hook(lambda g: calls.append("late"))
    assert calls == [] and _values(inside) == _values(plain)
    first = list(model[0].weight._backward_hooks.values())
    assert first[:-1] == before[0] and len(first) == len(before[0]) + 1  # "late" last
    model.zero_grad()
    probe().backward()
    assert calls.count("acc") == 4 and {"module", "pre", "late", "0.weight"} <= set(calls)
    hooked_grad = model[2].bias.grad.clone()
    model.zero_grad()
    with without_gradient_hooks(model):
        probe().backward()
    assert torch.equal(hooked_grad, 0.5 * model[2].bias.grad)  # the halving hook is back
    for handle in [*handles, late]:
        handle.remove()
    calls.clear()
    model.zero_grad()
    probe().backward()
    assert calls == []  # every handle still removes its hook


def test_a_hook_that_halves_gradients_no_longer_quarters_lambda_max():
    model, probe = _model()
    plain = blockopt.block_spectra(model, probe, steps=6)
    calls: list[str] = []
    _hooked(model, calls)
    hooked = blockopt.block_spectra(model, probe, steps=6)
    assert calls == []
    assert _values(hooked) == _values(plain)


def test_monitoring_with_stateful_hooks_is_bitwise_training_without_probes():
    """A hook that counts its calls (and halves the gradient) sees exactly the training
    steps' gradients, and the weights end as they do without probes."""

    def train(probe_every: int | None) -> tuple[list[torch.Tensor], int]:
        model, probe = _model()
        calls: list[str] = []
        for p in model.parameters():
            p.register_hook(lambda g: (calls.append("g"), 0.5 * g)[1])
        opt = blockopt.BlockOptimizer(
            model,
            probe if probe_every else None,
            lr=0.1,
            monitor_only=True,
            probe_every=probe_every,
            probe_budget=None,
            steps=4,
        )
        for _ in range(30):
            opt.zero_grad()
            probe().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], len(calls)

    (probed, probed_calls), (plain, plain_calls) = train(5), train(None)
    assert probed_calls == plain_calls == 30 * 4
    assert all(torch.equal(a, b) for a, b in zip(probed, plain))
