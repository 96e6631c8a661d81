"""Block partition: names, sizes, fused attention splits, strategies and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blockopt
from blockopt.workloads.models import MLP, SmallCNN, TinyGPT, TinyViT


def _coverage(model, blocks):
    """Each trainable coordinate is covered by exactly one block."""
    counts = {id(p): torch.zeros_like(p, dtype=torch.int64) for p in model.parameters()}
    for b in blocks:
        for part in b.parts:
            part.view(counts[id(part.param)]).add_(1)
    return counts


@pytest.mark.parametrize("factory", [TinyGPT, TinyViT, SmallCNN, MLP])
@pytest.mark.parametrize("strategy", ["tensor", "head", "module", "model"])
def test_every_trainable_coordinate_in_exactly_one_block(factory, strategy):
    model = factory()
    blocks = blockopt.partition(model, strategy)
    total = sum(p.numel() for p in model.parameters())
    assert sum(b.numel for b in blocks) == total
    for count in _coverage(model, blocks).values():
        assert torch.all(count == 1)
    assert len({b.name for b in blocks}) == len(blocks)


def test_tensor_strategy_on_gpt_splits_fused_qkv():
    model = TinyGPT()
    blocks = {b.name: b for b in blockopt.partition(model)}
    assert len(blocks) == 29 - 2 * 2 + 2 * 6  # 29 tensors, each layer's qkv weight/bias in 3
    q = blocks["blocks.0.attn.qkv.weight.q"]
    assert (
        q.numel == 64 * 64
        and q.parts[0].dim == 0
        and (q.parts[0].start, q.parts[0].stop) == (0, 64)
    )
    v = blocks["blocks.1.attn.qkv.bias.v"]
    assert v.numel == 64 and (v.parts[0].start, v.parts[0].stop) == (128, 192)
    assert blocks["head.weight"].numel == 64 * 64
    # The slice views the live parameter: writing through it changes the model.
    part = q.parts[0]
    assert part.view(part.param).data_ptr() == model.blocks[0].attn.qkv.weight.data_ptr()


def test_multihead_attention_in_proj_split_and_per_head():
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    names = [b.name for b in blockopt.partition(model)]
    assert names[:6] == [
        "self_attn.in_proj_weight.q", "self_attn.in_proj_weight.k", "self_attn.in_proj_weight.v",
        "self_attn.in_proj_bias.q", "self_attn.in_proj_bias.k", "self_attn.in_proj_bias.v",
    ]  # fmt: skip
    heads = {b.name: b for b in blockopt.partition(model, "head")}
    assert [n for n in heads if "in_proj_weight" in n] == [
        "self_attn.in_proj_weight.q.h0", "self_attn.in_proj_weight.q.h1",
        "self_attn.in_proj_weight.k.h0", "self_attn.in_proj_weight.k.h1",
        "self_attn.in_proj_weight.v",
    ]  # fmt: skip
    k1 = heads["self_attn.in_proj_weight.k.h1"].parts[0]
    assert (k1.start, k1.stop, k1.numel) == (12, 16, 4 * 8)


def test_separate_query_key_projections_split_per_head():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4
            self.q_proj = nn.Linear(8, 8)
            self.k_proj = nn.Linear(8, 8)
            self.v_proj = nn.Linear(8, 8)

    names = [b.name for b in blockopt.partition(Attn(), "head")]
    assert names[:4] == [
        "q_proj.weight.h0",
        "q_proj.weight.h1",
        "q_proj.weight.h2",
        "q_proj.weight.h3",
    ]
    assert "v_proj.weight" in names and "q_proj.bias" in names
    assert [b.name for b in blockopt.partition(Attn())][:2] == ["q_proj.weight", "q_proj.bias"]


def test_conv1d_style_fused_projection_splits_along_columns():
    class Conv1D(nn.Module):  # Hugging Face GPT-2 layout: weight (in, out)
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))
            self.bias = nn.Parameter(torch.zeros(n_out))

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_head = 2
            self.c_attn = Conv1D(4, 12)

    blocks = {b.name: b for b in blockopt.partition(Attn())}
    k = blocks["c_attn.weight.k"].parts[0]
    assert (k.dim, k.start, k.stop, k.shape) == (1, 4, 8, (4, 4))
    assert blocks["c_attn.bias.v"].parts[0].dim == 0


def test_frozen_parameters_skipped_and_tied_counted_once():
    model = TinyGPT(n_layers=1)
    model.head.weight = model.tok.weight  # tie
    model.pos.weight.requires_grad_(False)
    names = [b.name for b in blockopt.partition(model)]
    assert "tok.weight" in names and "head.weight" not in names and "pos.weight" not in names
    module_names = [b.name for b in blockopt.partition(model, "module")]
    assert "tok" in module_names and "head" not in module_names and "pos" not in module_names


def test_callable_and_regex_strategies():
    model = MLP((4, 5, 3))
    by_layer = blockopt.partition(model, lambda name, p: name.split(".")[1])
    assert [(b.name, b.numel) for b in by_layer] == [("0", 25), ("2", 18)]
    only_weights = blockopt.partition(model, lambda name, p: name if p.dim() > 1 else None)
    assert [b.name for b in only_weights] == ["net.0.weight", "net.2.weight"]
    regex = blockopt.partition(model, {"weights": r"weight$"})
    assert [(b.name, b.numel) for b in regex] == [
        ("weights", 35),
        ("net.0.bias", 5),
        ("net.2.bias", 3),
    ]


def test_a_regex_block_named_like_a_parameter_it_does_not_match_is_refused():
    """The unmatched parameter keeps its own name as a block: the two would merge silently."""
    model = MLP((4, 5, 3))
    with pytest.raises(ValueError, match=r"'net\.2\.weight' matches no partition regex .* merge"):
        blockopt.partition(model, {"net.2.weight": r"^net\.0\.weight$"})
    same = blockopt.partition(model, {"net.2.weight": r"^net\.2\.weight$"})  # it matches: fine
    names = sorted(b.name for b in same)
    assert names == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]


def test_module_strategy_groups_weight_and_bias():
    blocks = blockopt.partition(MLP((4, 5, 3)), "module")
    assert [(b.name, b.numel) for b in blocks] == [("net.0", 25), ("net.2", 18)]


class _Empty(nn.Module):
    pass


@pytest.mark.parametrize(
    ("model", "strategy", "error", "message"),
    [
        (_Empty(), "tensor", ValueError, "no trainable parameters"),
        (nn.Linear(2, 2).requires_grad_(False), "tensor", ValueError, "no trainable parameters"),
        (nn.Linear(2, 2), "per_row", ValueError, "unknown partition strategy 'per_row'"),
        (nn.Linear(2, 2), lambda n, p: None, ValueError, "left out every parameter"),
        (nn.Linear(2, 2), lambda n, p: 3, TypeError, "must return a non-empty block name"),
        (nn.Linear(2, 2), {"x": "("}, ValueError, "regex for block 'x' is invalid"),
        (nn.Linear(2, 2), 42, TypeError, "strategy must be"),
        ("not a model", "tensor", TypeError, "needs an nn.Module"),
    ],
)
def test_bad_partitions_are_clear_errors(model, strategy, error, message):
    with pytest.raises(error, match=message):
        blockopt.partition(model, strategy)
