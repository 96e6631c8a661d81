"""blockopt.integrations.transformers against the real Hugging Face Trainer on CPU (a tiny GPT-2
from its config, random init): the losses the optimizer is fed, blockopt's values in
``log_history`` and TensorBoard, clipping passed to the trials, closing once, resuming from a
checkpoint bitwise, and imports without Lightning."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from integration_support import HIDE, hparams_sessions, spy_losses

import blockopt

hf = pytest.importorskip("blockopt.integrations.transformers")
BlockoptCallback = hf.BlockoptCallback
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

VOCAB, LENGTH = 32, 12
DATA = torch.randint(0, VOCAB, (48, LENGTH), generator=torch.Generator().manual_seed(0))


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(DATA)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": DATA[i], "labels": DATA[i]}


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(config)


def _optimizer(model: GPT2LMHeadModel, **options: Any) -> blockopt.BlockOptimizer:
    probe = DATA[:8]
    return blockopt.wrap(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        lambda: model(input_ids=probe, labels=probe).loss,
        probe_every=4,
        lr_search=False,
        **options,
    )


class _Trainer(Trainer):
    """Keeps every loss its ``training_step`` returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro: list[float] = []

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self.micro.append(float(loss))
        return loss


class _Truth(TrainerCallback):
    """The optimizer's values right after each step, by the step number the Trainer logs."""

    def __init__(self, opt: blockopt.BlockOptimizer) -> None:
        self.opt = opt
        self.values: dict[int, dict[str, float]] = {}

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        values = dict(self.opt.metrics())
        self.values[state.global_step + 1] = values


class _TruthAfter(_Truth):
    """The same, as a class of its own (the Trainer warns at a second callback of a class)."""


def _args(out: Path, **kwargs: Any) -> TrainingArguments:
    options = {
        "output_dir": str(out),
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return TrainingArguments(**{**options, **kwargs})


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            found += [(e.step, e.value) for e in ea.Scalars(tag)]
    return found


def test_losses_logs_clipping_and_closing(tmp_path):
    """Gradient accumulation over 2 micro-batches, 6 steps: each step is fed the sum of its
    micro-batches' (already halved) losses once, before it steps, exactly the loss the Trainer
    logs; every training log carries blockopt's values of that step (the mode it switched to,
    the rate Adam applied next to the group's ``learning_rate``) in ``log_history`` and in
    TensorBoard; the trials clip at ``max_grad_norm``; close runs once and writes the only
    HParams session, into blockopt's own writer."""
    model = _model()
    opt = _optimizer(model, logdir=tmp_path / "bo")
    received = spy_losses(opt)
    args = _args(
        tmp_path / "out",
        max_steps=6,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        report_to=["tensorboard"],  # into output_dir
    )
    trainer = _Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))
    before, after = _Truth(opt), _TruthAfter(opt)
    trainer.add_callback(before)
    trainer.add_callback(BlockoptCallback(trainer))
    trainer.add_callback(after)
    closes = [0]
    close = opt.close

    def counted_close(metrics=None):
        closes[0] += 1
        close(metrics)

    opt.close = counted_close
    trainer.train()

    # the losses: one per step, at its start, the sum of its micro-batches' losses
    assert opt.step_count == 6 and len(trainer.micro) == 12
    assert [step for step, _ in received] == list(range(6))
    sums = [math.fsum(trainer.micro[i : i + 2]) for i in range(0, 12, 2)]
    assert [v for _, v in received] == pytest.approx(sums, rel=1e-6)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in received] == [e["loss"] for e in logs]  # the Trainer's loss, bitwise

    # the logs: blockopt's values of each step, the applied rate next to the group's
    assert opt.mode == "adam" and opt.history[0].new_mode == "adam"
    for entry in logs:
        step = entry["step"]
        want, early = after.values[step], before.values[step]
        for key in ("blockopt/mode", "blockopt/score", "blockopt/switches"):
            assert entry[key] == want[key] == early[key], key
        assert early["blockopt/probe_share"] >= entry["blockopt/probe_share"]
        assert entry["blockopt/probe_share"] >= want["blockopt/probe_share"]
        assert entry["blockopt/lr_applied"] == want["blockopt/lr_applied"]
        assert entry["blockopt/mode"] == 2.0
        scale = opt.mode_scales["adam"]
        assert entry["blockopt/lr_applied"] == pytest.approx(entry["learning_rate"] * scale)
        assert abs(entry["blockopt/lr_applied"] - entry["learning_rate"]) > 1e-4
    modes = _scalars(tmp_path / "out", "train/blockopt/mode")
    assert modes == [(e["step"], e["blockopt/mode"]) for e in logs]  # report_to got them
    lrs = _scalars(tmp_path / "out", "train/blockopt/lr_applied")
    assert [v for _, v in lrs] == pytest.approx([e["blockopt/lr_applied"] for e in logs])

    # clipping and closing
    assert opt.trial_clip == 0.5
    assert closes == [1]
    (session,) = hparams_sessions(tmp_path / "bo")
    assert session["lr"] == 0.05 and session["probe_every"] == 4 and session["start_mode"] == "sgd"
    (final,) = _scalars(tmp_path / "bo", "train_loss")
    assert final[1] == pytest.approx(trainer.state.log_history[-1]["train_loss"])
    assert not opt.logger.enabled  # its own writer, closed
    assert "training_step" not in vars(trainer) and "log" not in vars(trainer)


def _run(out: Path, resume: str | None = None) -> tuple[Any, list[tuple[int, float]]]:
    model = _model()
    opt = _optimizer(model)
    received = spy_losses(opt)
    args = _args(out, max_steps=8, save_strategy="steps", save_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))
    trainer.add_callback(BlockoptCallback(trainer))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, received


def _deterministic(state: dict[str, Any]) -> dict[str, Any]:
    """blockopt's state without its wall-clock entries (time spent training and probing)."""
    extra = dict(state["blockopt"])
    extra.pop("probe_seconds")
    extra.pop("train_seconds")
    extra["spectra"] = [
        [step, {k: v for k, v in spectra.items() if k != "seconds"}]
        for step, spectra in extra["spectra"]
    ]
    return {**state, "blockopt": extra}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_resume_from_a_checkpoint_is_bitwise(tmp_path):
    """8 steps straight against 4 steps, a checkpoint, and 4 more in a new Trainer with a new
    model and optimizer resumed from it: the same losses fed, the same weights and the same
    optimizer state (blockopt's included), bit for bit."""
    straight, fed = _run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["blockopt"]["step_count"] == 4 and saved["blockopt"]["mode"] == "adam"
    resumed, fed_resumed = _run(tmp_path / "b", resume=str(checkpoint))
    opt_a = _block(straight)
    opt_b = _block(resumed)
    assert [s for s, _ in fed_resumed] == [4, 5, 6, 7]
    assert fed_resumed == fed[4:]
    assert opt_b.step_count == 8 and opt_b.mode == opt_a.mode == "adam"
    assert [d.step for d in opt_b.history] == [d.step for d in opt_a.history] == [0, 4]
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert _same(_deterministic(opt_a.state_dict()), _deterministic(opt_b.state_dict()))
    losses = [e["loss"] for e in straight.state.log_history if "loss" in e]
    assert [e["loss"] for e in resumed.state.log_history if "loss" in e] == losses


def _block(trainer: Trainer) -> blockopt.BlockOptimizer:
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, blockopt.BlockOptimizer)
    return opt


def test_misuse_is_refused_with_the_fix(tmp_path):
    with pytest.raises(TypeError, match=r"add_callback\(BlockoptCallback\(trainer\)\)"):
        BlockoptCallback(object())
    model = _model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = _args(tmp_path, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(plain, None))
    trainer.add_callback(BlockoptCallback(trainer))
    with pytest.raises(TypeError, match=r"AdamW, not a BlockOptimizer.*blockopt\.wrap"):
        trainer.train()
    other = Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(plain, None))
    other.add_callback(BlockoptCallback(trainer))
    with pytest.raises(RuntimeError, match="other than the one it was built with"):
        other.train()


def test_importing_blockopt_imports_no_framework_and_transformers_needs_no_lightning():
    """A fresh interpreter with Lightning hidden: ``import blockopt`` loads neither framework,
    and the transformers integration imports and builds its callback."""
    hidden = ("lightning", "pytorch_lightning", "lightning_fabric")
    script = HIDE.format(names=hidden) + (
        "import blockopt, blockopt.integrations\n"
        "frameworks = {'transformers', 'lightning', 'pytorch_lightning'}\n"
        "assert not frameworks & set(sys.modules), sorted(frameworks & set(sys.modules))\n"
        "from blockopt.integrations.transformers import BlockoptCallback\n"
        f"assert not {set(hidden)!r} & set(sys.modules)\n"
        "print(BlockoptCallback.__mro__[1].__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "TrainerCallback"


def test_a_missing_transformers_raises_an_import_error_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "blockopt.integrations.transformers")
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module("blockopt.integrations.transformers")


def test_a_transformers_without_the_pre_step_hook_is_refused_naming_the_upgrade(monkeypatch):
    monkeypatch.delattr(TrainerCallback, "on_pre_optimizer_step")
    monkeypatch.delitem(sys.modules, "blockopt.integrations.transformers")
    with pytest.raises(ImportError, match=r"on_pre_optimizer_step.*pip install -U transformers"):
        importlib.import_module("blockopt.integrations.transformers")
