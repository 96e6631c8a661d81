"""``BlockOptimizer`` and ``wrap()``: a drop-in optimizer that probes blockwise curvature and
switches between SGD, blockwise-learning-rate SGD and Adam on it.

The wrapper is a ``torch.optim.Optimizer``. Its ``param_groups`` are the single source of truth
for learning rates: a scheduler that changes ``group["lr"]`` changes the learning rate of
whichever mode is active, because each mode's learning rate is ``group["lr"]`` times a per-mode
factor (1 for the mode training started in, unless cut as below). The modes are ordinary
optimizers over the same parameters; only the active one steps. On a switch, state is carried over
(:func:`.modes.transfer_state`) and, unless the user fixed the new mode's learning rate,
its factor starts where the first step in the new mode has the same norm as a step in the old
one would have had (a switch changes the direction of the update, not its size). When a probe
made the switch, a short search then walks the round rates 10^(k/2) from the one nearest it,
at most one step up and down while trial runs on the probe's batch end lower
(:mod:`.lr_search`, :mod:`.lr_trials`); later probes re-check it downwards, in
the SGD modes only when a trial shows it unstable.
An SGD learning rate that a probe finds far beyond SGD's stability limit on the largest block
curvature is cut first (:func:`sgd_lr_cap`), so that the size carried over is one
SGD could take.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from blockopt.analysis.heterogeneity import Heterogeneity, heterogeneity
from blockopt.analysis.tuning import (
    DEFAULT_MAX_FACTOR,
    UNSTABLE_FACTOR,
    block_lr_factors,
    held_factors,
    sgd_lr_cap,
    sgd_stability_limit,
)
from blockopt.curvature.blocks import Strategy, partition
from blockopt.curvature.lanczos import check_tol
from blockopt.curvature.spectra import Spectra, block_spectra, check_lanczos_settings
from blockopt.distributed.reductions import (
    RankMean,
    Reduce,
    ddp_of,
    fault_kind,
    no_sync,
    probe_reduce,
    refuse_sharded,
)
from blockopt.logging.tensorboard import ProbeCost, TensorBoardLogger
from blockopt.optimizer.lr_search import (
    LrSearch,
    grid_start,
    recheck_multiplier,
    search_multiplier,
)
from blockopt.optimizer.lr_trials import trial_loss
from blockopt.optimizer.modes import MODES, BlockSGD, resolve_optimizer_class, transfer_state
from blockopt.optimizer.policy import (
    Decision,
    ProbeFault,
    ProbeFaultWarning,
    ProbeSchedule,
    Spend,
    SwitchPolicy,
    Thresholds,
    is_share,
)

__all__ = ["BlockOptimizer", "wrap"]

STATE_VERSION = 1
# Decisions read each block's curvature scale, not its density: a Lanczos run may stop once its
# extreme Ritz values have settled to 2%. At 5%, in one of our runs, a block of the reference GPT
# after 300 steps of training stopped at a pause of its largest Ritz value, 32% short; at 2%
# every block factor of the reference GPT, ViT, CNN and quadratics stays within 7% of a 40-step
# probe's, at 0.4-0.85 of the products of 10 fixed steps (docs/BENCHMARKS.md, "Probe cost").
DEFAULT_TOL = 0.02
# Fields :meth:`BlockOptimizer._install` sets as they are: key -> attribute.
_INSTALLED = {
    "mode": "mode",
    "scales": "_scales",
    "block_factors": "block_factors",
    "inner": "_inner",
    "last_score": "last_score",
    "step_count": "step_count",
    "probe_seconds": "probe_seconds",
    "train_seconds": "_train_seconds_saved",
    "lr_searched": "_lr_searched",
}
# The default share of training wall time that probes (with their learning-rate searches) take.
DEFAULT_PROBE_BUDGET = 0.03
# A search at a switch may raise the step-norm match by at most this many half-decades: trials on
# the probe's one batch reward steps that memorise it (on the digits CNN after 50 steps of
# training, 20 trial steps at ten times the match end 4 times lower on the probe's batch, and the
# training loss then rises fivefold), while the match already has the old mode's step size.
SEARCH_MAX_UP = 1
_SGD_KEYS = ("momentum", "dampening", "weight_decay", "nesterov")
_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


def _eager(model: nn.Module) -> nn.Module:
    """The module to probe: the eager module under DDP / torch.compile wrappers."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "OptimizedModule",
            "DistributedDataParallel",
            "DataParallel",
        ):
            return _eager(inner)
    return model


class BlockOptimizer(Optimizer):
    """Train with SGD, blockwise-lr SGD or AdamW, chosen from probes of blockwise curvature.

    Args:
        model: the module being trained (a ``torch.compile``'d module is probed eagerly).
        probe: zero-argument callable returning a scalar loss through ``model`` on a batch of
            your choice; ``None`` disables probing (the optimizer then stays in its mode).
        lr: learning rate of the starting mode.
        params: parameters or param groups (default: the model's trainable parameters).
        mode: the starting mode, ``"sgd"``, ``"block_sgd"`` or ``"adam"``.
        momentum, dampening, weight_decay, nesterov: SGD hyperparameters (also block SGD's).
        betas, eps, adam_weight_decay: AdamW hyperparameters.
        lrs: fixed learning rates per mode (at schedule factor 1), e.g. ``{"adam": 1e-3}``;
            modes not named get theirs by step-norm matching at the switch.
        optimizers: per mode, a class or name (``torch.optim`` or ``torch_optimizer``) or a
            ``(class_or_name, kwargs)`` pair replacing the default class and hyperparameters.
        strategy: block partition strategy (see :func:`blockopt.partition`).
        steps, probes, seed: Lanczos steps (at most; default 10) and start vectors per block;
            the probe at step ``t`` draws its start vectors from ``seed + t``.
        tol: Lanczos stopping tolerance (default 0.02): a block's run stops after two steps in
            a row that moved its extreme Ritz values by at most this share of their scale, since
            decisions need only each block's curvature scale (see
            :func:`blockopt.block_spectra`); ``None``: every block runs ``steps`` steps.
        probe_every: probe every this many steps; default: an adaptive schedule
            (:class:`blockopt.optimizer.policy.ProbeSchedule`).
        probe_budget: the share of training wall time that probes, learning-rate searches and
            re-checks (failed probes too) may take, in (0, 1), default 3%; ``None``: no budget.
            After each probe the next waits, beyond the adaptive interval and even beyond its
            1000-step cap, until probing again would keep ``opt.probe_share`` within the
            budget, the next probe taken to cost what this one did (the wait is rounded up to
            50, 100, 200, ... steps, so that timing noise rarely moves it); a loss spike brings
            the next probe forward only as far as the budget allows. The first probe always
            runs, whatever it costs (it picks the starting mode), and counts: later probes wait
            until the share is back within the budget. Ignored with ``probe_every``. With a
            budget the probe steps depend on measured time, so two runs of one seed may probe
            at different steps; ``probe_every=N`` or ``probe_budget=None`` repeat to the bit.
        thresholds: :class:`blockopt.optimizer.policy.Thresholds` for switching.
        monitor_only: probe and record, never switch.
        pin_mode: stay in this mode whatever the score (implies no switching).
        max_factor: bound on block SGD's per-block learning-rate factors.
        lr_search, search_steps: when a probe switches to a mode whose learning rate is not
            fixed in ``lrs``, search its learning rate: trials of ``search_steps`` steps on the
            probe's batch on round rates half a decade apart, from the one nearest the step-norm
            match, at most one step up and down while the trials improve (see module doc);
            later probes lower it to a rate whose trial gains at least 1%, in the SGD modes only
            if a trial shows it unstable (the probe's loss more than doubled).
            ``lr_search=False``: keep the step-norm match.
        history: the cap on ``history`` (decisions), ``spectra_history`` (probe results) and
            ``faults`` (failed probes): each keeps at most this many entries, the oldest dropped
            first, and so does ``state_dict()``; memory stays bounded however long training runs.
        logdir, writer: log every probe and switch to TensorBoard, into a new
            ``SummaryWriter`` at ``logdir`` or into your own ``writer`` (see
            :mod:`blockopt.logging.tensorboard`); nothing is logged when neither is given.
        log_figures: also draw the density and JS-matrix figures at every probe.
        distributed: which data-parallel ranks probes combine (docs/DISTRIBUTED.md): ``None``
            those of DDP's group when ``model`` is DistributedDataParallel and
            torch.distributed is initialised; ``True`` always (DDP's or the default group), a
            ``ProcessGroup`` that group, ``False`` none (each rank probes alone).
        distributed_share: when probes combine ranks, how (default ``True``): the ranks share
            the blocks, each rank probing its share on its own probe batch, and gather the
            results in one collective, so a probe costs each rank about ``1/world`` of the
            work and each block's spectrum is that of the rank that probed it; give each
            rank's ``probe`` a full-size batch of its own. ``False``: every rank probes every
            block and each Lanczos step averages the products over the ranks (the spectra of
            the mean of the ranks' losses, at the full cost on every rank). Either way every
            rank gets the same spectra and takes the same decisions.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Callable[[], torch.Tensor] | None = None,
        lr: float = 0.1,
        *,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        mode: str = "sgd",
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_weight_decay: float = 0.0,
        lrs: Mapping[str, float] | None = None,
        optimizers: Mapping[str, Any] | None = None,
        strategy: Strategy = "tensor",
        steps: int = 10,
        tol: float | None = DEFAULT_TOL,
        probes: int = 1,
        seed: int = 0,
        probe_every: int | None = None,
        probe_budget: float | None = DEFAULT_PROBE_BUDGET,
        thresholds: Thresholds | None = None,
        monitor_only: bool = False,
        pin_mode: str | None = None,
        max_factor: float = DEFAULT_MAX_FACTOR,
        lr_search: bool = True,
        search_steps: int = 10,
        history: int = 1000,
        logdir: str | Path | None = None,
        writer: Any = None,
        log_figures: bool = True,
        distributed: Any = None,
        distributed_share: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if probe is not None and not callable(probe):
            raise TypeError(f"probe must be a zero-argument callable, got {type(probe).__name__}")
        for name, value in (("mode", mode), ("pin_mode", pin_mode)):
            if value is not None and value not in MODES:
                raise ValueError(f"unknown {name} {value!r}; modes are {MODES}")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(f"lr must be a number, got {type(lr).__name__} {lr!r}; e.g. lr=0.1")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive int, got {history!r}")
        check_lanczos_settings(steps, probes)
        check_tol(tol)
        if not isinstance(lr_search, bool):
            raise TypeError(f"lr_search must be True or False, got {lr_search!r}")
        if not isinstance(distributed_share, bool):
            raise TypeError(
                "distributed_share must be True (the ranks share a probe's blocks) or False "
                f"(every rank probes every block, averaged), got {distributed_share!r}"
            )
        if isinstance(search_steps, bool) or not isinstance(search_steps, int) or search_steps < 1:
            raise ValueError(f"search_steps must be a positive int, got {search_steps!r}")
        if probe_budget is not None and not is_share(probe_budget):
            raise ValueError(
                "probe_budget must be the share of training wall time probes may take, a "
                f"number in (0, 1) such as 0.03 for 3%, or None for no budget; got {probe_budget!r}"
            )
        _check_options(
            thresholds=thresholds,
            lrs=lrs,
            optimizers=optimizers,
            seed=seed,
            max_factor=max_factor,
            betas=betas,
            hyper={
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "eps": eps,
                "adam_weight_decay": adam_weight_decay,
            },
        )
        self.model = model
        self.probe_model = _eager(model)
        self.probe = probe
        self._reduce = _probe_reduce(model, probe, distributed)
        self.distributed_share = distributed_share
        self.blocks = partition(self.probe_model, strategy)
        if params is None:
            params = [p for p in self.probe_model.parameters() if p.requires_grad]
        params = list(params)
        if not params:
            raise ValueError(
                "params is empty: the optimizer has nothing to train; pass the model's "
                "trainable parameters, or leave params=None for all of them"
            )
        # The groups hold the starting mode's hyperparameters, as the user's optimizer did.
        self._native = _family(pin_mode or mode)
        if self._native == "adam":
            defaults = {
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
                "weight_decay": adam_weight_decay,
            }
        else:
            defaults = {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
            }
        super().__init__(params, defaults)
        _check_params_in_model(self.param_groups, self.probe_model)
        self._sgd_hyper = {
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        self._mode_specs = self._build_specs(
            optimizers or {}, betas=betas, eps=eps, adam_weight_decay=adam_weight_decay
        )
        self._fixed_lrs = dict(lrs or {})
        for m, value in self._fixed_lrs.items():
            if m not in MODES:
                raise ValueError(f"lrs names unknown mode {m!r}; modes are {MODES}")
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"lrs[{m!r}] must be a positive finite number, got {value!r}")
        self._start_lr = lr
        self._scales = {mode: 1.0}
        for m, value in self._fixed_lrs.items():
            if m != mode:
                self._scales[m] = value / lr
        self.mode = pin_mode or mode
        self._scales.setdefault(self.mode, self._fixed_lrs.get(self.mode, lr) / lr)
        self._inner: dict[str, Optimizer] = {}
        self.steps, self.probes, self.seed, self.tol = steps, probes, seed, tol
        self.monitor_only = monitor_only
        self.pin_mode = pin_mode
        self.max_factor = max_factor
        self.lr_search, self.search_steps = lr_search, search_steps
        self._lr_searched = False  # whether the active mode's learning rate came from a search
        self.policy = SwitchPolicy(thresholds or Thresholds())
        self.schedule = ProbeSchedule(every=probe_every, budget=probe_budget)
        self.history: deque[Decision] = deque(maxlen=history)
        self.spectra_history: deque[tuple[int, Spectra]] = deque(maxlen=history)
        self.faults: deque[ProbeFault] = deque(maxlen=history)
        self.last_score: Heterogeneity | None = None
        self.block_factors = dict.fromkeys((b.name for b in self.blocks), 1.0)
        self.step_count = 0
        self.probe_seconds = 0.0
        self._clock_start: float | None = None  # wall time of the first step (since a load)
        self._train_seconds_saved = 0.0  # training wall time before that: from a checkpoint
        self._strategy = strategy
        self.logger = (
            TensorBoardLogger(logdir, writer, figures=log_figures)
            if logdir is not None or writer is not None
            else None
        )
        self._active()  # build the starting mode now, so errors in its settings surface here
        if self.pin_mode is None:  # and try the others, so that no switch fails on them later
            for m in MODES:
                if m != self.mode:
                    self._make(m)

    # -- modes -------------------------------------------------------------------------------

    def _build_specs(
        self, optimizers: Mapping[str, Any], *, betas, eps, adam_weight_decay
    ) -> dict[str, tuple[type[Optimizer], dict[str, Any]]]:
        specs: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
            "sgd": (torch.optim.SGD, {}),
            "block_sgd": (BlockSGD, {}),
            "adam": (
                torch.optim.AdamW,
                {"betas": tuple(betas), "eps": eps, "weight_decay": adam_weight_decay},
            ),
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
            specs[m] = (cls, dict(kwargs))
        return specs

    def _make(self, mode: str) -> Optimizer:
        """Build ``mode``'s optimizer over the wrapper's groups. Modes of the starting mode's
        family (SGD and block SGD, or Adam) take every per-group hyperparameter they know from
        the groups; the other family takes its class's settings and only the learning rate."""
        cls, kwargs = self._mode_specs[mode]
        if cls in (torch.optim.SGD, BlockSGD) and self._native != "sgd":
            kwargs = {**{k: v for k, v in self._sgd_hyper.items()}, **kwargs}
        groups = [
            {"params": g["params"], "lr": g["lr"] * self._scales.get(mode, 1.0)}
            for g in self.param_groups
        ]
        try:
            if cls is BlockSGD:
                opt = BlockSGD(groups, self.blocks, self.block_factors, **kwargs)
            else:
                opt = cls(groups, **kwargs)
        except TypeError as err:
            raise TypeError(f"could not build mode {mode!r} with {cls.__name__}: {err}") from err
        if _family(mode) == self._native:
            for group, inner in zip(self.param_groups, opt.param_groups):
                for key in opt.defaults:
                    if key not in ("lr", "params") and key in group:
                        inner[key] = group[key]
        return opt

    def _active(self) -> Optimizer:
        if self.mode not in self._inner:
            self._inner[self.mode] = self._make(self.mode)
        return self._inner[self.mode]

    def _sync_lr(self, opt: Optimizer, mode: str) -> None:
        scale = self._scales[mode]
        for group, inner in zip(self.param_groups, opt.param_groups):
            inner["lr"] = group["lr"] * scale

    @property
    def active_optimizer(self) -> Optimizer:
        """The optimizer of the current mode."""
        return self._active()

    @property
    def mode_lrs(self) -> dict[str, float]:
        """Each mode's learning rate for the first param group, at the current schedule."""
        lr = self.param_groups[0]["lr"]
        return {m: lr * s for m, s in self._scales.items()}

    # -- stepping ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One optimisation step; probes first when one is due. ``closure`` (optional) is
        called exactly once and its loss returned, as with any ``torch.optim`` optimizer."""
        loss = None
        if self._clock_start is None:
            self._clock_start = time.perf_counter()
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._observe(float(loss.detach()))
        if self.probe is not None and self._probe_due():
            with torch.enable_grad():
                self._probe_or_fault()
        opt = self._active()
        self._sync_lr(opt, self.mode)
        opt.step()
        self.step_count += 1
        return loss

    def _probe_due(self) -> bool:
        """Whether to probe at this step. A probe due while the budget still waits to place an
        earlier probe's cost (one taken before any step was timed) is placed first, and may be
        deferred: that needs the time spent, at a step the step counts alone fix."""
        step = self.step_count
        if self.schedule.due(step) and self.schedule.budget_pending:
            self.schedule.place_pending(step, self._spend(0.0))
        return self.schedule.due(step)

    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """Report the training loss when stepping without a closure (enables spike detection)."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self._observe(value)

    def _observe(self, value: float) -> None:
        """Feed the schedule a training loss; when probes are reduced over ranks, the mean over
        the ranks (one scalar all_reduce), so that every rank sees the same loss spikes: a spike
        moves the next probe and holds block SGD's factors, and both must agree across ranks."""
        if self._reduce is not None and self.probe is not None:
            device = self.blocks[0].parts[0].param.device
            value = float(self._reduce(torch.tensor([value], dtype=torch.float64, device=device)))
        self.schedule.observe_loss(self.step_count, value)

    def _probe_or_fault(self) -> None:
        """Probe; when the probe fails, discard it, warn, log and back off: training goes on.
        The failed probe's time counts as probe time, against the budget too."""
        start = time.perf_counter()
        try:
            self.probe_now()
            return
        except Exception as err:  # a failed probe must never stop training
            fault = ProbeFault(self.step_count, fault_kind(err), f"{type(err).__name__}: {err}")
        cost = time.perf_counter() - start
        self.probe_seconds += cost  # the failed probe left probe_seconds as it found them
        self.faults.append(fault)
        spend = self._spend(cost) if self.schedule.budgeted else None
        self.schedule.after_probe(self.step_count, None, False, spend)
        if fault.kind == "out_of_memory" and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the failed probe's tensors are gone with its traceback
        text = _fault_text(fault, self.mode, self.schedule.next_step, self.schedule.failures)
        warnings.warn(text, ProbeFaultWarning, stacklevel=3)
        if self.logger is not None:
            self.logger.log_event(fault.step, text)

    def probe_now(self) -> Decision | None:
        """Probe immediately, record the result and act on it (the next probe's step too,
        within the budget); returns the decision. Errors propagate (during :meth:`step` a
        failed probe is discarded with a warning instead)."""
        if self.probe is None:
            raise RuntimeError("this optimizer has no probe; pass probe=... to probe")
        with no_sync(self.model):  # a closure calling the DDP wrapper prepares no reduction
            spectra = block_spectra(
                self.probe_model,
                self.probe,
                self.blocks,
                steps=self.steps,
                probes=self.probes,
                seed=self.seed + self.step_count,
                tol=self.tol,
                reduce=self._reduce,
                share=self.distributed_share and isinstance(self._reduce, RankMean),
            )
        score = heterogeneity(spectra)
        factors = block_lr_factors(spectra, max_factor=self.max_factor)
        # Acting on the probe changes several fields; if anything fails on the way (a mode
        # that cannot be built, say), all of them go back: a failed probe leaves no trace.
        saved = self._snapshot()
        try:
            return self._act(spectra, score, factors)
        except BaseException:
            self._install(saved)
            raise

    def _snapshot(self) -> dict[str, Any]:
        """What :meth:`_act` may change, for :meth:`_install` to undo when acting fails."""
        return {
            "probe_seconds": self.probe_seconds,
            "last_score": self.last_score,
            "spectra": list(self.spectra_history),
            "history": list(self.history),
            "block_factors": self.block_factors,
            "scales": dict(self._scales),
            "last_switch": self.policy.last_switch,
            "mode": self.mode,
            "inner": self._inner,
            "lr_searched": self._lr_searched,
        }

    def _install(self, values: Mapping[str, Any]) -> None:
        """Set the recorded fields named in ``values`` (the keys of :meth:`_snapshot` and of
        :meth:`_restore_plan`); every value was checked or saved before, so nothing fails here."""
        for key, attr in _INSTALLED.items():
            if key in values:
                setattr(self, attr, values[key])
        if "train_seconds" in values:  # the clock restarts at the first step after a load
            self._clock_start = None
        for key, records in (
            ("history", self.history),
            ("spectra", self.spectra_history),
            ("faults", self.faults),
        ):
            if key in values:
                records.clear()
                records.extend(values[key])
        if "last_switch" in values:
            self.policy.last_switch = values["last_switch"]
        if "schedule" in values:
            self.schedule.load_state_dict(values["schedule"])
        if "block_sgd" in self._inner:
            self._inner["block_sgd"].set_factors(self.block_factors)

    def _act(self, spectra: Spectra, score: Heterogeneity, factors: dict[str, float]) -> Decision:
        """Record a probe's result, cap SGD's learning rate if needed, decide and switch."""
        seconds_before = self.probe_seconds
        held = 0  # block factors a loss spike kept from rising (see tuning.held_factors)
        if self.schedule.spiked and self.spectra_history:  # factors measured before
            kept = held_factors(factors, self.block_factors)
            held, factors = sum(kept[b] < factors[b] for b in factors), kept
        self.probe_seconds += spectra.seconds
        self.last_score = score
        self.spectra_history.append((self.step_count, spectra))
        self.block_factors = factors
        if "block_sgd" in self._inner:
            self._inner["block_sgd"].set_factors(self.block_factors)
        rho_max = max(score.scales, default=0.0)
        notes: list[str] = []
        if self.pin_mode is not None or self.monitor_only:
            reason = "pinned mode" if self.pin_mode is not None else "monitor only"
            decision = Decision(self.step_count, float(score), self.mode, self.mode, reason)
        else:
            # Cap a grossly unstable SGD learning rate first, so that a switch matches the
            # step SGD would really take; then the new mode's, if it is an SGD mode.
            notes += self._cap_lr(rho_max)
            decision = self.policy.decide(self.step_count, float(score), self.mode, score.max_ratio)
            if decision.switched:
                self.switch(decision.new_mode)
                notes += self._cap_lr(rho_max)
                notes += self._search_lr(recheck=False)
            elif self._lr_searched:
                notes += self._search_lr(recheck=True)
        if held and self.mode == "block_sgd":
            notes.append(f"a loss spike since the last probe: {held} block factor(s) not raised")
        if notes:
            decision = dataclasses.replace(decision, reason="; ".join([decision.reason, *notes]))
        self.history.append(decision)
        if self.logger is not None:
            start = time.perf_counter()
            cost = ProbeCost(self.probe_seconds - seconds_before, spectra.hvps, self.probe_share)
            self.logger.log_probe(
                self.step_count, spectra, score, self.mode, self.block_lrs(), cost
            )
            self.logger.log_decision(decision)
            # writing the probe's dashboards (histograms, figures) is part of what it costs
            self.probe_seconds += time.perf_counter() - start
        seconds = self.probe_seconds - seconds_before  # the probe with its search, if any
        spend = self._spend(seconds) if self.schedule.budgeted else None
        self.schedule.after_probe(self.step_count, float(score), decision.switched, spend)
        return decision

    def _cap_lr(self, rho_max: float) -> list[str]:
        """Scale the active SGD or block-SGD mode's learning rate down when ``lr * rho_max``
        is far beyond SGD's stability limit (:func:`sgd_lr_cap`); returns a note
        for the decision's reason. Modes whose learning rate the user fixed are left alone."""
        opt = self._active()
        if self.mode in self._fixed_lrs or not isinstance(opt, (torch.optim.SGD, BlockSGD)):
            return []
        self._sync_lr(opt, self.mode)
        factor, worst, limit_used = 1.0, 0.0, math.inf
        for group in opt.param_groups:
            mu = group.get("momentum") or 0.0
            if not 0.0 <= mu < 1.0:  # heavy ball has no stable learning rate there
                continue
            limit = sgd_stability_limit(
                mu, group.get("dampening") or 0.0, bool(group.get("nesterov"))
            )
            f = sgd_lr_cap(group["lr"], rho_max, limit)
            if f < factor:
                factor, worst, limit_used = f, group["lr"] * rho_max, limit
        if factor >= 1.0:
            return []
        self._scales[self.mode] *= factor
        self._sync_lr(opt, self.mode)
        return [
            f"{self.mode} learning rate times {factor:.3g}: lr * rho_max was {worst:.3g}, more "
            f"than {UNSTABLE_FACTOR:g} times the stability limit {limit_used:.3g}"
        ]

    def _search_lr(self, recheck: bool) -> list[str]:
        """Search the active mode's learning rate (:mod:`.lr_search`) with trials on the
        probe's batch (:func:`.lr_trials.trial_loss`): after a switch from the round rate
        nearest the current one (:func:`blockopt.optimizer.lr_search.grid_start`), at most
        ``SEARCH_MAX_UP`` half-decades up; at a later probe (``recheck``) only down, to a rate
        that makes real progress, and in the SGD modes only if a trial shows the rate unstable
        (:func:`.lr_search.recheck_multiplier`; there, changes below the schedule's
        ``noise_floor``, 1% of the first training loss, count as noise). Trials run at the
        schedule's base learning rate (``initial_lr``, which schedulers set), so that a warmup
        or decay in progress does not skew the mode's factor, which applies at every point of
        the schedule. A search that fails keeps the learning rate and says why. Returns a note
        for the decision's reason."""
        if not self.lr_search or self.mode in self._fixed_lrs:
            return []
        start = time.perf_counter()
        try:
            found = self._run_search(recheck)
        except Exception as err:  # the probe itself succeeded; keep its result and the lr
            note = (
                f"{self.mode} learning-rate search failed ({type(err).__name__}: {err}); kept "
                f"{self.mode_lrs[self.mode]:.3g}"
            )
            warnings.warn(note, ProbeFaultWarning, stacklevel=6)  # at the caller of step()
            return [note]
        finally:
            self.probe_seconds += time.perf_counter() - start
        self._lr_searched = True
        if found.multiplier == 1.0 and recheck:
            return []
        self._scales[self.mode] *= found.multiplier
        self._sync_lr(self._active(), self.mode)
        tried = ", ".join(
            f"{m:.3g}x: {loss:.4g}" if m else f"before: {loss:.4g}" for m, loss in found.trials
        )
        return [
            f"{self.mode} learning rate {self.mode_lrs[self.mode]:.3g} "
            f"({found.multiplier:.3g} times the previous) from {self.search_steps}-step trials "
            f"on the probe's batch ({tried})"
        ]

    def _run_search(self, recheck: bool) -> LrSearch:
        state = self._active().state_dict()  # its lrs are replaced below
        scale = self._scales[self.mode]
        base_lrs = [g.get("initial_lr", g["lr"]) * scale for g in self.param_groups]
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]

        def scratch(multiplier: float) -> Optimizer:
            opt = self._make(self.mode)
            opt.load_state_dict(copy.deepcopy(state))  # a copy: the live state stays as it is
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * multiplier
            return opt

        def trial(multiplier: float, steps: int | None = None) -> float:
            return trial_loss(
                self.probe_model,
                self.probe,
                params,
                lambda: scratch(multiplier),
                self.search_steps if steps is None else steps,
                self._reduce,
            )

        with no_sync(self.model):
            if recheck:  # from where the rate is, against the loss before any step
                baseline = trial(1.0, steps=0)
                if _family(self.mode) == "sgd":  # stable SGD steps shrink near a minimum
                    floor = self.schedule.noise_floor  # 0: no loss observed
                    return recheck_multiplier(trial, baseline, floor=floor)
                return recheck_multiplier(trial, baseline, keep_stable=False)
            # after a switch, from the round learning rate nearest the step-norm match
            start = grid_start(base_lrs[0]) if base_lrs[0] > 0 else 1.0
            return search_multiplier(trial, start=start, max_up=SEARCH_MAX_UP)

    def _training_seconds(self) -> float:
        """Training wall time, probes included: since the first step (0 before it), plus what
        a loaded checkpoint had trained (counted from the first step after the load)."""
        running = 0.0 if self._clock_start is None else time.perf_counter() - self._clock_start
        return self._train_seconds_saved + running

    @property
    def probe_share(self) -> float:
        """The share of training wall time spent probing so far (probes, learning-rate
        searches, re-checks and failed probes), ``probe_seconds`` over the wall time since the
        first step, in [0, 1]; 0.0 before the first step. The budget keeps it near or below
        ``probe_budget``, except early on, while the first probe's cost dominates."""
        elapsed = self._training_seconds()
        return min(self.probe_seconds / elapsed, 1.0) if elapsed > 0 else 0.0

    def _spend(self, cost: float) -> Spend:
        """The probe time so far for the budget, with ``cost`` the probe just taken's. Under
        DDP the times are averaged over the ranks (one all_reduce of [P, E, c]), so that every
        rank computes the same next probe step."""
        values = [self.probe_seconds, self._training_seconds(), cost]
        if self._reduce is not None:
            device = self.blocks[0].parts[0].param.device
            values = self._reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()
        return Spend(values[0], values[1], self.step_count, values[2])

    def block_lrs(self) -> dict[str, float]:
        """Block name -> the learning rate the current mode applies to it: its param group's
        lr (with the schedule) times the mode's factor, times the block's factor in block SGD.
        For Adam this is the step size before the per-coordinate scaling."""
        group_lr = {}
        for group in self.param_groups:
            for p in group["params"]:
                group_lr[id(p)] = group["lr"] * self._scales.get(self.mode, 1.0)
        lrs = {}
        for block in self.blocks:
            lr = group_lr.get(id(block.parts[0].param))
            if lr is None:
                continue
            if self.mode == "block_sgd":
                lr *= self.block_factors.get(block.name, 1.0)
            lrs[block.name] = lr
        return lrs

    def close(self, metrics: Mapping[str, float] | None = None) -> None:
        """End the TensorBoard run: write the settings and final ``metrics`` (yours, e.g.
        ``{"final/loss": 0.1}``, plus blockopt's final score, mode, switches and probe share)
        to the HParams tab, and flush or close the writer. A no-op without logging."""
        if self.logger is None:
            return
        t = self.policy.thresholds
        hparams = {
            "start_mode": self.history[0].old_mode if self.history else self.mode,
            "lr": self._start_lr,
            "strategy": self._strategy if isinstance(self._strategy, str) else "custom",
            "steps": self.steps,
            "probes": self.probes,
            "tol": self.tol or 0.0,
            "probe_every": self.schedule.every or 0,
            "probe_budget": self.schedule.budget or 0.0,
            "sgd_below": t.sgd_below,
            "adam_above": t.adam_above,
            "margin": t.margin,
            "min_interval": t.min_interval,
            "block_ratio": t.block_ratio,
            "monitor_only": self.monitor_only,
            "pin_mode": self.pin_mode or "none",
        }
        final = {
            "blockopt/final_score": float(self.last_score) if self.last_score else 0.0,
            "blockopt/final_mode": float(MODES.index(self.mode)),
            "blockopt/switch_count": float(sum(d.switched for d in self.history)),
            "blockopt/final_probe_share": self.probe_share,
            **{k: float(v) for k, v in (metrics or {}).items()},
        }
        self.logger.close(hparams, final, step=self.step_count)

    def switch(self, mode: str) -> None:
        """Switch to ``mode`` now, carrying state and matching the step size (see module doc).
        A switch made by hand does not search the learning rate; a probe's switch does."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        if mode == self.mode:
            return
        old = self._active()
        self._sync_lr(old, self.mode)
        old_norm = _step_norm(old)
        new = self._inner.get(mode) or self._make(mode)
        transfer_state(old, new)
        if mode not in self._fixed_lrs:
            self._scales[mode] = 1.0
            self._sync_lr(new, mode)
            new_norm = _step_norm(new)
            if old_norm > 0 and new_norm > 0 and math.isfinite(old_norm / new_norm):
                self._scales[mode] = old_norm / new_norm
            else:
                self._scales.setdefault(mode, 1.0)
        self._inner[mode] = new
        self.mode = mode
        self._lr_searched = False
        self._sync_lr(new, mode)
        # The old mode's state is stale from now on; it is rebuilt from this mode's on return.
        self._inner = {mode: new}

    # -- torch.optim conventions --------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, in types ``torch.load(..., weights_only=True)`` reads
        (dicts, lists, str, int, float, bool, None, tensors)."""
        state = super().state_dict()
        state["blockopt"] = {
            "version": STATE_VERSION,
            "mode": self.mode,
            "scales": {m: float(v) for m, v in self._scales.items()},
            "inner": {m: opt.state_dict() for m, opt in self._inner.items()},
            "schedule": self.schedule.state_dict(),
            "last_switch": self.policy.last_switch,
            "history": [d.to_dict() for d in self.history],
            "spectra": [[step, s.to_dict()] for step, s in self.spectra_history],
            "faults": [f.to_dict() for f in self.faults],
            "block_factors": {b: float(v) for b, v in self.block_factors.items()},
            "step_count": self.step_count,
            "probe_seconds": float(self.probe_seconds),
            "train_seconds": float(self._training_seconds()),
            "lr_searched": self._lr_searched,
            "blocks": [b.name for b in self.blocks],
            "shapes": _group_shapes(self.param_groups),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. Everything is checked and built before
        anything is changed, so a state dict that is corrupt, truncated or from another model
        raises and leaves this optimizer exactly as it was."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "load_state_dict() needs the dict that BlockOptimizer.state_dict() returned, "
                f"got {type(state_dict).__name__}"
            )
        extra = state_dict.get("blockopt")
        if not isinstance(extra, Mapping) or extra.get("version") != STATE_VERSION:
            raise ValueError(
                "not a blockopt optimizer state dict (no 'blockopt' entry of version "
                f"{STATE_VERSION}); load a plain optimizer's state into that optimizer, or "
                "wrap it first and load its state_dict before wrapping"
            )
        base = {k: v for k, v in state_dict.items() if k != "blockopt"}
        plan = self._restore_plan(base, extra)
        # Commit: everything was checked above; nothing below can fail.
        super().load_state_dict(base)
        self._install(plan)

    def _restore_plan(self, base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        """Check a state dict and build what :meth:`load_state_dict` installs, changing
        nothing here: a bad state dict fails before the optimizer is touched."""
        missing = [k for k in _STATE_KEYS if k not in extra]
        if missing:
            raise _bad_state(f"its 'blockopt' entry lacks {', '.join(map(repr, missing))}")
        names = [b.name for b in self.blocks]
        saved = extra["blocks"]
        if not (isinstance(saved, (list, tuple)) and all(isinstance(n, str) for n in saved)):
            raise _bad_state(f"'blocks' is {type(saved).__name__}, not a list of block names")
        if list(saved) != names:
            raise ValueError(
                "the state dict was saved for a model with different blocks "
                f"({len(saved)} blocks, first {list(saved)[:3]}) than this one ({len(names)} "
                f"blocks, first {names[:3]}); load it into the same model"
            )
        if "shapes" in extra:
            _check_shapes(extra["shapes"], _group_shapes(self.param_groups))
        mode = extra["mode"]
        if not isinstance(mode, str) or mode not in MODES:
            raise _bad_state(f"its mode {mode!r} is not one of {MODES}")
        scales = _positive_floats(extra["scales"], "scales", MODES)
        if mode not in scales:
            raise _bad_state(f"'scales' has no entry for its mode {mode!r}")
        factors = _positive_floats(extra["block_factors"], "block_factors", names)
        spectra = [
            (_count(step, f"spectra[{i}] step"), _spectra(data, i))
            for i, (step, data) in enumerate(_pairs(extra["spectra"], "spectra"))
        ]
        last_switch = extra["last_switch"]
        if last_switch is not None:
            last_switch = _count(last_switch, "last_switch")
        probe_seconds = extra["probe_seconds"]
        if not (_is_real(probe_seconds) and math.isfinite(probe_seconds) and probe_seconds >= 0):
            raise _bad_state(f"'probe_seconds' is {probe_seconds!r}, not a non-negative number")
        lr_searched = extra.get("lr_searched", False)
        if not isinstance(lr_searched, bool):
            raise _bad_state(f"'lr_searched' is {lr_searched!r}, not True or False")
        schedule = _schedule_state(self.schedule, extra["schedule"])
        train_seconds = extra.get("train_seconds")
        if train_seconds is None:  # saved before it was recorded: take the budget as kept
            budget = schedule.get("budget", self.schedule.budget) or DEFAULT_PROBE_BUDGET
            train_seconds = probe_seconds / budget
        if not (_is_real(train_seconds) and math.isfinite(train_seconds) and train_seconds >= 0):
            raise _bad_state(f"'train_seconds' is {train_seconds!r}, not a non-negative number")
        self._check_base(base)
        inner = extra["inner"]
        if not isinstance(inner, Mapping) or not set(inner) <= set(MODES):
            raise _bad_state(f"'inner' must map mode names {MODES} to optimizer state dicts")
        return {
            "mode": mode,
            "scales": scales,
            "block_factors": factors,
            "inner": {m: self._restored_mode(m, sd, factors) for m, sd in inner.items()},
            "schedule": schedule,
            "last_switch": last_switch,
            "history": _records(extra["history"], "history", Decision),
            "spectra": spectra,
            "faults": _records(extra.get("faults", []), "faults", ProbeFault),
            "last_score": heterogeneity(spectra[-1][1]) if spectra else None,
            "step_count": _count(extra["step_count"], "step_count"),
            "probe_seconds": float(probe_seconds),
            "train_seconds": float(train_seconds),
            "lr_searched": lr_searched,
        }

    def _check_base(self, base: Mapping[str, Any]) -> None:
        """Try the wrapper's own groups and state on a scratch optimizer over the same groups."""
        scratch = _Scratch([dict(g) for g in self.param_groups], dict(self.defaults))
        _load_checked(scratch, base, "the wrapper")

    def _restored_mode(self, mode: str, sd: Any, factors: Mapping[str, float]) -> Optimizer:
        """A new optimizer of ``mode`` holding the saved state ``sd``, checked against it."""
        opt = self._make(mode)
        _load_checked(opt, sd, f"mode {mode!r}")
        if isinstance(opt, BlockSGD):
            opt.set_factors(factors)
        return opt

    def __repr__(self) -> str:
        return (
            f"BlockOptimizer(mode={self.mode!r}, lr={self.param_groups[0]['lr']:g}, "
            f"blocks={len(self.blocks)}, step={self.step_count})"
        )


_FAULT_FIXES = {
    "non_finite": (
        "the probe's loss or a Hessian-vector product is NaN or Inf",
        "check the probe's batch for NaN/Inf and lower the learning rate if the parameters "
        "diverged; compute the probe's loss in float32 or float64, not float16",
    ),
    "double_backward": (
        "an operation in the probe's graph has no second derivative",
        "replace it by differentiable operations in the probe closure, or pass probe=None",
    ),
    "out_of_memory": (
        "the probe ran out of memory",
        "probe a smaller batch, take fewer Lanczos steps (steps=) or start vectors (probes=), "
        "or probe less often (probe_every=)",
    ),
    "probe_error": (
        "the probe raised an error",
        "fix the probe closure (opt.probe_now() raises the error with its traceback), or pass "
        "probe=None",
    ),
}


def _fault_text(fault: ProbeFault, mode: str, next_step: int, failures: int) -> str:
    """The warning and TensorBoard text for a failed probe: what happened, the fix, what next."""
    cause, fix = _FAULT_FIXES[fault.kind]
    return (
        f"blockopt: the probe at step {fault.step} failed and was discarded: {cause} "
        f"({fault.message}). Fix: {fix}. Training goes on in mode {mode!r}; the next probe is "
        f"at step {next_step} ({failures} failed in a row; retries back off)"
    )


def _probe_reduce(model: nn.Module, probe: Any, option: Any) -> Reduce | None:
    """Refuse FSDP when probing, and pick how probes combine data-parallel ranks."""
    if probe is None:  # nothing to combine unless asked for (a probe may be set later)
        return None if option is None else probe_reduce(model, option)
    reduce = probe_reduce(model, option)
    refuse_sharded(model, "BlockOptimizer")
    if reduce is None and option is False and ddp_of(model) is not None:
        warnings.warn(
            "distributed=False with a DistributedDataParallel model: every rank probes only its "
            "own data and may decide differently, so the ranks' parameters drift apart; leave "
            "distributed=None (average the probes over the ranks) unless the mode is pinned",
            RuntimeWarning,
            stacklevel=3,
        )
    return reduce


# -- input checks ---------------------------------------------------------------------------

_STATE_KEYS = (
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
_BUDGET_STATE = {"budget_step": 0, "pending_cost": None}
# Per-parameter state that torch.optim classes keep in the parameter's shape.
_MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class _Scratch(Optimizer):
    """A bare optimizer over copies of the wrapper's groups, to try a state dict on before the
    wrapper itself is touched."""

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never stepped
        raise RuntimeError("a scratch optimizer does not step")


def _is_real(value: Any) -> bool:
    """A real number, bools excluded (``True`` is no learning rate)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(
    *,
    thresholds: Any,
    lrs: Any,
    optimizers: Any,
    seed: Any,
    max_factor: Any,
    betas: Any,
    hyper: Mapping[str, Any],
) -> None:
    """Refuse option values of the wrong type or range at construction, not at the first probe
    or switch, where they would fail far from their cause."""
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(
            f"thresholds must be a blockopt.Thresholds, got {type(thresholds).__name__}; build "
            "one with blockopt.Thresholds(sgd_below=1.0, adam_above=1.5, margin=0.25, "
            "min_interval=50, block_ratio=2.0)"
        )
    for label, value in (("lrs", lrs), ("optimizers", optimizers)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(
                f"{label} must be a mapping mode name -> setting, e.g. {label}={{'adam': ...}}, "
                f"got {type(value).__name__}"
            )
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not (_is_real(max_factor) and math.isfinite(max_factor) and max_factor >= 1):
        raise ValueError(f"max_factor must be a finite number >= 1, got {max_factor!r}")
    for name, value in hyper.items():
        if not (_is_real(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    if not (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")


def _check_params_in_model(groups: list[dict[str, Any]], model: nn.Module) -> None:
    """Refuse parameters ``model`` does not own: the blocks, probes and block learning rates
    are the model's, and would silently leave such parameters out."""
    owned = {id(p) for p in model.parameters()}
    foreign = [p for g in groups for p in g["params"] if id(p) not in owned]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
        raise ValueError(
            f"{len(foreign)} of the optimizer's parameters (shapes {shapes}"
            f"{', ...' if len(foreign) > 3 else ''}) are not parameters of the "
            f"{type(model).__name__} passed as model; build the optimizer (or params=) over "
            "model.parameters() of the model you pass, or pass the model they belong to"
        )


def _bad_state(problem: str) -> ValueError:
    return ValueError(
        f"cannot load this state dict: {problem}. Nothing was changed; load a state saved by "
        "BlockOptimizer.state_dict() into an optimizer built the same way over the same model"
    )


def _group_shapes(groups: list[dict[str, Any]]) -> list[list[list[int]]]:
    """The shape of every parameter, per param group: identifies the model a state belongs to."""
    return [[list(p.shape) for p in g["params"]] for g in groups]


def _check_shapes(saved: Any, here: list[list[list[int]]]) -> None:
    """Refuse a state saved for parameters of other shapes (another model whose block names
    are the same, such as another width)."""
    try:
        saved = [[[int(d) for d in shape] for shape in group] for group in saved]
    except (TypeError, ValueError):
        raise _bad_state(
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


def _count(value: Any, label: str) -> int:
    if not (_is_int(value) and value >= 0):
        raise _bad_state(f"{label!r} is {value!r}, not a non-negative int")
    return value


def _positive_floats(value: Any, label: str, allowed: Sequence[str]) -> dict[str, float]:
    """``value`` as a dict name -> float, if its names are ``allowed`` and values positive."""
    if not isinstance(value, Mapping):
        raise _bad_state(f"{label!r} is {type(value).__name__}, not a mapping")
    out = {}
    for key, v in value.items():
        if key not in allowed:
            raise _bad_state(f"{label!r} names {key!r}, which this optimizer does not have")
        if not (_is_real(v) and math.isfinite(v) and v > 0):
            raise _bad_state(f"{label}[{key!r}] is {v!r}, not a positive finite number")
        out[key] = float(v)
    return out


def _pairs(value: Any, label: str) -> list:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 for e in value
    ):
        raise _bad_state(f"{label!r} is not a list of [step, spectra] pairs")
    return list(value)


def _spectra(data: Any, index: int) -> Spectra:
    try:
        return Spectra.from_dict(data)
    except (TypeError, ValueError) as err:
        raise _bad_state(f"spectra[{index}] is not a spectra dict ({err})") from err


def _records(value: Any, label: str, cls: type) -> list:
    """Rebuild dataclass records (decisions, probe faults) from their dicts, checking types."""
    if not isinstance(value, (list, tuple)):
        raise _bad_state(f"{label!r} is {type(value).__name__}, not a list")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or set(item) != set(types):
            raise _bad_state(f"{label}[{i}] is not a record with the fields {', '.join(types)}")
        for key, v in item.items():
            t = types[key]
            ok = (
                (isinstance(v, str) and (key not in ("old_mode", "new_mode") or v in MODES))
                if "str" in t
                else _is_int(v)
                if "int" in t
                else _is_real(v)
            )
            if not ok:
                kind = f"mode {MODES}" if key in ("old_mode", "new_mode") else t
                raise _bad_state(f"{label}[{i}][{key!r}] is {v!r}, not a valid {kind}")
        out.append(cls(**item))
    return out


def _schedule_state(current: ProbeSchedule, state: Any) -> dict[str, Any]:
    """The probe-schedule state to load, checked: known keys, number types, valid settings."""
    if not isinstance(state, Mapping):
        raise _bad_state(f"'schedule' is {type(state).__name__}, not a mapping")
    types = {f.name: str(f.type) for f in dataclasses.fields(ProbeSchedule)}
    unknown = sorted(set(state) - set(types))
    if unknown:
        raise _bad_state(f"'schedule' has unknown keys {unknown}")
    for key, v in state.items():
        t = types[key]
        if t == "bool":
            if not isinstance(v, bool):
                raise _bad_state(f"'schedule'[{key!r}] is {v!r}, not True or False")
            continue
        if not ((v is None and "None" in t) or (_is_int(v) if "int" in t else _is_real(v))):
            raise _bad_state(f"'schedule'[{key!r}] is {v!r}, not of type {t}")
        if v is not None and not math.isfinite(v):
            raise _bad_state(f"'schedule'[{key!r}] is {v!r}, not a finite number")
    for key in ("next_step", "losses_seen", "failures", "budget_step"):
        if state.get(key, 0) < 0:
            raise _bad_state(f"'schedule'[{key!r}] is {state[key]!r}, not a count >= 0")
    budget = state.get("budget")
    if budget is not None and not is_share(budget):
        raise _bad_state(f"'schedule'['budget'] is {budget!r}, not a share in (0, 1) or None")
    if (state.get("pending_cost") or 0.0) < 0:
        raise _bad_state(
            f"'schedule'['pending_cost'] is {state['pending_cost']!r}, not seconds >= 0 or None"
        )
    if state.get("interval", 1) < 1:
        raise _bad_state(f"'schedule'['interval'] is {state['interval']!r}, not a step count >= 1")
    if state.get("loss_scale", 0.0) < 0:
        raise _bad_state(
            f"'schedule'['loss_scale'] is {state['loss_scale']!r}, not a magnitude >= 0"
        )
    # A state saved before the budget existed: the budget is this optimizer's, unspent.
    state = {**_BUDGET_STATE, **state}
    try:
        ProbeSchedule(**{**current.state_dict(), **state})
    except (TypeError, ValueError) as err:
        raise _bad_state(f"'schedule' holds invalid settings ({err})") from err
    return dict(state)


def _same_kind(value: Any, ref: Any) -> bool:
    """Whether a loaded hyperparameter has the kind of the one it replaces."""
    if isinstance(ref, bool):
        return isinstance(value, bool)
    if _is_real(ref):
        return _is_real(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    if isinstance(ref, (tuple, list)):
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(ref)
            and all(_same_kind(v, r) for v, r in zip(value, ref))
        )
    if isinstance(ref, str):
        return isinstance(value, str)
    return True


def _load_checked(opt: Optimizer, sd: Any, who: str) -> None:
    """Load ``sd`` into ``opt`` (new or scratch, never the wrapper), then check what torch does
    not: hyperparameter kinds, state for parameters no group lists, and moment shapes."""
    groups = sd.get("param_groups") if isinstance(sd, Mapping) else None
    if not (
        isinstance(sd.get("state") if isinstance(sd, Mapping) else None, Mapping)
        and isinstance(groups, (list, tuple))
        and all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise _bad_state(
            f"the state of {who} is not an optimizer state dict ('state', and 'param_groups' "
            "with 'params' lists)"
        )
    fresh = [dict(g) for g in opt.param_groups]
    try:
        opt.load_state_dict(sd)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        raise _bad_state(f"the state of {who} does not fit its parameters ({err})") from err
    for i, (old, new) in enumerate(zip(fresh, opt.param_groups)):
        for key, ref in old.items():
            if key in ("params", "param_names") or ref is None or key not in new:
                continue
            value = new[key]
            bad_lr = key == "lr" and _is_real(value) and not (math.isfinite(value) and value >= 0)
            if bad_lr or not _same_kind(value, ref):
                raise _bad_state(
                    f"the state of {who}: param group {i}'s {key!r} is {value!r}, not a value "
                    f"like {ref!r}"
                )
    for p, st in opt.state.items():
        if not isinstance(p, torch.Tensor):
            raise _bad_state(
                f"the state of {who} holds state for parameter id {p!r}, which none of its "
                "param groups lists"
            )
        for key in _MOMENT_KEYS:
            value = st.get(key) if isinstance(st, Mapping) else None
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise _bad_state(
                    f"the state of {who}: {key!r} of a parameter of shape {tuple(p.shape)} is "
                    f"{got!r} (truncated, or from another model)"
                )


def _family(mode: str) -> str:
    return "adam" if mode == "adam" else "sgd"


def _step_norm(opt: Optimizer) -> float:
    """The norm of the update ``opt`` would make on its next step, from its state and the
    current gradients: exact for SGD, block SGD and Adam(W) (weight decay aside), a sign-like
    step for other adaptive classes and a gradient step for the rest."""
    total = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.double()
            state = opt.state.get(p, {})
            if isinstance(opt, (torch.optim.SGD, BlockSGD)):
                update = _sgd_update(g, p, group, state)
                scale = opt._scales.get(id(p), 1.0) if isinstance(opt, BlockSGD) else 1.0
                update = update * (scale.double() if isinstance(scale, torch.Tensor) else scale)
            elif isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                update = _adam_update(g, group, state)
            elif "betas" in group:
                update = g / (g.abs() + group.get("eps", 1e-8))
            else:
                update = g
            total += float(update.pow(2).sum()) * group["lr"] ** 2
    return math.sqrt(total)


def _sgd_update(g, p, group, state):
    if group.get("weight_decay"):
        g = g + group["weight_decay"] * p.detach().double()
    mu = group.get("momentum", 0.0)
    if not mu:
        return g
    buf = state.get("momentum_buffer")
    buf = g if buf is None else mu * buf.double() + (1 - group.get("dampening", 0.0)) * g
    return g + mu * buf if group.get("nesterov") else buf


def _adam_update(g, group, state):
    beta1, beta2 = group["betas"]
    step = float(state["step"]) if "step" in state else 0.0
    m = state["exp_avg"].double() if "exp_avg" in state else torch.zeros_like(g)
    v = state["exp_avg_sq"].double() if "exp_avg_sq" in state else torch.zeros_like(g)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** (step + 1))
    v_hat = v / (1 - beta2 ** (step + 1))
    return m_hat / (v_hat.sqrt() + group["eps"])


def wrap(
    optimizer: Optimizer,
    model: nn.Module,
    probe: Callable[[], torch.Tensor] | None = None,
    **options: Any,
) -> BlockOptimizer:
    """Wrap an existing optimizer: keep its parameters, groups and hyperparameters, start in the
    mode it implements (SGD-like classes: ``"sgd"``; others: ``"adam"`` with that class), and
    carry its state. ``options`` are those of :class:`BlockOptimizer`."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"wrap() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, BlockOptimizer):
        raise TypeError("this optimizer is already a BlockOptimizer")
    defaults = dict(optimizer.defaults)
    groups = [dict(g) for g in optimizer.param_groups]
    sgd_like = isinstance(optimizer, torch.optim.SGD) or (
        "momentum" in defaults and "betas" not in defaults
    )
    mode = options.pop("mode", "sgd" if sgd_like else "adam")
    opts = dict(options)
    optimizers = dict(opts.pop("optimizers", {}) or {})
    kwargs = {k: v for k, v in defaults.items() if k not in ("lr", "params", "foreach", "fused")}
    if mode == "sgd" and not isinstance(optimizer, torch.optim.SGD):
        optimizers.setdefault("sgd", (type(optimizer), kwargs))
    elif mode == "adam" and type(optimizer) is not torch.optim.AdamW:
        optimizers.setdefault("adam", (type(optimizer), kwargs))
    elif mode == "adam":
        opts.setdefault("betas", defaults.get("betas", _ADAM_DEFAULTS["betas"]))
        opts.setdefault("eps", defaults.get("eps", _ADAM_DEFAULTS["eps"]))
        opts.setdefault("adam_weight_decay", defaults.get("weight_decay", 0.0))
    if sgd_like:
        for key in _SGD_KEYS:
            if key in defaults:
                opts.setdefault(key, defaults[key])
    wrapped = BlockOptimizer(
        model,
        probe,
        lr=float(defaults.get("lr", groups[0]["lr"])),
        params=groups,
        mode=mode,
        optimizers=optimizers,
        **opts,
    )
    inner = wrapped._active()
    inner.load_state_dict(optimizer.state_dict())
    wrapped._scales[mode] = 1.0
    return wrapped
