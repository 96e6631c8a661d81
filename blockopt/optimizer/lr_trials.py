"""Trial runs for the learning-rate search: a few steps of a scratch optimizer on the probe's
batch, from the current parameters, then everything put back.

A trial copies the parameters, runs ``steps`` steps of an optimizer built for it (holding a copy
of the live optimizer's state) on gradients of ``probe()``, evaluates the loss once more (on
``holdout()``, a batch the trial did not train on, when given; else on ``probe()``) and
restores the parameters. It runs inside :func:`isolated` (with the usual,
first-order kernels), so ``.grad``, buffers, train/eval modes and RNG streams are as before; the
live optimizer is never touched. Every trial starts from the same RNG state, so trials of a model
with dropout see the same masks, and their losses differ by the learning rate alone.
Under data parallelism each rank trains on its own probe batch and the final losses are
averaged, so every rank sees the same trial loss and the search makes the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from blockopt.curvature.fd_hvp import is_sharded
from blockopt.curvature.isolation import isolated
from blockopt.distributed.reductions import Reduce, agree_value

__all__ = ["trial_loss"]


def trial_loss(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    optimizer: Callable[[], Optimizer],
    steps: int,
    reduce: Reduce | None = None,
    holdout: Callable[[], torch.Tensor] | None = None,
    clip: float | None = None,
) -> float:
    """The loss of ``holdout()`` (default: of ``probe()``) after ``steps`` steps of
    ``optimizer()`` (a fresh scratch optimizer over ``params``) on the probe's gradients;
    ``inf`` when a loss stops being finite. With ``steps=0``, the loss where the parameters
    are, and no optimizer is built. ``clip``: each step's gradients are clipped to this total
    norm first (``torch.nn.utils.clip_grad_norm_``), as training clips them. The parameters,
    ``.grad``, buffers, modes and RNG streams are left exactly as they were."""

    def run() -> float:
        saved = [p.detach().clone() for p in params]
        try:
            with isolated(model, second_order=False):
                return _train_and_evaluate(probe, params, optimizer, steps, holdout or probe, clip)
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)

    if reduce is None:
        return run()
    device = params[0].device if params else torch.device("cpu")
    return agree_value(run, reduce, device)


def _train_and_evaluate(
    probe: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    optimizer: Callable[[], Optimizer],
    steps: int,
    evaluate: Callable[[], torch.Tensor],
    clip: float | None,
) -> float:
    if steps:  # the loss where the parameters are (steps=0) needs no optimizer
        sharded = any(is_sharded(p) for p in params)
        opt = optimizer()
        for _ in range(steps):
            loss = probe()
            if not torch.isfinite(loss.detach()).all():
                return math.inf
            if sharded:  # FSDP's parameters are not in the graph: its backward fills .grad
                for p in params:
                    p.grad = None
                loss.backward()
            else:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g  # isolated() puts the caller's .grad back afterwards
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
            opt.step()
    with torch.no_grad():
        value = float(evaluate())
    return value if math.isfinite(value) else math.inf
