"""The probe's figures drawn in a worker process: the same image as drawn in the caller, never
lost (a dead or missing worker, a logger never closed), and never affected by the user's
matplotlib settings."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import warnings

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import blockopt
from blockopt.logging import figures, renderer
from blockopt.logging import tensorboard as tb
from blockopt.logging.renderer import FigureJob, FigureRenderer
from blockopt.logging.tensorboard import ProbeCost, TensorBoardLogger
from blockopt.workloads.data import digits
from blockopt.workloads.models import SmallCNN

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def probed():
    torch.manual_seed(0)
    model = SmallCNN(channels=4)
    d = digits(seed=0)
    x, y = d.x_train[:32], d.y_train[:32]
    spectra = blockopt.block_spectra(model, lambda: F.cross_entropy(model(x), y), steps=6)
    return spectra, blockopt.heterogeneity(spectra)


@pytest.fixture(scope="module")
def jobs(probed):
    spectra, score = probed
    return [
        ("densities", tb.density_arguments(spectra, score)),
        ("js_matrix", tb.js_arguments(score)),
    ]


def _size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_serve_answers_each_request_with_the_figure_render_draws(jobs):
    requests = io.BytesIO()
    for k, (kind, arguments) in enumerate(jobs):
        request = {"id": k, "kind": kind, "arguments": arguments, "format": "png", "dpi": 100}
        figures.write_message(requests, json.dumps(request).encode())
    bad = {"id": 9, "kind": "nonsense", "arguments": {}, "format": "png", "dpi": 100}
    figures.write_message(requests, json.dumps(bad).encode())
    requests.seek(0)
    replies = io.BytesIO()
    figures.serve(requests, replies)
    replies.seek(0)
    for k, (kind, arguments) in enumerate(jobs):
        assert json.loads(figures.read_message(replies)) == {"id": k, "error": None}
        data = figures.read_message(replies)
        assert data == figures.render(kind, arguments)
        assert data.startswith(PNG)
    assert json.loads(figures.read_message(replies)) == {
        "id": 9,
        "error": "KeyError: 'nonsense'",
    }
    assert figures.read_message(replies) == b""
    assert figures.read_message(replies) is None


def test_the_worker_draws_the_same_image_as_the_caller(jobs):
    drawer = FigureRenderer()
    try:
        done = [drawer.wait(drawer.submit(FigureJob(kind, arguments))) for kind, arguments in jobs]
        assert drawer._process is not None and drawer._process.poll() is None
        for job, (kind, arguments) in zip(done, jobs):
            assert job.error is None
            assert job.data == figures.render(kind, arguments)
        width, height = _size(done[0].data)
        assert width > 500 and height > 300
    finally:
        drawer.close()
    assert drawer._process is None


def test_a_dead_worker_loses_no_figure(jobs):
    drawer = FigureRenderer()
    kind, arguments = jobs[0]
    first = drawer.wait(drawer.submit(FigureJob(kind, arguments)))
    drawer._process.kill()
    drawer._process.wait()
    pending = drawer.submit(FigureJob(kind, arguments))  # to the dead worker, or drawn here
    assert drawer.wait(pending, timeout=30).data == first.data
    later = drawer.submit(FigureJob(kind, arguments))  # no worker now: drawn at once, here
    assert later.done and later.data == first.data and not drawer.alive
    drawer.close()


def test_without_an_interpreter_to_start_figures_are_drawn_here(jobs, monkeypatch):
    monkeypatch.setattr(renderer.sys, "executable", "/nonexistent/python")
    drawer = FigureRenderer()
    kind, arguments = jobs[1]
    job = drawer.submit(FigureJob(kind, arguments))
    assert job.done and job.data == figures.render(kind, arguments)
    assert not drawer.alive and drawer._process is None


def test_user_matplotlib_settings_do_not_reach_the_figures(jobs):
    kind, arguments = jobs[0]
    plain = figures.render(kind, arguments)
    # usetex would run LaTeX (not installed here: drawing would fail); the rest changes pixels
    user = {"text.usetex": True, "font.size": 30, "axes.facecolor": "red", "figure.dpi": 300}
    with matplotlib.rc_context(user):
        assert figures.render(kind, arguments) == plain
        assert matplotlib.rcParams["text.usetex"]  # and the user's settings are left as they were


def test_figures_reach_the_event_file_at_close(tmp_path, probed):
    spectra, score = probed
    logger = TensorBoardLogger(tmp_path)
    logger.log_probe(3, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
    assert len(logger._pending) == 2  # being drawn: log_probe did not wait for them
    logger.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    for tag, kind in (("blockopt/densities", "densities"), ("blockopt/js_matrix", "js_matrix")):
        (image,) = ea.Images(tag)
        arguments = (
            tb.density_arguments(spectra, score)
            if kind == "densities"
            else (tb.js_arguments(score))
        )
        assert image.step == 3
        assert image.encoded_image_string == figures.render(kind, arguments)
        assert (image.width, image.height) == _size(image.encoded_image_string)


def test_figures_done_during_training_are_written_without_waiting(tmp_path, probed):
    spectra, score = probed
    logger = TensorBoardLogger(tmp_path)
    logger.log_probe(0, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
    for _, _, job in logger._pending:
        logger._drawer.wait(job)
    logger.log_training(10, {"blockopt/score": 1.0})
    assert logger._pending == []
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    assert {"blockopt/densities", "blockopt/js_matrix"} <= set(ea.Tags()["images"])
    logger.close()


def test_a_figure_that_cannot_be_drawn_warns_once_and_logging_stops(tmp_path, probed):
    spectra, score = probed

    class Failing(FigureRenderer):
        def submit(self, job: FigureJob) -> FigureJob:
            job.finish(None, "ValueError: no room for the labels")
            return job

    logger = TensorBoardLogger(tmp_path, renderer=Failing())
    with pytest.warns(RuntimeWarning, match="blockopt/densities could not be drawn: ValueError"):
        logger.log_probe(0, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
    assert not logger.enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.close()


def test_a_logger_never_closed_still_writes_its_figures_at_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, torch.nn.functional as F, blockopt
        from blockopt.logging.tensorboard import ProbeCost, TensorBoardLogger
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        spectra = blockopt.block_spectra(model, lambda: F.cross_entropy(model(x), y), steps=4)
        score = blockopt.heterogeneity(spectra)
        logger = TensorBoardLogger({str(tmp_path)!r})
        logger.log_probe(5, spectra, score, "sgd", {{}}, ProbeCost(0.1, 1, 0.0))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    (image,) = ea.Images("blockopt/densities")
    assert image.step == 5 and image.encoded_image_string.startswith(PNG)
    assert np.prod(_size(image.encoded_image_string)) > 0


def test_the_density_figure_keeps_every_block_label_inside_it():
    """A left-out block's label carries its reason ("(negligible curvature)"): the left margin
    is sized for the widest label as drawn, notes included."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = ["features.0.weight", "features.0.bias", "a.very.long.block.name.of.a.model.bias"]
    grid = np.linspace(-3.0, 1.0, 41)
    matrix = np.ones((3, grid.size))
    matrix[1:] = np.nan
    reasons = {
        "features.0.bias": "negligible curvature: within the round-off of its products",
        "a.very.long.block.name.of.a.model.bias": "negligible curvature: within round-off",
    }
    fig = figures.draw_density(names, grid, matrix, reasons, {"features.0.weight": 1.0}, 0.0)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    labels = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in labels][1] == "features.0.bias (negligible curvature)"
    lefts = [t.get_window_extent(canvas.get_renderer()).x0 for t in labels]
    assert min(lefts) >= 0.0, lefts
