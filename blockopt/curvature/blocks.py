"""Split a model's trainable parameters into blocks: the diagonal Hessian blocks blockopt probes.

A block is one or more *parts*; a part is a whole parameter tensor or a contiguous slice of it
along one dimension (the Q, K or V part of a fused attention projection, or one head of Q).
Block names are stable dotted paths derived from ``model.named_parameters()``. Where attention
projections and their heads lie is :mod:`blockopt.curvature.layouts`' job.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from blockopt.curvature.layouts import AttentionLayout, LayoutWarning, Split, find_splits

__all__ = ["STRATEGIES", "Block", "BlockPart", "Partition", "Strategy", "partition"]


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
# The named strategies that cut attention projections, and so take layouts.
_LAYOUT_STRATEGIES = ("tensor", "head")


@dataclass(frozen=True)
class Partition:
    """Strategy ``"tensor"`` or ``"head"`` with attention ``layouts`` (see :func:`partition`), as
    one value that goes wherever a strategy does: ``BlockOptimizer(strategy=...)``,
    ``param_groups(strategy=...)``, ``block_spectra(blocks=...)``.

    ``layouts`` may be given as a mapping; it is kept as (key, layout) pairs, so the value is
    hashable. ``Partition(...)(model)`` is ``partition(model, Partition(...))``.
    """

    strategy: str = "tensor"
    layouts: Mapping[str, AttentionLayout] | tuple[tuple[str, AttentionLayout], ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in _LAYOUT_STRATEGIES:
            raise ValueError(
                f"Partition strategy must be one of {list(_LAYOUT_STRATEGIES)} (the ones that cut "
                f"attention projections), got {self.strategy!r}; pass other strategies as is"
            )
        object.__setattr__(self, "layouts", _layout_pairs(self.layouts))

    def __call__(self, model: nn.Module) -> list[Block]:
        return partition(model, self)


Strategy = str | Partition | Callable[[str, torch.Tensor], "str | None"] | Mapping[str, str]


def partition(
    model: nn.Module,
    strategy: Strategy = "tensor",
    *,
    layouts: Mapping[str, AttentionLayout] | None = None,
) -> list[Block]:
    """Split ``model``'s trainable parameters into blocks.

    Strategies:

    - ``"tensor"`` (default): one block per parameter tensor, with fused attention projections
      (``nn.MultiheadAttention.in_proj_weight``/``in_proj_bias``, a projection named ``qkv``,
      ``c_attn``, ``qkv_proj``, ``Wqkv``, ``query_key_value`` ...) split into their parts, named
      ``<param>.q``, ``<param>.k``, ``<param>.v`` (``.k`` and ``.v`` only for a cross-attention
      [K; V]). A part interleaved per head (GPT-NeoX, Bloom, Falcon) is one block of several
      slices.
    - ``"head"``: as ``"tensor"``, and the Q and K weights further split per attention head
      (Adam-mini's principle), named ``<param>.q.h0``, ``<param>.q.h1``, ... in a fused
      projection and ``<param>.h0``, ... in a separate one; keys get one block per key/value
      head under grouped-query attention.
    - ``"module"``: one block per module that owns parameters directly.
    - ``"model"``: a single block holding every parameter (the full Hessian).
    - a callable ``(param_name, param) -> block name | None``: parameters mapped to the same name
      share a block; ``None`` leaves a parameter out.
    - a mapping ``{block name: regex}``: each parameter joins the first block whose regex
      ``re.search``-es its name; unmatched parameters get a block of their own.
    - a :class:`Partition`: ``"tensor"`` or ``"head"`` with ``layouts``.

    Head counts, key/value head counts and head sizes are read from each attention module, then
    from its ``config`` (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``n_head``, ``num_heads``, ...), and every split is checked against the tensor's size.
    ``layouts`` maps a module path, or a regex that ``re.fullmatch``-es paths, to the
    :class:`AttentionLayout` of that attention module (or of one projection module), for
    attention blockopt cannot read or reads wrong; the first matching key wins. Attention that
    cannot be split is left whole with a :class:`LayoutWarning` naming it; a layout that does not
    fit its tensor, or a key that matches no module, raises ``ValueError``.

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
    _refuse_unsupported(model, params)
    if isinstance(strategy, Partition):
        if layouts is not None:
            raise TypeError(
                "layouts were given both in the Partition and to partition(); give them in one "
                "place"
            )
        strategy, pairs = strategy.strategy, strategy.layouts
    else:
        pairs = _layout_pairs(layouts or {})
    if pairs and strategy not in _LAYOUT_STRATEGIES:
        raise ValueError(
            f"layouts apply to the strategies {list(_LAYOUT_STRATEGIES)}, which cut attention "
            f"projections; strategy {_label(strategy)} does not: drop layouts or use one of them"
        )
    problems: list[str] = []
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown partition strategy {strategy!r}; use one of {sorted(STRATEGIES)}, "
                "a callable (name, param) -> block name, a mapping {block name: regex}, "
                "or a blockopt.Partition"
            )
        if strategy in _LAYOUT_STRATEGIES:
            blocks, problems = _by_tensor(model, params, per_head=strategy == "head", layouts=pairs)
        elif strategy == "module":
            blocks = _by_module(model, params)
        else:
            blocks = [Block("model", tuple(BlockPart(n, p) for n, p in params))]
    elif isinstance(strategy, Mapping):
        blocks = _by_regex(params, strategy)
    elif callable(strategy):
        blocks = _by_callable(params, strategy)
    else:
        raise TypeError(
            f"strategy must be a name, a callable or a mapping, got {type(strategy).__name__} "
            "(or a blockopt.Partition: a name with attention layouts)"
        )
    for message in problems:
        warnings.warn(message, LayoutWarning, stacklevel=2)
    if not blocks:
        raise ValueError("the partition strategy left out every parameter; no blocks to probe")
    return blocks


def _refuse_unsupported(model: nn.Module, params: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse trainable parameters that Hessian-vector products and blockopt's modes cannot
    handle, naming the first: complex or integer ones, and sparse embeddings' weights."""
    for name, p in params:
        if not p.dtype.is_floating_point:
            raise TypeError(
                f"parameter {name!r} is {str(p.dtype).removeprefix('torch.')}: blockopt probes "
                "the spectra of real Hessians and needs real floating-point parameters; keep "
                "a complex weight as a real one (torch.view_as_real) and build the complex "
                "tensor in forward() with torch.view_as_complex, or freeze it "
                "(requires_grad_(False))"
            )
        if p.layout != torch.strided:
            raise TypeError(
                f"parameter {name!r} is a {p.layout} tensor; blockopt needs dense (strided) "
                "parameters: convert it with .to_dense(), or freeze it (requires_grad_(False))"
            )
    sparse = {
        id(m.weight): path
        for path, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
    }
    for name, p in params:
        if id(p) in sparse:
            raise ValueError(
                f"parameter {name!r} belongs to {sparse[id(p)] or 'the model'}, an embedding "
                "with sparse=True: its sparse gradients have no Hessian-vector products, and "
                "Adam and block SGD do not take them; build it with sparse=False (the default), "
                "or freeze it (requires_grad_(False))"
            )


def _layout_pairs(
    layouts: Mapping[str, AttentionLayout] | Iterable[tuple[str, AttentionLayout]],
) -> tuple[tuple[str, AttentionLayout], ...]:
    """``layouts`` as (key, layout) pairs, each checked."""
    if isinstance(layouts, Mapping):
        items = list(layouts.items())
    elif isinstance(layouts, (tuple, list)) and all(
        isinstance(x, tuple) and len(x) == 2 for x in layouts
    ):
        items = list(layouts)
    else:
        raise TypeError(
            "layouts must be a mapping {module path or regex: blockopt.AttentionLayout}, got "
            f"{type(layouts).__name__}"
        )
    for key, layout in items:
        if not isinstance(key, str):
            raise TypeError(f"layouts keys must be module paths or regexes (str), got {key!r}")
        if not isinstance(layout, AttentionLayout):
            raise TypeError(
                f"layouts[{key!r}] must be a blockopt.AttentionLayout, got {type(layout).__name__}"
            )
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"layouts key {key!r} is not a valid regex: {err}") from err
    return tuple(items)


def _label(strategy: object) -> str:
    return repr(strategy) if isinstance(strategy, str) else f"<{type(strategy).__name__}>"


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
        target = next((b for b, rx in compiled if rx.search(n)), None)
        if target is None and n in mapping:  # unmatched, it keeps its own name: taken
            raise ValueError(
                f"parameter {n!r} matches no partition regex and so stays a block of its own, "
                f"under its own name; but {n!r} is also the name of a regex block (pattern "
                f"{mapping[n]!r}) and the two would merge. Rename that block, or make its "
                "pattern match the parameter"
            )
        named.append((n if target is None else target, BlockPart(n, p)))
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
    model: nn.Module,
    params: list[tuple[str, torch.Tensor]],
    *,
    per_head: bool,
    layouts: tuple[tuple[str, AttentionLayout], ...],
) -> tuple[list[Block], list[str]]:
    """One block per tensor, attention projections cut by their :class:`Split`; and the
    messages for attention left whole."""
    splits, problems = find_splits(model, per_head=per_head, layouts=layouts)
    blocks: list[Block] = []
    for n, p in params:
        split = splits.get(n)
        if split is None:
            blocks.append(Block(n, (BlockPart(n, p),)))
            continue
        heads = per_head and split.headed and p.dim() > 1
        for tag in split.parts if split.fused else ():
            prefix = f"{n}.{tag}"
            if heads and tag in "qk":
                blocks.extend(_heads(n, p, split, tag, prefix))
            else:
                parts = tuple(BlockPart(n, p, split.dim, a, b) for a, b in split.spans(tag))
                blocks.append(Block(prefix, parts))
        if not split.fused:
            blocks.extend(
                _heads(n, p, split, split.parts, n) if heads else [Block(n, (BlockPart(n, p),))]
            )
    return blocks, problems


def _heads(n: str, p: torch.Tensor, split: Split, tag: str, prefix: str) -> list[Block]:
    return [
        Block(f"{prefix}.h{h}", (BlockPart(n, p, split.dim, a, b),))
        for h, (a, b) in enumerate(split.head_spans(tag))
    ]
