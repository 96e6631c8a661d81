"""Properties of the heterogeneity score."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import blockopt
from blockopt import BlockOptimizer
from blockopt.analysis.heterogeneity import heterogeneity
from blockopt.curvature.spectra import BlockSpectrum, Spectra
from blockopt.workloads import data, models


def _spectrum(name, eigs, numel=None, status="ok"):
    eigs = [float(e) for e in eigs]
    w = [1.0 / len(eigs)] * len(eigs)
    return BlockSpectrum(
        name, numel or len(eigs), tuple(eigs), tuple(w), max(eigs), min(eigs), sum(eigs),
        status=status,
    )  # fmt: skip


def _spectra(blocks):
    return Spectra(blocks, steps=30, probes=1, seed=0)


def _scaled(spectra, factors):
    return _spectra(
        [
            _spectrum(s.name, [f * x for x in s.ritz_values], s.numel)
            for s, f in zip(spectra, factors)
        ]
    )


eigen_lists = st.lists(st.floats(-1e3, 1e3).filter(lambda x: abs(x) > 1e-3), min_size=1, max_size=8)
block_lists = st.lists(st.tuples(eigen_lists, st.integers(1, 5000)), min_size=1, max_size=8)


def _from(draw_blocks):
    return [_spectrum(f"b{i}", e, max(n, len(e))) for i, (e, n) in enumerate(draw_blocks)]


@settings(max_examples=80, deadline=None)
@given(eigen_lists, st.integers(1, 6))
def test_identical_blocks_score_zero(eigs, k):
    h = heterogeneity(_spectra([_spectrum(f"b{i}", eigs) for i in range(k)]))
    assert float(h) == 0.0 and h.max_ratio == 0.0
    assert h.js == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=80, deadline=None)
@given(block_lists, st.randoms(use_true_random=False))
def test_permutation_invariant(blocks, rnd):
    spectra = _from(blocks)
    shuffled = spectra[:]
    rnd.shuffle(shuffled)
    a, b = heterogeneity(_spectra(spectra)), heterogeneity(_spectra(shuffled))
    assert a.spread == b.spread and a.max_ratio == b.max_ratio
    assert a.js == pytest.approx(b.js, abs=1e-12)
    order = [b.blocks.index(name) for name in a.blocks]
    assert np.allclose(np.asarray(b.js_matrix)[np.ix_(order, order)], a.js_matrix, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(block_lists, st.floats(1e-4, 1e4))
def test_invariant_to_one_common_scale(blocks, c):
    spectra = _from(blocks)
    a = heterogeneity(_spectra(spectra))
    b = heterogeneity(_scaled(spectra, [c] * len(spectra)))
    assert b.spread == pytest.approx(a.spread, abs=1e-9)
    assert b.max_ratio == pytest.approx(a.max_ratio, abs=1e-9)
    assert b.js == pytest.approx(a.js, abs=1e-6)


def test_invariant_to_scaling_the_loss():
    torch.manual_seed(0)
    model = blockopt.workloads.models.MLP((8, 12, 12, 4)).double()
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 4, (32,))
    base = heterogeneity(
        blockopt.block_spectra(model, lambda: torch.nn.functional.cross_entropy(model(x), y))
    )
    scaled = heterogeneity(
        blockopt.block_spectra(model, lambda: 37.5 * torch.nn.functional.cross_entropy(model(x), y))
    )
    assert base.spread > 0
    assert scaled.spread == pytest.approx(base.spread, abs=1e-9)
    assert scaled.js == pytest.approx(base.js, abs=1e-9)


@pytest.mark.parametrize("numel", [[100, 100, 100, 100], [10, 300, 50, 4000]])
def test_grows_monotonically_as_blocks_are_pulled_apart(numel):
    rng = np.random.default_rng(0)
    shape = rng.uniform(0.5, 2.0, size=12)
    scores, js = [], []
    for c in [1.0, 1.5, 2.0, 4.0, 10.0, 100.0, 1e4]:
        blocks = [_spectrum(f"b{k}", shape * c**k, numel[k]) for k in range(4)]
        h = heterogeneity(_spectra(blocks))
        scores.append(h.spread)
        js.append(h.js)
    assert scores[0] == pytest.approx(0.0, abs=1e-12)
    assert all(b > a for a, b in itertools.pairwise(scores))
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(js)) and js[-1] > js[0] + 0.5


def test_spread_is_the_weighted_quantile_range_in_decades():
    # 90% of the parameters sit in a block at scale 1, 5% at 1e-3 and 5% at 1e3: the 5% and 95%
    # quantiles land on the small and large blocks.
    blocks = [
        _spectrum("small", [1e-3], 50),
        _spectrum("bulk", [1.0], 900),
        _spectrum("big", [1e3], 50),
    ]
    h = heterogeneity(_spectra(blocks))
    assert h.spread == pytest.approx(6.0)
    assert h.max_ratio == pytest.approx(6.0)
    # A tiny block does not move the weighted spread, only the plain ratio.
    blocks = [_spectrum("tiny", [1e-4], 2), _spectrum("a", [1.0], 500), _spectrum("b", [10.0], 500)]
    h = heterogeneity(_spectra(blocks))
    assert h.spread == pytest.approx(1.0)
    assert h.max_ratio == pytest.approx(5.0)


def test_js_of_disjoint_blocks_is_one_and_matrix_symmetric():
    blocks = [_spectrum("a", [1.0, 1.1]), _spectrum("b", [1e3, 1.1e3]), _spectrum("c", [1.0, 1.1])]
    h = heterogeneity(_spectra(blocks))
    m = np.asarray(h.js_matrix)
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 0)
    assert m[0, 1] == pytest.approx(1.0, abs=1e-9) and m[0, 2] == pytest.approx(0.0, abs=1e-9)
    assert h.js == pytest.approx(2 / 3, abs=1e-9)


def test_edge_cases_are_finite():
    one = heterogeneity(_spectra([_spectrum("only", [2.0, 3.0])]))
    assert (float(one), one.js, one.max_ratio) == (0.0, 0.0, 0.0) and one.blocks == ("only",)
    ones = heterogeneity(_spectra([_spectrum(f"b{i}", [float(i + 1)], 1) for i in range(3)]))
    assert ones.spread == pytest.approx(math.log10(3)) and math.isfinite(ones.js)
    zeros = heterogeneity(_spectra([_spectrum("z1", [0.0]), _spectrum("z2", [0.0, 0.0])]))
    assert (float(zeros), zeros.js, zeros.blocks) == (0.0, 0.0, ())
    assert [reason.split(":")[0] for _, reason in zeros.excluded] == ["negligible curvature"] * 2


def test_excluded_blocks_and_reasons_never_nan():
    blocks = [
        _spectrum("ok1", [1.0, 2.0]),
        _spectrum("ok2", [10.0]),
        _spectrum("unused", [0.0], status="unused"),
        _spectrum("cut", [0.0], status="no_graph"),
        _spectrum("nan", [float("nan"), 1.0]),
        _spectrum("inf", [float("inf")]),
        _spectrum("roundoff", [1e-16, -3e-16]),
    ]
    h = heterogeneity(_spectra(blocks))
    assert h.blocks == ("ok1", "ok2")
    reasons = dict(h.excluded)
    assert reasons["unused"].startswith("unused")
    assert reasons["cut"].startswith("no second derivative")
    assert reasons["nan"].startswith("non-finite") and reasons["inf"].startswith("non-finite")
    assert reasons["roundoff"].startswith("negligible curvature")
    assert h.negligible == ("roundoff",)  # the others are of unknown curvature
    assert all(math.isfinite(x) for x in (h.spread, h.js, h.max_ratio))
    assert h.to_dict()["excluded"][0] == ["unused", "unused: the loss does not depend on it"]
    assert h.to_dict()["negligible"] == ["roundoff"]


def test_negligible_floor_follows_the_probe_dtype():
    blocks = [_spectrum("big", [1.0]), _spectrum("small", [1e-8])]
    f64 = heterogeneity(Spectra(blocks, steps=1, probes=1, seed=0, dtype="float64"))
    f32 = heterogeneity(Spectra(blocks, steps=1, probes=1, seed=0, dtype="float32"))
    assert f64.blocks == ("big", "small") and f64.spread == pytest.approx(8.0)
    assert f32.blocks == ("big",) and f32.spread == 0.0
    assert (
        dict(f32.excluded)["small"]
        == "negligible curvature: below 1.19209e-06 of the largest block"
    )
    assert blockopt.heterogeneity(
        Spectra(blocks, steps=1, probes=1, seed=0), floor=1e-9
    ).blocks == (
        "big",
        "small",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"floor": 0.0}, "floor"),
        ({"floor": 2.0}, "floor"),
        ({"quantiles": (0.9, 0.1)}, "quantiles"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        heterogeneity(_spectra([_spectrum("a", [1.0])]), **kwargs)
    with pytest.raises(TypeError, match="Spectra"):
        heterogeneity([1, 2, 3])


@pytest.mark.parametrize("name", ["cnn", "gpt"])
def test_the_optimizers_default_lanczos_steps_give_the_converged_score(name):
    """BlockOptimizer probes with 10 Lanczos steps: on the reference models the score is then
    within 0.05 decades of the score from 40 steps."""
    default = BlockOptimizer.__init__.__kwdefaults__["steps"]
    torch.manual_seed(0)
    if name == "cnn":
        model = models.SmallCNN()
        d = data.digits(seed=0)
        x, y = d.x_train[:64], d.y_train[:64]

        def probe():
            return F.cross_entropy(model(x), y)
    else:
        model = models.TinyGPT()
        corpus = data.text_corpus(vocab_size=64)
        x, y = data.text_batches(corpus, 16, model.context, generator=torch.Generator())

        def probe():
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    short = float(heterogeneity(blockopt.block_spectra(model, probe, steps=default)))
    long = float(heterogeneity(blockopt.block_spectra(model, probe, steps=40)))
    assert default == 10
    assert abs(short - long) < 0.05


def _js_pair(p: np.ndarray, q: np.ndarray) -> float:
    """The Jensen-Shannon distance in bits, pair by pair, 0 log 0 = 0, written out."""
    m = 0.5 * (p + q)
    total = 0.0
    for a in (p, q):
        for x, y in zip(a, m):
            if x > 0 and y > 0:
                total += 0.5 * x * math.log2(x / y)
    return math.sqrt(min(max(total, 0.0), 1.0))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(3, 40),
    st.integers(0, 2**32 - 1),
)
def test_js_matrix_is_every_pairs_distance_denormals_included(n: int, grid: int, seed: int) -> None:
    from blockopt.analysis.heterogeneity import _js_matrix

    rng = np.random.default_rng(seed)
    p = rng.random((n, grid)) ** 6
    p[rng.random((n, grid)) < 0.3] = 0.0
    p[rng.random((n, grid)) < 0.2] = 5e-324  # the smallest denormal: half of two underflows
    p[:, 0] += 1e-3  # no row is all zero
    p /= p.sum(axis=1, keepdims=True)
    m = _js_matrix(p)
    assert np.array_equal(m, m.T) and np.all(np.diag(m) == 0)
    assert np.all((m >= 0) & (m <= 1))
    for i, j in itertools.combinations(range(n), 2):
        assert m[i, j] == pytest.approx(_js_pair(p[i], p[j]), abs=1e-12)


def test_factors_of_a_score_are_those_block_lr_factors_computes() -> None:
    from blockopt.analysis.tuning import block_lr_factors, factors_of

    torch.manual_seed(0)
    model = models.SmallCNN(channels=4)
    d = data.digits(seed=0)
    x, y = d.x_train[:32], d.y_train[:32]
    spectra = blockopt.block_spectra(model, lambda: F.cross_entropy(model(x), y), steps=5)
    assert factors_of(heterogeneity(spectra), spectra, 100.0) == block_lr_factors(spectra)
    assert factors_of(heterogeneity(spectra), spectra, 7.0) == block_lr_factors(
        spectra, max_factor=7.0
    )
