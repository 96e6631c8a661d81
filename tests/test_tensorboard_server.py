"""End to end: a real TensorBoard server, on a free localhost port, serves blockopt's run."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

import blockopt
from blockopt.tensorboard import ProbeCost, TensorBoardLogger

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


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
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            HOST,
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 90
        runs: list[str] = []
        while time.monotonic() < deadline and "demo" not in runs:
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited: {server.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                runs = get_json(f"{base}/data/runs")
            time.sleep(0.5)
        assert "demo" in runs
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
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
