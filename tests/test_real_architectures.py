"""Real architectures: transformers models built from tiny configs (random init, no hub), torch's
nn.TransformerEncoder and a small ResNet. Per model: the partition against the model's own
attention layout (each block moves exactly the Q, K or V heads its name says, in the model's own
forward), block spectra against dense float64 Hessians, and the heterogeneity score ordering the
Transformers above the ResNet."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import blockopt

# transformers 5: its models hand Q, K, V to a registered attention function, and name ViT's
# projections q_proj, k_proj, v_proj.
transformers = pytest.importorskip("transformers", minversion="5.0")
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

VOCAB, SEQ, BATCH, CLASSES = 32, 6, 3, 3
# How each code names its separate projections, and what they are.
ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "query": "q",
    "key": "k",
    "value": "v",
    "q_attn": "q",
    "q": "q",
    "k": "k",
    "v": "v",
}
_SUFFIX = re.compile(r"\.(?P<role>[qkv])(\.h(?P<h>\d+))?$|\.h(?P<head>\d+)$")

# -- the model's own Q, K and V: captured where its attention function receives them ----------

_CAPTURED: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _capture(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An attention implementation that records the (batch, heads, seq, head_dim) Q, K, V."""
    _CAPTURED[module] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("blockopt_capture", _capture)


def _interface_qkv(model: nn.Module, inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Attention path -> {"q", "k", "v"}: what the model hands its attention function."""
    _CAPTURED.clear()
    with torch.no_grad():
        model(**inputs)
    paths = {m: n for n, m in model.named_modules()}
    return {paths[m]: dict(zip("qkv", t)) for m, t in _CAPTURED.items()}


def _falcon_attn(attn: str) -> dict[str, str]:
    """Falcon hands Q, K, V to a registered attention function from transformers 5.25 on; before,
    it ran attention of its own and takes no custom implementation."""
    from transformers.models.falcon import modeling_falcon

    own_attention = hasattr(modeling_falcon.FalconAttention, "_split_heads")
    return {} if own_attention else {"attn_implementation": attn}


def _split_method_qkv(split: str) -> Callable[[nn.Module, dict[str, Any]], dict[str, Any]]:
    """For codes that split the fused output in a method of their own (Bloom's ``_reshape``,
    Falcon's ``_split_heads`` before transformers 5.25): hook the fused projection and call that
    method on its output. A code without the method hands Q, K, V to its attention function."""

    def own(model: nn.Module, inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
        if not any(hasattr(m, split) for m in model.modules()):
            return _interface_qkv(model, inputs)
        outputs: dict[str, torch.Tensor] = {}
        hooks = [
            m.query_key_value.register_forward_hook(
                lambda mod, args, out, n=n: outputs.__setitem__(n, out.detach())
            )
            for n, m in model.named_modules()
            if hasattr(m, split)
        ]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        found = {}
        modules = dict(model.named_modules())
        for path, fused in outputs.items():
            attn = modules[path]
            q, k, v = getattr(attn, split)(fused)
            if split == "_split_heads":  # Falcon: (batch, seq, heads, head_dim)
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
                if attn.new_decoder_architecture:  # keys and values broadcast to query heads
                    group = attn.num_heads // attn.num_kv_heads
                    k, v = k[:, ::group], v[:, ::group]
            found[path] = {"q": q, "k": k, "v": v}
        return found

    return own


# -- the architectures ------------------------------------------------------------------------


def _tokens(seed: int = 0, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _lm_loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@dataclass(frozen=True)
class Arch:
    """A tiny model, its forward inputs and loss, and how to read its own Q, K, V."""

    build: Callable[[str], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    loss: Callable[[Any, dict[str, Any]], torch.Tensor]
    own_qkv: Callable[[nn.Module, dict[str, Any]], dict[str, dict[str, Any]]] = _interface_qkv


def _lm(config_cls: str, model_cls: str, **kw: Any) -> Arch:
    def build(attn: str) -> nn.Module:
        config = getattr(transformers, config_cls)(vocab_size=VOCAB, attn_implementation=attn, **kw)
        return getattr(transformers, model_cls)(config)

    return Arch(
        build, lambda: {"input_ids": _tokens()}, lambda out, x: _lm_loss(out, x["input_ids"])
    )


def _classifier(config_cls: str, model_cls: str, key: str, **kw: Any) -> Arch:
    labels = torch.randint(0, CLASSES, (BATCH,), generator=torch.Generator().manual_seed(1))

    def build(attn: str) -> nn.Module:
        config = getattr(transformers, config_cls)(
            num_labels=CLASSES, attn_implementation=attn, **kw
        )
        return getattr(transformers, model_cls)(config)

    def inputs() -> dict[str, Any]:
        if key == "pixel_values":
            g = torch.Generator().manual_seed(2)
            return {key: torch.randn(BATCH, 3, 4, 4, generator=g, dtype=torch.float64)}
        return {key: _tokens()}

    return Arch(build, inputs, lambda out, x: F.cross_entropy(out.logits, labels))


_NO_DROP = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
_GPT2_NO_DROP = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
_LLAMA = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1}
_ENCODER = torch.randn(BATCH, 4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

ARCHS: dict[str, Arch] = {
    # 2 * n_embd = 12 outputs of the cross-attention [K; V] divide by 3: they must not be thirds.
    "gpt2-cross": Arch(
        lambda attn: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_embd=6, n_head=2, n_layer=1, vocab_size=VOCAB, n_positions=SEQ,
                add_cross_attention=True, attn_implementation=attn, **_GPT2_NO_DROP,
            )
        ),
        lambda: {"input_ids": _tokens(), "encoder_hidden_states": _ENCODER},
        lambda out, x: _lm_loss(out, x["input_ids"]),
    ),
    "bert": _classifier(
        "BertConfig", "BertForSequenceClassification", "input_ids", vocab_size=VOCAB,
        hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
        **_NO_DROP,
    ),
    # grouped-query attention, and a head_dim (4) that is not hidden_size / heads (2)
    "llama-gqa": _lm(
        "LlamaConfig", "LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=2,
        head_dim=4, **_LLAMA,
    ),
    # fused [Q (8 heads); K (2); V (2)] of 24 outputs: equal thirds would be wrong
    "phi3-gqa": _lm(
        "Phi3Config", "Phi3ForCausalLM", hidden_size=16, intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, pad_token_id=0,
    ),
    "gpt-neox": _lm(
        "GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=8, num_attention_heads=2,
        num_hidden_layers=1, intermediate_size=16, hidden_dropout=0.0, attention_dropout=0.0,
    ),
    "vit": _classifier(
        "ViTConfig", "ViTForImageClassification", "pixel_values", hidden_size=8,
        num_attention_heads=2, num_hidden_layers=1, intermediate_size=16, image_size=4,
        patch_size=2, **_NO_DROP,
    ),
}  # fmt: skip
# More codes, for the layout check only.
LAYOUT_ONLY: dict[str, Arch] = {
    "mistral-gqa": _lm("MistralConfig", "MistralForCausalLM", num_attention_heads=4,
                       num_key_value_heads=2, **_LLAMA),
    "qwen2-gqa": _lm("Qwen2Config", "Qwen2ForCausalLM", num_attention_heads=4,
                     num_key_value_heads=1, **_LLAMA),
    "qwen3-gqa": _lm("Qwen3Config", "Qwen3ForCausalLM", num_attention_heads=4,
                     num_key_value_heads=2, head_dim=4, **_LLAMA),
    "gemma-mqa": _lm("GemmaConfig", "GemmaForCausalLM", num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, **_LLAMA),
    "olmo-gqa": _lm("OlmoConfig", "OlmoForCausalLM", num_attention_heads=4,
                    num_key_value_heads=2, **_LLAMA),
    "persimmon": _lm("PersimmonConfig", "PersimmonForCausalLM", hidden_size=8,
                     num_attention_heads=2, num_hidden_layers=1, intermediate_size=16),
    "gpt-bigcode": _lm("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=8, n_head=2,
                       n_layer=1, multi_query=False, **_GPT2_NO_DROP),
    "gpt-bigcode-mqa": _lm("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=8, n_head=2,
                           n_layer=1, multi_query=True, **_GPT2_NO_DROP),
    "codegen": _lm("CodeGenConfig", "CodeGenForCausalLM", n_embd=16, n_head=4, n_layer=1,
                   rotary_dim=2, **_GPT2_NO_DROP),
    "bloom": Arch(
        lambda attn: transformers.BloomForCausalLM(
            transformers.BloomConfig(vocab_size=VOCAB, hidden_size=8, n_head=2, n_layer=1)
        ),
        lambda: {"input_ids": _tokens()}, lambda out, x: _lm_loss(out, x["input_ids"]),
        _split_method_qkv("_reshape"),
    ),
    **{
        f"falcon-{kind}": Arch(
            lambda attn, kw=kw: transformers.FalconForCausalLM(
                transformers.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_attention_heads=4,
                                          num_hidden_layers=1, **_falcon_attn(attn), **kw)
            ),
            lambda: {"input_ids": _tokens()}, lambda out, x: _lm_loss(out, x["input_ids"]),
            _split_method_qkv("_split_heads"),
        )
        for kind, kw in {
            "new": {"new_decoder_architecture": True, "num_kv_heads": 2},
            "mqa": {"new_decoder_architecture": False, "multi_query": True},
            "mha": {"new_decoder_architecture": False, "multi_query": False},
        }.items()
    },
}  # fmt: skip


def _model(arch: Arch, attn: str = "eager", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return arch.build(attn).double().eval()


def _partition(model: nn.Module, strategy: str) -> list[blockopt.Block]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", blockopt.LayoutWarning)  # every code here is understood
        return blockopt.partition(model, strategy)


# -- the partition against the model's own layout ---------------------------------------------


def _role_and_heads(block: blockopt.Block, heads: dict[str, int]) -> tuple[str, set[int]] | None:
    """What ``block`` claims to hold: a role and its heads, from its name; ``None`` for a block
    outside the Q, K, V projections (an output projection, a norm)."""
    param = block.parts[0].param_name
    attr = param.rsplit(".", 2)[-2]
    m = _SUFFIX.search(block.name)
    if m and m["role"]:
        role, head = m["role"], m["h"]
    elif attr in ROLES:
        role, head = ROLES[attr], m["head"] if m else None
    else:
        return None
    return role, set(range(heads[role])) if head is None else {int(head)}


@pytest.mark.parametrize("strategy", ["tensor", "head"])
@pytest.mark.parametrize("name", sorted(ARCHS) + sorted(LAYOUT_ONLY))
def test_each_block_moves_exactly_the_heads_its_name_says(name, strategy):
    """Perturb one block's coordinates and see which query, key and value heads change in the
    model's own forward: exactly the heads of the role the block's name says (all of them for
    a whole part), every head of every role hit by exactly one block under "head"."""
    arch = {**ARCHS, **LAYOUT_ONLY}[name]
    model = _model(arch, "blockopt_capture")
    inputs = arch.inputs()
    before = arch.own_qkv(model, inputs)
    assert before, "no attention captured"
    blocks = _partition(model, strategy)
    owners = sorted(before, key=len, reverse=True)
    gen = torch.Generator().manual_seed(4)
    hits: dict[tuple[str, str, int], list[str]] = {}
    checked = 0
    for block in blocks:
        param = block.parts[0].param_name
        owner = next((o for o in owners if param.startswith(f"{o}.")), None)
        if owner is None:
            continue
        heads = {r: t.shape[1] for r, t in before[owner].items()}
        claim = _role_and_heads(block, heads)
        if claim is None:
            assert all(p.dim is None for p in block.parts), block.name
            continue
        with torch.no_grad():
            saved = block.parts[0].param.clone()
            for part in block.parts:
                view = part.view(part.param)
                view.add_(torch.randn(view.shape, generator=gen, dtype=view.dtype))
            after = arch.own_qkv(model, inputs)[owner]
            block.parts[0].param.copy_(saved)
        moved = {
            (r, h)
            for r, t in after.items()
            for h in range(t.shape[1])
            if (t[:, h] - before[owner][r][:, h]).abs().max() > 1e-9
        }
        role, claimed = claim
        assert moved == {(role, h) for h in claimed}, (block.name, sorted(moved))
        for h in claimed:
            hits.setdefault((param, role, h), []).append(block.name)
        checked += 1
    assert checked >= 3
    if strategy == "head":
        # each query / key head of a weight is one block: as many blocks as the model has heads
        for (param, role, h), names in hits.items():
            if role in "qk" and param.endswith("weight"):
                assert len(names) == 1 and names[0].endswith(f".h{h}"), names


def test_head_counts_come_from_the_config():
    """The head blocks of GQA models: num_attention_heads query heads, num_key_value_heads key
    heads of head_dim rows each, at the offsets the config's sizes give."""
    llama = _model(ARCHS["llama-gqa"])
    blocks = {b.name: b for b in _partition(llama, "head")}
    attn = "model.layers.0.self_attn"
    q = [b for n, b in blocks.items() if n.startswith(f"{attn}.q_proj.weight.h")]
    k = [b for n, b in blocks.items() if n.startswith(f"{attn}.k_proj.weight.h")]
    config = llama.config
    assert len(q) == config.num_attention_heads == 4 and len(k) == config.num_key_value_heads == 2
    assert [(b.parts[0].start, b.parts[0].stop) for b in k] == [(0, 4), (4, 8)]
    assert f"{attn}.v_proj.weight" in blocks  # V stays whole

    phi = _model(ARCHS["phi3-gqa"])
    blocks = {b.name: b for b in _partition(phi, "tensor")}
    fused = "model.layers.0.self_attn.qkv_proj.weight"
    hd = phi.config.hidden_size // phi.config.num_attention_heads
    q, kv = phi.config.num_attention_heads * hd, phi.config.num_key_value_heads * hd
    assert [(blocks[f"{fused}.{t}"].parts[0].start, blocks[f"{fused}.{t}"].parts[0].stop)
            for t in "qkv"] == [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]  # fmt: skip

    gpt2 = _model(ARCHS["gpt2-cross"])
    names = [b.name for b in _partition(gpt2, "tensor")]
    cross = "transformer.h.0.crossattention.c_attn.weight"
    assert [n for n in names if n.startswith(cross)] == [f"{cross}.k", f"{cross}.v"]


def test_multihead_attention_in_a_transformer_encoder_matches_its_attention_weights():
    """torch's nn.MultiheadAttention: the per-head attention weights it returns move only for
    the head a Q or K block names; Q blocks are inert when the query input is zero (the query is
    its bias then) while K blocks are not, and V blocks never move the weights."""
    model = _Encoder()
    mha = model.enc.layers[0].self_attn
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    blocks = [b for b in _partition(model, "head") if b.name.startswith("enc.layers.0.")]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    zero = torch.zeros_like(x)

    def weights(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return mha(query, key, key, need_weights=True, average_attn_weights=False)[1]

    checked = 0
    for block in blocks:
        m = _SUFFIX.search(block.name)
        if not (m and m["role"] and "in_proj_weight" in block.name):
            continue
        cases = {(x, x), (zero, x)}
        base = {c: weights(*c).detach() for c in cases}
        with torch.no_grad():
            saved = mha.in_proj_weight.clone()
            for part in block.parts:
                part.view(mha.in_proj_weight).add_(torch.randn(part.shape, generator=gen))
            moved = {
                c: {h for h in range(4) if (weights(*c)[:, h] - base[c][:, h]).abs().max() > 1e-9}
                for c in cases
            }
            mha.in_proj_weight.copy_(saved)
        role, head = m["role"], int(m["h"]) if m["h"] else None
        if role == "v":
            assert moved[(x, x)] == set(), block.name
        else:
            assert moved[(x, x)] == {head}, block.name
            assert moved[(zero, x)] == (set() if role == "q" else {head}), block.name
        checked += 1
    assert checked == 9  # q.h0 .. q.h3, k.h0 .. k.h3, v


# -- block spectra against dense float64 Hessians ---------------------------------------------


class _Encoder(nn.Module):
    """Token classifier on torch's nn.TransformerEncoder (2 pre-norm layers, 4 heads)."""

    def __init__(self, seed: int = 0, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, d))
        layer = nn.TransformerEncoderLayer(
            d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d, CLASSES)
        self.double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.enc(self.emb(ids) + self.pos).mean(1))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class _ResNet(nn.Module):
    """A small ResNet (stem, two basic blocks, one downsampling; BatchNorm in train mode)."""

    def __init__(self, seed: int = 0, c: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.layers = nn.Sequential(_BasicBlock(c, c, 1), _BasicBlock(c, 2 * c, 2))
        self.fc = nn.Linear(2 * c, CLASSES)
        self.double()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(F.relu(self.bn(self.stem(images)))).mean((2, 3)))


@dataclass(frozen=True)
class Probed:
    """A model, its forward inputs, and its loss through any forward with its signature."""

    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    loss_of: Callable[[Any], torch.Tensor]

    def probe(self) -> torch.Tensor:
        return self.loss_of(self.model(*self.args, **self.kwargs))


def _probed(name: str, seed: int = 0) -> Probed:
    """``name``'s model and probe; ``seed`` draws torch's encoder's and the ResNet's
    initialisation and batch (8 token sequences, or 8 images of 3 x 8 x 8)."""
    gen = torch.Generator().manual_seed(100 + seed)
    labels = torch.randint(0, CLASSES, (8,), generator=gen)
    if name == "encoder":
        tokens = torch.randint(0, VOCAB, (8, SEQ), generator=gen)
        return Probed(_Encoder(seed), (tokens,), {}, lambda out: F.cross_entropy(out, labels))
    if name == "resnet":
        images = torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64)
        model = _ResNet(seed).train()
        return Probed(model, (images,), {}, lambda out: F.cross_entropy(out, labels))
    arch = ARCHS[name]
    inputs = arch.inputs()
    return Probed(_model(arch), (), inputs, lambda out: arch.loss(out, inputs))


# Small blocks of each model (Lanczos runs as many steps as the largest has coordinates).
DENSE_BLOCKS = {
    "gpt2-cross": [
        "transformer.h.0.attn.c_attn.weight.k.h1",
        "transformer.h.0.crossattention.c_attn.bias.v",
        "transformer.h.0.crossattention.q_attn.bias",
    ],
    "bert": ["bert.encoder.layer.0.attention.self.query.weight.h0", "classifier.weight"],
    "llama-gqa": ["model.layers.0.self_attn.k_proj.weight.h1", "model.norm.weight"],
    "phi3-gqa": [
        "model.layers.0.self_attn.qkv_proj.weight.k.h1",
        "model.layers.0.self_attn.qkv_proj.weight.q.h7",
    ],
    "gpt-neox": [
        "gpt_neox.layers.0.attention.query_key_value.weight.q.h1",
        "gpt_neox.layers.0.attention.query_key_value.bias.v",  # two slices, one per head
    ],
    "vit": ["vit.layers.0.attention.k_proj.weight.h0", "classifier.bias"],
    "encoder": [
        "enc.layers.1.self_attn.in_proj_weight.k.h3",
        "enc.layers.0.self_attn.in_proj_bias.q",
        "enc.layers.0.norm1.weight",
    ],
    "resnet": ["layers.1.bn1.weight", "fc.bias", "layers.0.bn2.bias"],
}


def _dense_eigenvalues(probed: Probed, block: blockopt.Block) -> torch.Tensor:
    """Eigenvalues of the exact Hessian of the loss over ``block``'s coordinates alone."""
    params = {p.param_name: p.param for p in block.parts}
    index: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for part in block.parts:
        ids = torch.arange(part.param.numel()).reshape(part.param.shape)
        index[part.param_name].append(part.view(ids).reshape(-1))
    flat = {n: torch.cat(v) for n, v in index.items()}
    x0 = torch.cat([params[n].detach().reshape(-1)[flat[n]] for n in params])

    def loss(x: torch.Tensor) -> torch.Tensor:
        values, start = {}, 0
        for n, p in params.items():
            size = len(flat[n])
            full = p.detach().reshape(-1).index_put((flat[n],), x[start : start + size])
            values[n] = full.reshape(p.shape)
            start += size
        out = functional_call(probed.model, values, probed.args, probed.kwargs)
        return probed.loss_of(out)

    with sdpa_kernel(SDPBackend.MATH):  # the one attention kernel with a second derivative
        hessian = torch.autograd.functional.hessian(loss, x0, vectorize=True)
    return torch.linalg.eigvalsh(hessian)


@pytest.mark.parametrize("name", sorted(DENSE_BLOCKS))
def test_block_spectra_match_dense_hessians(name):
    probed = _probed(name)
    blocks = {b.name: b for b in _partition(probed.model, "head")}
    chosen = [blocks[n] for n in DENSE_BLOCKS[name]]
    steps = max(40, *(b.numel for b in chosen))  # at least numel steps: exact extremes
    assert steps <= 64
    spectra = blockopt.block_spectra(probed.model, probed.probe, blocks=chosen, steps=steps)
    for block in chosen:
        e = _dense_eigenvalues(probed, block)
        s = spectra[block.name]
        # 1e-8 of the block, above the float64 round-off of products whose terms are O(1)
        tol = 1e-8 * e.abs().max().item() + 1e-11
        assert e.abs().max() > 1e-10, block.name  # a block with curvature, not round-off
        assert abs(s.lambda_max - e[-1].item()) <= tol, (block.name, s.lambda_max, e[-1])
        assert abs(s.lambda_min - e[0].item()) <= tol, (block.name, s.lambda_min, e[0])


# -- heterogeneity: Transformers above the ResNet ---------------------------------------------


def _spread(name: str, seed: int = 0) -> float:
    probed = _probed(name, seed)
    spectra = blockopt.block_spectra(probed.model, probed.probe, "tensor", steps=20, tol=0.05)
    return blockopt.heterogeneity(spectra).spread


def test_heterogeneity_orders_transformers_above_the_resnet():
    """On a batch of tokens or images with a cross-entropy loss, at initialisation, the
    Transformers' blockwise curvature scales spread over more decades than the ResNet's.
    Measured: the transformers models (std-0.02 initialisation, whose Q and K blocks are nearly
    flat) 4.6-7 decades; torch's encoder (Xavier initialisation) 1.21-1.27 and the ResNet
    0.72-0.97 on these three seeds (1.0-1.8 and 0.6-1.1 over more), so those two are compared on
    the mean of three seeds of initialisation and batch."""
    resnet = [_spread("resnet", seed) for seed in range(3)]
    encoder = [_spread("encoder", seed) for seed in range(3)]
    transformers_ = {name: _spread(name) for name in ARCHS}
    assert max(resnet) < 1.5, resnet
    assert min(transformers_.values()) > max(resnet) + 3.0, (resnet, transformers_)
    assert sum(encoder) / 3 > sum(resnet) / 3 + 0.25, (encoder, resnet)


def test_resnet_partition_is_one_block_per_tensor():
    model = _ResNet()
    for strategy in ("tensor", "head"):
        blocks = _partition(model, strategy)
        assert [b.name for b in blocks] == [n for n, _ in model.named_parameters()]
        assert all(len(b.parts) == 1 and b.parts[0].dim is None for b in blocks)
