"""Add blockopt to an existing training loop by wrapping its optimizer: one line changes.

A tiny GPT on the text of Python's own documentation, trained with ``torch.optim.SGD``. The
wrapped optimizer probes the blockwise Hessian at step 0 and then every so often; a Transformer's
blocks differ in curvature by decades, so it leaves SGD for Adam, carrying the momentum over.

Run: python examples/wrap_existing_optimizer.py [steps]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import blockopt
from blockopt.workloads.data import text_batches, text_corpus
from blockopt.workloads.models import TinyGPT


def main(steps: int = 150) -> blockopt.BlockOptimizer:
    """Train for ``steps`` steps with a wrapped SGD; print the mode decisions and the losses."""
    torch.manual_seed(0)
    model = TinyGPT()
    corpus = text_corpus(vocab_size=64)
    data = torch.Generator().manual_seed(0)
    probe_x, probe_y = text_batches(corpus, 16, model.context, generator=data)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def probe() -> torch.Tensor:  # the loss on one fixed batch; blockopt differentiates it
        return loss_fn(probe_x, probe_y)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = blockopt.wrap(opt, model, probe=probe)  # the one changed line

    with torch.no_grad():
        start = probe().item()
    for _ in range(steps):
        x, y = text_batches(corpus, 16, model.context, generator=data)
        opt.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        opt.observe_loss(loss)  # optional: lets a loss spike bring the next probe forward
        opt.step()

    for d in opt.history:
        print(
            f"step {d.step:4d}  score {d.score:.2f} decades  {d.old_mode} -> {d.new_mode}"
            f"  ({d.reason})"
        )
    with torch.no_grad():
        final = probe().item()
    print(f"mode after {steps} steps: {opt.mode}")
    print(f"loss on the probe batch: {start:.4f} at step 0, {final:.4f} after {steps} steps")
    return opt


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
