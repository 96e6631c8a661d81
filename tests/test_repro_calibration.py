"""Reproduction part (d)'s gap measures and the threshold calibration, on hand-made records."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import repro_calibration as rc
import repro_training as rt

import blockopt


def _record(losses: list[float], *, acc: float | None = None) -> dict:
    """A training record with checkpoints every 10 steps, starting at loss 2.0."""
    checkpoints = [[10 * k, v] for k, v in enumerate([2.0, *losses])]
    return {
        "checkpoints": checkpoints,
        "train_loss": losses[-1],
        "test_loss": losses[-1] + 0.1,
        "test_acc": acc,
        "diverged": False,
    }


def test_gap_shares_and_reach_times() -> None:
    adam = _record([1.0, 0.5, 0.0], acc=0.9)
    sgd = _record([2.0, 1.0, 0.5], acc=0.8)
    g = rt.gap(sgd, adam)
    # SGD stays above Adam by 1.0 + 0.5 + 0.5 = 2.0; Adam removed 1.0 + 1.5 + 2.0 = 4.5.
    assert g["share_run"] == pytest.approx(2.0 / 4.5)
    assert g["share_final"] == pytest.approx(0.5 / 2.0)
    assert g["test_acc_diff"] == pytest.approx(-0.1)
    assert g["adam_reaches_sgd_final_at"] == pytest.approx(20 / 30)  # Adam is at 0.5 at step 20
    assert g["sgd_reaches_adam_final_at"] is None  # SGD never reaches 0.0
    assert g["sgd_halves_loss_at"] == pytest.approx(20 / 30)
    # Adam goes from 2.0 to 1.0 between steps 0 and 10: halved exactly at step 10.
    assert g["adam_halves_loss_at"] == pytest.approx(10 / 30)
    assert rt.gap(adam, adam)["share_run"] == 0.0


def test_reach_interpolates_in_log_loss() -> None:
    checkpoints = [[0, 1.0], [10, 0.01]]
    assert rt.reach_step(checkpoints, 0.1, 10) == pytest.approx(0.5)
    assert rt.reach_step([[0, 1.0], [10, math.inf]], 0.5, 10) is None


def test_mean_loss_ranks_a_spiky_run_below_a_smooth_one() -> None:
    smooth = _record([0.1, 0.01, 0.001])
    spiky = _record([4.0, 0.001, 0.0001])  # lower final loss, but a spike on the way
    assert rt.best_run([spiky, smooth]) == 1
    assert rt.mean_loss(smooth) == pytest.approx(0.037)


def _case(score: float, sgd_ok: bool, block_ok: bool | None = None) -> rc.Case:
    return rc.Case(f"m{score}, seed 0", "(d) init", score, sgd_ok, block_ok, "")


@pytest.mark.parametrize(
    ("case", "mode", "expected"),
    [
        (_case(0.1, True, True), "sgd", "right"),
        (_case(0.1, True, True), "block_sgd", "acceptable"),
        (_case(0.1, True), "adam", "unneeded"),
        (_case(3.0, False, False), "sgd", "wrong"),
        (_case(3.0, False, False), "block_sgd", "wrong"),
        (_case(3.0, False, True), "block_sgd", "right"),
        (_case(3.0, False), "block_sgd", "unknown"),
        (_case(3.0, False, False), "adam", "right"),
    ],
)
def test_verdicts(case: rc.Case, mode: str, expected: str) -> None:
    assert rc.verdict(case, mode) == expected


def test_margins() -> None:
    t = blockopt.Thresholds(sgd_below=1.0, adam_above=2.0, margin=0.25)
    assert rc.margins_met(_case(0.7, True), t) and not rc.margins_met(_case(0.8, True), t)
    assert rc.margins_met(_case(2.3, False, False), t)
    assert not rc.margins_met(_case(2.2, False, False), t)
    assert rc.margins_met(_case(1.3, False, True), t)  # block SGD keeps up: 1.25 suffices


def test_recommend_keeps_consistent_defaults_and_moves_inconsistent_ones() -> None:
    current = blockopt.Thresholds(sgd_below=1.0, adam_above=2.0)
    cases = [_case(0.4, True, True), _case(0.1, True, True), _case(3.5, False, False)]
    best, key = rc.recommend(cases, current)
    assert (best.sgd_below, best.adam_above) == (1.0, 2.0) and key[0] == 0
    # A lagging case at 1.9 where block SGD lags too: adam_above must drop below 1.9 - margin.
    cases.append(_case(1.9, False, False))
    best, key = rc.recommend(cases, current)
    assert key[:3] == (0, 0, -len(cases))
    assert (best.sgd_below, best.adam_above) == (1.0, 1.5)
    assert rc.evaluate(cases, current)["wrong"] == 1


def _part_b() -> dict:
    spectra = [{"spread": 3.4}, {"spread": 0.02}]
    return {
        "iterations_cap": 100,
        "results": {
            "heterogeneous": {
                "seeds": [0],
                "spectra": spectra[:1],
                "gd_grid": {"iters_1e-06": [None]},
                "block_max": {"iters_1e-06": [30]},
                "adam": {"iters_1e-06": [20]},
            },
            "homogeneous": {
                "seeds": [0],
                "spectra": spectra[1:],
                "gd_grid": {"iters_1e-06": [40]},
                "block_max": {"iters_1e-06": [80]},
                "adam": {"iters_1e-06": [20]},
            },
        },
    }


def test_calibration_with_missing_parts(tmp_path: Path) -> None:
    empty = rc.run(tmp_path, {})
    assert "Nothing to calibrate" in empty.markdown
    assert empty.data["missing"] == ["(a)", "(b)", "(d)"]
    section = rc.run(tmp_path, {"b": _part_b()})
    assert "part (d) did not run" in section.markdown
    cases = {c["label"]: c for c in section.data["cases"]}
    het = cases["quadratic, heterogeneous, seed 0"]
    hom = cases["quadratic, homogeneous, seed 0"]
    assert (het["sgd_ok"], het["block_ok"], het["default_pick"]) == (False, True, "adam")
    assert (hom["sgd_ok"], hom["block_ok"], hom["default_pick"]) == (True, False, "sgd")
    assert section.data["missing"] == ["(a)", "(d)"]
    assert (tmp_path / "calibration_scores.png").exists()


def test_small_blocks_far_below_pick_block_sgd_and_the_losses_are_tabled() -> None:
    """A case in SGD's band with max_ratio past block_ratio is judged as the policy picks it
    (block SGD with the rule set, acceptable where both keep up; SGD by default), and the
    block_ratio paragraph lists each setting's max_ratio range and part (d)'s training and
    test losses of SGD and block SGD."""
    t = blockopt.Thresholds(block_ratio=2.0)
    cnn = rc.Case("BatchNorm CNN, seed 0", "(a) init", 0.4, True, True, "", max_ratio=3.1)
    mlp = rc.Case("MLP (tanh), seed 0", "(a) init", 0.1, True, True, "", max_ratio=1.0)
    expected = {"unneeded": 0, "unknown": 0, "wrong": 0, "margins_met": 2, "cases": 2}
    assert rc.evaluate([cnn, mlp], t) == {"right": 1, "acceptable": 1, **expected}
    assert rc.evaluate([cnn, mlp], blockopt.Thresholds()) == {
        "right": 2,
        "acceptable": 0,
        **expected,
    }
    runs = {
        "sgd": [
            {"train_loss": 6e-4, "test_loss": 0.04, "lr": 0.1},
            {"train_loss": 4e-4, "test_loss": 0.03, "lr": 0.1},
        ],
        "adam": [],
    }
    block = {
        "runs": [
            {"train_loss": 1e-4, "test_loss": 0.07, "lr": 0.03},
            {"train_loss": 1.0, "diverged": True},
        ]
    }
    d = {"results": {"cnn": {"runs": runs, "block_sgd": block}}}
    text = rc.block_ratio_text([cnn, mlp], t, d)
    assert "BatchNorm CNN 3.10-3.10; MLP (tanh) 1.00-1.00" in text
    assert "`block_ratio=2` (entering needs 2.25, leaving 1.75)" in text
    row = (
        "| BatchNorm CNN | 0.0006 / 0.04 (lr 0.1), 0.0004 / 0.03 (lr 0.1) "
        "| 0.0001 / 0.07 (lr 0.03) | 5.0x | 2.00x |"
    )
    assert row in text
    assert "its held-out (test) loss is above SGD's median at every learning rate tried" in text
    off = rc.block_ratio_text([cnn, mlp], blockopt.Thresholds(), d)
    assert off.startswith("**`block_ratio`.** Off by default (`block_ratio=None`)")
    assert row in off
    block["runs"][0]["test_loss"] = 0.02  # below SGD's: the claim is not made
    assert "above SGD's median" not in rc.block_ratio_text([cnn, mlp], t, d)
    assert "part (d) did not run" in rc.block_ratio_text([cnn], t, None)
