"""What the tests of the trainer integrations share: a spy on the losses an optimizer is fed,
the HParams sessions an event file holds, and a preamble for a fresh interpreter in which some
packages look uninstalled (to imports and to package metadata alike: torchmetrics, which
Lightning imports, imports transformers when its metadata says it is installed, so blocking the
import alone would break Lightning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blockopt


def spy_losses(opt: blockopt.BlockOptimizer) -> list[tuple[int, float]]:
    """Every training loss the optimizer receives, with its step count when it came (both
    ``step(closure)`` and ``observe_loss`` go through ``_observe``)."""
    received: list[tuple[int, float]] = []
    observe = opt._observe

    def spy(value: float) -> None:
        received.append((opt.step_count, value))
        observe(value)

    opt._observe = spy
    return received


def hparams_sessions(logdir: Path) -> list[dict[str, Any]]:
    """The HParams sessions (their hyperparameters) in every event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag != "_hparams_/session_start_info":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                hparams = data.session_start_info.hparams
                sessions.append({k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()})
    return sessions


HIDE = """
import importlib.metadata as metadata, sys
HIDDEN = {names!r}

class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Hidden())
_distribution = metadata.distribution

def distribution(name):
    if name.lower().replace("_", "-") in {{n.replace("_", "-") for n in HIDDEN}}:
        raise metadata.PackageNotFoundError(name)
    return _distribution(name)

metadata.distribution = distribution
"""
