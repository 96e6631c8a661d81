"""Negligible curvature is decided by the round-off of a block's own products: dense float64
references, exactly-zero blocks (a bias feeding BatchNorm), real blocks far below the stiffest."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import dense_block, dense_hessian
from torch import nn

import blockopt
from blockopt.analysis.heterogeneity import (
    ROUNDOFF_MARGIN,
    default_floor,
    heterogeneity,
    roundoff_margin,
)
from blockopt.curvature.lanczos import lanczos
from blockopt.curvature.spectra import BlockSpectrum, Spectra


class StiffBranchCNN(nn.Module):
    """A convolution with a bias feeding BatchNorm, and a linear branch on two input pixels
    scaled by ``gain``: the branch's weight is ``gain**2`` times stiffer than it would be, while
    the BatchNorm gains keep their curvature, and the convolution's bias is exactly zero
    curvature (BatchNorm subtracts the batch mean)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 16, 4)
        self.branch = nn.Linear(2, 4, bias=False)
        nn.init.zeros_(self.branch.weight)  # no effect on the logits at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(self.bn(self.conv(x))).flatten(1)
        return self.head(features) + self.branch(self.gain * x.flatten(1)[:, :2])


def _cnn(dtype: torch.dtype):
    torch.manual_seed(0)
    model = StiffBranchCNN(1e4).to(dtype)
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64).to(dtype)  # the same batch in both
    y = torch.randint(0, 4, (8,))
    return model, x, y


def _dense_scales() -> dict[str, float]:
    """Each block's exact curvature scale, from the dense float64 Hessian."""
    model, x, y = _cnn(torch.float64)
    hessian, offsets = dense_hessian(model, lambda f: F.cross_entropy(f(x), y))
    scales = {}
    for block in blockopt.partition(model):
        eig = torch.linalg.eigvalsh(dense_block(hessian, block, offsets))
        scales[block.name] = float(eig.abs().max())
    return scales


def test_the_dense_reference_has_one_exactly_zero_block_and_real_ones_far_below_the_top():
    scales = _dense_scales()
    top = max(scales.values())
    assert scales["conv.bias"] <= 1e-14 * top  # zero in exact arithmetic: round-off only
    # BatchNorm's gain: real curvature, below float32's old relative floor (10 eps = 1.2e-6)
    assert 1e-14 * top < scales["bn.weight"] < default_floor("float32") * top
    assert scales["bn.weight"] > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_block_is_negligible_only_below_its_own_round_off(dtype):
    """Every block but the exactly-zero bias counts, in float32 too, where the old relative
    floor dropped BatchNorm's gains; the included scales agree with the dense reference."""
    dense = _dense_scales()
    model, x, y = _cnn(dtype)
    spectra = blockopt.block_spectra(model, lambda: F.cross_entropy(model(x), y), steps=50)
    h = heterogeneity(spectra)
    assert h.negligible == ("conv.bias",)
    assert set(h.blocks) == set(dense) - {"conv.bias"}
    rel = 2e-3 if dtype == torch.float32 else 1e-9
    for name, rho in zip(h.blocks, h.scales):
        assert rho == pytest.approx(dense[name], rel=rel), name
    bias = spectra["conv.bias"]
    rho = max(abs(bias.lambda_max), abs(bias.lambda_min))
    assert bias.roundoff is not None and rho <= ROUNDOFF_MARGIN * bias.roundoff
    assert "round-off of its own products" in dict(h.excluded)["conv.bias"]
    # the real blocks sit many decades above their own round-off
    for name in h.blocks:
        s = spectra[name]
        assert max(abs(s.lambda_max), abs(s.lambda_min)) > 1e5 * s.roundoff, name
    # what the relative floor, the rule without round-off levels, would have dropped in float32
    stripped = Spectra(
        [_without_roundoff(s) for s in spectra.values()],
        steps=spectra.steps,
        probes=spectra.probes,
        seed=spectra.seed,
        dtype=spectra.dtype,
    )
    old = heterogeneity(stripped)
    if dtype == torch.float32:
        assert {"bn.weight", "conv.bias"} <= set(old.negligible)
    else:
        assert old.negligible == ("conv.bias",)


def _without_roundoff(s: BlockSpectrum) -> BlockSpectrum:
    data = s.to_dict()
    del data["roundoff"]  # as a dict written before the round-off level was recorded
    return BlockSpectrum.from_dict(data)


@st.composite
def symmetric_matrices(draw):
    """A random symmetric matrix (an orthogonal basis times a diagonal over several decades) and
    a start vector, both float64."""
    n = draw(st.integers(2, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lam = np.sign(rng.standard_normal(n)) * 10.0 ** rng.uniform(-3, 3, n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(lam) @ q.T, rng.standard_normal(n)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(symmetric_matrices(), st.integers(2, 40))
def test_exactly_symmetric_float64_products_measure_round_off_only(mat, steps):
    """For a symmetric float64 matrix the products' departure from symmetry is round-off: at
    most ``4 n^1.5 eps`` of the matrix's norm (a matvec's error bound, twice, and the dot
    products')."""
    a, v0 = mat
    n = a.shape[0]
    at = torch.from_numpy(a)
    run = lanczos(lambda v: at @ v, torch.from_numpy(v0), steps)
    norm = float(np.abs(np.linalg.eigvalsh(a)).max())
    eps = float(torch.finfo(torch.float64).eps)
    if run.steps == 1:
        assert run.roundoff is None
    else:
        assert run.roundoff is not None
        assert 0.0 <= run.roundoff <= 4 * n**1.5 * eps * norm


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(2, 24), st.integers(-10, 3), st.integers(0, 2**32 - 1)),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 3),
)
def test_on_exact_float64_blocks_the_decision_is_the_relative_floors(blocks, zeros):
    """Blocks of exactly symmetric float64 matrices at scales 1e-10 .. 1e3, and exactly zero
    blocks: the round-off rule keeps and drops what the relative floor (10 eps of float64 below
    the largest block) does."""
    spectra = []
    for i, (n, decade, seed) in enumerate(blocks):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        a = torch.from_numpy(q @ np.diag(10.0**decade * rng.uniform(0.5, 2.0, n)) @ q.T)
        run = lanczos(lambda v, a=a: a @ v, torch.from_numpy(rng.standard_normal(n)), n)
        spectra.append(BlockSpectrum.from_runs(f"b{i}", n, [run]))
    for i in range(zeros):
        run = lanczos(torch.zeros_like, torch.ones(3, dtype=torch.float64), 3)
        spectra.append(BlockSpectrum.from_runs(f"z{i}", 3, [run]))
    new = heterogeneity(Spectra(spectra, steps=40, probes=1, seed=0, dtype="float64"))
    old = heterogeneity(
        Spectra([_without_roundoff(s) for s in spectra], steps=40, probes=1, seed=0)
    )
    assert new.blocks == old.blocks == tuple(f"b{i}" for i in range(len(blocks)))
    assert new.negligible == old.negligible == tuple(f"z{i}" for i in range(zeros))
    assert new.spread == old.spread and new.max_ratio == old.max_ratio


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(16, 64), st.integers(3, 30), st.integers(0, 2**32 - 1))
def test_products_that_are_all_noise_are_as_asymmetric_as_they_are_large(n, steps, seed):
    """Unstructured round-off (i.i.d. entries, no symmetry of its own), the products of an
    exactly-zero block: its curvature scale is within a few times its asymmetry, far inside
    ``ROUNDOFF_MARGIN``, whatever the size of the noise."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.standard_normal((n, n))) * 10.0 ** rng.uniform(-22, -8)
    run = lanczos(lambda v: noise @ v, torch.from_numpy(rng.standard_normal(n)), steps)
    rho = max(abs(run.ritz_values[0]), abs(run.ritz_values[-1]))
    assert run.roundoff is not None
    assert rho <= 20 * run.roundoff <= ROUNDOFF_MARGIN / 50 * run.roundoff


class ScalarAndVector(nn.Module):
    """``1/2 sum_i c_i (w_i - 1)^2 + 1/2 c_s s^2``: a 4-coordinate block of curvature up to
    ``4 c`` and a 1-coordinate block of curvature ``c_s``."""

    def __init__(self, c: float, c_s: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("c", c * torch.arange(1.0, 5.0, dtype=dtype))
        self.c_s = c_s
        self.w = nn.Parameter(torch.zeros(4, dtype=dtype))
        self.s = nn.Parameter(torch.ones(1, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return 0.5 * (self.c * (self.w - 1) ** 2).sum() + 0.5 * self.c_s * (self.s**2).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_one_coordinate_block_falls_back_on_the_relative_floor(dtype):
    """A 1-coordinate block has no pair of Lanczos vectors to compare, so its round-off is not
    measured and the relative floor decides: curvature 1e-9 of the largest block is below
    float32's (1.2e-6) and above float64's (2.2e-15)."""
    model = ScalarAndVector(2.5e8, 1.0, dtype)
    spectra = blockopt.block_spectra(model, model, steps=4)
    assert spectra["s"].roundoff is None and spectra["w"].roundoff is not None
    assert spectra["s"].lambda_max == pytest.approx(1.0, rel=1e-6)
    h = heterogeneity(spectra)
    if dtype == torch.float32:
        assert h.blocks == ("w",) and h.negligible == ("s",)
        reason = "negligible curvature: below 1.19209e-06 of the largest block"
        assert dict(h.excluded)["s"] == reason
    else:
        assert h.blocks == ("w", "s") and h.negligible == ()
        assert h.max_ratio == pytest.approx(math.log10(1e9), abs=1e-6)


def _hand(name: str, scale: float, roundoff: float | None) -> BlockSpectrum:
    return BlockSpectrum(
        name, 10, (scale,), (1.0,), scale, scale, 10 * scale, steps=5, roundoff=roundoff
    )


def test_floor_given_explicitly_applies_to_every_block():
    blocks = [_hand("big", 1.0, 1e-16), _hand("small", 1e-9, 1e-25), _hand("hand", 1e-9, None)]
    spectra = Spectra(blocks, steps=5, probes=1, seed=0, dtype="float32")
    # default: the measured block stands on its round-off, the unmeasured one on 10 eps (float32)
    h = heterogeneity(spectra)
    assert h.blocks == ("big", "small") and h.negligible == ("hand",)
    # given: a relative cutoff for every block, on top of the round-off rule
    assert heterogeneity(spectra, floor=1e-6).blocks == ("big",)
    assert heterogeneity(spectra, floor=1e-10).blocks == ("big", "small", "hand")
    # the round-off rule still holds under any floor
    noisy = [_hand("big", 1.0, 1e-16), _hand("noise", 1e-9, 1e-11)]
    h = heterogeneity(Spectra(noisy, steps=5, probes=1, seed=0), floor=1e-12)
    assert h.blocks == ("big",)
    assert dict(h.excluded)["noise"] == (
        "negligible curvature: 1e-09, within 1000 times the round-off of its own products (1e-11)"
    )


def test_the_margin_and_a_block_at_it():
    assert ROUNDOFF_MARGIN == 1e3
    at = [_hand("big", 1.0, 1e-16), _hand("edge", 1e-6, 1e-9), _hand("above", 1.01e-6, 1e-9)]
    h = heterogeneity(Spectra(at, steps=5, probes=1, seed=0))
    assert h.blocks == ("big", "above") and h.negligible == ("edge",)


def test_included_blocks_below_the_relative_floor_widen_the_js_axis():
    """A block kept by the round-off rule far below ``floor * max rho`` still gets a shape of
    its own on the JS axis: two such blocks of different shape are apart, two alike are not."""

    def block(name: str, values: tuple[float, ...]) -> BlockSpectrum:
        w = (1.0 / len(values),) * len(values)
        return BlockSpectrum(
            name, 10, values, w, max(values), min(values), sum(values), roundoff=1e-30
        )

    top = block("top", (1.0, 2.0))
    tiny, twin = block("tiny", (1e-12, 2e-12)), block("twin", (1e-12, 2e-12))
    spread = block("spread", (1e-13, 1e-11))
    same = heterogeneity(Spectra([top, tiny, twin], steps=5, probes=1, seed=0, dtype="float32"))
    apart = heterogeneity(Spectra([top, tiny, spread], steps=5, probes=1, seed=0, dtype="float32"))
    assert same.js_matrix[1][2] == pytest.approx(0.0, abs=1e-9)
    assert apart.js_matrix[1][2] > 0.5


def test_the_margin_narrows_with_the_dtype():
    """Real blocks stand about ``1 / (5 eps)`` above their round-off, so the margin is
    ``min(1e3, 1 / (20 eps))``: a float16 block 100 times its round-off counts."""
    assert [roundoff_margin(d) for d in ("float64", "float32", "float16", "bfloat16")] == [
        1e3,
        1e3,
        pytest.approx(51.2),
        pytest.approx(6.4),
    ]
    blocks = [_hand("big", 1.0, 1e-4), _hand("small", 1e-2, 1e-4)]
    half = heterogeneity(Spectra(blocks, steps=5, probes=1, seed=0, dtype="float16"))
    single = heterogeneity(Spectra(blocks, steps=5, probes=1, seed=0, dtype="float32"))
    assert half.blocks == ("big", "small") and single.blocks == ("big",)
    assert dict(single.excluded)["small"].startswith("negligible curvature: 0.01, within 1000 ")
