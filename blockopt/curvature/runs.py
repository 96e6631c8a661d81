"""A probe's Lanczos runs, block by block: start vectors, and runs shared out over ranks.

Start vectors depend only on the seed and the block's name (:func:`block_seed`), so every rank
draws the same ones and a block's estimate does not change when other blocks come or go. A
shared probe (``block_spectra(..., share=True)``) deals the blocks out among the ranks, runs each
rank's share alone and gathers every run as one float64 row per start vector.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from blockopt.curvature.blocks import Block
from blockopt.curvature.hvp import BlockHessian
from blockopt.curvature.lanczos import LanczosResult, lanczos_many, random_start
from blockopt.distributed.sharing import assign_blocks, gather_rows

__all__ = ["block_seed", "check_share", "share_costs", "shared_runs", "start_vectors"]


def block_seed(seed: int, name: str) -> int:
    """The seed of a block's start vectors: the probe's seed and the block's name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


_STATUSES = ("ok", "unused", "no_graph")
# A shared run's row: steps taken, breakdown + 2 * settled, status, round-off level (-1: none);
# then alphas, betas.
_HEADER = 4


def check_share(share: Any, reduce: Any) -> None:
    """Refuse ``share`` other than a bool, and a shared probe without a ``reduce`` that knows
    its group (a sum, this rank and the group's size are needed to split and gather) or from a
    process outside that group. Local checks only: they fail alike on every rank."""
    if not isinstance(share, bool):
        raise TypeError(f"share must be True or False, got {type(share).__name__} {share!r}")
    if not share:
        return
    if not all(callable(getattr(reduce, name, None)) for name in ("sum", "rank", "size")):
        raise TypeError(
            "share=True splits the blocks among the ranks, so it needs a reduce that knows its "
            "process group, e.g. reduce=blockopt.distributed.reductions.RankMean(group), got "
            f"{'no reduce' if reduce is None else type(reduce).__name__}"
        )
    if not 0 <= reduce.rank() < reduce.size():
        raise ValueError(
            f"this process is not in the group of the reduce (rank {reduce.rank()} of "
            f"{reduce.size()}); call block_spectra only on the group's ranks"
        )


def start_vectors(
    hessian: BlockHessian, blocks: Sequence[Block], indices: Iterable[int], probes: int, seed: int
) -> list[torch.Tensor]:
    """The start vectors of the blocks at ``indices``, ``probes`` per block: each block's depend
    only on ``seed`` and its name, so every rank draws the same ones. They are at least float32,
    and so is the Lanczos basis built from them: a bfloat16 basis loses its orthogonality at
    once (eps 2^-7) and a float16 one nearly so; the products still run in the parameters'
    dtype, which decides the round-off margin (:func:`blockopt.analysis.heterogeneity.
    roundoff_margin`)."""
    starts = []
    for i in indices:
        generator = torch.Generator().manual_seed(block_seed(seed, blocks[i].name))
        for _ in range(probes):
            starts.append(
                random_start(
                    blocks[i].numel,
                    generator=generator,
                    dtype=torch.promote_types(hessian.dtype(i), torch.float32),
                    device=hessian.device(i),
                )
            )
    return starts


def share_costs(blocks: Sequence[Block], steps: int) -> list[tuple[int, int]]:
    """Each block's estimated cost in a shared probe: the products its runs may take,
    ``min(steps, numel)`` (each is a backward pass through the shared graph, whose cost
    depends more on the graph than on the block), then its size (the reorthogonalisation and
    the block's own kernels). Depends only on the block list and ``steps``, which every rank
    shares."""
    return [(min(steps, b.numel), b.numel) for b in blocks]


def shared_runs(
    hessian: BlockHessian,
    blocks: Sequence[Block],
    group: Any,
    *,
    steps: int,
    probes: int,
    seed: int,
    tol: float | None,
    indices: Sequence[int] | None = None,
) -> tuple[list[LanczosResult], list[str], int]:
    """Lanczos on this rank's share of the blocks at ``indices`` (default: all of them), alone,
    then those blocks' runs and status from every rank in one collective
    (:func:`gather_rows`); also returns how many products this rank computed. A failure on any
    rank raises on all."""
    chosen = list(range(len(blocks))) if indices is None else list(indices)
    owners = assign_blocks(share_costs([blocks[i] for i in chosen], steps), group.size())
    rank = group.rank()
    mine = [chosen[k] for k, owner in enumerate(owners) if owner == rank]
    row_of = {i: k for k, i in enumerate(chosen)}
    rows = torch.full((len(chosen) * probes, _HEADER + 2 * steps - 1), -0.0, dtype=torch.float64)
    error: BaseException | None = None
    local = 0
    try:

        def matvec(ops: Sequence[int], vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return hessian.matvec_many([mine[op // probes] for op in ops], vs)

        runs = lanczos_many(
            matvec, start_vectors(hessian, blocks, mine, probes, seed), steps, tol=tol
        )
        for j, run in enumerate(runs):
            i = mine[j // probes]
            rows[row_of[i] * probes + j % probes] = _run_row(run, hessian.status(i), steps)
        local = sum(r.steps for r in runs)
    except Exception as err:  # reported to the other ranks, re-raised below
        error = err
        rows.fill_(-0.0)
    table = gather_rows(rows, error, group, hessian.device(0))
    runs = [_row_run(row, steps) for row in table.tolist()]
    status = [_row_status(table[k * probes].tolist()) for k in range(len(chosen))]
    return runs, status, local


def _run_row(run: LanczosResult, status: str, steps: int) -> torch.Tensor:
    """One Lanczos run as a float64 row: steps taken, ``breakdown + 2 * settled``, the block's
    status (1-based), the round-off level (``-1.0`` for none), then ``steps`` alphas and
    ``steps - 1`` betas, padded with ``-0.0``."""
    row = torch.full((_HEADER + 2 * steps - 1,), -0.0, dtype=torch.float64)
    flags = int(run.breakdown) + 2 * int(run.settled)
    roundoff = -1.0 if run.roundoff is None else run.roundoff
    row[:_HEADER] = torch.tensor(
        [run.steps, flags, _STATUSES.index(status) + 1, roundoff], dtype=torch.float64
    )
    row[_HEADER : _HEADER + run.steps] = torch.tensor(run.alphas, dtype=torch.float64)
    if run.betas:
        start = _HEADER + steps
        row[start : start + len(run.betas)] = torch.tensor(run.betas, dtype=torch.float64)
    return row


def _row_run(row: Sequence[float], steps: int) -> LanczosResult:
    """The Lanczos run a gathered row holds, its Ritz pairs computed from the tridiagonal, as
    on every rank: the same bits in, the same spectra out."""
    m = int(row[0])
    if not 1 <= m <= steps or not 1 <= row[2] <= len(_STATUSES):
        raise RuntimeError(
            "a shared probe gathered a block that no rank probed: the ranks disagree on the "
            "blocks, steps or group; give every rank the same model, blocks and options"
        )
    return LanczosResult.from_tridiagonal(
        row[_HEADER : _HEADER + m],
        row[_HEADER + steps : _HEADER + steps + m - 1],
        breakdown=bool(int(row[1]) & 1),
        settled=bool(int(row[1]) & 2),
        roundoff=None if row[3] < 0 else row[3],
    )


def _row_status(row: Sequence[float]) -> str:
    return _STATUSES[int(row[2]) - 1]
