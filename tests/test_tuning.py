"""SGD's stability limit and the optimizer's cap on grossly unstable learning rates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockopt
from blockopt.models import MLP
from blockopt.tuning import CAP_FRACTION, UNSTABLE_FACTOR, sgd_lr_cap, sgd_stability_limit


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
    # wants Adam; keep the SGD family to look at the cap alone.
    opt = blockopt.BlockOptimizer(
        model, model, thresholds=blockopt.Thresholds(sgd_below=10.0, adam_above=10.0)
    )
    loss = _run(opt, model, 400)
    assert opt.mode == "sgd"
    # lr * rho_max = 0.1 * 5000 = 500 > 10 * 3.8: capped to half the limit, 1.9 / 5000.
    assert opt.mode_lrs["sgd"] == pytest.approx(1.9 / 5000.0, rel=1e-6)
    assert opt.param_groups[0]["lr"] == 0.1  # the user's learning rate is untouched
    assert "sgd learning rate times 0.0038" in opt.history[0].reason
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
    opt = blockopt.BlockOptimizer(model, model, thresholds=blockopt.Thresholds(1.0, 2.0))
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
            model, model, thresholds=blockopt.Thresholds(10.0, 10.0), **kwargs
        )
        opt.zero_grad()
        model().backward()
        opt.step()
        assert opt.mode_lrs[opt.mode] == 0.1
        assert "learning rate times" not in opt.history[0].reason
    torch.manual_seed(0)
    net = MLP((6, 16, 4))
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    opt = blockopt.BlockOptimizer(net, lambda: F.cross_entropy(net(x), y), probe_every=5)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert opt.mode_lrs["sgd"] == 0.1 and len(opt.history) == 4
