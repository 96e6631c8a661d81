"""The examples run, and what they print matches the API (the command line: test_cli.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import blockopt

ROOT = Path(__file__).resolve().parents[1]


def test_spectra_example_writes_loadable_json(tmp_path):
    out = tmp_path / "spectra.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "spectra_of_your_model.py"), str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    spectra = blockopt.Spectra.from_dict(json.loads(out.read_text()))
    assert len(spectra) == 37 and spectra.steps == 20
    q = spectra["blocks.0.attn.qkv.weight.q"]
    assert f"lambda_max={q.lambda_max:.3e}" in run.stdout


def _run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` in a fresh interpreter; its standard output."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_wrap_example_switches_a_transformer_to_adam_and_trains():
    out = _run_example("wrap_existing_optimizer.py")
    first = re.search(r"step    0  score ([\d.]+) decades  sgd -> adam", out)
    assert first and float(first.group(1)) > 1.5 + 0.25  # past adam_above by the margin
    assert "mode after 150 steps: adam" in out
    start, final = map(float, re.search(r"batch: ([\d.]+) at step 0, ([\d.]+) after", out).groups())
    assert start > 4.0 and final < start - 1.0


def test_tune_example_keeps_block_lrs_that_beat_sgd_at_the_same_base_lr(tmp_path):
    out_path = tmp_path / "lrs.json"
    out = _run_example("tune_and_keep_lrs.py", str(out_path))
    lrs = json.loads(out_path.read_text())
    from blockopt.workloads.models import TinyGPT

    model = TinyGPT()
    assert set(lrs) == {b.name for b in blockopt.partition(model)}
    assert min(lrs.values()) == pytest.approx(0.003) and max(lrs.values()) == pytest.approx(0.3)
    with pytest.warns(UserWarning, match="blocks.0.attn.qkv.weight trains at"):
        groups = blockopt.param_groups(model, lrs)
    assert f"{len(groups)} param groups for 37 blocks" in out

    def loss(label: str) -> float:
        return float(re.search(rf"final loss, SGD with {label}[^:]*: ([\d.]+)", out).group(1))

    single, kept = loss("one learning rate 0.003"), loss("kept per-block learning rates")
    assert kept < single - 0.1  # measured 2.456 against 2.661
    assert loss("one learning rate 0.1") < single


def test_monitor_example_logs_scores_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "runs" / "monitor"
    out = _run_example("monitor_with_tensorboard.py", str(logdir))
    assert f"tensorboard --logdir {logdir}" in out
    printed = [float(v) for v in re.findall(r"heterogeneity score ([\d.]+) decades  mode sgd", out)]
    events = EventAccumulator(str(logdir))
    events.Reload()
    scores = events.Scalars("blockopt/score")
    assert [e.step for e in scores] == [0, 50, 100, 150]
    assert [round(e.value, 2) for e in scores] == printed
    assert all(e.value < 1.0 for e in scores)  # a CNN: SGD territory
    assert [e.value for e in events.Scalars("blockopt/mode")] == [0.0] * 4  # monitor only
    accuracy = float(re.search(r"test accuracy ([\d.]+)", out).group(1))
    assert events.Scalars("final/test_accuracy")[0].value == pytest.approx(accuracy, abs=1e-3)
    assert accuracy > 0.9
