"""The training tasks the demo and the benchmarks share: one registry, so that both train the same
models on the same data with the same seeds.

A :class:`Task` builds a :class:`Workload` for a seed: a fresh model, the loss of training step
``i``, the probe the blockopt optimizers get and the evaluations. :data:`DEMO_TASKS` holds the
demo's tasks (``blockopt demo``); :data:`BENCH_TASKS` the same tasks as the benchmarks run them,
each a :func:`dataclasses.replace` of the demo's that names what differs. :data:`TUNED_LRS` are
the fixed modes' best learning rates on :data:`LR_GRID`, as docs/BENCHMARKS.md reports them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from blockopt.workloads import data, models

__all__ = [
    "BENCH_TASKS",
    "CONTEXT",
    "DEMO_LRS",
    "DEMO_TASKS",
    "EVAL_WINDOWS",
    "HELD_OUT_TEXT",
    "IMAGE_BATCH",
    "LR_GRID",
    "MOMENTUM",
    "PROBE_SHARE",
    "TEXT_BATCH",
    "TUNED_LRS",
    "VOCAB",
    "DigitsTask",
    "Task",
    "TextTask",
    "Workload",
    "corpus",
    "digits",
    "eval_mode",
    "fixed_optimizer",
]

IMAGE_BATCH = 64  # digits per training batch
TEXT_BATCH, CONTEXT, VOCAB = 16, 32, 64  # text windows per batch, characters per window, tokens
# The probe's fixed batch is half a training batch: its products cost about half as much, and on
# the demo's models (seeds 0-2) the probes chose the same modes and learning rates as on a full
# batch (docs/BENCHMARKS.md, "Probe cost", measures what the scores and factors move).
PROBE_SHARE = 2
EVAL_WINDOWS = 256  # text windows in each fixed evaluation batch
HELD_OUT_TEXT = 0.1  # the demo never trains on the last 10% of the text
MOMENTUM = 0.9  # fixed SGD's momentum (and fixed block SGD's, in the benchmark)
# The learning-rate grid of the "Optimizer" benchmark (benchmarks/bench_optimizer.py).
LR_GRID: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
# Each fixed mode's best learning rate on LR_GRID per task: the "Optimizer" section of
# docs/BENCHMARKS.md (400 steps, seed 0); update it when that section is regenerated.
TUNED_LRS: dict[str, dict[str, float]] = {
    "gpt": {"sgd": 0.1, "block_sgd": 3e-3, "adam": 3e-3},
    "vit": {"sgd": 0.01, "block_sgd": 3e-4, "adam": 3e-3},
    "cnn": {"sgd": 0.3, "block_sgd": 0.03, "adam": 0.03},
}


def _next_smaller(lr: float) -> float:
    """The grid's learning rate below ``lr``."""
    return LR_GRID[LR_GRID.index(lr) - 1]


# The demo's fixed SGD and Adam: the tuned rates, except on the CNN, whose best ones sit at the
# edge of stability, where the demo takes the grid's next smaller rate.
DEMO_LRS: dict[str, dict[str, float]] = {
    "gpt": {m: TUNED_LRS["gpt"][m] for m in ("sgd", "adam")},
    "vit": {m: TUNED_LRS["vit"][m] for m in ("sgd", "adam")},
    "cnn": {m: _next_smaller(TUNED_LRS["cnn"][m]) for m in ("sgd", "adam")},
}


def fixed_optimizer(name: str, lr: float, model: nn.Module) -> torch.optim.Optimizer:
    """Fixed ``"sgd"`` (``torch.optim.SGD``, momentum :data:`MOMENTUM`) or ``"adam"``
    (``torch.optim.AdamW``, no weight decay: blockopt's Adam mode), the baselines at ``lr``."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    if name == "adam":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown fixed optimizer {name!r}; choose sgd or adam")


@functools.cache
def digits() -> data.Digits:
    """One fixed train/test split for every seed (the seed moves the init and the batches)."""
    return data.digits(seed=0)


def corpus(vocab_size: int = VOCAB) -> data.Corpus:
    """The ``pydoc_data.topics`` text over ``vocab_size`` tokens, loaded once per process."""
    return _text_corpus(vocab_size)


_text_corpus = functools.cache(data.text_corpus)


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager:
    """Evaluate under ``no_grad`` in eval mode (BatchNorm running statistics), then restore."""

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            model.train(was)

    return scope()


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Workload:
    """One task on one seed: a fresh model, the loss of training step ``i``, the probe, and the
    evaluations (eval mode, no grad), for the demo and the benchmarks alike."""

    model: nn.Module
    train_loss: Callable[[int], torch.Tensor]
    probe: Callable[[], torch.Tensor]
    eval_loss: Callable[[], float]  # the loss on fixed training examples
    held_out: Callable[[], dict[str, float]] | None = None  # "held_out_loss" (and "_accuracy")
    limit: float = math.inf  # a training loss above this counts as divergence (benchmarks)
    probe_batch: Batch | None = None  # the probe's fixed batch, where it has one
    batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def evaluate(self) -> dict[str, float]:
        """``train_loss`` (:attr:`eval_loss`) and the held-out metrics, as the demo logs them."""
        metrics = {"train_loss": self.eval_loss()}
        if self.held_out is not None:
            metrics.update(self.held_out())
        return metrics

    def accuracy(self) -> float | None:
        """The held-out accuracy, or ``None`` for a task without one."""
        return None if self.held_out is None else self.held_out().get("held_out_accuracy")


@dataclass(frozen=True)
class Task:
    """A named task; :meth:`build` gives its workload for a seed."""

    key: str
    title: str

    def build(self, seed: int) -> Workload:
        raise NotImplementedError


@dataclass(frozen=True)
class DigitsTask(Task):
    """A classifier from ``factory`` on scikit-learn's digits: cross-entropy on batches of
    ``batch`` images, the held-out metrics on the test digits."""

    factory: Callable[[], nn.Module]
    batch: int = IMAGE_BATCH
    probe_size: int | None = IMAGE_BATCH // PROBE_SHARE  # images in the probe's batch
    eval_images: int | None = None  # the first this many training digits for eval_loss; None: all

    def build(self, seed: int) -> Workload:
        d = digits()
        torch.manual_seed(seed)
        model = self.factory()
        batches, fixed = data.seeded_batches(len(d.y_train), self.batch, seed)
        fixed = fixed[: self.probe_size]
        px, py = d.x_train[fixed], d.y_train[fixed]
        n = self.eval_images
        ex, ey = (d.x_train, d.y_train) if n is None else (d.x_train[:n], d.y_train[:n])

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

        def train_loss(i: int) -> torch.Tensor:
            idx = batches(i)
            return loss_of(d.x_train[idx], d.y_train[idx])

        def eval_loss() -> float:
            with eval_mode(model):
                return float(loss_of(ex, ey))

        def held_out() -> dict[str, float]:
            with eval_mode(model):
                test = model(d.x_test)
                return {
                    "held_out_loss": float(F.cross_entropy(test, d.y_test)),
                    "held_out_accuracy": float((test.argmax(1) == d.y_test).float().mean()),
                }

        return Workload(
            model,
            train_loss,
            lambda: loss_of(px, py),
            eval_loss,
            held_out,
            limit=100 * math.log(10),
            probe_batch=(px, py),
            batch_loss=loss_of,
        )


@dataclass(frozen=True)
class TextTask(Task):
    """The tiny GPT on ``pydoc_data.topics``: next-character cross-entropy on random windows of
    the first ``1 - held_out`` of the text; the held-out metrics on the rest, if any."""

    batch: int = TEXT_BATCH
    probe_size: int | None = TEXT_BATCH // PROBE_SHARE  # windows in the probe's batch
    context: int = CONTEXT
    vocab: int = VOCAB
    held_out: float = HELD_OUT_TEXT  # the share of the text at its end never trained on
    eval_windows: int = EVAL_WINDOWS  # windows in the fixed evaluation batches

    def build(self, seed: int) -> Workload:
        full = corpus(self.vocab)
        cut = round((1 - self.held_out) * len(full.tokens))
        train = data.Corpus(full.tokens[:cut], full.vocab)
        torch.manual_seed(seed)
        model = models.TinyGPT(vocab_size=len(full.vocab), context=self.context)
        gen = torch.Generator().manual_seed(seed)
        px, py = self._windows(train, self.probe_size or self.batch, 10_000 + seed)
        tx, ty = self._windows(train, self.eval_windows, 20_000)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

        def eval_loss() -> float:
            with eval_mode(model):
                return float(loss_of(tx, ty))

        held_out = None
        if cut < len(full.tokens):
            held = data.Corpus(full.tokens[cut:], full.vocab)
            hx, hy = self._windows(held, self.eval_windows, 30_000)

            def held_out() -> dict[str, float]:
                with eval_mode(model):
                    return {"held_out_loss": float(loss_of(hx, hy))}

        return Workload(
            model,
            lambda _i: loss_of(*data.text_batches(train, self.batch, self.context, generator=gen)),
            lambda: loss_of(px, py),
            eval_loss,
            held_out,
            limit=100 * math.log(len(full.vocab)),
            probe_batch=(px, py),
            batch_loss=loss_of,
        )

    def _windows(self, text: data.Corpus, n: int, seed: int) -> Batch:
        """``n`` random windows of ``text``, drawn from a stream of their own (``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        return data.text_batches(text, n, self.context, generator=gen)


DEMO_TASKS: dict[str, Task] = {
    "gpt": TextTask("gpt", "tiny GPT on pydoc_data.topics text"),
    "vit": DigitsTask("vit", "tiny ViT on scikit-learn digits", models.TinyViT),
    "cnn": DigitsTask("cnn", "BatchNorm CNN on scikit-learn digits", models.SmallCNN),
}
# The benchmarks' variants: their report's titles, eval_loss on 512 training digits, and the GPT
# trained on all of the text (no held-out part) with 128 evaluation windows.
BENCH_TASKS: dict[str, Task] = {
    "cnn": replace(DEMO_TASKS["cnn"], title="BatchNorm CNN, digits", eval_images=512),
    "vit": replace(DEMO_TASKS["vit"], title="Tiny ViT, digits", eval_images=512),
    "gpt": replace(
        DEMO_TASKS["gpt"], title="Tiny GPT, pydoc_data text", held_out=0.0, eval_windows=128
    ),
}
