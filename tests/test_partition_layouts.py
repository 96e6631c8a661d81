"""Attention layouts in partition(): head counts read from modules and configs, fused layouts
([Q; K; V] with grouped-query sizes, [K; V], per-head interleaved), user-given layouts, the
warning for attention that cannot be split and the errors for layouts that do not fit."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockopt
from blockopt import AttentionLayout, LayoutWarning, Partition
from blockopt.analysis.tuning import _SLICE_SUFFIX


def _spans(model: nn.Module, strategy="tensor", **kw) -> dict[str, list[tuple[int, int, int]]]:
    """Block name -> (dim, start, stop) of each of its slices; no LayoutWarning allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)
        blocks = blockopt.partition(model, strategy, **kw)
    return {
        b.name: [(p.dim, p.start, p.stop) for p in b.parts if p.dim is not None] for b in blocks
    }


def _coverage_is_exact(model: nn.Module, blocks: list[blockopt.Block]) -> bool:
    counts = {id(p): torch.zeros_like(p, dtype=torch.int64) for p in model.parameters()}
    for b in blocks:
        for part in b.parts:
            part.view(counts[id(part.param)]).add_(1)
    return all(bool((c == 1).all()) for c in counts.values())


class Conv1D(nn.Module):
    """Hugging Face GPT-2's projection: weight stored (in, out)."""

    def __init__(self, n_out: int, n_in: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))


class GQAttention(nn.Module):
    """Separate projections, grouped-query: 4 query heads, 2 key/value heads of 3."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads = 4, 2
        self.q_proj = nn.Linear(6, 12, bias=False)
        self.k_proj = nn.Linear(6, 6, bias=False)
        self.v_proj = nn.Linear(6, 6, bias=False)


class ConfigAttention(nn.Module):
    """transformers 5 style: only ``head_dim`` and ``config`` on the module."""

    def __init__(self, heads: int = 4, kv: int = 2, head_dim: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv)
        self.head_dim = head_dim
        self.q_proj = nn.Linear(5, heads * head_dim)
        self.k_proj = nn.Linear(5, kv * head_dim)
        self.v_proj = nn.Linear(5, kv * head_dim)


class FusedGQA(nn.Module):
    """Phi-3 style [Q (4 heads); K (1); V (1)] of head_dim 2: 12 outputs, thirds would be 4."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=1)
        self.head_dim = 2
        self.qkv_proj = nn.Linear(8, 12)


class CrossAttention(nn.Module):
    """GPT-2 cross-attention style: q_attn apart, c_attn = [K; V] (24 outputs, divisible by 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 2, 6
        self.c_attn = Conv1D(24, 12)
        self.q_attn = Conv1D(12, 12)


def test_grouped_query_keys_split_by_key_value_heads():
    spans = _spans(GQAttention(), "head")
    assert [n for n in spans if n.startswith("q_proj")] == [f"q_proj.weight.h{i}" for i in range(4)]
    assert [spans[f"q_proj.weight.h{i}"] for i in range(4)] == [
        [(0, 3 * i, 3 * i + 3)] for i in range(4)
    ]
    assert {n: s for n, s in spans.items() if n.startswith("k_proj")} == {
        "k_proj.weight.h0": [(0, 0, 3)],
        "k_proj.weight.h1": [(0, 3, 6)],
    }
    assert spans["v_proj.weight"] == []  # V stays whole


def test_head_counts_and_size_read_from_config_and_head_dim():
    model = ConfigAttention(heads=4, kv=2, head_dim=3)
    spans = _spans(model, "head")
    assert [spans[f"q_proj.weight.h{i}"] for i in range(4)] == [
        [(0, 3 * i, 3 * i + 3)] for i in range(4)
    ]
    assert [spans[f"k_proj.weight.h{i}"] for i in range(2)] == [[(0, 0, 3)], [(0, 3, 6)]]
    assert "k_proj.weight.h2" not in spans
    assert spans["q_proj.bias"] == [] and spans["k_proj.bias"] == []  # biases stay whole
    # "tensor" leaves separate projections whole
    assert all(s == [] for s in _spans(model, "tensor").values())


def test_fused_grouped_query_projection_split_by_sizes_not_thirds():
    spans = _spans(FusedGQA(), "tensor")
    assert spans["qkv_proj.weight.q"] == [(0, 0, 8)]
    assert spans["qkv_proj.weight.k"] == [(0, 8, 10)]
    assert spans["qkv_proj.weight.v"] == [(0, 10, 12)]
    assert spans["qkv_proj.bias.k"] == [(0, 8, 10)]
    heads = _spans(FusedGQA(), "head")
    assert [heads[f"qkv_proj.weight.q.h{i}"] for i in range(4)] == [
        [(0, 2 * i, 2 * i + 2)] for i in range(4)
    ]
    assert heads["qkv_proj.weight.k.h0"] == [(0, 8, 10)] and "qkv_proj.weight.k.h1" not in heads


def test_cross_attention_key_value_projection_is_k_and_v_only():
    spans = _spans(CrossAttention(), "tensor")
    assert spans["c_attn.weight.k"] == [(1, 0, 12)] and spans["c_attn.weight.v"] == [(1, 12, 24)]
    assert spans["c_attn.bias.k"] == [(0, 0, 12)] and spans["c_attn.bias.v"] == [(0, 12, 24)]
    assert not any(n.startswith("c_attn") and ".q" in n for n in spans)
    heads = _spans(CrossAttention(), "head")
    assert heads["c_attn.weight.k.h1"] == [(1, 6, 12)] and heads["c_attn.weight.v"] == [(1, 12, 24)]
    assert heads["q_attn.weight.h1"] == [(1, 6, 12)]


def test_multihead_attention_with_separate_projections():
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    spans = _spans(mha, "head")
    assert spans["q_proj_weight.h1"] == [(0, 4, 8)] and spans["k_proj_weight.h0"] == [(0, 0, 4)]
    assert spans["v_proj_weight"] == []
    # the bias stays [bq; bk; bv] when the weights are separate
    assert [spans[f"in_proj_bias.{t}"] for t in "qkv"] == [[(0, 0, 8)], [(0, 8, 16)], [(0, 16, 24)]]


class UnknownFused(nn.Module):
    """A query_key_value projection in a class blockopt knows nothing of."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.query_key_value = nn.Linear(4, 12)


class Layers(nn.Module):
    def __init__(self, make, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": make()}) for _ in range(n))


def test_unknown_interleaving_is_left_whole_with_one_warning_naming_the_modules():
    model = Layers(UnknownFused)
    with pytest.warns(LayoutWarning) as caught:
        blocks = blockopt.partition(model, "tensor")
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "3 UnknownFused module(s) (layers.0.attn, layers.1.attn, layers.2.attn)" in text
    assert "query_key_value" in text and "interleave" in text
    assert "layouts={'layers\\\\.\\\\d+\\\\.attn': blockopt.AttentionLayout(" in text
    assert all(len(b.parts) == 1 and b.parts[0].dim is None for b in blocks)
    assert issubclass(LayoutWarning, UserWarning)


class HeadlessSquare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)


class HeadlessGQA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(8, 12)  # [Q 8; K 2; V 2] maybe: nothing says


class HeadlessSeparate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)


def test_attention_without_head_count():
    # a square fused projection (outputs = 3 x inputs) is [Q; K; V] thirds under "tensor"...
    assert _spans(HeadlessSquare())["qkv.weight.k"] == [(0, 4, 8)]
    # ... and "head" warns that it cannot go further, naming the module
    with pytest.warns(
        LayoutWarning, match=r"HeadlessSquare module\(s\) \(\(root\)\).*no head"
    ) as w:
        names = [b.name for b in blockopt.partition(HeadlessSquare(), "head")]
    assert "layouts={'': blockopt.AttentionLayout(" in str(w[0].message)  # the root's path
    assert names[:3] == ["qkv.weight.q", "qkv.weight.k", "qkv.weight.v"]
    # a fused projection of other sizes is not guessed at
    with pytest.warns(LayoutWarning, match="qkv_proj: no head count"):
        blocks = blockopt.partition(HeadlessGQA(), "tensor")
    assert [b.name for b in blocks] == ["qkv_proj.weight", "qkv_proj.bias"]
    # separate Q and K: whole under "tensor" without a word, a warning under "head"
    assert all(s == [] for s in _spans(HeadlessSeparate()).values())
    with pytest.warns(LayoutWarning, match="query/key: no head count"):
        blocks = blockopt.partition(HeadlessSeparate(), "head")
    assert len(blocks) == 6 and all(b.parts[0].dim is None for b in blocks)


class MambaLike(nn.Module):
    """``in_proj`` outside attention (a Mamba mixer, a short convolution): not Q, K, V."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 4
        self.in_proj = nn.Linear(4, 12)


def test_in_proj_outside_attention_is_not_split_and_not_warned_about():
    assert all(s == [] for s in _spans(MambaLike(), "head").values())


def test_separate_projections_that_do_not_fit_the_head_count_are_warned_about():
    model = GQAttention()
    model.num_heads = 5  # 12 query outputs are not 5 heads
    with pytest.warns(LayoutWarning, match="q_proj: its 12 outputs are not 5 = 5 heads"):
        names = [b.name for b in blockopt.partition(model, "head")]
    assert "q_proj.weight" in names and "k_proj.weight.h1" in names


# -- layouts given by the user -----------------------------------------------------------------


class Interleaved(nn.Module):
    """[q0; k0; v0; q1; k1; v1] of head_dim 2, named so blockopt cannot know it."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.mix(x).view(b, t, 2, 3, 2).unbind(3)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 4)


def test_layout_keyed_to_a_projection_module_interleaved_per_head():
    layout = AttentionLayout(heads=2, groups=2)
    spans = _spans(Interleaved(), "head", layouts={"mix": layout})
    assert spans == {
        "mix.weight.q.h0": [(0, 0, 2)],
        "mix.weight.q.h1": [(0, 6, 8)],
        "mix.weight.k.h0": [(0, 2, 4)],
        "mix.weight.k.h1": [(0, 8, 10)],
        "mix.weight.v": [(0, 4, 6), (0, 10, 12)],
        "mix.bias.q": [(0, 0, 2), (0, 6, 8)],
        "mix.bias.k": [(0, 2, 4), (0, 8, 10)],
        "mix.bias.v": [(0, 4, 6), (0, 10, 12)],
    }
    # the slices are what the forward reads as each part: zeroing the V slices zeroes V
    model = Interleaved()
    blocks = {b.name: b for b in blockopt.partition(model, "tensor", layouts={"mix": layout})}
    with torch.no_grad():
        for name in ("mix.weight.v", "mix.bias.v"):
            for part in blocks[name].parts:
                part.view(part.param).zero_()
    assert torch.all(model(torch.randn(2, 3, 4)) == 0)


def test_layout_keyed_by_regex_to_attention_modules_and_grouped_runs():
    # Falcon's new decoder layout: per key/value group, [2 queries; k; v] of head_dim 1
    model = Layers(UnknownFused, n=2)
    layout = AttentionLayout(heads=4, kv_heads=2, groups=2, head_dim=1)
    model.layers[0]["attn"].query_key_value = nn.Linear(4, 8)
    model.layers[1]["attn"].query_key_value = nn.Linear(4, 8)
    spans = _spans(model, "head", layouts={r"layers\.\d+\.attn": layout})
    w = "layers.1.attn.query_key_value.weight"
    assert [spans[f"{w}.q.h{i}"] for i in range(4)] == [
        [(0, 0, 1)], [(0, 1, 2)], [(0, 4, 5)], [(0, 5, 6)]
    ]  # fmt: skip
    assert [spans[f"{w}.k.h{i}"] for i in range(2)] == [[(0, 2, 3)], [(0, 6, 7)]]
    assert spans[f"{w}.v"] == [(0, 3, 4), (0, 7, 8)]
    assert _coverage_is_exact(model, blockopt.partition(model, "head", layouts={".*attn": layout}))


def test_layout_overrides_what_the_module_says_and_sets_out_dim():
    model = CrossAttention()
    # the module's own reading gives [K; V] of 2 heads; a layout of one head of 12 overrides it
    spans = _spans(model, "head", layouts={"": AttentionLayout(heads=1, parts="kv")})
    assert spans["c_attn.weight.k.h0"] == [(1, 0, 12)] and "c_attn.weight.k.h1" not in spans
    assert spans["q_attn.weight.h0"] == [(1, 0, 12)]
    # out_dim: a projection whose weight is stored (in, out) that blockopt cannot tell
    lin = nn.Module()
    lin.proj = nn.Module()
    lin.proj.weight = nn.Parameter(torch.randn(4, 12))  # (in, out)
    spans = _spans(lin, layouts={"proj": AttentionLayout(heads=2, out_dim=1)})
    assert spans["proj.weight.k"] == [(1, 4, 8)]


def test_codegen_order_of_parts():
    model = nn.Module()
    model.proj = nn.Linear(2, 12)
    spans = _spans(model, layouts={"proj": AttentionLayout(heads=2, parts="qvk", groups=2)})
    assert list(spans) == [f"proj.{w}.{t}" for w in ("weight", "bias") for t in "qvk"]
    assert spans["proj.weight.v"] == [(0, 2, 4), (0, 8, 10)]
    assert spans["proj.weight.k"] == [(0, 4, 6), (0, 10, 12)]


def test_layout_that_does_not_fit_names_module_shape_and_layout():
    layout = AttentionLayout(heads=4, kv_heads=2, head_dim=2)
    with pytest.raises(ValueError) as err:
        blockopt.partition(Layers(FusedGQA, 1), layouts={"layers.0.attn": layout})
    text = str(err.value)
    assert "layers.0.attn.qkv_proj.weight of 'layers.0.attn' (FusedGQA" in text
    assert "shape (12, 8) cut along dim 0" in text
    assert "AttentionLayout(heads=4, kv_heads=2, head_dim=2" in text
    assert "4 + 2 + 2 = 8 heads (qkv) of 2 make 16 outputs, it has 12" in text
    assert "Fix heads, kv_heads, head_dim or parts" in text


@pytest.mark.parametrize(
    ("layouts", "strategy", "error", "message"),
    [
        ({"nowhere": AttentionLayout(2)}, "head", ValueError, r"\['nowhere'\] match no module"),
        ({"(": AttentionLayout(2)}, "head", ValueError, "not a valid regex"),
        ({"attn": 2}, "head", TypeError, "must be a blockopt.AttentionLayout"),
        ({3: AttentionLayout(2)}, "head", TypeError, "keys must be module paths"),
        ({"attn": AttentionLayout(2)}, "module", ValueError, "layouts apply to the strategies"),
        ({"layers": AttentionLayout(2)}, "head", ValueError, "finds no projection to split"),
        ([1, 2], "head", TypeError, "layouts must be a mapping"),
    ],
)
def test_bad_layouts_are_clear_errors(layouts, strategy, error, message):
    model = nn.Module()
    model.attn = GQAttention()
    model.layers = nn.Sequential(nn.Linear(2, 2).requires_grad_(False), nn.ReLU())
    with pytest.raises(error, match=message):
        blockopt.partition(model, strategy, layouts=layouts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": 0}, "heads must be a positive int"),
        ({"heads": 2, "kv_heads": 0}, "kv_heads must be a positive int or None"),
        ({"heads": 2, "head_dim": 1.5}, "head_dim must be a positive int or None"),
        ({"heads": 2, "parts": "qxk"}, "letters q, k, v"),
        ({"heads": 2, "parts": "qq"}, "names a part twice"),
        ({"heads": 4, "kv_heads": 2, "groups": 4}, r"groups=4\) does not divide its 2 k heads"),
        ({"heads": 2, "out_dim": 2}, "out_dim must be None, 0 or 1"),
    ],
)
def test_bad_attention_layouts_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionLayout(**kwargs)


# -- a Partition is a strategy everywhere ------------------------------------------------------


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = Interleaved()
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x).mean(1))


def test_partition_value_works_wherever_a_strategy_does():
    model = TinyModel()
    x, y = torch.randn(4, 3, 4), torch.tensor([0, 1, 2, 0])

    def probe() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    strategy = Partition("head", layouts={"attn.mix": AttentionLayout(heads=2, groups=2)})
    assert strategy.layouts == (("attn.mix", AttentionLayout(heads=2, groups=2)),)
    assert hash(strategy) == hash(Partition("head", {"attn.mix": AttentionLayout(2, groups=2)}))
    expected = [b.name for b in blockopt.partition(model, "head", layouts=dict(strategy.layouts))]
    assert "attn.mix.weight.k.h1" in expected
    assert [b.name for b in blockopt.partition(model, strategy)] == expected
    assert [b.name for b in strategy(model)] == expected
    spectra = blockopt.block_spectra(model, probe, blocks=strategy, steps=4)
    assert list(spectra) == expected
    opt = blockopt.BlockOptimizer(model, probe, lr=0.1, strategy=strategy)
    assert [b.name for b in opt.blocks] == expected
    lrs = {name: 0.1 for name in expected}
    groups = blockopt.param_groups(model, lrs, strategy=strategy)
    assert sorted(n for g in groups for n in g["blocks"]) == sorted(expected)
    with pytest.raises(TypeError, match="both in the Partition and to partition"):
        blockopt.partition(model, strategy, layouts={})
    with pytest.raises(ValueError, match="Partition strategy must be one of"):
        Partition("module")


def test_every_block_name_parses_back_to_its_parameter():
    """tuning's slice suffix (``.q``/``.k``/``.v``, then ``.h<i>``) strips every new name."""
    models = {
        "gqa": (GQAttention(), {}),
        "fused": (FusedGQA(), {}),
        "cross": (CrossAttention(), {}),
        "interleaved": (Interleaved(), {"layouts": {"mix": AttentionLayout(2, groups=2)}}),
    }
    for model, kw in models.values():
        params = {n for n, _ in model.named_parameters()}
        for strategy in ("tensor", "head"):
            blocks = blockopt.partition(model, strategy, **kw)
            assert _coverage_is_exact(model, blocks)
            for b in blocks:
                assert _SLICE_SUFFIX.sub("", b.name) == b.parts[0].param_name in params
                assert re.fullmatch(r"[\w.]+", b.name)
