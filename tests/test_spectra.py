"""block_spectra against dense eigendecompositions, known spectra, and its contracts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from reference import dense_block, dense_hessian

import blockopt
from blockopt.curvature.spectra import DEFAULT_DTYPE, BlockSpectrum, Spectra


def _dense_eigs(case, strategy="tensor"):
    hessian, offsets = dense_hessian(case.model, case.loss_of)
    blocks = blockopt.partition(case.model, strategy)
    eigs = {b.name: torch.linalg.eigvalsh(dense_block(hessian, b, offsets)).numpy() for b in blocks}
    return blocks, eigs, hessian


@pytest.mark.parametrize("strategy", ["tensor", "head"])
def test_extremes_exact_when_steps_cover_the_block(case, strategy):
    blocks, eigs, hessian = _dense_eigs(case, strategy)
    steps = max(b.numel for b in blocks)
    spectra = blockopt.block_spectra(case.model, case.probe, blocks, steps=steps)
    # 1e-8 relative to the block; blocks that are exactly zero (a bias feeding BatchNorm) are
    # round-off, held to 1e-12 of the whole Hessian's norm instead.
    floor = 1e-12 * torch.linalg.matrix_norm(hessian, 2).item()
    for b in blocks:
        s, e = spectra[b.name], eigs[b.name]
        tol = max(1e-8 * abs(e).max(), floor)
        assert abs(s.lambda_max - e[-1]) <= tol, b.name
        assert abs(s.lambda_min - e[0]) <= tol, b.name
        # Every Ritz value with visible weight is an eigenvalue of the block.
        for theta, w in zip(s.ritz_values, s.ritz_weights):
            if w > 1e-12:
                assert np.min(np.abs(e - theta)) <= tol, (b.name, theta)


def test_extremes_with_fewer_steps_within_documented_tolerance(case):
    """10 steps: extreme Ritz values lie inside the spectrum (interlacing) and, on these models'
    blocks of up to 96 coordinates, within 1% of the extreme eigenvalues (measured worst: 0.3%)."""
    blocks, eigs, hessian = _dense_eigs(case)
    spectra = blockopt.block_spectra(case.model, case.probe, blocks, steps=10)
    floor = 1e-12 * torch.linalg.matrix_norm(hessian, 2).item()
    for b in blocks:
        s, e = spectra[b.name], eigs[b.name]
        scale = abs(e).max()
        slack = max(1e-10 * scale, floor)
        assert s.lambda_max <= e[-1] + slack and s.lambda_min >= e[0] - slack, b.name
        assert abs(s.lambda_max - e[-1]) <= max(1e-2 * scale, floor), b.name
        assert abs(s.lambda_min - e[0]) <= max(1e-2 * scale, floor), b.name


def test_model_spectrum_matches_full_hessian(case):
    hessian, _ = dense_hessian(case.model, case.loss_of)
    e = torch.linalg.eigvalsh(hessian).numpy()
    s = blockopt.model_spectrum(case.model, case.probe, steps=hessian.shape[0])
    scale = abs(e).max()
    assert s.name == "model" and s.numel == hessian.shape[0]
    assert abs(s.lambda_max - e[-1]) <= 1e-8 * scale
    assert abs(s.lambda_min - e[0]) <= 1e-8 * scale


class BlockQuadratic(torch.nn.Module):
    """L = 1/2 sum_b w_b^T Q_b diag(lam_b) Q_b^T w_b + w_a^T C w_c: known diagonal blocks and a
    cross-block coupling term that must not leak into them. ``fused.weight`` is a (6, 2) tensor
    named like a fused attention projection, so its blocks are slices of 2x2."""

    def __init__(self, spectra: dict[str, list[float]], seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(len(spectra["a"]), generator=gen).double())
        self.c = torch.nn.Parameter(torch.randn(len(spectra["c"]), generator=gen).double())
        self.fused = torch.nn.Module()
        self.fused.qkv = torch.nn.Linear(2, 6, bias=False).double()
        self.mats = {}
        for name, lam in spectra.items():
            q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=gen).double())
            self.mats[name] = q @ torch.diag(torch.tensor(lam, dtype=torch.float64)) @ q.T
        self.coupling = torch.randn(len(spectra["a"]), len(spectra["c"]), generator=gen).double()

    def forward(self) -> torch.Tensor:
        w = self.fused.qkv.weight.reshape(3, 4)  # rows: the q, k and v slices, flattened
        loss = 0.5 * self.a @ self.mats["a"] @ self.a + 0.5 * self.c @ self.mats["c"] @ self.c
        for i, tag in enumerate("qkv"):
            loss = loss + 0.5 * w[i] @ self.mats[tag] @ w[i]
        loss = loss + w[0] @ w[1] + w[1] @ w[2]  # couples slices, not their diagonal blocks
        return loss + self.a @ self.coupling @ self.c


def test_quadratic_with_known_block_eigenvalues_recovered_exactly():
    known = {
        "a": [1.0, 2.0, 2.0, 3.0, 10.0],
        "c": [-4.0, 0.5, 0.5, 0.5, 7.0, 99.0, 100.0],
        "q": [4998.0, 4999.0, 5000.0, 5000.0],
        "k": [0.0, 0.0, 1.0, 2.0],
        "v": [1e-3, 1e-3, 1e-3, 1e-3],
    }
    model = BlockQuadratic(known)
    spectra = blockopt.block_spectra(model, model, steps=10, probes=3)
    names = {"a": "a", "c": "c", **{t: f"fused.qkv.weight.{t}" for t in "qkv"}}
    assert list(spectra) == [
        "a",
        "c",
        "fused.qkv.weight.q",
        "fused.qkv.weight.k",
        "fused.qkv.weight.v",
    ]
    for key, lam in known.items():
        s = spectra[names[key]]
        scale = max(abs(x) for x in lam)
        assert s.numel == len(lam)
        assert s.lambda_max == pytest.approx(max(lam), abs=1e-10 * scale)
        assert s.lambda_min == pytest.approx(min(lam), abs=1e-10 * scale)
        distinct = sorted(set(lam))
        for theta, w in zip(s.ritz_values, s.ritz_weights):
            assert min(abs(theta - x) for x in distinct) <= 1e-10 * scale
            assert w >= 0
        assert math.fsum(s.ritz_weights) == pytest.approx(1.0, abs=1e-12)
        # A start vector's Krylov space holds one direction per distinct eigenvalue; each run
        # then goes on in fresh directions (weightless in the quadrature) until it spans the
        # block, so that no eigenvalue its start vector misses stays unseen.
        assert s.steps == len(lam)


def test_trace_estimate_is_exact_on_diagonal_blocks_and_unbiased_otherwise():
    diag = [3.0, -1.0, 0.25, 8.0]

    class Diagonal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
            self.u = torch.nn.Parameter(torch.ones(6, dtype=torch.float64))
            gen = torch.Generator().manual_seed(3)
            m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
            self.m = m + m.T

        def forward(self):
            d = torch.tensor(diag, dtype=torch.float64)
            return 0.5 * (d * self.w**2).sum() + 0.5 * self.u @ self.m @ self.u

    model = Diagonal()
    spectra = blockopt.block_spectra(model, model, steps=2, probes=400, seed=1)
    assert spectra["w"].trace == pytest.approx(sum(diag), abs=1e-12)
    m = model.m
    true_trace = torch.trace(m).item()
    # Rademacher Hutchinson: Var[z^T M z] = 2 * sum_{i != j} M_ij^2.
    std = math.sqrt(2 * ((m**2).sum() - (torch.diag(m) ** 2).sum()).item() / 400)
    assert abs(spectra["u"].trace - true_trace) <= 4 * std


def test_density_integrates_to_one_and_is_nonnegative(case):
    spectra = blockopt.block_spectra(case.model, case.probe, steps=8, probes=2)
    for s in spectra.values():
        grid = s.grid()
        d = s.density(grid)
        assert (d >= 0).all()
        assert np.trapezoid(d, grid) == pytest.approx(1.0, abs=1e-6), s.name
        assert math.fsum(s.ritz_weights) == pytest.approx(1.0, abs=1e-12)


def test_density_of_a_single_node_is_the_gaussian_kernel():
    s = BlockSpectrum("b", 3, (2.0,), (1.0,), 2.0, 2.0, 6.0)
    x = np.array([2.0, 2.5])
    sigma = 0.5
    expected = np.exp(-0.5 * ((x - 2.0) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    assert np.allclose(s.density(x, sigma=sigma), expected, rtol=1e-14)
    assert s.bandwidth() == pytest.approx(0.02)


def test_to_dict_round_trips_through_json(case):
    spectra = blockopt.block_spectra(case.model, case.probe, steps=5, probes=2, seed=7)
    text = json.dumps(spectra.to_dict(), allow_nan=False)
    back = Spectra.from_dict(json.loads(text))
    assert list(back) == list(spectra)
    assert [back[k] for k in back] == [spectra[k] for k in spectra]
    assert (back.steps, back.probes, back.seed, back.hvps) == (5, 2, 7, spectra.hvps)
    with pytest.raises(ValueError, match="format"):
        Spectra.from_dict({"blocks": []})


def test_dtype_round_trips_through_to_dict_and_defaults_alike_on_both_paths(case):
    blocks = [BlockSpectrum("a", 2, (1.0, 1e-7), (0.5, 0.5), 1.0, 1e-7, 2.0)]
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        spectra = Spectra(blocks, steps=2, probes=1, seed=0, dtype=dtype)
        back = Spectra.from_dict(json.loads(json.dumps(spectra.to_dict())))
        assert back.dtype == spectra.dtype == dtype and dict(back) == dict(spectra)
    # No dtype given: the constructor and a dict without the key (a file written before the
    # field existed) record the same one, so a hand-built Spectra and its file score alike.
    plain = Spectra(blocks, steps=2, probes=1, seed=0)
    old = {k: v for k, v in plain.to_dict().items() if k != "dtype"}
    assert plain.dtype == Spectra.from_dict(old).dtype == DEFAULT_DTYPE == "float64"
    assert Spectra.from_dict(plain.to_dict()).dtype == plain.dtype
    assert blockopt.heterogeneity(Spectra.from_dict(old)) == blockopt.heterogeneity(plain)
    probed = blockopt.block_spectra(case.model, case.probe, steps=3)
    assert probed.dtype == "float64"  # the reference cases run in float64
    assert Spectra.from_dict(json.loads(json.dumps(probed.to_dict()))).dtype == "float64"


def test_float32_model_spectra_close_to_float64():
    torch.manual_seed(0)
    m64 = blockopt.workloads.models.MLP((8, 16, 4)).double()
    m32 = blockopt.workloads.models.MLP((8, 16, 4))
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    s = {}
    for label, m in (("32", m32), ("64", m64)):
        dtype = next(m.parameters()).dtype
        s[label] = blockopt.block_spectra(
            m, lambda m=m, d=dtype: torch.nn.functional.cross_entropy(m(x.to(d)), y), steps=20
        )
    for name in s["64"]:
        a, b = s["32"][name], s["64"][name]
        scale = max(abs(b.lambda_max), abs(b.lambda_min))
        assert a.lambda_max == pytest.approx(b.lambda_max, abs=1e-4 * scale), name
        assert a.lambda_min == pytest.approx(b.lambda_min, abs=1e-4 * scale), name


def test_start_vectors_depend_only_on_seed_and_block_name(case):
    blocks = blockopt.partition(case.model)
    big = max(blocks, key=lambda b: b.numel)
    all_blocks = blockopt.block_spectra(case.model, case.probe, blocks, steps=4, seed=3)
    alone = blockopt.block_spectra(case.model, case.probe, [big], steps=4, seed=3)
    assert alone[big.name] == all_blocks[big.name]
    other = blockopt.block_spectra(case.model, case.probe, [big], steps=4, seed=4)
    assert other[big.name].ritz_weights != alone[big.name].ritz_weights


def test_hvp_count_and_settings_recorded(case):
    spectra = blockopt.block_spectra(case.model, case.probe, steps=3, probes=2)
    assert spectra.hvps == sum(s.steps * s.probes for s in spectra.values())
    assert all(s.steps <= 3 and s.probes == 2 for s in spectra.values())
    assert spectra.seconds > 0


def test_blocks_argument_accepts_a_strategy(case):
    by_name = blockopt.block_spectra(case.model, case.probe, "module", steps=2)
    assert list(by_name) == [b.name for b in blockopt.partition(case.model, "module")]


def test_tol_keeps_the_decisions_of_a_full_dense_reference(case):
    """With ``tol``, every block's curvature scale stays within 5% of its dense float64 value,
    the heterogeneity score within 0.1 decades of the dense blocks' and each block learning-rate
    factor within 25%: what the optimizer decides on. Blocks stop early or at their size."""
    from blockopt.analysis.heterogeneity import heterogeneity
    from blockopt.analysis.tuning import block_lr_factors

    blocks, eigs, _ = _dense_eigs(case)
    exact = blockopt.block_spectra(case.model, case.probe, blocks, steps=100)
    early = blockopt.block_spectra(case.model, case.probe, blocks, steps=100, tol=0.05)
    assert early.tol == 0.05 and early.hvps <= exact.hvps
    h_exact, h_early = heterogeneity(exact), heterogeneity(early)
    assert h_early.blocks == h_exact.blocks
    for name, rho in zip(h_exact.blocks, h_exact.scales):
        assert rho == pytest.approx(abs(eigs[name]).max(), rel=1e-8)
    for name, rho in zip(h_early.blocks, h_early.scales):
        assert rho == pytest.approx(abs(eigs[name]).max(), rel=0.05), name
    assert abs(float(h_early) - float(h_exact)) <= 0.1
    f_exact, f_early = block_lr_factors(exact), block_lr_factors(early)
    for name in f_exact:
        assert f_early[name] == pytest.approx(f_exact[name], rel=0.25), name


def test_tol_round_trips_through_to_dict(case):
    spectra = blockopt.block_spectra(case.model, case.probe, steps=6, tol=0.05)
    back = Spectra.from_dict(json.loads(json.dumps(spectra.to_dict())))
    assert back.tol == 0.05 and dict(back) == dict(spectra)
    old = spectra.to_dict()
    del old["tol"]  # written before the field existed
    assert Spectra.from_dict(old).tol is None
    for bad in (0.0, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="tol"):
            Spectra.from_dict({**spectra.to_dict(), "tol": bad})


def test_roundoff_is_pooled_and_round_trips_through_to_dict(case):
    """Each block records the largest round-off level of its runs; a dict written before the
    field existed reads as unmeasured (``None``), so the relative floor decides there."""
    spectra = blockopt.block_spectra(case.model, case.probe, steps=6, probes=2)
    for s in spectra.values():
        assert s.roundoff is None or s.roundoff >= 0.0
    assert any(s.roundoff is not None and s.roundoff > 0.0 for s in spectra.values())
    back = Spectra.from_dict(json.loads(json.dumps(spectra.to_dict())))
    assert dict(back) == dict(spectra)
    old = spectra.to_dict()
    for block in old["blocks"]:
        del block["roundoff"]
    assert all(s.roundoff is None for s in Spectra.from_dict(old).values())
    for bad in (-1.0, math.nan, math.inf, "1e-9", True):
        data = spectra.to_dict()
        data["blocks"][0]["roundoff"] = bad
        with pytest.raises(ValueError, match="roundoff"):
            Spectra.from_dict(data)


def test_from_runs_keeps_the_largest_measured_roundoff():
    from blockopt.curvature.lanczos import LanczosResult

    def run(roundoff):
        return LanczosResult.from_tridiagonal([1.0, 2.0], [0.5], roundoff=roundoff)

    one_step = LanczosResult.from_tridiagonal([3.0], [])
    assert BlockSpectrum.from_runs("a", 4, [run(1e-9), run(3e-9), one_step]).roundoff == 3e-9
    assert BlockSpectrum.from_runs("a", 4, [one_step, one_step]).roundoff is None


def test_a_shared_probes_rows_carry_the_roundoff():
    from blockopt.curvature.lanczos import LanczosResult
    from blockopt.curvature.runs import _row_run, _run_row

    for run in (
        LanczosResult.from_tridiagonal([1.0, 2.0, 0.5], [0.3, 0.1], roundoff=2.5e-17),
        LanczosResult.from_tridiagonal([1.0, 2.0], [0.3], roundoff=0.0, settled=True),
        LanczosResult.from_tridiagonal([4.0], [], breakdown=True),
        LanczosResult.from_tridiagonal([4.0, 1.0], [2.0], breakdown=True, settled=True),
    ):
        assert _row_run(_run_row(run, "ok", 4).tolist(), 4) == run
