"""Checkpoints: what ``BlockOptimizer.state_dict()`` holds beyond torch's part, and the checks
that let ``load_state_dict`` refuse a corrupt, truncated or foreign state before changing
anything."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from blockopt.analysis.heterogeneity import Heterogeneity, heterogeneity
from blockopt.curvature.blocks import Block
from blockopt.curvature.spectra import Spectra
from blockopt.distributed.reductions import FAULT_KINDS
from blockopt.optimizer.modeset import ActiveMode, ModeSet, family
from blockopt.optimizer.policy import MODES, Decision, ProbeFault, ProbeSchedule, is_share
from blockopt.optimizer.validation import is_int, is_real

__all__ = [
    "SCHEDULE_SETTINGS",
    "STATE_KEYS",
    "STATE_VERSION",
    "CheckpointDuringProbeError",
    "Restored",
    "active_state_size",
    "bad_state",
    "check_active_state",
    "check_shapes",
    "count",
    "group_shapes",
    "load_checked",
    "pairs",
    "plan_restore",
    "positive_floats",
    "records",
    "schedule_state",
    "spectra_of",
    "try_base",
]

STATE_VERSION = 1
# The probe schedule's settings: given to the constructor, never taken from a checkpoint.
SCHEDULE_SETTINGS = (
    "every",
    "first",
    "base",
    "max_interval",
    "growth",
    "stable_tol",
    "spike_factor",
    "budget",
)
STATE_KEYS = (
    "mode",
    "scales",
    "inner",
    "schedule",
    "last_switch",
    "history",
    "spectra",
    "block_factors",
    "step_count",
    "probe_seconds",
    "blocks",
)
# The budget's state in a fresh schedule, for states saved without it.
_BUDGET_STATE = {"budget_step": 0, "pending_cost": None, "last_cost": None}
# Per-parameter state that torch.optim classes keep in the parameter's shape.
_MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class _Scratch(Optimizer):
    """A bare optimizer over copies of the wrapper's groups, to try a state dict on before the
    wrapper itself is touched."""

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never stepped
        raise RuntimeError("a scratch optimizer does not step")


class CheckpointDuringProbeError(RuntimeError):
    """``state_dict()`` was called while a probe or a learning-rate trial ran."""

    def __init__(self) -> None:
        super().__init__(
            "state_dict() was called while a probe or a learning-rate trial runs (from a signal "
            "handler, or from inside the probe closure): the model holds the trial's weights and "
            "BatchNorm statistics until the probe returns, and a checkpoint taken now would keep "
            "them. Take checkpoints between steps: in a signal handler, set a flag and save "
            "after opt.step() returns"
        )


def bad_state(problem: str) -> ValueError:
    return ValueError(
        f"cannot load this state dict: {problem}. Nothing was changed; load a state saved by "
        "BlockOptimizer.state_dict() into an optimizer built the same way over the same model"
    )


def group_shapes(groups: list[dict[str, Any]]) -> list[list[list[int]]]:
    """The shape of every parameter, per param group: identifies the model a state belongs to."""
    return [[list(p.shape) for p in g["params"]] for g in groups]


def check_shapes(saved: Any, here: list[list[list[int]]]) -> None:
    """Refuse a state saved for parameters of other shapes (another model whose block names
    are the same, such as another width)."""
    try:
        saved = [[[int(d) for d in shape] for shape in group] for group in saved]
    except (TypeError, ValueError):
        raise bad_state(
            f"'shapes' is {saved!r:.60}, not a list of parameter shapes per param group"
        ) from None
    if saved == here:
        return
    if list(map(len, saved)) != list(map(len, here)):
        raise ValueError(
            f"the state dict has {len(saved)} param group(s) of {list(map(len, saved))} "
            f"parameters, this optimizer {len(here)} of {list(map(len, here))}; build the "
            "optimizer with the param groups it was saved with"
        )
    pairs = zip(
        ((g, i, s) for g, group in enumerate(here) for i, s in enumerate(group)),
        (s for group in saved for s in group),
    )
    where = next(
        (f"group {g}, parameter {i}: saved {t}, here {s}" for (g, i, s), t in pairs if s != t),
        f"{sum(map(len, saved))} parameters saved, {sum(map(len, here))} here",
    )
    raise ValueError(
        f"the state dict was saved for parameters of other shapes ({where}): it is the "
        "checkpoint of another model; load it into an optimizer over the model it came from"
    )


def count(value: Any, label: str) -> int:
    if not (is_int(value) and value >= 0):
        raise bad_state(f"{label!r} is {value!r}, not a non-negative int")
    return value


def positive_floats(value: Any, label: str, allowed: Sequence[str]) -> dict[str, float]:
    """``value`` as a dict name -> float, if its names are ``allowed`` and values positive."""
    if not isinstance(value, Mapping):
        raise bad_state(f"{label!r} is {type(value).__name__}, not a mapping")
    out = {}
    for key, v in value.items():
        if key not in allowed:
            raise bad_state(f"{label!r} names {key!r}, which this optimizer does not have")
        if not (is_real(v) and math.isfinite(v) and v > 0):
            raise bad_state(f"{label}[{key!r}] is {v!r}, not a positive finite number")
        out[key] = float(v)
    return out


def pairs(value: Any, label: str) -> list:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 for e in value
    ):
        raise bad_state(f"{label!r} is not a list of [step, spectra] pairs")
    return list(value)


def spectra_of(data: Any, index: int) -> Spectra:
    try:
        return Spectra.from_dict(data)
    except (TypeError, ValueError) as err:
        raise bad_state(f"spectra[{index}] is not a spectra dict ({err})") from err


def records(value: Any, label: str, cls: type) -> list:
    """Rebuild dataclass records (decisions, probe faults) from their dicts, checking types;
    fields with defaults may be missing (states saved before they existed)."""
    if not isinstance(value, (list, tuple)):
        raise bad_state(f"{label!r} is {type(value).__name__}, not a list")
    fields = dataclasses.fields(cls)
    types = {f.name: str(f.type) for f in fields}
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or not required <= set(item) <= set(types):
            raise bad_state(f"{label}[{i}] is not a record with the fields {', '.join(types)}")
        for key, v in item.items():
            if not _kind_ok(key, v, types[key]):
                kind = (
                    f"mode {MODES}"
                    if key in ("old_mode", "new_mode")
                    else f"fault kind {FAULT_KINDS}"
                    if key == "kind"
                    else "step >= 0"
                    if key == "step"
                    else types[key]
                )
                raise bad_state(f"{label}[{i}][{key!r}] is {v!r}, not a valid {kind}")
        out.append(cls(**{k: tuple(v) if "tuple" in types[k] else v for k, v in item.items()}))
    return out


def _kind_ok(key: str, v: Any, t: str) -> bool:
    if key == "kind":
        return v in FAULT_KINDS
    if key == "step" and is_int(v) and v < 0:
        return False
    if "tuple" in t:
        return isinstance(v, (list, tuple)) and all(isinstance(e, str) for e in v)
    if "str" in t:
        return isinstance(v, str) and (key not in ("old_mode", "new_mode") or v in MODES)
    return is_int(v) if "int" in t else is_real(v)


def schedule_state(current: ProbeSchedule, state: Any) -> dict[str, Any]:
    """The probe-schedule state to load, checked: known keys, number types, valid settings."""
    if not isinstance(state, Mapping):
        raise bad_state(f"'schedule' is {type(state).__name__}, not a mapping")
    types = {f.name: str(f.type) for f in dataclasses.fields(ProbeSchedule)}
    unknown = sorted(set(state) - set(types))
    if unknown:
        raise bad_state(f"'schedule' has unknown keys {unknown}")
    for key, v in state.items():
        t = types[key]
        if t == "bool":
            if not isinstance(v, bool):
                raise bad_state(f"'schedule'[{key!r}] is {v!r}, not True or False")
            continue
        if not ((v is None and "None" in t) or (is_int(v) if "int" in t else is_real(v))):
            raise bad_state(f"'schedule'[{key!r}] is {v!r}, not of type {t}")
        if v is not None and not math.isfinite(v):
            raise bad_state(f"'schedule'[{key!r}] is {v!r}, not a finite number")
    for key in ("next_step", "losses_seen", "failures", "budget_step"):
        if state.get(key, 0) < 0:
            raise bad_state(f"'schedule'[{key!r}] is {state[key]!r}, not a count >= 0")
    budget = state.get("budget")
    if budget is not None and not is_share(budget):
        raise bad_state(f"'schedule'['budget'] is {budget!r}, not a share in (0, 1) or None")
    for key in ("pending_cost", "last_cost"):
        if (state.get(key) or 0.0) < 0:
            raise bad_state(f"'schedule'[{key!r}] is {state[key]!r}, not seconds >= 0 or None")
    if state.get("interval", 1) < 1:
        raise bad_state(f"'schedule'['interval'] is {state['interval']!r}, not a step count >= 1")
    if state.get("loss_scale", 0.0) < 0:
        raise bad_state(
            f"'schedule'['loss_scale'] is {state['loss_scale']!r}, not a magnitude >= 0"
        )
    # A state saved before the budget existed: the budget is this optimizer's, unspent.
    state = {**_BUDGET_STATE, **state}
    try:
        ProbeSchedule(**{**current.state_dict(), **state})
    except (TypeError, ValueError) as err:
        raise bad_state(f"'schedule' holds invalid settings ({err})") from err
    # The settings (probe_every, probe_budget, ...) stay those this optimizer was built with;
    # only where the schedule stands is loaded.
    return {k: v for k, v in state.items() if k not in SCHEDULE_SETTINGS}


def _same_kind(value: Any, ref: Any) -> bool:
    """Whether a loaded hyperparameter has the kind of the one it replaces."""
    if isinstance(ref, bool):
        return isinstance(value, bool)
    if is_real(ref):
        return is_real(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    if isinstance(ref, (tuple, list)):
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(ref)
            and all(_same_kind(v, r) for v, r in zip(value, ref))
        )
    if isinstance(ref, str):
        return isinstance(value, str)
    return True


def load_checked(opt: Optimizer, sd: Any, who: str) -> None:
    """Load ``sd`` into ``opt`` (new or scratch, never the wrapper), then check what torch does
    not: hyperparameter kinds, state for parameters no group lists, and moment shapes."""
    groups = sd.get("param_groups") if isinstance(sd, Mapping) else None
    if not (
        isinstance(sd.get("state") if isinstance(sd, Mapping) else None, Mapping)
        and isinstance(groups, (list, tuple))
        and all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise bad_state(
            f"the state of {who} is not an optimizer state dict ('state', and 'param_groups' "
            "with 'params' lists)"
        )
    fresh = [dict(g) for g in opt.param_groups]
    try:
        opt.load_state_dict(sd)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise bad_state(f"the state of {who} does not fit its parameters ({err})") from err
    for i, (old, new) in enumerate(zip(fresh, opt.param_groups)):
        for key, ref in old.items():
            if key in ("params", "param_names") or ref is None or key not in new:
                continue
            value = new[key]
            bad_lr = key == "lr" and is_real(value) and not (math.isfinite(value) and value >= 0)
            if bad_lr or not _same_kind(value, ref):
                raise bad_state(
                    f"the state of {who}: param group {i}'s {key!r} is {value!r}, not a value "
                    f"like {ref!r}"
                )
    for p, st in opt.state.items():
        if not isinstance(p, torch.Tensor):
            raise bad_state(
                f"the state of {who} holds state for parameter id {p!r}, which none of its "
                "param groups lists"
            )
        for key in _MOMENT_KEYS:
            value = st.get(key) if isinstance(st, Mapping) else None
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise bad_state(
                    f"the state of {who}: {key!r} of a parameter of shape {tuple(p.shape)} is "
                    f"{got!r} (truncated, or from another model)"
                )


def try_base(groups: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any], base: Any) -> None:
    """Try the wrapper's own groups and state on a scratch optimizer over the same groups."""
    scratch = _Scratch([dict(g) for g in groups], dict(defaults))
    load_checked(scratch, base, "the wrapper")


def check_family(saved: Any, here: str) -> None:
    """Refuse a state whose groups' keys belong to the other family (``saved``: the family
    of the mode its optimizer started in; ``None`` for states saved before it was recorded):
    ``weight_decay`` is L2 in SGD and decoupled in AdamW, so it would change meaning."""
    if saved is None or saved == here:
        return
    if saved not in ("sgd", "adam"):
        raise bad_state(f"its 'family' is {saved!r}, not 'sgd' or 'adam'")
    raise ValueError(
        f"the state dict was saved by an optimizer that started in the {saved} family and "
        f"this one starts in the {here} family: the groups' keys name the starting family's "
        "hyperparameters (weight_decay is L2 in SGD, decoupled in AdamW), so they would change "
        f"meaning. Load it into an optimizer built the same way (wrap the same optimizer class, "
        f"or BlockOptimizer(..., mode={saved!r}))"
    )


def plan_restore(
    base: Mapping[str, Any],
    extra: Mapping[str, Any],
    *,
    blocks: Sequence[Block],
    repartition: Callable[[], list[Block]],
    groups: Sequence[Mapping[str, Any]],
    defaults: Mapping[str, Any],
    schedule: ProbeSchedule,
    modes: ModeSet,
    budget: float,
) -> Restored:
    """Check a saved state (``base``: torch's part, ``extra``: blockopt's) against the
    optimizer it is loaded into, and build everything to install, changing nothing: a bad
    state fails here. ``repartition`` gives the blocks when parameters were added since;
    ``budget`` stands in for the training time of a state saved before it was recorded."""

    missing = [k for k in STATE_KEYS if k not in extra]
    if missing:
        raise bad_state(f"its 'blockopt' entry lacks {', '.join(map(repr, missing))}")
    check_family(extra.get("family"), family(modes.native))
    saved = extra["blocks"]
    if not (isinstance(saved, (list, tuple)) and all(isinstance(n, str) for n in saved)):
        raise bad_state(f"'blocks' is {type(saved).__name__}, not a list of block names")
    shapes = extra.get("shapes")
    if isinstance(shapes, list) and len(shapes) != len(groups):  # add_param_group missing?
        check_shapes(shapes, group_shapes(groups))
    if list(saved) != [b.name for b in blocks]:  # parameters added or unfrozen since?
        blocks = repartition()
    names = [b.name for b in blocks]
    if list(saved) != names:
        only_saved = [n for n in saved if n not in names]
        only_here = [n for n in names if n not in saved]
        raise ValueError(
            f"the state dict was saved with other blocks than this optimizer has ({len(saved)} "
            f"against {len(names)}; only saved: {only_saved[:3]}, only here: {only_here[:3]}). "
            "The blocks are the trainable parameters of the optimizer's groups: freeze, "
            "unfreeze or add the same parameters as when it was saved before loading, or load "
            "it into the model it came from"
        )
    if shapes is not None:
        check_shapes(shapes, group_shapes(groups))
    mode = extra["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        raise bad_state(f"its mode {mode!r} is not one of {MODES}")
    scales = positive_floats(extra["scales"], "scales", MODES)
    if mode not in scales:
        raise bad_state(f"'scales' has no entry for its mode {mode!r}")
    factors = positive_floats(extra["block_factors"], "block_factors", names)
    spectra = [
        (count(step, f"spectra[{i}] step"), spectra_of(data, i))
        for i, (step, data) in enumerate(pairs(extra["spectra"], "spectra"))
    ]
    last_switch = extra["last_switch"]
    if last_switch is not None:
        last_switch = count(last_switch, "last_switch")
    refused = extra.get("refused", [])  # saved before switches could be undone: none
    if not (isinstance(refused, (list, tuple)) and all(m in MODES for m in refused)):
        raise bad_state(f"'refused' is {refused!r}, not a list of mode names from {MODES}")
    probe_seconds = extra["probe_seconds"]
    if not (is_real(probe_seconds) and math.isfinite(probe_seconds) and probe_seconds >= 0):
        raise bad_state(f"'probe_seconds' is {probe_seconds!r}, not a non-negative number")
    lr_searched = extra.get("lr_searched", False)
    if not isinstance(lr_searched, bool):
        raise bad_state(f"'lr_searched' is {lr_searched!r}, not True or False")
    schedule = schedule_state(schedule, extra["schedule"])
    train_seconds = extra.get("train_seconds")
    if train_seconds is None:  # saved before it was recorded: take the budget as kept
        train_seconds = probe_seconds / (budget)
    if not (is_real(train_seconds) and math.isfinite(train_seconds) and train_seconds >= 0):
        raise bad_state(f"'train_seconds' is {train_seconds!r}, not a non-negative number")
    try_base(groups, defaults, base)
    inner = extra["inner"]
    if not isinstance(inner, Mapping) or not set(inner) <= set(MODES):
        raise bad_state(f"'inner' must map mode names {MODES} to optimizer state dicts")
    if mode not in inner:
        raise bad_state(
            f"'inner' has no state for its active mode {mode!r} (its moments would "
            "silently restart)"
        )
    check_active_state(inner[mode], extra.get("active_state"), mode)
    restored = {
        m: _restored_mode(modes, groups, m, sd, scales.get(m, 1.0), blocks, factors)
        for m, sd in inner.items()
    }
    return Restored(
        active=ActiveMode(mode, restored[mode], scales, lr_searched),
        blocks=blocks,
        block_factors=factors,
        schedule=schedule,
        last_switch=last_switch,
        refused=frozenset(refused),
        history=records(extra["history"], "history", Decision),
        spectra=spectra,
        faults=records(extra.get("faults", []), "faults", ProbeFault),
        last_score=heterogeneity(spectra[-1][1]) if spectra else None,
        step_count=count(extra["step_count"], "step_count"),
        probe_seconds=float(probe_seconds),
        train_seconds=float(train_seconds),
    )


def active_state_size(opt: Optimizer) -> int:
    """How many parameters the active mode holds state for (saved, to catch removed state)."""
    return sum(1 for state in opt.state.values() if state)


def check_active_state(sd: Any, saved: Any, mode: str) -> None:
    """Refuse an active mode's state that holds state for fewer parameters than it was saved
    with: its moments were removed, and would silently restart (states saved before the count
    was recorded are not checked)."""
    if saved is None:
        return
    if not (is_int(saved) and saved >= 0):
        raise bad_state(f"'active_state' is {saved!r}, not a count >= 0")
    state = sd.get("state") if isinstance(sd, Mapping) else None
    held = sum(1 for s in state.values() if s) if isinstance(state, Mapping) else 0
    if held < saved:
        raise bad_state(
            f"the state of its active mode {mode!r} holds state for {held} parameter(s), but it "
            f"was saved with state for {saved}: state was removed from it, and its moments "
            "would silently restart. To restart them on purpose, load the whole state, then "
            "call opt.active_optimizer.state.clear()"
        )


def _restored_mode(
    modes: ModeSet,
    groups: Sequence[Mapping[str, Any]],
    mode: str,
    sd: Any,
    scale: float,
    blocks: Sequence[Block],
    factors: Mapping[str, float],
) -> Optimizer:
    """A new optimizer of ``mode`` holding the saved state ``sd``, checked against it."""
    opt = modes.build(mode, groups, scale, blocks, factors)
    load_checked(opt, sd, f"mode {mode!r}")
    return opt


@dataclass(frozen=True)
class Restored:
    """Everything a checked state dict installs."""

    active: ActiveMode
    blocks: Sequence[Block]
    block_factors: Mapping[str, float]
    schedule: Mapping[str, Any]
    last_switch: int | None
    refused: frozenset[str]
    history: Sequence[Decision]
    spectra: Sequence[tuple[int, Spectra]]
    faults: Sequence[ProbeFault]
    last_score: Heterogeneity | None
    step_count: int
    probe_seconds: float
    train_seconds: float
