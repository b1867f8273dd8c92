"""Offline replay of a stored grid, for the report: what the model forecast and which drift it judged.

The model's forecasts come from the serving forward (`serving.forecast_windows`), in batches,
on every `stride`-th gap-free window; drift comes from the daemon's own feed
(drift/feed.py). The baselines' serving choice is not replayed: the report shows the
model, base and served adapter, against the actual values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from edge_daemon.artifacts.merge import serving_model
from edge_daemon.drift.feed import DriftFeed
from edge_daemon.errors import AdapterError
from edge_daemon.frames import valid_window_starts
from edge_daemon.model import Forecaster, anomaly_score
from edge_daemon.scoring.serving import forecast_windows

if TYPE_CHECKING:
    from edge_daemon.artifacts.adapters import AdapterVersion
    from edge_daemon.artifacts.base import BaseModel
    from edge_daemon.config import Config
    from edge_daemon.drift import DriftEvent
    from edge_daemon.frames import Grid

log = logging.getLogger(__name__)

# Forecast at most this many grid steps per model (evenly spaced): a week at 1 Hz is 600k steps,
# and the figures cannot show more than a few thousand points apart anyway.
MAX_FORECASTS = 20_000
INFERENCE_BATCH = 512


@dataclass
class Switch:
    """What served from a data time on: a stored adapter, or the base model alone (version 0)."""

    version: int  # 0: the base model alone
    t: float  # unix seconds on the data's clock
    adapter: AdapterVersion | None
    resets_drift: bool = True  # as the daemon did: False for a routine update on new data


@dataclass
class Forecasts:
    """One-step forecasts at `rows` of the grid, as serving would have made them."""

    rows: np.ndarray  # (M,) grid row of each forecast target
    t: np.ndarray  # (M,) unix seconds of those rows
    base: np.ndarray  # (M, C) normalised forecasts of the base model
    served: np.ndarray  # (M, C) normalised forecasts of whichever model served at t
    served_version: np.ndarray  # (M,) adapter version serving at t, 0 for the base alone
    actual: np.ndarray  # (M, C) normalised actual values
    base_score: np.ndarray  # (M,) anomaly score of the base model
    served_score: np.ndarray  # (M,) anomaly score of the served model
    stride: int  # forecast every `stride`-th eligible step


def _predict(model: Forecaster, inputs: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """(M, C) next-step forecasts from the `window` rows of model inputs at each start (the serving forward)."""
    out = np.empty((len(starts), model.cfg.n_channels), dtype=np.float32)
    windows = sliding_window_view(inputs, window, axis=0)  # (N - window + 1, n_inputs, window): a view, no copy
    for lo in range(0, len(starts), INFERENCE_BATCH):
        chunk = starts[lo : lo + INFERENCE_BATCH]
        x = torch.from_numpy(np.ascontiguousarray(windows[chunk].transpose(0, 2, 1)))  # (B, W, n_inputs)
        out[lo : lo + len(chunk)] = forecast_windows(model, x)[:, 0]
    return out


def compute_forecasts(grid: Grid, base: BaseModel, switches: list[Switch], max_forecasts: int = MAX_FORECASTS) -> Forecasts | None:
    """Replay the grid through the base model and through each adapter from its switch time on."""
    window = base.cfg.window
    inputs = base.inputs(grid).values  # (N, n_inputs): channels in model order (NaN stays NaN), then the calendar
    starts = valid_window_starts(inputs[:, : base.cfg.n_sensors], window + 1)  # rows start..start+window are gap-free
    normalised = inputs[:, : base.cfg.n_channels]  # (N, C): the forecast channels
    if len(starts) == 0:
        return None
    stride = max(1, math.ceil(len(starts) / max_forecasts))
    starts = starts[::stride]
    rows = starts + window  # the row each forecast is for
    t = grid.t0 + rows.astype(np.float64) * grid.period_s
    actual = normalised[rows]
    base_pred = _predict(base.model, inputs, starts, window)
    served = base_pred.copy()
    served_version = np.zeros(len(rows), dtype=np.int64)
    for switch in switches:
        since = t >= switch.t
        if not since.any():
            continue
        if switch.adapter is None:  # back to the base model alone
            served[since] = base_pred[since]
            served_version[since] = 0
            continue
        try:
            model = serving_model(base, switch.adapter)
        except AdapterError as exc:
            log.warning("adapter v%d cannot be replayed: %s", switch.version, exc)
            continue
        # Later switches overwrite earlier ones: what serves at t is the newest adapter live by t.
        served[since] = _predict(model, inputs, starts[since], window)
        served_version[since] = switch.version
        del model
    scale = base.residual_scale_tensor()
    base_score = anomaly_score(torch.from_numpy(base_pred - actual), scale).numpy()
    served_score = anomaly_score(torch.from_numpy(served - actual), scale).numpy()
    return Forecasts(rows, t, base_pred, served, served_version, actual, base_score, served_score, stride)


def recompute_drift(
    config: Config, grid: Grid, forecasts: Forecasts | None, switches: list[Switch], base: BaseModel | None = None
) -> list[DriftEvent]:
    """Run a fresh drift feed (the daemon's, drift/feed.py) over the grid and the served residuals.

    As in the daemon, every grid step feeds input drift, every scored step residual drift, and
    the references restart when an adapter begins serving, except after a routine update on new
    data (records.resets_drift_baseline).
    """
    feed = DriftFeed(config, base)
    events: list[DriftEvent] = []
    residual_at: dict[int, np.ndarray] = {}
    if forecasts is not None:
        residuals = forecasts.served - forecasts.actual
        residual_at = {int(r): residuals[i] for i, r in enumerate(forecasts.rows)}
    pending = [s.t for s in switches if s.resets_drift]
    for row in range(len(grid.values)):
        values = grid.values[row]
        if np.isnan(values).all():
            continue  # serving skips stretches where nothing is known
        t = grid.t0 + row * grid.period_s
        while pending and pending[0] <= t:
            feed.monitor.reset_baseline(pending.pop(0))
        events += feed.step(values, t)
        residual = residual_at.get(row)
        if residual is not None:
            events += feed.scored(residual, t)
    return events
