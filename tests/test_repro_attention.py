"""Reproduction part (c): the task, the one-head model, the block-norm estimates and the dense
Gauss-Newton / functional split, checked against exact references and the small-scale laws."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import repro_attention as ra

import blockopt


def test_addition_batch_encodes_correct_sums() -> None:
    tokens, answer = ra.addition_batch(200, seed=3)
    assert tokens.shape == (200, 8) and answer.shape == (200, 3)
    a = tokens[:, 0] * 10 + tokens[:, 1]
    b = tokens[:, 3] * 10 + tokens[:, 4]
    c = answer[:, 0] * 100 + answer[:, 1] * 10 + answer[:, 2]
    assert torch.equal(a + b, c)
    assert (tokens[:, 2] == ra.PLUS).all() and (tokens[:, 5] == ra.EQUALS).all()
    # teacher forcing: the model reads the first two answer digits
    assert torch.equal(tokens[:, 6:], answer[:, :2])
    assert torch.equal(ra.addition_batch(200, seed=3)[0], tokens)


def test_fit_slope_and_crossover_on_power_laws() -> None:
    x = [0.1 * 10 ** (i / 4) for i in range(9)]
    assert ra.fit_slope(x, [3 * s**5 for s in x]) == pytest.approx(5.0, abs=1e-12)
    # s^5 overtakes 1000 s^2 at s = 10
    flip = ra.crossover(x, [s**5 for s in x], [1000 * s**2 for s in x])
    assert flip == pytest.approx(10.0, rel=1e-9)
    assert ra.crossover(x, [s**2 for s in x], [1000 * s**2 for s in x]) is None


def test_halves_share_the_middle() -> None:
    lower, upper = ra.halves(list(range(11)))
    assert list(range(11))[lower] == [0, 1, 2, 3, 4, 5]
    assert list(range(11))[upper] == [5, 6, 7, 8, 9, 10]


class _Quadratic(nn.Module):
    def __init__(self, h: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(len(h), dtype=torch.float64))
        self.register_buffer("h", h)

    def forward(self) -> torch.Tensor:
        return 0.5 * self.w @ (self.h @ self.w)


def test_frobenius_estimate_is_exact_when_h_squared_is_a_multiple_of_identity() -> None:
    # H = c Q diag(+-1) Q^T has H^2 = c^2 I, so every start vector gives v^T H^2 v = c^2
    n, c = 12, 3.5
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    signs = torch.tensor([1.0, -1.0] * (n // 2), dtype=torch.float64)
    model = _Quadratic(c * (q * signs) @ q.T)
    moments = blockopt.block_spectra(model, model, steps=2, probes=3, seed=1)["w"]
    assert ra.frobenius_estimate(moments) == pytest.approx(c * math.sqrt(n), rel=1e-12)
    extremes = blockopt.block_spectra(model, model, steps=n, seed=1)["w"]
    assert ra.spectral_norm(extremes) == pytest.approx(c, rel=1e-10)


def _small(
    variant: str, sigma: float, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    tokens, answer = ra.addition_batch(24, seed=100 + seed)
    return ra.build(variant, sigma, seed, d=4), tokens, answer


def test_partition_keeps_only_the_three_attention_weights() -> None:
    model, _, _ = _small("pre_ln", 1.0)
    blocks = blockopt.partition(model, ra.attention_blocks)
    assert [b.name for b in blocks] == ["query", "key", "value"]
    assert [b.parts[0].param_name for b in blocks] == ["query.weight", "key.weight", "value.weight"]


@pytest.mark.parametrize("variant", ra.VARIANTS)
def test_blockopt_norms_match_the_dense_block(variant: str) -> None:
    model, tokens, answer = _small(variant, 0.7, seed=1)
    got = ra.measure_blocks(model, tokens, answer, steps=16, probes=64, seed=0)
    for block in ("query", "value"):
        ref = ra.norms(ra.dense_parts(model, tokens, answer, block)["full"])
        # 16 Lanczos steps on a 16-coordinate block: the extremes are exact
        assert got[block]["spectral"] == pytest.approx(ref["spectral"], rel=1e-8)
        # Hutchinson with 64 start vectors: a sampling error of a few percent
        assert got[block]["frobenius"] == pytest.approx(ref["frobenius"], rel=0.25)


def test_dense_split_against_an_independent_functional_part() -> None:
    model, tokens, answer = _small("softmax", 0.8, seed=2)
    parts = ra.dense_parts(model, tokens, answer, "query")
    # the functional part is the Hessian of sum_r g_r f_r(w) with g = dL/df held fixed
    params = {n: p.detach() for n, p in model.named_parameters()}
    w0 = params["query.weight"]
    target = answer.reshape(-1)

    def logits(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**params, "query.weight": w}, (tokens,))
        return out.reshape(-1, ra.CLASSES)

    with torch.no_grad():
        z = logits(w0)
        g = (torch.softmax(z, -1) - F.one_hot(target, ra.CLASSES).to(z)) / len(z)
    functional = torch.autograd.functional.hessian(lambda w: (logits(w) * g).sum(), w0)
    functional = functional.reshape(parts["functional"].shape)
    torch.testing.assert_close(parts["functional"], functional, rtol=1e-9, atol=1e-14)
    # the Gauss-Newton part is positive semi-definite, the functional part indefinite
    assert torch.linalg.eigvalsh(parts["gauss_newton"]).min() > -1e-12
    eig = torch.linalg.eigvalsh(parts["functional"])
    assert eig.min() < 0 < eig.max()


@pytest.mark.parametrize(
    ("variant", "block", "zero"),
    [
        ("softmax", "value", True),
        ("softmax", "query", False),
        ("linear", "query", True),
        ("linear", "value", True),
        ("pre_ln", "value", True),
    ],
)
def test_functional_part_vanishes_where_the_logits_are_linear_in_the_weight(
    variant: str, block: str, zero: bool
) -> None:
    model, tokens, answer = _small(variant, 0.9, seed=3)
    parts = {
        k: ra.norms(m)["frobenius"] for k, m in ra.dense_parts(model, tokens, answer, block).items()
    }
    share = parts["functional"] / parts["full"]
    if zero:
        assert share < 1e-12
    else:
        assert share > 0.1


@pytest.mark.parametrize(
    ("variant", "block", "power", "sigma", "tol"),
    [
        ("softmax", "value", 2.0, 1e-3, 0.02),
        ("softmax", "query", 5.0, 1e-3, 0.02),
        ("softmax", "key", 5.0, 1e-3, 0.02),
        ("linear", "query", 6.0, 1e-3, 0.02),
        ("linear", "value", 6.0, 1e-3, 0.02),
        # LayerNorm's eps (1e-5) stops normalising inputs of variance below it (sigma < 3e-3),
        # and the residual path lets sigma back in at large scales: test in between
        ("pre_ln", "query", 0.0, 0.05, 0.1),
        ("pre_ln", "value", 0.0, 0.05, 0.1),
    ],
)
def test_small_scale_exponents(
    variant: str, block: str, power: float, sigma: float, tol: float
) -> None:
    # doubling sigma in the small-scale regime multiplies the block by 2**power
    norms = []
    for s in (sigma, 2 * sigma):
        model, tokens, answer = _small(variant, s, seed=4)
        norms.append(ra.norms(ra.dense_parts(model, tokens, answer, block)["full"])["frobenius"])
    assert math.log2(norms[1] / norms[0]) == pytest.approx(power, abs=tol)


def test_concentration_is_one_at_uniform_attention_and_grows_with_scale() -> None:
    tokens, _ = ra.addition_batch(64, seed=5)
    small = ra.concentration(ra.build("softmax", 1e-3, 0, d=8), tokens)
    large = ra.concentration(ra.build("softmax", 3.0, 0, d=8), tokens)
    assert small == pytest.approx(1.0, abs=1e-4)
    assert large > 1.5
    assert 0 < ra.ce_curvature(ra.build("softmax", 3.0, 0, d=8), tokens) < 0.9


def test_run_produces_a_complete_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = ra.Settings(sigmas=(0.05, 0.3, 2.0), seeds=(0, 1), batch=8, steps=4, probes=2)
    monkeypatch.setattr(ra, "settings", lambda quick: tiny)
    section = ra.run(tmp_path, quick=True)
    assert section.key == "c"
    for heading in ("**Paper's claim.**", "**Our measurement.**", "**Agreement.**"):
        assert section.markdown.count(heading) == 1
    assert (tmp_path / "c_attention_scale.png").stat().st_size > 0
    data = json.loads(json.dumps(section.data, allow_nan=False))
    assert data["sigmas"] == list(tiny.sigmas)
    assert len(data["slopes"]["softmax"]) == 2
