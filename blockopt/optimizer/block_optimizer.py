"""``BlockOptimizer``: a drop-in ``torch.optim.Optimizer`` that probes blockwise curvature and
switches between SGD, blockwise-learning-rate SGD and Adam on it.

A thin facade over parts with one job each: the set of modes (:mod:`.modeset`: building them,
keeping every hyperparameter in step with ``param_groups``, switching), the probe's measurement
(:mod:`.controller`), the switch policy and schedule (:mod:`.policy`), the learning-rate tuner
(:mod:`.tuner`), the recorder (:mod:`.recorder`) and checkpoints (:mod:`.checkpoint`).

``param_groups`` are the single source of truth for every hyperparameter of every mode (see
:mod:`.modeset` for the key names): before every step the active mode's groups are set from
them, so a scheduler that changes ``lr``, ``momentum``, ``betas`` or ``weight_decay`` changes
what is applied. The learning rate applied is ``group["lr"]`` times the active mode's factor
(``opt.applied_lrs``; 1 for the mode training started in, unless cut as below). On a switch,
state is carried over (:func:`.modes.transfer_state`) and, unless the user fixed the new mode's
learning rate, its factor starts where the first step in the new mode has the same norm as a
step in the old one would have had. When a probe made the switch, a short search then walks the
round rates 10^(k/2) from the one nearest it, at most one step up (more with ``holdout``) and
down as far as trial runs on the probe's batch keep ending lower (up to 8 trials), and a
switch into Adam takes a quarter decade below the best (:data:`.tuner.SEARCH_BACKOFF`); later
probes re-check it downwards, in the SGD modes only when a trial shows it unstable. An SGD
learning rate far beyond SGD's stability limit on the largest block curvature is cut first
(:func:`.tuner.cap_lr`), so that the size carried over is one SGD could take. A probe's
decision is built aside and committed whole: a probe that fails leaves no trace.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from blockopt.analysis.tuning import DEFAULT_MAX_FACTOR
from blockopt.curvature.blocks import Block, Partition, Strategy, partition
from blockopt.curvature.fd_hvp import whole_tensors
from blockopt.curvature.layouts import LayoutWarning
from blockopt.curvature.spectra import BACKENDS
from blockopt.distributed.reductions import RankSettingsError, Reduce, agree_settings, canonical
from blockopt.distributed.wrappers import (
    ddp_of,
    fully_sharded,
    probe_reduce,
    refuse_sharded,
    unwrap,
)
from blockopt.logging.tensorboard import ProbeCost, TensorBoardLogger
from blockopt.optimizer import checkpoint as ckpt
from blockopt.optimizer.controller import (
    DEFAULT_TOL,
    ProbeOutcome,
    ProbeSettings,
    decide,
    measure,
    next_probe_cost,
)
from blockopt.optimizer.faults import fault_text, probe_fault_kind
from blockopt.optimizer.guard import GUARD_WINDOW, Watch, judge, median_after
from blockopt.optimizer.modes import BlockSGD
from blockopt.optimizer.modeset import ActiveMode, ModeSet, family, loss_sign, mode_classes
from blockopt.optimizer.policy import (
    MODES,
    Decision,
    ProbeFault,
    ProbeFaultWarning,
    ProbeSchedule,
    SwitchPolicy,
    Thresholds,
)
from blockopt.optimizer.recorder import Recorder
from blockopt.optimizer.tuner import SearchSettings, TrialSetup
from blockopt.optimizer.validation import (
    check_constructor,
    check_params_in_model,
    check_switching,
    foreign_params,
    is_int,
    is_real,
    plain,
)

__all__ = ["DEFAULT_PROBE_BUDGET", "DEFAULT_TOL", "BlockOptimizer"]

# blockopt's current values go to TensorBoard every this many steps (blockopt.train/...).
LOG_EVERY = 10
# The default share of training wall time that probes (with their learning-rate searches) take.
DEFAULT_PROBE_BUDGET = 0.03
_NO_COPY = (
    "a BlockOptimizer cannot be copied or pickled: it holds the model it probes and a probe "
    "closure over that model, which a copy would not share (its probes would measure the "
    "original model, or fail). Save its state instead: torch.save(opt.state_dict(), path), "
    "then build BlockOptimizer(model, probe, ...) (or wrap(...)) the same way and call "
    "load_state_dict(torch.load(path))"
)


# Signals whose Python handlers wait while a probe's outcome is committed (a handler that saves
# a checkpoint then sees the state before the probe or after it, never half of it).
_DEFERRED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold the signals above (in the main thread, where Python runs handlers) until the body
    is done; a no-op where ``signal.pthread_sigmask`` does not exist (Windows)."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = mask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _hooks_off(opt: Optimizer, *names: str) -> Iterator[None]:
    """torch's own state-dict hooks silenced, so that the wrapper runs them on its whole state."""
    saved = {name: getattr(opt, name) for name in names}
    try:
        for name in names:
            setattr(opt, name, OrderedDict())
        yield
    finally:
        for name, hooks in saved.items():
            setattr(opt, name, hooks)


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
        lrs: fixed learning rates per mode (at schedule factor 1), e.g. ``{"adam": 1e-3}``:
            the first param group's rate in that mode, the other groups keeping their ratio to
            it, never capped or re-checked (the starting mode too, when named); modes not
            named get theirs by step-norm matching at the switch.
        optimizers: per mode, a class or name (``torch.optim`` or ``torch_optimizer``) or a
            ``(class_or_name, kwargs)`` pair replacing the default class and hyperparameters.
        strategy: block partition strategy (see :func:`blockopt.partition`).
        steps, probes, seed: Lanczos steps (at most; default 10) and start vectors per block;
            the probe at step ``t`` draws its start vectors from ``seed + t``.
        tol: Lanczos stopping tolerance (default 0.02): a block's run stops after two steps in
            a row that moved its extreme Ritz values by at most this share of their scale, since
            decisions need only each block's curvature scale (see
            :func:`blockopt.block_spectra`); ``None``: every block runs ``steps`` steps.
        backend: how probes take Hessian-vector products: ``"auto"`` (default: autograd's
            double backward, and finite differences for a probe where that fails), ``"autograd"``
            or ``"fd"`` (finite differences of gradients, the model run as in training); see
            :func:`blockopt.block_spectra`. Half-precision models are probed in float32.
        probe_every: probe every this many steps; default: an adaptive schedule
            (:class:`blockopt.optimizer.policy.ProbeSchedule`).
        probe_budget: the share of training wall time that probes, learning-rate searches and
            re-checks (failed probes too) may take, in (0, 1), default 3%; ``None``: no budget.
            After each probe the next waits, beyond the adaptive interval and even beyond its
            1000-step cap, until probing again would keep ``opt.probe_share`` within the
            budget, the next probe taken to cost what this one did, plus the products of the
            blocks a staged probe left out, which the next one measures (the wait is rounded
            up to 50, 100, 200, ... steps, so that timing noise rarely moves it); a loss spike
            brings the next probe forward only as far as the budget allows. The first probe always
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
            match, at most one step up and down while the trials improve, up to 8 trials;
            a switch into Adam takes ``SEARCH_BACKOFF`` (0.56) times the best trial's rate
            (see module doc);
            later probes lower it to a rate whose trial gains at least 1%, in the SGD modes only
            if a trial shows it unstable (the probe's loss more than doubled).
            ``lr_search=False``: keep the step-norm match.
        holdout: zero-argument callable returning the loss on a batch other than the probe's
            (e.g. the next batch of a validation loader): the trials train on the probe's
            batch and are judged here, so the search climbs while each step up lowers this
            loss by at least 5% (up to 6 half-decades); ``None``: judged on the probe's batch,
            at most one step up.
        modes: the modes probes may choose (default all three), e.g. ``("adam",)`` to tune
            within Adam's family; it must hold the starting mode. A score that calls for a
            mode left out takes the nearest one in the order sgd, block_sgd, adam.
        guard_steps: a probe's switch is judged on this many training losses after it (from
            ``step(closure)`` or :meth:`observe_loss`): if their median ends more than 10%
            above the loss before the switch, the parameters and the old mode's state are put
            back (the step that does so takes no step of its own), and that mode is not
            chosen again (``opt.refused_modes``). Costs a copy of the parameters and of the
            old mode's state while the switch is watched (at most ``2 * guard_steps``
            steps: with fewer losses reported by then, the switch stands). ``None``: switches
            stand.
        history: the cap on ``history`` (decisions), ``spectra_history`` (probe results) and
            ``faults`` (failed probes): each keeps at most this many entries, the oldest dropped
            first, and so does ``state_dict()``; memory stays bounded however long training runs.
        logdir, writer: log every probe and switch to TensorBoard, into a new
            ``SummaryWriter`` at ``logdir`` or into your own ``writer`` (see
            :mod:`blockopt.logging.tensorboard`); nothing is logged when neither is given.
        log_figures: also draw the density heatmap and JS-matrix figures at every probe.
        log_all_blocks: also log per-block scalars and histograms of the blocks the score
            leaves out (round-off and unknown curvature; skipped by default).
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
        staged: measure the largest blocks first, in stages (those holding 50%, 70%, 80%, 90%
            and 95% of the parameters, then the rest), and stop after the first stage whose
            lower bound on the score, whatever the blocks not yet measured hold, takes the
            policy to Adam (which reads neither ``max_ratio`` nor block factors); the next probe
            then measures every block. Default ``True``; pinned and monitored runs measure
            every block. ``False``: every probe measures every block.
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
        maximize: bool = False,
        lrs: Mapping[str, float] | None = None,
        optimizers: Mapping[str, Any] | None = None,
        strategy: Strategy = "tensor",
        steps: int = 10,
        tol: float | None = DEFAULT_TOL,
        probes: int = 1,
        seed: int = 0,
        backend: str = "auto",
        probe_every: int | None = None,
        probe_budget: float | None = DEFAULT_PROBE_BUDGET,
        thresholds: Thresholds | None = None,
        monitor_only: bool = False,
        pin_mode: str | None = None,
        max_factor: float = DEFAULT_MAX_FACTOR,
        lr_search: bool = True,
        search_steps: int = 10,
        holdout: Callable[[], torch.Tensor] | None = None,
        modes: tuple[str, ...] = MODES,
        guard_steps: int | None = GUARD_WINDOW,
        history: int = 1000,
        logdir: str | Path | None = None,
        writer: Any = None,
        log_figures: bool = True,
        log_all_blocks: bool = False,
        distributed: Any = None,
        distributed_share: bool = True,
        staged: bool = True,
    ) -> None:
        # numpy scalars (np.int64(5), np.float32(0.1)) stand for the Python numbers they hold
        lr, momentum, dampening, weight_decay, eps, adam_weight_decay, max_factor = map(
            plain, (lr, momentum, dampening, weight_decay, eps, adam_weight_decay, max_factor)
        )
        steps, probes, seed, history, search_steps, probe_every, guard_steps = map(
            plain, (steps, probes, seed, history, search_steps, probe_every, guard_steps)
        )
        tol, probe_budget = plain(tol), plain(probe_budget)
        if isinstance(betas, (tuple, list)):
            betas = tuple(map(plain, betas))
        if isinstance(lrs, Mapping):
            lrs = {m: plain(v) for m, v in lrs.items()}
        check_constructor(
            model=model,
            probe=probe,
            lr=lr,
            mode=mode,
            pin_mode=pin_mode,
            history=history,
            steps=steps,
            probes=probes,
            tol=tol,
            flags={
                "lr_search": lr_search,
                "nesterov": nesterov,
                "maximize": maximize,
                "monitor_only": monitor_only,
                "log_all_blocks": log_all_blocks,
                "distributed_share": distributed_share,
                "staged": staged,
            },
            search_steps=search_steps,
            probe_budget=probe_budget,
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
        fixed = dict(lrs or {})
        self.model = model
        self.probe_model = unwrap(model)
        self.probe = probe
        self._reduce = _probe_reduce(model, probe, distributed)
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {BACKENDS} (autograd's double backward, finite "
                f"differences, or autograd with finite differences where it fails), got "
                f"{backend!r}"
            )
        self.probe_settings = ProbeSettings(
            steps, probes, seed, tol, max_factor, distributed_share, backend, staged
        )
        self.search_settings = SearchSettings(lr_search, search_steps, frozenset(fixed))
        allowed = check_switching(
            holdout=holdout, modes=modes, start=pin_mode or mode, guard_steps=guard_steps
        )
        self.holdout = holdout
        self.guard_steps = guard_steps
        self._watch: Watch | None = None
        self.fixed_lrs = fixed
        self.strategy = strategy
        start = pin_mode or mode
        sgd = {
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        adam = {
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": adam_weight_decay,
            "maximize": maximize,
        }
        self.modes = ModeSet(mode_classes(optimizers or {}, sgd, adam), start)
        if params is None:
            params = [p for p in self.probe_model.parameters() if p.requires_grad]
            if not params:  # partition() says why: all frozen, or no parameters at all
                partition(self.probe_model, strategy)
        params = list(params)
        if not params:
            raise ValueError(
                "params is empty: the optimizer has nothing to train; pass the model's "
                "trainable parameters, or leave params=None for all of them"
            )
        # The defaults are the starting class's, as in the optimizer the user had, so that
        # schedulers (OneCycleLR's momentum or betas) see its family; groups hold every mode's.
        super().__init__(params, {"lr": lr, **self.modes.native_defaults})
        check_params_in_model(self.param_groups, self.probe_model)
        self.blocks: list[Block] = self._partition()
        self.block_factors = dict.fromkeys((b.name for b in self.blocks), 1.0)
        # A fixed rate is the first group's rate in that mode (what ``mode_lrs`` reports); the
        # other groups keep their ratio to it. ``lr`` is only the default of groups without one.
        base = float(self.param_groups[0]["lr"]) or lr  # a first group at lr 0: the default
        scales = {mode: 1.0, **{m: v / base for m, v in fixed.items()}}
        scales.setdefault(start, 1.0)
        first = self.modes.build(start, self.param_groups, scales[start], self.blocks)
        self._active = ActiveMode(start, first, scales)
        if pin_mode is None:  # build the others once, so that no switch fails on them later
            for m in MODES:
                if m != start:
                    self.modes.build(m, self.param_groups, 1.0, self.blocks)
        self.monitor_only = monitor_only
        self.pin_mode = pin_mode
        self.policy = SwitchPolicy(thresholds or Thresholds(), allowed=allowed)
        self.schedule = ProbeSchedule(every=probe_every, budget=probe_budget)
        logger = (
            TensorBoardLogger(logdir, writer, figures=log_figures, all_blocks=log_all_blocks)
            if logdir is not None or writer is not None
            else None
        )
        self.recorder = Recorder(history, logger)
        self.step_count = 0
        self._start_lr = base

    # -- param groups ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as with any optimizer: it trains in every mode from the next step, its
        missing hyperparameters take the defaults, and its parameters that belong to the model
        join the probe's blocks at the next probe."""
        index = len(self.param_groups)
        if isinstance(param_group, Mapping):  # numpy scalars as the Python numbers they hold
            param_group = {
                k: v if k == "params" else _plain_value(v) for k, v in param_group.items()
            }
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.modes.fill_defaults(group)
            self.modes.check_group(group, index)
            if "_active" in self.__dict__:  # a group added to an optimizer in use
                _check_group_in_model(group, index, self.probe_model)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if "_active" in self.__dict__:
            self.modes.sync(self._active, self.param_groups)

    def _partition(self) -> list[Block]:
        """The model's blocks over this optimizer's parameters (frozen ones left out). A
        layout the partition cannot split is warned about once, at construction, not at every
        probe's re-partition."""
        ids = {id(p) for g in self.param_groups for p in g["params"]}
        with warnings.catch_warnings():
            if self.__dict__.get("_partitioned"):
                warnings.simplefilter("ignore", LayoutWarning)
            blocks = partition(self.probe_model, self.strategy)
        if fully_sharded(self.probe_model):  # slices would cut across FSDP's row shards
            blocks = whole_tensors(blocks)
        self._partitioned = True
        return [b for b in blocks if all(id(p) in ids for p in b.params)]

    def _check_model(self) -> None:
        """Refuse to probe a model whose layers were replaced or deleted since the optimizer was
        built: the optimizer would go on training parameters the model no longer uses."""
        params = (p for g in self.param_groups for p in g["params"])
        count, shapes = foreign_params(params, self.probe_model)
        if count:
            raise RuntimeError(
                f"the model changed after the optimizer was built: {count} of the "
                f"optimizer's parameters (shapes {shapes}) are no longer parameters of the "
                f"{type(self.probe_model).__name__} (a layer was "
                "replaced or deleted), so the optimizer trains tensors the model no longer uses "
                "and probes cannot measure them; build the optimizer again over the model as it "
                "is now (BlockOptimizer(model, probe, ...) or wrap(...)). Parameters frozen, "
                "unfrozen or added (add_param_group) since need no rebuild: probes re-partition"
            )

    def _blocks_now(self) -> list[Block]:
        """The blocks to probe: the current ones, or a new partition when parameters were
        added, unfrozen or frozen since (committed only with a probe that succeeds)."""
        self._check_model()
        blocks = self._partition()
        same = [(b.name, [id(p) for p in b.params]) for b in blocks] == [
            (b.name, [id(p) for p in b.params]) for b in self.blocks
        ]
        return self.blocks if same else blocks

    # -- what it is doing --------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The active mode: ``"sgd"``, ``"block_sgd"`` or ``"adam"``."""
        return self._active.mode

    @property
    def active_optimizer(self) -> Optimizer:
        """The optimizer of the current mode."""
        return self._active.optimizer

    @property
    def mode_scales(self) -> dict[str, float]:
        """Each mode's learning-rate factor: its lr is ``group["lr"]`` times this."""
        return dict(self._active.scales)

    @property
    def lr_searched(self) -> bool:
        """Whether the active mode's learning-rate factor came from a search."""
        return self._active.searched

    @property
    def mode_lrs(self) -> dict[str, float]:
        """Each mode's learning rate for the first param group, at the current schedule."""
        lr = self.param_groups[0]["lr"]
        return {m: lr * s for m, s in self._active.scales.items()}

    @property
    def applied_lrs(self) -> list[float]:
        """The learning rate the active mode applies, per param group: ``group["lr"]`` times
        the mode's factor (before block SGD's block factors and Adam's per-coordinate
        scaling). This, not ``group["lr"]``, is the step size a logger should show."""
        return self.modes.applied_lrs(self._active, self.param_groups)

    @property
    def trial_clip(self) -> float | None:
        """The gradient-norm clipping of learning-rate trials (``None``: none): set it to the
        ``max_norm`` your training loop clips to, so that trials step as training does
        (the Lightning and Hugging Face callbacks set it from the trainer)."""
        return self.search_settings.clip

    @trial_clip.setter
    def trial_clip(self, value: float | None) -> None:
        if value is not None and not (is_real(value) and math.isfinite(value) and value > 0):
            raise ValueError(
                f"trial_clip must be a positive finite max gradient norm or None, got {value!r}"
            )
        clip = None if value is None else float(value)
        self.search_settings = dataclasses.replace(self.search_settings, clip=clip)

    @property
    def steps(self) -> int:
        return self.probe_settings.steps

    @property
    def probes(self) -> int:
        return self.probe_settings.probes

    @property
    def tol(self) -> float | None:
        return self.probe_settings.tol

    @property
    def backend(self) -> str:
        """How probes take their products: "auto", "autograd" or "fd"."""
        return self.probe_settings.backend

    @property
    def max_factor(self) -> float:
        return self.probe_settings.max_factor

    @property
    def distributed_share(self) -> bool:
        return self.probe_settings.share

    @property
    def seed(self) -> int:
        """The probe at step ``t`` draws its start vectors from ``seed + t``."""
        return self.probe_settings.seed

    @seed.setter
    def seed(self, value: int) -> None:
        value = plain(value)
        if not is_int(value):
            raise TypeError(f"seed must be an int, got {type(value).__name__} {value!r}")
        self.probe_settings = dataclasses.replace(self.probe_settings, seed=value)

    @property
    def lr_search(self) -> bool:
        return self.search_settings.enabled

    @property
    def search_steps(self) -> int:
        return self.search_settings.steps

    @property
    def reduce(self) -> Reduce | None:
        """How probes combine data-parallel ranks (``None``: this rank alone): a callable
        averaging a tensor over the ranks, called on every rank at once."""
        return self._reduce

    @reduce.setter
    def reduce(self, value: Reduce | None) -> None:
        self._reduce = value

    @property
    def history(self):
        """Decisions, oldest first (at most ``history`` of them)."""
        return self.recorder.history

    @property
    def spectra_history(self):
        """``(step, Spectra)`` of every probe kept, oldest first."""
        return self.recorder.spectra_history

    @property
    def faults(self):
        """Failed, discarded probes, oldest first."""
        return self.recorder.faults

    @property
    def last_score(self):
        """The last probe's :class:`~blockopt.Heterogeneity`, or None."""
        return self.recorder.last_score

    @property
    def logger(self) -> TensorBoardLogger | None:
        return self.recorder.logger

    @property
    def probe_seconds(self) -> float:
        """Seconds spent probing: probes, searches, re-checks, failed probes, their figures."""
        return self.recorder.probe_seconds

    @probe_seconds.setter
    def probe_seconds(self, value: float) -> None:
        self.recorder.probe_seconds = float(value)

    @property
    def probe_share(self) -> float:
        """The share of training wall time spent probing so far (probes, learning-rate
        searches, re-checks and failed probes), ``probe_seconds`` over the wall time since the
        first step, in [0, 1]; 0.0 before the first step. The budget keeps it near or below
        ``probe_budget``, except early on, while the first probe's cost dominates."""
        return self.recorder.probe_share

    def training_seconds(self) -> float:
        """Training wall time since the first step, plus a loaded checkpoint's."""
        return self.recorder.training_seconds()

    def block_lrs(self) -> dict[str, float]:
        """Block name -> the learning rate the current mode applies to it: its param group's
        lr (with the schedule) times the mode's factor, times the block's factor in block SGD.
        For Adam this is the step size before the per-coordinate scaling."""
        group_lr = {
            id(p): lr for g, lr in zip(self.param_groups, self.applied_lrs) for p in g["params"]
        }
        lrs = {}
        for block in self.blocks:
            lr = group_lr.get(id(block.parts[0].param))
            if lr is None:
                continue
            if self.mode == "block_sgd":
                lr *= self.block_factors.get(block.name, 1.0)
            lrs[block.name] = lr
        return lrs

    # -- stepping ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One optimisation step; probes first when one is due. ``closure`` (optional) is
        called exactly once and its loss returned, as with any ``torch.optim`` optimizer."""
        loss = None
        self.recorder.start_clock()
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if _is_loss(loss):
                self._observe(_loss_value(loss))
        if self._verdict() == "undo":  # this step's gradient is of the parameters put back
            self._undo_switch()
            self.step_count += 1
            return loss
        if self.probe is not None and self._probe_due():
            self._check_model()
            with torch.enable_grad():
                self._probe_or_fault()
        self.modes.sync(self._active, self.param_groups)
        self._active.optimizer.step()
        self.step_count += 1
        if self.logger is not None and self.step_count % LOG_EVERY == 0:
            self.logger.log_training(self.step_count, self.metrics())
        if self._watch is not None and self.step_count - self._watch.step > 2 * (
            self.guard_steps or 0
        ):  # too few training losses reported to judge the switch: let it stand
            self._watch = None
        return loss

    def _probe_due(self) -> bool:
        """Whether to probe at this step. A probe due while the budget still waits to place an
        earlier probe's cost (one taken before any step was timed) is placed first, and may be
        deferred: that needs the time spent, at a step the step counts alone fix. Any other
        probe due under a budget is checked against the time really spent, and may wait."""
        step, schedule = self.step_count, self.schedule
        if schedule.due(step) and schedule.budget_pending:
            schedule.place_pending(step, self._spend(0.0))
        elif schedule.due(step) and schedule.rechecks:  # placed from the mean step time then
            schedule.recheck(step, self._spend(0.0))
        return schedule.due(step)

    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """Report the training loss when stepping without a closure (enables spike detection)."""
        if not _is_loss(loss):
            if isinstance(loss, torch.Tensor):
                shown = f"a tensor of shape {tuple(loss.shape)}"
            else:
                literal = loss is None or isinstance(loss, bool)
                shown = repr(loss) if literal else type(loss).__name__
            raise TypeError(
                f"observe_loss needs the step's training loss as a number or a one-element "
                f"tensor, got {shown}; pass loss (or loss.item()) after loss.backward(), or the "
                "mean of a per-sample loss"
            )
        self._observe(_loss_value(loss))

    def _observe(self, value: float) -> None:
        """Feed the schedule a training loss; when probes are reduced over ranks, the mean over
        the ranks (one scalar all_reduce), so that every rank sees the same loss spikes: a spike
        moves the next probe and holds block SGD's factors, and both must agree across ranks."""
        if self._reduce is not None and self.probe is not None:
            value = float(
                self._reduce(torch.tensor([value], dtype=torch.float64, device=self._device()))
            )
        self.schedule.observe_loss(self.step_count, value)
        if self._watch is not None:
            self._watch = self._watch.seen(value)
            if self._verdict() == "keep":
                self._watch = None

    def _verdict(self) -> str | None:
        """The switch guard's verdict on the watched switch (:func:`.guard.judge`): ``None``
        while there is none to judge yet."""
        if self._watch is None:
            return None
        sign = loss_sign(self.param_groups)
        return judge(self._watch, self.guard_steps or 0, self.schedule.noise_floor, sign)

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _spend(self, cost: float):
        return self.recorder.spend(cost, self.step_count, self._reduce, self._device())

    def _probe_or_fault(self) -> None:
        """Probe; when the probe fails, discard it, warn, log and back off: training goes on.
        The failed probe's time counts as probe time, against the budget too."""
        start = time.perf_counter()
        try:
            self.probe_now()
            return
        except (ckpt.CheckpointDuringProbeError, RankSettingsError):
            raise  # the caller's checkpoint or setup, not the probe, failed: it must hear of it
        except Exception as err:  # a failed probe must never stop training
            fault = ProbeFault(
                self.step_count, probe_fault_kind(err), f"{type(err).__name__}: {err}"
            )
        cost = time.perf_counter() - start
        self.recorder.probe_seconds += cost
        self.recorder.faults.append(fault)
        spend = self._spend(cost) if self.schedule.budgeted else None
        self.schedule.after_probe(self.step_count, None, False, spend)
        if fault.kind == "out_of_memory" and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the failed probe's tensors are gone with its traceback
        text = fault_text(fault, self.mode, self.schedule.next_step, self.schedule.failures)
        warnings.warn(text, ProbeFaultWarning, stacklevel=5)
        if self.logger is not None:
            self.logger.log_event(fault.step, text)

    def probe_now(self) -> Decision | None:
        """Probe immediately, record the result and act on it (the next probe's step too,
        within the budget); returns the decision. Errors propagate (during :meth:`step` a
        failed probe is discarded with a warning instead)."""
        if self.probe is None:
            raise RuntimeError("this optimizer has no probe; pass probe=... to probe")
        blocks = self._blocks_now()
        if self._reduce is not None:  # ranks that differ here would hang in the first collective
            agree_settings(self._rank_settings(blocks), self._reduce, self._device())
        spiked = self.schedule.spiked and bool(self.spectra_history)
        with self._probing():
            outcome = measure(
                self.probe_model,
                self.probe,
                blocks,
                self.probe_settings,
                self.step_count,
                self._reduce,
                self.model,
                dict(self.block_factors) if spiked else None,
                self._settles(blocks),
            )
        return self._act(outcome)

    def _rank_settings(self, blocks: list[Block]) -> dict[str, str]:
        """What every rank must agree on before a probe, as canonical text: the probe's,
        schedule's, search's and guard's settings, the thresholds, the modes allowed and
        refused, the hold, the step, the mode and the blocks: anything that changes which
        collectives the probe runs."""
        search, probe = self.search_settings, self.probe_settings
        schedule = {k: getattr(self.schedule, k) for k in ckpt.SCHEDULE_SETTINGS}
        return {
            **{f.name: canonical(getattr(probe, f.name)) for f in dataclasses.fields(probe)},
            "schedule": canonical(schedule),
            "thresholds": canonical(dataclasses.asdict(self.policy.thresholds)),
            "modes": canonical((self.policy.allowed, sorted(self.policy.refused))),
            "hold": canonical(self._hold()),
            "lr_search": canonical(
                (search.enabled, search.steps, sorted(search.fixed), search.clip)
            ),
            "guard_steps": canonical(self.guard_steps),
            "holdout": canonical(self.holdout is not None),
            "step": canonical(self.step_count),
            "mode": self._active.mode,
            "blocks": "\n".join(b.name for b in blocks),
        }

    def _settles(self, blocks: list[Block]) -> Callable[[float], bool] | None:
        """For a staged probe (``staged``): whether a lower bound on the score settles the
        decision, which it does when every score at or above it, with any ``max_ratio``,
        leads the policy to Adam. ``None`` (probe every block) when probes are not staged,
        when the mode is held (a pinned or monitored run wants every block), or when the last
        probe left a block of ``blocks`` out: then this one measures them all."""
        if not self.probe_settings.staged or self._hold() is not None:
            return None
        if self.spectra_history:
            last = self.spectra_history[-1][1]
            if any(b.name not in last for b in blocks):
                return None
        step, mode, policy = self.step_count, self._active.mode, self.policy
        return lambda bound: policy.settles_adam(step, bound, mode)

    @contextlib.contextmanager
    def _probing(self) -> Iterator[None]:
        """Mark the time the probe closure and learning-rate trials run, when the model holds
        a probe's or a trial's values: :meth:`state_dict` refuses to run then."""
        self._probe_running = True
        try:
            yield
        finally:
            self._probe_running = False

    def _act(self, outcome: ProbeOutcome) -> Decision:
        """Decide on a probe's outcome (:func:`decide`, built aside), then commit it whole,
        record, log and schedule the next probe."""
        setup = TrialSetup(
            self.probe_model,
            self.probe,
            self._reduce,
            outcome.blocks,
            outcome.factors,
            self.schedule.noise_floor,
            self.model,
            self.holdout,
        )
        with self._probing():
            verdict = decide(
                outcome,
                self._active,
                self.policy,
                modes=self.modes,
                groups=self.param_groups,
                search=self.search_settings,
                setup=setup,
                hold=self._hold(),
            )
        # Commit: nothing below can fail, and no signal handler sees half of it.
        active, decision, seconds = verdict.active, verdict.decision, verdict.seconds
        watch = None  # a new decision ends the watch of the last
        if decision.switched and self.guard_steps is not None:
            watch = self._watch_of(outcome.step, decision.new_mode)
        with _signals_deferred():
            self._watch = watch
            if isinstance(active.optimizer, BlockSGD):
                active.optimizer.set_blocks(outcome.blocks, outcome.factors)
            self.blocks = list(outcome.blocks)
            self._active, self.policy = active, verdict.policy
            self.modes.sync(active, self.param_groups)
            self.block_factors = dict(outcome.factors)
            self.recorder.probe_seconds += seconds
            self.recorder.record_probe(outcome.step, outcome.spectra, outcome.score, decision)
        if self.logger is not None:
            start = time.perf_counter()
            cost = ProbeCost(seconds, outcome.spectra.hvps, self.probe_share)
            self.logger.log_probe(
                outcome.step,
                outcome.spectra,
                outcome.score,
                self.mode,
                self.block_lrs(),
                cost,
                self.mode_lrs,
            )
            self.logger.log_decision(decision)
            # writing the probe's dashboards (histograms, figures) is part of what it costs
            logged = time.perf_counter() - start
            self.recorder.probe_seconds += logged
            seconds += logged
        spend = self._spend(next_probe_cost(seconds, outcome)) if self.schedule.budgeted else None
        # an empty score (NaN) is no stable reading: the interval starts over at its base
        self.schedule.after_probe(outcome.step, decision.score, decision.switched, spend)
        return decision

    def _watch_of(self, step: int, mode: str) -> Watch:
        """A watch of the switch to ``mode`` about to be committed: copies of the parameters
        and of the mode it leaves, as they are now (:mod:`.guard`)."""
        old = self._active
        copy_of = self.modes.build(
            old.mode, self.param_groups, old.scale, self.blocks, self.block_factors
        )
        copy_of.load_state_dict(copy.deepcopy(old.optimizer.state_dict()))
        params = [p for g in self.param_groups for p in g["params"]]
        return Watch(
            step=step,
            mode=mode,
            previous=dataclasses.replace(old, optimizer=copy_of),
            previous_blocks=tuple(self.blocks),
            previous_factors=dict(self.block_factors),
            params=tuple(params),
            values=tuple(p.detach().clone() for p in params),
            reference=self.schedule.loss_avg,
        )

    def _undo_switch(self) -> None:
        """Put back the parameters and the mode a watched switch left, and refuse its mode."""
        watch = self._watch
        assert watch is not None
        with torch.no_grad():
            for p, value in zip(watch.params, watch.values):
                p.copy_(value)
        previous = watch.previous
        if isinstance(previous.optimizer, BlockSGD):
            previous.optimizer.set_blocks(watch.previous_blocks, watch.previous_factors)
        self.blocks = list(watch.previous_blocks)
        self.block_factors = dict(watch.previous_factors)
        self._active = previous
        self.modes.sync(previous, self.param_groups)
        self.policy = dataclasses.replace(
            self.policy,
            refused=self.policy.refused | {watch.mode},
            last_switch=self.step_count,
        )
        window = self.guard_steps or 0
        sign = loss_sign(self.param_groups)
        after = sign * median_after(watch, window, sign)
        reason = (
            f"undo: the median training loss over the {window} steps after the switch "
            f"to {watch.mode} at step {watch.step} was {after:.4g}, above "
            f"{watch.reference:.4g} before it; the parameters and {previous.mode}'s state of "
            f"step {watch.step} are back, and {watch.mode} is not chosen again"
        )
        score = float(self.last_score) if self.last_score is not None else float("nan")
        decision = Decision(self.step_count, score, watch.mode, previous.mode, reason)
        self.recorder.history.append(decision)
        self._watch = None
        warnings.warn(reason, ProbeFaultWarning, stacklevel=3)
        if self.logger is not None:
            self.logger.log_decision(decision)

    @property
    def refused_modes(self) -> frozenset[str]:
        """Modes whose switch was undone because training got worse; probes do not choose
        them again."""
        return self.policy.refused

    def _hold(self) -> str | None:
        """Why probes may not switch the mode (``None``: they may)."""
        if self.pin_mode is not None:
            return "pinned mode"
        return "monitor only" if self.monitor_only else None

    def switch(self, mode: str) -> None:
        """Switch to ``mode`` now, carrying state and matching the step size (see module doc).
        A switch made by hand does not search the learning rate; a probe's switch does."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        if mode == self.mode:
            return
        self._active = self.modes.switched(
            self._active,
            mode,
            self.param_groups,
            self.search_settings.fixed,
            self.blocks,
            self.block_factors,
        )

    def hparams(self) -> dict[str, int | float | str | bool]:
        """blockopt's settings, as plain values for an HParams table or a logger's config."""
        t = self.policy.thresholds
        return {
            "start_mode": self.history[0].old_mode if self.history else self.mode,
            "lr": self._start_lr,
            "strategy": (
                self.strategy
                if isinstance(self.strategy, str)
                else repr(self.strategy)
                if isinstance(self.strategy, Partition)
                else "custom"
            ),
            "steps": self.steps,
            "probes": self.probes,
            "tol": self.tol or 0.0,
            "probe_every": self.schedule.every or 0,
            "probe_budget": self.schedule.budget or 0.0,
            "sgd_below": t.sgd_below,
            "adam_above": t.adam_above,
            "margin": t.margin,
            "min_interval": t.min_interval,
            "block_ratio": "off" if t.block_ratio is None else t.block_ratio,
            "monitor_only": self.monitor_only,
            "pin_mode": self.pin_mode or "none",
            "modes": ",".join(self.policy.allowed),
            "holdout": self.holdout is not None,
            "guard_steps": self.guard_steps or 0,
            "staged": self.probe_settings.staged,
        }

    def metrics(self) -> dict[str, float]:
        """blockopt's values now, as floats for any logger: the latest score (NaN before any
        probe, or when the last one kept no block), the mode (its index in ``MODES``), the
        switches so far, the probe share and the learning rate the first group steps at."""
        score = self.last_score
        return {
            "blockopt/score": (
                float(score) if score is not None and score.empty_reason is None else math.nan
            ),
            "blockopt/mode": float(MODES.index(self.mode)),
            "blockopt/switches": float(sum(d.switched for d in self.history)),
            "blockopt/probe_share": self.probe_share,
            "blockopt/lr_applied": float(self.applied_lrs[0]),
        }

    def close(self, metrics: Mapping[str, float] | None = None, *, hparams: bool = True) -> None:
        """End the TensorBoard run: write the settings (:meth:`hparams`) and final ``metrics``
        (yours, e.g. ``{"final/loss": 0.1}``, plus blockopt's final score, mode, switches and
        probe share) to the HParams tab, and flush or close the writer. ``hparams=False``
        only flushes or closes, for a run whose settings another logger already wrote (an
        HParams session per call would split one run in two). A no-op without logging."""
        if self.logger is None:
            return
        if not hparams:
            self.logger.close()
            return
        now = self.metrics()
        final = {
            "blockopt/final_score": now["blockopt/score"],
            "blockopt/final_mode": now["blockopt/mode"],
            "blockopt/switch_count": now["blockopt/switches"],
            "blockopt/final_probe_share": now["blockopt/probe_share"],
            **{k: float(v) for k, v in (metrics or {}).items()},
        }
        self.logger.close(self.hparams(), final, step=self.step_count)

    # -- torch.optim conventions --------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, in types ``torch.load(..., weights_only=True)`` reads
        (dicts, lists, str, int, float, bool, None, tensors). State-dict hooks see (and may
        edit) the whole of it, blockopt's part included. Refused (with
        :class:`~blockopt.optimizer.checkpoint.CheckpointDuringProbeError`) while the probe
        closure or a learning-rate trial runs, e.g. from a signal handler or from inside the
        probe: the model then holds a trial's weights and statistics, which a checkpoint taken
        with it would keep."""
        if self.__dict__.get("_probe_running"):
            raise ckpt.CheckpointDuringProbeError()
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with _hooks_off(
            self, "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks"
        ):
            state = super().state_dict()
        active = self._active
        state["blockopt"] = {
            "version": ckpt.STATE_VERSION,
            "mode": active.mode,
            "family": family(self.modes.native),  # whose names the groups' keys are
            "scales": {m: float(v) for m, v in active.scales.items()},
            "inner": {active.mode: active.optimizer.state_dict()},
            "schedule": self.schedule.state_dict(),
            "last_switch": self.policy.last_switch,
            "refused": sorted(self.policy.refused),
            "history": [d.to_dict() for d in self.history],
            "spectra": [[step, s.to_dict()] for step, s in self.spectra_history],
            "faults": [f.to_dict() for f in self.faults],
            "block_factors": {b: float(v) for b, v in self.block_factors.items()},
            "step_count": self.step_count,
            "probe_seconds": float(self.probe_seconds),
            "train_seconds": float(self.training_seconds()),
            "lr_searched": active.searched,
            "active_state": ckpt.active_state_size(active.optimizer),
            "blocks": [b.name for b in self.blocks],
            "shapes": ckpt.group_shapes(self.param_groups),
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. Everything is checked and built before
        anything is changed, so a state dict that is corrupt, truncated or from another model
        raises and leaves this optimizer exactly as it was. Load pre-hooks see the whole state
        first; post-hooks run once everything is installed. The probe schedule's settings
        (``probe_every``, ``probe_budget``) stay those this optimizer was built with."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "load_state_dict() needs the dict that BlockOptimizer.state_dict() returned, "
                f"got {type(state_dict).__name__}"
            )
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        extra = state_dict.get("blockopt")
        if not isinstance(extra, Mapping) or extra.get("version") != ckpt.STATE_VERSION:
            raise ValueError(
                "not a blockopt optimizer state dict (no 'blockopt' entry of version "
                f"{ckpt.STATE_VERSION}); load a plain optimizer's state into that optimizer, or "
                "wrap it first and load its state_dict before wrapping"
            )
        base = {k: v for k, v in state_dict.items() if k != "blockopt"}
        plan = self._restore_plan(base, extra)
        # Commit: everything was checked above; nothing below can fail.
        with _hooks_off(
            self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ):
            super().load_state_dict(base)
        self._install(plan)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _restore_plan(self, base: Mapping[str, Any], extra: Mapping[str, Any]) -> ckpt.Restored:
        """Check a state dict and build what :meth:`load_state_dict` installs, changing
        nothing here: a bad state dict fails before the optimizer is touched."""
        return ckpt.plan_restore(
            base,
            extra,
            blocks=self.blocks,
            repartition=self._partition,
            groups=self.param_groups,
            defaults=self.defaults,
            schedule=self.schedule,
            modes=self.modes,
            budget=self.schedule.budget or DEFAULT_PROBE_BUDGET,
        )

    def _install(self, plan: ckpt.Restored) -> None:
        """Set what :meth:`_restore_plan` built; every value was checked, so nothing fails."""
        for group in self.param_groups:  # a state saved before a key existed: its default
            self.modes.fill_defaults(group)
        self._active = plan.active
        self.blocks = list(plan.blocks)
        self.block_factors = dict(plan.block_factors)
        self.policy = dataclasses.replace(
            self.policy, last_switch=plan.last_switch, refused=plan.refused
        )
        self._watch = None
        self.schedule.load_state_dict(dict(plan.schedule))
        self.step_count = plan.step_count
        self.recorder.restore(
            history=list(plan.history),
            spectra=list(plan.spectra),
            faults=list(plan.faults),
            last_score=plan.last_score,
            probe_seconds=plan.probe_seconds,
            train_seconds=plan.train_seconds,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> BlockOptimizer:
        raise TypeError(_NO_COPY)

    def __copy__(self) -> BlockOptimizer:
        raise TypeError(_NO_COPY)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(_NO_COPY)

    def __repr__(self) -> str:
        return (
            f"BlockOptimizer(mode={self.mode!r}, lr={self.param_groups[0]['lr']:g}, "
            f"blocks={len(self.blocks)}, step={self.step_count})"
        )


def _is_loss(loss: Any) -> bool:
    """Whether ``loss`` holds one number: a one-element tensor or numpy array, or a real."""
    if isinstance(loss, torch.Tensor):
        return loss.numel() == 1
    if isinstance(loss, np.ndarray):
        return loss.size == 1
    return is_real(loss)


def _loss_value(loss: Any) -> float:
    """A training loss (see :func:`_is_loss`) as a Python float."""
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _plain_value(value: Any) -> Any:
    """A param group's value with numpy scalars (also in a tuple such as betas) as Python
    numbers."""
    if isinstance(value, tuple):
        return tuple(map(plain, value))
    return plain(value)


def _check_group_in_model(group: Mapping[str, Any], index: int, model: nn.Module) -> None:
    """Refuse a group added with ``add_param_group`` whose parameters ``model`` does not own:
    probes and blocks are the model's, and the next probe would refuse the optimizer."""
    count, shapes = foreign_params(group["params"], model)
    if count:
        raise ValueError(
            f"param group {index}: {count} of its parameters (shapes {shapes}) are not "
            f"parameters of the {type(model).__name__} this optimizer probes; add the layer to "
            "the model first, "
            "then add_param_group({'params': layer.parameters()})"
        )


def _probe_reduce(model: nn.Module, probe: Any, option: Any) -> Reduce | None:
    """Refuse FSDP when probing, and pick how probes combine data-parallel ranks."""
    if probe is None:  # nothing to combine unless asked for (a probe may be set later)
        return None if option is None else probe_reduce(model, option)
    reduce = probe_reduce(model, option)
    if not fully_sharded(unwrap(model)):  # fully_shard models are probed by sharded FD
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
