"""A probe that fails during step() is discarded with a warning; training goes on unchanged."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from reference import NoDoubleBackward
from torch import nn

import blockopt
from blockopt.curvature.hvp import DoubleBackwardError
from blockopt.distributed.reductions import fault_kind
from blockopt.optimizer.faults import probe_fault_kind
from blockopt.optimizer.policy import ProbeFault, ProbeFaultWarning, ProbeSchedule

FORCE_SWITCH = blockopt.Thresholds(0.0, 0.0, 0.0, 0)  # any successful probe leaves "sgd"


class Net(nn.Module):
    """Dropout and BatchNorm, so that a failed probe could disturb RNG streams and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _nan_loss(model, loss):
    return loss * float("nan")


def _nan_hvp(model, loss):
    # u**1.5 at u = 0: value and gradient 0, second derivative infinite.
    u = model.fc1.weight - model.fc1.weight.detach()
    return loss + u.pow(1.5).sum()


def _double_backward(model, loss):
    return loss + NoDoubleBackward.apply(model.fc2.bias).sum()


def _closure_error(model, loss):
    raise ValueError("the probe's data loader is exhausted")


def _out_of_memory(model, loss):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _cpu_out_of_memory(model, loss):
    # what torch's CPU allocator raises: a RuntimeError, not an OutOfMemoryError
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"
    )


def _freezes(model, loss):
    model.fc2.weight.requires_grad_(False)
    return loss


def _edits_weights(model, loss):
    with torch.no_grad():
        model.fc1.weight.mul_(2.0)
    return loss


@dataclass(frozen=True)
class Fault:
    """A way to break the probe, the fault kind it must be recorded as, and text to expect."""

    name: str
    breaks: object
    kind: str
    cause: str  # the warning's words for the cause
    fix: str  # a fragment of the fix it suggests
    message: str  # a fragment of the underlying error's message


FAULTS = [
    Fault("nan_loss", _nan_loss, "non_finite", "NaN or Inf", "lower the learning rate", "nan"),
    Fault("nan_hvp", _nan_hvp, "non_finite", "NaN or Inf", "check the probe's batch", "Lanczos"),
    Fault(
        "double_backward",
        _double_backward,
        "double_backward",
        "no second derivative",
        "backend='fd'",
        "derivative for doubler is not implemented",
    ),
    Fault(
        "closure_error",
        _closure_error,
        "probe_error",
        "the probe raised an error",
        "opt.probe_now()",
        "data loader is exhausted",
    ),
    Fault(
        "out_of_memory",
        _out_of_memory,
        "out_of_memory",
        "ran out of memory",
        "smaller batch",
        "Tried to allocate 2.00 GiB",
    ),
    Fault(
        "cpu_out_of_memory",
        _cpu_out_of_memory,
        "out_of_memory",
        "ran out of memory",
        "probe a smaller batch",
        "DefaultCPUAllocator: can't allocate memory",
    ),
    Fault(
        "freezes_a_parameter",
        _freezes,
        "probe_error",
        "the probe raised an error",
        "fix the probe closure",
        "set fc2.weight.requires_grad to False (put back)",
    ),
    Fault(
        "edits_weights",
        _edits_weights,
        "probe_error",
        "the probe raised an error",
        "fix the probe closure",
        "changed the values of 'fc1.weight' (put back)",
    ),
]


class FakeWriter:
    """Records what a SummaryWriter would be asked to write."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def add_scalar(self, *args, **kwargs):
        pass

    add_histogram_raw = add_custom_scalars = add_figure = flush = close = add_scalar


def _task(fault: Fault | None, broken: dict[str, bool], attempts: list[int]):
    torch.manual_seed(0)
    model = Net()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 4, (64,), generator=gen)

    def probe():
        attempts.append(len(attempts))
        loss = F.cross_entropy(model(x[:32]), y[:32])  # moves BN statistics, draws dropout masks
        if fault is not None and broken["on"]:
            return fault.breaks(model, loss)
        return loss

    return model, x, y, probe


def _train(opt, model, x, y, steps, start=0, check_grads=False):
    for i in range(start, start + steps):
        idx = torch.arange(i * 8, i * 8 + 16) % len(y)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        if check_grads:
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_failed_probe_is_discarded_warned_logged_and_training_unchanged(fault):
    runs = {}
    for probing in (False, True):
        attempts: list[int] = []
        model, x, y, probe = _task(fault, {"on": True}, attempts)
        writer = FakeWriter()
        opt = blockopt.BlockOptimizer(
            model,
            probe if probing else None,
            lr=0.05,
            probe_every=1,
            steps=4,
            thresholds=FORCE_SWITCH,
            backend="autograd",  # the default "auto" takes finite differences where this fails
            staged=False,  # a staged probe that switches leaves out fc2.bias, a broken block
            writer=writer,
            log_figures=False,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(opt, model, x, y, 8, check_grads=True)
        runs[probing] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "rng": torch.get_rng_state(),
            "training": [m.training for m in model.modules()],
        }
    for key in ("params", "buffers"):
        for a, b in zip(runs[False][key], runs[True][key]):
            assert torch.equal(a, b), key
    assert torch.equal(runs[False]["rng"], runs[True]["rng"])
    assert runs[False]["training"] == runs[True]["training"]
    # The probe ran and failed at steps 0, 2 and 6: nothing of it was kept.
    assert len(attempts) == 3
    assert opt.mode == "sgd" and not opt.history and not opt.spectra_history
    assert opt.last_score is None and set(opt.block_factors.values()) == {1.0}
    assert [(f.step, f.kind) for f in opt.faults] == [
        (0, fault.kind),
        (2, fault.kind),
        (6, fault.kind),
    ]
    assert all(fault.message in f.message for f in opt.faults)
    texts = [str(w.message) for w in caught if issubclass(w.category, ProbeFaultWarning)]
    assert len(texts) == 3
    for text in texts:
        assert fault.cause in text and "Fix: " in text and fault.fix in text
        assert fault.message in text and "mode 'sgd'" in text
    assert "next probe is at step 2" in texts[0] and "next probe is at step 14" in texts[2]
    assert writer.texts == [("blockopt/events", t, s) for t, s in zip(texts, (0, 2, 6))]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_failing_probe_backs_off_and_the_schedule_resumes_after_recovery(fault):
    broken = {"on": True}
    attempts: list[int] = []
    model, x, y, probe = _task(fault, broken, attempts)
    opt = blockopt.BlockOptimizer(
        model,
        probe,
        lr=0.05,
        probe_every=1,
        steps=4,
        thresholds=FORCE_SWITCH,
        backend="autograd",
        staged=False,  # a staged probe that switches leaves out fc2.bias, a broken block
    )
    steps_of_attempts = []
    opt.probe = lambda: (steps_of_attempts.append(opt.step_count), probe())[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeFaultWarning)
        _train(opt, model, x, y, 200)
    # Retries at 2, 4, 8, ... steps after each failure: 7 attempts in 200 steps, not 200.
    assert steps_of_attempts == [0, 2, 6, 14, 30, 62, 126]
    assert len(steps_of_attempts) <= math.log2(200) + 1
    assert len(opt.faults) == 7 and opt.schedule.failures == 7 and opt.mode == "sgd"
    broken["on"] = False
    _train(opt, model, x, y, 60, start=200)
    # The next attempt (step 126 + 128) succeeds; from then on the probe runs every step again.
    assert [step for step, _ in opt.spectra_history] == [254, 255, 256, 257, 258, 259]
    assert len(opt.faults) == 7 and opt.schedule.failures == 0
    assert opt.history[0].step == 254 and opt.mode != "sgd"


def test_probe_now_called_directly_raises_the_error():
    model, *_, probe = _task(FAULTS[2], {"on": True}, [])
    opt = blockopt.BlockOptimizer(model, probe, steps=3, backend="autograd")
    with pytest.raises(DoubleBackwardError, match="second derivative"):
        opt.probe_now()
    assert not opt.faults and not opt.spectra_history


def test_by_default_an_op_without_double_backward_is_probed_by_finite_differences():
    model, *_, probe = _task(FAULTS[2], {"on": True}, [])
    opt = blockopt.BlockOptimizer(model, probe, steps=3)
    opt.probe_now()
    ((_, spectra),) = opt.spectra_history
    assert not opt.faults and spectra.backend == "fd"
    assert all(spectra[n].lambda_max > 0 for n in spectra)


def test_faults_survive_state_dict_round_trip():
    model, x, y, probe = _task(FAULTS[0], {"on": True}, [])
    opt = blockopt.BlockOptimizer(model, probe, probe_every=1, steps=3)
    with pytest.warns(ProbeFaultWarning):
        _train(opt, model, x, y, 3)
    state = opt.state_dict()
    fresh = blockopt.BlockOptimizer(model, probe, probe_every=1, steps=3)
    fresh.load_state_dict(state)
    assert list(fresh.faults) == list(opt.faults)
    assert opt.faults[0] == ProbeFault(0, "non_finite", opt.faults[0].message)
    assert [f.step for f in fresh.faults] == [0, 2]
    assert fresh.schedule.failures == 2 and fresh.schedule.next_step == opt.schedule.next_step


def test_schedule_backoff_doubles_up_to_max_interval_and_ignores_spikes():
    s = ProbeSchedule(base=50, max_interval=300)
    nexts = []
    for _ in range(5):
        s.after_probe(s.next_step, None, False)
        nexts.append(s.next_step)
    assert nexts == [50, 150, 350, 650, 950]
    for step in range(12):
        s.observe_loss(step, 1.0)
    s.observe_loss(12, 100.0)  # a spike does not bring a failing probe forward
    assert s.next_step == 950
    s.after_probe(950, 1.0, False)  # success: the adaptive schedule starts over at base
    assert (s.failures, s.next_step) == (0, 1000)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (FloatingPointError("x"), "non_finite"),
        (DoubleBackwardError("x"), "double_backward"),
        (torch.OutOfMemoryError("x"), "out_of_memory"),
        (MemoryError(), "out_of_memory"),
        (TypeError("x"), "probe_error"),
    ],
)
def test_fault_kinds(error, kind):
    assert fault_kind(error) == kind


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
         "out_of_memory"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), "out_of_memory"),
        (RuntimeError("Error code 12 (Cannot allocate memory)"), "out_of_memory"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "probe_error"),
        (ValueError("out of memory"), "probe_error"),  # not an allocator's error
        (torch.OutOfMemoryError("x"), "out_of_memory"),
        (FloatingPointError("x"), "non_finite"),
    ],
)  # fmt: skip
def test_probe_fault_kinds_read_allocator_errors(error, kind):
    assert probe_fault_kind(error) == kind


def _trace(opt) -> tuple:
    """What acting on a probe changes: histories, score, factors, lr scales, policy, mode."""
    return (
        list(opt.spectra_history),
        list(opt.history),
        opt.last_score,
        dict(opt.block_factors),
        dict(opt.mode_scales),
        opt.policy.last_switch,
        opt.mode,
    )


def test_a_switch_that_fails_leaves_no_trace_of_the_probe(monkeypatch):
    """Acting on a probe is all or nothing: when the switch it calls for fails, the spectra,
    score, factors, learning-rate scales, policy and mode are as before the probe; only its
    time counts, as probe time (read off a fake clock that the probe moves by 2 s)."""
    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    opt = blockopt.BlockOptimizer(
        model, lambda: F.cross_entropy(model(x), y), thresholds=FORCE_SWITCH, probe_every=1
    )
    _train(opt, model, x, y, 1)  # a good probe at step 0 and a switch to block_sgd or adam
    before, seconds = _trace(opt), opt.probe_seconds

    def broken(src, dst):
        raise RuntimeError("state transfer failed")

    monkeypatch.setattr("blockopt.optimizer.modeset.transfer_state", broken)
    clock = [0.0]
    monkeypatch.setattr("blockopt.optimizer.recorder.time.perf_counter", lambda: clock[0])
    probe = opt.probe
    opt.probe = lambda: (clock.__setitem__(0, clock[0] + 2.0), probe())[1]
    opt.policy.thresholds = blockopt.Thresholds(100.0, 100.0, 0.0, 0)  # now calls for "sgd"
    with pytest.warns(ProbeFaultWarning, match="state transfer failed"):
        _train(opt, model, x, y, 1, start=1)
    assert _trace(opt) == before
    assert opt.probe_seconds == seconds + 2.0
    assert [f.kind for f in opt.faults] == ["probe_error"]


def test_every_modes_settings_are_checked_when_the_optimizer_is_built():
    model = Net()
    with pytest.raises(TypeError, match=r"could not build mode 'adam'.*bogus"):
        blockopt.BlockOptimizer(
            model,
            lambda: model(torch.randn(4, 6)).sum(),
            optimizers={"adam": (torch.optim.AdamW, {"bogus": 1})},
        )


def test_the_fault_warning_points_at_the_caller_of_step():
    model = torch.nn.Linear(3, 1)

    def probe():
        raise RuntimeError("boom")

    opt = blockopt.BlockOptimizer(model, probe, probe_every=1)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.warns(blockopt.ProbeFaultWarning, match="boom") as caught:
        opt.step()
    assert caught[0].filename == __file__
