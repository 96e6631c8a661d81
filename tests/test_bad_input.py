"""Bad input to the public API: each case raises a clear exception naming the problem, and a
failed load_state_dict leaves the optimizer exactly as it was (docs/BAD_INPUT.md lists them)."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_optimizer
from bad_input_cases import (
    API_CASES,
    LOAD_CASES,
    MORE_LOAD_CASES,
    Case,
    LoadCase,
    assert_same,
    mlp,
    probe_of,
    source_state,
    target,
    train,
    truncate_exp_avg,
)

import blockopt


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_bad_argument_raises_a_clear_error(case: Case) -> None:
    assert case.error is not None
    with pytest.raises(case.error, match=case.message):
        case.call()


# -- load_state_dict --------------------------------------------------------------------------


def _snapshot(opt: blockopt.BlockOptimizer) -> dict[str, Any]:
    """Everything load_state_dict may change, as plain values and cloned tensors."""

    def groups(o: torch.optim.Optimizer) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]

    def state(o: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
        index = {id(p): i for i, p in enumerate(p for g in o.param_groups for p in g["params"])}
        return {
            index[id(p)]: {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()
            }
            for p, s in o.state.items()
        }

    return {
        "mode": opt.mode,
        "scales": dict(opt.mode_scales),
        "lrs": [g["lr"] for g in opt.param_groups],
        "groups": groups(opt),
        "state": state(opt),
        "inner": (opt.mode, type(o := opt.active_optimizer), o, groups(o), state(o)),
        "step_count": opt.step_count,
        "history": list(opt.history),
        "spectra": [(t, s.to_dict()) for t, s in opt.spectra_history],
        "faults": list(opt.faults),
        "block_factors": dict(opt.block_factors),
        "schedule": opt.schedule.state_dict(),
        "last_switch": opt.policy.last_switch,
        "probe_seconds": opt.probe_seconds,
        "train_seconds": (opt.recorder.saved_train_seconds, opt.recorder.clock_start),
        "last_score": opt.last_score,
    }


@pytest.mark.parametrize("case", LOAD_CASES + MORE_LOAD_CASES, ids=lambda c: c.id)
def test_bad_state_dict_raises_and_changes_nothing(case: LoadCase) -> None:
    sd = source_state()
    case.corrupt(sd)
    opt, model = target()
    twin, twin_model = target()  # the same run, never handed a bad state dict
    before = _snapshot(opt)
    with pytest.raises(case.error, match=case.message):
        opt.load_state_dict(sd)
    assert_same(before, _snapshot(opt))
    # And it trains on exactly as if nothing had happened.
    train(opt, model, 5, 9)
    train(twin, twin_model, 5, 9)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
    assert opt.mode == twin.mode and len(opt.history) == len(twin.history)


def test_state_dict_that_is_not_a_dict_is_a_type_error() -> None:
    opt, _ = target()
    before = _snapshot(opt)
    with pytest.raises(TypeError, match=r"load_state_dict\(\) needs the dict .* got list"):
        opt.load_state_dict([("blockopt", {})])
    assert_same(before, _snapshot(opt))


def test_a_valid_state_still_loads_after_a_failed_one() -> None:
    sd = source_state()
    opt, _ = target()
    bad = copy.deepcopy(sd)
    truncate_exp_avg(bad)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    opt.load_state_dict(sd)
    assert opt.mode == "adam" and opt.step_count == 7
    assert_same(sd["blockopt"]["inner"], opt.state_dict()["blockopt"]["inner"])


# -- checkpoints load with weights_only=True --------------------------------------------------

_SAFE_LEAVES = (str, int, float, bool, type(None), torch.Tensor)


def _unsafe_leaves(value: Any, where: str = "state") -> list[str]:
    """Paths to values of types outside what torch.load(weights_only=True) is meant to read."""
    if isinstance(value, dict):
        bad = [f"{where} key {k!r}" for k in value if not isinstance(k, (str, int))]
        return bad + [x for k, v in value.items() for x in _unsafe_leaves(v, f"{where}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [x for i, v in enumerate(value) for x in _unsafe_leaves(v, f"{where}[{i}]")]
    if type(value) in _SAFE_LEAVES or type(value) is torch.Tensor:
        return []
    return [f"{where}: {type(value).__name__}"]


@pytest.mark.parametrize("inner", ["adamw", "lamb"])
def test_state_dict_holds_only_weights_only_types_and_round_trips(inner: str) -> None:
    model = mlp(seed=2)
    calls = []

    def probe() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a failing probe, to record a fault")
        return probe_of(model)()

    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = blockopt.wrap(
        base,
        model,
        probe,
        probe_every=2,
        optimizers={"adam": torch_optimizer.Lamb} if inner == "lamb" else None,
    )
    with pytest.warns(Warning):
        train(opt, model, 0, 6)
    opt.switch("block_sgd")
    train(opt, model, 6, 8)
    opt.switch("adam")
    train(opt, model, 8, 10)
    sd = opt.state_dict()
    assert sd["blockopt"]["faults"] and sd["blockopt"]["spectra"] and sd["blockopt"]["history"]
    assert _unsafe_leaves(sd) == []
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_same(sd, loaded)
    fresh_model = mlp(seed=2)
    fresh_model.load_state_dict(model.state_dict())
    fresh = blockopt.wrap(
        torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9),
        fresh_model,
        probe_of(fresh_model),
        probe_every=2,
        optimizers={"adam": torch_optimizer.Lamb} if inner == "lamb" else None,
    )
    fresh.load_state_dict(loaded)
    assert_same(sd, fresh.state_dict())


def test_nothing_in_blockopt_unpickles_or_evaluates_file_contents() -> None:
    """Checkpoints are read with weights_only=True and data files with json; no pickle, eval,
    exec or marshal anywhere in the package."""
    package = Path(blockopt.__file__).parent
    forbidden = re.compile(r"\b(pickle|marshal|shelve|dill)\b|(?<![.\w])(eval|exec)\(")
    for file in sorted(package.glob("*.py")):
        for number, line in enumerate(file.read_text().splitlines(), 1):
            assert not forbidden.search(line), f"{file.name}:{number}: {line.strip()}"
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{file.name}:{number}: {line.strip()}"
