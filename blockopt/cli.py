"""The ``blockopt`` command line (also ``python -m blockopt``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import data, models
from .spectra import Spectra, block_spectra

__all__ = ["main"]


class UsageError(Exception):
    """A user error: reported as one line on stderr with exit code 2."""


def _digits_probe(model: torch.nn.Module, seed: int) -> Callable[[], torch.Tensor]:
    d = data.digits(seed=seed)
    idx = torch.randperm(len(d.y_train), generator=torch.Generator().manual_seed(seed))[:128]
    x, y = d.x_train[idx], d.y_train[idx]
    return lambda: F.cross_entropy(model(x), y)


def _text_probe(model: models.TinyGPT, seed: int) -> Callable[[], torch.Tensor]:
    corpus = data.text_corpus(vocab_size=64)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.text_batches(corpus, 16, model.context, generator=gen)
    return lambda: F.cross_entropy(model(x).reshape(-1, 64), y.reshape(-1))


DEMO_MODELS = {
    "gpt": ("tiny GPT on pydoc_data.topics text", models.TinyGPT, _text_probe),
    "vit": ("tiny ViT on scikit-learn digits", models.TinyViT, _digits_probe),
    "cnn": ("BatchNorm CNN on scikit-learn digits", models.SmallCNN, _digits_probe),
}


def format_table(spectra: Spectra) -> str:
    """One line per block: size, extreme Ritz values and trace estimate."""
    width = max(len(name) for name in spectra)
    lines = [
        f"{'block':<{width}}  {'numel':>7}  {'lambda_max':>11}  {'lambda_min':>11}  {'trace':>11}"
    ]
    for name, s in spectra.items():
        lines.append(
            f"{name:<{width}}  {s.numel:>7}  {s.lambda_max:>11.3e}  {s.lambda_min:>11.3e}  "
            f"{s.trace:>11.3e}" + ("" if s.status == "ok" else f"  ({s.status})")
        )
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    names = list(DEMO_MODELS) if args.model == "all" else [args.model]
    for name in names:
        title, factory, make_probe = DEMO_MODELS[name]
        torch.manual_seed(args.seed)
        model = factory()
        probe = make_probe(model, args.seed)
        start = time.perf_counter()
        spectra = block_spectra(model, probe, steps=args.steps, seed=args.seed)
        seconds = time.perf_counter() - start
        print(
            f"\n== {title}: {len(spectra)} blocks, {sum(s.numel for s in spectra.values())} "
            f"parameters, {spectra.hvps} Hessian-vector products in {seconds:.1f}s"
        )
        print(format_table(spectra))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockopt",
        description="Blockwise Hessian spectra for PyTorch models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="probe the bundled models on bundled real data and print their block spectra",
        description="Estimate every block's Hessian spectrum of the bundled tiny GPT (pydoc "
        "text), tiny ViT and CNN (scikit-learn digits) at initialisation, and print them.",
    )
    demo.add_argument("--model", choices=["all", *DEMO_MODELS], default="all")
    demo.add_argument("--steps", type=_positive_int, default=30, help="Lanczos steps per block")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as err:
        print(f"blockopt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
