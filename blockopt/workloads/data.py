"""Real data that ships with installed packages, so nothing is downloaded at run time.

- :func:`digits`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), scaled to
  [0, 1] and split deterministically into train and test sets. Needs scikit-learn.
- :func:`epoch_batches`: the indices of training step ``i``'s batch, in epochs of shuffled data;
  :func:`seeded_batches`: a run's training batches and its fixed probe batch, from its seed.
- :func:`text_corpus` / :func:`text_batches`: the English text of Python's own ``pydoc_data.topics``
  (about 460k characters), as a character-level token stream over a 64-symbol vocabulary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Corpus",
    "Digits",
    "digits",
    "epoch_batches",
    "seeded_batches",
    "text_batches",
    "text_corpus",
]


@dataclass(frozen=True)
class Digits:
    """Train/test tensors: images ``(n, 8, 8)`` float in [0, 1], labels ``(n,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits(
    test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Digits:
    """scikit-learn's digits, shuffled with ``seed`` and split into train and test sets."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set comes with scikit-learn; install it with "
            "`pip install scikit-learn` (or blockopt's `demo` extra)"
        ) from err
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=dtype) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = round(test_fraction * len(y))
    return Digits(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


@dataclass(frozen=True)
class Corpus:
    """A character-level token stream and its vocabulary (``vocab[i]`` is token ``i``'s text)."""

    tokens: torch.Tensor
    vocab: tuple[str, ...]

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def text_corpus(vocab_size: int = 64) -> Corpus:
    """The text of ``pydoc_data.topics`` as tokens: the ``vocab_size - 1`` most frequent
    characters get their own token, every other character maps to one shared token (shown as
    ``"?"``)."""
    from pydoc_data.topics import topics

    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    text = "".join(topics[key] for key in sorted(topics))
    common = [ch for ch, _ in sorted(Counter(text).items(), key=lambda kv: (-kv[1], kv[0]))]
    common = common[: vocab_size - 1]
    index = {ch: i for i, ch in enumerate(common)}
    other = len(common)
    tokens = torch.tensor([index.get(ch, other) for ch in text], dtype=torch.int64)
    return Corpus(tokens, (*common, "?"))


def text_batches(
    corpus: Corpus, batch_size: int, context: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of ``(inputs, targets)``, each ``(batch_size, context)``, targets shifted
    by one character."""
    starts = torch.randint(0, len(corpus.tokens) - context - 1, (batch_size,), generator=generator)
    offsets = torch.arange(context + 1)
    window = corpus.tokens[starts[:, None] + offsets]
    return window[:, :-1], window[:, 1:]


def epoch_batches(
    n: int, batch_size: int, *, generator: torch.Generator
) -> Callable[[int], torch.Tensor]:
    """``batch(i)``: the indices of step ``i``'s batch of ``batch_size`` out of ``n`` examples,
    in epochs of ``n // batch_size`` batches, each epoch a fresh permutation drawn from
    ``generator`` the first time a step of it is asked for (steps come in order in training)."""
    per_epoch = n // batch_size
    orders: list[torch.Tensor] = []

    def batch(i: int) -> torch.Tensor:
        epoch, k = divmod(i, per_epoch)
        while len(orders) <= epoch:
            orders.append(torch.randperm(n, generator=generator))
        return orders[epoch][k * batch_size : (k + 1) * batch_size]

    return batch


def seeded_batches(
    n: int, batch_size: int, seed: int
) -> tuple[Callable[[int], torch.Tensor], torch.Tensor]:
    """Run ``seed``'s batches out of ``n`` examples: ``batch(i)``, step ``i``'s indices
    (:func:`epoch_batches` drawn from ``seed``), and the indices of the run's fixed probe batch,
    drawn from a stream of their own (``10_000 + seed``) so that probing does not move the
    training batches."""
    batch = epoch_batches(n, batch_size, generator=torch.Generator().manual_seed(seed))
    probe = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    return batch, probe[:batch_size]
