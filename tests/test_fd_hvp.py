"""Finite-difference block Hessian-vector products: against dense float64 Hessians, against
autograd in float32, where autograd cannot run, and what they leave behind."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import dense_block, dense_hessian
from torch import nn
from torch.autograd.function import once_differentiable

import blockopt
from blockopt.curvature.blocks import Block, BlockPart
from blockopt.curvature.fd_hvp import FiniteDifferenceHessian
from blockopt.curvature.hvp import BlockHessian, DoubleBackwardError
from blockopt.curvature.isolation import isolated
from blockopt.curvature.lanczos import lanczos_many, random_start
from blockopt.workloads.models import TinyGPT


def _unit_vectors(blocks: list[Block], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vs = [torch.randn(b.numel, generator=gen, dtype=torch.float64) for b in blocks]
    return [(v / v.norm()).to(dtype) for v in vs]


def _relative(got: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    """|got - expected| / max(|expected|, floor): a block whose product is zero (a key bias,
    a bias before BatchNorm) is compared with the model's curvature scale instead."""
    diff = float(torch.linalg.vector_norm(got.double() - expected.double()))
    return diff / max(float(torch.linalg.vector_norm(expected.double())), floor)


# 1. float64: against dense block Hessians, whole parameters and slices of them.


@pytest.mark.parametrize(
    ("name", "strategy"), [("mlp", "tensor"), ("cnn", "tensor"), ("fused_sdpa", "head")]
)
@pytest.mark.parametrize(("scheme", "tol"), [("central", 1e-6), ("forward", 1e-4)])
def test_float64_products_match_dense_blocks(name, strategy, scheme, tol):
    case = CASES[name]()
    hessian, offsets = dense_hessian(case.model, case.loss_of)
    blocks = blockopt.partition(case.model, strategy)
    if strategy == "head":
        assert any(p.dim is not None for b in blocks for p in b.parts)  # slices are probed
    vectors = _unit_vectors(blocks, torch.float64)
    op = FiniteDifferenceHessian(case.model, case.probe, blocks, scheme=scheme)
    products = op.matvec_many(list(range(len(blocks))), vectors)
    assert op.products == len(blocks)
    per_product = 2 if scheme == "central" else 1
    assert op.evaluations >= 1 + per_product * len(blocks)
    floor = 1e-3 * float(torch.linalg.matrix_norm(hessian, 2))
    for block, v, hv in zip(blocks, vectors, products):
        expected = dense_block(hessian, block, offsets) @ v
        assert hv.dtype == torch.float64 and hv.shape == v.shape
        assert _relative(hv, expected, floor) < tol, block.name


# 2. float32: against autograd on a small transformer, products and lambda_max.


def _tiny_gpt() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=32, d_model=32, n_layers=2, n_heads=4, context=16)
    x, y = torch.randint(0, 32, (8, 16)), torch.randint(0, 32, (8, 16))
    return model, lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def test_float32_agrees_with_autograd_on_a_small_transformer():
    model, probe = _tiny_gpt()
    blocks = blockopt.partition(model)
    vectors = _unit_vectors(blocks, torch.float32)
    starts = [
        random_start(b.numel, generator=torch.Generator().manual_seed(i), dtype=torch.float32)
        for i, b in enumerate(blocks)
    ]
    with isolated(model):
        autograd = BlockHessian(probe(), blocks, workers=1)
        reference = autograd.matvec_many(list(range(len(blocks))), vectors)
        exact = lanczos_many(autograd.matvec_many, starts, 10)
    fd = FiniteDifferenceHessian(model, probe, blocks)
    products = fd.matvec_many(list(range(len(blocks))), vectors)
    approx = lanczos_many(fd.matvec_many, starts, 10)
    scale = max(float(r.norm()) for r in reference)
    errors = [_relative(p, r, 1e-3 * scale) for p, r in zip(products, reference)]
    assert statistics.median(errors) < 1e-3
    assert max(errors) < 2e-2
    top = max(r.ritz_values[-1] for r in exact)
    differences = [
        abs(b.ritz_values[-1] - a.ritz_values[-1]) / max(abs(a.ritz_values[-1]), 1e-3 * top)
        for a, b in zip(exact, approx)
    ]
    assert statistics.median(differences) < 1e-3
    assert max(differences) < 2e-2


# 3. Where autograd cannot: no double backward, reentrant checkpointing, compile, flash SDPA.


class _Softplus(torch.autograd.Function):
    """softplus with a hand-written backward that has no derivative of its own, as fused
    kernels are."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class _Net(nn.Module):
    """Linear, tanh, Linear, the activation, Linear; ``wrap(f, z)`` runs the middle part ``f``
    (checkpointing), whose input ``z`` requires grad, as a transformer layer's does."""

    def __init__(self, activation, wrap=None) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 7), nn.Linear(7, 3)
        self.activation, self.wrap = activation, wrap

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        return self.activation(self.mid(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.fc1(x))
        return self.fc2(self.hidden(z) if self.wrap is None else self.wrap(self.hidden, z))


def _pair(activation, wrap=None, dtype=torch.float64):
    """The same weights twice: one with ``activation``/``wrap``, one with plain softplus."""
    torch.manual_seed(0)
    odd = _Net(activation, wrap).to(dtype)
    plain = _Net(F.softplus).to(dtype)
    plain.load_state_dict(odd.state_dict())
    x, y = torch.randn(16, 5, dtype=dtype), torch.randint(0, 3, (16,))

    def probe_of(m):
        return lambda: F.cross_entropy(m(x), y)

    probe_of.loss_of = lambda forward: F.cross_entropy(forward(x), y)  # for dense_hessian
    return odd, plain, probe_of


def _check_against_plain(odd, plain, probe_of, tol):
    """Finite differences on ``odd`` match autograd on ``plain``; returns the reference."""
    blocks, plain_blocks = blockopt.partition(odd), blockopt.partition(plain)
    dtype = next(odd.parameters()).dtype
    vectors = _unit_vectors(blocks, dtype)
    with isolated(plain):
        reference = BlockHessian(probe_of(plain)(), plain_blocks, workers=1)
        expected = reference.matvec_many(list(range(len(blocks))), vectors)
    fd = FiniteDifferenceHessian(odd, probe_of(odd), blocks)
    got = fd.matvec_many(list(range(len(blocks))), vectors)
    scale = max(float(e.norm()) for e in expected)
    for i, (b, g, e) in enumerate(zip(blocks, got, expected)):
        assert fd.status(i) == "ok"
        assert _relative(g, e, 1e-3 * scale) < tol, b.name
    return vectors, expected, scale


def test_once_differentiable_function():
    odd, plain, probe_of = _pair(_Softplus.apply)
    _check_against_plain(odd, plain, probe_of, 1e-6)
    # Autograd's products of the blocks before the op would be wrong (its backward has no
    # graph: autograd would see part of their Hessian, through tanh, or none), so the
    # operator refuses the graph, and the default backend takes finite differences instead.
    blocks = blockopt.partition(odd)
    with isolated(odd), pytest.raises(DoubleBackwardError, match="once_differentiable"):
        BlockHessian(probe_of(odd)(), blocks, workers=1)
    with pytest.raises(DoubleBackwardError, match="backend='fd'"):
        blockopt.block_spectra(odd, probe_of(odd), steps=3, backend="autograd")
    _spectra_match_dense(odd, plain, probe_of)


def _spectra_match_dense(odd, plain, probe_of):
    """block_spectra of ``odd`` at its default backend takes finite differences, and its
    extreme eigenvalues match the dense float64 Hessian blocks of ``plain``, which computes
    the same function with differentiable operations."""
    spectra = blockopt.block_spectra(odd, probe_of(odd), steps=12)
    assert spectra.backend == "fd"
    hessian, offsets = dense_hessian(plain, probe_of.loss_of)
    for block in blockopt.partition(plain):
        exact = torch.linalg.eigvalsh(dense_block(hessian, block, offsets))
        s = spectra[block.name]
        scale = float(exact.abs().max())
        assert s.status == "ok"
        assert s.lambda_max == pytest.approx(float(exact[-1]), abs=1e-5 * scale), block.name
        assert s.lambda_min == pytest.approx(float(exact[0]), abs=1e-5 * scale), block.name


def test_reentrant_checkpointing():
    def checkpointed(f, x):
        return torch.utils.checkpoint.checkpoint(f, x, use_reentrant=True)

    odd, plain, probe_of = _pair(F.softplus, checkpointed)
    blocks = blockopt.partition(odd)
    with isolated(odd), pytest.raises(DoubleBackwardError, match="use_reentrant"):
        BlockHessian(probe_of(odd)(), blocks, workers=1)  # .grad()/inputs= are refused
    _check_against_plain(odd, plain, probe_of, 1e-6)
    _spectra_match_dense(odd, plain, probe_of)


def test_compiled_module():
    try:
        import torch._dynamo

        torch.manual_seed(0)
        probe_net = torch.compile(nn.Linear(2, 2), backend="aot_eager")
        probe_net(torch.randn(1, 2)).sum().backward()
    except Exception as err:  # no compiler on this machine
        pytest.skip(f"torch.compile(backend='aot_eager') does not run here: {err}")
    odd, plain, probe_of = _pair(F.softplus)
    compiled = torch.compile(odd, backend="aot_eager")
    x_probe = probe_of(compiled)
    blocks = blockopt.partition(odd)
    with isolated(odd, second_order=False), pytest.raises(RuntimeError, match="double backward"):
        loss = x_probe()
        (g,) = torch.autograd.grad(loss, odd.fc1.weight, create_graph=True)
        torch.autograd.grad(g.sum(), odd.fc1.weight)
    _check_against_plain(odd, plain, lambda m: x_probe if m is odd else probe_of(m), 1e-6)
    assert len(blocks) == 6


class _Attention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d)).mean(dim=1)


def test_flash_attention_on_cpu():
    """The CPU flash kernel runs forward and backward, but its backward has no derivative
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented", torch 2.13): autograd products raise, finite differences run and match the
    math kernel's autograd products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _Attention().double()
    x, y = torch.randn(4, 6, 8, dtype=torch.float64), torch.randint(0, 3, (4,))

    def flash() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.cross_entropy(model(x), y)

    try:
        flash().backward()
    except RuntimeError as err:
        pytest.skip(f"no flash attention kernel on this CPU: {err}")
    model.zero_grad(set_to_none=True)
    blocks = blockopt.partition(model, "head")
    loss = flash()
    with pytest.raises(DoubleBackwardError):
        BlockHessian(loss, blocks, workers=1).matvec(0, torch.ones(blocks[0].numel).double())
    model.zero_grad(set_to_none=True)
    vectors = _unit_vectors(blocks, torch.float64)
    with isolated(model):  # math kernel
        expected = BlockHessian(F.cross_entropy(model(x), y), blocks, workers=1).matvec_many(
            list(range(len(blocks))), vectors
        )
    got = FiniteDifferenceHessian(model, flash, blocks).matvec_many(
        list(range(len(blocks))), vectors
    )
    scale = max(float(e.norm()) for e in expected)
    for b, g, e in zip(blocks, got, expected):
        assert _relative(g, e, 1e-3 * scale) < 1e-6, b.name


# 4. What the products leave behind, and randomness.


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.tanh(self.bn(self.conv(x)))).flatten(1))


def _noisy() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = _Noisy().double().train()
    x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    return model, lambda: F.cross_entropy(model(x), y)


def test_state_is_left_as_it_was():
    model, probe = _noisy()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.fc.bias.grad = None
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    blocks = blockopt.partition(model)
    for scheme in ("central", "forward"):
        op = FiniteDifferenceHessian(model, probe, blocks, scheme=scheme)
        vectors = _unit_vectors(blocks, torch.float64)
        for _ in range(5):
            op.matvec_many(list(range(len(blocks))), vectors)
    assert op.products == 5 * len(blocks)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng)


def test_dropout_products_are_deterministic_and_symmetric():
    model, probe = _noisy()
    blocks = blockopt.partition(model)
    op = FiniteDifferenceHessian(model, probe, blocks)
    for i, block in enumerate(blocks):
        v1, v2 = _unit_vectors([block, block], torch.float64, seed=i)
        torch.manual_seed(123 + i)  # the caller's RNG state does not matter
        first = op.matvec(i, v1)
        assert torch.equal(op.matvec(i, v1), first)
        left, right = float(v2 @ first), float(v1 @ op.matvec(i, v2))
        assert abs(left - right) <= 1e-7 * max(1.0, abs(left)), block.name


def test_probe_errors_and_statuses():
    model, probe = _noisy()
    blocks = blockopt.partition(model)
    with pytest.raises(ValueError, match="scheme"):
        FiniteDifferenceHessian(model, probe, blocks, scheme="backward")
    for bad in (0.0, -1e-3, math.inf, math.nan):
        with pytest.raises(ValueError, match="eps"):
            FiniteDifferenceHessian(model, probe, blocks, eps=bad)
    with pytest.raises(TypeError, match="eps"):
        FiniteDifferenceHessian(model, probe, blocks, eps="1e-3")
    with pytest.raises(ValueError, match="scalar"):
        FiniteDifferenceHessian(model, lambda: model(torch.ones(2, 1, 6, 6).double()), blocks)

    def calls_backward() -> torch.Tensor:
        loss = probe()
        loss.backward(retain_graph=True)
        return loss

    with pytest.raises(RuntimeError, match="backward"):
        FiniteDifferenceHessian(model, calls_backward, blocks)
    assert all(p.grad is None for p in model.parameters())
    spare = nn.Linear(2, 2).double()
    mixed = [*blocks, Block("spare", (BlockPart("spare.weight", spare.weight),))]
    op = FiniteDifferenceHessian(model, probe, mixed)
    assert op.status(len(blocks)) == "unused" and op.status(0) == "ok"
    assert not torch.any(op.matvec(len(blocks), torch.ones(4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="does not depend"):
        FiniteDifferenceHessian(model, probe, mixed[-1:])
    with pytest.raises(ValueError, match="coordinates"):
        op.matvec(0, torch.ones(3, dtype=torch.float64))


# 5. Quadratics: a zero third derivative leaves round-off alone.


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 12),
    cut=st.integers(1, 11),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-2, 1e2),
)
def test_quadratic_products_are_exact_to_round_off(n, cut, seed, scale):
    cut = min(cut, n - 1)
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = scale * (m + m.T) / 2
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
    holder = nn.Module()
    holder.x = x
    blocks = [
        Block("head", (BlockPart("x", x, 0, 0, cut),)),
        Block("tail", (BlockPart("x", x, 0, cut, n),)),
    ]
    op = FiniteDifferenceHessian(holder, lambda: 0.5 * x @ a @ x + b @ x, blocks)
    for i, (lo, hi) in enumerate(((0, cut), (cut, n))):
        v = torch.randn(hi - lo, generator=gen, dtype=torch.float64)
        expected = a[lo:hi, lo:hi] @ v
        # A quadratic's third derivative is zero: what is left is the gradients' round-off,
        # eps |g| / h with h ~ cbrt(eps) (module doc), which dominates where the linear term's
        # gradient dwarfs the curvature (a small scale): bounded by both, not by one.
        eps = torch.finfo(torch.float64).eps
        with torch.no_grad():
            gradient = float((a @ x).norm() + b.norm())
        error = float((op.matvec(i, v) - expected).norm())
        floor = 1e-6 * float(torch.linalg.matrix_norm(a, 2)) * float(v.norm())
        assert error <= 1e-8 * max(float(expected.norm()), floor) + 10 * eps ** (
            2 / 3
        ) * gradient * float(v.norm())
