"""An update's training data: the windows since the change (or the last hours) and replayed
windows from older segments of the store, split into training and validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_daemon.config import Config

# Replay spans drawn per update; each segment yields several windows.
MAX_REPLAY_SEGMENTS = 24
# Recent windows kept per update: a longer span since a change is thinned (strided) to this many,
# so a day of data at 1 s costs what an hour does.
MAX_RECENT_WINDOWS = 4096


@dataclass
class UpdateData:
    """Normalised (N, T+1, C) windows for one update (`training.batches.GridWindows`: cut from the grid when read)."""

    recent_train: Any
    recent_val: Any
    replay_train: Any
    replay_val: Any
    recent_range: tuple[float, float]
    replay_spans: list[tuple[float, float]]
    recent_val_ends: np.ndarray | None = None  # (M,) unix seconds each recent validation window ends


def prepare_update_data(
    store: Any, base: Any, config: Config, rng: np.random.Generator, since: float | None = None
) -> UpdateData:
    """Recent windows (split by time) and replayed windows from older segments of the store.

    Recent data is what came since `since` (when the residuals began to drift: the model is
    taught the new behaviour, not the old one it already knows), else the last
    `train.recent_hours`; replay comes from before it.
    """
    import torch

    from edge_daemon.errors import TrainingError
    from edge_daemon.frames import build_grid, split_indices_by_time, valid_window_starts
    from edge_daemon.training.batches import GridWindows

    span = store.time_range()
    if span is None:
        raise TrainingError("the store is empty")
    newest = span[1]
    cutoff = newest - config.train.recent_hours * 3600.0 if since is None else min(float(since), newest)
    length = base.cfg.window + 1
    n_channels = len(config.channels.names)  # grid columns, config order; the windows hold the model's inputs

    def rows_between(since: float | None, until: float | None, stride: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's input rows of the grid between the times, the start row of each gap-free
        window (every `stride`-th) and its end time."""
        ts, idx, values = store.read(since, until)
        grid = base.inputs(build_grid(ts, idx, values, n_channels, config.channels.period_s, config.channels.max_fill_steps))
        starts = valid_window_starts(grid.values, length, stride)
        ends = grid.t0 + (starts + length - 1).astype(np.float64) * grid.period_s
        return np.ascontiguousarray(grid.values, dtype=np.float32), starts, ends

    steps = (newest - cutoff) / config.channels.period_s
    rows, starts, ends = rows_between(cutoff, None, stride=max(1, math.ceil(steps / MAX_RECENT_WINDOWS)))
    train, val = split_indices_by_time(ends, length, config.train.val_fraction, period_s=config.channels.period_s)
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"not enough recent data: {len(starts)} windows of {length} gap-free steps since the cutoff")
    recent_rows = torch.from_numpy(rows)
    recent_starts = torch.from_numpy(starts)

    # Replay: the rows of each older segment one after the other, windows within each.
    spans = store.replay_segments(before=cutoff, rng=rng, max_segments=MAX_REPLAY_SEGMENTS)
    row_parts, start_parts, offset = [], [], 0
    for a, b in spans:
        seg_rows, seg_starts, _ = rows_between(a, b, stride=max(1, length // 4))
        if len(seg_starts):
            row_parts.append(seg_rows)
            start_parts.append(seg_starts + offset)
            offset += len(seg_rows)
    replay_rows = torch.from_numpy(np.concatenate(row_parts)) if row_parts else torch.empty((0, base.cfg.n_inputs))
    replay_starts = np.concatenate(start_parts) if start_parts else np.empty(0, np.int64)
    order = torch.from_numpy(replay_starts[rng.permutation(len(replay_starts))])
    n_val = int(round(len(order) * config.train.val_fraction))
    return UpdateData(
        recent_train=GridWindows(recent_rows, recent_starts[torch.from_numpy(train)], length),
        recent_val=GridWindows(recent_rows, recent_starts[torch.from_numpy(val)], length),
        replay_train=GridWindows(replay_rows, order[n_val:], length),
        replay_val=GridWindows(replay_rows, order[:n_val], length),
        recent_range=(float(cutoff), float(newest)),
        replay_spans=[(float(a), float(b)) for a, b in spans],
        recent_val_ends=ends[val],
    )


__all__ = ["MAX_RECENT_WINDOWS", "MAX_REPLAY_SEGMENTS", "UpdateData", "prepare_update_data"]
