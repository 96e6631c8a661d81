"""Callbacks that run a :class:`~blockopt.BlockOptimizer` inside a training framework.

- :mod:`blockopt.integrations.lightning`: ``BlockoptCallback`` for PyTorch Lightning
  (``lightning.pytorch`` or ``pytorch_lightning``);
- :mod:`blockopt.integrations.transformers`: ``BlockoptCallback`` for the Hugging Face
  ``Trainer``.

Each feeds the trainer's training losses to the optimizer, logs blockopt's values through the
trainer's own loggers, passes the trainer's gradient clipping to the learning-rate trials and
closes blockopt when training ends. This package imports neither framework (nor does
``import blockopt``): import the submodule for the framework you use; one whose framework is
missing raises an ``ImportError`` naming the package to install.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from blockopt.optimizer.block_optimizer import BlockOptimizer

__all__: list[str] = []


def _block_optimizer(optimizer: Any) -> BlockOptimizer | None:
    """The BlockOptimizer behind a framework's optimizer wrapper (Lightning's
    ``LightningOptimizer``, which also passes ``isinstance`` checks for the class it wraps, and
    accelerate's ``AcceleratedOptimizer``), or ``None``."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "_optimizer", None)  # LightningOptimizer
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
        elif isinstance(optimizer, BlockOptimizer):
            return optimizer
        else:
            optimizer = getattr(optimizer, "optimizer", None)  # AcceleratedOptimizer
    return None


def _values(opt: BlockOptimizer, prefix: str = "blockopt") -> dict[str, float]:
    """``opt.metrics()`` under ``prefix``, with the applied learning rate of every param group
    beyond the first as ``<prefix>/lr_applied_pg<i>`` (the first group's is ``lr_applied``)."""
    values = {prefix + key[len("blockopt") :]: value for key, value in opt.metrics().items()}
    for i, lr in enumerate(opt.applied_lrs[1:], start=1):
        values[f"{prefix}/lr_applied_pg{i}"] = float(lr)
    return values


def _settings(opt: BlockOptimizer, prefix: str = "blockopt") -> dict[str, Any]:
    """``opt.hparams()`` with every key under ``prefix``, so that it cannot collide with a
    model's own hyperparameters (``lr``, say) in a shared HParams table."""
    return {f"{prefix}/{key}": value for key, value in opt.hparams().items()}


def _scalar(value: Any) -> float | None:
    """A one-element tensor or a real number as a float; ``None`` for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _loss_of(outputs: Any, key: str = "loss") -> float | None:
    """The loss in a training step's outputs: the output itself when it is a scalar, else its
    ``key`` entry; ``None`` when there is none."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get(key)
    return _scalar(outputs)


def _finite_floats(values: Mapping[str, Any], skip: str = "blockopt") -> dict[str, float]:
    """The finite scalar entries of ``values`` as floats, leaving out keys starting ``skip``
    (blockopt's own values, which ``BlockOptimizer.close`` adds itself)."""
    out = {}
    for key, value in values.items():
        number = _scalar(value)
        if number is not None and math.isfinite(number) and not str(key).startswith(skip):
            out[str(key)] = number
    return out
