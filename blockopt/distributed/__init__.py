"""Probing under ``torch.distributed``: DistributedDataParallel works, FSDP is refused.

- :mod:`blockopt.distributed.reductions`: averages over the ranks (the probe's loss, each
  Lanczos step's products, the blocks' statuses) that carry failure flags, so that ranks
  fail together.
- :mod:`blockopt.distributed.sharing`: a shared probe's blocks dealt out among the ranks, and
  their results gathered.
- :mod:`blockopt.distributed.wrappers`: the eager module under torch.compile / DDP /
  DataParallel wrappers, the DDP wrapper and its process group, FSDP detected and refused.
"""
