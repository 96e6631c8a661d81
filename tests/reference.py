"""Dense float64 references: the exact Hessian of a loss over all trainable parameters, and the
coordinates of each block inside it; and an operation with no second derivative."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from blockopt import Block


def dense_hessian(
    model: nn.Module, loss_of: Callable[[Callable[..., torch.Tensor]], torch.Tensor]
) -> tuple[torch.Tensor, dict[str, int]]:
    """The full Hessian of ``loss_of(forward)`` with respect to the trainable parameters, laid
    out as their concatenation in ``named_parameters`` order, and each parameter's offset."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    offsets, total = {}, 0
    for n, p in named:
        offsets[n] = total
        total += p.numel()
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for n, p in named:
            params[n] = flat[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return loss_of(lambda *args: functional_call(model, params, args))

    # The math attention kernel is the only one with a second derivative; it is the same maths.
    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(loss, flat0)
    return hessian, offsets


def block_index(block: Block, offsets: dict[str, int]) -> torch.Tensor:
    """Positions of ``block``'s coordinates, in its own flat layout, in the dense Hessian."""
    pieces = []
    for part in block.parts:
        ids = torch.arange(part.param.numel()).reshape(part.param.shape)
        pieces.append(part.view(ids).reshape(-1) + offsets[part.param_name])
    return torch.cat(pieces)


def dense_block(hessian: torch.Tensor, block: Block, offsets: dict[str, int]) -> torch.Tensor:
    idx = block_index(block, offsets)
    return hessian[idx][:, idx]


class _Doubler(torch.autograd.Function):
    """``2 x``, whose backward raises as an op without a derivative formula does."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for doubler is not implemented")


class NoDoubleBackward(torch.autograd.Function):
    """``x ** 2`` with a first derivative whose own derivative is not implemented."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _Doubler.apply(x) * grad
