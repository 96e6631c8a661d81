"""Probe once, tune one learning rate per block, and keep them in plain PyTorch.

``blockopt.tune_block_lrs`` turns one probe of a tiny GPT's blockwise Hessian into a learning rate
per block; they are saved as JSON (what ``blockopt tune --out`` writes too) and training then runs
with ``torch.optim.SGD(blockopt.param_groups(model, lrs), ...)``: no blockopt at run time.

``base_lr`` is the learning rate of the stiffest block; every other block is raised towards its
own stability limit, by up to 100 times. The fused ``qkv`` weight and bias hold three blocks each
(Q, K, V) but one tensor, so they train at the smallest of their slices' learning rates, and
``param_groups`` warns about it. Printed: the loss of SGD at ``base_lr`` for every parameter, of
SGD with the kept per-block learning rates from the same ``base_lr``, and, for scale, of SGD at
0.1, its best single learning rate on this model (grid 0.003 ... 1). The kept learning rates end
well below SGD at ``base_lr`` (2.456 against 2.661 after 300 steps) and level with SGD at 0.1
(2.456); Adam trains this model further still (docs/BENCHMARKS.md). From ``base_lr`` 0.01 up the
kept rates diverge here: the flattest blocks' curvature grows during training, and a rate fixed
from one probe at initialisation does not follow it.

Run: python examples/tune_and_keep_lrs.py [lrs.json]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import blockopt
from blockopt.workloads.data import Corpus, text_batches, text_corpus
from blockopt.workloads.models import TinyGPT

BASE_LR = 0.003
BEST_SINGLE_LR = 0.1
STEPS = 300
MOMENTUM = 0.9


def fresh_model() -> TinyGPT:
    """The same initialisation for every run."""
    torch.manual_seed(0)
    return TinyGPT()


def train(
    model: TinyGPT,
    opt: torch.optim.Optimizer,
    corpus: Corpus,
    evaluation: tuple[torch.Tensor, torch.Tensor],
) -> float:
    """``STEPS`` steps on random batches (the same sequence for every run); the final loss on
    the ``evaluation`` windows."""
    batches = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = text_batches(corpus, 16, model.context, generator=batches)
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    x, y = evaluation
    with torch.no_grad():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


def main(out: str = "lrs.json") -> dict[str, float]:
    """Tune, save, reload and train; returns the final losses by run."""
    corpus = text_corpus(vocab_size=64)
    fixed = torch.Generator().manual_seed(123)
    probe_x, probe_y = text_batches(corpus, 16, 32, generator=fixed)
    evaluation = text_batches(corpus, 128, 32, generator=fixed)

    # 1. probe once and tune: blockopt is needed here only
    model = fresh_model()
    spectra = blockopt.block_spectra(
        model, lambda: F.cross_entropy(model(probe_x).flatten(0, 1), probe_y.flatten()), steps=10
    )
    lrs = blockopt.tune_block_lrs(spectra, BASE_LR)
    with open(out, "w") as f:
        json.dump(lrs, f, indent=1)
    print(f"heterogeneity {float(blockopt.heterogeneity(spectra)):.2f} decades")
    print(
        f"wrote {len(lrs)} block learning rates to {out}: "
        f"{min(lrs.values()):.3g} ... {max(lrs.values()):.3g} (base {BASE_LR:g})"
    )

    # 2. train with the kept learning rates in plain torch.optim.SGD
    with open(out) as f:
        kept = json.load(f)
    model = fresh_model()
    groups = blockopt.param_groups(model, kept)
    opt = torch.optim.SGD(groups, lr=BASE_LR, momentum=MOMENTUM)
    print(f"{len(groups)} param groups for {len(kept)} blocks")
    losses = {"kept": train(model, opt, corpus, evaluation)}

    # 3. the same SGD with one learning rate
    for lr in (BASE_LR, BEST_SINGLE_LR):
        model = fresh_model()
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
        losses[f"single {lr:g}"] = train(model, opt, corpus, evaluation)

    print(
        f"final loss, SGD with one learning rate {BASE_LR:g}: {losses[f'single {BASE_LR:g}']:.4f}"
    )
    print(
        f"final loss, SGD with kept per-block learning rates (base {BASE_LR:g}): "
        f"{losses['kept']:.4f}"
    )
    print(
        f"final loss, SGD with one learning rate {BEST_SINGLE_LR:g}: "
        f"{losses[f'single {BEST_SINGLE_LR:g}']:.4f}"
    )
    return losses


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lrs.json")
