"""The set of modes a :class:`~blockopt.BlockOptimizer` switches between, over the wrapper's
``param_groups``, which hold every hyperparameter of every mode.

Each mode is an optimizer class (``torch.optim.SGD``, :class:`BlockSGD`, ``torch.optim.AdamW``,
or one the user named) stepping over the wrapper's parameters. The wrapper's groups are the one
source of truth: before every step the active mode's groups are set from them, every key its
class takes, so that a scheduler or a user changing ``momentum``, ``betas`` or ``weight_decay``
changes what is applied. Key names: the starting mode's class keeps its own names (the groups
look like the optimizer the user had); the other family's keys keep theirs too unless the name
is taken with another meaning, as ``weight_decay`` is (L2 in SGD, decoupled in AdamW): then
they are prefixed with the family, ``adam_weight_decay`` or ``sgd_weight_decay``. ``maximize``,
``foreach``, ``fused``, ``differentiable`` and ``capturable`` mean the same in every class and
are shared. Only a class's constructor arguments are synced: entries some classes keep in
their groups as state (MADGRAD's ``k``) stay theirs. The learning rate applied is the group's
``lr`` times the mode's factor.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from blockopt.curvature.blocks import Block
from blockopt.optimizer.modes import BlockSGD, resolve_optimizer_class, transfer_state
from blockopt.optimizer.policy import MODES
from blockopt.optimizer.step_norms import step_norm

__all__ = [
    "SHARED_KEYS",
    "ActiveMode",
    "ModeSet",
    "ModeSpec",
    "family",
    "init_keywords",
    "mode_classes",
]

# Keys that mean the same in every optimizer class, so that every mode reads the one value.
SHARED_KEYS = frozenset({"maximize", "foreach", "fused", "differentiable", "capturable"})
# Keys that are flags: torch tests them for truth, so "no" would silently mean True.
FLAG_KEYS = frozenset(
    {"nesterov", "amsgrad", "maximize", "differentiable", "capturable", "decoupled_weight_decay"}
)
OPTIONAL_FLAG_KEYS = frozenset({"foreach", "fused"})


def family(mode: str) -> str:
    """``"adam"`` for the adaptive mode, ``"sgd"`` for SGD and block SGD."""
    return "adam" if mode == "adam" else "sgd"


@dataclass(frozen=True)
class ModeSpec:
    """One mode: its class, the keyword arguments it is built with, and which wrapper group
    key feeds each of its hyperparameters (``keys``: inner name -> group name)."""

    mode: str
    cls: type[Optimizer]
    kwargs: Mapping[str, Any]
    keys: Mapping[str, str]
    defaults: Mapping[str, Any]  # the class's defaults with these kwargs, by inner name


@dataclass(frozen=True)
class ActiveMode:
    """The mode training steps in: its optimizer, every mode's learning-rate factor, and
    whether the active mode's factor came from a search. Replaced, never edited, so that a
    probe's decision is built aside and committed in one assignment."""

    mode: str
    optimizer: Optimizer
    scales: Mapping[str, float]
    searched: bool = False

    @property
    def scale(self) -> float:
        return self.scales[self.mode]

    def with_scale(self, factor: float) -> ActiveMode:
        """The same mode with its learning-rate factor multiplied by ``factor``."""
        return dataclasses.replace(self, scales={**self.scales, self.mode: self.scale * factor})


class ModeSet:
    """Builds the modes over the wrapper's groups, keeps their hyperparameters in step with
    the groups, and switches between them, carrying state and matching the step size."""

    def __init__(
        self, classes: Mapping[str, tuple[type[Optimizer], Mapping[str, Any]]], native: str
    ) -> None:
        if set(classes) != set(MODES):
            raise ValueError(f"need a class for each mode {MODES}, got {sorted(classes)}")
        self.native = native
        probed = {m: _defaults(*classes[m], m) for m in MODES}
        own = family(native)
        taken = {k for m in MODES if family(m) == own for k in probed[m]}
        self.specs: dict[str, ModeSpec] = {}
        for m in MODES:
            cls, kwargs = classes[m]
            keys = {
                k: k
                if family(m) == own or k in SHARED_KEYS or k not in taken
                else f"{family(m)}_{k}"
                for k in probed[m]
            }
            self.specs[m] = ModeSpec(m, cls, dict(kwargs), keys, probed[m])
        order = [native, *(m for m in MODES if m != native)]
        self.group_defaults: dict[str, Any] = {}
        for m in order:
            spec = self.specs[m]
            for k, gk in spec.keys.items():
                self.group_defaults.setdefault(gk, spec.defaults[k])
        self.native_defaults = {
            gk: self.group_defaults[gk] for gk in self.specs[native].keys.values()
        }

    # -- groups ------------------------------------------------------------------------------

    def fill_defaults(self, group: dict[str, Any]) -> None:
        """Give ``group`` every mode's keys it lacks, at their defaults (a group added since,
        or one a checkpoint saved before a key existed)."""
        for key, value in self.group_defaults.items():
            group.setdefault(key, value)

    def check_group(self, group: Mapping[str, Any], index: int) -> None:
        """Refuse a group whose values a mode's class refuses, with that class's own message,
        or whose flags are not bools (torch would read ``"no"`` as true)."""
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = float(lr)
        if not (_is_number(lr) and math.isfinite(lr) and lr >= 0):
            raise ValueError(
                f"param group {index}: invalid learning rate {group.get('lr')!r}; give a finite "
                "number >= 0, e.g. 'lr': 0.01"
            )
        for key in FLAG_KEYS | OPTIONAL_FLAG_KEYS:
            value = group.get(key)
            if key in group and not (
                isinstance(value, bool) or (value is None and key in OPTIONAL_FLAG_KEYS)
            ):
                allowed = "True, False or None" if key in OPTIONAL_FLAG_KEYS else "True or False"
                raise TypeError(
                    f"param group {index}: {key} must be {allowed}, got {value!r}; torch reads "
                    f"any non-empty value as True"
                )
        momentum = group.get("momentum")
        if _is_number(momentum) and not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"param group {index}: invalid momentum value {momentum!r}: SGD momentum must "
                "be in [0, 1) (at 1 or more the momentum buffer grows without bound), e.g. 0.9"
            )
        for m, spec in self.specs.items():
            # torch checks constructor arguments only, never a group's values: pass them so
            accepted = init_keywords(spec.cls)
            values = {
                k: group[gk]
                for k, gk in spec.keys.items()
                if gk in group and (accepted is None or k in accepted)
            }
            dummy = [torch.zeros(1, requires_grad=True)]
            try:
                _build(spec.cls, [{"params": dummy}], {"lr": group.get("lr", 0.1), **values})
            except (ValueError, TypeError, RuntimeError) as err:
                names = {gk for gk in spec.keys.values() if gk in group}
                raise type(err)(
                    f"param group {index}: mode {m!r} ({spec.cls.__name__}) refuses these "
                    f"hyperparameters: {err}; fix the value among {sorted(names)}"
                ) from err

    def inner_group(self, mode: str, group: Mapping[str, Any], scale: float) -> dict[str, Any]:
        """The group ``mode``'s optimizer steps with: the wrapper's values, lr times ``scale``."""
        spec = self.specs[mode]
        values = {k: group[gk] for k, gk in spec.keys.items() if gk in group}
        return {"params": group["params"], **values, "lr": group["lr"] * scale}

    def build(
        self,
        mode: str,
        groups: Sequence[Mapping[str, Any]],
        scale: float,
        blocks: Sequence[Block] = (),
        factors: Mapping[str, float] | None = None,
    ) -> Optimizer:
        """A new optimizer of ``mode`` over the wrapper's ``groups`` (no state)."""
        spec = self.specs[mode]
        inner = [self.inner_group(mode, g, scale) for g in groups]
        try:
            opt = _build(spec.cls, inner, spec.kwargs, blocks, factors)
        except TypeError as err:
            raise TypeError(
                f"could not build mode {mode!r} with {spec.cls.__name__}: {err}"
            ) from err
        return opt

    def sync(self, active: ActiveMode, groups: Sequence[Mapping[str, Any]]) -> None:
        """Set the active optimizer's groups from the wrapper's: every key, lr times the
        mode's factor; groups added to the wrapper since are added to it too."""
        opt, spec, scale = active.optimizer, self.specs[active.mode], active.scale
        for group in groups[len(opt.param_groups) :]:
            opt.add_param_group(self.inner_group(active.mode, group, scale))
        for group, inner in zip(groups, opt.param_groups):
            for k, gk in spec.keys.items():
                if gk in group:
                    inner[k] = group[gk]
            inner["lr"] = group["lr"] * scale

    def applied_lrs(self, active: ActiveMode, groups: Sequence[Mapping[str, Any]]) -> list[float]:
        """The learning rate the active mode applies to each group (before block SGD's
        per-block factors and Adam's per-coordinate scaling)."""
        return [g["lr"] * active.scale for g in groups]

    # -- switching ---------------------------------------------------------------------------

    def switched(
        self,
        active: ActiveMode,
        mode: str,
        groups: Sequence[Mapping[str, Any]],
        fixed: Mapping[str, float],
        blocks: Sequence[Block],
        factors: Mapping[str, float],
    ) -> ActiveMode:
        """``active`` switched to ``mode``: a new optimizer holding the carried state
        (:func:`transfer_state`) whose first step has the norm the old mode's would have had,
        unless ``mode``'s learning rate is fixed (``fixed``, at its factor). The old optimizer
        is not changed."""
        self.sync(active, groups)
        source = active.optimizer
        if isinstance(source, BlockSGD):  # the step it would take with the probe's factors
            source = self.build(active.mode, groups, active.scale, blocks, factors)
            source.load_state_dict(active.optimizer.state_dict())
        old_norm = step_norm(source)
        scales = dict(active.scales)
        if mode not in fixed:
            scales[mode] = 1.0
        new = self.build(mode, groups, scales[mode], blocks, factors)
        transfer_state(source, new)
        if mode not in fixed:
            new_norm = step_norm(new)
            ratio = old_norm / new_norm if old_norm > 0 and new_norm > 0 else math.nan
            scales[mode] = ratio if math.isfinite(ratio) else 1.0
        switched = ActiveMode(mode, new, scales, searched=False)
        self.sync(switched, groups)
        return switched


def loss_sign(groups: Sequence[Mapping[str, Any]]) -> float:
    """-1 when the groups maximize their objective (``maximize=True``), else 1: what a loss is
    multiplied by so that lower always means better."""
    return -1.0 if any(g.get("maximize") for g in groups) else 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def init_keywords(cls: type[Optimizer]) -> frozenset[str] | None:
    """The keyword arguments ``cls`` takes: those of its ``__init__`` and, through
    ``**kwargs``, of the ``__init__`` of its bases (``None``: any, to the end of the MRO)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return frozenset(names)
    return None


def _build(
    cls: type[Optimizer],
    groups: list[dict[str, Any]],
    kwargs: Mapping[str, Any],
    blocks: Sequence[Block] = (),
    factors: Mapping[str, float] | None = None,
) -> Optimizer:
    if cls is BlockSGD:
        return BlockSGD(groups, blocks, factors, **kwargs)
    return cls(groups, **kwargs)


def _defaults(cls: type[Optimizer], kwargs: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The hyperparameters ``cls`` takes, with their values under ``kwargs`` (built once over
    a dummy parameter, so that the class itself validates them)."""
    dummy = [torch.zeros(1, requires_grad=True)]
    try:
        opt = _build(cls, [{"params": dummy}], kwargs)
    except TypeError as err:
        raise TypeError(f"could not build mode {mode!r} with {cls.__name__}: {err}") from err
    except (ValueError, RuntimeError) as err:
        raise type(err)(f"mode {mode!r} ({cls.__name__}) refuses its settings: {err}") from err
    # Only constructor arguments are hyperparameters: some classes keep state in their groups
    # (MADGRAD's step count k, SWATS's phase), which syncing from the wrapper would reset.
    accepted = init_keywords(cls)
    return {
        k: v
        for k, v in opt.defaults.items()
        if k not in ("params", "lr") and (accepted is None or k in accepted)
    }


def mode_classes(
    optimizers: Mapping[str, Any], sgd: Mapping[str, Any], adam: Mapping[str, Any]
) -> dict[str, tuple[type[Optimizer], dict[str, Any]]]:
    """Each mode's class and keyword arguments: the defaults (SGD, block SGD and AdamW with
    the constructor's hyperparameters) or the user's ``(class_or_name, kwargs)``."""
    classes: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
        "sgd": (torch.optim.SGD, dict(sgd)),
        "block_sgd": (BlockSGD, dict(sgd)),
        "adam": (torch.optim.AdamW, dict(adam)),
    }
    for m, spec in optimizers.items():
        if m not in MODES:
            raise ValueError(f"optimizers names unknown mode {m!r}; modes are {MODES}")
        cls_spec, kwargs = spec if isinstance(spec, tuple) else (spec, {})
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"the kwargs for mode {m!r} must be a mapping, got {kwargs!r}")
        cls = resolve_optimizer_class(cls_spec)
        if "lr" in kwargs:
            raise ValueError(
                f"give mode {m!r}'s learning rate with lrs={{{m!r}: ...}}, not in its kwargs"
            )
        classes[m] = (cls, dict(kwargs))
    return classes
