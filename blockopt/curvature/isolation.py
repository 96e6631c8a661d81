"""Run a probe so that training cannot tell it happened.

``isolated(model)`` is a context manager that, on exit, puts back everything a probe's forward
and backward passes could change: every parameter's ``.grad``, every buffer (BatchNorm running
statistics and counters), every module's train/eval mode, and the global RNG streams of torch
(CPU and CUDA), numpy and ``random``. Inside it (unless ``second_order=False``, for first-order
work such as learning-rate trials), scaled-dot-product attention is pinned to the math kernel,
cuDNN is disabled and ``torch.compile``'d modules run eagerly, because fused kernels and compiled
graphs have no double backward.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["isolated", "second_order_kernels"]


@contextlib.contextmanager
def second_order_kernels() -> Iterator[None]:
    """Select kernels that support double backward: math SDPA, no cuDNN, and torch.compile'd
    modules run eagerly (compiled graphs have no double backward)."""
    with contextlib.ExitStack() as stack:
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:  # torch >= 2.6
            stack.enter_context(set_stance("force_eager"))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3
            stack.enter_context(
                torch.backends.cuda.sdp_kernel(
                    enable_flash=False, enable_math=True, enable_mem_efficient=False
                )
            )
        else:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


@contextlib.contextmanager
def isolated(model: nn.Module, *, second_order: bool = True) -> Iterator[None]:
    """Restore ``.grad``, buffers, train/eval modes and global RNG states of ``model`` on exit;
    with ``second_order``, run the body under :func:`second_order_kernels`."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None  # a closure that calls backward() writes into fresh tensors, dropped later
    buffers = [
        (module, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module.named_buffers(recurse=False)
        if buf is not None
    ]
    modes = [(module, module.training) for module in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        kernels = second_order_kernels() if second_order else contextlib.nullcontext()
        with torch.enable_grad(), kernels:
            yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for module, name, buf, saved in buffers:
                if module._buffers.get(name) is not buf:
                    module._buffers[name] = buf
                buf.copy_(saved)
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
