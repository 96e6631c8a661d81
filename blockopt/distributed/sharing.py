"""Shared probes: the ranks split a probe's blocks among them and gather the results.

With ``share=True`` (the optimizer's default under DistributedDataParallel) each rank probes
only its share of the blocks: :func:`assign_blocks` deals the blocks out so that each rank's
share costs about the same, each rank runs Lanczos on its own blocks alone, with no per-step
collective, and :func:`gather_rows` hands every rank every block's tridiagonal in one
``all_reduce``, with the failure flags of :mod:`blockopt.distributed.reductions`. Each block's
spectrum is then that of the rank that probed it, and the per-rank cost of a probe falls as
``1/world``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from blockopt.distributed.reductions import FAULT_KINDS, _flags, _raise_if_failed

__all__ = ["assign_blocks", "gather_rows"]


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
