"""Small float64 models with a loss, shared by the curvature tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockopt.workloads.models import CausalSelfAttention


@dataclass
class Case:
    """A model and a loss computed through any forward function with the model's signature."""

    name: str
    model: nn.Module
    loss_of: Callable[[Callable[..., torch.Tensor]], torch.Tensor]

    def probe(self) -> torch.Tensor:
        return self.loss_of(self.model)


class SoftmaxAttention(nn.Module):
    """One layer, one head of softmax self-attention written out by hand, no LayerNorm."""

    num_heads = 1  # what "head" partitions read; one head is the whole projection

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.query = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return self.out(torch.softmax(scores, dim=-1) @ v).mean(dim=1)


class FusedAttention(nn.Module):
    """GPT-style attention through F.scaled_dot_product_attention with a fused ``qkv``."""

    def __init__(self, d: int = 4, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(d, heads)
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x)).mean(dim=1)


class MHAModel(nn.Module):
    def __init__(self, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def _cases() -> dict[str, Callable[[], Case]]:
    def mlp() -> Case:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)
        ).double()
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        return Case("mlp", model, lambda f: F.mse_loss(f(x), y))

    def cnn() -> Case:
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)
        ).double()
        x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        return Case("cnn", model, lambda f: F.cross_entropy(f(x), y))

    def attention() -> Case:
        torch.manual_seed(2)
        model = SoftmaxAttention().double()
        x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        return Case("attention", model, lambda f: F.cross_entropy(f(x), y))

    def fused() -> Case:
        torch.manual_seed(3)
        model = FusedAttention().double()
        x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
        return Case("fused_sdpa", model, lambda f: F.cross_entropy(f(x), y))

    def layernorm() -> Case:
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
        x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
        return Case("layernorm", model, lambda f: F.cross_entropy(f(x), y))

    def mha() -> Case:
        torch.manual_seed(5)
        model = MHAModel().double()
        x = torch.randn(3, 5, 4, dtype=torch.float64)
        y = torch.randn(3, 5, 4, dtype=torch.float64)
        return Case("mha", model, lambda f: F.mse_loss(f(x), y))

    return {
        c.__name__.replace("fused", "fused_sdpa"): c
        for c in (mlp, cnn, attention, fused, layernorm, mha)
    }


CASES = _cases()


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()
