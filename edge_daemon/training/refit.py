"""The baselines an accepted update's adapter serves beside, refitted on the update's own windows.

A training worker's step after the gate (`training.job`): the numpy baselines
themselves are `baselines.py`, which serving reads without torch; this step
needs the adapted model and the update's windows (`training.data.UpdateData`),
which only the worker holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edge_daemon.config import Config
from edge_daemon.training.data import UpdateData

if TYPE_CHECKING:
    from edge_daemon.baselines import BaselineJson, HeldOut


def refit_baselines(
    base: Any, config: Config, data: UpdateData, model: Any, batch_size: int
) -> tuple[list[BaselineJson], HeldOut]:
    """Baselines fitted on an update's training windows (recent and replayed) and the held-out
    comparison on its recent validation windows, with `model` the adapted forecaster."""
    from edge_daemon.baselines import held_out_report, make_baselines
    from edge_daemon.training.pretrain import last_step_errors

    n_sensors = base.cfg.n_sensors  # the forecast channels, then the inputs only; the calendar after them
    # The ridge fit reads the last lags + horizon steps of each window (seasonal naive and
    # persistence read none): those of every window, not whole windows.
    tail = base.cfg.lags + max(base.cfg.horizons)
    train = np.concatenate([data.recent_train.tails(tail)[..., :n_sensors], data.replay_train.tails(tail)[..., :n_sensors]])
    season = base.meta.get("season_steps") or config.model.season_steps or None
    baselines = make_baselines(train, season, base.cfg.lags, base.cfg.horizons, base.cfg.n_channels)
    val = data.recent_val.numpy()
    # The adapted model forecasts as many windows at a time as the update's last plan trained on:
    # what fitted the memory then fits it now.
    held_out = held_out_report(baselines, val[..., :n_sensors], last_step_errors(model, val, batch_size), base.cfg.n_channels)
    return [b.to_dict() for b in baselines], held_out


__all__ = ["refit_baselines"]
