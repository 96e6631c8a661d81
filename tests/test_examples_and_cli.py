"""The examples and the command line run, and what they print matches the API."""

from __future__ import annotations

import json
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


def test_cli_demo_prints_the_cnn_table():
    run = subprocess.run(
        [sys.executable, "-m", "blockopt", "demo", "--model", "cnn", "--steps", "5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "10 blocks, 6186 parameters" in run.stdout
    assert "classifier.weight" in run.stdout


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--model", "rnn"], []])
def test_cli_bad_usage_exits_2(argv):
    run = subprocess.run(
        [sys.executable, "-m", "blockopt", *argv], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
