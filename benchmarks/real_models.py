"""Real architectures nobody here wrote, on real data that ships with installed packages.

Each builder takes a seed and returns a :class:`RealModel`: the model (random init from that
seed, dropout off), ``batch(i)``, the ``i``-th training batch (a function of the seed and ``i``
only), ``loss(batch)``, a scalar loss through the model, two fixed training-size batches for a
probe and a held-out judge (``probe_batch``, ``holdout_batch``, drawn from the training data on
streams of their own) and a fixed evaluation set (``eval_batches``, from data no training batch
is drawn from). Two builders with one seed give identical models and batches.

- Language models, on the text of Python's own ``pydoc_data.topics`` as characters (vocabulary
  128; the last 10% of the text is the evaluation set): Hugging Face's ``GPT2LMHeadModel`` and
  ``LlamaForCausalLM`` (grouped-query attention, 4 query heads sharing 2 key/value heads) as
  next-character models, ``BertForMaskedLM`` as a masked model (127 characters plus a
  ``[MASK]`` token; per batch, 15% of the positions, drawn from the batch index, are
  predicted: 80% of them masked, 10% replaced by a random character, 10% kept).
- Vision models, on scikit-learn's 8x8 digits (the test split is the evaluation set): Hugging
  Face's ``ViTForImageClassification`` (2x2 patches, one channel), a classifier on torch's
  ``nn.TransformerEncoder`` (each image's 8 rows as 8 tokens of 8 pixels) and a small ResNet
  with BatchNorm (written here: torchvision is not installed).

The transformers models use ``attn_implementation="eager"``, whose attention has a second
derivative (blockopt probes with Hessian-vector products). Configs are tiny: a training step
takes a few milliseconds to a few tens of milliseconds on two CPU threads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blockopt.workloads.data import Corpus, Digits, digits, epoch_batches, text_corpus

__all__ = ["BUILDERS", "RealModel", "build", "resnet_digits"]

Batch = dict[str, torch.Tensor]

VOCAB = 128  # character vocabulary of the language models
CONTEXT = 32  # characters per sequence
LM_BATCH = 16
IMAGE_BATCH = 64
EVAL_BATCHES = 4  # batches in the evaluation set
EVAL_SHARE = 0.1  # the share of the text (its end) the language models are evaluated on
MASK_SHARE = 0.15  # BERT: share of positions predicted per sequence
IGNORE = -100  # cross-entropy's ignore_index: positions with no target

# streams of the per-batch generators, so that no two kinds of batch share random numbers
_TRAIN, _PROBE, _HOLDOUT, _EVAL, _MASK = range(5)


@dataclass
class RealModel:
    """One model and its task: ``batch(i)`` is training step ``i``'s batch, ``loss(batch)`` a
    scalar loss through ``model``; ``probe_batch`` and ``holdout_batch`` are fixed batches of the
    training size, drawn from the training data apart from ``batch``'s stream, and
    ``eval_batches`` the fixed evaluation set, from data no training batch is drawn from."""

    key: str
    title: str
    model: nn.Module
    batch: Callable[[int], Batch]
    loss: Callable[[Batch], torch.Tensor]
    probe_batch: Batch
    holdout_batch: Batch
    eval_batches: list[Batch]

    @property
    def parameters(self) -> int:
        """The number of trainable parameters (tied ones counted once)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def eval_loss(self) -> float:
        """The mean loss over the evaluation set, under ``torch.no_grad`` and ``model.eval()``;
        the model's train/eval mode is put back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                losses = [float(self.loss(b)) for b in self.eval_batches]
        finally:
            self.model.train(was_training)
        return sum(losses) / len(losses)


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A generator seeded from ``(seed, stream, index)`` alone, so that any batch can be drawn
    in any order."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# -- data ---------------------------------------------------------------------------------------


@cache
def _corpus(vocab: int) -> Corpus:
    return text_corpus(vocab)


@cache
def _digits() -> Digits:
    return digits(test_fraction=0.25, seed=0)


def _windows(tokens: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens, ``(n, length)``."""
    starts = torch.randint(0, len(tokens) - length, (n,), generator=g)
    return tokens[starts[:, None] + torch.arange(length)]


def _text_split(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus' tokens, split into the training text and the evaluation text (its end)."""
    tokens = _corpus(vocab).tokens
    cut = int(len(tokens) * (1 - EVAL_SHARE))
    return tokens[:cut], tokens[cut:]


def _lm_batch(tokens: torch.Tensor, seed: int, stream: int, i: int) -> Batch:
    """Next-character batch: ``input_ids`` and ``targets`` (the inputs shifted by one)."""
    w = _windows(tokens, LM_BATCH, CONTEXT + 1, _generator(seed, stream, i))
    return {"input_ids": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}


def _causal_lm(key: str, title: str, model: nn.Module, seed: int) -> RealModel:
    train, test = _text_split(VOCAB)

    def loss(b: Batch) -> torch.Tensor:
        logits = model(input_ids=b["input_ids"], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten())

    return RealModel(
        key,
        title,
        model,
        lambda i: _lm_batch(train, seed, _TRAIN, i),
        loss,
        _lm_batch(train, seed, _PROBE, 0),
        _lm_batch(train, seed, _HOLDOUT, 0),
        [_lm_batch(test, seed, _EVAL, k) for k in range(EVAL_BATCHES)],
    )


def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()  # tiny configs trip config sanity warnings
    return transformers


def gpt2(seed: int = 0) -> RealModel:
    """Hugging Face GPT-2 (2 layers, width 64, 4 heads, tied embeddings) as a character LM."""
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _causal_lm("gpt2", "GPT2LMHeadModel, pydoc_data text", tf.GPT2LMHeadModel(config), seed)


def llama(seed: int = 0) -> RealModel:
    """Hugging Face Llama (2 layers, width 64, 4 query heads sharing 2 key/value heads: grouped-
    query attention; RMSNorm, rotary positions, SwiGLU) as a character LM."""
    tf = _transformers()
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        attention_dropout=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    return _causal_lm("llama", "LlamaForCausalLM (GQA 4:2), pydoc_data text", model, seed)


def _masked(window: torch.Tensor, mask_id: int, g: torch.Generator) -> Batch:
    """BERT's masking of ``window`` ``(n, length)`` with generator ``g``: ``MASK_SHARE`` of the
    positions of each sequence are targets; of those 80% become ``[MASK]``, 10% a random
    character, 10% stay; every other position's label is ``IGNORE``."""
    n, length = window.shape
    picked = max(1, round(MASK_SHARE * length))
    order = torch.rand(n, length, generator=g).argsort(dim=1)[:, :picked]
    target = torch.zeros(n, length, dtype=torch.bool).scatter_(1, order, True)
    labels = torch.where(target, window, torch.full_like(window, IGNORE))
    fate = torch.rand(n, length, generator=g)
    inputs = window.clone()
    inputs[target & (fate < 0.8)] = mask_id
    swap = target & (fate >= 0.8) & (fate < 0.9)
    inputs[swap] = torch.randint(0, mask_id, (int(swap.sum()),), generator=g)
    return {"input_ids": inputs, "labels": labels}


def bert(seed: int = 0) -> RealModel:
    """Hugging Face BERT (2 layers, width 64, 4 heads) as a masked character LM: 127 characters
    and ``[MASK]``, predicting 15% of each sequence's positions."""
    tf = _transformers()
    mask_id = VOCAB - 1
    train, test = _text_split(VOCAB - 1)  # 127 characters; id 127 is [MASK]
    config = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=CONTEXT,
        type_vocab_size=1,
        pad_token_id=None,  # no padding here: every character's embedding trains
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = tf.BertForMaskedLM(config)

    def draw(tokens: torch.Tensor, stream: int, i: int) -> Batch:
        w = _windows(tokens, LM_BATCH, CONTEXT, _generator(seed, stream, i))
        return _masked(w, mask_id, _generator(seed, _MASK + stream, i))

    def loss(b: Batch) -> torch.Tensor:
        logits = model(input_ids=b["input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE)

    return RealModel(
        "bert",
        "BertForMaskedLM, pydoc_data text",
        model,
        lambda i: draw(train, _TRAIN, i),
        loss,
        draw(train, _PROBE, 0),
        draw(train, _HOLDOUT, 0),
        [draw(test, _EVAL, k) for k in range(EVAL_BATCHES)],
    )


# -- vision -------------------------------------------------------------------------------------


def _image_task(
    key: str,
    title: str,
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
) -> RealModel:
    """Digits classification: images ``(n, 1, 8, 8)`` in [0, 1] and labels."""
    d = _digits()
    x_train, x_test = d.x_train[:, None], d.x_test[:, None]

    def take(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Batch:
        return {"pixel_values": x[idx], "labels": y[idx]}

    order = epoch_batches(len(d.y_train), IMAGE_BATCH, generator=_generator(seed, _TRAIN, 0))
    fixed = torch.randperm(len(d.y_train), generator=_generator(seed, _PROBE, 0))
    probe_idx = fixed[:IMAGE_BATCH]
    holdout_idx = fixed[IMAGE_BATCH : 2 * IMAGE_BATCH]
    chunks = torch.arange(len(d.y_test)).tensor_split(EVAL_BATCHES)

    def loss(b: Batch) -> torch.Tensor:
        return F.cross_entropy(forward(b["pixel_values"]), b["labels"])

    return RealModel(
        key,
        title,
        model,
        lambda i: take(x_train, d.y_train, order(i)),
        loss,
        take(x_train, d.y_train, probe_idx),
        take(x_train, d.y_train, holdout_idx),
        [take(x_test, d.y_test, c) for c in chunks],
    )


def vit(seed: int = 0) -> RealModel:
    """Hugging Face ViT (image size 8, 2x2 patches, one channel, 2 layers, width 64, 4 heads) on
    digits."""
    tf = _transformers()
    config = tf.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = tf.ViTForImageClassification(config)
    return _image_task(
        "vit",
        "ViTForImageClassification, digits",
        model,
        lambda x: model(pixel_values=x).logits,
        seed,
    )


class RowTransformer(nn.Module):
    """A classifier on ``nn.TransformerEncoder``: an image's 8 rows as 8 tokens of 8 pixels, a
    learned position embedding, pre-norm encoder layers, mean pooling and a linear head."""

    def __init__(
        self, d_model: int = 64, n_heads: int = 4, layers: int = 2, n_classes: int = 10
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 8, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images.reshape(images.shape[0], 8, 8)) + self.pos
        return self.head(self.norm(self.encoder(tokens).mean(dim=1)))


def encoder(seed: int = 0) -> RealModel:
    """torch's ``nn.TransformerEncoder`` (2 layers, width 64, 4 heads) on digits, rows as
    tokens."""
    torch.manual_seed(seed)
    model = RowTransformer()
    return _image_task("encoder", "nn.TransformerEncoder, digits rows", model, model, seed)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BatchNorm layers and a shortcut (a 1x1 conv-BatchNorm
    when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 8x8 images: a 3x3 stem, basic blocks at widths 16, 32 and 64 (8x8,
    4x4, 2x2), global average pooling and a linear classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, cin = [], widths[0]
        for k, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if k == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(images)).mean(dim=(2, 3)))


def resnet_digits(seed: int = 0) -> RealModel:
    """The small ResNet with BatchNorm on digits."""
    torch.manual_seed(seed)
    model = ResNet()
    return _image_task("resnet", "ResNet (BatchNorm), digits", model, model, seed)


BUILDERS: dict[str, Callable[[int], RealModel]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "vit": vit,
    "encoder": encoder,
    "resnet": resnet_digits,
}


def build(key: str, seed: int = 0) -> RealModel:
    """The model ``key`` of :data:`BUILDERS`, built from ``seed``."""
    try:
        builder = BUILDERS[key]
    except KeyError:
        raise ValueError(f"unknown model {key!r}; models are {', '.join(BUILDERS)}") from None
    return builder(seed)
