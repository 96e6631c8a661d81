"""``wrap()``: turn the optimizer a user already has into a :class:`BlockOptimizer`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from blockopt.optimizer.block_optimizer import BlockOptimizer
from blockopt.optimizer.modeset import init_keywords
from blockopt.optimizer.validation import is_real

__all__ = ["wrap"]

_SGD_KEYS = ("momentum", "dampening", "weight_decay", "nesterov")
_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def wrap(
    optimizer: Optimizer,
    model: nn.Module,
    probe: Callable[[], torch.Tensor] | None = None,
    **options: Any,
) -> BlockOptimizer:
    """Wrap an existing optimizer: copy its parameters, groups and hyperparameters (its
    learning rate applies as it is: ``lrs`` cannot fix the starting mode's), start in the
    mode it implements (SGD-like classes, with ``momentum`` and no ``betas``, RMSprop excepted:
    ``"sgd"``; others: ``"adam"`` with that class), and carry its state. A scheduler must be
    built on the wrapper: one built on ``optimizer`` keeps scaling the groups copied from (a
    warning says so). ``options`` are those of :class:`BlockOptimizer`."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"wrap() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, BlockOptimizer):
        raise TypeError("this optimizer is already a BlockOptimizer")
    defaults = dict(optimizer.defaults)
    groups = [dict(g) for g in optimizer.param_groups]
    if getattr(optimizer.step, "_wrapped_by_lr_sched", False) or any(
        "initial_lr" in g for g in groups
    ):
        warnings.warn(
            f"the {type(optimizer).__name__} being wrapped has an LR scheduler built on it: "
            "wrap() copies its param groups, so that scheduler keeps scaling the old "
            "optimizer's learning rates, not the wrapper's; build the scheduler on the "
            "optimizer wrap() returns (opt = blockopt.wrap(...); sched = StepLR(opt, ...))",
            UserWarning,
            stacklevel=2,
        )
    # SGD-like: SGD, or a class with momentum and no moment estimates (betas); RMSprop has
    # momentum too, but scales each coordinate by its running second moment, as Adam does
    sgd_like = isinstance(optimizer, torch.optim.SGD) or (
        "momentum" in defaults
        and "betas" not in defaults
        and not isinstance(optimizer, torch.optim.RMSprop)
    )
    mode = options.pop("mode", "sgd" if sgd_like else "adam")
    opts = dict(options)
    optimizers = dict(opts.pop("optimizers", {}) or {})
    lrs = opts.get("lrs")
    if isinstance(lrs, Mapping):  # anything else BlockOptimizer refuses, saying why
        opts["lrs"] = {m: v for m, v in lrs.items() if m != mode}
    lr = defaults.get("lr")
    if not (is_real(lr) or (isinstance(lr, torch.Tensor) and lr.numel() == 1)):
        raise TypeError(
            f"cannot wrap {type(optimizer).__name__}: its lr is {defaults.get('lr')!r}, and "
            "blockopt's modes scale a learning rate (a switch matches step sizes through it); "
            "give the optimizer a numeric lr, or build BlockOptimizer(..., optimizers=...) "
            "with a class that takes one"
        )
    accepted = init_keywords(type(optimizer))  # defaults may hold state, not arguments
    kwargs = {
        k: v
        for k, v in defaults.items()
        if k not in ("lr", "params", "foreach", "fused") and (accepted is None or k in accepted)
    }
    if mode == "sgd" and not isinstance(optimizer, torch.optim.SGD):
        optimizers.setdefault("sgd", (type(optimizer), kwargs))
    elif mode == "adam" and type(optimizer) is not torch.optim.AdamW:
        optimizers.setdefault("adam", (type(optimizer), kwargs))
    elif mode == "adam":
        opts.setdefault("betas", defaults.get("betas", _ADAM_DEFAULTS["betas"]))
        opts.setdefault("eps", defaults.get("eps", _ADAM_DEFAULTS["eps"]))
        opts.setdefault("adam_weight_decay", defaults.get("weight_decay", 0.0))
    if sgd_like:
        for key in _SGD_KEYS:
            if key in defaults:
                opts.setdefault(key, defaults[key])
    if isinstance(defaults.get("maximize"), bool):
        opts.setdefault("maximize", defaults["maximize"])
    wrapped = BlockOptimizer(
        model,
        probe,
        lr=float(defaults.get("lr", groups[0]["lr"])),
        params=groups,
        mode=mode,
        optimizers=optimizers,
        **opts,
    )
    wrapped.active_optimizer.load_state_dict(optimizer.state_dict())
    return wrapped
