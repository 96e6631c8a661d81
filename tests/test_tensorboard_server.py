"""End to end: a real TensorBoard server, on a free localhost port, serves blockopt's run."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

import blockopt
from blockopt.logging.tensorboard import ProbeCost, TensorBoardLogger, tensorboard_server


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def logged_run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    spectra = blockopt.block_spectra(
        model, lambda: torch.nn.functional.cross_entropy(model(x), y), steps=6
    )
    run = tmp_path / "runs" / "demo"
    logger = TensorBoardLogger(run, figures=False)
    logger.log_probe(3, spectra, blockopt.heterogeneity(spectra), "sgd", {}, ProbeCost(0.1, 1, 0.0))
    logger.close()
    return tmp_path / "runs", spectra


def test_tensorboard_server_lists_the_run_and_blockopt_tags(logged_run):
    logdir, spectra = logged_run
    with tensorboard_server(logdir, run="demo", reload_interval=1) as base:
        assert "demo" in get_json(f"{base}/data/runs")
        tags = get_json(f"{base}/data/plugin/scalars/tags")["demo"]
        expected = {"blockopt/score", "blockopt/mode", "blockopt/probe_share"}
        expected |= {f"blockopt.lambda_max/{name}" for name in spectra}
        assert expected <= set(tags)
        series = get_json(
            f"{base}/data/plugin/scalars/scalars?run=demo&tag=blockopt.lambda_max/0.weight"
        )
        (_wall_time, step, value) = series[0]
        assert step == 3
        assert value == pytest.approx(spectra["0.weight"].lambda_max, rel=1e-6)
        histograms = get_json(f"{base}/data/plugin/histograms/tags")["demo"]
        assert {f"blockopt.density/{name}" for name in spectra} <= set(histograms)


def test_tensorboard_server_names_a_run_that_never_shows_up(logged_run):
    logdir, _ = logged_run
    with pytest.raises(RuntimeError, match=r"no run 'absent' in 3 s"):  # noqa: SIM117
        with tensorboard_server(logdir, run="absent", timeout=3):
            pass
