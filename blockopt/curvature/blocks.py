"""Split a model's trainable parameters into blocks: the diagonal Hessian blocks blockopt probes.

A block is one or more *parts*; a part is a whole parameter tensor or a contiguous slice of it
along one dimension (the Q, K or V third of a fused attention projection, or one head of Q).
Block names are stable dotted paths derived from ``model.named_parameters()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["STRATEGIES", "Block", "BlockPart", "Strategy", "partition"]

# Attribute names of fused [Q; K; V] projections stacked along the output dimension.
_FUSED_QKV_NAMES = re.compile(r"^(qkv|qkv_proj|c_attn|in_proj|wqkv|w_qkv|to_qkv)$", re.IGNORECASE)
# Attribute names of separate query / key projections (for per-head splits).
_QUERY_NAMES = re.compile(r"^(q|q_proj|query|wq|w_q|to_q|q_lin)$", re.IGNORECASE)
_KEY_NAMES = re.compile(r"^(k|k_proj|key|wk|w_k|to_k|k_lin)$", re.IGNORECASE)
_HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "n_head", "nhead", "heads", "num_attention_heads")
_QKV = ("q", "k", "v")


@dataclass(frozen=True)
class BlockPart:
    """A whole parameter (``dim is None``) or its slice ``[start, stop)`` along ``dim``."""

    param_name: str
    param: torch.Tensor = field(repr=False, compare=False)
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(self.param.shape)
        shape = list(self.param.shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part's coordinates inside ``tensor`` (shaped like the parameter), as a view."""
        if self.dim is None:
            return tensor
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True)
class Block:
    """A named group of parameter coordinates whose diagonal Hessian block is probed as one."""

    name: str
    parts: tuple[BlockPart, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The distinct parameter tensors this block touches, in order."""
        seen: dict[int, torch.Tensor] = {}
        for part in self.parts:
            seen.setdefault(id(part.param), part.param)
        return tuple(seen.values())


# The named partition strategies, in the order blockopt tries them when matching names.
STRATEGIES = ("tensor", "head", "module", "model")
Strategy = str | Callable[[str, torch.Tensor], "str | None"] | Mapping[str, str]


def partition(model: nn.Module, strategy: Strategy = "tensor") -> list[Block]:
    """Split ``model``'s trainable parameters into blocks.

    Strategies:

    - ``"tensor"`` (default): one block per parameter tensor, with fused attention projections
      (``nn.MultiheadAttention.in_proj_weight``/``in_proj_bias``, a Linear named ``qkv``,
      ``c_attn``, ``in_proj``, ``Wqkv`` ...) split into their Q, K and V thirds, named
      ``<param>.q``, ``<param>.k``, ``<param>.v``.
    - ``"head"``: as ``"tensor"``, and the Q and K weights further split per attention head
      (Adam-mini's principle), named ``<param>.q.h0``, ``<param>.q.h1``, ...
    - ``"module"``: one block per module that owns parameters directly.
    - ``"model"``: a single block holding every parameter (the full Hessian).
    - a callable ``(param_name, param) -> block name | None``: parameters mapped to the same name
      share a block; ``None`` leaves a parameter out.
    - a mapping ``{block name: regex}``: each parameter joins the first block whose regex
      ``re.search``-es its name; unmatched parameters get a block of their own.

    Frozen parameters (``requires_grad=False``) are skipped and tied parameters counted once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"partition() needs an nn.Module, got {type(model).__name__}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        total = sum(1 for _ in model.parameters())
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters: "
            + (
                f"all {total} of its parameters are frozen (requires_grad=False); unfreeze the "
                "ones to train (p.requires_grad_(True)) before handing the model to blockopt"
                if total
                else "it has no parameters at all; pass the module that holds the layers to "
                "train (the whole model, not a parameter-free layer or an empty container)"
            )
        )
    if isinstance(strategy, str):
        builders = {
            "tensor": lambda: _by_tensor(model, params, per_head=False),
            "head": lambda: _by_tensor(model, params, per_head=True),
            "module": lambda: _by_module(model, params),
            "model": lambda: [Block("model", tuple(BlockPart(n, p) for n, p in params))],
        }
        if strategy not in builders:
            raise ValueError(
                f"unknown partition strategy {strategy!r}; use one of {sorted(builders)}, "
                "a callable (name, param) -> block name, or a mapping {block name: regex}"
            )
        blocks = builders[strategy]()
    elif isinstance(strategy, Mapping):
        blocks = _by_regex(params, strategy)
    elif callable(strategy):
        blocks = _by_callable(params, strategy)
    else:
        raise TypeError(
            f"strategy must be a name, a callable or a mapping, got {type(strategy).__name__}"
        )
    if not blocks:
        raise ValueError("the partition strategy left out every parameter; no blocks to probe")
    return blocks


def _group(named: Iterable[tuple[str, BlockPart]]) -> list[Block]:
    groups: dict[str, list[BlockPart]] = {}
    for name, part in named:
        groups.setdefault(name, []).append(part)
    return [Block(name, tuple(parts)) for name, parts in groups.items()]


def _by_callable(
    params: list[tuple[str, torch.Tensor]], fn: Callable[[str, torch.Tensor], str | None]
) -> list[Block]:
    named = []
    for n, p in params:
        block_name = fn(n, p)
        if block_name is None:
            continue
        if not isinstance(block_name, str) or not block_name:
            raise TypeError(
                f"the partition callable returned {block_name!r} for {n!r}; "
                "it must return a non-empty block name (str) or None to leave the parameter out"
            )
        named.append((block_name, BlockPart(n, p)))
    return _group(named)


def _by_regex(params: list[tuple[str, torch.Tensor]], mapping: Mapping[str, str]) -> list[Block]:
    compiled = []
    for block_name, pattern in mapping.items():
        try:
            compiled.append((block_name, re.compile(pattern)))
        except (re.error, TypeError) as err:
            raise ValueError(f"partition regex for block {block_name!r} is invalid: {err}") from err
    named = []
    for n, p in params:
        target = next((b for b, rx in compiled if rx.search(n)), n)
        named.append((target, BlockPart(n, p)))
    return _group(named)


def _by_module(model: nn.Module, params: list[tuple[str, torch.Tensor]]) -> list[Block]:
    trainable = {id(p) for _, p in params}
    names = {id(p): n for n, p in params}
    named = []
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in trainable:
                trainable.discard(id(p))  # tied parameters join the first module that owns them
                named.append((mod_name or "(root)", BlockPart(names[id(p)], p)))
    return _group(named)


def _by_tensor(
    model: nn.Module, params: list[tuple[str, torch.Tensor]], *, per_head: bool
) -> list[Block]:
    splits = _attention_splits(model)
    blocks: list[Block] = []
    for n, p in params:
        rule = splits.get(n)
        if rule is None:
            blocks.append(Block(n, (BlockPart(n, p),)))
            continue
        kind, dim, heads = rule
        if kind == "qkv":
            size = p.shape[dim] // 3
            for i, tag in enumerate(_QKV):
                start = i * size
                if per_head and tag in "qk" and heads and p.dim() > 1:
                    blocks.extend(_heads(n, p, dim, start, size, heads, f"{n}.{tag}"))
                else:
                    blocks.append(Block(f"{n}.{tag}", (BlockPart(n, p, dim, start, start + size),)))
        elif per_head and heads and p.dim() > 1:  # a separate query or key weight
            blocks.extend(_heads(n, p, dim, 0, p.shape[dim], heads, n))
        else:
            blocks.append(Block(n, (BlockPart(n, p),)))
    return blocks


def _heads(
    n: str, p: torch.Tensor, dim: int, start: int, size: int, heads: int, prefix: str
) -> list[Block]:
    width = size // heads
    return [
        Block(f"{prefix}.h{h}", (BlockPart(n, p, dim, start + h * width, start + (h + 1) * width),))
        for h in range(heads)
    ]


def _attention_splits(model: nn.Module) -> dict[str, tuple[str, int, int | None]]:
    """Parameter name -> (kind, split dim, head count) for recognised attention projections.

    kind is ``"qkv"`` for a fused [Q; K; V] projection, ``"qk"`` for a separate Q or K weight.
    """
    rules: dict[str, tuple[str, int, int | None]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.MultiheadAttention):
            heads = module.num_heads
            if module.in_proj_weight is not None:
                rules[f"{prefix}in_proj_weight"] = ("qkv", 0, heads)
            if module.in_proj_bias is not None:
                rules[f"{prefix}in_proj_bias"] = ("qkv", 0, heads)
            if module.q_proj_weight is not None:
                rules[f"{prefix}q_proj_weight"] = ("qk", 0, heads)
                rules[f"{prefix}k_proj_weight"] = ("qk", 0, heads)
            continue
        for child_name, child in module.named_children():
            weight = getattr(child, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            heads = _head_count(module)
            # nn.Linear stores (out, in); Hugging Face's GPT-2 Conv1D stores (in, out).
            dim = 1 if type(child).__name__ == "Conv1D" else 0
            child_prefix = f"{prefix}{child_name}."
            if _FUSED_QKV_NAMES.match(child_name) and weight.shape[dim] % 3 == 0:
                if heads and (weight.shape[dim] // 3) % heads:
                    heads = None
                rules[f"{child_prefix}weight"] = ("qkv", dim, heads)
                if getattr(child, "bias", None) is not None:
                    rules[f"{child_prefix}bias"] = ("qkv", 0, heads)
            elif (
                (_QUERY_NAMES.match(child_name) or _KEY_NAMES.match(child_name))
                and heads
                and weight.shape[dim] % heads == 0
            ):
                rules[f"{child_prefix}weight"] = ("qk", dim, heads)
    return rules


def _head_count(module: nn.Module) -> int | None:
    for attr in _HEAD_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
