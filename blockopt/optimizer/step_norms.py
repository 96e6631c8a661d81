"""The norm of the update an optimizer would make next: what a switch matches across modes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from blockopt.optimizer.modes import BlockSGD

__all__ = ["step_norm"]


def step_norm(opt: Optimizer) -> float:
    """The norm of the update ``opt`` would make on its next step, from its state and the
    current gradients: exact for SGD, block SGD and Adam(W) (weight decay aside), a sign-like
    step for other adaptive classes and a gradient step for the rest."""
    total = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.double()
            if group.get("maximize"):  # the step ascends: torch's classes negate the gradient
                g = -g
            state = opt.state.get(p, {})
            if isinstance(opt, (torch.optim.SGD, BlockSGD)):
                update = _sgd_update(g, p, group, state)
                if isinstance(opt, BlockSGD):
                    scale = opt.scale_of(p)
                    update = update * (scale.double() if isinstance(scale, torch.Tensor) else scale)
            elif isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                update = _adam_update(g, group, state)
            elif "betas" in group:
                update = g / (g.abs() + group.get("eps", 1e-8))
            else:
                update = g
            square = update.pow(2).sum()
            if callable(getattr(square, "full_tensor", None)):  # a DTensor (FSDP): all shards
                square = square.full_tensor()
            total += float(square) * group["lr"] ** 2
    return math.sqrt(total)


def _sgd_update(
    g: torch.Tensor, p: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any]
) -> torch.Tensor:
    if group.get("weight_decay"):
        g = g + group["weight_decay"] * p.detach().double()
    mu = group.get("momentum", 0.0)
    if not mu:
        return g
    buf = state.get("momentum_buffer")
    buf = g if buf is None else mu * buf.double() + (1 - group.get("dampening", 0.0)) * g
    return g + mu * buf if group.get("nesterov") else buf


def _adam_update(g: torch.Tensor, group: Mapping[str, Any], state: Mapping[str, Any]):
    beta1, beta2 = group["betas"]
    step = float(state["step"]) if "step" in state else 0.0
    m = state["exp_avg"].double() if "exp_avg" in state else torch.zeros_like(g)
    v = state["exp_avg_sq"].double() if "exp_avg_sq" in state else torch.zeros_like(g)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** (step + 1))
    v_hat = v / (1 - beta2 ** (step + 1))
    return m_hat / (v_hat.sqrt() + group["eps"])
