"""The bundled data helpers: batches in epochs of shuffled examples."""

from __future__ import annotations

import torch

from blockopt.workloads import data


def test_epoch_batches_walk_one_permutation_per_epoch():
    batch = data.epoch_batches(10, 3, generator=torch.Generator().manual_seed(5))
    reference = torch.Generator().manual_seed(5)
    first, second = torch.randperm(10, generator=reference), torch.randperm(10, generator=reference)
    assert [batch(i).tolist() for i in range(3)] == [first[k : k + 3].tolist() for k in (0, 3, 6)]
    assert batch(3).tolist() == second[:3].tolist()  # 3 batches an epoch; the 10th example rests
    assert batch(0).tolist() == first[:3].tolist()  # earlier steps are not redrawn


def test_seeded_batches_draw_training_and_probe_batches_from_their_own_streams():
    batch, probe = data.seeded_batches(10, 3, seed=5)
    training = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    probing = torch.randperm(10, generator=torch.Generator().manual_seed(10_005))
    assert (
        batch(0).tolist() == training[:3].tolist() and batch(2).tolist() == training[6:9].tolist()
    )
    assert probe.tolist() == probing[:3].tolist()
