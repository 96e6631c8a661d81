"""Reductions over the ranks: every rank's measurements averaged, every rank's failures shared.

Under DistributedDataParallel (DDP) every rank holds the same parameters and its own share of
the data, and the ranks combine what a probe measures by averaging: :func:`agree` averages the
probe's loss, :func:`agree_status` the blocks' statuses, and :func:`reduced_matvec` every
Hessian-vector product, packing the products of all running blocks into one flat buffer and
issuing one ``all_reduce`` per Lanczos step, from the calling thread only, so the collectives
run in the same order on every rank. With the same start vectors on every rank (they depend
only on the seed and the block's name) the Lanczos runs, the spectra and the decisions taken
from them are then the same on every rank, to the bit. :class:`RankMean` is the reduction
hook over a process group.

Ranks must fail together too, or the ranks still running would wait for a collective that
never comes. :func:`agree`, :func:`agree_value`, :func:`reduced_matvec` and
:func:`blockopt.distributed.sharing.gather_rows` therefore reduce a few failure flags (one per
kind in :data:`FAULT_KINDS`) along with the data; when any rank failed, every rank raises: the
failing rank its own error, the others :class:`ProbeFailedElsewhere`.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from blockopt.curvature.hvp import DoubleBackwardError
from blockopt.curvature.lanczos import ManyMatvec

__all__ = [
    "FAULT_KINDS",
    "ProbeFailedElsewhere",
    "RankMean",
    "RankSettingsError",
    "Reduce",
    "agree",
    "agree_settings",
    "agree_status",
    "agree_value",
    "canonical",
    "failed_alike",
    "fault_kind",
    "reduced_matvec",
]

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""A hook that returns the average of a tensor over the ranks (it may work in place)."""

FAULT_KINDS = ("non_finite", "double_backward", "out_of_memory", "probe_error")
"""What can make a probe fail, in the order ranks pick one when several kinds occurred."""

T = TypeVar("T")

_OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)
# torch's CPU allocator raises a plain RuntimeError when memory runs out
_OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


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
    if isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _OUT_OF_MEMORY_WORDS):
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
        self.failed_kinds: tuple[str, ...] = (kind,)  # every kind any rank failed with


class RankSettingsError(ValueError):
    """The ranks would probe with different settings, or at different points of training: their
    collectives would not pair up, so the probe would hang or crash in the process group."""


_HASHES, _HASH_BITS = 3, 8  # small hashes keep their mean of squares exact to ~1e-11 per rank


def canonical(value: Any) -> str:
    """``value`` as text that equal settings share on every rank: numbers as floats (so that
    1 and 1.0 agree), mappings by sorted key, sequences element by element."""
    if value is None or isinstance(value, (bool, str)):
        return repr(value)
    if isinstance(value, (int, float)):
        return repr(float(value))
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {canonical(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(canonical(v) for v in value) + ")"
    return repr(value)


def _hashes(value: str) -> tuple[float, ...]:
    """Small independent hashes of ``value`` (the same in every process, unlike hash())."""
    digest = zlib.crc32(value.encode())
    mask = (1 << _HASH_BITS) - 1
    return tuple(float((digest >> (_HASH_BITS * i)) & mask) for i in range(_HASHES))


def agree_settings(settings: Mapping[str, str], reduce: Reduce, device: torch.device) -> None:
    """Check that every rank gives the same ``settings`` (name -> canonical text) before a probe:
    each setting's three 8-bit hashes and their squares are averaged over the ranks in one
    reduction, and a setting whose hashes vary over the ranks (a variance above zero, which
    every rank computes alike; at least about 1/world when they differ) raises
    :class:`RankSettingsError` on every rank, naming the settings."""
    names = list(settings)
    if not names:
        return
    values = [h for name in names for h in _hashes(settings[name])]
    t = torch.tensor(values + [v * v for v in values], dtype=torch.float64, device=device)
    mean = reduce(t).cpu()
    n = len(values)
    variance = mean[n:] - mean[:n] ** 2
    k = _HASHES
    differ = [n for i, n in enumerate(names) if float(variance[k * i : k * i + k].max()) > 1e-6]
    if differ:
        raise RankSettingsError(
            f"the ranks differ in {', '.join(differ)} at this probe, so their collectives would "
            "not pair up: build the optimizer with the same options on every rank and call step() "
            "and observe_loss() on every rank alike (see docs/DISTRIBUTED.md)"
        )


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
    """Raise on every rank when any rank failed: this rank's own error, or the first kind.
    The error raised carries ``failed_kinds``, the kinds any rank failed with: the same on
    every rank, so that the ranks may take the same way out together (:func:`failed_alike`)."""
    failed = tuple(kind for kind, flag in zip(FAULT_KINDS, flags.tolist()) if flag > 0)
    if error is not None:
        error.failed_kinds = failed  # type: ignore[attr-defined]
        raise error
    if failed:
        elsewhere = ProbeFailedElsewhere(failed[0])
        elsewhere.failed_kinds = failed
        raise elsewhere


def failed_alike(err: BaseException, kind: str) -> bool:
    """Whether ``err``, raised by a reduction's failure flags, says that every rank that failed
    failed with ``kind``: a conclusion every rank draws alike."""
    return getattr(err, "failed_kinds", None) == (kind,)


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
