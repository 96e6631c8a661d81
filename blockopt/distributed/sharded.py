"""Probe an FSDP (``fully_shard``) model where it lives: finite differences on sharded Lanczos.

Each rank keeps its shard of every block's Lanczos vectors, as FSDP keeps its shard of every
parameter. A product moves this rank's shard of the block's coordinates; FSDP's own forward
gathers the moved parameters and its backward reduce-scatters the gradients, so each rank reads
its shard of ``g_b(theta +- h v)`` (the gradient of the mean of the ranks' losses). Every dot
product, norm and reorthogonalisation coefficient is a partial sum added over the ranks by one
``all_reduce``, so every rank builds the same tridiagonal and gets the same spectra. Memory per
rank: ``1/world`` of the Lanczos bases. Whole-tensor blocks only (FSDP shards along the first
dimension, which a Q/K/V split would cut across).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from blockopt.curvature.blocks import Block
from blockopt.curvature.fd_hvp import FiniteDifferenceHessian, is_sharded
from blockopt.curvature.lanczos import LanczosResult, lanczos_many, random_start
from blockopt.distributed.wrappers import mesh_group

__all__ = ["sharded_runs"]


def _local_start(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole-parameter vector, as FSDP shards the parameter (rows split
    by ``torch.chunk`` over the ranks of its mesh)."""
    if not is_sharded(param):
        return full
    mesh = param.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    chunks = full.reshape(param.shape).chunk(world, dim=0)
    local = chunks[rank] if rank < len(chunks) else full.new_zeros((0, *param.shape[1:]))
    if local.shape != param.to_local().shape:
        raise RuntimeError(
            f"parameter of shape {tuple(param.shape)} is sharded as "
            f"{tuple(param.to_local().shape)} on rank {rank}, not in {world} row chunks; only "
            "fully_shard's default placement (Shard(0)) is supported"
        )
    return local.reshape(-1)


def sharded_runs(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    blocks: Sequence[Block],
    *,
    steps: int,
    probes: int,
    tol: float | None,
    seed_of: Callable[[str], int],
) -> tuple[list[LanczosResult], list[str], int, torch.dtype]:
    """Lanczos on every block of a sharded model (see the module doc): the runs, each block's
    status, the products computed (each one involves every rank) and the widest dtype."""
    group = mesh_group(model)

    def total(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    hessian = FiniteDifferenceHessian(model, probe, blocks, reduce_sum=total)
    starts, sizes = [], []
    for i, block in enumerate(blocks):
        generator = torch.Generator().manual_seed(seed_of(block.name))
        dtype = torch.promote_types(hessian.dtype(i), torch.float32)
        for _ in range(probes):
            full = random_start(block.numel, generator=generator, dtype=dtype)
            pieces, offset = [], 0
            for part in block.parts:
                piece = full[offset : offset + part.numel]
                offset += part.numel
                pieces.append(_local_start(piece, part.param).to(hessian.device(i)))
            starts.append(torch.cat(pieces))
            sizes.append(block.numel)

    def matvec(ops: Sequence[int], vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return hessian.matvec_many([op // probes for op in ops], vs)

    runs = lanczos_many(matvec, starts, steps, tol=tol, reduce_sum=total, sizes=sizes)
    status = [hessian.status(i) for i in range(len(blocks))]
    dtype = hessian.dtype(0)
    for i in range(1, len(blocks)):
        dtype = torch.promote_types(dtype, hessian.dtype(i))
    return runs, status, sum(r.steps for r in runs), dtype
