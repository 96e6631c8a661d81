"""The shared task registry: the probe's fixed batch is half a training batch, drawn from the
probe's own stream, and the training batches do not depend on its size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from blockopt.workloads import tasks


def value(loss: torch.Tensor) -> float:
    return loss.detach().item()


@pytest.mark.parametrize("key", ["cnn", "gpt"])
def test_the_probe_batch_is_the_first_half_of_a_training_size_batch(key):
    task = tasks.DEMO_TASKS[key]
    half, full = task.build(3), dataclasses.replace(task, probe_size=task.batch).build(3)
    assert half.probe_batch is not None and full.probe_batch is not None
    (hx, hy), (fx, fy) = half.probe_batch, full.probe_batch
    assert len(fx) == task.batch and len(hx) == task.batch // tasks.PROBE_SHARE
    assert torch.equal(hx, fx[: len(hx)]) and torch.equal(hy, fy[: len(hy)])
    # the probe's loss is the mean over its own batch, not over a training batch
    assert half.batch_loss is not None
    assert value(half.probe()) == pytest.approx(value(half.batch_loss(hx, hy)), rel=1e-6)
    # the probe's size moves no training batch: both runs draw the same ones
    for i in range(3):
        torch.manual_seed(0)
        a = value(half.train_loss(i))
        torch.manual_seed(0)
        b = value(full.train_loss(i))
        assert a == b
