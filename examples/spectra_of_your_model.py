"""Estimate every block's Hessian spectrum of a small Transformer on real text, and save it.

Run: python examples/spectra_of_your_model.py [out.json]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import blockopt
from blockopt.workloads.data import text_batches, text_corpus
from blockopt.workloads.models import TinyGPT


def main(out: str | None = None) -> blockopt.Spectra:
    torch.manual_seed(0)
    model = TinyGPT()
    corpus = text_corpus(vocab_size=64)
    x, y = text_batches(corpus, 16, model.context, generator=torch.Generator().manual_seed(0))

    def probe() -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    spectra = blockopt.block_spectra(model, probe, steps=20, probes=1, seed=0)
    for name in ("blocks.0.attn.qkv.weight.q", "blocks.0.attn.qkv.weight.v", "head.weight"):
        s = spectra[name]
        print(f"{name:30s} lambda_max={s.lambda_max:.3e} lambda_min={s.lambda_min:.3e}")
    if out:
        with open(out, "w") as f:
            json.dump(spectra.to_dict(), f)
        print(f"wrote {len(spectra)} block spectra to {out}")
    return spectra


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
