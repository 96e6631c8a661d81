"""Where the parts and heads of attention projections lie: read from the model, or given.

:func:`blockopt.partition` cuts fused attention projections into their Q, K and V parts and, for
strategy ``"head"``, the Q and K projections into heads. This module finds the projections (by
attribute name), reads head counts and head size from the attention module or its ``config``,
knows the fused layouts of the codes that do not stack [Q; K; V] whole, and checks each layout
against the tensor's size. What it cannot establish it leaves whole and reports; an
:class:`AttentionLayout` the caller gives overrides all of it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentionLayout", "LayoutWarning", "Split", "find_splits"]

# Attribute names of fused projections, whose output stacks Q, K and V (or K and V).
_FUSED_NAMES = re.compile(
    r"^(qkv|qkv_proj|c_attn|in_proj|wqkv|w_qkv|to_qkv|query_key_value|w_pack|qkv_linear|att_proj)$",
    re.IGNORECASE,
)
# Attribute names of separate query, key and value projections.
_ROLE_NAMES = {
    "q": re.compile(r"^(q|q_proj|query|query_proj|wq|w_q|to_q|q_lin|q_attn)$", re.IGNORECASE),
    "k": re.compile(r"^(k|k_proj|key|key_proj|wk|w_k|to_k|k_lin)$", re.IGNORECASE),
    "v": re.compile(r"^(v|v_proj|value|value_proj|wv|w_v|to_v|v_lin)$", re.IGNORECASE),
}
# Class names of attention modules. ``in_proj`` is also the input projection of Mamba mixers and
# short convolutions, so it counts as a fused projection only in a class named like this.
_ATTENTION_CLASS = re.compile(r"attention|attn|selfatt|mha|mhsa|multihead", re.IGNORECASE)
# Where head counts and sizes live: on the attention module first, then on its ``config``.
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "nhead", "heads")
_KV_HEAD_ATTRS = (
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "n_kv_head",
    "kv_heads",
    "n_head_kv",
    "multi_query_group_num",
)
_HEAD_DIM_ATTRS = (
    "head_dim",
    "qk_head_dim",
    "attention_head_size",
    "head_size",
    "key_value_proj_dim",
    "d_head",
    "dim_head",
    "d_kv",
    "kv_channels",
)


class LayoutWarning(UserWarning):
    """Attention that :func:`blockopt.partition` cannot split: its projections stay whole."""


@dataclass(frozen=True)
class AttentionLayout:
    """How an attention module's projections hold its heads, for ``partition(layouts=...)``.

    - ``heads``: the number of query heads.
    - ``kv_heads``: the number of key and value heads (grouped-query or multi-query attention);
      ``None`` for as many as ``heads``.
    - ``head_dim``: the width of one head; ``None`` for the tensor's size over its head count.
    - ``parts``: what a fused projection holds along its output dimension, in order: ``"qkv"``
      for [Q; K; V], ``"kv"`` for a cross-attention's [K; V], ``"qvk"`` for CodeGen's order. For
      a layout keyed to one projection module, ``"q"``, ``"k"`` or ``"v"`` says which it is.
    - ``groups``: how many times the parts repeat along the output: 1 for the parts stacked whole
      (GPT-2, Phi-3), ``heads`` for [q0; k0; v0; q1; k1; v1; ...] (GPT-NeoX, Bloom), ``kv_heads``
      for one [queries; k; v] run per key/value group (Falcon). Each run holds
      ``heads / groups`` query heads and ``kv_heads / groups`` key and value heads.
    - ``out_dim``: the weight's output dimension; ``None`` for 1 on Hugging Face ``Conv1D``
      (weights stored (in, out)), else 0. Biases are cut along their only dimension.
    """

    heads: int
    kv_heads: int | None = None
    head_dim: int | None = None
    parts: str = "qkv"
    groups: int = 1
    out_dim: int | None = None

    def __post_init__(self) -> None:
        for label in ("heads", "kv_heads", "head_dim", "groups"):
            value = getattr(self, label)
            optional = label in ("kv_heads", "head_dim")
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                none = " or None" if optional else ""
                raise ValueError(
                    f"AttentionLayout.{label} must be a positive int{none}, got {value!r}"
                )
        parts = self.parts
        if not isinstance(parts, str) or not parts or set(parts) - set("qkv"):
            raise ValueError(
                "AttentionLayout.parts must be the letters q, k, v in the order the projection "
                f"holds them ('qkv', 'kv', 'q', ...), got {parts!r}"
            )
        if len(set(parts)) != len(parts):
            raise ValueError(f"AttentionLayout.parts names a part twice: {parts!r}")
        if self.out_dim not in (None, 0, 1):
            raise ValueError(f"AttentionLayout.out_dim must be None, 0 or 1, got {self.out_dim!r}")
        for tag in parts:
            count = self.heads if tag == "q" else self.kv_heads or self.heads
            if count % self.groups:
                raise ValueError(
                    f"AttentionLayout(groups={self.groups}) does not divide its {count} {tag} "
                    "heads: each run of the parts must hold whole heads"
                )


@dataclass(frozen=True)
class Split:
    """How to cut one parameter tensor along ``dim``: ``parts`` (``counts[i]`` heads of ``width``
    each), repeated in ``groups`` runs. ``fused`` is False for a lone Q or K projection, and
    ``headed`` False for equal [Q; K; V] thirds whose heads are unknown."""

    dim: int
    parts: str
    counts: tuple[int, ...]
    width: int
    groups: int = 1
    fused: bool = True
    headed: bool = True

    def _runs(self, tag: str) -> Iterator[tuple[int, int]]:
        """(start, heads) of part ``tag`` in each run, in tensor order."""
        per_run = [c // self.groups for c in self.counts]
        stride = sum(per_run) * self.width
        index = self.parts.index(tag)
        offset = sum(per_run[:index]) * self.width
        for g in range(self.groups):
            yield g * stride + offset, per_run[index]

    def spans(self, tag: str) -> list[tuple[int, int]]:
        """The ``[start, stop)`` ranges that hold part ``tag``, one per run."""
        return [(start, start + n * self.width) for start, n in self._runs(tag)]

    def head_spans(self, tag: str) -> list[tuple[int, int]]:
        """The ``[start, stop)`` range of each head of part ``tag``, in head order."""
        return [
            (start + i * self.width, start + (i + 1) * self.width)
            for start, n in self._runs(tag)
            for i in range(n)
        ]


@dataclass(frozen=True)
class _Heads:
    """Head counts and head size read from a module; ``None`` where it does not say."""

    heads: int | None
    kv_heads: int | None
    head_dim: int | None


@dataclass(frozen=True)
class _Projection:
    """A projection tensor: its parameter name, attribute name and role (``"fused"``, ``"q"``,
    ``"k"`` or ``"v"``), the dimension its outputs lie along, and its inputs (None for a bias)."""

    param_name: str
    param: torch.Tensor
    attr: str
    role: str
    dim: int
    in_features: int | None

    @property
    def size(self) -> int:
        return self.param.shape[self.dim]


class _Unfit(Exception):
    """Why a layout does not fit a tensor, or cannot be established."""


def find_splits(
    model: nn.Module,
    *,
    per_head: bool,
    layouts: Sequence[tuple[str, AttentionLayout]] = (),
) -> tuple[dict[str, Split], list[str]]:
    """Parameter name -> :class:`Split` for the attention projections of ``model``, and one
    message per kind of attention module that could not be split (for a :class:`LayoutWarning`).

    Fused projections are split always, lone Q and K projections only when ``per_head``.
    ``layouts`` pairs a module path, or a regex that ``re.fullmatch``-es paths, with the layout
    of that attention module or projection module; the first matching key wins, modules inside
    a matched one are left to its layout, and a layout that does not fit raises ``ValueError``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    compiled = _compile(layouts)
    used: set[str] = set()
    user: dict[str, Split] = {}
    claimed: list[str] = []
    for path, module in model.named_modules():
        if any(not c or path.startswith(f"{c}.") for c in claimed):
            continue
        match = next(((k, lay) for k, rx, lay in compiled if rx.fullmatch(path)), None)
        if match is not None:
            used.add(match[0])
            claimed.append(path)
            user.update(_user_splits(path, module, match[1], match[0], names, per_head))
    unused = [key for key, _, _ in compiled if key not in used]
    if unused:
        raise ValueError(
            f"layouts key(s) {unused} match no module of {type(model).__name__}; keys are module "
            "paths, or regexes that re.fullmatch them, such as "
            f"{_attention_paths(model)[:3] or ['layers.0.attn']}: fix or drop them"
        )

    splits: dict[str, Split] = {}
    problems: dict[tuple[str, str], list[str]] = {}
    for path, module in model.named_modules():
        if any(not c or path == c or path.startswith(f"{c}.") for c in claimed):
            continue
        projections = [p for p in _projections(module, names) if p.param_name not in user]
        if not projections:
            continue
        found, why = _auto_splits(module, projections, per_head)
        splits.update(found)
        for reason in why:
            problems.setdefault((type(module).__name__, reason), []).append(path)
    splits.update(user)
    return splits, [_message(cls, why, paths) for (cls, why), paths in problems.items()]


def _compile(
    layouts: Sequence[tuple[str, AttentionLayout]],
) -> list[tuple[str, re.Pattern[str], AttentionLayout]]:
    """The layouts with their keys compiled (checked by :func:`blockopt.partition`)."""
    return [(key, re.compile(key), layout) for key, layout in layouts]


# -- the projections of a module -------------------------------------------------------------


def _projections(module: nn.Module, names: dict[int, str]) -> list[_Projection]:
    """The Q, K, V and fused projection tensors ``module`` holds, recognised by name."""
    if isinstance(module, nn.MultiheadAttention):
        found = []
        for attr, role in (
            ("in_proj_weight", "fused"),
            ("q_proj_weight", "q"),
            ("k_proj_weight", "k"),
            ("v_proj_weight", "v"),
            ("in_proj_bias", "fused"),
        ):
            p = getattr(module, attr, None)
            if isinstance(p, torch.Tensor) and id(p) in names:
                inputs = p.shape[1] if p.dim() == 2 else None
                found.append(_Projection(names[id(p)], p, attr, role, 0, inputs))
        return found
    attention = _is_attention_class(module)
    found = []
    for attr, child in module.named_children():
        role = _role(attr, attention)
        if role is not None:
            found.extend(_tensors(child, attr, role, None, names))
    return found


def _role(attr: str, attention_class: bool) -> str | None:
    if _FUSED_NAMES.match(attr) and (attr.lower() != "in_proj" or attention_class):
        return "fused"
    return next((role for role, rx in _ROLE_NAMES.items() if rx.match(attr)), None)


def _tensors(
    child: nn.Module, attr: str, role: str, out_dim: int | None, names: dict[int, str]
) -> list[_Projection]:
    """A projection module's 2-D weight and 1-D bias (parameters of the model only)."""
    weight = getattr(child, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or id(weight) not in names:
        return []
    if out_dim is None:  # nn.Linear stores (out, in); Hugging Face's GPT-2 Conv1D (in, out)
        out_dim = 1 if type(child).__name__ == "Conv1D" else 0
    found = [_Projection(names[id(weight)], weight, attr, role, out_dim, weight.shape[1 - out_dim])]
    bias = getattr(child, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 1 and id(bias) in names:
        found.append(_Projection(names[id(bias)], bias, attr, role, 0, None))
    return found


def _is_attention_class(module: nn.Module) -> bool:
    return any(
        _ATTENTION_CLASS.search(c.__name__)
        for c in type(module).__mro__
        if c not in (nn.Module, object)
    )


def _attention_paths(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if n and (isinstance(m, nn.MultiheadAttention) or _is_attention_class(m))
    ]


# -- head counts -----------------------------------------------------------------------------


def _int_attr(obj: object, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _read_heads(module: nn.Module) -> _Heads:
    """Head count, key/value head count and head size from ``module``, then its ``config``."""
    if isinstance(module, nn.MultiheadAttention):
        return _Heads(module.num_heads, module.num_heads, module.head_dim)
    config = getattr(module, "config", None)
    sources = [module] if config is None or isinstance(config, nn.Module) else [module, config]
    heads = next((h for s in sources if (h := _int_attr(s, _HEAD_ATTRS))), None)
    kv = None
    for source in sources:
        kv = _int_attr(source, _KV_HEAD_ATTRS)
        groups = _int_attr(source, ("num_key_value_groups",))
        if kv is None and groups and heads and heads % groups == 0:
            kv = heads // groups
        if kv is None and getattr(source, "multi_query", None) is True:
            kv = 1
        if kv is not None:
            break
    head_dim = next((d for s in sources if (d := _int_attr(s, _HEAD_DIM_ATTRS))), None)
    return _Heads(heads, kv, head_dim)


def _no_heads(module: nn.Module) -> str:
    return (
        f"no head count: none of {', '.join(_HEAD_ATTRS)} is a positive int on "
        f"{type(module).__name__} or its config"
    )


# -- the fused layouts of specific codes -----------------------------------------------------


def _per_head(module: nn.Module, heads: int) -> AttentionLayout:
    """[q0; k0; v0; q1; k1; v1; ...]: the output viewed as (heads, 3 * head_dim)."""
    return AttentionLayout(heads, heads, groups=heads)


def _falcon(module: nn.Module, heads: int) -> AttentionLayout:
    """Falcon: a [queries; k; v] run per key/value group in the new decoder architecture,
    [Q; k; v] with one key/value head under multi-query, else per head."""
    if getattr(module, "new_decoder_architecture", False):
        kv = _int_attr(module, ("num_kv_heads",)) or heads
        return AttentionLayout(heads, kv, groups=kv)
    if getattr(module, "multi_query", False):
        return AttentionLayout(heads, 1)
    return _per_head(module, heads)


def _bigcode(module: nn.Module, heads: int) -> AttentionLayout:
    """GPT-BigCode: [Q; k; v] with one key/value head under multi-query, else per head."""
    if getattr(module, "is_cross_attention", False):
        raise _Unfit(
            "its cross-attention forward splits c_attn's 2 * embed_dim outputs into "
            "(head_dim, head_dim), which is a layout only with one head"
        )
    if getattr(module, "multi_query", False):
        return AttentionLayout(heads, 1)
    return _per_head(module, heads)


def _codegen(module: nn.Module, heads: int) -> AttentionLayout:
    """CodeGen: ``mp_num`` runs of [queries; values; keys], its model-parallel shards."""
    return AttentionLayout(heads, heads, parts="qvk", groups=_int_attr(module, ("mp_num",)) or 4)


# Class name (or a base's) -> the layout of its fused projection, for the codes that do not
# stack [Q; K; V] whole, as read from each model's forward in transformers.
_CLASS_RULES: dict[str, Callable[[nn.Module, int], AttentionLayout]] = {
    "GPTNeoXAttention": _per_head,
    "GPTNeoXJapaneseAttention": _per_head,
    "PersimmonAttention": _per_head,
    "BloomAttention": _per_head,
    "DisentangledSelfAttention": _per_head,  # DeBERTa's in_proj
    "MiniMaxLightningAttention": _per_head,
    "FalconAttention": _falcon,
    "GPTBigCodeAttention": _bigcode,
    "CodeGenAttention": _codegen,
}


def _class_rule(module: nn.Module) -> Callable[[nn.Module, int], AttentionLayout] | None:
    return next(
        (_CLASS_RULES[c.__name__] for c in type(module).__mro__ if c.__name__ in _CLASS_RULES),
        None,
    )


# -- fitting layouts to tensors --------------------------------------------------------------


def _fit(proj: _Projection, layout: AttentionLayout) -> Split:
    """The :class:`Split` of ``proj`` under ``layout``, or :class:`_Unfit` saying why not."""
    fused = proj.role == "fused"
    parts = layout.parts if fused else proj.role
    kv = layout.kv_heads or layout.heads
    counts = tuple(layout.heads if t == "q" else kv for t in parts)
    total = sum(counts)
    terms = " + ".join(str(c) for c in counts)
    width = layout.head_dim
    if width is None:
        if proj.size % total:
            raise _Unfit(
                f"its {proj.size} outputs are not {terms} = {total} heads ({parts}) of one width"
            )
        width = proj.size // total
    if total * width != proj.size:
        raise _Unfit(
            f"{terms} = {total} heads ({parts}) of {width} make {total * width} outputs, "
            f"it has {proj.size}"
        )
    return Split(proj.dim, parts, counts, width, layout.groups if fused else 1, fused)


def _user_splits(
    path: str,
    module: nn.Module,
    layout: AttentionLayout,
    key: str,
    names: dict[int, str],
    per_head: bool,
) -> dict[str, Split]:
    """The splits a user layout gives ``module``: an attention module, or one projection."""
    where = f"{path or '(root)'!r} ({type(module).__name__}, layouts key {key!r})"
    role = "fused" if len(layout.parts) > 1 else layout.parts
    projections = _tensors(module, path.rpartition(".")[2], role, layout.out_dim, names)
    if not projections:
        projections = [
            p if layout.out_dim is None or p.in_features is None else _along(p, layout.out_dim)
            for p in _projections(module, names)
        ]
    if not projections:
        children = [n for n, _ in module.named_children()] or ["none"]
        raise ValueError(
            f"the layout for {where} finds no projection to split: the module has no 2-D weight "
            f"of its own, and none of its children ({', '.join(children[:8])}) is named like a "
            "Q, K, V or fused QKV projection; key the layout to the projection module itself, "
            "with parts= saying what it holds"
        )
    splits = {}
    for proj in projections:
        if proj.role != "fused" and not (per_head and proj.role in "qk" and proj.in_features):
            continue  # a lone projection is cut only per head, and V never
        try:
            splits[proj.param_name] = _fit(proj, layout)
        except _Unfit as err:
            raise ValueError(
                f"{layout} does not fit {proj.param_name} of {where}, shape "
                f"{tuple(proj.param.shape)} cut along dim {proj.dim}: {err}. Fix heads, kv_heads, "
                "head_dim or parts (parts='kv' for a cross-attention [K; V]; out_dim=1 for a "
                "weight stored (in, out))"
            ) from None
    return splits


def _along(proj: _Projection, dim: int) -> _Projection:
    return dataclasses.replace(proj, dim=dim, in_features=proj.param.shape[1 - dim])


def _auto_splits(
    module: nn.Module, projections: list[_Projection], per_head: bool
) -> tuple[dict[str, Split], list[str]]:
    """The splits of ``module``'s projections from what it says about its heads, and the
    reasons for those it leaves whole."""
    info = _read_heads(module)
    roles = {p.role for p in projections}
    splits: dict[str, Split] = {}
    problems: list[str] = []
    fused = [p for p in projections if p.role == "fused"]
    if fused:
        try:
            layout = _fused_layout(module, info, roles, fused)
            for proj in fused:
                splits[proj.param_name] = _thirds(proj) if layout is None else _fit(proj, layout)
            if layout is None and per_head:
                problems.append(
                    f"{fused[0].attr}: {_no_heads(module)}, so its Q and K thirds are not split "
                    "per head"
                )
        except _Unfit as err:
            for proj in fused:
                splits.pop(proj.param_name, None)
            problems.append(f"{fused[0].attr}: {err}")
    lone = [p for p in projections if p.role in "qk" and p.in_features is not None]
    if not (per_head and lone) or not ({"q", "k"} <= roles or _is_attention_class(module)):
        return splits, problems  # no per-head split wanted, or a stray child named q or key
    if info.heads is None:
        names = "/".join(p.attr for p in lone if p.in_features is not None)
        return splits, [*problems, f"{names}: {_no_heads(module)}, so they are not split per head"]
    query = next((p for p in lone if p.role == "q"), None)
    width = info.head_dim
    if width is None and query is not None and query.size % info.heads == 0:
        width = query.size // info.heads
    for proj in lone:
        kv = info.kv_heads
        if proj.role == "k" and kv is None and width and proj.size % width == 0:
            kv = proj.size // width
        try:
            splits[proj.param_name] = _fit(proj, AttentionLayout(info.heads, kv, width))
        except _Unfit as err:
            problems.append(f"{proj.attr}: {err}")
    return splits, problems


def _fused_layout(
    module: nn.Module, info: _Heads, roles: set[str], fused: list[_Projection]
) -> AttentionLayout | None:
    """The layout of ``module``'s fused projection; ``None`` for equal [Q; K; V] thirds when no
    head count is known (only for a square projection: three times as many outputs as inputs)."""
    attr = fused[0].attr
    if isinstance(module, nn.MultiheadAttention):  # in_proj_bias is [Q; K; V] even without
        return AttentionLayout(module.num_heads, head_dim=module.head_dim)  # in_proj_weight
    rule = _class_rule(module)
    if rule is None and attr.lower() == "query_key_value":
        raise _Unfit(
            "a query_key_value projection has no one layout (GPT-NeoX and Bloom interleave Q, K "
            f"and V per head, ChatGLM stacks them whole) and blockopt does not know "
            f"{type(module).__name__}'s"
        )
    if info.heads is None:
        weight = next((p for p in fused if p.in_features is not None), None)
        square = weight is not None and weight.size == 3 * weight.in_features
        if rule is None and square and "q" not in roles:
            return None
        raise _Unfit(_no_heads(module))
    if rule is not None:
        try:
            layout = rule(module, info.heads)
        except ValueError as err:
            raise _Unfit(str(err)) from None
        return dataclasses.replace(layout, head_dim=info.head_dim)
    parts = "kv" if "q" in roles else "qkv"  # a separate query: [K; V] (GPT-2 cross-attention)
    return AttentionLayout(info.heads, info.kv_heads, info.head_dim, parts)


def _thirds(proj: _Projection) -> Split:
    if proj.size % 3:
        raise _Unfit(f"its {proj.size} outputs do not split into three equal parts")
    return Split(proj.dim, "qkv", (1, 1, 1), proj.size // 3, headed=False)


# -- messages --------------------------------------------------------------------------------


def _message(cls: str, why: str, paths: list[str]) -> str:
    shown = ", ".join(p or "(root)" for p in paths[:3])
    shown += f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return (
        f"blockopt.partition cannot split the attention projections of {len(paths)} {cls} "
        f"module(s) ({shown}): {why}; what it cannot split is left whole. Give the layout: "
        f"layouts={{{_key(paths)!r}: blockopt.AttentionLayout(heads=..., kv_heads=..., "
        "head_dim=..., parts=...)} to partition(), or strategy=blockopt.Partition('head', "
        "layouts=...) where a strategy is taken"
    )


def _key(paths: list[str]) -> str:
    """A regex for all ``paths`` when they differ only in layer indices, else the first path."""
    patterns = {re.sub(r"(?:^|(?<=\\\.))\d+(?=\\\.|$)", r"\\d+", re.escape(p)) for p in paths}
    return patterns.pop() if len(patterns) == 1 else paths[0]
