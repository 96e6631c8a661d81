"""Probing under ``torch.distributed``: DistributedDataParallel works, FSDP is refused.

Under DistributedDataParallel (DDP) every rank holds the same parameters and its own share of
the data. A probe runs on the plain module inside the wrapper (a second derivative does not go
through DDP's gradient buckets), and the ranks combine what they measure by averaging every
Hessian-vector product: :func:`reduced_matvec` packs the products of all running blocks into
one flat buffer and issues one ``all_reduce`` per Lanczos step, from the calling thread only,
so the collectives run in the same order on every rank. With the same start vectors on every
rank (they depend only on the seed and the block's name) the Lanczos runs, the spectra and the
decisions taken from them are then the same on every rank, to the bit.

With ``share=True`` (the optimizer's default under DDP) the ranks split the work instead:
:func:`assign_blocks` deals the blocks out so that each rank's share costs about the same, each
rank runs Lanczos on its own blocks alone, with no per-step collective, and :func:`gather_rows`
hands every rank every block's tridiagonal in one ``all_reduce``. Each block's spectrum is then
that of the rank that probed it, and the per-rank cost of a probe falls as ``1/world``.

Ranks must fail together too, or the ranks still running would wait for a collective that
never comes. :func:`agree` (the probe's loss), :func:`reduced_matvec` (each Lanczos step) and
:func:`gather_rows` (a shared probe's results) therefore reduce a few failure flags along with
the data; when any rank failed, every rank
raises: the failing rank its own error, the others :class:`ProbeFailedElsewhere`.

FullyShardedDataParallel (FSDP, ``FullyShardedDataParallel`` and ``fully_shard``) cannot be
probed: it all-gathers the sharded parameters outside autograd, so the loss has no derivative
with respect to the parameters autograd sees, let alone a second one.
:func:`refuse_sharded` names the cause and the fixes (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from blockopt.curvature.hvp import DoubleBackwardError
from blockopt.curvature.lanczos import ManyMatvec

__all__ = [
    "FAULT_KINDS",
    "ProbeFailedElsewhere",
    "RankMean",
    "Reduce",
    "agree",
    "agree_status",
    "agree_value",
    "assign_blocks",
    "ddp_of",
    "fault_kind",
    "gather_rows",
    "no_sync",
    "probe_reduce",
    "reduced_matvec",
    "refuse_sharded",
    "sharded_by_fsdp",
]

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""A hook that returns the average of a tensor over the ranks (it may work in place)."""

FAULT_KINDS = ("non_finite", "double_backward", "out_of_memory", "probe_error")
"""What can make a probe fail, in the order ranks pick one when several kinds occurred."""

T = TypeVar("T")

_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def fault_kind(err: BaseException) -> str:
    """Which of :data:`FAULT_KINDS` an error raised while probing is."""
    kind = getattr(err, "kind", None)
    if kind in FAULT_KINDS:
        return kind
    if isinstance(err, FloatingPointError):
        return "non_finite"
    if isinstance(err, DoubleBackwardError):
        return "double_backward"
    if isinstance(err, _OUT_OF_MEMORY):
        return "out_of_memory"
    return "probe_error"


class ProbeFailedElsewhere(RuntimeError):
    """The probe failed on another rank; every rank discards it so that all stay in step."""

    def __init__(self, kind: str) -> None:
        super().__init__(
            f"the probe failed on another rank ({kind.replace('_', ' ')}); that rank's warning "
            "names the cause. Every rank discards the probe, so the ranks stay in step"
        )
        self.kind = kind


@dataclass(frozen=True)
class RankMean:
    """A :data:`Reduce` hook: the average over the ranks of ``group`` (``None``: the default
    group), by a sum ``all_reduce`` in place and a division by the group's size."""

    group: Any = None

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.div_(dist.get_world_size(self.group))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of ``group``, by an ``all_reduce`` in place."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def rank(self) -> int:
        """This process's rank in ``group``."""
        import torch.distributed as dist

        return dist.get_rank(self.group)

    def size(self) -> int:
        """The number of ranks in ``group``."""
        import torch.distributed as dist

        return dist.get_world_size(self.group)


def _flags(error: BaseException | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    flags = torch.zeros(len(FAULT_KINDS), dtype=dtype, device=device)
    if error is not None:
        flags[FAULT_KINDS.index(fault_kind(error))] = 1
    return flags


def _raise_if_failed(flags: torch.Tensor, error: BaseException | None) -> None:
    """Raise on every rank when any rank failed: this rank's own error, or the first kind."""
    failed = [kind for kind, flag in zip(FAULT_KINDS, flags.tolist()) if flag > 0]
    if error is not None:
        raise error
    if failed:
        raise ProbeFailedElsewhere(failed[0])


def agree(
    action: Callable[[], T],
    reduce: Reduce,
    value: Callable[[T], float],
    device: torch.device | str = "cpu",
) -> T:
    """Run ``action`` on this rank and average ``value(result)`` (the probe's loss) over the
    ranks with one reduction that also carries failure flags. Raises on every rank when any
    rank failed, or (``FloatingPointError``) when the average is not finite; returns
    ``action()``'s result otherwise."""
    results: list[T] = []

    def compute() -> float:
        results.append(action())
        return value(results[0])

    mean = agree_value(compute, reduce, device)
    if not math.isfinite(mean):
        raise FloatingPointError(
            f"the probe's loss averaged over the ranks is {mean}; curvature is undefined there. "
            "Check every rank's probe batch and the model for NaN/Inf"
        )
    return results[0]


def agree_value(
    compute: Callable[[], float], reduce: Reduce, device: torch.device | str = "cpu"
) -> float:
    """The average over the ranks of ``compute()`` (which may be infinite), in one reduction
    that also carries failure flags: raises on every rank when ``compute`` raised on any."""
    error: BaseException | None = None
    local = math.nan
    try:
        local = float(compute())
    except Exception as err:  # reported to the other ranks, re-raised below
        error = err
    buffer = torch.cat(
        [
            torch.tensor([0.0 if error is not None else local], dtype=torch.float64),
            _flags(error, torch.float64, torch.device("cpu")),
        ]
    ).to(device)
    buffer = reduce(buffer).cpu()
    _raise_if_failed(buffer[1:], error)
    return float(buffer[0])


def agree_status(status: Sequence[str], reduce: Reduce, device: torch.device | str) -> list[str]:
    """Every block's status as the ranks agree on it: ``"ok"`` when its Hessian reached any
    rank, ``"unused"`` when no rank's loss used it, else ``"no_graph"``. One reduction; the
    statuses decide which blocks the score keeps, so they must be the same on every rank."""
    local = torch.tensor([[s == "ok", s == "unused"] for s in status], dtype=torch.float64).reshape(
        -1
    )
    mean = reduce(local.to(device)).cpu().reshape(-1, 2)
    return [
        "ok" if ok > 0 else "unused" if unused >= 1 else "no_graph" for ok, unused in mean.tolist()
    ]


def reduced_matvec(matvec: ManyMatvec, reduce: Reduce) -> ManyMatvec:
    """``matvec`` with its products averaged over the ranks: one reduction per call of one flat
    buffer (every product, in the widest dtype of the vectors, then the failure flags)."""

    def run(indices: Sequence[int], vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in vectors))
        device = vectors[0].device
        error: BaseException | None = None
        try:
            products = [p.reshape(-1) for p in matvec(indices, vectors)]
            if [p.numel() for p in products] != [v.numel() for v in vectors]:
                raise ValueError(
                    f"matvec returned products of sizes {[p.numel() for p in products]} for "
                    f"vectors of sizes {[v.numel() for v in vectors]}"
                )
        except Exception as err:  # reported to the other ranks, re-raised below
            error = err
            products = [torch.zeros(v.numel(), dtype=dtype, device=device) for v in vectors]
        flat = torch.cat(
            [p.to(device=device, dtype=dtype) for p in products] + [_flags(error, dtype, device)]
        )
        flat = reduce(flat)
        _raise_if_failed(flat[-len(FAULT_KINDS) :], error)
        out, offset = [], 0
        for v in vectors:
            n = v.numel()
            out.append(flat[offset : offset + n].to(dtype=v.dtype, device=v.device))
            offset += n
        return out

    return run


def assign_blocks(costs: Sequence[Sequence[float]], world_size: int) -> list[int]:
    """The rank that probes each block in a shared probe, from each block's estimated cost (a
    tuple compared lexicographically; :func:`blockopt.block_spectra` passes its bound on
    the block's products, then its size). Greedy longest-processing-time: the blocks, costliest
    first (ties by index), go one by one to the rank with the least cost so far (ties to the
    lower rank), so the ranks' totals differ by at most the largest block's cost. Pure and
    deterministic: every rank computes the same assignment from the same list."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    width = len(costs[0]) if costs else 0
    if any(len(c) != width for c in costs):
        raise ValueError("every block's cost must have the same number of components")
    order = sorted(range(len(costs)), key=lambda i: (tuple(-c for c in costs[i]), i))
    loads = [(0,) * width] * world_size
    owners = [0] * len(costs)
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] = tuple(a + c for a, c in zip(loads[rank], costs[i]))
    return owners


def gather_rows(
    rows: torch.Tensor,
    error: BaseException | None,
    group: Any,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Every rank's rows of a table that each rank fills only in the rows it owns, holding
    ``-0.0`` in the others: one sum ``all_reduce`` (``group.sum``, e.g. :meth:`RankMean.sum`)
    of the table in float64 and the failure flags. Since ``x + (-0.0) == x`` for every float,
    signed zeros included, the sum hands every rank the owner's bits, whatever the order of the
    additions. Raises on every rank when any rank failed (``error`` is this rank's failure)."""
    shape = rows.shape
    flat = torch.cat(
        [rows.reshape(-1).to(torch.float64), _flags(error, torch.float64, rows.device)]
    ).to(device)
    flat = group.sum(flat).cpu()
    _raise_if_failed(flat[-len(FAULT_KINDS) :], error)
    return flat[: -len(FAULT_KINDS)].reshape(shape)


def _wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and the modules it wraps (torch.compile, DDP, DataParallel), outermost first."""
    seen = set()
    while isinstance(model, nn.Module) and id(model) not in seen:
        seen.add(id(model))
        yield model
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return
        model = inner


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
    initialised, else none; ``True``: the mean over the DDP group or the default group;
    ``False``: none (each rank probes alone); a ``ProcessGroup``: the mean over it."""
    if option is False:
        return None
    ddp = ddp_of(model)
    if option is None:
        if not _initialized():
            return None
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


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise a ``TypeError`` naming the cause and the fixes when ``model`` is sharded by FSDP."""
    if sharded_by_fsdp(model):
        raise TypeError(
            f"{what} cannot probe a model sharded by FSDP (FullyShardedDataParallel or "
            "fully_shard): FSDP all-gathers the sharded parameters outside autograd, so the loss "
            "has no derivative with respect to the parameters autograd sees, and no second "
            "derivative for a Hessian-vector product. Either pass probe=None (the optimizer then "
            "trains in its mode without switching), probe an unsharded copy of the model with "
            "blockopt.block_spectra, or train with DistributedDataParallel, which blockopt "
            "probes across ranks (docs/DISTRIBUTED.md)"
        )
