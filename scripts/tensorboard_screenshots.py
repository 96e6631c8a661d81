"""Screenshots of blockopt's TensorBoard dashboards, for the README.

Trains the bundled tiny GPT (on the text of ``pydoc_data.topics``) and the CNN (on scikit-learn
digits) for a few hundred steps under ``blockopt.BlockOptimizer`` with TensorBoard logging,
serves the runs with a real ``tensorboard`` on a free localhost port, and photographs its
dashboards with headless Chromium (Debian's ``chromium`` package)::

    python scripts/tensorboard_screenshots.py            # writes docs/images/tensorboard_*.png

Needs the ``demo`` extra (scikit-learn) and ``chromium`` on the PATH.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import blockopt
from blockopt.logging.tensorboard import tensorboard_server
from blockopt.workloads import data, models

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "custom_scalars": "#custom_scalars",
    "scalars": "#timeseries&tagFilter=blockopt%2F",
    "images": "#images",
    "histograms": "#histograms&tagFilter=blocks.1",
    "text": "#text",
    "hparams": "#hparams",
}


def train(
    logdir: Path,
    model: torch.nn.Module,
    probe: Callable[[], torch.Tensor],
    batch_loss: Callable[[], torch.Tensor],
    lr: float,
    steps: int,
) -> None:
    """Train ``model`` under a wrapped SGD that probes every 50 steps and logs to ``logdir``."""
    opt = blockopt.wrap(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
        model,
        probe,
        probe_every=50,
        steps=20,
        logdir=logdir,
    )
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        loss = batch_loss()
        loss.backward()
        opt.step()
    opt.close({"final/train_loss": loss.item()})


def train_gpt(logdir: Path, steps: int) -> None:
    torch.manual_seed(0)
    model = models.TinyGPT()
    corpus = data.text_corpus(64)
    gen = torch.Generator().manual_seed(0)
    px, py = data.text_batches(corpus, 16, 32, generator=gen)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def batch_loss() -> torch.Tensor:
        return loss_of(*data.text_batches(corpus, 16, 32, generator=gen))

    train(logdir / "tiny_gpt", model, lambda: loss_of(px, py), batch_loss, 0.3, steps)


def train_cnn(logdir: Path, steps: int) -> None:
    torch.manual_seed(0)
    model = models.SmallCNN()
    d = data.digits(seed=0)
    gen = torch.Generator().manual_seed(0)
    probe_idx = torch.randperm(len(d.y_train), generator=gen)[:256]

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(d.x_train[idx]), d.y_train[idx])

    def batch_loss() -> torch.Tensor:
        return loss_of(torch.randint(0, len(d.y_train), (64,), generator=gen))

    train(logdir / "cnn", model, lambda: loss_of(probe_idx), batch_loss, 0.05, steps)


def screenshot(browser: str, url: str, out: Path, size: str) -> None:
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            "--virtual-time-budget=20000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=180,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--size", default="1400,1000", help="browser window, WIDTH,HEIGHT")
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: install Debian's chromium package", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        train_gpt(logdir, args.steps)
        train_cnn(logdir, args.steps)
        with tensorboard_server(logdir, run="tiny_gpt") as url:
            for name, fragment in PAGES.items():
                target = args.out / f"tensorboard_{name}.png"
                screenshot(browser, f"{url}/{fragment}", target, args.size)
                print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
