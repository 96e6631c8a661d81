"""Lanczos and SLQ against numpy.linalg.eigvalsh on random symmetric matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockopt.curvature.lanczos import (
    SETTLED_STEPS,
    gaussian_density,
    lanczos,
    lanczos_many,
    random_start,
    ritz,
)


@st.composite
def symmetric_matrices(draw):
    """Random orthogonal Q times a diagonal drawn from one of several eigenvalue patterns."""
    n = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["random", "repeated", "clustered", "rank_deficient", "scaled"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random":
        lam = rng.standard_normal(n)
    elif kind == "repeated":
        lam = rng.choice(rng.standard_normal(draw(st.integers(1, 4))), size=n)
    elif kind == "clustered":
        centres = rng.standard_normal(draw(st.integers(1, 3)))
        lam = rng.choice(centres, size=n) + 1e-9 * rng.standard_normal(n)
    elif kind == "rank_deficient":
        lam = rng.standard_normal(n) * (rng.random(n) < 0.3)
    else:  # eigenvalues spread over many decades, both signs
        lam = np.sign(rng.standard_normal(n)) * 10.0 ** rng.uniform(-6, 4, n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(lam) @ q.T, rng.standard_normal(n)


def _run(a: np.ndarray, v0: np.ndarray, steps: int, **kw):
    at = torch.from_numpy(a)
    return lanczos(lambda v: at @ v, torch.from_numpy(v0), steps, **kw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(symmetric_matrices())
def test_full_run_finds_the_extreme_eigenvalues_and_only_eigenvalues(mat):
    a, v0 = mat
    n = a.shape[0]
    eig = np.linalg.eigvalsh(a)
    scale = max(np.abs(eig).max(), 1e-300)
    res = _run(a, v0, n)
    assert res.steps <= n
    values, weights = np.array(res.ritz_values), np.array(res.ritz_weights)
    assert (weights >= 0).all() and math.isclose(weights.sum(), 1.0, abs_tol=1e-12)
    assert np.all(np.diff(values) >= 0)
    tol = 1e-8 * scale
    # Each Ritz value with weight is an eigenvalue; the extremes are found.
    for theta, w in zip(values, weights):
        if w > 1e-10:
            assert np.abs(eig - theta).min() <= tol
    # The extremes are seen unless the start vector is (numerically) orthogonal to them.
    q = np.linalg.eigh(a)[1]
    proj = (q.T @ (v0 / np.linalg.norm(v0))) ** 2
    if proj[-1] > 1e-6:
        assert abs(values.max() - eig[-1]) <= tol
    if proj[0] > 1e-6:
        assert abs(values.min() - eig[0]) <= tol


@settings(max_examples=100, deadline=None)
@given(symmetric_matrices(), st.integers(1, 8))
def test_quadrature_reproduces_moments(mat, steps):
    """Gauss quadrature with m nodes is exact for polynomials of degree < 2m: for k <= 2m-1,
    sum_i w_i theta_i^k = u^T A^k u with u the unit start vector."""
    a, v0 = mat
    u = v0 / np.linalg.norm(v0)
    res = _run(a, v0, steps)
    values, weights = np.array(res.ritz_values), np.array(res.ritz_weights)
    scale = max(np.abs(np.linalg.eigvalsh(a)).max(), 1e-300)
    for k in range(1, min(2 * res.steps, 4)):
        exact = u @ np.linalg.matrix_power(a, k) @ u
        assert abs((weights * values**k).sum() - exact) <= 1e-8 * scale**k


@settings(max_examples=60, deadline=None)
@given(symmetric_matrices(), symmetric_matrices(), st.integers(1, 12))
def test_lockstep_runs_equal_independent_runs(m1, m2, steps):
    (a1, v1), (a2, v2) = m1, m2
    mats = [torch.from_numpy(a1), torch.from_numpy(a2)]
    together = lanczos_many(
        lambda ids, vs: [mats[i] @ v for i, v in zip(ids, vs)],
        [torch.from_numpy(v1), torch.from_numpy(v2)],
        steps,
    )
    assert together[0] == _run(a1, v1, steps)
    assert together[1] == _run(a2, v2, steps)


def test_without_reorthogonalisation_ghosts_appear_but_extremes_hold():
    rng = np.random.default_rng(0)
    lam = np.concatenate([[100.0], np.linspace(0, 1, 99)])
    q, _ = np.linalg.qr(rng.standard_normal((100, 100)))
    a = q @ np.diag(lam) @ q.T
    plain = _run(a, rng.standard_normal(100), 60, reorthogonalize=False)
    full = _run(a, rng.standard_normal(100), 60)
    assert plain.ritz_values[-1] == pytest.approx(100.0, rel=1e-10)
    assert full.ritz_values[-1] == pytest.approx(100.0, rel=1e-10)
    ghosts = sum(abs(t - 100.0) < 1e-6 for t in plain.ritz_values)
    assert ghosts >= 2  # the converged top eigenvalue reappears without reorthogonalisation
    assert sum(abs(t - 100.0) < 1e-6 for t in full.ritz_values) == 1


def test_zero_matrix_breaks_down_at_every_step_and_goes_on_to_its_dimension():
    """Each step's Krylov space is invariant; the run goes on in fresh directions (zero
    couplings), which carry no quadrature weight, until it spans the space."""
    res = lanczos(lambda v: torch.zeros_like(v), torch.ones(5, dtype=torch.float64), 10)
    assert res.breakdown and res.steps == 5
    assert res.betas == (0.0,) * 4
    assert res.ritz_values == (0.0,) * 5
    assert sorted(res.ritz_weights) == pytest.approx([0.0] * 4 + [1.0])


def test_a_settled_tolerance_stops_the_fresh_directions_of_a_scalar_matrix():
    res = lanczos(lambda v: 3.0 * v, torch.arange(1.0, 6.0, dtype=torch.float64), 10, tol=0.02)
    assert res.settled and res.steps == 1 + SETTLED_STEPS
    assert res.ritz_values == pytest.approx((3.0,) * res.steps)
    assert max(res.ritz_weights) == pytest.approx(1.0)


def test_a_start_in_an_invariant_subspace_still_finds_every_extreme_eigenvalue():
    """A start vector that is an eigenvector of a small eigenvalue spans an invariant space
    at once; the fresh directions after it find the rest, and the quadrature seen from the
    start vector is untouched: all its weight on its own eigenvalue."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    lam = np.array([-2.0, 0.5, 1.0, 3.0, 7.0, 11.0])
    a = q @ np.diag(lam) @ q.T
    res = _run(a, q[:, 1], 20)
    assert res.steps == 6
    assert res.ritz_values == pytest.approx(tuple(lam), abs=1e-12)
    weights = dict(zip(np.round(res.ritz_values, 9), res.ritz_weights))
    assert weights[0.5] == pytest.approx(1.0, abs=1e-12)


def test_float32_runs_match_float64():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 30))
    a = a + a.T
    v0 = rng.standard_normal(30)
    r64 = _run(a, v0, 30)
    a32 = torch.from_numpy(a).float()
    r32 = lanczos(lambda v: a32 @ v, torch.from_numpy(v0).float(), 30)
    eig = np.linalg.eigvalsh(a)
    assert r64.ritz_values[-1] == pytest.approx(eig[-1], rel=1e-12)
    assert r32.ritz_values[-1] == pytest.approx(eig[-1], rel=1e-5)
    assert r32.ritz_values[0] == pytest.approx(eig[0], rel=1e-5)


@pytest.mark.parametrize(
    ("start", "steps", "error"),
    [
        (torch.zeros(3), 2, ValueError),
        (torch.ones(3), 0, ValueError),
        (torch.ones(3), 2.5, ValueError),
        (torch.ones(2, 2), 2, ValueError),
        (torch.ones(3, dtype=torch.int64), 2, TypeError),
        (torch.tensor([1.0, float("nan")]), 2, ValueError),
    ],
)
def test_bad_arguments_are_clear_errors(start, steps, error):
    with pytest.raises(error):
        lanczos(lambda v: v, start, steps)


def test_non_finite_products_are_reported():
    with pytest.raises(FloatingPointError, match="non-finite"):
        lanczos(lambda v: v * float("inf"), torch.ones(3), 3)


def test_random_start_is_unit_rademacher():
    v = random_start(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.linalg.vector_norm(v).item() == pytest.approx(1.0, abs=1e-15)
    assert set((v * 10).round().tolist()) == {-1.0, 1.0}


def test_ritz_of_a_2x2_tridiagonal():
    values, weights = ritz([0.0, 0.0], [1.0])
    assert np.allclose(values, [-1.0, 1.0]) and np.allclose(weights, [0.5, 0.5])


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-500, 500), min_size=1, max_size=20),
    st.floats(1e-3, 10.0),
)
def test_gaussian_density_integrates_to_one(offsets, sigma):
    """On any grid that reaches 8 sigma beyond the nodes with a step of at most sigma / 5."""
    nodes = [sigma * k for k in offsets]
    weights = np.full(len(nodes), 1.0 / len(nodes))
    lo, hi = min(nodes) - 8 * sigma, max(nodes) + 8 * sigma
    grid = np.linspace(lo, hi, int((hi - lo) / (sigma / 5)) + 2)
    d = gaussian_density(nodes, weights, grid, sigma)
    assert np.trapezoid(d, grid) == pytest.approx(1.0, abs=1e-6)


def _extreme_moves(res) -> list[float]:
    """How far each step from the second on moved the extreme Ritz values, relative to them."""
    moves, previous = [], None
    for k in range(1, res.steps + 1):
        values, _ = ritz(res.alphas[:k], res.betas[: k - 1])
        lo, hi = values[0], values[-1]
        if previous is not None:
            scale = max(abs(lo), abs(hi))
            moved = max(abs(lo - previous[0]), abs(hi - previous[1]))
            moves.append(moved / scale if scale > 0 else 0.0)
        previous = (lo, hi)
    return moves


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(symmetric_matrices(), st.sampled_from([1e-1, 1e-2, 1e-3]))
def test_tol_stops_after_two_settled_steps_and_keeps_the_full_runs_prefix(mat, tol):
    """A run with ``tol`` is the full run cut at the first point where two steps in a row (from
    the second on) each moved neither extreme Ritz value by more than ``tol`` of their scale:
    the same numbers to the bit."""
    a, v0 = mat
    n = a.shape[0]
    full = _run(a, v0, n)
    early = _run(a, v0, n, tol=tol)
    k = early.steps
    assert early.alphas == full.alphas[:k]
    assert early.betas == full.betas[: k - 1]
    calm = [m <= tol for m in _extreme_moves(full)]  # calm[j]: step j + 2
    pairs = [calm[j - 1] and calm[j] for j in range(1, len(calm))]  # pairs[j - 1]: ends at j + 2
    if early.settled:
        assert k >= 3 and pairs[k - 3] and not any(pairs[: k - 3])
        assert not early.breakdown
    else:  # ran as far as the full run (its size or breakdown): no earlier pair settled
        assert k == full.steps and not any(pairs[: max(k - 3, 0)])


def test_tol_saves_steps_where_the_spectrum_has_clear_edges():
    """Eigenvalues 1..1000 on a log scale with two outliers: the extremes settle in a few steps,
    within the tolerance of the exact ones, well before the dimension."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([10.0 ** rng.uniform(0, 2, 198), [1e3, -5e2]])
    q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    a = q @ np.diag(lam) @ q.T
    res = _run(a, rng.standard_normal(200), 200, tol=1e-3)
    assert res.settled and res.steps < 30
    assert res.ritz_values[-1] == pytest.approx(1e3, rel=1e-3)
    assert res.ritz_values[0] == pytest.approx(-5e2, rel=1e-3)


@pytest.mark.parametrize(
    ("tol", "error"),
    [
        (0.0, ValueError),
        (1.0, ValueError),
        (-0.1, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("0.1", TypeError),
    ],
)
def test_bad_tol_is_refused(tol, error):
    with pytest.raises(error, match="tol must be None or a number in"):
        lanczos(lambda v: v, torch.ones(3), 3, tol=tol)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_roundoff_is_the_departure_of_the_products_from_symmetry(reorthogonalize):
    """From ``e_0`` on ``[[1, b], [c, 2]]`` (``c > 0``): ``v_1 = e_1``, ``v_1 . (A v_0) = c`` and
    ``v_0 . (A v_1) = b``, so the round-off level is ``|b - c|``; for a symmetric matrix it is
    round-off itself."""
    for b, c in [(0.3, 0.5), (-2.0, 1.0), (0.5, 0.5)]:
        a = torch.tensor([[1.0, b], [c, 2.0]], dtype=torch.float64)
        run = lanczos(lambda v, a=a: a @ v, torch.tensor([1.0, 0.0], dtype=torch.float64), 2,
                      reorthogonalize=reorthogonalize)  # fmt: skip
        assert run.steps == 2 and run.roundoff == pytest.approx(abs(b - c), abs=1e-15)
    # several steps: the largest departure over them, of the size of the antisymmetric part,
    # with and without reorthogonalising (whose vectors drift apart by about that part)
    rng = np.random.default_rng(3)
    s, k = rng.standard_normal((30, 30)), rng.standard_normal((30, 30))
    a = torch.from_numpy(s + s.T + 1e-3 * (k - k.T))  # symmetric, and a small antisymmetric part
    v0 = torch.from_numpy(rng.standard_normal(30))
    full = lanczos(lambda v: a @ v, v0, 6)
    plain = lanczos(lambda v: a @ v, v0, 6, reorthogonalize=False)
    assert 1e-4 < full.roundoff < 1e-2
    assert plain.roundoff == pytest.approx(full.roundoff, rel=1e-2)


def test_a_run_of_one_step_measures_no_roundoff():
    assert lanczos(lambda v: 3.0 * v, torch.ones(1, dtype=torch.float64), 10).roundoff is None
    assert lanczos(lambda v: 3.0 * v, torch.ones(4, dtype=torch.float64), 1).roundoff is None


def test_fresh_directions_after_a_breakdown_measure_roundoff_across_it():
    """v_{j-1} . (A v_j) = v_j . (A v_{j-1}) holds for any pair of vectors of a symmetric
    operator, so the pair across a restart measures round-off too: exactly none here."""
    zero = lanczos(lambda v: torch.zeros_like(v), torch.ones(5, dtype=torch.float64), 10)
    scalar = lanczos(lambda v: 3.0 * v, torch.ones(4, dtype=torch.float64), 10)
    assert zero.roundoff == 0.0 and zero.steps == 5
    assert scalar.roundoff == pytest.approx(0.0, abs=1e-15) and scalar.steps == 4


def test_float32_curvature_whose_squared_products_overflow_float32_is_measured():
    """|A v|^2 of a float32 operator with eigenvalues near 1e20 exceeds float32's range
    (3.4e38) though every entry is finite: norms are accumulated in float64."""
    lam = torch.tensor([2.5e20, 1e20, 3e19, 1.0, -7e18], dtype=torch.float32)
    res = lanczos(lambda v: lam * v, torch.ones(5, dtype=torch.float32), 10)
    assert res.steps == 5
    assert max(res.ritz_values) == pytest.approx(2.5e20, rel=1e-5)
    assert min(res.ritz_values) == pytest.approx(-7e18, rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=8),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_a_run_to_the_dimension_finds_every_eigenvalue_with_its_multiplicity(lams, seed, data):
    """Repeated eigenvalues and a start vector made of some eigenvectors only: its Krylov
    space misses the rest, and the fresh directions after each breakdown find them all. The
    quadrature seen from the start vector keeps its weights on the eigenvalues it holds."""
    n = len(lams)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.asarray(lams, dtype=np.float64)) @ q.T
    held = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    v0 = q[:, held] @ rng.uniform(0.5, 1.5, len(held))
    res = _run(a, v0, n + 3)
    assert res.steps == n
    assert sorted(res.ritz_values) == pytest.approx(sorted(lams), abs=1e-9)
    mass = {}
    for theta, w in zip(res.ritz_values, res.ritz_weights):
        mass[round(theta)] = mass.get(round(theta), 0.0) + w
    coef = (q.T @ v0) ** 2 / np.sum(v0**2)
    expected = {}
    for lam, c in zip(lams, coef):
        expected[lam] = expected.get(lam, 0.0) + c
    for lam in set(lams):
        assert mass[lam] == pytest.approx(expected[lam], abs=1e-9)
