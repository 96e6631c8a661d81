"""Shared pieces of the reproduction suite: the reference models on real data, tables, figures.

Every experiment module exposes ``run(fig_dir, *, quick=False) -> Section``; ``reproduce.py``
assembles the sections into docs/REPRODUCTION.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blockopt.workloads import data, models, tasks

MODELS = ("gpt", "vit", "cnn", "mlp")
LABELS = {"gpt": "tiny GPT", "vit": "tiny ViT", "cnn": "BatchNorm CNN", "mlp": "MLP (tanh)"}


@dataclass(frozen=True)
class Section:
    """One part of the reproduction: ``markdown`` holds its body, in this order: "**Paper's
    claim.**", "**Our measurement.**" (tables, figures as ``figures/NAME.png``) and
    "**Agreement.**" paragraphs. ``data`` holds the raw numbers (JSON-serialisable)."""

    key: str
    title: str
    markdown: str
    data: dict[str, Any] = field(default_factory=dict)


def build_model(name: str, seed: int) -> nn.Module:
    """A freshly initialised reference model (torch's global seed set to ``seed`` first)."""
    torch.manual_seed(seed)
    return {
        "gpt": models.TinyGPT,
        "vit": models.TinyViT,
        "cnn": models.SmallCNN,
        "mlp": models.MLP,
    }[name]()


def batch(name: str, seed: int, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch for model ``name``: 16 text windows of 32 characters for the GPT (from
    pydoc_data.topics), 128 digits otherwise, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if name == "gpt":
        return data.text_batches(corpus(), size or 16, 32, generator=gen)
    d = digits()
    idx = torch.randperm(len(d.y_train), generator=gen)[: size or 128]
    return d.x_train[idx], d.y_train[idx]


def loss_fn(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if name == "gpt":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def model_and_probe(name: str, seed: int) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = build_model(name, seed)
    x, y = batch(name, seed)
    return model, lambda: loss_fn(name, model, x, y)


def corpus() -> data.Corpus:
    """The text over 64 tokens, loaded once per process (shared with the demo's tasks)."""
    return tasks.corpus(64)


def digits() -> data.Digits:
    """The digits' one train/test split, loaded once per process (shared with the demo's)."""
    return tasks.digits()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats get 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Any, fig_dir: Path, name: str) -> str:
    """Save a matplotlib figure as ``fig_dir/name.png``; returns the markdown image link."""
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(fig_dir / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"![{name}](figures/{name}.png)"
