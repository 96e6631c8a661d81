"""Per-block Hessian-vector products against dense float64 Hessians."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CASES
from reference import NoDoubleBackward, block_index, dense_block, dense_hessian

import blockopt
from blockopt.curvature.hvp import BlockHessian, DoubleBackwardError
from blockopt.curvature.isolation import isolated


@pytest.mark.parametrize("strategy", ["tensor", "head", "module", "model"])
@pytest.mark.parametrize(
    ("vectorize", "workers"), [(False, 1), (False, 3), (True, 1)], ids=["loop", "threads", "vmap"]
)
def test_block_products_match_dense_diagonal_blocks(case, strategy, vectorize, workers):
    hessian, offsets = dense_hessian(case.model, case.loss_of)
    blocks = blockopt.partition(case.model, strategy)
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(b.numel, generator=gen, dtype=torch.float64) for b in blocks]
    with isolated(case.model):
        op = BlockHessian(case.probe(), blocks, vectorize=vectorize, max_batch=4, workers=workers)
        products = op.matvec_many(list(range(len(blocks))), vectors)
    assert op.products == len(blocks)
    scale = max(1.0, hessian.abs().max().item())
    for block, v, hv in zip(blocks, vectors, products):
        expected = dense_block(hessian, block, offsets) @ v
        assert hv.dtype == torch.float64
        assert torch.allclose(hv, expected, rtol=0, atol=1e-10 * scale), block.name


def test_cross_block_terms_never_enter(case):
    """H_bb v_b differs from the full-Hessian product whenever cross blocks are non-zero."""
    hessian, offsets = dense_hessian(case.model, case.loss_of)
    blocks = blockopt.partition(case.model)
    full = blockopt.partition(case.model, "model")[0]
    with isolated(case.model):
        op = BlockHessian(case.probe(), [*blocks, full])
        v = torch.randn(full.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        full_product = op.matvec(len(blocks), v)
    assert torch.allclose(full_product, hessian @ v, rtol=0, atol=1e-10)
    # The concatenation of diagonal-block products is the block-diagonal part only.
    with isolated(case.model):
        op = BlockHessian(case.probe(), blocks)
        diag = torch.zeros_like(v)
        for i, block in enumerate(blocks):
            idx = block_index(block, offsets)
            diag[idx] = op.matvec(i, v[idx])
    block_diag = torch.zeros_like(hessian)
    for block in blocks:
        idx = block_index(block, offsets)
        block_diag[idx[:, None], idx[None, :]] = hessian[idx][:, idx]
    assert torch.allclose(diag, block_diag @ v, rtol=0, atol=1e-10)


def test_float32_products_agree_with_float64():
    torch.manual_seed(0)
    model64 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model64 = model64.double()
    model32 = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    products = {}
    for label, model in (("64", model64), ("32", model32)):
        blocks = blockopt.partition(model)
        with isolated(model):
            loss = torch.nn.functional.cross_entropy(model(x.to(model[0].weight.dtype)), y)
            op = BlockHessian(loss, blocks)
            products[label] = [
                op.matvec(i, torch.ones(b.numel, dtype=model[0].weight.dtype))
                for i, b in enumerate(blocks)
            ]
    for p32, p64 in zip(products["32"], products["64"]):
        assert p32.dtype == torch.float32
        assert torch.allclose(p32.double(), p64, rtol=1e-4, atol=1e-6)


def test_unused_and_linear_parameters_have_zero_products():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
            self.linear = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
            self.unused = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))

    model = Model()
    blocks = blockopt.partition(model)
    loss = (model.used**3).sum() + 5.0 * model.linear.sum()
    op = BlockHessian(loss, blocks)
    assert torch.equal(
        op.matvec(0, torch.ones(2, dtype=torch.float64)),
        torch.tensor([6.0, 12.0], dtype=torch.float64),
    )
    assert torch.equal(
        op.matvec(1, torch.ones(1, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64)
    )
    assert torch.equal(
        op.matvec(2, torch.ones(4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64)
    )


def test_wrong_vector_shape_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    blocks = blockopt.partition(model)
    op = BlockHessian(model(torch.ones(1, 2)).pow(2).sum(), blocks)
    with pytest.raises(
        ValueError, match=r"block 'weight' has 4 coordinates, got a vector of shape \(3,\)"
    ):
        op.matvec(0, torch.ones(3))


def test_op_without_second_derivative_names_cause_and_fix():
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    model = torch.nn.Linear(3, 1)

    def probe():
        return OnceDifferentiable.apply(model(torch.ones(2, 3))).sum()

    # Autograd gives such an op's gradient no graph at all, so nothing raises: the blocks are
    # flagged and a warning names the likely cause instead of reporting a silent zero.
    with pytest.warns(UserWarning, match="once_differentiable.*backend='fd'"):
        spectra = blockopt.block_spectra(model, probe, steps=2, backend="autograd")
    assert [s.status for s in spectra.values()] == ["no_graph", "no_graph"]
    assert spectra["weight"].lambda_max == 0.0
    # The default backend takes finite differences there: loss 2 (w . 1 + b)^2, so the weight's
    # Hessian is 4 * ones(3, 3) (eigenvalue 12) and the bias's 4.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectra = blockopt.block_spectra(model, probe, steps=3)
    assert spectra.backend == "fd"
    assert spectra["weight"].lambda_max == pytest.approx(12.0, rel=1e-4)
    assert spectra["bias"].lambda_max == pytest.approx(4.0, rel=1e-4)


def test_op_with_unimplemented_double_backward_names_cause_and_fix():
    model = torch.nn.Linear(3, 1)

    def probe():
        return NoDoubleBackward.apply(model(torch.ones(2, 3))).sum()

    with pytest.raises(DoubleBackwardError, match=r"second derivative.*eager"):
        blockopt.block_spectra(model, probe, steps=2, backend="autograd")
    spectra = blockopt.block_spectra(model, probe, steps=3)  # auto: finite differences
    assert spectra.backend == "fd" and spectra["weight"].lambda_max > 0


def test_default_cpu_attention_kernel_has_no_double_backward_but_probes_work():
    """Flash attention on CPU cannot be differentiated twice; probes pin the math kernel."""
    case = CASES["fused_sdpa"]()
    loss = case.probe()
    grads = torch.autograd.grad(loss, list(case.model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(sum(g.sum() for g in grads), list(case.model.parameters()))
    spectra = blockopt.block_spectra(case.model, case.probe, steps=3)
    assert set(spectra) >= {"attn.qkv.weight.q", "attn.qkv.weight.k", "attn.qkv.weight.v"}


def test_concurrent_products_do_not_depend_on_the_number_of_workers():
    """Products run on 2 or 4 worker threads are the same to the bit, and agree with the same
    products run one by one on the caller's thread to round-off; the caller's thread count is
    left as it was, and the workers' kernels run on one intra-op thread each."""
    from blockopt.workloads.data import text_batches, text_corpus
    from blockopt.workloads.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(n_layers=1, d_model=16, n_heads=2, context=8)
    x, y = text_batches(text_corpus(64), 4, 8, generator=torch.Generator().manual_seed(0))

    def probe() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    blocks = blockopt.partition(model)
    gen = torch.Generator().manual_seed(2)
    vectors = [torch.randn(b.numel, generator=gen) for b in blocks]
    threads = torch.get_num_threads()
    results = []
    for workers in (1, 2, 4):
        with isolated(model):
            op = BlockHessian(probe(), blocks, workers=workers)
            assert op.workers == workers
            results.append(op.matvec_many(list(range(len(blocks))), vectors))
    for block, one, two, four in zip(blocks, *results):
        # every worker runs on one intra-op thread, so any number of workers gives the same bits
        assert torch.equal(two, four), block.name
        # the caller's thread may use several intra-op threads, which sum in another order
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6 * float(one.abs().max()))
    spectra = [blockopt.block_spectra(model, probe, steps=6, workers=w) for w in (2, 3)]
    assert spectra[0].to_dict()["blocks"] == spectra[1].to_dict()["blocks"]
    from blockopt.curvature.hvp import worker_pool

    assert torch.get_num_threads() == threads
    assert set(worker_pool(4).map(lambda _: torch.get_num_threads(), range(8))) == {1}


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_workers_must_be_a_positive_integer(workers):
    model = torch.nn.Linear(2, 1)
    blocks = blockopt.partition(model)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        BlockHessian(model(torch.ones(1, 2)).pow(2).sum(), blocks, workers=workers)


def test_flash_attention_in_the_probe_is_probed_by_finite_differences():
    """A probe that asks for the flash kernel itself (as a training loop would) has no double
    backward; the default backend then takes finite differences through that very kernel, and
    agrees with autograd's products through the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 24)
    x = torch.randn(2, 5, 8)

    def attend() -> torch.Tensor:
        q, k, v = proj(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).pow(2).sum()

    def flash() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return attend()

    with pytest.raises(DoubleBackwardError):
        blockopt.block_spectra(proj, flash, steps=4, backend="autograd")
    fd = blockopt.block_spectra(proj, flash, steps=4)
    reference = blockopt.block_spectra(proj, attend, steps=4, backend="autograd")
    assert fd.backend == "fd" and reference.backend == "autograd"
    for name in reference:
        assert fd[name].lambda_max == pytest.approx(reference[name].lambda_max, rel=1e-3)
