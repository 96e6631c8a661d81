"""Per-block learning rates from blockwise spectra.

Rule: with ``rho_b`` a block's curvature scale (``max(|lambda_max|, |lambda_min|)``) and
``rho_max`` the largest among the blocks the heterogeneity score keeps, block ``b`` gets
``base_lr * clip(rho_max / rho_b, 1, max_factor)``. ``base_lr`` is the learning rate that suits
the stiffest block (what a tuned single learning rate is), and every other block is raised to the
same ``lr * rho`` product, so each block sits as close to its own stability limit as the
stiffest one does. The factor is bounded by ``max_factor`` (default 100) because curvature moves
during training.

Blocks the heterogeneity score leaves out (:func:`blockopt.heterogeneity`) get a factor that
never starves them:

- negligible curvature (below the round-off of their own products, or exactly zero): flatter
  than anything measurable, so ``max_factor``, what an included block that flat would get.
- unknown curvature (the probe's loss does not use them, their gradient has no graph, or their
  values are not finite): the parameter-weighted median factor of the included blocks (the
  smallest factor whose included blocks, counted from the smallest factor up, hold half the
  included parameters), the middle of what was measured; nothing says they are stiffer or
  flatter than the bulk.
- a slice of a tensor that other blocks slice too (``<param>.q``/``.k``/``.v``, per-head
  ``.h<i>``, named as :func:`blockopt.partition` names them), when some of those siblings are
  included: the smallest factor of the included siblings, whatever the reason it was left out.
  A param group holds whole tensors (:func:`param_groups`), so the tensor then trains at the
  rate its slices of real curvature call for: GPT-2's attention key bias is exactly zero
  (softmax ignores a shift common to all keys), and with a factor of its own it would set
  the rate of the whole fused ``c_attn.bias``.

With no included block at all there is nothing to scale against, and every factor is 1.

After a loss spike, a probe may lower a factor but not raise it (:func:`held_factors`): the
curvature read at a spike is that of a transient, and a factor raised on it feeds the next
spike (on the reference CNN, a spike's probe could lift a first-layer factor five-fold and keep
the loss spiking to the end of training).

Stability of SGD's learning rate: on a quadratic with curvature ``lambda``, ``torch.optim.SGD``
converges iff ``lr * lambda`` is below :func:`sgd_stability_limit` (``2 (1 + mu) / (1 - d)`` with
momentum ``mu`` and dampening ``d``; ``2 (1 + mu) / (1 + 2 mu)`` with Nesterov). In block SGD every
block's ``lr * factor_b * rho_b`` is at most ``lr * rho_max``, so the same bound applies to the
base learning rate. :func:`sgd_lr_cap` turns a measured ``rho_max`` into a cap for learning rates
that are far beyond that bound.

Keeping tuned learning rates without blockopt at run time: :func:`param_groups` turns the mapping
block name -> learning rate (from :func:`tune_block_lrs`, or the JSON that ``blockopt tune --out``
writes) into param groups for any ``torch.optim`` optimizer. A param group holds whole tensors, so
a tensor split into several blocks (the Q, K and V thirds of a fused projection, per-head blocks)
gets the smallest of its blocks' learning rates, with a warning naming what was lost.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from blockopt.analysis.heterogeneity import Heterogeneity, heterogeneity
from blockopt.curvature.blocks import STRATEGIES, Block, Partition, Strategy, partition
from blockopt.curvature.layouts import LayoutWarning
from blockopt.curvature.spectra import BlockSpectrum

__all__ = [
    "CAP_FRACTION",
    "DEFAULT_MAX_FACTOR",
    "KNOWN_STRATEGIES",
    "UNSTABLE_FACTOR",
    "block_lr_factors",
    "held_factors",
    "param_groups",
    "sgd_lr_cap",
    "sgd_stability_limit",
    "tune_block_lrs",
]

DEFAULT_MAX_FACTOR = 100.0
# A learning rate is capped only when ``lr * rho_max`` exceeds the stability limit this many
# times over. Neural networks often start somewhat beyond it and still train well, because their
# sharpness drops in the first steps (the reference CNN on digits: twice the limit at step 0 at
# its best grid learning rate), so only a gross excess is taken as certain divergence.
UNSTABLE_FACTOR = 10.0
# The cap puts ``lr * rho_max`` at this fraction of the limit. With heavy-ball momentum ``mu``
# every curvature with ``lr * lambda`` in ``((1 - sqrt(mu))^2, (1 + sqrt(mu))^2)`` (nearly the
# whole stable range) converges at the same rate ``sqrt(mu)``, so a larger lr only helps the
# flatter directions; the factor 2 covers the probe's estimate of rho_max (Lanczos approaches it
# from below, and the diagonal blocks ignore the coupling between blocks).
CAP_FRACTION = 0.5
# The partition strategies :func:`param_groups` tries, in this order, when none is given.
KNOWN_STRATEGIES = STRATEGIES
# How partition() names a slice of a tensor: ``.q``/``.k``/``.v``, then ``.h<i>`` for a head.
_SLICE_SUFFIX = re.compile(r"(\.[qkv])?(\.h\d+)?$")


def block_lr_factors(
    spectra: Mapping[str, BlockSpectrum], *, max_factor: float = DEFAULT_MAX_FACTOR
) -> dict[str, float]:
    """Block name -> learning-rate factor in ``[1, max_factor]``, for every block of ``spectra``,
    those the heterogeneity score leaves out included (see the module docstring)."""
    if not (math.isfinite(max_factor) and max_factor >= 1):
        raise ValueError(f"max_factor must be a finite number >= 1, got {max_factor!r}")
    return factors_of(heterogeneity(spectra), spectra, max_factor)


def factors_of(
    h: Heterogeneity, spectra: Mapping[str, BlockSpectrum], max_factor: float
) -> dict[str, float]:
    """:func:`block_lr_factors` from the score ``h`` already computed from ``spectra``: a probe
    that has scored its spectra takes its factors without scoring them again."""
    if not h.scales:
        return dict.fromkeys(spectra, 1.0)
    top = max(h.scales)
    measured = {name: min(max(top / rho, 1.0), max_factor) for name, rho in zip(h.blocks, h.scales)}
    middle = _weighted_median(
        [measured[name] for name in h.blocks], [spectra[name].numel for name in h.blocks]
    )
    negligible = set(h.negligible)
    siblings: dict[str, list[float]] = {}
    for name, f in measured.items():
        stem = _slice_stem(name)
        if stem is not None:
            siblings.setdefault(stem, []).append(f)
    factors = {}
    for name in spectra:
        stem = _slice_stem(name)
        if name in measured:
            factors[name] = measured[name]
        elif stem in siblings:
            factors[name] = min(siblings[stem])
        elif name in negligible:
            factors[name] = max_factor
        else:
            factors[name] = middle
    return factors


def _slice_stem(name: str) -> str | None:
    """The tensor a slice block's name refers to (``a.weight`` for ``a.weight.k`` or
    ``a.weight.q.h1``), or ``None`` for a name without a slice suffix."""
    stem = _SLICE_SUFFIX.sub("", name)
    return stem if stem != name else None


def _weighted_median(values: list[float], weights: list[int]) -> float:
    """The smallest of ``values`` whose weight, summed from the smallest value up, reaches half
    the total weight."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    total, running = sum(weights), 0
    for i in order:
        running += weights[i]
        if 2 * running >= total:
            return values[i]
    return values[order[-1]]


def held_factors(factors: Mapping[str, float], previous: Mapping[str, float]) -> dict[str, float]:
    """``factors``, each at most its ``previous`` value (blocks without one keep theirs): what a
    probe after a loss spike sets, lowering rates where the curvature rose, raising none."""
    return {name: min(f, previous.get(name, f)) for name, f in factors.items()}


def tune_block_lrs(
    spectra: Mapping[str, BlockSpectrum],
    base_lr: float,
    *,
    max_factor: float = DEFAULT_MAX_FACTOR,
) -> dict[str, float]:
    """Block name -> learning rate: ``base_lr`` times :func:`block_lr_factors`."""
    if isinstance(base_lr, bool) or not isinstance(base_lr, numbers.Real):
        raise ValueError(f"base_lr must be a positive finite number, got {base_lr!r}")
    base_lr = _checked_lr("base_lr", base_lr)  # numpy scalars as floats; huge ints refused
    lrs = {
        name: base_lr * f for name, f in block_lr_factors(spectra, max_factor=max_factor).items()
    }
    overflowed = [name for name, lr in lrs.items() if not math.isfinite(lr)]
    if overflowed:
        raise ValueError(
            f"base_lr {base_lr:g} times the factors of {len(overflowed)} block(s) (up to "
            f"max_factor {max_factor:g}; {overflowed[0]!r}) overflows to inf: give your tuned SGD "
            "learning rate (e.g. 0.1) or a smaller max_factor"
        )
    return lrs


def sgd_stability_limit(
    momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """The largest ``lr * lambda`` at which ``torch.optim.SGD`` converges on a quadratic of
    curvature ``lambda`` (see the module docstring); ``inf`` when dampening cancels the step."""
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    if dampening >= 1.0:
        return math.inf
    return 2.0 * (1.0 + momentum) / (1.0 - dampening)


def sgd_lr_cap(
    lr: float,
    rho_max: float,
    limit: float,
    *,
    unstable_factor: float = UNSTABLE_FACTOR,
    fraction: float = CAP_FRACTION,
) -> float:
    """The factor (at most 1) to multiply ``lr`` by: 1 unless ``lr * rho_max`` exceeds
    ``unstable_factor * limit``, else the factor that brings it to ``fraction * limit``."""
    if not (math.isfinite(rho_max) and rho_max > 0 and math.isfinite(limit)) or lr <= 0:
        return 1.0
    if lr * rho_max <= unstable_factor * limit:
        return 1.0
    return fraction * limit / (lr * rho_max)


def param_groups(
    model: nn.Module,
    lrs: Mapping[str, float],
    *,
    strategy: Strategy | None = None,
    default_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for any ``torch.optim`` optimizer that train each block at its own ``lrs``
    entry, so tuned per-block learning rates need no blockopt at run time.

    Usage: ``torch.optim.SGD(param_groups(model, lrs), lr=0.1, momentum=0.9)``, with ``lrs`` what
    :func:`tune_block_lrs` returns or ``json.load`` of what ``blockopt tune --out`` writes.

    Args:
        model: the module the learning rates were tuned on (or one of the same architecture).
        lrs: block name -> learning rate, each a positive finite number (bools are refused).
        strategy: the partition strategy the block names come from (see
            :func:`blockopt.partition`); ``None`` tries ``KNOWN_STRATEGIES`` in order and takes
            the first whose block names include every name in ``lrs``; names from a callable or
            regex strategy need that strategy passed here.
        default_lr: the learning rate of trainable parameters that ``lrs`` does not cover;
            ``None`` makes them an error.

    Returns one group per distinct learning rate, in the order of ``model.named_parameters()``:
    ``{"params": [...], "lr": lr, "blocks": [block names], "tensors": [parameter names]}``.
    The extra keys are ignored by optimizers and schedulers and kept in ``state_dict()``.

    A group holds whole tensors. A tensor split into blocks with different learning rates (the
    Q, K and V slices of a fused ``qkv`` weight, per-head blocks) trains at the smallest of them,
    the one that is stable for all its slices, and a ``UserWarning`` names each such tensor, its
    smallest and largest block learning rate and the blocks at each (all of them, when several
    share one): the other slices train slower than tuned.
    Frozen parameters are left out, and names in ``lrs`` that refer to frozen parameters
    (tuned before they were frozen) are skipped. Names that match no block, and trainable
    parameters without a learning rate when ``default_lr`` is ``None``, raise ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups() needs an nn.Module, got {type(model).__name__}")
    rates = _checked_lrs(lrs)
    if default_lr is not None:
        default_lr = _checked_lr("default_lr", default_lr)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = _frozen_names(model, rates)
    wanted = {k: v for k, v in rates.items() if k not in frozen}
    blocks = _matching_blocks(model, set(wanted), strategy)

    block_lr: dict[str, float] = {}
    missing: list[str] = []
    for block in blocks:
        lr = wanted.get(block.name, default_lr)
        if lr is None:
            missing.append(block.name)
        else:
            block_lr[block.name] = lr
    in_blocks = {id(p) for block in blocks for p in block.params}
    loose = [n for n, p in trainable if id(p) not in in_blocks]
    if default_lr is None and (missing or loose):
        parts = []
        if missing:
            parts.append(f"{len(missing)} block(s) of the model: {_listing(missing)}")
        if loose:
            parts.append(f"{len(loose)} parameter(s) the strategy leaves out: {_listing(loose)}")
        raise ValueError(
            f"lrs has no learning rate for {' and '.join(parts)}; add them to lrs, pass "
            "default_lr= to train them at one learning rate, or freeze them (requires_grad=False)"
        )

    per_tensor: dict[int, list[tuple[str, float]]] = {}
    for block in blocks:
        for p in block.params:
            per_tensor.setdefault(id(p), []).append((block.name, block_lr[block.name]))
    groups: dict[float, dict[str, Any]] = {}
    lowered: list[str] = []
    for name, p in trainable:
        entries = per_tensor.get(id(p), [])
        lr = min((v for _, v in entries), default=default_lr)
        assert lr is not None  # loose parameters without default_lr raised above
        if len({v for _, v in entries}) > 1:
            high = max(v for _, v in entries)
            lows = [b for b, v in entries if v == lr]
            highs = [b for b, v in entries if v == high]
            lowered.append(
                f"{name} trains at {lr:.3g} ({_blocks(lows)}), though {_blocks(highs)} "
                f"{'was' if len(highs) == 1 else 'were'} tuned to {high:.3g} ({high / lr:.3g}x)"
            )
        group = groups.setdefault(lr, {"params": [], "lr": lr, "blocks": [], "tensors": []})
        group["params"].append(p)
        group["tensors"].append(name)
        for block_name, _ in entries:
            if block_name not in group["blocks"]:
                group["blocks"].append(block_name)
    if lowered:
        warnings.warn(
            f"param_groups: {len(lowered)} tensor(s) hold blocks with different learning rates, "
            "and a param group holds whole tensors, so each trains at the smallest of its "
            f"blocks' learning rates (stable for all of them): {'; '.join(lowered)}. Their other "
            "blocks train slower than tuned; blockopt.BlockOptimizer(..., pin_mode='block_sgd') "
            "tunes and applies per-slice learning rates while training",
            UserWarning,
            stacklevel=2,
        )
    return list(groups.values())


def _checked_lr(label: str, value: Any) -> float:
    """``value`` as a float, if it is a positive finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{label} must be a positive finite number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(
            f"{label} must be a positive finite number, got an int of {len(str(value))} digits, "
            "too large for a float"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{label} must be a positive finite number, got {value!r}")
    return value


def _checked_lrs(lrs: Any) -> dict[str, float]:
    """``lrs`` as a dict of str -> float, or a clear error saying what it should be."""
    if not isinstance(lrs, Mapping):
        raise TypeError(
            f"lrs must be a mapping block name -> learning rate (what tune_block_lrs returns, or "
            f"json.load of `blockopt tune --out`), got {type(lrs).__name__}"
        )
    rates = {}
    for name, value in lrs.items():
        if not isinstance(name, str):
            raise TypeError(f"lrs keys must be block names (str), got {name!r}")
        rates[name] = _checked_lr(f"lrs[{name!r}]", value)
    return rates


def _frozen_names(model: nn.Module, rates: Mapping[str, float]) -> set[str]:
    """The names in ``rates`` that refer to frozen parameters: a frozen tensor, a slice or head
    of one (``<param>.q``, ``<param>.q.h0``, ``<param>.h0``), or a module whose own parameters
    are all frozen."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if not frozen:
        return set()
    modules = dict(model.named_modules())
    names = set()
    for key in rates:
        if key in frozen or _SLICE_SUFFIX.sub("", key) in frozen:
            names.add(key)
            continue
        module = modules.get("" if key == "(root)" else key)
        own = list(module.parameters(recurse=False)) if module is not None else []
        if own and not any(p.requires_grad for p in own):
            names.add(key)
    return names


def _matching_blocks(model: nn.Module, names: set[str], strategy: Strategy | None) -> list[Block]:
    """The partition of ``model`` whose block names include ``names``: under ``strategy``, or
    the first of ``KNOWN_STRATEGIES`` that has them all."""
    if strategy is not None:
        blocks = partition(model, strategy)
        unknown = sorted(names - {b.name for b in blocks})
        if unknown:
            others = [s for s in KNOWN_STRATEGIES if s != strategy and _covers(model, s, names)]
            hint = f"; they are the blocks of strategy={others[0]!r}" if others else ""
            raise ValueError(
                f"lrs names {len(unknown)} block(s) that {type(model).__name__} does not have "
                f"under strategy={_label(strategy)}: {_listing(unknown)}{hint}. Pass the model "
                "the learning rates were tuned on and the strategy they were tuned with"
            )
        return blocks
    closest: tuple[str, list[str]] | None = None
    for candidate in KNOWN_STRATEGIES:
        blocks = _quiet_partition(model, candidate)
        unknown = sorted(names - {b.name for b in blocks})
        if not unknown:
            return blocks
        if closest is None or len(unknown) < len(closest[1]):
            closest = (candidate, unknown)
    assert closest is not None
    raise ValueError(
        f"the names in lrs are not the blocks of {type(model).__name__} under any of the "
        f"strategies {', '.join(KNOWN_STRATEGIES)}; the closest, {closest[0]!r}, lacks "
        f"{len(closest[1])}: {_listing(closest[1])}. Pass the model the learning rates were "
        "tuned on, and strategy= when they came from a callable, regex or blockopt.Partition "
        "partition"
    )


def _covers(model: nn.Module, strategy: str, names: set[str]) -> bool:
    """Whether ``strategy`` partitions ``model`` into blocks that include all ``names``."""
    return names <= {b.name for b in _quiet_partition(model, strategy)}


def _quiet_partition(model: nn.Module, strategy: str) -> list[Block]:
    """``partition(model, strategy)`` tried on the user's behalf: a layout it cannot split is
    not the user's concern when that strategy is not the one their learning rates came from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutWarning)
        return partition(model, strategy)


def _label(strategy: Strategy) -> str:
    """A strategy as an error message shows it: its name, or its type."""
    if isinstance(strategy, (str, Partition)):
        return repr(strategy)
    return f"<{type(strategy).__name__}>"


def _blocks(names: list[str]) -> str:
    """``block a`` or ``blocks a, b``: every block at a tensor's smallest or largest rate, so
    that a slice holding its siblings' rate (see :func:`block_lr_factors`) is never named alone
    as the one that set it."""
    return f"block {names[0]}" if len(names) == 1 else f"blocks {', '.join(names)}"


def _listing(names: list[str], limit: int = 6) -> str:
    """Up to ``limit`` names, then how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
