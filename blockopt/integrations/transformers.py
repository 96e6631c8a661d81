"""Hugging Face transformers: :class:`BlockoptCallback` runs a :class:`~blockopt.BlockOptimizer`
inside ``Trainer.train``::

    opt = blockopt.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), model, probe=probe)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.add_callback(BlockoptCallback(trainer))
    trainer.train()

The callback needs the trainer itself: the Trainer calls ``optimizer.step()`` without a closure
and hands its callbacks neither the training loss nor itself, so the callback reads each
micro-batch's loss from ``Trainer.training_step`` and adds blockopt's values in
``Trainer.log``, the two methods the Trainer documents for overriding. It wraps them on that
trainer instance from ``on_train_begin`` to ``on_train_end`` and changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from blockopt.integrations import _block_optimizer, _finite_floats, _values
from blockopt.optimizer.block_optimizer import BlockOptimizer

try:
    from transformers import TrainerCallback
    from transformers import __version__ as _transformers_version
except ImportError as err:
    raise ImportError(
        "blockopt.integrations.transformers needs Hugging Face transformers, which could not "
        f"be imported ({err}): pip install transformers"
    ) from err

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # the step's loss is fed there
    raise ImportError(
        "blockopt.integrations.transformers needs a transformers whose TrainerCallback has "
        "on_pre_optimizer_step (the hook before each optimizer step, where the loss is fed), "
        f"and transformers {_transformers_version} has none: pip install -U transformers"
    )

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

__all__ = ["BlockoptCallback"]


class BlockoptCallback(TrainerCallback):
    """Run the Trainer's BlockOptimizer the way the Trainer trains.

    - **Losses.** Before every optimizer step (``on_pre_optimizer_step``) the optimizer is fed
      the step's training loss: the sum of what ``training_step`` returned for the step's
      micro-batches, which the Trainer has already divided by the number of accumulation steps
      (or normalised by the batch's token count), i.e. the mean over the accumulated
      micro-batches, summed in the Trainer's own way: with ``logging_steps=1`` it is exactly
      the ``loss`` the Trainer logs. It is fed where ``step(closure)`` would have fed it, at
      the start of the step, so spike detection and the switch guard act as in a plain loop.
    - **Logs.** Every training log (the ones holding ``loss`` and ``learning_rate``) gets
      ``blockopt/score``, ``blockopt/mode`` (0 sgd, 1 block_sgd, 2 adam), ``blockopt/switches``,
      ``blockopt/probe_share`` and ``blockopt/lr_applied`` (further param groups as
      ``blockopt/lr_applied_pg<i>``), read just after the step as the Trainer reads
      ``learning_rate``, before the scheduler moves it. ``learning_rate`` is the param group's
      rate; ``blockopt/lr_applied`` is what the active mode applied (``opt.applied_lrs``).
      They are added before the Trainer stores the log, so they reach ``state.log_history``
      and every ``report_to`` integration.
    - **Clipping.** ``args.max_grad_norm`` (when positive) becomes ``opt.trial_clip``, so that
      learning-rate trials clip as training does; with no clipping it stays as it is.
    - **Closing.** ``on_train_end`` calls ``opt.close(metrics)`` once, with the run's final
      ``train_loss`` and latest ``eval_*`` values: the Trainer writes no HParams session of its
      own, so blockopt's writer (``logdir=``/``writer=``), if it has one, gets the only one.
    - **Resuming.** Nothing to do: the Trainer saves and loads ``optimizer.state_dict()``,
      which carries all of blockopt's state; build the optimizer the same way before
      ``trainer.train(resume_from_checkpoint=...)``.

    Args:
        trainer: the ``transformers.Trainer`` this callback is added to.
        log: add blockopt's values to the Trainer's training logs.
        feed_losses: feed the training losses to the optimizer.
    """

    def __init__(self, trainer: Trainer, *, log: bool = True, feed_losses: bool = True) -> None:
        if not all(hasattr(trainer, name) for name in ("training_step", "log", "callback_handler")):
            raise TypeError(
                "BlockoptCallback(trainer) needs the transformers.Trainer it runs in, got "
                f"{type(trainer).__name__}: build the Trainer first, then "
                "trainer.add_callback(BlockoptCallback(trainer))"
            )
        self.trainer: Trainer = trainer
        self.log = log
        self.feed_losses = feed_losses
        self.opt: BlockOptimizer | None = None
        self._window: list[torch.Tensor] = []
        self._values: dict[str, float] = {}
        self._wrapped: dict[str, tuple[Callable[..., Any], Callable[..., Any], bool]] = {}
        self._closed = False

    # -- train start: the optimizer, clipping, the two wrappers ---------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Find the BlockOptimizer (built and loaded from a checkpoint by now), pass the
        clipping on and wrap ``training_step`` and ``log``."""
        trainer = self.trainer
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            raise RuntimeError(
                "this BlockoptCallback runs in a Trainer other than the one it was built with: "
                "build one per trainer, trainer.add_callback(BlockoptCallback(trainer))"
            )
        opt = _block_optimizer(trainer.optimizer)
        if opt is None:
            raise TypeError(
                "BlockoptCallback: the Trainer's optimizer is "
                f"{type(_inner(trainer.optimizer)).__name__}, not a BlockOptimizer; pass "
                "optimizers=(blockopt.wrap(optimizer, model, probe=...), None) to the Trainer "
                "(or return one from create_optimizer)"
            )
        self.opt = opt
        self._closed = False
        self._window.clear()
        self._values = _values(opt)
        clip = args.max_grad_norm
        if clip is not None and clip > 0:
            opt.trial_clip = float(clip)
        self._wrap("training_step", self._training_step)
        self._wrap("log", self._log)

    def _wrap(self, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Shadow ``trainer.<name>`` with ``make(original)`` on the instance (once)."""
        if name in self._wrapped:
            return
        trainer = self.trainer
        had_own = name in vars(trainer)
        original = getattr(trainer, name)
        wrapper = make(original)
        setattr(trainer, name, wrapper)
        self._wrapped[name] = (original, wrapper, had_own)

    def _unwrap(self) -> None:
        """Undo :meth:`_wrap`, leaving a wrapper someone put on top of ours."""
        trainer = self.trainer
        for name, (original, wrapper, had_own) in self._wrapped.items():
            if vars(trainer).get(name) is not wrapper:
                continue  # wrapped again since, by someone else: leave theirs
            if had_own:
                setattr(trainer, name, original)
            else:
                delattr(trainer, name)
        self._wrapped = {}

    def _training_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``training_step`` keeping each micro-batch's loss for the step's feed."""

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            if self.feed_losses and isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._window.append(loss.detach())
            return loss

        return training_step

    def _log(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``log`` adding blockopt's values to training logs before the Trainer stores them."""

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if self.log and self.opt is not None and "loss" in logs:
                logs.update(self._values)
            return original(logs, *args, **kwargs)

        return log

    # -- every step ---------------------------------------------------------------------------

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Feed the step's loss, before the step, as ``step(closure)`` would."""
        if not self._window or self.opt is None:
            return
        # summed as the Trainer sums its logged loss: into a scalar of the default dtype
        total = torch.zeros((), device=self._window[0].device)
        for loss in self._window:
            total += loss
        self._window.clear()
        self.opt.observe_loss(total)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Keep the values of the step just taken for the next training log."""
        if self.opt is not None:  # the step's values, before the scheduler moves the rate
            self._values = _values(self.opt)

    # -- the end --------------------------------------------------------------------------------

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Unwrap the trainer's methods and close the optimizer, once."""
        self._unwrap()
        self._window.clear()
        if self._closed or self.opt is None:
            return
        self._closed = True
        final: dict[str, float] = {}
        for entry in state.log_history:
            final.update(
                {
                    k: v
                    for k, v in _finite_floats(entry).items()
                    if k == "train_loss" or k.startswith("eval_")
                }
            )
        self.opt.close(final)


def _inner(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (for error messages)."""
    return getattr(optimizer, "optimizer", optimizer)
