"""Watch a model's blockwise curvature in TensorBoard while training stays exactly as it was.

A BatchNorm CNN on scikit-learn's 8x8 digits, trained with ``torch.optim.SGD`` wrapped in
``blockopt.wrap(..., monitor_only=True, logdir=...)``: blockopt probes and logs the heterogeneity
score, every block's extreme eigenvalues, trace and spectral density, but never switches, so the
updates are bitwise those of the plain SGD.

Run: python examples/monitor_with_tensorboard.py [logdir]   (default ./runs/monitor)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import blockopt
from blockopt.workloads.data import digits
from blockopt.workloads.models import SmallCNN

STEPS = 200


def main(logdir: str = "runs/monitor") -> blockopt.BlockOptimizer:
    """Train ``STEPS`` steps, probing every 50, logging to ``logdir``; print what it saw."""
    torch.manual_seed(0)
    data = digits()
    model = SmallCNN()
    probe_x, probe_y = data.x_train[:256], data.y_train[:256]

    def probe() -> torch.Tensor:
        return F.cross_entropy(model(probe_x), probe_y)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = blockopt.wrap(opt, model, probe=probe, monitor_only=True, probe_every=50, logdir=logdir)
    batches = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        i = torch.randint(0, len(data.y_train), (64,), generator=batches)
        opt.zero_grad()
        loss = F.cross_entropy(model(data.x_train[i]), data.y_train[i])
        loss.backward()
        opt.step()

    model.eval()
    with torch.no_grad():
        train_loss = F.cross_entropy(model(data.x_train), data.y_train).item()
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    for d in opt.history:
        print(f"step {d.step:4d}  heterogeneity score {d.score:.2f} decades  mode {d.new_mode}")
    h = opt.last_score  # the heterogeneity of the last probe
    (top, stiff), (low, flat) = max(zip(h.scales, h.blocks)), min(zip(h.scales, h.blocks))
    print(f"last probe: stiffest block {stiff} ({top:.3g}), flattest {flat} ({low:.3g})")
    print(f"final training loss {train_loss:.4f}, test accuracy {accuracy:.3f}")
    opt.close({"final/train_loss": train_loss, "final/test_accuracy": accuracy})
    print(f"logged to {logdir}; view it with: tensorboard --logdir {logdir}")
    return opt


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/monitor")
