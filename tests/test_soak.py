"""Long runs: thousands of steps with a probe every 10 steps and a switch at nearly every probe
keep memory flat and the histories bounded, and checkpoints taken along the way (saved and
loaded with ``weights_only=True``) resume bitwise identically."""

from __future__ import annotations

import gc
import io
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blockopt
from blockopt.optimizer.modes import MODES

pytestmark = pytest.mark.soak

STEPS = 3000
PROBE_EVERY = 10
LANCZOS_STEPS = 5
HISTORY = 40  # the cap on decisions and spectra kept; the run makes 300 probes
CHECKPOINTS = (777, 1500, 2222)
RESUME_STEPS = 20
SAMPLES = (1000, 1500, 2000, 2500)  # where live objects are counted, after warm-up
EXPLICIT_SWITCH_EVERY = 250  # switch() called by hand, besides the probes' switches
# The probe adds a ridge RIDGE * |theta_b|^2 to every block, RIDGE * 10**stiff on the fused
# attention input projection (half the parameters): its curvature dominates the cross entropy's,
# so the score (decades between the blocks' curvatures) is 0, 1.25 and 2.5 in turn.
RIDGE = 10.0
STIFFNESS = (0.0, 1.25, 2.5)


class _AttentionNet(nn.Module):
    """A small attention classifier: a fused in_proj (Q/K/V slice blocks) between two linears."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))


_GEN = torch.Generator().manual_seed(0)
_X = torch.randn(256, 4, 6, generator=_GEN)
_Y = torch.randint(0, 4, (256,), generator=_GEN)


class _Run:
    """A model, its optimizer and a probe whose score cycles through 0, 1.25 and 2.5 decades
    with the step, so that every probe switches mode: sgd -> block_sgd -> adam -> sgd ..."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = _AttentionNet()
        self.last_loss: weakref.ref[torch.Tensor] | None = None
        self.probe_steps: set[int] = set()
        self.opt = blockopt.BlockOptimizer(
            self.model,
            self.probe,
            lr=0.05,
            probe_every=PROBE_EVERY,
            steps=LANCZOS_STEPS,
            history=HISTORY,
            # The ridge, not the training loss, sets the block factors: keep them small so
            # that block SGD stays stable on the cross entropy it trains.
            max_factor=3.0,
            # Every probe switches here, so the switch guard would nearly always hold its
            # copies of the weights and the old mode's state; what it holds and drops is
            # tested in test_switch_guard.py, and the counts below stay those of the modes.
            guard_steps=None,
            thresholds=blockopt.Thresholds(
                sgd_below=1.0, adam_above=1.5, margin=0.1, min_interval=0
            ),
        )

    def probe(self) -> torch.Tensor:
        loss = F.cross_entropy(self.model(_X[:64]), _Y[:64])
        stiff = STIFFNESS[(self.opt.step_count // PROBE_EVERY) % len(STIFFNESS)]
        for name, p in self.model.named_parameters():
            ridge = RIDGE * 10**stiff if name == "attn.in_proj_weight" else RIDGE
            loss = loss + ridge * p.pow(2).sum()
        self.last_loss = weakref.ref(loss)
        self.probe_steps.add(self.opt.step_count)  # the learning-rate search calls it too
        return loss

    def step(self, i: int, after_switch: Callable[[], None] | None = None) -> None:
        """Training step ``i``: a switch by hand every EXPLICIT_SWITCH_EVERY steps (to Adam at
        the SAMPLES, where ``after_switch`` runs), then one optimizer step on a batch that
        depends only on ``i``."""
        if i in SAMPLES:
            self.opt.switch("adam")
        elif i and i % EXPLICIT_SWITCH_EVERY == 0:
            self.opt.switch(MODES[(i // EXPLICIT_SWITCH_EVERY) % 3])
        if after_switch is not None:
            after_switch()
        idx = torch.arange(i * 16, i * 16 + 32) % len(_Y)
        self.opt.zero_grad()
        F.cross_entropy(self.model(_X[idx]), _Y[idx]).backward()
        self.opt.step()

    def checkpoint(self) -> bytes:
        return _serialised({"model": self.model.state_dict(), "opt": self.opt.state_dict()})

    def restore(self, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def _live() -> tuple[int, int]:
    """(live torch tensors, all objects the garbage collector tracks), after a collection."""
    gc.collect()
    objects = gc.get_objects()
    return sum(1 for o in objects if issubclass(type(o), torch.Tensor)), len(objects)


def _serialised(value: Any) -> bytes:
    """``value`` frozen as bytes: a state dict's tensors are the optimizer's own, which later
    steps update in place, and kept bytes hold no live tensor."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _fingerprint(run: _Run) -> dict[str, Any]:
    """What a resumed run must reproduce bitwise; wall-clock fields (probe seconds) left out."""
    sd = run.opt.state_dict()["blockopt"]
    spectra = [[t, {k: v for k, v in s.items() if k != "seconds"}] for t, s in sd["spectra"]]
    return {
        "params": [p.detach().clone() for p in run.model.parameters()],
        "mode": run.opt.mode,
        "scales": sd["scales"],
        "inner": sd["inner"],
        "schedule": sd["schedule"],
        "history": sd["history"],
        "spectra": spectra,
        "block_factors": sd["block_factors"],
        "step_count": sd["step_count"],
        "lrs": [g["lr"] for g in run.opt.param_groups],
    }


def _assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def soak() -> dict[str, Any]:
    """One uninterrupted run of STEPS steps, with what the tests below check."""
    run = _Run()
    saved: dict[int, bytes] = {}
    expected: dict[int, bytes] = {}
    counts: dict[int, tuple[int, int]] = {}
    graphs_alive_after_step = 0
    modes: Counter[str] = Counter()
    switches = 0
    for i in range(STEPS):
        if i in CHECKPOINTS:
            saved[i] = run.checkpoint()
        if i - RESUME_STEPS in CHECKPOINTS:
            expected[i - RESUME_STEPS] = _serialised(_fingerprint(run))
        # Count in a fixed optimizer state: right after a switch to Adam, whose state is one
        # step count and two moments per parameter whatever came before.
        count = (lambda at=i: counts.__setitem__(at, _live())) if i in SAMPLES else None
        before = run.opt.mode
        run.step(i, count)
        switches += run.opt.mode != before
        modes[run.opt.mode] += 1
        if run.last_loss is not None and run.last_loss() is not None:
            graphs_alive_after_step += 1
    return {
        "run": run,
        "saved": saved,
        "expected": expected,
        "counts": counts,
        "graphs_alive_after_step": graphs_alive_after_step,
        "modes": modes,
        "switches": switches,
    }


def test_the_run_probes_and_switches_often(soak: dict[str, Any]) -> None:
    run = soak["run"]
    assert run.probe_steps == set(range(0, STEPS, PROBE_EVERY))
    probes = len(run.probe_steps)
    # Each probe's score lies clear of the thresholds plus margin in its mode's band, so every
    # probe calls for the next mode; nearly every probe switched.
    bands = ((0.0, 0.9), (1.1, 1.4), (1.6, 4.0))
    for d in run.opt.history:
        low, high = bands[(d.step // PROBE_EVERY) % len(STIFFNESS)]
        assert low <= d.score <= high, d
    assert soak["switches"] >= 0.9 * probes
    # the switches the probes made searched their new mode's learning rate
    assert sum("trials on the probe's batch" in d.text for d in run.opt.history) >= HISTORY // 2
    assert min(soak["modes"][m] for m in MODES) >= STEPS // 4, soak["modes"]
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_memory_stays_flat(soak: dict[str, Any]) -> None:
    # No probe's loss (and with it its gradient graph) outlives the step that probed.
    assert soak["graphs_alive_after_step"] == 0
    counts = soak["counts"]
    tensors = [t for t, _ in counts.values()]
    objects = [o for _, o in counts.values()]
    # The same tensors at every sample: parameters, gradients, Adam's state, block scales;
    # no Lanczos vector, gradient or spectrum kept alive from one probe to the next.
    assert max(tensors) - min(tensors) == 0, counts
    # Python objects: histories are full from step 400 on, so nothing grows with the run.
    assert max(objects) - objects[0] <= 200, counts


def test_histories_stay_bounded(soak: dict[str, Any]) -> None:
    opt = soak["run"].opt
    assert len(opt.history) == HISTORY and len(opt.spectra_history) == HISTORY
    assert len(opt.faults) <= HISTORY
    assert opt.history[-1].step == STEPS - PROBE_EVERY
    sd = opt.state_dict()["blockopt"]
    assert list(sd["inner"]) == [opt.mode]  # one mode's state, however many switches
    assert len(sd["history"]) == HISTORY and len(sd["spectra"]) == HISTORY
    # The records a checkpoint carries (all but the modes' own state) do not grow either: as
    # many decisions and spectra at every checkpoint, each of bounded size (a reason varies in
    # length, since a search lists its trials; a spectrum in Ritz values, since Lanczos stops
    # early on a block whose Krylov space is exhausted), and the rest the same size.
    sizes, factors = [], []
    for data in soak["saved"].values():
        extra = torch.load(io.BytesIO(data), weights_only=True)["opt"]["blockopt"]
        assert len(extra["history"]) == len(extra["spectra"]) == HISTORY
        assert max(len(d["reason"]) for d in extra["history"]) < 1000
        assert all(
            len(b["ritz_values"]) <= LANCZOS_STEPS
            for _t, s in extra["spectra"]
            for b in s["blocks"]
        )
        # block_factors: at most one number per block, however many probes (a staged probe
        # leaves the small blocks out, and the pickle shrinks when every factor is the one
        # shared 1.0, so it is counted, not weighed)
        factors.append(len(extra["block_factors"]))
        skip = ("inner", "history", "spectra", "block_factors")
        rest = {k: v for k, v in extra.items() if k not in skip}
        sizes.append(len(_serialised(rest)))
    assert max(sizes) < 1.05 * min(sizes), sizes
    assert all(0 < n <= len(opt.blocks) for n in factors), factors


@pytest.mark.parametrize("at", CHECKPOINTS)
def test_checkpoint_resumes_bitwise(soak: dict[str, Any], at: int) -> None:
    resumed = _Run()
    resumed.restore(soak["saved"][at])
    assert resumed.opt.step_count == at
    for i in range(at, at + RESUME_STEPS):
        resumed.step(i)
    expected = torch.load(io.BytesIO(soak["expected"][at]), weights_only=True)
    _assert_bitwise(expected, _fingerprint(resumed))
