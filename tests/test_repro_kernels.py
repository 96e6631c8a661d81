"""Reproduction part (e): the softmax and Gaussian attention kernels, the training loop and the
summaries, checked against direct formulas and known values."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import repro_attention
import repro_kernels as rk


def _inputs(model: rk.KernelAttention, n: int = 6) -> torch.Tensor:
    tokens, _ = repro_attention.addition_batch(n, seed=0)
    return model.tok[tokens] + model.pos[: tokens.shape[1]]


def test_gaussian_kernel_matches_the_direct_formula() -> None:
    model = rk.build("gaussian", 0.3, seed=0, d=8).double()
    x = _inputs(model).detach()
    q, k = model.query(x), model.key(x)
    t = x.shape[1]
    direct = torch.exp(-(q[:, :, None] - k[:, None]).pow(2).sum(-1) / (2 * math.sqrt(8)))
    direct = direct * torch.ones(t, t, dtype=torch.float64).tril()
    torch.testing.assert_close(model.weights(x), direct, rtol=1e-10, atol=1e-14)


def test_softmax_rows_sum_to_one_and_respect_the_causal_mask() -> None:
    model = rk.build("softmax", 1.0, seed=1, d=8)
    w = model.weights(_inputs(model)).detach()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (w.triu(1) == 0).all()
    assert rk.attention_mass(model, repro_attention.addition_batch(6, 0)[0]) == pytest.approx(1.0)


def test_unnormalised_gaussian_attention_fades_with_the_embedding_scale() -> None:
    tokens, _ = repro_attention.addition_batch(32, seed=2)
    masses = [rk.attention_mass(rk.build("gaussian", s, seed=2), tokens) for s in (0.05, 1.0)]
    # near s = 0 every causal weight is about 1, so a position's mass is about (i + 1)
    assert masses[0] == pytest.approx(sum(range(1, tokens.shape[1] + 1)) / tokens.shape[1], rel=0.1)
    assert masses[1] < 0.2


def test_json_safe_replaces_non_finite_floats() -> None:
    raw = {"a": [1.0, math.inf, -math.inf], "b": (math.nan, 2), "c": {"d": 0.5}}
    assert rk.json_safe(raw) == {"a": [1.0, None, None], "b": [None, 2], "c": {"d": 0.5}}


@pytest.mark.parametrize(
    ("scale", "d", "factor"), [(0.1, 16, 1.1), (0.3, 16, 1.1), (1.0, 16, 4.0), (1.0, 128, 4.0)]
)
def test_expected_gaussian_mass(scale: float, d: int, factor: float) -> None:
    # exact in the limit of small scales; at large scales the few distinct embeddings make
    # |q_i - k_j|^2 vary more than a chi-square, and the mean weight is larger
    tokens, _ = repro_attention.addition_batch(512, seed=6)
    measured = statistics.mean(
        rk.attention_mass(rk.build("gaussian", scale, seed, d=d), tokens) for seed in range(8)
    )
    expected = rk.expected_gaussian_mass(scale, d, tokens.shape[1])
    assert expected / factor < measured < expected * factor


def test_marginal_entropy() -> None:
    uniform = torch.arange(10).repeat(3, 1).T  # every digit once per column
    assert rk.marginal_entropy(uniform) == pytest.approx(math.log(10))
    constant = torch.zeros(7, 3, dtype=torch.int64)
    assert rk.marginal_entropy(constant) == 0.0


def test_steps_to_and_best_run() -> None:
    assert rk.steps_to([3.0, 2.0, 1.0, 0.5], 1.0) == 2
    assert rk.steps_to([3.0, 2.0], 1.0) is None
    runs = [{"lr": 1.0, "losses": [2.0, math.inf]}, {"lr": 0.1, "losses": [2.0, 1.5]}]
    assert rk.best_run(runs)["lr"] == 0.1


def test_train_follows_sgd_and_stops_on_divergence() -> None:
    tokens, answer = repro_attention.addition_batch(16, seed=3)
    model = rk.build("softmax", 1.0, seed=3, d=8)
    start = rk.loss_of(model, tokens, answer).item()
    losses = rk.train(model, tokens, answer, method="gd", lr=0.1, steps=5)
    assert len(losses) == 6 and losses[0] == pytest.approx(start)
    assert losses[-1] < losses[0]
    # the model passed in is left untouched
    assert rk.loss_of(model, tokens, answer).item() == pytest.approx(start)
    blown = rk.train(model, tokens, answer, method="gd", lr=1e4, steps=50)
    assert blown[-1] == math.inf and len(blown) < 51
    with pytest.raises(ValueError, match="unknown method"):
        rk.train(model, tokens, answer, method="lbfgs", lr=0.1, steps=1)


def test_heterogeneity_at_uses_a_float64_copy() -> None:
    tokens, answer = repro_attention.addition_batch(16, seed=4)
    model = rk.build("gaussian", 0.1, seed=4, d=8)
    out = rk.heterogeneity_at(model, tokens, answer, steps=8, seed=0)
    assert math.isfinite(out["spread"]) and out["spread"] >= 0
    assert set(out["scales"]) <= {n for n, _ in model.named_parameters()}
    assert next(model.parameters()).dtype == torch.float32


def test_small_scale_exponents_of_the_two_kernels() -> None:
    soft = rk.small_scale_exponents("softmax", problems=32)
    gauss = rk.small_scale_exponents("gaussian", problems=32)
    assert soft["query"] == pytest.approx(5.0, abs=0.05)
    assert gauss["query"] == pytest.approx(3.0, abs=0.2)
    assert soft["value"] == pytest.approx(2.0, abs=0.05)
    assert gauss["value"] == pytest.approx(2.0, abs=0.05)


def test_run_produces_a_complete_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = rk.Settings(
        regimes=(rk.Regime("narrow", 8, 16), rk.Regime("wide", 16, 2)),
        scales=(0.1, 1.0),
        seeds=(0, 1),
        gd_lrs=(0.5,),
        adam_lrs=(0.01,),
        train_steps=3,
        lanczos_steps=4,
    )
    monkeypatch.setattr(rk, "settings", lambda quick: tiny)
    section = rk.run(tmp_path, quick=True)
    assert section.key == "e"
    for heading in ("**Paper's claim.**", "**Our measurement.**", "**Agreement.**"):
        assert section.markdown.count(heading) == 1
    assert (tmp_path / "e_kernels.png").stat().st_size > 0
    data = json.loads(json.dumps(section.data, allow_nan=False))
    assert len(data["summary"]) == 2 * 2 * 2
