"""Checks of the optimizer's construction arguments, done at construction rather than at the
first probe or switch, where a bad value would fail far from its cause."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from blockopt.curvature.lanczos import check_tol
from blockopt.curvature.scalars import plain
from blockopt.curvature.spectra import check_lanczos_settings
from blockopt.optimizer.policy import MODES, Thresholds, is_share

__all__ = [
    "check_constructor",
    "check_params_in_model",
    "check_switching",
    "finite",
    "is_int",
    "is_real",
    "plain",
    "shown",
]


def is_real(value: Any) -> bool:
    """A real number, bools excluded (``True`` is no learning rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    """Whether a real number is finite; an int too large for a float (``10**400``) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def shown(value: Any) -> str:
    """``value`` for a message: its repr, or for a huge int its size."""
    if is_int(value) and abs(value) >= 10**20:
        return f"an int of {len(str(abs(value)))} digits, too large for a float"
    return repr(value)


def foreign_params(params: Iterable[torch.Tensor], model: nn.Module) -> tuple[int, str]:
    """How many of ``params`` ``model`` does not own, and the shapes of the first three (with
    ``, ...`` when there are more), for the messages that refuse them."""
    owned = {id(p) for p in model.parameters()}
    foreign = [p for p in params if id(p) not in owned]
    shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
    return len(foreign), shapes + (", ..." if len(foreign) > 3 else "")


def check_params_in_model(groups: list[dict[str, Any]], model: nn.Module) -> None:
    """Refuse parameters ``model`` does not own: the blocks, probes and block learning rates
    are the model's, and would silently leave such parameters out."""
    count, shapes = foreign_params((p for g in groups for p in g["params"]), model)
    if count:
        raise ValueError(
            f"{count} of the optimizer's parameters (shapes {shapes}) are not parameters of the "
            f"{type(model).__name__} passed as model; build the optimizer (or params=) over "
            "model.parameters() of the model you pass, or pass the model they belong to"
        )


def check_constructor(
    *,
    model: Any,
    probe: Any,
    lr: Any,
    mode: Any,
    pin_mode: Any,
    history: Any,
    steps: Any,
    probes: Any,
    tol: Any,
    flags: Mapping[str, Any],
    search_steps: Any,
    probe_budget: Any,
    thresholds: Any,
    lrs: Any,
    optimizers: Any,
    seed: Any,
    max_factor: Any,
    betas: Any,
    hyper: Mapping[str, Any],
) -> None:
    """Refuse ``BlockOptimizer``'s arguments of the wrong type or range, naming the fix, at
    construction rather than at the first probe or switch, far from their cause."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if probe is not None and not callable(probe):
        raise TypeError(f"probe must be a zero-argument callable, got {type(probe).__name__}")
    for name, value in (("mode", mode), ("pin_mode", pin_mode)):
        if value is not None and value not in MODES:
            raise ValueError(f"unknown {name} {value!r}; modes are {MODES}")
    if not is_real(lr):
        raise TypeError(f"lr must be a number, got {type(lr).__name__} {lr!r}; e.g. lr=0.1")
    if not (finite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {shown(lr)}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"history must be a positive int, got {history!r}")
    check_lanczos_settings(steps, probes)
    if is_real(tol) and not finite(tol):
        raise ValueError(f"tol must be None or a number in (0, 1), e.g. 0.03, got {shown(tol)}")
    check_tol(tol)
    if not isinstance(flags.get("distributed_share", True), bool):
        raise TypeError(
            "distributed_share must be True (the ranks share a probe's blocks) or False "
            f"(every rank probes every block, averaged), got {flags['distributed_share']!r}"
        )
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(search_steps, bool) or not isinstance(search_steps, int) or search_steps < 1:
        raise ValueError(f"search_steps must be a positive int, got {search_steps!r}")
    if probe_budget is not None and not is_share(probe_budget):
        raise ValueError(
            "probe_budget must be the share of training wall time probes may take, a "
            f"number in (0, 1) such as 0.03 for 3%, or None for no budget; got {probe_budget!r}"
        )
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(
            f"thresholds must be a blockopt.Thresholds, got {type(thresholds).__name__}; build "
            "one with blockopt.Thresholds(sgd_below=1.0, adam_above=1.5, margin=0.25, "
            "min_interval=50, block_ratio=None)"
        )
    for label, value in (("lrs", lrs), ("optimizers", optimizers)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(
                f"{label} must be a mapping mode name -> setting, e.g. {label}={{'adam': ...}}, "
                f"got {type(value).__name__}"
            )
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not (is_real(max_factor) and finite(max_factor) and max_factor >= 1):
        raise ValueError(f"max_factor must be a finite number >= 1, got {shown(max_factor)}")
    for name, value in hyper.items():
        if not (is_real(value) and finite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative finite number, got {shown(value)}")
    if not (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(is_real(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")
    fixed = dict(lrs or {})
    for m, value in fixed.items():
        if m not in MODES:
            raise ValueError(f"lrs names unknown mode {m!r}; modes are {MODES}")
        if not (is_real(value) and finite(value) and value > 0):
            raise ValueError(f"lrs[{m!r}] must be a positive finite number, got {shown(value)}")


def check_switching(*, holdout: Any, modes: Any, start: str, guard_steps: Any) -> tuple[str, ...]:
    """Refuse a bad ``holdout``, ``modes`` or ``guard_steps``; returns ``modes`` as a tuple in
    the order sgd, block_sgd, adam."""
    if holdout is not None and not callable(holdout):
        raise TypeError(
            "holdout must be a zero-argument callable returning the loss on a batch other than "
            f"the probe's (or None), got {type(holdout).__name__}"
        )
    if isinstance(modes, str) or not isinstance(modes, (tuple, list, set, frozenset)):
        raise TypeError(
            f"modes must be a tuple of mode names, e.g. modes=('adam',), got {modes!r}"
            + (f"; write modes=({modes!r},) for one mode" if isinstance(modes, str) else "")
        )
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(
            f"modes must name one or more of {MODES}, got {tuple(modes)!r}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    if start not in modes:
        raise ValueError(
            f"modes={tuple(modes)!r} leaves out {start!r}, the mode training starts in (mode= "
            "or pin_mode=, or the wrapped optimizer's family); add it, or start in one of them"
        )
    if guard_steps is not None and not (is_int(guard_steps) and guard_steps >= 1):
        raise ValueError(
            "guard_steps must be a positive int (the training losses a probe's switch is "
            f"judged on) or None (switches are never undone), got {guard_steps!r}"
        )
    return tuple(m for m in MODES if m in modes)
