"""SGD's stability limit and the optimizer's cap on grossly unstable learning rates."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockopt
from blockopt.analysis.heterogeneity import default_floor
from blockopt.analysis.tuning import (
    CAP_FRACTION,
    UNSTABLE_FACTOR,
    held_factors,
    sgd_lr_cap,
    sgd_stability_limit,
)
from blockopt.workloads.models import MLP


def _converges(lr: float, momentum: float, dampening: float, nesterov: bool) -> bool:
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    for _ in range(4000):
        opt.zero_grad()
        (0.5 * x * x).sum().backward()  # curvature 1
        opt.step()
    return abs(x.item()) < 1e-3


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "limit"),
    [
        (0.0, 0.0, False, 2.0),
        (0.9, 0.0, False, 3.8),
        (0.5, 0.0, False, 3.0),
        (0.9, 0.5, False, 7.6),
        (0.9, 0.0, True, 1.9 / 1.4),
        (0.5, 0.0, True, 1.5),
    ],
)
def test_stability_limit_is_where_torch_sgd_stops_converging(momentum, dampening, nesterov, limit):
    assert sgd_stability_limit(momentum, dampening, nesterov) == pytest.approx(limit, rel=1e-12)
    assert _converges(0.98 * limit, momentum, dampening, nesterov)
    assert not _converges(1.02 * limit, momentum, dampening, nesterov)


def test_stability_limit_edge_cases():
    assert sgd_stability_limit(0.9, 1.0) == math.inf
    with pytest.raises(ValueError, match="momentum"):
        sgd_stability_limit(1.0)


def test_lr_cap_only_for_gross_excess():
    assert (UNSTABLE_FACTOR, CAP_FRACTION) == (10.0, 0.5)
    limit = 3.8
    assert sgd_lr_cap(0.1, 10 * limit / 0.1, limit) == 1.0  # exactly 10x: left alone
    assert sgd_lr_cap(0.1, 100.0, limit) == 1.0  # 2.6x the limit: networks often start there
    assert sgd_lr_cap(0.1, 5000.0, limit) == pytest.approx(0.5 * 3.8 / 500.0, rel=1e-12)
    assert sgd_lr_cap(0.1, 5000.0, limit, unstable_factor=1000.0) == 1.0
    for rho in (0.0, math.inf, math.nan):
        assert sgd_lr_cap(0.1, rho, limit) == 1.0


class Stiff(nn.Module):
    """``1/2 sum_b c_b |w_b - 1|^2`` over two blocks of curvature 1 and 5000."""

    def __init__(self) -> None:
        super().__init__()
        self.soft = nn.Parameter(torch.zeros(4, dtype=torch.float64))
        self.stiff = nn.Parameter(torch.zeros(4, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 0.5 * ((self.soft - 1) ** 2).sum() + 2500.0 * ((self.stiff - 1) ** 2).sum()


def _run(opt, model, steps):
    for _ in range(steps):
        opt.zero_grad()
        model().backward()
        opt.step()
    return float(model().detach())


def test_default_lr_on_a_stiff_problem_is_capped_instead_of_diverging():
    model = Stiff()
    # Both blocks have curvature 1 or 5000: spread log10(5000) = 3.7 decades, so the policy
    # wants Adam; keep plain SGD to look at the cap alone.
    opt = blockopt.BlockOptimizer(
        model,
        model,
        thresholds=blockopt.Thresholds(sgd_below=10.0, adam_above=10.0, block_ratio=10.0),
    )
    loss = _run(opt, model, 400)
    assert opt.mode == "sgd"
    # lr * rho_max = 0.1 * 5000 = 500 > 10 * 3.8: capped to half the limit, 1.9 / 5000.
    assert opt.mode_lrs["sgd"] == pytest.approx(1.9 / 5000.0, rel=1e-6)
    assert opt.param_groups[0]["lr"] == 0.1  # the user's learning rate is untouched
    assert "sgd learning rate times 0.0038" in opt.history[0].text
    # The stiff block has converged; the soft one (curvature 1) moves at 1.9 / 5000 per step.
    assert torch.allclose(model.stiff.detach(), torch.ones(4, dtype=torch.float64), atol=1e-9)
    # Heavy ball's slow root is 1 - lr * 1 / (1 - 0.9) = 0.9962: 0.5 * 4 * 0.9962 ** 800 = 0.096.
    assert loss == pytest.approx(0.5 * 4 * (1 - 1.9 / 5000 / 0.1) ** 800, rel=0.1)
    # Plain SGD at that learning rate diverges.
    model = Stiff()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert not math.isfinite(_run(plain, model, 400))


def test_cap_comes_before_a_switch_so_adam_matches_the_capped_step():
    model = Stiff()
    # spread 3.7 > adam_above + margin: Adam at step 0
    # (no learning-rate search: this checks the step-norm match that the search starts from)
    opt = blockopt.BlockOptimizer(
        model, model, thresholds=blockopt.Thresholds(1.0, 2.0), lr_search=False
    )
    opt.zero_grad()
    model().backward()
    g = torch.cat([model.soft.grad, model.stiff.grad])
    opt.step()
    assert opt.mode == "adam"
    capped = 1.9 / 5000.0
    # Adam's first step is a sign step of norm lr * sqrt(n); SGD's would have been capped * |g|.
    assert opt.mode_lrs["adam"] == pytest.approx(capped * g.norm().item() / math.sqrt(8), rel=1e-6)


def test_no_cap_when_pinned_monitoring_fixed_or_stable():
    for kwargs in ({"pin_mode": "block_sgd"}, {"monitor_only": True}, {"lrs": {"sgd": 0.1}}):
        model = Stiff()
        opt = blockopt.BlockOptimizer(
            model, model, thresholds=blockopt.Thresholds(10.0, 10.0, block_ratio=10.0), **kwargs
        )
        opt.zero_grad()
        model().backward()
        opt.step()
        assert opt.mode_lrs[opt.mode] == 0.1
        assert "learning rate times" not in opt.history[0].text
    torch.manual_seed(0)
    net = MLP((6, 16, 4))
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    opt = blockopt.BlockOptimizer(net, lambda: F.cross_entropy(net(x), y), probe_every=5)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert opt.mode_lrs["sgd"] == 0.1 and len(opt.history) == 4


# -- param_groups: tuned per-block learning rates in any torch.optim optimizer ---------------


class BlockQuadratic(nn.Module):
    """``sum_b 1/2 (w_b - t_b)^T H_b (w_b - t_b)`` over 3 tensors of 8 coordinates; block ``b``'s
    eigenvalues are spread evenly over ``[c_b, 3 c_b]`` in a random basis, ``c = 1, 10, 100``."""

    def __init__(self, curvatures: tuple[float, ...] = (1.0, 10.0, 100.0), n: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        hessians, targets = [], []
        for c in curvatures:
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            hessians.append(q @ torch.diag(c * torch.linspace(1, 3, n, dtype=torch.float64)) @ q.T)
            targets.append(torch.randn(n, generator=g, dtype=torch.float64))
        self.register_buffer("hessians", torch.stack(hessians))
        self.register_buffer("targets", torch.stack(targets))
        self.soft = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.mid = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.stiff = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        e = torch.stack([self.soft, self.mid, self.stiff]) - self.targets
        return 0.5 * torch.einsum("bi,bij,bj->", e, self.hessians, e)


def _gd_steps(model: nn.Module, opt: torch.optim.Optimizer, cap: int, gap: float = 1e-6) -> float:
    """Steps of ``opt`` until the loss is below ``gap`` times its start (the minimum is 0);
    ``inf`` when that takes more than ``cap`` steps or the loss diverges."""
    start = model().item()
    for k in range(cap + 1):
        opt.zero_grad()
        loss = model()
        if not loss.item() <= 1e6 * start:  # diverged (or NaN)
            return math.inf
        if loss.item() <= gap * start:
            return k
        loss.backward()
        opt.step()
    return math.inf


def _gd_steps_exact(model: BlockQuadratic, lrs: tuple[float, float, float], gap: float = 1e-6):
    """Reference for :func:`_gd_steps` from the eigendecomposition of the known block Hessians:
    from the start at 0, GD multiplies the error along eigenvector ``i`` of block ``b`` by
    ``1 - lr_b lambda_bi`` per step, so the loss after ``k`` steps is
    ``1/2 sum lambda_bi (1 - lr_b lambda_bi)^(2k) z_bi^2``."""
    lam, vec = np.linalg.eigh(model.hessians.numpy())
    z = np.einsum("bji,bj->bi", vec, -model.targets.numpy())
    factor = 1.0 - np.asarray(lrs)[:, None] * lam
    start = 0.5 * (lam * z**2).sum()
    k = 0
    while 0.5 * (lam * factor ** (2 * k) * z**2).sum() > gap * start:
        k += 1
    return k


def test_kept_block_lrs_make_gd_converge_far_faster_than_the_best_single_lr():
    model = BlockQuadratic()
    spectra = blockopt.block_spectra(model, model, steps=8)  # 8 = numel: exact extremes
    rho_max = max(s.lambda_max for s in spectra.values())
    assert rho_max == pytest.approx(300.0, rel=1e-9)
    lrs = blockopt.tune_block_lrs(spectra, 1.0 / rho_max)  # base: what suits the stiffest block
    assert lrs == pytest.approx({"soft": 1 / 3, "mid": 1 / 30, "stiff": 1 / 300}, rel=1e-9)
    tuned = _gd_steps(model, torch.optim.SGD(blockopt.param_groups(model, lrs), lr=1.0), 10_000)
    # every block at lr = 1 / lambda_max(block): error factors within [0, 2/3] per step
    assert tuned == _gd_steps_exact(BlockQuadratic(), (1 / 3, 1 / 30, 1 / 300)) <= 15
    # A single learning rate: a quarter-decade grid up to the stability limit 2 / 300, and
    # points just below the limit, where GD is fastest on a problem of condition number 300.
    grid = [10.0**e for e in np.arange(-5.0, 0.01, 0.25)]
    grid += [f * 2.0 / rho_max for f in (0.5, 0.8, 0.9, 0.95, 0.99)]
    single = {}
    for lr in grid:
        model = BlockQuadratic()
        single[lr] = _gd_steps(model, torch.optim.SGD(model.parameters(), lr=lr), 10 * tuned)
    # no single learning rate gets there within 10 times the steps
    assert min(single.values()) > 10 * tuned
    # the fastest, just below the limit, needs about 45 times the steps
    model = BlockQuadratic()
    fastest = _gd_steps(model, torch.optim.SGD(model.parameters(), lr=0.99 * 2 / rho_max), 1000)
    assert fastest == _gd_steps_exact(model, (0.99 * 2 / 300,) * 3)
    assert 500 < fastest < 600


def test_held_factors_lower_but_never_raise():
    previous = {"a": 10.0, "b": 1.0, "c": 100.0}
    new = {"a": 100.0, "b": 0.5, "c": 100.0, "d": 7.0}
    assert held_factors(new, previous) == {"a": 10.0, "b": 0.5, "c": 100.0, "d": 7.0}
    assert held_factors(new, {}) == new


def _spike(opt: blockopt.BlockOptimizer) -> None:
    """Report ten steady losses, then one six times their level: a loss spike."""
    for value in [1.0] * 10 + [6.0]:
        opt.observe_loss(value)


def test_a_probe_after_a_loss_spike_lowers_block_factors_but_does_not_raise_them():
    model = BlockQuadratic()  # curvature scales (rho) 3, 30, 300
    # tol=None: the factors below are exact, which takes every block's full run (steps >= size)
    opt = blockopt.BlockOptimizer(model, model, lr=1e-3, pin_mode="block_sgd", steps=8, tol=None)
    opt.probe_now()

    def factors() -> list[float]:
        assert opt.active_optimizer.factors == opt.block_factors
        return [opt.block_factors[name] for name in ("soft", "mid", "stiff")]

    assert factors() == pytest.approx([100.0, 10.0, 1.0], rel=1e-6)
    with torch.no_grad():
        model.hessians[2] *= 10.0  # the stiff block stiffens: mid's factor would rise to 100
    _spike(opt)
    assert opt.schedule.spiked
    decision = opt.probe_now()
    assert factors() == pytest.approx([100.0, 10.0, 1.0], rel=1e-6)
    assert "a loss spike since the last probe: 1 block factor(s) not raised" in decision.text
    assert not opt.schedule.spiked
    decision = opt.probe_now()  # no spike since the last probe: the rise goes through
    assert factors() == pytest.approx([100.0, 100.0, 1.0], rel=1e-6)
    assert "loss spike" not in decision.text
    with torch.no_grad():
        model.hessians[2] /= 100.0  # rho 3, 30, 30: the factors fall, spike or not
    _spike(opt)
    decision = opt.probe_now()
    assert factors() == pytest.approx([10.0, 1.0, 1.0], rel=1e-6)
    assert "loss spike" not in decision.text


def _quadratic_lrs() -> tuple[BlockQuadratic, dict[str, float]]:
    model = BlockQuadratic()
    return model, blockopt.tune_block_lrs(blockopt.block_spectra(model, model, steps=8), 0.003)


def test_param_groups_hold_each_tensor_once_at_its_blocks_lr():
    model, lrs = _quadratic_lrs()
    groups = blockopt.param_groups(model, lrs)
    assert [g["tensors"] for g in groups] == [["soft"], ["mid"], ["stiff"]]
    assert [g["blocks"] for g in groups] == [["soft"], ["mid"], ["stiff"]]
    assert [g["lr"] for g in groups] == [lrs["soft"], lrs["mid"], lrs["stiff"]]
    assert [g["params"] for g in groups] == [[model.soft], [model.mid], [model.stiff]]
    # blocks sharing a learning rate share a group, in the order of named_parameters()
    same = blockopt.param_groups(model, {"stiff": 0.1, "mid": 0.2, "soft": 0.1})
    assert [(g["lr"], g["tensors"]) for g in same] == [(0.1, ["soft", "stiff"]), (0.2, ["mid"])]


def test_param_groups_survive_a_json_round_trip_of_tuned_lrs():
    model, lrs = _quadratic_lrs()
    loaded = json.loads(json.dumps(lrs))
    assert blockopt.param_groups(model, loaded) == blockopt.param_groups(model, lrs)


def _gpt_lrs(model: nn.Module, strategy: str = "tensor") -> dict[str, float]:
    """Distinct learning rates 1e-3, 2e-3, ... in block order."""
    return {b.name: 1e-3 * (i + 1) for i, b in enumerate(blockopt.partition(model, strategy))}


def test_slices_of_a_fused_tensor_share_their_smallest_lr_with_a_warning():
    from blockopt.workloads.models import TinyGPT

    model = TinyGPT(n_layers=1, d_model=16, n_heads=2)
    lrs = _gpt_lrs(model)
    with pytest.warns(UserWarning, match="param group holds whole tensors") as caught:
        groups = blockopt.param_groups(model, lrs)
    text = str(caught[0].message)
    assert "2 tensor(s)" in text  # the qkv weight and bias, each split into q, k, v
    assert "blocks.0.attn.qkv.weight trains at 0.005 (block blocks.0.attn.qkv.weight.q)" in text
    assert "block blocks.0.attn.qkv.weight.v was tuned to 0.007 (1.4x)" in text
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(lr_of) == len(params) == sum(len(g["params"]) for g in groups)
    for name, p in params.items():
        if ".qkv." in name:
            assert lr_of[id(p)] == min(lrs[f"{name}.{s}"] for s in "qkv")
        else:
            assert lr_of[id(p)] == lrs[name]
    qkv = next(g for g in groups if "blocks.0.attn.qkv.weight" in g["tensors"])
    assert qkv["blocks"] == [f"blocks.0.attn.qkv.weight.{s}" for s in "qkv"]
    # per-head blocks: found without naming the strategy, the weight at its smallest head's lr
    heads = _gpt_lrs(model, "head")
    with pytest.warns(UserWarning, match="blocks.0.attn.qkv.weight trains at"):
        groups = blockopt.param_groups(model, heads)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(params["blocks.0.attn.qkv.weight"])] == heads["blocks.0.attn.qkv.weight.q.h0"]
    # equal slices lose nothing: no warning
    same = {k: 0.01 if ".qkv." in k else v for k, v in lrs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = blockopt.param_groups(model, same)
    assert sum(g["lr"] == 0.01 for g in groups) == 1


def test_param_groups_find_the_strategy_or_take_the_one_given():
    from blockopt.workloads.models import TinyGPT

    model = TinyGPT(n_layers=1, d_model=16, n_heads=2)
    for strategy in ("module", "model"):
        lrs = _gpt_lrs(model, strategy)
        groups = blockopt.param_groups(model, lrs)
        assert sorted(b for g in groups for b in g["blocks"]) == sorted(lrs)
        assert blockopt.param_groups(model, lrs, strategy=strategy) == groups
    lrs = {"w": 0.1, "b": 0.2}
    groups = blockopt.param_groups(model, lrs, strategy=lambda n, p: "w" if p.dim() > 1 else "b")
    assert {g["lr"]: len(g["params"]) for g in groups} == {0.1: 7, 0.2: 10}
    with pytest.raises(ValueError, match="they are the blocks of strategy='module'"):
        blockopt.param_groups(model, _gpt_lrs(model, "module"), strategy="tensor")


def test_param_groups_name_missing_and_unknown_blocks_and_the_fix():
    model, lrs = _quadratic_lrs()
    partial = {"soft": 0.5}
    with pytest.raises(
        ValueError, match=r"no learning rate for 2 block\(s\).*mid, stiff.*default_lr"
    ):
        blockopt.param_groups(model, partial)
    groups = blockopt.param_groups(model, partial, default_lr=0.001)
    assert [(g["lr"], g["tensors"]) for g in groups] == [(0.5, ["soft"]), (0.001, ["mid", "stiff"])]
    with pytest.raises(ValueError, match=r"closest, 'tensor', lacks 1: sotf.*tuned on"):
        blockopt.param_groups(model, {**lrs, "sotf": 0.1})
    with pytest.raises(ValueError, match=r"does not have under strategy='tensor': sotf"):
        blockopt.param_groups(model, {**lrs, "sotf": 0.1}, strategy="tensor")
    # parameters a custom strategy leaves out need default_lr too
    only_soft = lambda n, p: "s" if n == "soft" else None  # noqa: E731
    with pytest.raises(ValueError, match=r"2 parameter\(s\) the strategy leaves out: mid, stiff"):
        blockopt.param_groups(model, {"s": 0.1}, strategy=only_soft)
    groups = blockopt.param_groups(model, {"s": 0.1}, strategy=only_soft, default_lr=0.2)
    assert [(g["lr"], g["tensors"], g["blocks"]) for g in groups] == [
        (0.1, ["soft"], ["s"]),
        (0.2, ["mid", "stiff"], []),
    ]


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0.0, ValueError), (-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
     (True, TypeError), ("0.1", TypeError), (None, TypeError)],
)  # fmt: skip
def test_param_groups_refuse_bad_learning_rates(bad, error):
    model, lrs = _quadratic_lrs()
    with pytest.raises(error, match=r"lrs\['mid'\] must be a positive finite number"):
        blockopt.param_groups(model, {**lrs, "mid": bad})
    if bad is not None:  # default_lr=None means no default
        with pytest.raises(error, match="default_lr must be a positive finite number"):
            blockopt.param_groups(model, lrs, default_lr=bad)


def test_param_groups_refuse_what_is_not_a_mapping_of_names():
    model, lrs = _quadratic_lrs()
    with pytest.raises(TypeError, match="lrs must be a mapping block name -> learning rate"):
        blockopt.param_groups(model, list(lrs.values()))
    with pytest.raises(TypeError, match="lrs keys must be block names"):
        blockopt.param_groups(model, {0: 0.1})
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        blockopt.param_groups(lrs, lrs)


def test_param_groups_leave_frozen_parameters_out():
    from blockopt.workloads.models import TinyGPT

    model = TinyGPT(n_layers=1, d_model=16, n_heads=2)
    lrs = {k: 0.01 for k in _gpt_lrs(model)}  # tuned before freezing
    model.tok.requires_grad_(False)
    model.blocks[0].attn.qkv.requires_grad_(False)
    groups = blockopt.param_groups(model, lrs)
    held = {n for g in groups for n in g["tensors"]}
    assert held == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "tok.weight" not in held and "blocks.0.attn.qkv.weight" not in held
    module_lrs = {k: 0.01 for k in _gpt_lrs(TinyGPT(n_layers=1, d_model=16, n_heads=2), "module")}
    assert blockopt.param_groups(model, module_lrs)[0]["lr"] == 0.01  # "tok" is skipped
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        blockopt.param_groups(model, lrs)


def test_param_groups_work_with_adam_a_scheduler_and_a_checkpoint():
    model, lrs = _quadratic_lrs()
    opt = torch.optim.Adam(blockopt.param_groups(model, lrs), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        model().backward()
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lrs[n] / 4 for n in lrs])
    assert [g["initial_lr"] for g in opt.param_groups] == [lrs[n] for n in lrs]
    state = opt.state_dict()
    assert [g["blocks"] for g in state["param_groups"]] == [["soft"], ["mid"], ["stiff"]]
    again = torch.optim.Adam(blockopt.param_groups(model, lrs), lr=1.0)
    again.load_state_dict(state)
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]
    assert torch.equal(again.state[model.stiff]["exp_avg"], opt.state[model.stiff]["exp_avg"])
    # blockopt's wrapper takes the groups too
    wrapped = blockopt.wrap(torch.optim.SGD(blockopt.param_groups(model, lrs)), model)
    assert [g["lr"] for g in wrapped.param_groups] == [lrs[n] for n in lrs]


# -- factors of the blocks the heterogeneity score leaves out ---------------------------------


def _block(name, scale, numel=10, roundoff=1e-16, status="ok"):
    """A hand-built spectrum of curvature scale ``scale`` whose products' round-off is
    ``roundoff`` (``None``: not measured)."""
    return blockopt.BlockSpectrum(
        name, numel, (scale,), (1.0,), scale, scale, numel * scale, 5, 1, status, roundoff
    )


def _spectra(blocks):
    return blockopt.Spectra(blocks, steps=5, probes=1, seed=0)


def test_excluded_blocks_get_factors_that_never_starve_them():
    from blockopt.analysis.tuning import block_lr_factors

    spectra = _spectra(
        [
            _block("stiff", 100.0, numel=50),  # factor 1
            _block("mid", 10.0, numel=60),  # factor 10: the weighted median (50 + 60 >= 150 / 2)
            _block("soft", 1.0, numel=40),  # factor 100
            _block("zero", 3e-20, roundoff=1e-20),  # within 1000x its round-off: negligible
            _block("exact_zero", 0.0, roundoff=None),  # products exactly zero: negligible
            _block("cut", 0.0, status="no_graph"),
            _block("unused", 0.0, status="unused"),
            _block("nan", math.nan),
        ]
    )
    h = blockopt.heterogeneity(spectra)
    assert h.blocks == ("stiff", "mid", "soft") and h.negligible == ("zero", "exact_zero")
    for max_factor in (100.0, 1000.0):
        factors = block_lr_factors(spectra, max_factor=max_factor)
        assert factors == {
            "stiff": 1.0,
            "mid": 10.0,
            "soft": 100.0,
            "zero": max_factor,  # flatter than anything measurable
            "exact_zero": max_factor,
            "cut": 10.0,  # unknown curvature: the middle of what was measured
            "unused": 10.0,
            "nan": 10.0,
        }
    # with nothing measured there is nothing to scale against
    nothing = _spectra(
        [_block("zero", 3e-20, roundoff=1e-20), _block("cut", 0.0, status="no_graph")]
    )
    assert block_lr_factors(nothing) == {"zero": 1.0, "cut": 1.0}
    assert blockopt.tune_block_lrs(spectra, 0.01)["zero"] == pytest.approx(1.0)


def test_an_excluded_slice_takes_the_smallest_factor_of_its_measured_siblings():
    from blockopt.analysis.tuning import block_lr_factors

    spectra = _spectra(
        [
            _block("top", 100.0),
            _block("attn.qkv.bias.q", 2.0),  # factor 50
            _block("attn.qkv.bias.k", 1e-19, roundoff=1e-19),  # negligible: takes 25, not 100
            _block("attn.qkv.bias.v", 4.0),  # factor 25
            _block("attn.qkv.weight.q.h0", 10.0),  # factor 10
            _block("attn.qkv.weight.q.h1", 5.0),  # factor 20
            _block("attn.qkv.weight.k.h0", 0.0, status="no_graph"),  # unknown: takes 10
            _block("attn.qkv.weight.v", 1e-20, roundoff=1e-20),  # negligible: takes 10
            _block("other.k", 1e-20, roundoff=1e-20),  # no measured sibling: max_factor
        ]
    )
    factors = block_lr_factors(spectra)
    assert factors["attn.qkv.bias.k"] == factors["attn.qkv.bias.v"] == 25.0
    assert factors["attn.qkv.weight.k.h0"] == factors["attn.qkv.weight.v"] == 10.0
    assert factors["other.k"] == 100.0


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (4, 16))
    return model, ids


def _bias_hessian_float64(model: nn.Module, ids: torch.Tensor, name: str) -> torch.Tensor:
    """The exact Hessian of the loss over the parameter ``name`` alone, in float64: one
    product per coordinate, through the math attention kernel (it has a second derivative)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = copy.deepcopy(model).double()
    p = dict(model.named_parameters())[name]
    with sdpa_kernel(SDPBackend.MATH):
        (g,) = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, p, create_graph=True)
        rows = [torch.autograd.grad(gi, p, retain_graph=True)[0] for gi in g]
    return torch.stack(rows)


def test_gpt2s_fused_attention_bias_trains_at_the_rate_of_its_slices_with_curvature():
    """transformers' GPT-2 (tiny config, float32): the K third of each ``c_attn.bias`` is exactly
    zero curvature (softmax ignores a shift common to all keys; dense float64 reference), so
    it is negligible, and ``param_groups`` trains the fused bias at its Q and V slices' rate,
    with no warning that names the K slice as what set it."""
    model, ids = _tiny_gpt2()
    dense = _bias_hessian_float64(model, ids, "transformer.h.0.attn.c_attn.bias")
    q, k, v = (dense[i * 16 : (i + 1) * 16, i * 16 : (i + 1) * 16] for i in range(3))
    scale = {s: float(torch.linalg.matrix_norm(m, 2)) for s, m in zip("qkv", (q, k, v))}
    assert scale["k"] <= 1e-12 * min(scale["q"], scale["v"])
    assert min(scale["q"], scale["v"]) > 1e-8

    probe = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    spectra = blockopt.block_spectra(model, probe, steps=10)
    h = blockopt.heterogeneity(spectra)
    bias = [f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)]
    assert h.negligible == tuple(f"{b}.k" for b in bias)
    top = max(h.scales)
    measured = dict(zip(h.blocks, h.scales))
    assert measured[f"{bias[0]}.q"] == pytest.approx(scale["q"], rel=0.05)
    assert measured[f"{bias[0]}.v"] == pytest.approx(scale["v"], rel=0.05)
    for b in bias:  # real, far above its own round-off, and below float32's 10 eps of the top
        assert measured[f"{b}.q"] > 1e5 * spectra[f"{b}.q"].roundoff
        assert measured[f"{b}.q"] < default_floor("float32") * top
    params = dict(model.named_parameters())
    for max_factor in (100.0, 1e6):  # Q and V clipped alike, and each at its own factor
        lrs = blockopt.tune_block_lrs(spectra, 1e-3, max_factor=max_factor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups = blockopt.param_groups(model, lrs)
        text = " ".join(str(w.message) for w in caught)
        lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
        for b in bias:
            rates = [1e-3 * min(top / measured[f"{b}.{s}"], max_factor) for s in "qv"]
            assert lrs[f"{b}.k"] == pytest.approx(min(rates), rel=1e-12)
            assert lr_of[id(params[b])] == pytest.approx(min(rates), rel=1e-12)
            assert f"(block {b}.k)" not in text and f"{b}.k was tuned" not in text
            if max_factor == 100.0:
                assert lrs[f"{b}.q"] == lrs[f"{b}.v"] == 0.1 and f"{b} trains" not in text
