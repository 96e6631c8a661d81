"""blockopt.integrations.lightning against real Lightning on CPU: the losses the optimizer is
fed (automatic and manual optimisation, gradient accumulation), the values logged through the
trainer's loggers, HParams written once, clipping passed to the trials, closing once,
BackboneFinetuning, and imports without transformers."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from integration_support import HIDE, hparams_sessions, spy_losses
from torch import nn

import blockopt

lightning_integration = pytest.importorskip("blockopt.integrations.lightning")
BlockoptCallback = lightning_integration.BlockoptCallback
pl = lightning_integration.pl  # the framework the callback was built on

SWITCH_TO_ADAM = blockopt.Thresholds(sgd_below=0.0, adam_above=0.0, margin=0.0)


def _data(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (2 * x[:, :1] - x[:, 1:2]).tanh()


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
    )


class _Net(pl.LightningModule):
    """A small regression net; ``losses`` holds every loss ``training_step`` computed."""

    def __init__(
        self,
        manual_every: int = 0,
        closure: bool = False,
        hparams: bool = False,
        step_without_closure: bool = False,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if hparams:
            self.save_hyperparameters({"width": 16})
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.manual_every = manual_every
        self.closure = closure
        self.step_without_closure = step_without_closure
        self.automatic_optimization = manual_every == 0
        self.options = options or {}
        self.losses: list[float] = []
        self.received: list[tuple[int, float]] = []
        self.probe_x, self.probe_y = _data(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        if self.automatic_optimization:
            return self._loss(batch)
        opt = self.optimizers()
        if self.closure:

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = self._loss(batch)
                self.manual_backward(loss)
                return loss

            return opt.step(closure=closure)
        loss = self._loss(batch)
        self.manual_backward(loss)
        if (index + 1) % self.manual_every == 0:
            opt.step()
            opt.zero_grad()
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if not self.step_without_closure:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()  # as AMP's GradScaler does: the closure first, then a bare step
        optimizer.step()

    def configure_optimizers(self) -> blockopt.BlockOptimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        opt = blockopt.wrap(
            torch.optim.SGD(trainable, lr=0.05, momentum=0.9),
            self,
            lambda: nn.functional.mse_loss(self(self.probe_x), self.probe_y),
            probe_every=4,
            lr_search=False,
            **self.options,
        )
        self.received = spy_losses(opt)
        return opt


class _Recorder(pl.loggers.Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.hparams: list[dict[str, Any]] = []
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))


class _Truth(pl.Callback):
    """The optimizer's values at the end of every training batch (put one before and one after
    BlockoptCallback to bracket what it logged)."""

    def __init__(self) -> None:
        self.values: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        values = dict(opt.metrics())
        for i, lr in enumerate(opt.applied_lrs[1:], start=1):
            values[f"blockopt/lr_applied_pg{i}"] = lr
        self.values.append(values)


def _trainer(**kwargs: Any) -> pl.Trainer:
    options = {
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "logger": False,
    }
    return pl.Trainer(**{**options, **kwargs})


def _fit(trainer: pl.Trainer, net: _Net, loader: torch.utils.data.DataLoader) -> None:
    _fit_from(trainer, net, loader, None)


def _fit_from(
    trainer: pl.Trainer, net: _Net, loader: torch.utils.data.DataLoader, ckpt_path: str | None
) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", ".*(does not have many workers|LightningModule.log|dirpath has changed).*"
        )
        trainer.fit(net, loader, ckpt_path=ckpt_path)


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _count_calls(obj: Any, name: str) -> list[int]:
    """Count calls to ``obj.name`` (an instance attribute shadowing the method)."""
    calls = [0]
    method = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return method(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


class _CloseCounter(pl.Callback):
    """Counts ``opt.close()`` and ``opt.logger.close()`` calls of the fit's optimizer."""

    def on_fit_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.close = _count_calls(opt, "close")
        self.logger_close = _count_calls(opt.logger, "close") if opt.logger else [0]


def test_automatic_optimisation_feeds_logs_and_writes_hparams_once(tmp_path):
    """20 steps with BackboneFinetuning: each step is fed its batch's loss exactly, once, before
    it steps; the trainer's loggers get blockopt's values at every batch (the mode it switched
    to, the applied rate of both groups), one HParams session holds the model's and blockopt's
    settings, the trials clip as the trainer does, and blockopt's own writer is closed once
    without HParams."""
    torch.manual_seed(0)
    x, y = _data()
    net = _Net(hparams=True, options={"thresholds": SWITCH_TO_ADAM, "logdir": tmp_path / "bo"})
    recorder, before, after, closes = _Recorder(), _Truth(), _Truth(), _CloseCounter()
    tensorboard = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = _trainer(
        max_epochs=2,
        logger=[tensorboard, recorder],
        gradient_clip_val=0.5,
        callbacks=[
            pl.callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1),
            before,
            BlockoptCallback(),
            after,
            closes,
        ],
    )
    _fit(trainer, net, _loader(x, y, 8))
    opt = trainer.optimizers[0]
    assert isinstance(opt, blockopt.BlockOptimizer) and len(opt.param_groups) == 2

    # the losses: one per step, the batch's, at the start of the step it belongs to
    assert len(net.losses) == opt.step_count == 20
    assert net.received == list(enumerate(net.losses))

    # the values logged: those of the optimizer at each batch, applied rates included
    logged = [
        {k: v for k, v in m.items() if k.startswith("blockopt/")}
        for m in recorder.metrics
        if "blockopt/mode" in m
    ]
    assert len(logged) == len(after.values) == 20
    for got, early, want in zip(logged, before.values, after.values):
        assert set(got) == set(want)
        assert got["blockopt/mode"] == want["blockopt/mode"] == early["blockopt/mode"]
        assert got["blockopt/switches"] == want["blockopt/switches"]
        for key in set(want) - {"blockopt/mode", "blockopt/switches", "blockopt/probe_share"}:
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
        # the share of time probing falls between probes: what was logged lies between
        share = got["blockopt/probe_share"]
        assert early["blockopt/probe_share"] * (1 + 1e-6) >= share
        assert share >= want["blockopt/probe_share"] * (1 - 1e-6)
    assert opt.mode == "adam" and logged[-1]["blockopt/mode"] == 2.0
    assert "blockopt/lr_applied_pg1" in logged[-1] and "blockopt/lr_applied_pg1" not in logged[0]
    # the applied rate, not the group's: Adam steps at the step-norm match of SGD's 0.05
    assert logged[-1]["blockopt/lr_applied"] == pytest.approx(opt.applied_lrs[0], rel=1e-6)
    assert abs(opt.applied_lrs[0] - opt.param_groups[0]["lr"]) > 1e-3

    # the settings: one log_hyperparams call per logger, the model's and blockopt's together
    settings = {f"blockopt/{k}": v for k, v in opt.hparams().items()}
    assert recorder.hparams == [{"width": 16, **settings}]
    assert settings["blockopt/lr"] == 0.05 and settings["blockopt/probe_every"] == 4
    (session,) = hparams_sessions(tmp_path / "tb")
    assert session["width"] == 16 and session["blockopt/lr"] == 0.05
    assert _yaml(tmp_path / "tb" / "version_0" / "hparams.yaml") == {"width": 16, **settings}
    assert session["blockopt/start_mode"] == "sgd"
    assert session["blockopt/modes"] == opt.hparams()["modes"]
    assert opt.trial_clip == 0.5

    # blockopt's own writer: its probes are there, no second HParams session, closed once
    assert list((tmp_path / "bo").glob("events.out.tfevents.*"))
    assert hparams_sessions(tmp_path / "bo") == []
    assert closes.close == [1] and closes.logger_close == [1]  # close(hparams=False): no session
    assert not opt.logger.enabled
    assert opt._optimizer_step_pre_hooks == {}  # the callback's hook is gone after the fit


@pytest.mark.parametrize("bare", [False, True], ids=["closure", "bare-step"])
def test_accumulation_feeds_the_mean_of_the_micro_batches_and_closes_into_its_own_writer(
    tmp_path, bare
):
    """accumulate_grad_batches=2 over 5 batches an epoch: windows of 2, 2 and 1 batches, each
    step fed the mean of its batches' losses (not Lightning's last, halved), whether Lightning
    passes its closure to the step or runs it first and steps bare (as under AMP, where the
    loss is fed just after the step); without a trainer logger blockopt's own writer gets the
    one HParams session; value clipping is not passed to the trials, with a warning."""
    torch.manual_seed(0)
    x, y = _data()
    net = _Net(step_without_closure=bare, options={"logdir": tmp_path / "bo"})
    closes = _CloseCounter()
    trainer = _trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        gradient_clip_algorithm="value",
        callbacks=[BlockoptCallback(), closes],
    )
    with pytest.warns(UserWarning, match="clips gradients by value"):
        _fit(trainer, net, _loader(x, y, 16))
    opt = trainer.optimizers[0]
    assert len(net.losses) == 10 and opt.step_count == 6
    windows = [net.losses[i : i + n] for i, n in zip((0, 2, 4, 5, 7, 9), (2, 2, 1, 2, 2, 1))]
    expected = [sum(w) / len(w) for w in windows]
    assert [step for step, _ in net.received] == list(range(1, 7) if bare else range(6))
    assert [v for _, v in net.received] == pytest.approx(expected, rel=1e-12)
    assert net.received[2][1] == net.losses[4]  # a window of one: that batch's loss exactly
    assert opt.trial_clip is None
    assert closes.close == [1] and closes.logger_close == [1]  # opt.close() closes its writer
    (session,) = hparams_sessions(tmp_path / "bo")
    assert session["lr"] == 0.05 and session["probe_every"] == 4


@pytest.mark.parametrize("closure", [False, True], ids=["step-every-2", "closure"])
def test_manual_optimisation_feeds_the_returned_losses_once(tmp_path, closure):
    """Manual optimisation: stepping every second batch without a closure, each step is fed
    the mean of its two batches' returned losses (after the step); stepping with a closure
    that returns the loss, blockopt observes it itself and nothing is fed twice."""
    torch.manual_seed(0)
    x, y = _data()
    net = _Net(manual_every=2, closure=closure)
    recorder = _Recorder()
    tensorboard = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = _trainer(max_epochs=1, logger=[recorder, tensorboard], callbacks=[BlockoptCallback()])
    _fit(trainer, net, _loader(x, y, 8))
    opt = trainer.optimizers[0]
    if closure:
        assert opt.step_count == len(net.losses) == 10
        assert net.received == list(enumerate(net.losses))
    else:
        assert opt.step_count == 5 and len(net.losses) == 10
        pairs = [net.losses[i : i + 2] for i in range(0, 10, 2)]
        assert [step for step, _ in net.received] == [1, 2, 3, 4, 5]  # fed just after its step
        assert [v for _, v in net.received] == pytest.approx([sum(p) / 2 for p in pairs], rel=1e-12)
    modes = [m["blockopt/mode"] for m in recorder.metrics if "blockopt/mode" in m]
    assert len(modes) == 10 and set(modes) == {0.0}  # logged at every batch; stays in SGD
    # no save_hyperparameters: blockopt's settings alone, once, in hparams.yaml too
    settings = {f"blockopt/{k}": v for k, v in opt.hparams().items()}
    assert recorder.hparams == [settings]
    (session,) = hparams_sessions(tmp_path / "tb")
    assert session["blockopt/lr"] == 0.05 and session["blockopt/guard_steps"] == 20
    assert _yaml(tmp_path / "tb" / "version_0" / "hparams.yaml") == settings


def test_resuming_from_a_lightning_checkpoint_is_bitwise(tmp_path):
    """2 epochs straight against 1 epoch, Lightning's checkpoint, and a new fit resumed from it
    (``ckpt_path``): the optimizer state round-trips, and the losses fed, the probes' steps and
    the weights come out the same, bit for bit."""
    x, y = _data()

    def fit(epochs: int, root: Path, ckpt_path: str | None = None) -> tuple[pl.Trainer, _Net]:
        torch.manual_seed(0)
        net = _Net()
        trainer = _trainer(
            max_epochs=epochs,
            callbacks=[BlockoptCallback()],
            enable_checkpointing=True,
            default_root_dir=str(root),
        )
        _fit_from(trainer, net, _loader(x, y, 8), ckpt_path)
        return trainer, net

    straight, net_a = fit(2, tmp_path / "a")
    fit(1, tmp_path / "b")
    (checkpoint,) = (tmp_path / "b").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]["blockopt"]
    assert saved["step_count"] == 10
    resumed, net_c = fit(2, tmp_path / "c", str(checkpoint))
    opt_a, opt_c = straight.optimizers[0], resumed.optimizers[0]
    assert opt_c.step_count == 20 and net_c.received == net_a.received[10:]
    assert [d.step for d in opt_c.history] == [d.step for d in opt_a.history] == [0, 4, 8, 12, 16]
    assert all(torch.equal(a, c) for a, c in zip(net_a.parameters(), net_c.parameters()))


def test_a_trainer_without_a_block_optimizer_is_refused_with_the_fix():
    class Plain(_Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = _data(16)
    trainer = _trainer(max_epochs=1, callbacks=[BlockoptCallback()])
    with pytest.raises(RuntimeError, match=r"no BlockOptimizer.*\(SGD\).*blockopt\.wrap"):
        _fit(trainer, Plain(), _loader(x, y, 8))


def test_importing_blockopt_imports_no_framework_and_lightning_needs_no_transformers():
    """A fresh interpreter with transformers hidden: ``import blockopt`` loads neither
    framework, and the Lightning integration imports and works."""
    script = HIDE.format(names=("transformers",)) + (
        "import blockopt, blockopt.integrations\n"
        "frameworks = {'transformers', 'lightning', 'pytorch_lightning'}\n"
        "assert not frameworks & set(sys.modules), sorted(frameworks & set(sys.modules))\n"
        "from blockopt.integrations.lightning import BlockoptCallback\n"
        "assert 'transformers' not in sys.modules\n"
        "print(type(BlockoptCallback()).__mro__[1].__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "lightning" in done.stdout


def test_a_missing_lightning_raises_an_import_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "blockopt.integrations.lightning")
    with pytest.raises(ImportError, match="pip install pytorch-lightning"):
        importlib.import_module("blockopt.integrations.lightning")
