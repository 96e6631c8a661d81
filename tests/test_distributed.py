"""Probing under torch.distributed: DDP ranks agree to the bit, FSDP is refused with the fix.

The two-rank test runs this file as a script, once per rank, on the gloo backend on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import NoDoubleBackward
from torch import nn

import blockopt
from blockopt.distributed import (
    FAULT_KINDS,
    ProbeFailedElsewhere,
    RankMean,
    probe_reduce,
    sharded_by_fsdp,
)

WORLD = 2
STEPS = 6  # Lanczos steps per probe
TRAIN = 20  # training steps before the fault phase
SPIKE_AT = 12
# Rank 1's probe breaks at these steps (probes every 2 steps, retries after 2, 4, 8 steps).
BREAKAGES = {TRAIN: "closure", TRAIN + 2: "double_backward", TRAIN + 6: "non_finite_hvp"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (``-1``: the probe's batch); rank r trains on its r-th half."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=gen
    )


def _half(batch, rank):
    x, y = batch
    return x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]


def _probe_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(module(x), y)


class _TextWriter:
    """A stand-in SummaryWriter that keeps the tags of its text entries."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add_text(self, tag, text, step):
        self.texts.append(tag)

    def add_scalar(self, *args, **kwargs):
        pass

    add_histogram_raw = add_custom_scalars = flush = close = add_scalar


def _timeless(spectra: blockopt.Spectra) -> dict:
    """``spectra.to_dict()`` without the wall time, which differs between ranks."""
    return {k: v for k, v in spectra.to_dict().items() if k != "seconds"}


def _worker(rank: int, init_file: str, out: str) -> None:
    """One rank: train a DDP model with a wrapped SGD whose probes switch modes, break the probe
    on one rank only, and try FSDP; save what the test compares."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    reductions = [0]

    def counting_hook(state, bucket):
        reductions[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    px, py = _half(_batch(-1), rank)
    breakage = {"kind": None}

    def probe():
        loss = _probe_loss(ddp.module, px, py)
        if rank == 1 and breakage["kind"] == "closure":
            raise ValueError("rank 1's probe batch is gone")
        if rank == 1 and breakage["kind"] == "double_backward":
            return loss + NoDoubleBackward.apply(model[4].bias).sum()
        if rank == 1 and breakage["kind"] == "non_finite_hvp":
            u = model[0].weight - model[0].weight.detach()
            return loss + u.pow(1.5).sum()
        return loss

    writer = _TextWriter()
    opt = blockopt.wrap(
        torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9),
        ddp,
        probe=probe,
        probe_every=2,
        steps=STEPS,
        thresholds=blockopt.Thresholds(0.0, 0.0, 0.0, 0),  # any score: Adam
        writer=writer,
        log_figures=False,
    )
    result: dict = {"auto_reduce": type(opt._reduce).__name__, "untouched": []}
    first_params = [p.detach().clone() for p in model.parameters()]
    for step in range(TRAIN + 16):
        if step == 6:  # force the way back to SGD, then to block SGD, on both ranks alike
            opt.policy.thresholds = blockopt.Thresholds(10.0, 10.0, 0.0, 0)
        if step == 12:
            opt.policy.thresholds = blockopt.Thresholds(0.0, 10.0, 0.0, 0)
        breakage["kind"] = BREAKAGES.get(step)
        x, y = _half(_batch(step), rank)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        before = reductions[0]
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            opt.step()
        result["untouched"].append(
            reductions[0] == before
            and all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        )
    result["reductions"] = reductions[0]
    result["history"] = [(d.step, d.old_mode, d.new_mode, d.score) for d in opt.history]
    result["reasons"] = [d.reason for d in opt.history]
    result["mode_lrs"] = opt.mode_lrs
    result["spectra"] = [(step, _timeless(s)) for step, s in opt.spectra_history]
    result["faults"] = [(f.step, f.kind) for f in opt.faults]
    result["texts"] = writer.texts
    result["factors"] = dict(opt.block_factors)
    result["first_params"] = first_params
    result["params"] = [p.detach().clone() for p in model.parameters()]

    # The public API: block_spectra with a reduce hook, and without one (each rank alone).
    module_probe = lambda: _probe_loss(model, px, py)  # noqa: E731
    reduced = blockopt.block_spectra(model, module_probe, steps=STEPS, seed=7, reduce=RankMean())
    alone = blockopt.block_spectra(model, module_probe, steps=STEPS, seed=7)
    result["api"] = _timeless(reduced)
    result["alone"] = _timeless(alone)
    result["api_params"] = [p.detach().clone() for p in model.parameters()]

    # The closure may call the DDP wrapper too: the same spectra, no gradient reduction.
    opt.probe = lambda: _probe_loss(ddp, px, py)
    opt.seed = 7 - opt.step_count  # the probe at step t seeds with opt.seed + t
    before = reductions[0]
    result["through_wrapper"] = opt.probe_now() is not None and reductions[0] == before
    result["wrapper_spectra"] = _timeless(opt.spectra_history[-1][1])
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()  # DDP trains on as before
    opt.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone_opt = blockopt.BlockOptimizer(ddp, module_probe, distributed=False)
    result["alone_warning"] = alone_opt._reduce is None and any(
        "drift apart" in str(w.message) for w in caught
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unwrapped = blockopt.BlockOptimizer(model, module_probe)  # ddp.module, not ddp
    result["unwrapped_warning"] = unwrapped._reduce is None and any(
        "not DistributedDataParallel" in str(w.message) for w in caught
    )

    # The schedule: a loss spike on rank 0 alone brings the next probe forward on both ranks.
    # probe_budget=None: a budget would clip the spike's probe by measured time
    spike = blockopt.BlockOptimizer(
        ddp, module_probe, lr=0.01, steps=2, monitor_only=True, probe_budget=None
    )
    for step in range(SPIKE_AT + 3):
        spike.observe_loss(100.0 if rank == 0 and step == SPIKE_AT else 1.0)
        spike.step()  # the gradients left from training: the same update on both ranks
    result["spike_probes"] = [step for step, _ in spike.spectra_history]
    # With a fixed interval a spike moves no probe, but it holds block SGD's factors at the next
    # one, so every rank must see it too.
    fixed = blockopt.BlockOptimizer(ddp, module_probe, lr=0.01, probe_every=100, steps=2)
    for step in range(SPIKE_AT + 1):
        fixed.observe_loss(100.0 if rank == 0 and step == SPIKE_AT else 1.0)
    result["spiked_with_fixed_interval"] = fixed.schedule.spiked

    # A block only rank 0's loss uses: the ranks agree it is "ok", so they score alike.
    torch.manual_seed(0)
    pair = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    z = torch.randn(8, 3)

    def uneven() -> torch.Tensor:
        loss = pair["a"](z).pow(2).mean()
        return loss + pair["b"](z).pow(4).mean() if rank == 0 else loss

    uneven_spectra = blockopt.block_spectra(pair, uneven, steps=3, reduce=RankMean())
    result["uneven_status"] = {n: s.status for n, s in uneven_spectra.items()}
    result["uneven_score"] = float(blockopt.heterogeneity(uneven_spectra))

    # FSDP: fully_shard works on CPU with gloo, but leaves nothing to differentiate twice.
    from torch.distributed.fsdp import fully_shard

    sharded = _model()
    fully_shard(sharded)
    sharded_probe = lambda: _probe_loss(sharded, px, py)  # noqa: E731
    try:  # the sharded parameters, the ones an optimizer updates, are not in the loss's graph
        params = list(sharded.parameters())
        torch.autograd.grad(sharded_probe(), params, create_graph=True)
        result["fsdp_grad"] = "ok"
    except RuntimeError as err:
        result["fsdp_grad"] = str(err)
    result["fsdp_detected"] = sharded_by_fsdp(sharded)
    for what, build in (
        ("optimizer", lambda: blockopt.BlockOptimizer(sharded, sharded_probe)),
        ("block_spectra", lambda: blockopt.block_spectra(sharded, sharded_probe)),
    ):
        try:
            build()
            result[f"fsdp_{what}"] = "accepted"
        except TypeError as err:
            result[f"fsdp_{what}"] = str(err)
    result["fsdp_without_probe"] = type(blockopt.BlockOptimizer(sharded, None)).__name__
    torch.save(result, out)
    dist.destroy_process_group()


def _run_ranks(tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(rank),
                str(tmp_path / "store"),
                str(tmp_path / f"{rank}.pt"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("the ranks hung: a collective was not reached by every rank")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _single_process(params, seed):
    """The spectra of the whole probe batch in one process, at ``params``."""
    model = _model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            p.copy_(q)
    x, y = _batch(-1)
    return blockopt.block_spectra(model, lambda: _probe_loss(model, x, y), steps=STEPS, seed=seed)


def _assert_close(a: dict, b: dict) -> None:
    assert [s["name"] for s in a["blocks"]] == [s["name"] for s in b["blocks"]]
    for s, t in zip(a["blocks"], b["blocks"]):
        scale = max(abs(s["lambda_max"]), abs(s["lambda_min"]), 1e-12)
        for key in ("lambda_max", "lambda_min", "trace"):
            assert s[key] == pytest.approx(t[key], rel=1e-6, abs=1e-9 * scale), (s["name"], key)
        assert s["ritz_values"] == pytest.approx(t["ritz_values"], rel=1e-6, abs=1e-9 * scale)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _run_ranks(tmp_path_factory.mktemp("ddp"))


def test_ddp_ranks_take_identical_decisions_and_stay_bitwise_identical(ranks):
    r0, r1 = ranks
    assert r0["auto_reduce"] == "RankMean"
    modes = [(step, old, new) for step, old, new, _ in r0["history"] if old != new]
    assert modes == [(0, "sgd", "adam"), (6, "adam", "sgd"), (12, "sgd", "block_sgd")]
    assert r0["history"] == r1["history"]  # scores too, to the bit
    # Each switch searched the new mode's learning rate with trials on each rank's own probe
    # batch; the trial losses were averaged, so the ranks chose the same rates.
    assert sum("trials on the probe's batch" in r for r in r0["reasons"]) >= 3
    assert r0["reasons"] == r1["reasons"] and r0["mode_lrs"] == r1["mode_lrs"]
    assert r0["spectra"] == r1["spectra"] and r0["factors"] == r1["factors"]
    assert len(set(r0["factors"].values())) > 1  # block SGD used different factors per block
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


def test_ddp_probe_spectra_equal_a_single_process_probe_of_the_whole_batch(ranks):
    r0, r1 = ranks
    first_step, first = r0["spectra"][0]
    assert first_step == 0
    _assert_close(first, _single_process(r0["first_params"], seed=0).to_dict())
    assert r0["api"] == r1["api"]
    _assert_close(r0["api"], _single_process(r0["api_params"], seed=7).to_dict())
    # Without the reduction each rank sees only its half: the ranks disagree.
    assert r0["alone"]["blocks"] != r1["alone"]["blocks"]


def test_probes_leave_ddp_gradient_buckets_alone(ranks):
    for r in ranks:
        assert all(r["untouched"]) and r["reductions"] == TRAIN + 16  # one bucket a step
        assert r["through_wrapper"] and r["alone_warning"] and r["unwrapped_warning"]
        assert r["wrapper_spectra"] == r["api"]


def test_a_fault_on_one_rank_is_a_fault_on_every_rank(ranks):
    r0, r1 = ranks
    expected = [(TRAIN, "probe_error"), (TRAIN + 2, "double_backward"), (TRAIN + 6, "non_finite")]
    assert r0["faults"] == r1["faults"] == expected
    # Only rank 0 writes to TensorBoard: three switches and three failed probes.
    assert r0["texts"] == ["blockopt/switches"] * 3 + ["blockopt/events"] * 3 and not r1["texts"]
    # After the third failure the retry at TRAIN + 6 + 8 succeeds on both ranks.
    assert [step for step, _ in r0["spectra"]][-2:] == [TRAIN - 2, TRAIN + 14]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


def test_ranks_agree_on_block_status_and_score_when_only_one_uses_a_block(ranks):
    r0, r1 = ranks
    assert r0["uneven_status"] == r1["uneven_status"]
    assert set(r0["uneven_status"].values()) == {"ok"}
    assert r0["uneven_score"] == r1["uneven_score"]


def test_a_loss_spike_on_one_rank_moves_the_probe_on_every_rank(ranks):
    assert ranks[0]["spike_probes"] == ranks[1]["spike_probes"] == [0, SPIKE_AT + 1]
    assert ranks[0]["spiked_with_fixed_interval"] and ranks[1]["spiked_with_fixed_interval"]


def test_fsdp_is_refused_with_the_cause_and_the_fix(ranks):
    for r in ranks:
        assert "not have been used in the graph" in r["fsdp_grad"]
        assert r["fsdp_detected"]
        for what in ("optimizer", "block_spectra"):
            assert "FSDP" in r[f"fsdp_{what}"] and "DistributedDataParallel" in r[f"fsdp_{what}"]
            assert "probe=None" in r[f"fsdp_{what}"]
        assert r["fsdp_without_probe"] == "BlockOptimizer"


def test_fsdp1_stand_in_is_refused():
    from torch.distributed.fsdp import FullyShardedDataParallel

    stand_in = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(stand_in)
    stand_in._fsdp_wrapped_module = nn.Linear(3, 2)
    probe = lambda: stand_in._fsdp_wrapped_module(torch.ones(1, 3)).sum()  # noqa: E731
    with pytest.raises(
        TypeError, match=r"FSDP.*outside autograd.*probe=None.*DistributedDataParallel"
    ):
        blockopt.BlockOptimizer(stand_in, probe)
    with pytest.raises(TypeError, match="block_spectra cannot probe a model sharded by FSDP"):
        blockopt.block_spectra(stand_in, probe)


def test_distributed_option_without_a_process_group():
    model = _model()
    probe = lambda: _probe_loss(model, *_batch(-1))  # noqa: E731
    assert probe_reduce(model, None) is None and probe_reduce(model, False) is None
    assert blockopt.BlockOptimizer(model, probe)._reduce is None
    with pytest.raises(RuntimeError, match=r"not initialised.*init_process_group"):
        blockopt.BlockOptimizer(model, probe, distributed=True)


def test_reduce_hook_runs_once_per_lanczos_step_on_the_calling_thread():
    torch.manual_seed(0)
    model = _model()
    x, y = _batch(-1)
    calls = []

    def identity(t):
        calls.append((threading.current_thread() is threading.main_thread(), t.numel()))
        return t

    plain = blockopt.block_spectra(model, lambda: _probe_loss(model, x, y), steps=STEPS, workers=2)
    reduced = blockopt.block_spectra(
        model, lambda: _probe_loss(model, x, y), steps=STEPS, workers=2, reduce=identity
    )
    assert reduced.to_dict()["blocks"] == plain.to_dict()["blocks"]  # bitwise, with one rank
    numel = sum(p.numel() for p in model.parameters())
    assert calls[0] == (True, 1 + len(FAULT_KINDS))  # the loss and the failure flags
    blocks = len(plain)
    assert len(calls) == 1 + STEPS + 1 and all(main for main, _ in calls)
    assert calls[1] == (True, numel + len(FAULT_KINDS))  # every block's product in one buffer
    assert calls[-1] == (True, 2 * blocks)  # each block's status, once


def test_a_failure_flag_from_another_rank_raises_on_this_one():
    model = _model()
    x, y = _batch(-1)

    def other_rank_ran_out_of_memory(t):
        t[-len(FAULT_KINDS) + FAULT_KINDS.index("out_of_memory")] = 0.5
        return t

    with pytest.raises(ProbeFailedElsewhere, match="another rank") as info:
        blockopt.block_spectra(
            model, lambda: _probe_loss(model, x, y), steps=2, reduce=other_rank_ran_out_of_memory
        )
    assert info.value.kind == "out_of_memory"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
