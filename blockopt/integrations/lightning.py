"""PyTorch Lightning: :class:`BlockoptCallback` runs a :class:`~blockopt.BlockOptimizer` inside
``Trainer.fit``.

Return ``blockopt.wrap(optimizer, self, probe=...)`` from ``configure_optimizers`` and add
``BlockoptCallback()`` to the trainer's callbacks. The callback derives from the ``Callback`` of
``lightning.pytorch`` when the ``lightning`` package is installed, else of
``pytorch_lightning``; Lightning calls callback hooks by name, so either Trainer runs it.
"""

from __future__ import annotations

import math
import warnings
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from blockopt.integrations import _block_optimizer, _finite_floats, _loss_of, _settings, _values
from blockopt.optimizer.block_optimizer import BlockOptimizer

try:  # the unified ``lightning`` package first, then the standalone ``pytorch_lightning``
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError(
            "blockopt.integrations.lightning needs PyTorch Lightning, which is not installed: "
            "pip install pytorch-lightning (or pip install lightning)"
        ) from err

__all__ = ["BlockoptCallback"]


@dataclass
class _Feed:
    """One BlockOptimizer and the training losses of its current step: the batches since its
    last step (``window``) and how this batch's step went."""

    opt: BlockOptimizer
    prefix: str
    handle: RemovableHandle | None = None
    window: list[float] = field(default_factory=list)
    consumed: bool = False  # the step's closure took this batch's loss (automatic optimisation)
    stepped: bool = False  # stepped with no loss from a closure: the loss is fed at batch end
    observed: bool = False  # your closure returned the loss, and blockopt took it
    attempted: bool = False  # Lightning was about to step (a step AMP skips leaves only this)

    def reset(self) -> None:
        """Forget how the last batch's step went."""
        self.consumed = self.stepped = self.observed = self.attempted = False


@dataclass
class _Patched:
    """A logger whose ``log_hyperparams`` merges blockopt's settings in, and whose ``save``
    logs them first when nothing did, until restored."""

    logger: Any
    originals: dict[str, Callable[..., Any]]  # name -> the method as it was
    own: frozenset[str]  # names the instance already had as attributes of its own
    called: bool = False

    def restore(self) -> None:
        """Put the logger's methods back as they were."""
        for name, original in self.originals.items():
            if name in self.own:
                setattr(self.logger, name, original)
            else:
                vars(self.logger).pop(name, None)


class BlockoptCallback(pl.Callback):
    """Run the trainer's BlockOptimizer(s) the way Lightning trains.

    - **Losses.** Every optimizer step is fed one training loss: the mean of the losses of the
      batches whose gradients it applies. In automatic optimisation Lightning calls
      ``optimizer.step(closure)`` and blockopt observes what the closure returns; the callback
      makes that the mean over the accumulated micro-batches (``training_step``'s losses, not
      Lightning's copies divided by ``accumulate_grad_batches``), so it is fed once, at the
      start of the step, and a short last window of an epoch counts the batches it had. With
      ``accumulate_grad_batches=1`` it is exactly the batch's loss. In manual optimisation (and
      under AMP's ``GradScaler``, which steps without a closure) the loss comes from what
      ``training_step`` returns (a scalar tensor, or a dict with ``loss_key``) and is fed when
      the batch ends, just after the step: the mean over the batches since the previous step of
      that optimizer. A step of yours with a closure that returns the loss is left to blockopt,
      which observes it itself. Every BlockOptimizer that stepped gets the batch's loss; to feed
      each its own (a GAN), pass ``feed_losses=False`` and call ``opt.observe_loss(loss)`` or
      step with a closure.
    - **Logging.** At every training batch, through ``pl_module.log_dict`` (so every Lightning
      logger, the progress bar's ``callback_metrics`` and ``ModelCheckpoint`` see them):
      ``blockopt/score``, ``blockopt/mode`` (0 sgd, 1 block_sgd, 2 adam), ``blockopt/switches``,
      ``blockopt/probe_share`` and ``blockopt/lr_applied`` (the learning rate the active mode
      applied in this step: ``opt.applied_lrs``, not the param group's ``lr``; further groups
      as ``blockopt/lr_applied_pg<i>``). With several BlockOptimizers the prefix is
      ``blockopt<i>``.
    - **Settings.** blockopt's settings (``opt.hparams()``, keys ``blockopt/<name>``) join the
      hyperparameters Lightning logs at fit start, in the same ``log_hyperparams`` call, so each
      logger gets one HParams session holding the model's and blockopt's settings
      (TensorBoardLogger's ``hparams.yaml`` too); when Lightning logs none (no
      ``save_hyperparameters``), blockopt's are logged alone, once, at that point.
      ``Trainer(enable_autolog_hparams=False)`` turns both off.
    - **Clipping.** ``Trainer(gradient_clip_val=c)`` (norm clipping, Lightning's default) sets
      ``opt.trial_clip = c``, so that learning-rate trials clip as training does. Value
      clipping has no trial equivalent: a warning says so and ``trial_clip`` stays as it is,
      as it does when the trainer does not clip (set it yourself when you clip in your code).
    - **Closing.** When training ends each optimizer is closed once. When the trainer's loggers
      got the settings, blockopt's own writer (``logdir=``/``writer=``) is only flushed (or
      closed, if blockopt created it): a second HParams session would duplicate the settings,
      or, with ``writer=trainer.logger.experiment``, split one run's HParams in two. Otherwise
      ``opt.close(metrics)`` writes the HParams session to blockopt's writer, with the
      trainer's scalar ``callback_metrics`` as final metrics.

    Args:
        log: log blockopt's values through ``pl_module.log_dict``.
        feed_losses: feed training losses to the optimizer(s) (see above).
        loss_key: in manual optimisation, the key of the loss when ``training_step`` returns a
            dict (automatic optimisation's is Lightning's ``"loss"``).
    """

    def __init__(
        self, *, log: bool = True, feed_losses: bool = True, loss_key: str = "loss"
    ) -> None:
        super().__init__()
        self.log = log
        self.feed_losses = feed_losses
        self.loss_key = loss_key
        self._feeds: list[_Feed] = []
        self._patched: list[_Patched] = []
        self._trainer: pl.Trainer | None = None
        self._automatic = True
        self._closed = False
        self._warned_no_loss = False

    @property
    def optimizers(self) -> list[BlockOptimizer]:
        """The BlockOptimizers of the fit in progress (or of the last one)."""
        return [feed.opt for feed in self._feeds]

    # -- fit start: find the optimizers, clipping, hooks, settings ------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the BlockOptimizers (built by now, and before Lightning logs hyperparameters),
        pass the clipping on, hook their steps and prepare the loggers for the settings."""
        self._unhook()
        opts = [_block_optimizer(o) for o in trainer.optimizers]
        found = [o for o in opts if o is not None]
        if not found:
            kinds = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
            raise RuntimeError(
                f"BlockoptCallback found no BlockOptimizer among the trainer's optimizers "
                f"({kinds}): return blockopt.wrap(optimizer, self, probe=...) (or a "
                "blockopt.BlockOptimizer) from configure_optimizers, or remove the callback"
            )
        self._trainer = trainer
        self._automatic = bool(pl_module.automatic_optimization)
        self._closed = False
        self._feeds = [
            _Feed(opt, "blockopt" if len(found) == 1 else f"blockopt{i}")
            for i, opt in enumerate(found)
        ]
        for feed in self._feeds:
            self._clip(trainer, feed.opt)
            if self.feed_losses:
                feed.handle = feed.opt.register_step_pre_hook(self._step_hook(feed))
        if trainer.loggers and getattr(trainer, "enable_autolog_hparams", True):
            self._merge_settings(trainer.loggers)

    def _clip(self, trainer: pl.Trainer, opt: BlockOptimizer) -> None:
        """``opt.trial_clip`` from the trainer's norm clipping."""
        clip = trainer.gradient_clip_val
        if not clip or clip <= 0:
            return
        algorithm = trainer.gradient_clip_algorithm
        algorithm = str(getattr(algorithm, "value", algorithm) or "norm").lower()
        if algorithm == "norm":
            opt.trial_clip = float(clip)
            return
        warnings.warn(
            f"the Trainer clips gradients by value (gradient_clip_val={clip}, "
            f"gradient_clip_algorithm={algorithm!r}), which blockopt's learning-rate trials "
            f"cannot do: they clip the gradient norm only, and opt.trial_clip stays "
            f"{opt.trial_clip}; clip by norm (gradient_clip_algorithm='norm'), or set "
            "opt.trial_clip to the norm your value clipping amounts to",
            UserWarning,
            stacklevel=2,
        )

    def _merge_settings(self, loggers: list[Any]) -> None:
        """Make blockopt's settings part of the hyperparameters Lightning logs at fit start:
        each logger's ``log_hyperparams`` (Lightning calls it when the model or datamodule saved
        hyperparameters) merges them in, so that they land in the same HParams session; when
        Lightning calls only the ``save`` that follows (nothing saved), ``save`` logs them
        first, so that files written once (TensorBoardLogger's ``hparams.yaml``) hold them."""
        settings = self._all_settings()
        for logger in loggers:
            names = ("log_hyperparams", "save")
            patch = _Patched(
                logger,
                {name: getattr(logger, name) for name in names},
                frozenset(name for name in names if name in vars(logger)),
            )

            def merged(params: Any, *args: Any, _patch: _Patched = patch, **kwargs: Any) -> Any:
                _patch.called = True
                log = _patch.originals["log_hyperparams"]
                return log({**_as_dict(params), **settings}, *args, **kwargs)

            def save(*args: Any, _patch: _Patched = patch, **kwargs: Any) -> Any:
                if not _patch.called:
                    _patch.called = True
                    _patch.originals["log_hyperparams"](settings)
                return _patch.originals["save"](*args, **kwargs)

            logger.log_hyperparams = merged
            logger.save = save
            self._patched.append(patch)

    def _all_settings(self) -> dict[str, Any]:
        """Every optimizer's settings under its prefix."""
        settings: dict[str, Any] = {}
        for feed in self._feeds:
            settings.update(_settings(feed.opt, feed.prefix))
        return settings

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning has logged its hyperparameters by now: put the loggers back as they were
        (logging blockopt's settings to any that saw neither call, so that none goes without)."""
        pending = [p.logger for p in self._patched if not p.called]
        self._restore_loggers()
        if pending:  # Lightning neither logged hyperparameters nor saved: blockopt's, once
            settings = self._all_settings()
            for logger in pending:
                logger.log_hyperparams(settings)

    def _restore_loggers(self) -> None:
        """Undo :meth:`_merge_settings`."""
        for patch in self._patched:
            patch.restore()
        self._patched = []

    # -- losses -------------------------------------------------------------------------------

    def _step_hook(self, feed: _Feed) -> Callable[..., Any]:
        """A step pre-hook on ``feed.opt`` that replaces the step's closure by one returning the
        loss blockopt should observe (see :meth:`_closure_loss`)."""

        def hook(optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            in_kwargs = "closure" in kwargs
            closure = kwargs["closure"] if in_kwargs else (args[1] if len(args) > 1 else None)
            if closure is None:
                feed.stepped = True
                return None

            def closure_with_step_loss() -> Any:
                return self._closure_loss(feed, closure())

            if in_kwargs:
                return args, {**kwargs, "closure": closure_with_step_loss}
            return (args[0], closure_with_step_loss, *args[2:]), kwargs

        return hook

    def _closure_loss(self, feed: _Feed, loss: Any) -> Any:
        """What the step's closure returns to blockopt. Automatic optimisation: the mean loss
        of the step's micro-batches (Lightning's closure returns the last one's, divided by
        ``accumulate_grad_batches``). Manual: your closure's loss as it is. A closure that
        returns no loss (Lightning's stand-in when you step without one, or a closure you ran
        before stepping) leaves the loss to the batch's end."""
        value = _loss_of(loss) if isinstance(loss, torch.Tensor) else None
        if value is None:
            feed.stepped = True
            return loss
        if not self._automatic:
            feed.observed = True
            return loss
        values = [*feed.window, value]
        feed.window.clear()
        feed.consumed = True
        return torch.tensor(self._mean(values), dtype=torch.float64)

    def _mean(self, values: list[float]) -> float:
        """The mean training loss over a step's batches. In automatic optimisation Lightning's
        losses are divided by ``accumulate_grad_batches``; undone here (exact when it is 1)."""
        trainer = self._trainer
        scale = trainer.accumulate_grad_batches if self._automatic and trainer is not None else 1
        return math.fsum(values) * (scale / len(values))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Note that Lightning is about to step ``optimizer``: a step AMP then skips shows as
        this without a step."""
        opt = _block_optimizer(optimizer)
        for feed in self._feeds:
            if feed.opt is opt:
                feed.attempted = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Feed the losses a closure did not (see :meth:`_settle`), then log blockopt's values
        of the step just taken."""
        if self.feed_losses:
            loss = _loss_of(outputs, "loss" if self._automatic else self.loss_key)
            for feed in self._feeds:
                self._settle(feed, loss)
        if self.log:
            values: dict[str, float] = {}
            for feed in self._feeds:
                values.update(_values(feed.opt, feed.prefix))
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    def _settle(self, feed: _Feed, loss: float | None) -> None:
        """At a batch's end: add its loss to the window, and feed the window's mean when the
        optimizer stepped this batch without a closure that reported it."""
        if not feed.consumed and loss is not None:
            feed.window.append(loss)
        if feed.observed or (feed.attempted and not feed.stepped):
            feed.window.clear()  # blockopt had the loss from a closure, or AMP skipped the step
        elif feed.stepped:
            if feed.window:
                feed.opt.observe_loss(self._mean(feed.window))
            elif not self._warned_no_loss:
                self._warned_no_loss = True
                warnings.warn(
                    "BlockoptCallback: the optimizer stepped, but training_step returned no "
                    f"loss (a scalar tensor, or a dict with {self.loss_key!r}) to feed it; "
                    "return the loss from training_step, so that blockopt's spike detection "
                    "and switch guard see the training loss",
                    UserWarning,
                    stacklevel=2,
                )
            feed.window.clear()
        feed.reset()

    # -- the end --------------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close each optimizer once, writing HParams only where the trainer's loggers did not
        get the settings (see the class doc)."""
        if self._closed:
            return
        self._closed = True
        hparams_logged = bool(trainer.loggers) and getattr(trainer, "enable_autolog_hparams", True)
        for feed in self._feeds:
            if not hparams_logged:
                feed.opt.close(_finite_floats(trainer.callback_metrics))
            elif feed.opt.logger is not None:
                feed.opt.close(hparams=False)  # flush (close a writer of blockopt's)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """A failed fit leaves no hooks or logger patches behind."""
        self._unhook()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After the fit, the optimizers step as they would without the callback."""
        self._unhook()

    def _unhook(self) -> None:
        """Remove the step hooks and logger patches (after a fit, or one that failed)."""
        self._restore_loggers()
        for feed in self._feeds:
            if feed.handle is not None:
                feed.handle.remove()
                feed.handle = None
            feed.window.clear()
            feed.reset()
        self._trainer = None


def _as_dict(params: Any) -> dict[str, Any]:
    """Hyperparameters as Lightning passes them (a dict, an ``AttributeDict``, a
    ``Namespace``) as a plain dict."""
    if isinstance(params, Namespace):
        return dict(vars(params))
    if isinstance(params, Mapping):
        return dict(params)
    raise TypeError(
        f"BlockoptCallback cannot merge blockopt's settings into hyperparameters of type "
        f"{type(params).__name__}; log them as a dict, or pass BlockoptCallback's settings "
        "yourself (opt.hparams())"
    )
