"""TensorBoard logging: event files read back must hold exactly what the probes measured."""

from __future__ import annotations

import re
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar.layout_pb2 import Layout

import blockopt
from blockopt.logging import tensorboard as tb
from blockopt.logging.tensorboard import ProbeCost, TensorBoardLogger, histogram_buckets
from blockopt.optimizer.policy import Decision
from blockopt.workloads.data import digits
from blockopt.workloads.models import SmallCNN
from blockopt.workloads.tasks import DEMO_TASKS

EVERYTHING = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0}


def read(logdir) -> EventAccumulator:
    ea = EventAccumulator(str(logdir), size_guidance=EVERYTHING)
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def probed():
    torch.manual_seed(0)
    model = SmallCNN(channels=4)
    d = digits(seed=0)
    x, y = d.x_train[:32], d.y_train[:32]
    spectra = blockopt.block_spectra(model, lambda: F.cross_entropy(model(x), y), steps=8)
    return spectra, blockopt.heterogeneity(spectra)


def test_scalars_histograms_and_figures_hold_the_probe(tmp_path, probed):
    spectra, score = probed
    lrs = {name: 0.01 * (i + 1) for i, name in enumerate(spectra)}
    cost = ProbeCost(seconds=0.25, hvps=spectra.hvps, share=0.125)
    logger = TensorBoardLogger(tmp_path)
    logger.log_probe(7, spectra, score, "block_sgd", lrs, cost)
    logger.close()
    ea = read(tmp_path)

    def scalar(tag: str) -> tuple[int, float]:
        (event,) = ea.Scalars(tag)
        return event.step, event.value

    assert scalar("blockopt/score") == (7, pytest.approx(score.spread, rel=1e-6))
    assert scalar("blockopt/max_ratio")[1] == pytest.approx(score.max_ratio, rel=1e-6)
    assert scalar("blockopt/js")[1] == pytest.approx(score.js, rel=1e-6)
    assert scalar("blockopt/mode")[1] == 1.0
    assert scalar("blockopt/probe_seconds")[1] == 0.25
    assert scalar("blockopt/probe_hvps")[1] == spectra.hvps
    assert scalar("blockopt/probe_share")[1] == 0.125
    included = [lrs[name] for name in score.blocks]
    assert scalar("blockopt/lr_max")[1] == pytest.approx(max(included), rel=1e-6)
    assert scalar("blockopt/lr_min")[1] == pytest.approx(min(included), rel=1e-6)
    assert score.excluded  # the CNN's conv biases feeding BatchNorm: round-off curvature
    for name in score.blocks:
        s = spectra[name]
        assert scalar(f"blockopt.lambda_max/{name}")[1] == pytest.approx(s.lambda_max, rel=1e-6)
        assert scalar(f"blockopt.lr/{name}")[1] == pytest.approx(lrs[name], rel=1e-6)
        (hist,) = ea.Histograms(f"blockopt.density/{name}")
        h = hist.histogram_value
        assert hist.step == 7
        assert h.num == pytest.approx(s.numel)
        assert h.min == pytest.approx(min(s.ritz_values)) == pytest.approx(s.lambda_min)
        assert h.max == pytest.approx(max(s.ritz_values))
        mean = sum(v * w for v, w in zip(s.ritz_values, s.ritz_weights))
        assert h.sum == pytest.approx(s.numel * mean, rel=1e-9, abs=1e-12)
        assert h.sum == pytest.approx(s.trace, rel=1e-6, abs=1e-12)
        assert sum(h.bucket) == pytest.approx(s.numel)
    scalars, histograms = set(ea.Tags()["scalars"]), set(ea.Tags()["histograms"])
    assert len(scalars) == 9 + 2 * len(score.blocks)
    for name, _why in score.excluded:
        assert not {t for t in scalars | histograms if t.endswith(f"/{name}")}
    (scales,) = ea.Histograms("blockopt/log10_scale")
    assert scales.histogram_value.num == len(score.blocks)
    assert sum(scales.histogram_value.bucket) == len(score.blocks)
    (summary,) = ea.Tensors("blockopt/summary/text_summary")
    body = summary.tensor_proto.string_val[0].decode()
    assert summary.step == 7 and f"score {score.spread:.3g} decades" in body
    assert all(f"| {name} |" in body for name in score.blocks)
    assert all(f"| {name} (left out: negligible" in body for name, _ in score.excluded)
    assert {"blockopt/densities", "blockopt/js_matrix"} <= set(ea.Tags()["images"])
    (image,) = ea.Images("blockopt/densities")
    assert image.step == 7 and image.width > 100 and image.height > 100


def test_histogram_buckets_put_each_ritz_value_where_it_belongs():
    s = blockopt.BlockSpectrum(
        name="b",
        numel=10,
        ritz_values=(-1.0, 0.0, 3.0),
        ritz_weights=(0.2, 0.3, 0.5),
        lambda_max=3.0,
        lambda_min=-1.0,
        trace=1.2,
    )
    limits, counts = histogram_buckets(s, buckets=4)
    assert limits == [0.0, 1.0, 2.0, 3.0]
    assert counts == pytest.approx([2.0 + 3.0, 0.0, 0.0, 5.0])
    single = blockopt.BlockSpectrum("c", 1, (2.5,), (1.0,), 2.5, 2.5, 2.5)
    assert histogram_buckets(single) == ([2.5], [1.0])


def test_switch_text_custom_scalars_and_hparams(tmp_path, probed):
    spectra, score = probed
    logger = TensorBoardLogger(tmp_path, figures=False)
    logger.log_probe(0, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
    logger.log_decision(Decision(0, 0.5, "sgd", "sgd", "stay: fine"))
    logger.log_decision(Decision(50, 2.6, "sgd", "adam", "score 2.60 > 2"))
    logger.close({"lr": 0.1, "mode": "sgd", "thresholds": (1.0, 2.0)}, {"final/loss": 0.75})
    ea = read(tmp_path)
    (text,) = ea.Tensors("blockopt/switches/text_summary")
    assert text.step == 50
    body = text.tensor_proto.string_val[0].decode()
    assert "sgd → adam" in body and "score 2.60 > 2" in body
    layout = Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    assert titles == ["blockopt", "blockopt: lambda_max per block", "blockopt: lr per block"]
    tags = set(ea.Tags()["scalars"])
    overview = layout.category[0]
    for chart in overview.chart:  # every overview chart draws logged top-level scalars
        for t in chart.multiline.tag:
            assert re.fullmatch(r"\^blockopt(/|\\\.mode_lr/|\\\.train/)\w+\$", t), t
    exact = [t[1:-1].replace("\\", "") for c in overview.chart for t in c.multiline.tag]
    # (the learning-rate and every-10-steps tags need more steps than this run takes)
    assert all(t in tags for t in exact if "lr" not in t and ".train/" not in t)
    per_block = layout.category[1]
    charts = {chart.title: list(chart.multiline.tag) for chart in per_block.chart}
    extremes = charts.pop("3 stiffest and 3 flattest blocks")
    assert len(extremes) == 6
    assert list(charts) == list(tb.block_groups(list(score.blocks)))
    drawn = []
    for regexes in charts.values():
        matched = [t for t in tags if any(re.search(r, t) for r in regexes)]
        assert 1 <= len(matched) == len(regexes) <= 6  # a handful of lines, each a block
        drawn += matched
    assert sorted(drawn) == sorted(f"blockopt.lambda_max/{name}" for name in score.blocks)
    assert set(ea.PluginTagToContent("hparams")) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    assert ea.Scalars("final/loss")[0].value == 0.75
    assert not ea.Tags()["images"]


def test_a_failing_writer_warns_once_and_training_goes_on(probed):
    spectra, score = probed

    class FullDisk:
        calls = 0

        def add_scalar(self, *args, **kwargs):
            FullDisk.calls += 1
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    logger = TensorBoardLogger(writer=FullDisk())
    with pytest.warns(RuntimeWarning, match="No space left on device") as caught:
        logger.log_probe(0, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
    assert len(caught) == 1 and "logging is off" in str(caught[0].message)
    assert not logger.enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_probe(1, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
        logger.log_decision(Decision(1, 3.0, "sgd", "adam", "r"))
        logger.close({"lr": 0.1}, {"m": 1.0})
    assert FullDisk.calls == 1


def test_a_full_disk_gives_one_warning_and_no_traceback(tmp_path, probed, monkeypatch):
    """The writer's own thread dies on the failed write; its traceback is not printed (the
    hook it would go to sees nothing), and blockopt's one warning says what happened."""
    spectra, score = probed
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    logger = TensorBoardLogger(tmp_path, figures=False)
    async_writer = logger.writer._get_file_writer().event_writer._async_writer

    def full(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    async_writer._writer.write = full
    with pytest.warns(RuntimeWarning, match="No space left on device") as caught:
        for step in range(3):
            logger.log_probe(step, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
    assert len(caught) == 1 and not logger.enabled
    async_writer._worker.join(timeout=10)
    assert not async_writer._worker.is_alive()
    assert isinstance(async_writer._worker.exception, OSError)
    assert seen == []  # no traceback printed for the writer's thread
    other = threading.Thread(target=lambda: 1 / 0)  # every other thread's error still shows
    other.start()
    other.join()
    assert [type(args.exc_value) for args in seen] == [ZeroDivisionError]


def test_an_unwritable_log_directory_warns_once(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="could not create the writer"):
        logger = TensorBoardLogger(blocker / "runs")
    assert not logger.enabled and logger.logdir is None


def test_only_rank_zero_writes(tmp_path, probed, monkeypatch):
    spectra, score = probed
    monkeypatch.setattr(tb, "_rank", lambda: 1)
    logger = TensorBoardLogger(tmp_path / "rank1")
    logger.log_probe(0, spectra, score, "sgd", {}, ProbeCost(0.1, 1, 0.0))
    logger.close({"lr": 0.1}, {"m": 1.0})
    assert not (tmp_path / "rank1").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of logdir"),
        ({"logdir": "x", "writer": object()}, ValueError, "exactly one of logdir"),
        ({"writer": object()}, TypeError, "SummaryWriter"),
    ],
)
def test_bad_logger_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TensorBoardLogger(**kwargs)


def test_density_figure_separates_blocks_by_decades():
    """Two blocks four decades apart peak four decades apart in the heatmap's rows, each row
    holds its block's density per decade (it integrates to 1 over log10 |lambda|), and the
    figure is one heatmap with a row per block, named, in model order."""
    spectra = {
        "stiff": blockopt.BlockSpectrum("stiff", 4, (10.0,), (1.0,), 10.0, 10.0, 40.0),
        "flat": blockopt.BlockSpectrum("flat", 4, (1e-3,), (1.0,), 1e-3, 1e-3, 4e-3),
    }
    score = blockopt.heterogeneity(spectra)
    names, grid, matrix = tb.density_matrix(spectra, score)
    assert names == ["stiff", "flat"] and matrix.shape == (2, tb.DENSITY_COLUMNS)
    peaks = grid[matrix.argmax(axis=1)]
    assert peaks[0] - peaks[1] == pytest.approx(4.0, abs=0.02)
    step = grid[1] - grid[0]
    assert matrix.sum(axis=1) * step == pytest.approx([1.0, 1.0], abs=1e-3)
    fig = tb.density_figure(spectra)
    heat = fig.axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["stiff", "flat"]
    assert len(heat.get_images()) == 1


def test_block_groups_are_owning_modules():
    names = ["tok.weight", "a.qkv.weight.q", "a.qkv.bias.v", "a.proj.weight", "scale"]
    assert tb.block_groups(names) == {
        "tok": ["tok.weight"],
        "a.qkv": ["a.qkv.weight.q", "a.qkv.bias.v"],
        "a.proj": ["a.proj.weight"],
        "scale": ["scale"],
    }


@pytest.fixture(scope="module")
def gpt_probe():
    task = DEMO_TASKS["gpt"].build(0)
    spectra = blockopt.block_spectra(task.model, task.probe, steps=6)
    return spectra, blockopt.heterogeneity(spectra)


def test_the_tiny_gpt_dashboards_are_readable(tmp_path, gpt_probe):
    """The bundled tiny GPT: a few top-level charts, per-block ones for real curvature only,
    one density panel per module with every block named, a labelled JS matrix."""
    spectra, score = gpt_probe
    assert len(spectra) == 37 and set(score.negligible) == {
        "blocks.0.attn.qkv.bias.k",
        "blocks.1.attn.qkv.bias.k",
    }
    lrs = blockopt.tune_block_lrs(spectra, 0.05)
    logger = TensorBoardLogger(tmp_path)
    for step in (0, 10):
        logger.log_probe(step, spectra, score, "block_sgd", lrs, ProbeCost(1.0, 10, 0.1))
    logger.close()
    ea = read(tmp_path)
    scalars = ea.Tags()["scalars"]
    top = [t for t in scalars if t.startswith("blockopt/")]
    assert len(top) <= 10
    assert len(scalars) == len(top) + 2 * 35  # before: 4 per block, 155 tags
    assert not [t for t in scalars + ea.Tags()["histograms"] if ".bias.k" in t]
    assert len(ea.Tags()["histograms"]) == 35 + 1
    assert [e.step for e in ea.Scalars("blockopt/score")] == [0, 10]

    densities = tb.density_figure(spectra, score)
    heat = densities.axes[0]
    labels = [t.get_text() for t in heat.get_yticklabels()]
    assert len(labels) == 37  # one row per block, in model order, the left-out ones marked
    for label, name in zip(labels, spectra):
        if name in score.negligible:
            assert label == f"{name} (negligible curvature)"
        else:
            assert label == name
    (image,) = heat.get_images()
    rows = image.get_array()
    assert rows.shape[0] == 37
    for row, name in enumerate(spectra):  # grey rows exactly for the blocks left out
        assert bool(np.ma.getmaskarray(rows[row]).all() or np.isnan(rows[row]).all()) == (
            name in score.negligible
        )
    _, height = densities.get_size_inches()
    assert height >= 37 * 0.15  # a row per block, at a legible size

    js = tb.js_figure(score)
    labels = [t.get_text() for t in js.axes[0].get_yticklabels()]
    assert len(labels) == 35 and all(any(n in t for t in labels) for n in score.blocks)
    stiffest = max(zip(score.scales, score.blocks))[1]
    assert labels[0].startswith(f"0 {stiffest} ")
    width, height = js.get_size_inches()
    assert 35 * 0.15 <= height <= 20 and width > height


def _cnn_task(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(channels=4)
    d = digits(seed=0)
    x, y = d.x_train[:32], d.y_train[:32]
    return model, x, y, (lambda: F.cross_entropy(model(x), y))


def test_optimizer_logs_every_probe_and_switch(tmp_path):
    model, x, y, probe = _cnn_task()
    opt = blockopt.BlockOptimizer(
        model,
        probe,
        lr=0.05,
        steps=6,
        probe_every=4,
        thresholds=blockopt.Thresholds(sgd_below=0.0, adam_above=0.0, margin=0.0, min_interval=0),
        logdir=tmp_path,
        log_figures=False,
    )
    for _ in range(9):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.close({"final/loss": 0.5})
    ea = read(tmp_path)
    probes = list(opt.spectra_history)
    assert [t for t, _ in probes] == [0, 4, 8]
    scores = ea.Scalars("blockopt/score")
    assert [e.step for e in scores] == [0, 4, 8]
    for event, (step, spectra) in zip(scores, probes):
        assert event.value == pytest.approx(blockopt.heterogeneity(spectra).spread, rel=1e-6)
        for name in blockopt.heterogeneity(spectra).blocks:
            (match,) = [e for e in ea.Scalars(f"blockopt.lambda_max/{name}") if e.step == step]
            assert match.value == pytest.approx(spectra[name].lambda_max, rel=1e-6)
    modes = [e.value for e in ea.Scalars("blockopt/mode")]
    assert modes == [2.0, 2.0, 2.0]  # every threshold at 0: the first probe switches to Adam
    (switch,) = ea.Tensors("blockopt/switches/text_summary")
    decision = opt.history[0]
    assert decision.switched and switch.step == decision.step == 0
    assert decision.text in switch.tensor_proto.string_val[0].decode()
    (share,) = [e.value for e in ea.Scalars("blockopt/probe_share") if e.step == 8]
    assert 0.0 < share <= 1.0
    assert ea.Scalars("final/loss")[0].value == 0.5
    assert ea.Scalars("blockopt/switch_count")[0].value == 1.0
    assert ea.Scalars("blockopt/final_mode")[0].value == 2.0
    # each mode's learning rate at every probe; the last equal the optimizer's now (no
    # scheduler, and the search ran at the switch of step 0)
    for mode, lr in opt.mode_lrs.items():
        events = ea.Scalars(f"blockopt.mode_lr/{mode}")
        assert [e.step for e in events] == [0, 4, 8]
        assert events[-1].value == pytest.approx(lr, rel=1e-6)


def test_block_learning_rates_in_effect_are_logged(tmp_path):
    model, x, y, probe = _cnn_task(1)
    opt = blockopt.BlockOptimizer(
        model, probe, lr=0.05, steps=6, pin_mode="block_sgd", writer=None, logdir=tmp_path
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.close()
    ea = read(tmp_path)
    ((_, spectra),) = opt.spectra_history
    expected = blockopt.tune_block_lrs(spectra, 0.05)
    assert len(set(expected.values())) > 1
    included = blockopt.heterogeneity(spectra).blocks
    for name in included:
        assert ea.Scalars(f"blockopt.lr/{name}")[0].value == pytest.approx(expected[name], rel=1e-6)
    assert ea.Scalars("blockopt/lr_max")[0].value == pytest.approx(
        max(expected[name] for name in included), rel=1e-6
    )


def test_nothing_is_logged_without_logdir_or_writer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, x, y, probe = _cnn_task()
    opt = blockopt.BlockOptimizer(model, probe, lr=0.05, steps=4)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.close()
    assert opt.logger is None
    assert list(tmp_path.iterdir()) == []


def test_training_goes_on_when_the_writer_fails(probed):
    class Broken:
        def add_scalar(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

    model, x, y, probe = _cnn_task()
    reference_model, *_ = _cnn_task()
    opt = blockopt.BlockOptimizer(
        model, probe, lr=0.05, steps=4, probe_every=2, monitor_only=True, writer=Broken()
    )
    plain = torch.optim.SGD(reference_model.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="logging is off") as caught:
        for _ in range(5):
            for o, m in ((opt, model), (plain, reference_model)):
                o.zero_grad()
                F.cross_entropy(m(x), y).backward()
                o.step()
    assert len([w for w in caught if "logging is off" in str(w.message)]) == 1
    assert len(opt.history) == 3
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_all_blocks_logs_the_left_out_blocks_too(tmp_path, gpt_probe):
    spectra, score = gpt_probe
    logger = TensorBoardLogger(tmp_path, all_blocks=True, figures=False)
    logger.log_probe(0, spectra, score, "adam", {}, ProbeCost(1.0, 10, 0.1))
    logger.close()
    ea = read(tmp_path)
    per_block = [t for t in ea.Tags()["scalars"] if t.startswith("blockopt.lambda_max/")]
    assert per_block == [f"blockopt.lambda_max/{name}" for name in spectra]  # all 37
    assert "blockopt.density/blocks.0.attn.qkv.bias.k" in ea.Tags()["histograms"]
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="log_all_blocks must be True or False"):
        blockopt.BlockOptimizer(model, lambda: model(torch.ones(1, 2)).sum(), log_all_blocks=1)


def test_the_js_matrix_is_drawn_only_while_it_can_be_read(tmp_path, monkeypatch, gpt_probe):
    spectra, score = gpt_probe
    for cap, drawn in ((len(score.blocks), True), (len(score.blocks) - 1, False)):
        monkeypatch.setattr(tb, "JS_MAX_BLOCKS", cap)
        logdir = tmp_path / str(cap)
        logger = TensorBoardLogger(logdir)
        logger.log_probe(0, spectra, score, "adam", {}, ProbeCost(1.0, 10, 0.1))
        logger.close()
        images = read(logdir).Tags()["images"]
        assert "blockopt/densities" in images
        assert ("blockopt/js_matrix" in images) is drawn


def test_current_values_are_logged_every_10_steps(tmp_path):
    """``blockopt.train/<name>`` repeats the latest probe's score and the current mode every 10
    steps: a dense series for TensorBoard's smoothing."""
    model, x, y, probe = _cnn_task(2)
    opt = blockopt.BlockOptimizer(
        model, probe, lr=0.05, steps=4, probe_every=4, logdir=tmp_path, log_figures=False
    )
    seen = {}
    for _ in range(25):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if opt.step_count % 10 == 0:
            seen[opt.step_count] = opt.metrics()
    opt.close()
    ea = read(tmp_path)
    for name in ("score", "mode", "switches", "probe_share", "lr_applied"):
        events = ea.Scalars(f"blockopt.train/{name}")
        assert [e.step for e in events] == [10, 20]
        for e in events:  # the probe share moves with the clock between the two readings
            tolerance = {"abs": 0.05} if name == "probe_share" else {"rel": 1e-6}
            assert e.value == pytest.approx(seen[e.step][f"blockopt/{name}"], **tolerance)
    (at_20,) = [e.value for e in ea.Scalars("blockopt.train/score") if e.step == 20]
    last = [s for step, s in opt.spectra_history if step < 20][-1]  # the probe at step 16
    assert at_20 == pytest.approx(blockopt.heterogeneity(last).spread, rel=1e-6)


def test_a_score_over_no_block_draws_no_score_point(tmp_path):
    """A probe whose every block is left out (a loss linear in the parameters) has no score:
    the score, max_ratio and JS curves get no point (not a 0 that reads as 'homogeneous'), and
    the probe's summary text says why."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    spectra = blockopt.block_spectra(model, lambda: model(x).sum(), steps=4)
    score = blockopt.heterogeneity(spectra)
    assert score.empty_reason is not None
    logger = TensorBoardLogger(tmp_path, figures=False)
    logger.log_probe(3, spectra, score, "sgd", {}, ProbeCost(seconds=0.1, hvps=8, share=0.01))
    logger.close()
    ea = read(tmp_path)
    tags = ea.Tags()["scalars"]
    assert "blockopt/mode" in tags and "blockopt/probe_seconds" in tags
    assert not {"blockopt/score", "blockopt/max_ratio", "blockopt/js"} & set(tags)
    (summary,) = ea.Tensors("blockopt/summary/text_summary")
    text = summary.tensor_proto.string_val[0].decode()
    assert text.startswith(f"**no score**: {score.empty_reason}, mode **sgd**")
