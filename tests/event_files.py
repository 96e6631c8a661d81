"""Reading what TensorBoard event files hold, for the tests of the trainer integrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
