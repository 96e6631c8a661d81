"""The ``blockopt`` command line, run as a subprocess: help, ``probe`` and ``tune`` against the
API, the demo on a tiny setting, and every kind of bad input (exit code 2, one line naming the
cause, no traceback, no file left behind); in this process, outputs that fail to be written and
``sys.path`` left as it was while probing."""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import random
import re
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import blockopt
from blockopt.analysis.tuning import block_lr_factors
from blockopt.cli.demo import run_demo

FACTORY = textwrap.dedent(
    '''
    """Factories for the command-line tests: one good, the rest wrong in one way each."""
    import sys

    import torch
    import torch.nn.functional as F
    from torch import nn

    NUMBER = 3


    def _mlp():
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


    def make():
        model = _mlp()
        x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        return model, lambda: F.cross_entropy(model(x), y)


    def raises():
        raise RuntimeError("factory broke")


    class Stop(BaseException):
        pass


    def raises_base_exception():
        raise Stop("stopped")


    def exits():
        sys.exit("no GPU here")


    def not_pair():
        return _mlp()


    def triple():
        model = _mlp()
        return model, lambda: model(torch.ones(1, 4)).sum(), 3


    def not_module():
        return "model", lambda: torch.zeros(())


    def probe_not_callable():
        return _mlp(), 1.0


    def probe_raises():
        def probe():
            raise ValueError("probe broke")

        return _mlp(), probe


    def probe_exits():
        return _mlp(), lambda: sys.exit(3)


    def vector_probe():
        model = _mlp()
        return model, lambda: model(torch.ones(8, 4)).sum(0)


    def constant_probe():
        return _mlp(), lambda: torch.tensor(1.0)


    def linear_probe():  # a loss linear in every parameter: no block has any curvature
        model = nn.Linear(4, 3)
        return model, lambda: model(torch.ones(8, 4)).sum()


    def foreign_probe():
        w = torch.ones(3, requires_grad=True)
        return _mlp(), lambda: (w * w).sum()


    def chatty():
        print("building the model...")
        model = _mlp()

        def probe():
            print("probe called")
            return model(torch.ones(8, 4)).pow(2).mean()

        return model, probe


    def float_probe():
        model = _mlp()
        return model, lambda: float(model(torch.ones(2, 4)).sum())


    # A float64 quadratic with known Hessian blocks: a's is indefinite (eigenvalues -2, 0.5, 3),
    # b's positive definite (1, 4); c enters with zero curvature, d not at all.
    EIGS_A, EIGS_B = (-2.0, 0.5, 3.0), (1.0, 4.0)
    _Q = torch.linalg.qr(
        torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    )[0]
    A = _Q @ torch.diag(torch.tensor(EIGS_A, dtype=torch.float64)) @ _Q.T
    B = torch.tensor(EIGS_B, dtype=torch.float64)


    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(3, dtype=torch.float64))
            self.b = nn.Parameter(torch.ones(2, dtype=torch.float64))
            self.c = nn.Parameter(torch.ones(2, dtype=torch.float64))
            self.d = nn.Parameter(torch.ones(2, dtype=torch.float64))


    def quadratic():
        model = Quadratic()

        def probe():
            a, b, c = model.a, model.b, model.c
            return 0.5 * a @ A @ a + 0.5 * (B * b * b).sum() + 0.0 * (c * c).sum()

        return model, probe
    '''
)


ARGPARSE_ON_IMPORT = textwrap.dedent(
    """
    import argparse

    parser = argparse.ArgumentParser(prog="argmod")
    parser.add_argument("--data", required=True)
    ARGS = parser.parse_args()  # a script's code, run on import: exits 2 with argmod's usage
    """
)


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with ``tinyfactory.py``, and modules that fail on import: ``brokenmod.py``
    (raises), ``exitmod.py`` (calls ``sys.exit(0)``), ``argmod.py`` (runs argparse)."""
    return write_factories(tmp_path_factory.mktemp("factories"))


def write_factories(folder: Path) -> Path:
    """Write the factory modules of :func:`factory_dir` into ``folder``; returns it."""
    (folder / "tinyfactory.py").write_text(FACTORY)
    (folder / "brokenmod.py").write_text("RATIO = 1 / 0\n")
    (folder / "exitmod.py").write_text("import sys\n\nsys.exit(0)\n")
    (folder / "argmod.py").write_text(ARGPARSE_ON_IMPORT)
    return folder


def _env(factory_dir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(factory_dir), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_cli(argv: list[str], factory_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockopt", *argv],
        capture_output=True, text=True, timeout=240, cwd=cwd, env=_env(factory_dir),
    )  # fmt: skip


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def tinyfactory(factory_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(factory_dir))
    return importlib.import_module("tinyfactory")


def _api_spectra(module, seed: int, factory: str = "make", **options):
    """What the CLI computes: the factory called right after seeding torch, then probed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, probe = getattr(module, factory)()
    return model, blockopt.block_spectra(model, probe, seed=seed, **options)


# -- help and exit codes --------------------------------------------------------------------------

HELP = {
    "top": (["--help"], r"COMMAND.* demo .* probe .* tune "),
    "demo": (["demo", "--help"], r"--quick.*--logdir"),
    "probe": (["probe", "--help"], r"neg is the block's share of negative curvature"),
    "tune": (["tune", "--help"], r"param_groups"),
}


@pytest.mark.parametrize("level", sorted(HELP))
def test_help_at_every_level(level, factory_dir, tmp_path):
    argv, pattern = HELP[level]
    run = run_cli(argv, factory_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: blockopt")
    assert re.search(pattern, " ".join(run.stdout.split()))


def test_console_script_probes_a_factory_given_by_file_path(factory_dir, tmp_path):
    script = Path(sys.executable).with_name("blockopt")
    if not script.exists():
        pytest.skip("the blockopt console script is not installed in this environment")
    run = subprocess.run(
        [str(script), "probe", f"{factory_dir / 'tinyfactory.py'}:make", "--steps", "3"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=_env(factory_dir),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "recommended mode:" in run.stdout


def test_plot_ignores_a_matplotlibrc_in_the_working_directory(factory_dir, tmp_path):
    """The README says the CLI reads nothing but its arguments: a matplotlibrc beside the user
    (usetex would run LaTeX, not installed here; a red face changes every pixel) changes
    nothing, and the image is the one drawn from the same spectra in the test process."""
    argv = ["probe", "tinyfactory:make", "--steps", "4", "--json", "s.json", "--plot", "s.png"]
    plain, hostile = tmp_path / "plain", tmp_path / "hostile"
    plain.mkdir(), hostile.mkdir()
    (hostile / "matplotlibrc").write_text("text.usetex: True\nfigure.facecolor: red\n")
    for folder in (plain, hostile):
        run = run_cli(argv, factory_dir, folder)
        assert run.returncode == 0, run.stderr
    image = (hostile / "s.png").read_bytes()
    assert image == (plain / "s.png").read_bytes()
    spectra = blockopt.Spectra.from_dict(json.loads((hostile / "s.json").read_text()))
    from blockopt.logging import figures
    from blockopt.logging.tensorboard import density_arguments

    arguments = density_arguments(spectra, blockopt.heterogeneity(spectra))
    assert image == figures.render("densities", arguments, "png", 150)


def test_the_plot_formats_are_ones_matplotlib_writes():
    from matplotlib.backend_bases import FigureCanvasBase

    from blockopt.cli.main import PLOT_FORMATS

    assert set(PLOT_FORMATS) <= set(FigureCanvasBase.get_supported_filetypes())


# -- probe and tune against the API ---------------------------------------------------------------


def test_probe_of_no_measurable_block_recommends_nothing(factory_dir, tmp_path):
    """Every block left out (a loss linear in the parameters): no score and no mode, in the
    text and the JSON, instead of score 0 and "sgd"."""
    run = run_cli(["probe", "tinyfactory:linear_probe", "--steps", "3", "--json", "-"],
                  factory_dir, tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    saved = json.loads(run.stdout)
    assert saved["score"] is None and saved["recommended_mode"] is None
    assert saved["reason"] == "the score keeps no block: all 2 left out (negligible curvature)"
    assert "heterogeneity score: -, the score keeps no block: all 2 left out" in run.stderr
    assert "recommended mode: none (a score over no block says nothing of the mode)" in run.stderr
    assert "recommended mode: sgd" not in run.stderr
    assert saved["heterogeneity"]["score"] is None and saved["heterogeneity"]["spread"] is None
    out = tmp_path / "lrs.json"
    run = run_cli(["tune", "tinyfactory:linear_probe", "--steps", "3", "--base-lr", "0.1",
                   "--out", str(out)], factory_dir, tmp_path)  # fmt: skip
    assert run.returncode == 2 and not out.exists()
    assert "no per-block rates to suggest and nothing was written" in run.stderr


def test_probe_json_matches_the_api(factory_dir, tmp_path, tinyfactory):
    argv = ["probe", "tinyfactory:make", "--steps", "6", "--probes", "2", "--seed", "3"]
    argv += ["--base-lr", "0.05", "--json", "out.json", "--plot", "out.png"]
    run = run_cli(argv, factory_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    assert _files(tmp_path) == ["out.json", "out.png"]  # no temporary files left
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out.json").read_text())

    _, spectra = _api_spectra(tinyfactory, 3, steps=6, probes=2)
    loaded = blockopt.Spectra.from_dict(saved)
    assert list(loaded) == list(spectra) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert (loaded.steps, loaded.probes, loaded.seed) == (6, 2, 3)
    for name, s in spectra.items():
        got = loaded[name]
        assert got.numel == s.numel and got.status == s.status
        assert got.lambda_max == pytest.approx(s.lambda_max, rel=1e-5, abs=1e-9)
        assert got.lambda_min == pytest.approx(s.lambda_min, rel=1e-5, abs=1e-9)
        assert got.trace == pytest.approx(s.trace, rel=1e-5, abs=1e-9)
        assert got.ritz_values == pytest.approx(s.ritz_values, rel=1e-5, abs=1e-9)
        assert f"{s.lambda_max:.3e}" in run.stdout

    h = blockopt.heterogeneity(spectra)
    score, ratio = float(h), h.max_ratio
    assert saved["score"] == pytest.approx(score, rel=1e-5, abs=1e-9)
    assert saved["heterogeneity"]["max_ratio"] == pytest.approx(ratio, rel=1e-5, abs=1e-9)
    assert saved["recommended_mode"] == blockopt.Thresholds().target(score, ratio)
    saved_ratio = saved["heterogeneity"]["max_ratio"]
    assert saved["reason"] == blockopt.Thresholds().reason(saved["score"], saved_ratio)
    lrs = blockopt.tune_block_lrs(spectra, 0.05)
    assert saved["suggested_lrs"] == pytest.approx(lrs, rel=1e-5)
    assert f"recommended mode: {saved['recommended_mode']}" in run.stdout
    assert f"heterogeneity score: {saved['score']:.2f} decades" in run.stdout


def test_tune_writes_lrs_that_param_groups_loads(factory_dir, tmp_path, tinyfactory):
    argv = ["tune", "tinyfactory:make", "--base-lr", "0.05", "--steps", "6", "--seed", "1"]
    argv += ["--max-factor", "20", "--out", "lrs.json"]
    run = run_cli(argv, factory_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    assert _files(tmp_path) == ["lrs.json"]
    lrs = json.loads((tmp_path / "lrs.json").read_text())

    model, spectra = _api_spectra(tinyfactory, 1, steps=6)
    expected = blockopt.tune_block_lrs(spectra, 0.05, max_factor=20)
    assert list(lrs) == list(expected)
    assert all(type(v) is float for v in lrs.values())
    assert lrs == pytest.approx(expected, rel=1e-5)
    assert min(lrs.values()) == 0.05 and max(lrs.values()) <= 0.05 * 20
    for name, lr in lrs.items():
        assert re.search(rf"^{re.escape(name)}\s.*\s{lr:.3g}$", run.stdout, re.M)

    groups = blockopt.param_groups(model, lrs)
    per_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert per_param[id(p)] == pytest.approx(lrs[name])
    torch.optim.SGD(groups, lr=0.05, momentum=0.9)  # loads into a plain optimizer


def _rows(stdout: str) -> dict[str, list[str]]:
    """The probe table's header (key ``"block"``) and rows, split into cells at 2+ spaces."""
    lines = stdout.split("\n\n")[1].splitlines()
    return {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in lines)}


def _share_below_zero(s) -> float:
    return sum(w for v, w in zip(s.ritz_values, s.ritz_weights) if v < 0) / sum(s.ritz_weights)


def test_probe_table_of_a_quadratic_shows_the_signed_extremes_and_negative_share(
    factory_dir, tmp_path, tinyfactory
):
    argv = ["probe", "tinyfactory:quadratic", "--steps", "3", "--json", "out.json"]
    run = run_cli(argv, factory_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    header = run.stdout.split("\n\n")[1].splitlines()[0]
    assert header == "block  size  lambda_min  lambda_max    neg       trace"
    rows = _rows(run.stdout)
    assert "lr" not in rows["block"] and "cond" not in rows["block"]

    _, spectra = _api_spectra(tinyfactory, 0, "quadratic", steps=3)
    for name, eigs in (("a", tinyfactory.EIGS_A), ("b", tinyfactory.EIGS_B)):
        s = spectra[name]
        assert (s.lambda_min, s.lambda_max) == pytest.approx((min(eigs), max(eigs)), rel=1e-9)
        share = _share_below_zero(s)
        trace = f"{s.trace:.3e}"
        assert rows[name] == [name, str(len(eigs)), f"{min(eigs):.3e}", f"{max(eigs):.3e}",
                              f"{100 * share:.1f}%", trace]  # fmt: skip
    assert rows["b"][4] == "0.0%"  # positive definite: no negative curvature
    assert 0 < _share_below_zero(spectra["a"]) < 1  # one of a's three eigenvalues is negative
    # c has zero curvature, d no part in the loss: both left out of the score, and marked so
    assert rows["c"] == ["c", "2", "-", "-", "-", "-", "(left out: negligible curvature)"]
    assert rows["d"] == ["d", "2", "-", "-", "-", "-", "(left out: unused)"]
    assert "lr: not printed without --base-lr; give --base-lr LR" in run.stdout
    assert "left out of the score: 2 block(s), 1 of them with negligible curvature" in run.stdout

    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["base_lr"] is None and saved["suggested_lrs"] is None
    assert saved["lr_factors"] == pytest.approx(block_lr_factors(spectra))
    assert saved["negative_share"]["a"] == pytest.approx(_share_below_zero(spectra["a"]))
    assert saved["negative_share"]["b"] == 0.0
    assert dict(saved["heterogeneity"]["excluded"]).keys() == {"c", "d"}
    assert "wrote the spectra, score, mode and lr factors to out.json" in run.stdout


def test_probe_prints_the_lr_column_only_with_base_lr(factory_dir, tmp_path, tinyfactory):
    argv = ["probe", "tinyfactory:quadratic", "--steps", "3", "--base-lr", "0.05"]
    argv += ["--json", "out.json"]
    run = run_cli(argv, factory_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    rows = _rows(run.stdout)
    assert rows["block"] == ["block", "size", "lambda_min", "lambda_max", "neg", "trace", "lr"]
    _, spectra = _api_spectra(tinyfactory, 0, "quadratic", steps=3)
    factors = block_lr_factors(spectra)
    assert factors["a"] == pytest.approx(4 / 3) and factors["b"] == pytest.approx(1.0)
    for name, f in factors.items():
        assert rows[name][6] == f"{0.05 * f:.3g}"
    assert rows["a"][6] == "0.0667" and rows["b"][6] == "0.05"
    assert rows["c"][-1] == "(left out: negligible curvature)"
    assert "lr: --base-lr 0.05 (the stiffest block's) times clip(rho_max / rho, 1, 100)" in (
        run.stdout
    )
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["base_lr"] == 0.05
    assert saved["suggested_lrs"] == pytest.approx({n: 0.05 * f for n, f in factors.items()})


def test_negative_share_counts_the_weight_below_the_round_off():
    from blockopt.cli.main import negative_share

    s = blockopt.BlockSpectrum(
        "w", 4, (-1.0, -1e-12, 0.5, 2.0), (0.1, 0.2, 0.3, 0.4), 2.0, -1.0, 1.0, roundoff=1e-9
    )
    assert negative_share(s) == pytest.approx(0.1)  # -1e-12 lies within the round-off
    assert negative_share(s, tol=0.0) == pytest.approx(0.3)
    empty = blockopt.BlockSpectrum("e", 1, (), (), 0.0, 0.0, 0.0)
    assert math.isnan(negative_share(empty))


def test_short_reason_keeps_the_condition():
    from blockopt.cli.main import short_reason

    t = blockopt.Thresholds()
    assert short_reason(t.reason(4.01)) == "score 4.01 > 1.5"
    assert short_reason(t.reason(0.29, 3.02)) == "score 0.29 < 1"  # block_ratio is off
    ratio = blockopt.Thresholds(block_ratio=2.0).reason(0.29, 3.02)
    assert short_reason(ratio) == "score 0.29 < 1 but max_ratio 3.02 > 2"
    assert short_reason(f"stay: {t.reason(0.2)}") == "stay: score 0.20 < 1"
    assert short_reason(None) == "-"


# -- demo -----------------------------------------------------------------------------------------


def test_demo_prints_the_summary_and_writes_tensorboard_logs(factory_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["demo", "--quick", "--model", "cnn", "--steps", "20", "--logdir", "logs"]
    run = run_cli(argv, factory_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    out = run.stdout
    assert "Results after 20 steps" in out
    assert "cnn: BatchNorm CNN on scikit-learn digits; sgd lr 0.1, adam lr 0.01" in out
    assert "tensorboard --logdir logs" in out
    rows = {m.group(1): m.groups() for m in re.finditer(
        r"^cnn\s+(sgd|adam|auto)\s+(\S+).*?\s(\d+\.\d{4})\s+(\d+\.\d{4})\s+(\d+\.\d)%$", out, re.M
    )}  # fmt: skip
    assert sorted(rows) == ["adam", "auto", "sgd"]
    assert rows["sgd"][1] == "0.1" and rows["adam"][1] == "0.01"
    assert all(0 <= float(r[4]) <= 100 for r in rows.values())
    auto = re.search(
        r"^cnn\s+(\d+\.\d\d)\s+(\d+\.\d\d)\s+(sgd@0.*?)\s+(\d+)\s+\S+s / \S+s", out, re.M
    )
    assert auto, out
    first_score, modes, probes = float(auto.group(1)), auto.group(3), int(auto.group(4))
    # the bulk scores in SGD's band: auto stays in SGD (block_ratio is off by default) and,
    # its probe changing nothing, ends where fixed SGD does, to the printed digit
    assert first_score < blockopt.Thresholds().sgd_below and probes == 1
    assert modes == "sgd@0"
    assert rows["auto"][1] == "0.1" and rows["auto"][2:] == rows["sgd"][2:]
    # why: the deciding probe's condition, in the policy's own numbers
    why = re.search(rf"^cnn\s+{auto.group(1)}\s.*= \d+%  (.*)$", out, re.M)
    assert why and why.group(1) == f"stay: score {auto.group(1)} < 1"
    assert re.search(r"^model\s+score first probe\s+score at end\s+modes\s+probes\s+"
                     r"probe overhead\s+why$", out, re.M)  # fmt: skip

    (run_dir,) = (tmp_path / "logs").iterdir()
    assert (
        run_dir.name.startswith("demo-")
        and f"TensorBoard logs: {Path('logs', run_dir.name)}" in out
    )
    for optimizer in ("sgd", "adam", "auto"):
        events = EventAccumulator(str(run_dir / "cnn" / optimizer))
        events.Reload()
        tags = events.Tags()["scalars"]
        assert len(events.Scalars("loss/train_batch")) == 20
        assert {"loss/train", "loss/held_out", "accuracy/held_out"} <= set(tags)
        if optimizer == "auto":
            (score,) = events.Scalars("blockopt/score")
            assert f"{score.value:.2f}" == auto.group(1)
        final = events.Scalars("accuracy/held_out")[-1]
        assert final.step == 20 and f"{100 * final.value:.1f}" == rows[optimizer][4]


def test_demo_depends_only_on_the_seed(tmp_path):
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()

    def outcome(seed: int, folder: str):
        results = run_demo(["cnn"], 6, tmp_path / folder, seed)
        return [
            (r.optimizer, r.metrics, r.modes, r.first_score, r.end_score, r.reason) for r in results
        ]

    first = outcome(1, "a")
    assert outcome(1, "b") == first
    assert outcome(2, "c") != first
    assert all(math.isfinite(m["train_loss"]) for _, m, *_ in first)
    reasons = {optimizer: reason for optimizer, *_, reason in first}
    assert reasons["sgd"] is None and reasons["adam"] is None and reasons["auto"]
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)


# -- bad input ------------------------------------------------------------------------------------

# argv templates: {dir} is the case's own (writable) folder, {ro} a read-only one, {file} a file,
# {factories} the folder of tinyfactory.py.
RAISES = "tinyfactory:raises"  # reached only if outputs were not checked first
BAD = {
    # MODULE:FACTORY syntax
    "no-colon": (["probe", "tinyfactory", "--json", "{dir}/s.json"], r"MODULE:FACTORY"),
    "bad-factory-name": (["probe", "tinyfactory:1make"], r"'1make' is not a Python name"),
    "empty-module": (["tune", ":make", "--base-lr", "0.1"], r"MODULE:FACTORY"),
    # importing
    "missing-module": (
        ["probe", "no_such_module_xyz:make", "--json", "{dir}/s.json"],
        r"no module named 'no_such_module_xyz'.*PYTHONPATH",
    ),
    "missing-file": (["probe", "{dir}/nofile.py:make"], r"no file .*nofile\.py"),
    "module-import-fails": (
        ["probe", "brokenmod:make"],
        r"importing 'brokenmod' failed: ZeroDivisionError",
    ),
    "module-exits-on-import": (
        ["probe", "exitmod:make", "--json", "{dir}/s.json"],
        r"importing 'exitmod' called sys.exit\(0\); .*must not exit on import",
    ),
    "module-runs-argparse-on-import": (
        ["probe", "argmod:make", "--json", "{dir}/s.json"],
        r"importing 'argmod' called sys.exit\(2\) after printing 'argmod: error: the following "
        r"arguments are required: --data'; .*if __name__ == '__main__'",
    ),
    "file-exits-on-import": (
        ["tune", "{factories}/exitmod.py:make", "--base-lr", "0.1", "--out", "{dir}/lrs.json"],
        r"importing '.*exitmod\.py' called sys.exit\(0\); a file .* must not exit on import",
    ),
    "missing-attribute": (
        ["tune", "tinyfactory:nope", "--base-lr", "0.1", "--out", "{dir}/lrs.json"],
        r"'tinyfactory' has no attribute 'nope'",
    ),
    "not-callable": (["probe", "tinyfactory:NUMBER"], r"is a int, not callable"),
    # what the factory returns
    "factory-raises": (
        ["tune", RAISES, "--base-lr", "0.1", "--out", "{dir}/lrs.json"],
        r"tinyfactory:raises raised RuntimeError: factory broke; fix the factory",
    ),
    "factory-exits": (
        ["probe", "tinyfactory:exits", "--json", "{dir}/s.json"],
        r"tinyfactory:exits called sys.exit\('no GPU here'\); a factory must return",
    ),
    "factory-raises-base-exception": (
        ["probe", "tinyfactory:raises_base_exception"],
        r"tinyfactory:raises_base_exception raised Stop: stopped; fix the factory",
    ),
    "not-a-pair": (["probe", "tinyfactory:not_pair"], r"returned a Sequential; .*pair"),
    "triple": (["probe", "tinyfactory:triple"], r"tuple of length 3; .*pair \(model, probe\)"),
    "model-not-a-module": (["probe", "tinyfactory:not_module"], r"str as the model.*nn\.Module"),
    "probe-not-callable": (["probe", "tinyfactory:probe_not_callable"], r"float as the probe"),
    # the probe
    "probe-raises": (
        ["probe", "tinyfactory:probe_raises", "--json", "{dir}/s.json"],
        r"the probe raised ValueError: probe broke",
    ),
    "probe-exits": (
        ["probe", "tinyfactory:probe_exits", "--json", "{dir}/s.json"],
        r"the probe called sys.exit\(3\); fix it so that probe\(\) returns the loss",
    ),
    "non-scalar-probe": (["probe", "tinyfactory:vector_probe"], r"shape \(3,\).*scalar"),
    "probe-returns-float": (["probe", "tinyfactory:float_probe"], r"returned float, not a tensor"),
    "probe-without-parameters": (
        ["tune", "tinyfactory:constant_probe", "--base-lr", "0.1", "--out", "{dir}/lrs.json"],
        r"does not depend on any trainable parameter",
    ),
    "probe-of-other-tensors": (
        ["probe", "tinyfactory:foreign_probe", "--plot", "{dir}/s.png"],
        r"does not depend on any parameter of the (model|blocks probed)",
    ),
    # option values
    "steps-zero": (["probe", "tinyfactory:make", "--steps", "0"], r"--steps: .*positive integer"),
    "steps-negative": (
        ["tune", "tinyfactory:make", "--base-lr", "0.1", "--steps", "-3"],
        r"--steps: expected a positive integer, got '-3'",
    ),
    "steps-not-a-number": (["probe", "tinyfactory:make", "--steps", "ten"], r"got 'ten'"),
    "probes-zero": (["probe", "tinyfactory:make", "--probes", "0"], r"--probes: .*positive"),
    "seed-too-large": (
        ["probe", "tinyfactory:make", "--seed", "99999999999999999999"],
        r"--seed: expected an integer from 0 to 2\*\*63 - 1, got '99999999999999999999'",
    ),
    "seed-negative": (
        ["tune", "tinyfactory:make", "--base-lr", "0.1", "--seed", "-1"],
        r"--seed: expected an integer from 0 to 2\*\*63 - 1, got '-1'",
    ),
    "seed-not-an-integer": (["probe", "tinyfactory:make", "--seed", "1.5"], r"--seed: .*'1\.5'"),
    "unknown-strategy": (
        ["probe", "tinyfactory:make", "--strategy", "layer"],
        r"--strategy: invalid choice: 'layer'",
    ),
    "base-lr-zero": (
        ["tune", "tinyfactory:make", "--base-lr", "0", "--out", "{dir}/lrs.json"],
        r"--base-lr: expected a positive finite number, got '0'",
    ),
    "base-lr-negative": (["probe", "tinyfactory:make", "--base-lr", "-0.1"], r"--base-lr"),
    "base-lr-nan": (["tune", "tinyfactory:make", "--base-lr", "nan"], r"--base-lr: .*'nan'"),
    "base-lr-missing": (["tune", "tinyfactory:make"], r"required: --base-lr"),
    "max-factor-below-one": (
        ["tune", "tinyfactory:make", "--base-lr", "0.1", "--max-factor", "0.5"],
        r"--max-factor: expected a finite number >= 1",
    ),
    "no-command": ([], r"choose a command"),
    "demo-steps-zero": (["demo", "--steps", "0"], r"--steps: .*positive integer"),
    "demo-unknown-model": (["demo", "--model", "rnn"], r"--model: invalid choice: 'rnn'"),
    "demo-seed-too-large": (
        ["demo", "--seed", str(2**64)],
        r"--seed: expected an integer from 0 to 2\*\*63 - 1, got '18446744073709551616'",
    ),
    # output paths, checked before the factory runs
    "out-missing-dir": (
        ["tune", RAISES, "--base-lr", "0.1", "--out", "{dir}/missing/lrs.json"],
        r"cannot write --out .*: directory .*missing does not exist",
    ),
    "json-missing-dir": (
        ["probe", RAISES, "--json", "{dir}/missing/s.json"],
        r"cannot write --json .*missing does not exist",
    ),
    "plot-missing-dir": (
        ["probe", RAISES, "--json", "{dir}/s.json", "--plot", "{dir}/missing/s.png"],
        r"cannot write --plot .*missing does not exist",
    ),
    "out-read-only-dir": (
        ["tune", RAISES, "--base-lr", "0.1", "--out", "{ro}/lrs.json"],
        r"cannot write --out .* is not writable",
    ),
    "json-read-only-dir": (["probe", RAISES, "--json", "{ro}/s.json"], r"--json .*not writable"),
    "plot-read-only-dir": (["probe", RAISES, "--plot", "{ro}/s.png"], r"--plot .*not writable"),
    "out-is-a-directory": (
        ["tune", RAISES, "--base-lr", "0.1", "--out", "{dir}"],
        r"--out .* is a directory",
    ),
    "json-under-a-file": (["probe", RAISES, "--json", "{file}/s.json"], r"is not a directory"),
    "plot-unknown-format": (
        ["probe", RAISES, "--plot", "{dir}/s.xyz"],
        r"unknown image format '\.xyz'.*\.png",
    ),
    "demo-logdir-under-a-file": (
        ["demo", "--logdir", "{file}/logs"],
        r"cannot write TensorBoard logs under --logdir",
    ),
    "demo-logdir-is-a-file": (
        ["demo", "--logdir", "{file}"],
        r"--logdir .*a-file: it is a file, not a directory",
    ),
    "json-and-plot-the-same-file": (
        ["probe", RAISES, "--json", "{dir}/s.png", "--plot", "{dir}/s.png"],
        r"--json .*s\.png and --plot .*s\.png name the same file",
    ),
    "demo-logdir-dash": (["demo", "--logdir", "-"], r"--logdir - would name a directory"),
    "base-lr-overflows": (
        ["tune", RAISES, "--base-lr", "1e307", "--out", "{dir}/lrs.json"],
        r"--base-lr 1e\+307 times --max-factor 100 is not a finite number",
    ),
}


def _read_only_dir(base: Path) -> Path | None:
    """A directory this process cannot create files in: a chmod-ed one, or for a superuser,
    who ignores permissions, a read-only system directory; None when there is none."""
    folder = base / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    return None


# The bad-input cases are many and each fails within milliseconds, so all but FRESH run in
# children forked from one interpreter that imported blockopt once (where fork exists): each is
# still its own process with its own working directory, stdout, stderr and exit code.
FRESH = ("missing-module", "steps-zero", "out-read-only-dir")  # these also in a new interpreter
FORKING_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from blockopt.cli.main import main

    codes = {}
    for case in json.load(sys.stdin):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(case["cwd"])
                for fd, name in ((1, "stdout"), (2, "stderr")):
                    os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                code = main(case["argv"])
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        codes[case["id"]] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(codes))
    """
)


def _run_forked(cases: dict[str, tuple[list[str], Path]], factory_dir: Path, io: Path):
    """Run each ``(argv, cwd)`` in a child forked from one interpreter; CompletedProcess each."""
    jobs = [
        {"id": k, "argv": argv, "cwd": str(cwd), "stdout": str(io / f"{k}.out"),
         "stderr": str(io / f"{k}.err")}
        for k, (argv, cwd) in cases.items()
    ]  # fmt: skip
    driver = subprocess.run(
        [sys.executable, "-c", FORKING_DRIVER], input=json.dumps(jobs),
        capture_output=True, text=True, timeout=240, env=_env(factory_dir),
    )  # fmt: skip
    assert driver.returncode == 0, driver.stderr
    codes = json.loads(driver.stdout.strip().splitlines()[-1])
    return {
        k: subprocess.CompletedProcess(
            argv, codes[k], (io / f"{k}.out").read_text(), (io / f"{k}.err").read_text()
        )
        for k, (argv, _) in cases.items()
    }


def bad_case_paths(case: str, base: Path, factory_dir: Path, ro: Path | None, a_file: Path):
    """The substitutions of a case's argv template: its own folder, created under ``base``."""
    folder = base / case
    folder.mkdir()
    return {"dir": str(folder), "ro": str(ro), "file": str(a_file), "factories": str(factory_dir)}


def run_bad_cases(
    base: Path, factory_dir: Path, ro: Path | None, a_file: Path, io: Path, fresh: bool = True
):
    """Run every case of BAD (those needing ``{ro}`` only with one) each in its own folder
    under ``base``; returns the CompletedProcess of each and each one's ``(argv, folder)``.
    ``fresh=False``: no case runs in a new interpreter where all can be forked."""
    cases = {}
    for case, (argv, _) in BAD.items():
        if ro is None and any("{ro}" in a for a in argv):
            continue
        subs = bad_case_paths(case, base, factory_dir, ro, a_file)
        cases[case] = ([a.format(**subs) for a in argv], Path(subs["dir"]))
    forked = hasattr(os, "fork") and sys.platform == "linux"
    new = {k: v for k, v in cases.items() if (fresh and k in FRESH) or not forked}
    runs = _run_forked({k: v for k, v in cases.items() if k not in new}, factory_dir, io)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda kv: run_cli(kv[1][0], factory_dir, kv[1][1]), new.items())
        runs.update(zip(new, done))
    return runs, cases


@pytest.fixture(scope="module")
def bad_runs(factory_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Every bad-input case's CompletedProcess and the files left in its folder, and whether
    the read-only directory stayed as it was."""
    base = tmp_path_factory.mktemp("bad")
    ro = _read_only_dir(base)
    a_file = base / "a-file"
    a_file.write_text("not a directory\n")
    io = base / "io"
    io.mkdir()
    ro_before = sorted(os.listdir(ro)) if ro is not None else []
    runs, cases = run_bad_cases(base, factory_dir, ro, a_file, io)
    results = {k: (runs[k], _files(folder)) for k, (_, folder) in cases.items()}
    ro_after = sorted(os.listdir(ro)) if ro is not None else []
    shared = {"ro": str(ro), "file": str(a_file), "factories": str(factory_dir)}
    paths = {case: {"dir": str(folder), **shared} for case, (_, folder) in cases.items()}
    yield results, ro_before == ro_after, paths
    if ro is not None and ro.is_relative_to(base):
        ro.chmod(0o755)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, bad_runs):
    results, read_only_untouched, _ = bad_runs
    if case not in results:
        pytest.skip("no read-only directory available to this user")
    run, files = results[case]
    _, pattern = BAD[case]
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    # one line for the error; warnings the user's code raised on the way come one line each
    *warned, error = run.stderr.strip().splitlines()
    assert all(line.startswith("blockopt: warning: ") for line in warned), run.stderr
    assert error.startswith("blockopt") and ": error: " in error
    assert re.search(pattern, error), error
    assert files == [], "an output or temporary file was left behind"
    assert read_only_untouched


def test_the_bad_input_doc_has_these_cases_as_they_ran(bad_runs):
    """docs/BAD_INPUT.md's command-line table is the rows scripts/bad_input_doc.py makes of
    these runs (tests/test_bad_input_doc.py checks the rest of the document)."""
    from test_bad_input_doc import ROOT, doc_generator

    results, _, paths = bad_runs
    if len(results) < len(BAD):
        pytest.skip("no read-only directory available to this user")
    generator = doc_generator()
    rows = [generator.cli_row(argv, results[c][0], paths[c]) for c, (argv, _) in BAD.items()]
    committed = generator.cli_table((ROOT / "docs" / "BAD_INPUT.md").read_text())
    assert committed == [*generator.CLI_HEADER, *rows], "run python scripts/bad_input_doc.py"


# -- in this process ------------------------------------------------------------------------------


_IGNORED_BY_DEFAULT = (
    DeprecationWarning,
    PendingDeprecationWarning,
    ImportWarning,
    ResourceWarning,
)


def _main_in_process(argv: list[str]) -> int:
    """``blockopt.cli.main(argv)`` here, the torch, numpy and ``random`` seeding it does undone."""
    from blockopt.cli.main import main

    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # the filters of a fresh `python -m blockopt`, not pytest's (which show everything):
            # a library's PendingDeprecationWarning must not reach the CLI's stderr here either
            warnings.resetwarnings()
            for category in _IGNORED_BY_DEFAULT:
                warnings.simplefilter("ignore", category)
            return main(argv)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


@pytest.mark.parametrize("fails", ["rename", "create"])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(
    fails, tinyfactory, tmp_path, monkeypatch, capsys
):
    """Renaming the second output into place (or creating its temporary file) fails with a full
    disk: one error line, exit 2, no temporary file left; the first output is whole or absent."""
    patched = (os, "replace") if fails == "rename" else (tempfile, "mkstemp")
    real = getattr(*patched)
    ours = []

    def second_fails(*args, **kwargs):
        target = Path(args[1] if fails == "rename" else kwargs["dir"])
        if target.parent == tmp_path or target == tmp_path:  # not matplotlib's or torch's
            ours.append(target)
            if len(ours) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(*patched, second_fails)
    json_out, plot = tmp_path / "s.json", tmp_path / "s.png"
    argv = [
        "probe",
        "tinyfactory:make",
        "--steps",
        "3",
        "--json",
        str(json_out),
        "--plot",
        str(plot),
    ]
    assert _main_in_process(argv) == 2
    err = capsys.readouterr().err
    first = f"; {json_out} already written" if fails == "rename" else ""
    assert err == f"blockopt: error: could not write {plot}: {os.strerror(errno.ENOSPC)}{first}\n"
    assert _files(tmp_path) == (["s.json"] if fails == "rename" else [])
    if fails == "rename":
        assert json.loads(json_out.read_text())["steps"] == 3


PATH_FACTORY = textwrap.dedent(
    """
    import importlib.util
    import sys

    import torch
    from torch import nn

    import {name}_eager  # a neighbour imported on import: the module's own business

    SEEN = {{}}


    def make():
        import {name}_lazy  # and one imported by the factory

        model = nn.Linear(2, 1)
        x = torch.randn(4, 2)

        def probe():
            SEEN["path"] = list(sys.path)
            SEEN["neighbour"] = importlib.util.find_spec("{name}_shadow")
            return model(x).pow(2).mean()

        return model, probe
    """
)


@pytest.mark.parametrize("kind", ["file", "module"])
def test_the_factorys_folder_is_not_on_sys_path_while_probing(kind, tmp_path, monkeypatch, capsys):
    """The folder searched first for the factory's module (the .py file's, or the current
    directory) is gone from ``sys.path`` once the factory returned: a module torch imports lazily
    while probing cannot come from a file next to the factory. The largest seed works."""
    name = f"pathfactory_{kind}"
    folder = tmp_path / "factory"
    folder.mkdir()
    (folder / f"{name}.py").write_text(PATH_FACTORY.format(name=name))
    for suffix in ("eager", "lazy", "shadow"):
        (folder / f"{name}_{suffix}.py").write_text("")
    if kind == "file":
        target, module = f"{folder / name}.py:make", f"_blockopt_factory_{name}"
        monkeypatch.chdir(tmp_path)
    else:
        target, module = f"{name}:make", name
        monkeypatch.chdir(folder)
    before = list(sys.path)
    try:
        code = _main_in_process(["probe", target, "--steps", "3", "--seed", str(2**63 - 1)])
        assert code == 0, capsys.readouterr().err
        assert sys.path == before
        seen = sys.modules[module].SEEN
        assert str(folder) not in seen["path"] and seen["neighbour"] is None
        assert f"seed {2**63 - 1}" in capsys.readouterr().out
    finally:
        for suffix in ("", "_eager", "_lazy", "_shadow"):
            sys.modules.pop(name + suffix, None)
        sys.modules.pop(module, None)


# -- outputs are written to what their path names ---------------------------------------------


def _read_fifo(fifo: Path) -> tuple[threading.Thread, dict[str, bytes]]:
    """A reader of ``fifo`` in a thread (a FIFO's writer waits for one)."""
    got: dict[str, bytes] = {}

    def read() -> None:
        with open(fifo, "rb") as f:
            got["data"] = f.read()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, got


def _release(reader: threading.Thread, fifo: Path) -> None:
    """Let a reader that no writer opened for finish, so that a failing test does not hang."""
    reader.join(timeout=60)
    if reader.is_alive():  # nothing was written to the FIFO: open it for a moment to end it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)


def _probe_argv(option: str, path: str) -> list[str]:
    command = ["tune", "tinyfactory:make", "--base-lr", "0.1"] if option == "--out" else [
        "probe", "tinyfactory:make"
    ]  # fmt: skip
    return [*command, "--steps", "3", option, path]


def _check_written(option: str, data: bytes) -> None:
    if option == "--plot":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        parsed = json.loads(data)
        assert ("steps" in parsed) if option == "--json" else all(v > 0 for v in parsed.values())


OUTPUT_SUFFIX = {"--json": "json", "--plot": "png", "--out": "json"}
LINKS = ["symlink-to-file", "symlink-to-missing-file", "symlink-chain"]


@pytest.mark.parametrize("option", ["--json", "--plot", "--out"])
@pytest.mark.parametrize("kind", LINKS)
def test_an_output_through_a_symlink_writes_its_target_and_keeps_the_link(
    kind, option, tinyfactory, tmp_path, capsys
):
    suffix = OUTPUT_SUFFIX[option]
    target = tmp_path / "real" / f"out.{suffix}"
    target.parent.mkdir()
    if kind != "symlink-to-missing-file":
        target.write_text("old\n")
        target.chmod(0o640)
    link = tmp_path / f"link.{suffix}"
    link.symlink_to(target)
    if kind == "symlink-chain":
        first, link = link, tmp_path / f"first.{suffix}"
        link.symlink_to(first)
    assert _main_in_process(_probe_argv(option, str(link))) == 0, capsys.readouterr().err
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    _check_written(option, target.read_bytes())
    if kind != "symlink-to-missing-file":  # an existing file keeps its permissions
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _files(target.parent) == [target.name]  # no temporary file left


@pytest.mark.parametrize("option", ["--json", "--plot", "--out"])
@pytest.mark.parametrize("via_link", [False, True], ids=["fifo", "symlink-to-fifo"])
def test_an_output_that_is_a_fifo_is_written_into_not_replaced(
    via_link, option, tinyfactory, tmp_path, capsys
):
    fifo = tmp_path / f"pipe.{OUTPUT_SUFFIX[option]}"
    os.mkfifo(fifo)
    path = fifo
    if via_link:
        path = tmp_path / f"link.{OUTPUT_SUFFIX[option]}"
        path.symlink_to(fifo)
    reader, got = _read_fifo(fifo)
    try:
        code = _main_in_process(_probe_argv(option, str(path)))
    finally:
        _release(reader, fifo)
    assert code == 0, capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and path.is_symlink() == via_link
    _check_written(option, got["data"])
    assert _files(tmp_path) == sorted([fifo.name] + ([path.name] if via_link else []))


def test_a_link_to_an_open_descriptor_is_written_into(tinyfactory, tmp_path, capsys):
    """A link to /proc/self/fd/N (what /dev/stdout is) writes into that descriptor's pipe."""
    read_end, write_end = os.pipe()
    link = tmp_path / "out.json"
    link.symlink_to(f"/proc/self/fd/{write_end}")
    got: dict[str, bytes] = {}

    def read() -> None:
        with os.fdopen(read_end, "rb") as f:
            got["data"] = f.read()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = _main_in_process(_probe_argv("--json", str(link)))
    finally:
        os.close(write_end)
        reader.join(timeout=60)
    assert code == 0, capsys.readouterr().err
    assert link.is_symlink() and os.readlink(link) == f"/proc/self/fd/{write_end}"
    _check_written("--json", got["data"])


@pytest.mark.parametrize("path", ["/dev/stdout", "/dev/null", "/proc/self/fd/1", "-"])
def test_paths_under_dev_and_proc_are_written_in_place(path):
    """Decided without writing anything there (tests never write under /dev)."""
    from blockopt.cli.main import _target

    assert _target(Path(path)) == (Path(path), False)  # not replaced by an atomic rename


@pytest.mark.parametrize("option", ["--json", "--plot", "--out"])
def test_dash_writes_the_output_to_stdout_and_the_report_to_stderr(
    option, tinyfactory, tmp_path, monkeypatch, capsysbinary
):
    monkeypatch.chdir(tmp_path)
    assert _main_in_process(_probe_argv(option, "-")) == 0
    out, err = capsysbinary.readouterr()
    _check_written(option, out)
    assert b"recommended mode:" in err and b"to standard output" in err
    assert _files(tmp_path) == []  # no file named '-'


def test_json_and_plot_both_to_stdout_is_refused(tinyfactory, tmp_path, capsys):
    argv = ["probe", "tinyfactory:make", "--json", "-", "--plot", "-"]
    assert _main_in_process(argv) == 2
    assert capsys.readouterr().err == (
        "blockopt: error: --json - and --plot - would both write to standard output; give one "
        "a file\n"
    )


# -- outputs the checks must name, and user code writing to standard output ------------------


@pytest.mark.parametrize(
    ("argv", "data"),
    [
        (["probe", "tinyfactory:chatty", "--steps", "3", "--json", "-"], "json"),
        (["tune", "tinyfactory:chatty", "--steps", "3", "--base-lr", "0.1", "--out", "-"], "json"),
        (["probe", "tinyfactory:chatty", "--steps", "3", "--plot", "-"], "png"),
    ],
)
def test_what_the_factory_and_probe_print_goes_to_stderr_when_data_goes_to_stdout(
    argv, data, factory_dir, tmp_path
):
    r = subprocess.run(
        [sys.executable, "-m", "blockopt", *argv],
        capture_output=True, timeout=240, cwd=tmp_path, env=_env(factory_dir),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    if data == "json":
        assert isinstance(json.loads(r.stdout), dict)
    else:
        assert r.stdout.startswith(b"\x89PNG\r\n\x1a\n")
    err = r.stderr.decode()
    assert "building the model..." in err and "probe called" in err


def test_a_link_to_the_plot_given_as_json_is_the_same_file(factory_dir, tmp_path):
    (tmp_path / "alias.json").symlink_to(tmp_path / "s.png")
    json_path, plot_path = str(tmp_path / "alias.json"), str(tmp_path / "s.png")
    r = run_cli(["probe", RAISES, "--json", json_path, "--plot", plot_path], factory_dir, tmp_path)
    assert r.returncode == 2
    assert "name the same file" in r.stderr and "factory broke" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="Unix special files")
def test_a_socket_or_a_loop_of_links_is_refused_before_the_factory_runs(factory_dir, tmp_path):
    import socket

    sock_path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(sock_path))
        argv = ["tune", RAISES, "--base-lr", "0.1", "--out", str(sock_path)]
        r = run_cli(argv, factory_dir, tmp_path)
    finally:
        server.close()
    assert r.returncode == 2 and "it is a socket" in r.stderr, r.stderr
    assert "factory broke" not in r.stderr
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    r = run_cli(["probe", RAISES, "--json", str(tmp_path / "loop1")], factory_dir, tmp_path)
    assert r.returncode == 2 and "symbolic links form a loop" in r.stderr, r.stderr
    r = run_cli(["demo", "--quick", "--logdir", str(tmp_path / "loop1")], factory_dir, tmp_path)
    assert r.returncode == 2 and "symbolic links form a loop" in r.stderr, r.stderr


def test_a_dangling_logdir_link_gets_its_directory_created(tmp_path, monkeypatch):
    """--logdir names the link's target, which does not exist yet: it is created there and the
    link is kept."""
    from blockopt.cli.main import _prepare_logdir

    link = tmp_path / "logs"
    link.symlink_to(tmp_path / "real" / "logs")
    run_dir = _prepare_logdir(link)
    assert (tmp_path / "real" / "logs").is_dir() and link.is_symlink()
    assert run_dir.parent == (tmp_path / "real" / "logs")


def test_a_read_only_output_file_is_refused_not_replaced(tmp_path, monkeypatch):
    """The atomic rename would replace a file its owner made read-only (a superuser's access
    check passes anyway, so the check is shown with access denied)."""
    from blockopt.cli import main as cli

    target = tmp_path / "lrs.json"
    target.write_text("{}\n")
    target.chmod(0o444)
    real_access = os.access
    monkeypatch.setattr(
        cli.os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode)
    )
    with pytest.raises(cli.UsageError, match=r"lrs\.json: the file is read-only; make it"):
        cli._check_output("--out", target)
    assert target.read_text() == "{}\n"
