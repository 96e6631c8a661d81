"""Probing under torch.distributed: DDP ranks agree to the bit, whether they share a probe's
blocks or average every product; FSDP is refused with the fix.

The two-rank test runs this file as a script, once per rank, on the gloo backend on CPU.
"""

from __future__ import annotations

import copy
import io
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
from blockopt.curvature.runs import share_costs
from blockopt.distributed.reductions import (
    FAULT_KINDS,
    ProbeFailedElsewhere,
    RankMean,
    RankSettingsError,
    agree_settings,
    fault_kind,
)
from blockopt.distributed.sharing import assign_blocks, gather_rows
from blockopt.distributed.wrappers import ddp_of, probe_reduce, sharded_by_fsdp, unwrap
from blockopt.optimizer.controller import stages_by_size

WORLD = 2
STEPS = 6  # Lanczos steps per probe
TOL_STEPS = 12  # Lanczos steps at most with tol, enough for some blocks to stop earlier
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
    """``spectra.to_dict()`` without what each rank measures for itself: the wall time and the
    products this rank computed."""
    return {k: v for k, v in spectra.to_dict().items() if k not in ("seconds", "local_hvps")}


def _owners(model: nn.Module, steps: int = STEPS, staged: bool = False) -> dict[str, int]:
    """Block name -> the rank that probes it in a shared probe of ``model``; ``staged``: in
    the optimizer's staged probe, which deals out each stage's blocks on their own."""
    blocks = blockopt.partition(model)
    stages = stages_by_size(blocks) if staged else [list(range(len(blocks)))]
    owners = {}
    for stage in stages:
        some = [blocks[i] for i in stage]
        owners.update(zip((b.name for b in some), assign_blocks(share_costs(some, steps), WORLD)))
    return owners


def _param(model: nn.Module, rank: int, kind: str, staged: bool = False) -> torch.Tensor:
    """The first weight (``kind="weight"``) or bias of ``model`` that ``rank`` probes when the
    ranks share the blocks (``staged``: in the optimizer's staged probe): a fault planted there
    is in that rank's share."""
    owners = _owners(model, staged=staged)
    named = dict(model.named_parameters())
    return next(named[n] for n, r in owners.items() if r == rank and n.endswith(kind))


def _probe_batch(rank: int, share: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's probe batch: with shared probes a full-size batch of its own (as
    docs/DISTRIBUTED.md advises), else its half of one probe batch."""
    return _batch(-1 - rank) if share else _half(_batch(-1), rank)


def _train(rank: int, share: bool) -> tuple[dict, nn.Module, nn.Module]:
    """Train a DDP model with a wrapped SGD whose probes switch modes and break on rank 1 only
    (in blocks rank 1 probes), sharing the blocks or not; returns what the test compares, the
    model and its DDP wrapper."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    reductions = [0]

    def counting_hook(state, bucket):
        reductions[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    px, py = _probe_batch(rank, share)
    breakage = {"kind": None}
    # rank 1's block in the first stage of a staged probe, which every probe measures
    weight = _param(model, 1, "weight", staged=True)

    def probe():
        loss = _probe_loss(ddp.module, px, py)
        if rank == 1 and breakage["kind"] == "closure":
            raise ValueError("rank 1's probe batch is gone")
        if rank == 1 and breakage["kind"] == "double_backward":
            return loss + NoDoubleBackward.apply(weight).sum()
        if rank == 1 and breakage["kind"] == "non_finite_hvp":
            u = weight - weight.detach()
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
        backend="autograd",  # "auto" would take finite differences at the planted op
        **({} if share else {"distributed_share": False}),  # sharing is the default
    )
    result: dict = {"auto_reduce": type(opt.reduce).__name__, "untouched": [], "tol": opt.tol}
    result["shared"] = opt.distributed_share
    result["first_params"] = [p.detach().clone() for p in model.parameters()]
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
    result["reasons"] = [d.text for d in opt.history]
    result["mode_lrs"] = opt.mode_lrs
    result["spectra"] = [(step, _timeless(s)) for step, s in opt.spectra_history]
    result["hvps"] = [(s.local_hvps, s.hvps) for _, s in opt.spectra_history]
    result["faults"] = [(f.step, f.kind) for f in opt.faults]
    result["texts"] = writer.texts
    result["factors"] = dict(opt.block_factors)
    result["params"] = [p.detach().clone() for p in model.parameters()]

    # The closure may call the DDP wrapper too: the same spectra, no gradient reduction.
    opt.probe = lambda: _probe_loss(ddp, px, py)
    opt.seed = 7 - opt.step_count  # the probe at step t seeds with opt.seed + t
    before = reductions[0]
    result["through_wrapper"] = opt.probe_now() is not None and reductions[0] == before
    result["wrapper_spectra"] = _timeless(opt.spectra_history[-1][1])
    result["wrapper_params"] = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(ddp(x), y).backward()  # DDP trains on as before
    opt.step()
    return result, model, ddp


def _shared_api(rank: int, model: nn.Module) -> dict:
    """block_spectra with share=True: on each rank's own batch, on one batch that every rank
    holds, with tol, and with faults planted in one rank's share or outside it."""
    from torch.distributed import get_world_size

    result: dict = {"world": get_world_size()}
    own = _probe_batch(rank, share=True)
    same = _batch(-1)  # the same batch on every rank

    def spectra(batch, steps=STEPS, **options):
        return blockopt.block_spectra(
            model, lambda: _probe_loss(model, *batch), steps=steps, seed=7, **options
        )

    shared = spectra(own, reduce=RankMean(), share=True)
    result["own"] = _timeless(shared)
    result["own_hvps"] = (shared.local_hvps, shared.hvps)
    result["own_alone"] = _timeless(spectra(own))  # this rank alone, every block
    runs = {
        "shared": spectra(same, reduce=RankMean(), share=True),
        "mean": spectra(same, reduce=RankMean()),
        "alone": spectra(same),
        "shared_tol": spectra(same, TOL_STEPS, reduce=RankMean(), share=True, tol=0.05),
        "mean_tol": spectra(same, TOL_STEPS, reduce=RankMean(), tol=0.05),
        "alone_tol": spectra(same, TOL_STEPS, tol=0.05),
    }
    result["same"] = {k: _timeless(s) for k, s in runs.items()}
    result["same_hvps"] = {k: (s.local_hvps, s.hvps) for k, s in runs.items()}
    result["same_params"] = [p.detach().clone() for p in model.parameters()]

    # Faults planted in rank 1's loss: in a block rank 1 probes, every rank raises; in a block
    # rank 0 probes, rank 1 never differentiates it twice, and the probe succeeds everywhere.
    def planted(kind: str, target: torch.Tensor):
        def probe() -> torch.Tensor:
            loss = _probe_loss(model, *own)
            if rank == 1 and kind == "double_backward":
                return loss + NoDoubleBackward.apply(target).sum()
            if rank == 1 and kind == "non_finite":
                u = target - target.detach()
                return loss + u.pow(1.5).sum()
            return loss

        return probe

    result["faults"] = {}
    for kind in ("double_backward", "non_finite"):
        for owner in (0, 1):
            target = _param(model, owner, "weight")
            try:
                got = blockopt.block_spectra(
                    model, planted(kind, target), steps=STEPS, reduce=RankMean(), share=True,
                    backend="autograd",
                )  # fmt: skip
                outcome = ("ok", _timeless(got))
            except ProbeFailedElsewhere as err:
                outcome = ("elsewhere", err.kind)
            except Exception as err:
                outcome = (type(err).__name__, fault_kind(err))
            result["faults"][kind, owner] = outcome

    # The same op without a second derivative on every rank: all fail alike, and the default
    # backend takes finite differences together, shared or not.
    target = _param(model, 0, "weight")

    def everywhere() -> torch.Tensor:
        return _probe_loss(model, *own) + NoDoubleBackward.apply(target).sum()

    result["alike"] = {}
    for share in (False, True):
        got = blockopt.block_spectra(model, everywhere, steps=STEPS, reduce=RankMean(), share=share)
        result["alike"][share] = (got.backend, _timeless(got))
    one = blockopt.block_spectra(  # rank 1's loss alone holds it: the others learn it by flags
        model, planted("double_backward", _param(model, 1, "weight")), steps=STEPS,
        reduce=RankMean(), share=True,
    )  # fmt: skip
    result["alike"]["rank 1 alone"] = (one.backend, _timeless(one))
    return result


def _worker(rank: int, init_file: str, out: str) -> None:
    """One rank: train with shared and with averaged probes, call block_spectra with and
    without sharing, and try FSDP; save what the test compares."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    result: dict = {}
    result["mean"], _, _ = _train(rank, share=False)
    result["share"], model, ddp = _train(rank, share=True)
    compiled = torch.compile(ddp)  # not called: the wrapper alone
    result["unwrap"] = (unwrap(ddp) is model, unwrap(compiled) is model, ddp_of(compiled) is ddp)
    result["shared_api"] = _shared_api(rank, model)

    # The public API: block_spectra with a reduce hook, and without one (each rank alone).
    px, py = _half(_batch(-1), rank)
    module_probe = lambda: _probe_loss(model, px, py)  # noqa: E731
    reduced = blockopt.block_spectra(model, module_probe, steps=STEPS, seed=7, reduce=RankMean())
    alone = blockopt.block_spectra(model, module_probe, steps=STEPS, seed=7)
    result["api"] = _timeless(reduced)
    result["alone"] = _timeless(alone)
    result["api_params"] = [p.detach().clone() for p in model.parameters()]
    shared_probe = lambda: _probe_loss(model, *_probe_batch(rank, share=True))  # noqa: E731
    result["api_shared"] = _timeless(
        blockopt.block_spectra(
            model, shared_probe, steps=STEPS, seed=7, reduce=RankMean(), share=True
        )
    )
    # The optimizer passes its choice on to block_spectra.
    for share in (True, False):
        opt = blockopt.BlockOptimizer(
            ddp,
            module_probe if not share else shared_probe,
            steps=STEPS,
            seed=7,
            tol=None,
            monitor_only=True,
            distributed_share=share,
        )
        opt.probe_now()
        result[f"opt_share_{share}"] = _timeless(opt.spectra_history[-1][1])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone_opt = blockopt.BlockOptimizer(ddp, module_probe, distributed=False)
    result["alone_warning"] = alone_opt.reduce is None and any(
        "drift apart" in str(w.message) for w in caught
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unwrapped = blockopt.BlockOptimizer(model, module_probe)  # ddp.module, not ddp
    result["unwrapped_warning"] = unwrapped.reduce is None and any(
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

    # Ranks built with different options (steps=, and the seed on rank 1 only): every rank
    # refuses the probe, naming them, before any collective of the probe could hang; the
    # process group is unharmed and an optimizer built alike probes as before.
    odd = blockopt.BlockOptimizer(ddp, module_probe, lr=0.01, steps=2 + rank, seed=rank)
    try:
        odd.probe_now()
        result["mismatch"] = "probed"
    except RankSettingsError as err:
        result["mismatch"] = str(err)
    ones = torch.ones(3)
    torch.distributed.all_reduce(ones)
    result["group_after_mismatch"] = ones.tolist()
    alike = blockopt.BlockOptimizer(ddp, module_probe, lr=0.01, steps=2)
    result["alike_after_mismatch"] = alike.probe_now() is not None

    # A block only rank 0's loss uses: the ranks agree it is "ok", so they score alike. Shared,
    # the block's status is its owner's, the same on both ranks too.
    torch.manual_seed(0)
    pair = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    z = torch.randn(8, 3)

    def uneven() -> torch.Tensor:
        loss = pair["a"](z).pow(2).mean()
        return loss + pair["b"](z).pow(4).mean() if rank == 0 else loss

    uneven_spectra = blockopt.block_spectra(pair, uneven, steps=3, reduce=RankMean())
    result["uneven_status"] = {n: s.status for n, s in uneven_spectra.items()}
    result["uneven_score"] = float(blockopt.heterogeneity(uneven_spectra))
    uneven_shared = blockopt.block_spectra(pair, uneven, steps=3, reduce=RankMean(), share=True)
    result["uneven_shared"] = _timeless(uneven_shared)

    # FSDP: fully_shard works on CPU with gloo, but leaves nothing to differentiate twice.
    from torch.distributed.fsdp import fully_shard

    sharded = _model()
    unsharded = copy.deepcopy(sharded)
    fully_shard(sharded)
    sharded_probe = lambda: _probe_loss(sharded, px, py)  # noqa: E731
    # Sharded finite differences: each rank its shard of every Lanczos vector, FSDP's own
    # forward and backward for the products; against autograd on an unsharded copy, of the
    # mean of the ranks' losses (RankMean), as FSDP's reduce-scattered gradients are.
    shards = [p.to_local().clone() for p in sharded.parameters()]
    fd = blockopt.block_spectra(sharded, sharded_probe, steps=5, probes=2)
    result["fsdp_spectra"] = {n: (s.lambda_max, s.lambda_min, s.numel) for n, s in fd.items()}
    result["fsdp_backend"] = fd.backend
    result["fsdp_untouched"] = all(
        torch.equal(a, p.to_local()) for a, p in zip(shards, sharded.parameters())
    )
    reference = blockopt.block_spectra(
        unsharded, lambda: _probe_loss(unsharded, px, py), steps=5, probes=2, reduce=RankMean(),
        backend="autograd",
    )  # fmt: skip
    result["fsdp_reference"] = {n: (s.lambda_max, s.lambda_min) for n, s in reference.items()}
    try:  # the sharded parameters, the ones an optimizer updates, are not in the loss's graph
        params = list(sharded.parameters())
        torch.autograd.grad(sharded_probe(), params, create_graph=True)
        result["fsdp_grad"] = "ok"
    except RuntimeError as err:
        result["fsdp_grad"] = str(err)
    result["fsdp_detected"] = sharded_by_fsdp(sharded)
    for what, build in (
        ("optimizer", lambda: blockopt.BlockOptimizer(sharded, sharded_probe)),
        (
            "block_spectra",
            lambda: blockopt.block_spectra(sharded, sharded_probe, backend="autograd"),
        ),
    ):
        try:
            build()
            result[f"fsdp_{what}"] = "accepted"
        except TypeError as err:
            result[f"fsdp_{what}"] = str(err)
    result["fsdp_without_probe"] = type(blockopt.BlockOptimizer(sharded, None)).__name__
    result["fsdp_small_and_fused"] = _small_and_fused_shards(rank, px, py)
    result["fsdp_training"] = _train_sharded(rank)
    torch.save(result, out)
    dist.destroy_process_group()


def _small_and_fused_shards(rank: int, px: torch.Tensor, py: torch.Tensor) -> dict:
    """A head of one output (its weight has 1 row, fewer than the ranks: one rank's shard is
    empty) and a fused Q/K/V projection (whose slices would cut across the row shards)."""
    from torch.distributed.fsdp import fully_shard

    from blockopt.workloads.models import TinyGPT

    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    reference = copy.deepcopy(small)
    fully_shard(small)
    loss_of = lambda m: m(px).pow(2).mean()  # noqa: E731
    fd = blockopt.block_spectra(small, lambda: loss_of(small), steps=6)
    exact = blockopt.block_spectra(
        reference, lambda: loss_of(reference), steps=6, reduce=RankMean(), backend="autograd"
    )
    torch.manual_seed(0)
    gpt = TinyGPT()
    fully_shard(gpt)
    g = torch.Generator().manual_seed(rank)
    x, y = (torch.randint(0, 64, (2, 8), generator=g) for _ in range(2))
    gpt_probe = lambda: F.cross_entropy(gpt(x).flatten(0, 1), y.flatten())  # noqa: E731
    gpt_spectra = blockopt.block_spectra(gpt, gpt_probe, steps=2)
    opt = blockopt.wrap(torch.optim.AdamW(gpt.parameters(), lr=1e-3), gpt, probe=gpt_probe, steps=2)
    opt.zero_grad()
    gpt_probe().backward()
    opt.step()
    return {
        "small": {n: (s.lambda_max, s.lambda_min) for n, s in fd.items()},
        "small_reference": {n: (s.lambda_max, s.lambda_min) for n, s in exact.items()},
        "empty_shard": any(p.to_local().numel() == 0 for p in small.parameters()),
        "gpt_blocks": [b for b in gpt_spectra],
        "gpt_faults": len(opt.faults),
        "gpt_probed": len(opt.history),
    }


def _train_sharded(rank: int) -> dict:
    """Train a fully_shard model with probes, searches and a switch: every rank decides alike
    (the probes are the sharded finite differences, the losses rank means) and the gathered
    parameters are identical; the state survives a weights_only round trip."""
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    px, py = _half(_batch(-1), rank)
    opt = blockopt.BlockOptimizer(
        model,
        lambda: _probe_loss(model, px, py),
        lr=0.1,
        probe_every=10,
        probe_budget=None,
        steps=4,
        thresholds=blockopt.Thresholds(0.0, 0.0, 0.0, 0),  # every score calls for Adam
    )
    for step in range(25):
        x, y = _half(_batch(step), rank)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.observe_loss(float(loss.detach()))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    return {
        "modes": [(d.step, d.old_mode, d.new_mode) for d in opt.history],
        "backend": opt.spectra_history[-1][1].backend,
        "faults": len(opt.faults),
        "lr": opt.mode_lrs[opt.mode],
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "reduce": type(opt.reduce).__name__,
    }


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


def _single_process(params, seed, batch=None, tol=None, steps=STEPS):
    """The spectra of ``batch`` (default: the whole probe batch) in one process, at ``params``."""
    model = _model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            p.copy_(q)
    x, y = _batch(-1) if batch is None else batch
    return blockopt.block_spectra(
        model, lambda: _probe_loss(model, x, y), steps=steps, seed=seed, tol=tol
    )


def _assert_close(a: dict, b: dict) -> None:
    assert [s["name"] for s in a["blocks"]] == [s["name"] for s in b["blocks"]]
    for s, t in zip(a["blocks"], b["blocks"]):
        _assert_block_close(s, t)


def _assert_block_close(s: dict, t: dict) -> None:
    scale = max(abs(s["lambda_max"]), abs(s["lambda_min"]), 1e-12)
    for key in ("lambda_max", "lambda_min", "trace"):
        assert s[key] == pytest.approx(t[key], rel=1e-6, abs=1e-9 * scale), (s["name"], key)
    assert s["ritz_values"] == pytest.approx(t["ritz_values"], rel=1e-6, abs=1e-9 * scale)


def _assert_owners_spectra(
    shared: dict, params, seed: int, tol: float | None, staged: bool = False
) -> None:
    """Each block of a shared probe is the single-process spectrum of its owner's own batch
    (``staged``: a probe of the optimizer's, whose stages are dealt out one by one)."""
    owners = _owners(_model(), staged=staged)
    per_rank = [
        _single_process(params, seed, batch=_probe_batch(r, share=True), tol=tol)
        for r in range(WORLD)
    ]
    for block in shared["blocks"]:
        alone = per_rank[owners[block["name"]]][block["name"]]
        _assert_block_close(block, alone.to_dict())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _run_ranks(tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("how", ["share", "mean"])
def test_ddp_ranks_take_identical_decisions_and_stay_bitwise_identical(ranks, how):
    r0, r1 = ranks[0][how], ranks[1][how]
    assert r0["auto_reduce"] == "RankMean" and r0["shared"] == (how == "share")
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


def test_each_rank_probes_only_its_share_of_the_blocks(ranks):
    share, mean = [r["share"]["hvps"] for r in ranks], [r["mean"]["hvps"] for r in ranks]
    assert len(share[0]) == len(share[1]) > 5
    for (local0, total0), (local1, total1) in zip(*share):
        assert total0 == total1 == local0 + local1  # the shares add up to every block's runs
        assert 0 < local0 < total0 and 0 < local1 < total1
    for local, total in mean[0] + mean[1]:
        assert local == total  # averaged: every rank computes every block
    api = [r["shared_api"] for r in ranks]
    (local0, total), (local1, _) = api[0]["own_hvps"], api[1]["own_hvps"]
    unshared = api[0]["same_hvps"]["mean"][1]
    assert local0 + local1 == total == unshared == 33  # 5 blocks of 6 steps, a bias of 3
    assert abs(local0 - local1) <= STEPS  # balanced to within one block's products
    assert (local0, local1) == (15, 18)


def test_shared_spectra_are_identical_on_every_rank(ranks):
    r0, r1 = ranks[0]["shared_api"], ranks[1]["shared_api"]
    assert r0["world"] == WORLD
    assert r0["own"] == r1["own"] and ranks[0]["api_shared"] == ranks[1]["api_shared"]
    # Each rank probed its own batch, and each block's spectrum is its owner's, to the bit.
    owners = _owners(_model())
    for i, block in enumerate(r0["own"]["blocks"]):
        alone = ranks[owners[block["name"]]]["shared_api"]["own_alone"]["blocks"][i]
        assert block == alone
    assert r0["own_alone"]["blocks"] != r1["own_alone"]["blocks"]  # the batches differ


def test_shared_probes_of_one_batch_equal_unshared_and_single_process_probes(ranks):
    for r in ranks:
        same = r["shared_api"]["same"]
        assert same["shared"] == same["mean"]  # to the bit, blocks and settings
        assert same["shared"]["blocks"] == same["alone"]["blocks"]
    assert ranks[0]["shared_api"]["same"] == ranks[1]["shared_api"]["same"]
    params = ranks[0]["shared_api"]["same_params"]
    _assert_close(ranks[0]["shared_api"]["same"]["shared"], _single_process(params, 7).to_dict())


def test_tol_with_shared_probes(ranks):
    same = [r["shared_api"]["same"] for r in ranks]
    for s in same:
        assert s["shared_tol"] == s["mean_tol"] and s["shared_tol"]["tol"] == 0.05
        assert s["shared_tol"]["blocks"] == s["alone_tol"]["blocks"]
    assert same[0]["shared_tol"] == same[1]["shared_tol"]
    hvps = [r["shared_api"]["same_hvps"] for r in ranks]
    full = sum(min(TOL_STEPS, b.numel) for b in blockopt.partition(_model()))
    assert hvps[0]["shared_tol"][1] < full  # some blocks stopped early
    assert any(b["steps"] < min(TOL_STEPS, b["numel"]) for b in same[0]["shared_tol"]["blocks"])
    assert hvps[0]["shared_tol"][0] + hvps[1]["shared_tol"][0] == hvps[0]["shared_tol"][1]
    params = ranks[0]["shared_api"]["same_params"]
    alone = _single_process(params, 7, tol=0.05, steps=TOL_STEPS).to_dict()
    _assert_close(same[0]["shared_tol"], alone)


def test_a_fault_in_one_ranks_share_raises_on_every_rank(ranks):
    f0, f1 = ranks[0]["shared_api"]["faults"], ranks[1]["shared_api"]["faults"]
    # Planted in rank 1's loss, in a block rank 1 probes: rank 1 raises its own error, rank 0
    # learns the kind from the gather's flags.
    assert f1["double_backward", 1] == ("DoubleBackwardError", "double_backward")
    assert f0["double_backward", 1] == ("elsewhere", "double_backward")
    assert f1["non_finite", 1] == ("FloatingPointError", "non_finite")
    assert f0["non_finite", 1] == ("elsewhere", "non_finite")
    # In a block rank 0 probes, rank 1 never differentiates it twice: the probe succeeds.
    for kind in ("double_backward", "non_finite"):
        assert f0[kind, 0][0] == f1[kind, 0][0] == "ok" and f0[kind, 0] == f1[kind, 0]


def test_ddp_probe_spectra_equal_a_single_process_probe_of_the_whole_batch(ranks):
    r0, r1 = ranks
    first_step, first = r0["mean"]["spectra"][0]
    assert first_step == 0
    params, tol = r0["mean"]["first_params"], r0["mean"]["tol"]
    whole = _single_process(params, seed=0, tol=tol).to_dict()
    # The first probe switches to Adam, which its largest blocks settle: it left the
    # smallest out, the same on both ranks, and measured the others as one process would.
    probed = [b["name"] for b in first["blocks"]]
    assert probed == [b["name"] for b in r1["mean"]["spectra"][0][1]["blocks"]]
    assert 0 < len(probed) < len(whole["blocks"])
    whole["blocks"] = [b for b in whole["blocks"] if b["name"] in probed]
    _assert_close(first, whole)
    assert r0["api"] == r1["api"]
    _assert_close(r0["api"], _single_process(r0["api_params"], seed=7).to_dict())
    # Without the reduction each rank sees only its half: the ranks disagree.
    assert r0["alone"]["blocks"] != r1["alone"]["blocks"]


def test_shared_ddp_probe_spectra_are_each_blocks_owners_probe(ranks):
    first_step, first = ranks[0]["share"]["spectra"][0]
    assert first_step == 0
    run = ranks[0]["share"]
    _assert_owners_spectra(first, run["first_params"], seed=0, tol=run["tol"], staged=True)


def test_the_optimizer_shares_probes_by_default_and_can_average_them(ranks):
    for r in ranks:
        assert r["opt_share_True"] == r["api_shared"]
        assert r["opt_share_False"] == r["api"]


def test_probes_leave_ddp_gradient_buckets_alone(ranks):
    for r in ranks:
        for how in ("share", "mean"):
            run = r[how]
            assert all(run["untouched"]) and run["reductions"] == TRAIN + 16  # a bucket a step
            assert run["through_wrapper"]
        assert r["alone_warning"] and r["unwrapped_warning"]
    r0, r1 = ranks[0]["share"], ranks[1]["share"]
    assert r0["wrapper_spectra"] == r1["wrapper_spectra"]
    _assert_owners_spectra(
        r0["wrapper_spectra"], r0["wrapper_params"], seed=7, tol=r0["tol"], staged=True
    )


@pytest.mark.parametrize("how", ["share", "mean"])
def test_a_fault_on_one_rank_is_a_fault_on_every_rank(ranks, how):
    r0, r1 = ranks[0][how], ranks[1][how]
    expected = [(TRAIN, "probe_error"), (TRAIN + 2, "double_backward"), (TRAIN + 6, "non_finite")]
    assert r0["faults"] == r1["faults"] == expected
    # Only rank 0 writes to TensorBoard: three switches and three failed probes, and a summary
    # of every probe that succeeded (those of training, and the one through the DDP wrapper).
    texts = [tag for tag in r0["texts"] if tag != "blockopt/summary"]
    assert texts == ["blockopt/switches"] * 3 + ["blockopt/events"] * 3 and not r1["texts"]
    assert r0["texts"].count("blockopt/summary") == len(r0["spectra"]) + 1
    # After the third failure the retry at TRAIN + 6 + 8 succeeds on both ranks.
    assert [step for step, _ in r0["spectra"]][-2:] == [TRAIN - 2, TRAIN + 14]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


def test_ranks_agree_on_block_status_and_score_when_only_one_uses_a_block(ranks):
    r0, r1 = ranks
    assert r0["uneven_status"] == r1["uneven_status"]
    assert set(r0["uneven_status"].values()) == {"ok"}
    assert r0["uneven_score"] == r1["uneven_score"]
    # Shared, each block's status is its owner's: the same on both ranks.
    assert r0["uneven_shared"] == r1["uneven_shared"]


def test_a_loss_spike_on_one_rank_moves_the_probe_on_every_rank(ranks):
    assert ranks[0]["spike_probes"] == ranks[1]["spike_probes"] == [0, SPIKE_AT + 1]
    assert ranks[0]["spiked_with_fixed_interval"] and ranks[1]["spiked_with_fixed_interval"]


def test_ranks_with_different_settings_refuse_the_probe_together(ranks):
    for r in ranks:
        assert r["mismatch"].startswith("the ranks differ in steps, seed at this probe")
        assert "same options on every rank" in r["mismatch"]
        assert r["group_after_mismatch"] == [2.0, 2.0, 2.0] and r["alike_after_mismatch"]


def test_agree_settings_names_what_differs_from_another_rank():
    """Two ranks simulated in one process: the reduction averages this rank's vector with the
    other's; only the settings that differ are named, and equal settings pass."""
    mine = {"steps": "10", "mode": "sgd", "blocks": "a\nb"}
    theirs = {"steps": "10", "mode": "adam", "blocks": "a\nb"}
    sent: list[torch.Tensor] = []
    with pytest.raises(ZeroDivisionError):  # capture the other rank's vector, then stop
        agree_settings(theirs, lambda t: sent.append(t.clone()) or 1 / 0, torch.device("cpu"))
    (other,) = sent
    with pytest.raises(RankSettingsError, match=r"^the ranks differ in mode at this probe"):
        agree_settings(mine, lambda t: (t + other) / 2, torch.device("cpu"))
    agree_settings(theirs, lambda t: (t + other) / 2, torch.device("cpu"))  # the same: passes
    agree_settings({}, lambda t: 1 / 0, torch.device("cpu"))  # nothing to agree on: no call


def test_fsdp_autograd_probes_are_refused_with_the_cause_and_the_fix(ranks):
    for r in ranks:
        assert "not have been used in the graph" in r["fsdp_grad"]
        assert r["fsdp_detected"]
        assert r["fsdp_optimizer"] == "accepted"  # fully_shard: probed by sharded FD
        assert "backend='fd'" in r["fsdp_block_spectra"]
        assert r["fsdp_without_probe"] == "BlockOptimizer"


def test_the_optimizer_trains_a_fully_sharded_model_alike_on_every_rank(ranks):
    a, b = (r["fsdp_training"] for r in ranks)
    assert a["modes"] == b["modes"] and a["modes"][0][1:] == ("sgd", "adam")
    assert len(a["modes"]) == 3 and a["backend"] == "fd" and a["faults"] == 0
    assert a["lr"] == b["lr"] and a["reduce"] == "RankMean"
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


def test_fsdp_models_are_probed_by_sharded_finite_differences(ranks):
    """The same spectra on both ranks, within finite differences' error of autograd's on an
    unsharded copy (the mean of the ranks' losses), and the shards left as they were."""
    assert ranks[0]["fsdp_spectra"] == ranks[1]["fsdp_spectra"]
    for r in ranks:
        assert r["fsdp_backend"] == "fd" and r["fsdp_untouched"]
        assert set(r["fsdp_spectra"]) == set(r["fsdp_reference"])
        for name, (top, bottom, _) in r["fsdp_spectra"].items():
            ref_top, ref_bottom = r["fsdp_reference"][name]
            scale = max(abs(ref_top), abs(ref_bottom))
            assert abs(top - ref_top) <= 1e-3 * scale, name
            assert abs(bottom - ref_bottom) <= 1e-3 * scale, name


def test_an_op_without_a_second_derivative_on_every_rank_takes_finite_differences_on_all(ranks):
    """Every rank that failed failed with double backward (the reduction's flags say so, the
    same on each rank), so all take finite differences together: the same spectra on both
    ranks, shared or not, and when only rank 1's loss holds the op."""
    a, b = (r["shared_api"]["alike"] for r in ranks)
    for share in (False, True, "rank 1 alone"):
        assert a[share][0] == b[share][0] == "fd"
        assert a[share][1] == b[share][1]


def test_fsdp_probes_empty_shards_and_keeps_fused_tensors_whole(ranks):
    """A parameter of fewer rows than ranks leaves one rank an empty shard, which adds nothing
    to the sharded Lanczos sums; a fused Q/K/V weight is one block, not three slices."""
    a, b = (r["fsdp_small_and_fused"] for r in ranks)
    assert a["empty_shard"] or b["empty_shard"]
    assert a["small"] == b["small"]
    for name, (top, bottom) in a["small"].items():
        ref_top, ref_bottom = a["small_reference"][name]
        scale = max(abs(ref_top), abs(ref_bottom))
        assert abs(top - ref_top) <= 1e-3 * scale and abs(bottom - ref_bottom) <= 1e-3 * scale
    assert a["gpt_blocks"] == b["gpt_blocks"]
    assert "blocks.0.attn.qkv.weight" in a["gpt_blocks"]
    assert not any(n.endswith((".q", ".k", ".v")) for n in a["gpt_blocks"])
    assert a["gpt_faults"] == b["gpt_faults"] == 0 and a["gpt_probed"] == 1


def test_unwrap_sees_through_a_real_ddp_wrapper(ranks):
    for r in ranks:
        assert r["unwrap"] == (True, True, True)  # DDP, torch.compile(DDP); ddp_of finds DDP


def _ddp_stand_in(inner: nn.Module) -> nn.Module:
    """A DistributedDataParallel wrapping ``inner``, built without a process group."""
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = inner
    return ddp


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, as torch.compile loads
def test_unwrap_returns_the_eager_module_in_any_nesting():
    from blockopt.distributed.wrappers import _wrappers

    class Holder(nn.Module):  # a user's module that happens to hold a `module`: no wrapper
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(3, 2)

    class MyDataParallel(nn.DataParallel):
        pass

    model = _model()
    compile_ = torch.compile  # builds the OptimizedModule wrapper; nothing here calls it
    ddp = _ddp_stand_in(model)
    nestings = [
        model,
        compile_(model),
        nn.DataParallel(model),
        MyDataParallel(model),
        ddp,
        compile_(nn.DataParallel(model)),
        nn.DataParallel(compile_(model)),
        compile_(ddp),
        _ddp_stand_in(compile_(model)),
        compile_(nn.DataParallel(ddp)),
        nn.DataParallel(compile_(nn.DataParallel(compile_(model)))),
    ]
    for wrapped in nestings:
        assert unwrap(wrapped) is model, [type(m).__name__ for m in _wrappers(wrapped)]
    holder = Holder()
    assert unwrap(holder) is holder and unwrap(compile_(nn.DataParallel(holder))) is holder
    assert ddp_of(compile_(nn.DataParallel(ddp))) is ddp and ddp_of(ddp) is ddp
    assert ddp_of(compile_(nn.DataParallel(model))) is None and ddp_of(model) is None
    assert ddp_of(Holder()) is None


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
    assert blockopt.BlockOptimizer(model, probe).reduce is None
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


def test_assign_blocks_deals_every_block_once_in_balance():
    costs = [(min(10, n), n) for n in (4096, 64, 4096, 64, 1024, 8, 2, 100_000, 10, 3)]
    for world in (1, 2, 3, 4, 16):
        owners = assign_blocks(costs, world)
        assert len(owners) == len(costs) and all(0 <= o < world for o in owners)
        loads = [sum(c[0] for c, o in zip(costs, owners) if o == r) for r in range(world)]
        assert sum(loads) == sum(c[0] for c in costs)  # every block exactly once
        assert max(loads) - min(loads) <= max(c[0] for c in costs)
        assert assign_blocks(costs, world) == owners  # deterministic
    assert assign_blocks(costs, 1) == [0] * len(costs)
    assert assign_blocks([], 3) == []
    # Equal bounds on the products: the sizes break the tie, so the big blocks are spread too.
    owners = assign_blocks([(10, 4096), (10, 4096), (10, 64), (10, 64)], 2)
    assert owners[0] != owners[1] and owners[2] != owners[3]
    # More ranks than blocks: some ranks probe nothing.
    assert sorted(assign_blocks([(5, 5), (3, 3)], 4)) == [0, 1]


def test_assign_blocks_refuses_a_bad_world_size_or_ragged_costs():
    for world in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="world_size"):
            assign_blocks([(1, 1)], world)
    with pytest.raises(ValueError, match="same number"):
        assign_blocks([(1, 1), (1,)], 2)


def test_share_costs_bound_each_blocks_products_then_its_size():
    blocks = blockopt.partition(_model())
    assert share_costs(blocks, STEPS) == [(min(STEPS, b.numel), b.numel) for b in blocks]
    assert assign_blocks(share_costs(blocks, STEPS), 2) == [1, 0, 0, 1, 1, 0]


class _OneRank:
    """A one-rank group that records the collectives a probe issues and on which thread."""

    def __init__(self, flag: str | None = None) -> None:
        self.calls: list[tuple[str, bool, int]] = []
        self.flag = flag

    def _record(self, what: str, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((what, threading.current_thread() is threading.main_thread(), t.numel()))
        return t

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self._record("mean", t)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.flag is not None:  # another rank failed
            t[-len(FAULT_KINDS) + FAULT_KINDS.index(self.flag)] = 1.0
        return self._record("sum", t)

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def test_a_shared_probe_issues_one_gather_on_the_calling_thread():
    model = _model()
    x, y = _batch(-1)
    group = _OneRank()

    def probe():
        return _probe_loss(model, x, y)

    plain = blockopt.block_spectra(model, probe, steps=STEPS, workers=2)
    shared = blockopt.block_spectra(model, probe, steps=STEPS, workers=2, reduce=group, share=True)
    assert shared.to_dict() | {"seconds": 0} == plain.to_dict() | {"seconds": 0}  # bitwise
    assert shared.local_hvps == shared.hvps == plain.hvps
    rows = len(plain) * (4 + 2 * STEPS - 1)
    assert group.calls == [("mean", True, 1 + len(FAULT_KINDS)), ("sum", True, rows + 4)]


def test_a_failure_flag_in_the_gather_raises_on_this_rank():
    model = _model()
    x, y = _batch(-1)
    with pytest.raises(ProbeFailedElsewhere, match="another rank") as info:
        blockopt.block_spectra(
            model,
            lambda: _probe_loss(model, x, y),
            steps=2,
            reduce=_OneRank("non_finite"),
            share=True,
        )
    assert info.value.kind == "non_finite"


def test_gather_rows_keeps_every_owners_bits():
    rows = torch.full((3, 2), -0.0, dtype=torch.float64)
    rows[1] = torch.tensor([-0.0, 1e-300])
    out = gather_rows(rows, None, _OneRank())
    assert torch.equal(out, rows) and torch.signbit(out[1, 0])  # -0.0 stays -0.0
    with pytest.raises(ValueError, match="mine"):
        gather_rows(rows, ValueError("mine"), _OneRank())


def test_share_needs_a_group_and_a_bool():
    model = _model()
    probe = lambda: _probe_loss(model, *_batch(-1))  # noqa: E731
    with pytest.raises(TypeError, match=r"share=True.*RankMean"):
        blockopt.block_spectra(model, probe, share=True)
    with pytest.raises(TypeError, match=r"share=True.*RankMean"):
        blockopt.block_spectra(model, probe, share=True, reduce=lambda t: t)
    for share in ("yes", 0, None):
        with pytest.raises(TypeError, match="share must be True or False"):
            blockopt.block_spectra(model, probe, share=share, reduce=_OneRank())
    outside = _OneRank()
    outside.rank = lambda: -1  # what torch.distributed.get_rank says outside the group
    with pytest.raises(ValueError, match="not in the group"):
        blockopt.block_spectra(model, probe, share=True, reduce=outside)
    with pytest.raises(TypeError, match="distributed_share must be True"):
        blockopt.BlockOptimizer(model, probe, distributed_share="share")
    assert blockopt.BlockOptimizer(model, probe, distributed_share=False).distributed_share is False


def test_spectra_record_the_products_computed_here():
    spectra = blockopt.Spectra([], steps=1, probes=1, seed=0, hvps=10, local_hvps=4)
    back = blockopt.Spectra.from_dict(spectra.to_dict())
    assert (back.hvps, back.local_hvps) == (10, 4)
    old = {k: v for k, v in spectra.to_dict().items() if k != "local_hvps"}
    assert blockopt.Spectra.from_dict(old).local_hvps == 10  # saved before the field existed
    with pytest.raises(ValueError, match="local_hvps"):
        blockopt.Spectra([], steps=1, probes=1, seed=0, hvps=3, local_hvps=4)
    with pytest.raises(ValueError, match="local_hvps"):
        blockopt.Spectra.from_dict({**spectra.to_dict(), "local_hvps": 11})


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
