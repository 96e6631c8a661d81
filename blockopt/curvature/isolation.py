"""Run a probe so that training cannot tell it happened.

``isolated(model)`` is a context manager that, on exit, puts back everything a probe's forward
and backward passes could change: every parameter's ``.grad``, every buffer (BatchNorm running
statistics and counters), every module's train/eval mode, and the global RNG streams of torch
(CPU and CUDA), numpy and ``random``. Inside it (unless ``second_order=False``, for first-order
work such as learning-rate trials), scaled-dot-product attention is pinned to the math kernel,
cuDNN is disabled and ``torch.compile``'d modules run eagerly, because fused kernels and compiled
graphs have no double backward.

A probe must only compute a loss through the model, and ``isolated`` enforces it: the model's
parameters, as registered in its modules (none added, removed or replaced), their
``requires_grad`` flags, torch's default dtype and, for probes (``second_order=True``), the
parameters' values are compared with what they were before, put back where they changed, and
a :class:`ProbeContractError` naming what changed is raised once everything is restored
(first-order work, the learning-rate trials, changes the values on purpose and puts them back
itself). Checking the values keeps a copy of the parameters for the length of a probe.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from blockopt.curvature.hooks import without_gradient_hooks

__all__ = ["ProbeContractError", "isolated", "second_order_kernels"]


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


class ProbeContractError(RuntimeError):
    """The probe closure changed the model's parameters (what changed was put back)."""


@dataclass
class _Parameters:
    """The model's parameters as registered before a probe: slots (module, name, tensor or
    None), every parameter's ``requires_grad`` and version counter, and (for probes) values."""

    slots: dict[tuple[int, str], tuple[str, nn.Module, torch.Tensor | None]]
    flags: list[tuple[str, torch.Tensor, bool, int]]
    values: list[torch.Tensor] | None

    @classmethod
    def of(cls, model: nn.Module, values: bool) -> _Parameters:
        slots = {
            (id(module), name): (f"{path}.{name}" if path else name, module, p)
            for path, module in model.named_modules(remove_duplicate=False)
            for name, p in module._parameters.items()
        }
        seen: dict[int, tuple[str, torch.Tensor]] = {}
        for qualified, _, p in slots.values():
            if p is not None:
                seen.setdefault(id(p), (qualified, p))
        flags = [(n, p, p.requires_grad, p._version) for n, p in seen.values()]
        saved = [p.detach().clone() for _, p, _, _ in flags] if values else None
        return cls(slots, flags, saved)

    def restore(self, model: nn.Module) -> list[str]:
        """Put back what changed since :meth:`of`; returns what changed, in words."""
        return self._restore_slots(model) + self._restore_tensors()

    def _restore_slots(self, model: nn.Module) -> list[str]:
        """Remove parameters added since, put back those removed or replaced."""
        changed = []
        now = {
            (id(module), name): (f"{path}.{name}" if path else name, module)
            for path, module in model.named_modules(remove_duplicate=False)
            for name in module._parameters
        }
        for key, (qualified, module) in now.items():
            if key not in self.slots:
                changed.append(f"added parameter {qualified!r} (removed again)")
                del module._parameters[key[1]]
        for key, (qualified, module, p) in self.slots.items():
            if key not in now:
                changed.append(f"deleted parameter {qualified!r} (put back)")
                module._parameters[key[1]] = p
            elif module._parameters[key[1]] is not p:
                changed.append(f"replaced parameter {qualified!r} (the original put back)")
                module._parameters[key[1]] = p
        return changed

    def _restore_tensors(self) -> list[str]:
        """Put back ``requires_grad`` flags and (when kept) values that changed since."""
        changed = []
        for i, (qualified, p, flag, version) in enumerate(self.flags):
            if p.requires_grad != flag:
                changed.append(f"set {qualified}.requires_grad to {p.requires_grad} (put back)")
                p.requires_grad_(flag)
            saved = self.values[i] if self.values is not None else None
            if saved is not None and p._version != version and not torch.equal(p.detach(), saved):
                changed.append(f"changed the values of {qualified!r} (put back)")
                with torch.no_grad():
                    p.copy_(saved)
        return changed


def _contract_error(changed: list[str]) -> ProbeContractError:
    return ProbeContractError(
        "the probe closure changed the model's parameters: it "
        + "; ".join(changed)
        + ". A probe may only compute a loss through the model: move what changes parameters, "
        "their requires_grad or the set of parameters out of the probe closure"
    )


@contextlib.contextmanager
def isolated(
    model: nn.Module,
    *,
    second_order: bool = True,
    pin_kernels: bool | None = None,
    check_parameters: bool = True,
) -> Iterator[None]:
    """Restore ``.grad``, buffers, train/eval modes and global RNG states of ``model`` on exit,
    and the parameters (see the module doc: raises :class:`ProbeContractError` when they had
    changed). ``second_order`` marks a probe: its parameter values are checked too, and the
    model's gradient hooks are set aside (:func:`blockopt.curvature.hooks.
    without_gradient_hooks`: the probe measures the loss's Hessian, and a hook with state sees
    training's gradients only); ``pin_kernels`` (default: ``second_order``) runs the body under
    :func:`second_order_kernels`, which finite-difference probes do without.
    ``check_parameters=False`` leaves the parameters to their owner: FSDP registers its
    unsharded parameters in place of the sharded ones during a forward and backward."""
    if pin_kernels is None:
        pin_kernels = second_order
    registered = _Parameters.of(model, values=second_order) if check_parameters else None
    dtype = torch.get_default_dtype()
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
    failure: BaseException | None = None
    try:
        kernels = second_order_kernels() if pin_kernels else contextlib.nullcontext()
        hooks = without_gradient_hooks(model) if second_order else contextlib.nullcontext()
        with torch.enable_grad(), kernels, hooks:
            yield
    except BaseException as err:  # re-raised below, unless the probe's changes caused it
        failure = err
        raise
    finally:
        changed = registered.restore(model) if registered is not None else []
        if torch.get_default_dtype() != dtype:
            changed.append(
                f"set the default dtype to {torch.get_default_dtype()} (put back to {dtype})"
            )
            torch.set_default_dtype(dtype)
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
        if changed and (failure is None or isinstance(failure, Exception)):
            raise _contract_error(changed) from failure
