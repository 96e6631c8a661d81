"""Failed probes: what each kind of failure means and how to fix it, in the warning and the
TensorBoard text."""

from __future__ import annotations

from blockopt.distributed.reductions import fault_kind
from blockopt.optimizer.policy import ProbeFault

__all__ = ["fault_text", "probe_fault_kind"]

# What an allocator's RuntimeError says when memory ran out: torch's CPU allocator ("can't
# allocate memory"), CUDA, MPS and XPU ("out of memory") and the C library ("Cannot allocate").
_FAULT_FIXES = {
    "non_finite": (
        "the probe's loss or a Hessian-vector product is NaN or Inf",
        "check the probe's batch for NaN/Inf and lower the learning rate if the parameters "
        "diverged; compute the probe's loss in float32 or float64, not float16",
    ),
    "double_backward": (
        "an operation in the probe's graph has no second derivative",
        "take finite-difference products, which need no second derivative (backend='fd', "
        "which the default backend='auto' takes by itself), replace the operation by "
        "differentiable ones in the probe closure, or pass probe=None",
    ),
    "out_of_memory": (
        "the probe ran out of memory",
        "probe a smaller batch (in the probe closure), cut the largest blocks smaller "
        "(strategy='head', or a partition of your own), take fewer Lanczos steps (steps=) or "
        "start vectors (probes=), or probe less often (probe_every=)",
    ),
    "probe_error": (
        "the probe raised an error",
        "fix the probe closure (opt.probe_now() raises the error with its traceback), or pass "
        "probe=None",
    ),
}


def probe_fault_kind(err: BaseException) -> str:
    """The fault kind of an error raised while probing (:func:`fault_kind`, which also classes
    the CPU allocator's plain ``RuntimeError`` as ``"out_of_memory"``, on every rank alike)."""
    return fault_kind(err)


def fault_text(fault: ProbeFault, mode: str, next_step: int, failures: int) -> str:
    """The warning and TensorBoard text for a failed probe: what happened, the fix, what next."""
    cause, fix = _FAULT_FIXES[fault.kind]
    return (
        f"blockopt: the probe at step {fault.step} failed and was discarded: {cause} "
        f"({fault.message}). Fix: {fix}. Training goes on in mode {mode!r}; the next probe is "
        f"at step {next_step} ({failures} failed in a row; retries back off)"
    )
