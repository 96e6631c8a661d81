"""Half-precision models probed right, and Lanczos requests that cannot fit refused at once."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import blockopt
from blockopt.curvature import lanczos
from blockopt.curvature.precision import half_precision, upcast
from blockopt.workloads import tasks

HALF = [torch.bfloat16, torch.float16]


class Checked(nn.Module):
    """A conv net with BatchNorm whose forward records the dtype it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(144, 3)
        )
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return self.net(x) * scale


@pytest.mark.parametrize("dtype", HALF)
def test_upcast_runs_in_float32_and_gives_back_the_same_tensors(dtype):
    torch.manual_seed(0)
    model = Checked().to(dtype)
    x, scale = torch.randn(5, 1, 8, 8, dtype=dtype), torch.tensor(2.0, dtype=dtype)
    params = [(p, p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    buffers = [(b, b.clone()) for b in model.buffers() if b.is_floating_point()]
    assert half_precision(model) and not half_precision(Checked())
    with upcast(model):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
        out = model(x, scale=scale)
        assert out.dtype == torch.float32 and model.seen[-1] == torch.float32
    for p, address, values in params:  # the same storage, the same bits
        assert p.data_ptr() == address and p.dtype == dtype and torch.equal(p, values)
    floating = [b for b in model.buffers() if b.is_floating_point()]
    for (b, values), now in zip(buffers, floating):  # the float32 forward's stats are dropped
        assert now is b and torch.equal(b, values)
    assert model(x, scale=scale).dtype == dtype and model.seen[-1] == dtype  # the hook is gone


def _gpt(dtype: torch.dtype):
    work = tasks.DEMO_TASKS["gpt"].build(0)
    work.model.to(dtype)
    return work


@pytest.fixture(scope="module")
def gpt_float32():
    work = _gpt(torch.float32)
    return blockopt.block_spectra(work.model, work.probe, steps=8)


@pytest.mark.parametrize("dtype", HALF)
def test_a_half_precision_probe_in_float32_is_the_float32_probe_of_its_weights(dtype, gpt_float32):
    work = _gpt(dtype)
    half = blockopt.block_spectra(work.model, work.probe, steps=8)  # upcast=True, the default
    widened = _gpt(dtype)
    widened.model.float()  # the same rounded weights, for good
    exact = blockopt.block_spectra(widened.model, widened.probe, steps=8)
    assert half.dtype == "float32"
    for name in exact:
        assert half[name].ritz_values == exact[name].ritz_values
    # and the rounded weights' curvature is the float32 model's within that rounding
    ours, reference = blockopt.heterogeneity(half), blockopt.heterogeneity(gpt_float32)
    assert ours.blocks == reference.blocks
    assert abs(ours.spread - reference.spread) < 0.02
    errors = [abs(half[n].lambda_max / gpt_float32[n].lambda_max - 1) for n in reference.blocks]
    assert np.median(errors) < (2e-3 if dtype == torch.bfloat16 else 5e-4)


def test_a_bfloat16_probe_in_bfloat16_runs_every_lanczos_step(gpt_float32):
    """Without upcasting, the products carry bfloat16 round-off but the basis is float32: the
    runs take their steps (a bfloat16 basis broke down after one) and the score holds."""
    work = _gpt(torch.bfloat16)
    half = blockopt.block_spectra(work.model, work.probe, steps=8, upcast=False)
    assert half.dtype == "bfloat16"
    assert all(half[n].steps == 8 for n in half if half[n].numel >= 8)
    ours, reference = blockopt.heterogeneity(half), blockopt.heterogeneity(gpt_float32)
    assert abs(ours.spread - reference.spread) < 0.1
    assert set(ours.blocks) == set(reference.blocks)


def test_float16_products_of_attention_overflow_unless_upcast():
    work = _gpt(torch.float16)
    with pytest.raises(
        FloatingPointError,
        match=r"block '.*' produced a non-finite value .*"
        r"in float16, the double backward .* overflows; probe in float32",
    ):
        blockopt.block_spectra(work.model, work.probe, steps=4, upcast=False)
    spectra = blockopt.block_spectra(work.model, work.probe, steps=4)
    assert all(np.isfinite(spectra[n].lambda_max) for n in spectra)
    assert all(p.dtype == torch.float16 for p in work.model.parameters())


def _counting(sizes: list[int]):
    calls = []

    def matvec(indices, vectors):
        calls.append(len(indices))
        return [v.clone() for v in vectors]

    return matvec, calls, [torch.ones(n) for n in sizes]


def test_an_endless_lanczos_request_is_refused_before_any_product():
    matvec, calls, starts = _counting([20_000, 10])
    with pytest.raises(
        ValueError,
        match=r"1,000,000,000 Lanczos steps .* about 3\.2e\+13 .*"
        r"operator 0, has 20,000 coordinates.*ask for fewer steps",
    ):
        lanczos.lanczos_many(matvec, starts, 10**9)
    assert calls == []
    assert len(lanczos.lanczos_many(matvec, starts, 500)[0].alphas) >= 1  # 500 is fine


def test_a_basis_that_cannot_fit_is_refused_with_the_numbers(monkeypatch):
    monkeypatch.setattr(lanczos, "available_memory", lambda device: 100 * 2**20)
    matvec, calls, starts = _counting([1_000_000])
    with pytest.raises(
        ValueError,
        match=r"need 0\.37 GiB on cpu .* more than half of the 0\.10 "
        r"GiB available: ask for fewer steps",
    ):
        lanczos.check_lanczos_size([1_000_000], 100, starts, names=["emb.weight"])
    with pytest.raises(ValueError, match=r"block 'emb\.weight', has 1,000,000 coordinates"):
        lanczos.check_lanczos_size([1_000_000], 100, starts, names=["emb.weight"])
    with pytest.raises(ValueError, match="more than half"):
        lanczos.lanczos_many(matvec, starts, 100)
    assert calls == []
    lanczos.check_lanczos_size([1_000_000], 100, starts, reorthogonalize=False)  # no basis


def test_available_memory_is_a_positive_count_on_cpu():
    have = lanczos.available_memory(torch.device("cpu"))
    assert have is None or have > 2**20


def test_the_basis_is_one_vector_per_step_not_a_copy_per_step():
    """The reorthogonalisation reads the basis in place: over a run, the largest tensor alive
    besides the basis is one vector (the allocator's peak would show a stacked copy)."""
    n, steps = 5000, 40
    a = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    a[0] = 5.0  # an outlier, which 40 steps find to round-off
    sizes: list[int] = []
    real_empty = torch.empty

    def matvec(indices, vectors):
        return [a * v for v in vectors]

    def spy(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        sizes.append(t.numel())
        return t

    torch.empty = spy
    try:
        run = lanczos.lanczos_many(matvec, [torch.ones(n, dtype=torch.float64)], steps)[0]
    finally:
        torch.empty = real_empty
    assert sizes == [steps * n]  # the basis, allocated once
    assert run.steps == steps
    assert max(run.ritz_values) == pytest.approx(5.0, rel=1e-12)
    assert copy.copy(run) == run


@pytest.mark.parametrize("backend", ["autograd", "fd"])
def test_a_probe_under_autocast_is_warned_about_and_a_plain_one_is_not(backend):
    """A probe closure written like an AMP training step runs the model in bfloat16: products
    as coarse as that (blocks dropped as negligible, finite-difference steps rounded away), so
    the probe says so; the same closure without autocast probes silently."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def amp() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(model(x), y)

    with pytest.warns(UserWarning, match=r"under torch.autocast \(bfloat16\)"):
        blockopt.block_spectra(model, amp, steps=3, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = blockopt.block_spectra(
            model, lambda: nn.functional.cross_entropy(model(x), y), steps=3, backend=backend
        )
    assert all(s.status == "ok" for s in plain.values())
    assert not torch.is_autocast_enabled("cpu")  # the watch left nothing behind
