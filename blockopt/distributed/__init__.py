"""Probing under torch.distributed: reductions over ranks, a probe's blocks shared."""
