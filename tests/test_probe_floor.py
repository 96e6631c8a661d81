"""The probe-cost benchmark's floors: a step count is 'equal' exactly when its decisions match
the reference's, and blocks small enough for Lanczos to be exact cap both floors at their size."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import probe_floor

import blockopt


def _tiny() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.linspace(-2, 2, 16, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(3 * x)

    def probe() -> torch.Tensor:
        return ((model(x) - y) ** 2).mean()

    return model, probe


def test_floors_of_blocks_lanczos_solves_exactly() -> None:
    model, probe = _tiny()
    blocks = blockopt.partition(model)
    assert max(b.numel for b in blocks) == 3
    reference = blockopt.block_spectra(model, probe, blocks, steps=40)
    f = probe_floor.floor(model, probe, blocks, reference, seed=0, score_tol=0.1, factor_tol=0.25)
    assert f.blocks == len(blocks) == 4
    assert len(f.fixed) == probe_floor.MAX_STEPS
    # from 3 steps on every block's run is its whole spectrum: the reference's decisions
    assert all(miss == "" for miss in f.fixed[2:])
    assert f.fewest_steps is not None and f.fewest_steps <= 3
    assert f.fixed[f.fewest_steps - 1] == "" and all(f.fixed[: f.fewest_steps - 1])
    assert f.oracle_eps is not None and f.oracle_products is not None
    assert 1 <= f.oracle_products <= 3


def test_decisions_name_what_they_miss() -> None:
    model, probe = _tiny()
    reference = blockopt.block_spectra(model, probe, steps=40)
    ref = probe_floor.Decisions.of(reference)
    assert ref.misses(ref, 0.1, 0.25) == ""
    shifted = probe_floor.Decisions(
        ref.score + 0.5,
        ref.max_ratio,
        "adam" if ref.mode != "adam" else "sgd",
        {name: 2 * f for name, f in ref.factors.items()},
    )
    text = shifted.misses(ref, 0.1, 0.25)
    assert text.startswith("score +0.50") and "mode " in text and "factor 100%" in text
