"""Probe a half-precision model in float32: ``upcast(model)``, exact on the way back.

Hessian-vector products of a bfloat16 or float16 model carry the round-off of its dtype (eps
2^-7 and 2^-10): a bfloat16 product is good to a few parts in a thousand at best, and in float16
the double backward of attention and LayerNorm overflows (65504) even where the loss and its
gradient are finite, so every product of the blocks below it is ``inf``. Inside ``upcast``, the
model's floating-point parameters and buffers are float32 and so is every floating-point tensor
passed to the model's own ``forward`` (a forward pre-hook on the model), so the probe closure
runs unchanged and its products are float32 ones. On the way out, each parameter gets back its
own storage, bit for bit: nothing is rounded, since every bfloat16 and float16 value is a
float32 value. The cost is a float32 copy of the half-precision parameters and buffers, twice
their memory, for the duration of the probe, and float32 activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["HALF", "half_precision", "upcast"]

HALF = (torch.float16, torch.bfloat16)


def half_precision(model: nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is float16 or bfloat16."""
    return any(p.dtype in HALF for p in model.parameters() if p.requires_grad)


def _up(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in HALF:
        return value.float()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_up(v) for v in value)
    if isinstance(value, dict):
        return {k: _up(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def upcast(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model``'s half-precision parameters, buffers and ``forward`` inputs
    in float32; restore the original tensors (the same storage, the same bits) on exit.
    ``.grad`` is left alone: a probe saves and restores it itself
    (:func:`blockopt.curvature.isolation.isolated`)."""
    params = [p for p in model.parameters() if p.dtype in HALF]
    buffers = [
        (module, name, buf)
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None and buf.dtype in HALF
    ]
    if not params and not buffers:
        yield
        return
    originals = [p.data for p in params]
    handle = model.register_forward_pre_hook(
        lambda _module, args, kwargs: (_up(args), _up(kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            for p in params:
                p.data = p.data.float()
            for module, name, buf in buffers:
                module._buffers[name] = buf.float()
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for p, data in zip(params, originals):
                p.data = data
            for module, name, buf in buffers:
                module._buffers[name] = buf
