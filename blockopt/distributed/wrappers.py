"""The model inside its wrappers: torch.compile, DDP and DataParallel unwrapped, FSDP refused.

A probe runs on the eager module inside the wrappers (:func:`unwrap`): a compiled graph has no
double backward, and a second derivative does not go through DDP's gradient buckets. The DDP
wrapper itself (:func:`ddp_of`) names the process group a probe averages over
(:func:`probe_reduce`) and, with ``no_sync()`` (:func:`no_sync`), keeps a probe closure that
calls the wrapper from preparing a gradient reduction.

FullyShardedDataParallel (FSDP, ``FullyShardedDataParallel`` and ``fully_shard``) cannot be
probed: it all-gathers the sharded parameters outside autograd, so the loss has no derivative
with respect to the parameters autograd sees, let alone a second one.
:func:`refuse_sharded` names the cause and the fixes (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn

from blockopt.distributed.reductions import RankMean, Reduce

__all__ = [
    "ddp_of",
    "fully_sharded",
    "no_sync",
    "probe_reduce",
    "refuse_sharded",
    "sharded_by_fsdp",
    "unwrap",
]

_WRAPPER_TYPES = frozenset({"OptimizedModule", "DistributedDataParallel", "DataParallel"})
"""The classes (or their subclasses) that wrap a module: torch.compile's, DDP's, DataParallel's."""

_WRAPPED_ATTRS = ("_orig_mod", "module")
"""Where a wrapper holds the module it wraps (torch.compile's first, then DDP's/DataParallel's)."""


def _inner(model: Any) -> nn.Module | None:
    """The module ``model`` wraps when it is a wrapper (see :func:`unwrap`), else ``None``."""
    if not any(cls.__name__ in _WRAPPER_TYPES for cls in type(model).__mro__):
        return None
    for attr in _WRAPPED_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def _wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and the modules it wraps, outermost first, down to :func:`unwrap`'s result."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        yield model
        inner = _inner(model)
        if inner is None:
            return
        model = inner


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module under ``model``'s wrappers, in any nesting: the module to probe.

    A wrapper is a module whose class (or a base class of it) is named ``OptimizedModule``
    (``torch.compile``), ``DistributedDataParallel`` or ``DataParallel``; it holds the module
    it wraps in ``_orig_mod`` (torch.compile) or ``module`` (DDP, DataParallel). ``unwrap``
    follows those attributes until it reaches a module that is no wrapper, so
    ``unwrap(torch.compile(DDP(model)))`` and ``unwrap(DDP(torch.compile(model)))`` are both
    ``model``. Any other module, a user's own with a ``module`` attribute included, is
    returned as it is."""
    *_, eager = _wrappers(model)
    return eager


def ddp_of(model: nn.Module) -> nn.Module | None:
    """The ``DistributedDataParallel`` wrapper in ``model``'s chain of wrappers, if any."""
    for module in _wrappers(model):
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return module
    return None


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def probe_reduce(model: nn.Module, option: Any = None) -> Reduce | None:
    """The reduction a :class:`blockopt.BlockOptimizer` probes with. ``option`` ``None``: the
    mean over the DDP wrapper's process group when ``model`` is DDP and torch.distributed is
    initialised, over the mesh's group when it is sharded by ``fully_shard``, else none;
    ``True``: the mean over the DDP group or the default group;
    ``False``: none (each rank probes alone); a ``ProcessGroup``: the mean over it."""
    if option is False:
        return None
    ddp = ddp_of(model)
    if option is None:
        if not _initialized():
            return None
        if ddp is None and fully_sharded(model):
            return RankMean(mesh_group(model))  # the ranks FSDP shards over agree on losses
        if ddp is None:
            _warn_if_unreduced()
            return None
        return RankMean(getattr(ddp, "process_group", None))
    if not _initialized():
        raise RuntimeError(
            "distributed probing was asked for, but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) before building the optimizer, or pass "
            "distributed=None (detect DDP) or False (no reduction)"
        )
    if option is True:
        return RankMean(getattr(ddp, "process_group", None) if ddp is not None else None)
    import torch.distributed as dist

    if isinstance(option, dist.ProcessGroup):
        return RankMean(option)
    raise TypeError(
        "distributed must be None (detect DDP), True, False or a torch.distributed.ProcessGroup, "
        f"got {type(option).__name__}"
    )


def _warn_if_unreduced() -> None:
    """Warn when several processes train but the model handed over is not DDP: each rank would
    then probe only its own batch, and the ranks could decide differently."""
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        warnings.warn(
            f"torch.distributed runs {dist.get_world_size()} processes but the model is not "
            "DistributedDataParallel, so each rank probes alone and the ranks may switch modes "
            "at different steps; pass the DDP module itself (wrap(opt, ddp_model, ...)), or "
            "distributed=True to average the probes over the default group, or "
            "distributed=False to silence this",
            stacklevel=4,
        )


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync()`` when ``model`` is (or wraps) DDP: a probe closure that calls the DDP
    wrapper then prepares no gradient reduction; a null context otherwise."""
    ddp = ddp_of(model)
    return ddp.no_sync() if ddp is not None else contextlib.nullcontext()


def sharded_by_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules is sharded by FSDP (either version)."""
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__module__.startswith("torch.distributed.fsdp") and cls.__name__ in (
                "FullyShardedDataParallel",
                "FSDPModule",
            ):
                return True
    return False


def fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by ``fully_shard`` (FSDP2, whose parameters are DTensors,
    which blockopt probes by sharded finite differences), and not by ``FullyShardedDataParallel``
    (FSDP1, flat parameters, which it cannot probe)."""

    def has(name: str) -> bool:
        return any(any(c.__name__ == name for c in type(m).__mro__) for m in model.modules())

    return has("FSDPModule") and not has("FullyShardedDataParallel")


def mesh_group(model: nn.Module):
    """The process group of the (1-D) device mesh of ``model``'s first sharded parameter;
    ``None`` (the default group) when none is sharded."""
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            return mesh.get_group()
    return None


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise a ``TypeError`` naming the cause and the fixes for a model sharded by FSDP1 (a
    ``fully_shard`` model is probed; callers check :func:`fully_sharded` first)."""
    if sharded_by_fsdp(model):
        raise TypeError(
            f"{what} cannot probe a model sharded by FSDP (FullyShardedDataParallel, FSDP1): it "
            "all-gathers its flat parameters outside autograd, and they are not DTensors whose "
            "shards blockopt could move for finite differences. Either pass probe=None (the "
            "optimizer then trains in its mode without switching), shard the model with "
            "torch.distributed.fsdp.fully_shard (FSDP2), which blockopt probes by sharded finite "
            "differences, or train with DistributedDataParallel, which blockopt probes across "
            "ranks (docs/DISTRIBUTED.md)"
        )
