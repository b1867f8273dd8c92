"""Readings -> a regular time grid of the configured channels -> model windows.

Owns the grid convention (step k covers ts in [(k - 0.5) * period, (k + 0.5) * period)),
forward fill with a limit, per-channel normalisation statistics, windows that
never span a gap, and the leak-free train/validation split by time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

import numpy as np

log = logging.getLogger(__name__)


def bucket_of(ts: np.ndarray | float, period_s: float) -> np.ndarray:
    """Grid step index of timestamps: round(ts / period), halves rounded up.

    np.rint rounds halves to even; floor(x + 0.5) keeps the rule the same for
    every step, which the streaming assembler in `scoring.grid` relies on too.
    """
    return np.floor(np.asarray(ts, dtype=np.float64) / period_s + 0.5).astype(np.int64)


@dataclass(frozen=True)
class Grid:
    """Channel values on a regular grid: row i is time t0 + i * period_s; NaN = unknown."""

    t0: float
    period_s: float
    values: np.ndarray  # (N, C) float32

    def __post_init__(self) -> None:
        assert self.values.ndim == 2, "grid values must be (N, C)"
        assert self.period_s > 0, "period must be positive"

    @property
    def times(self) -> np.ndarray:
        """(N,) float64 time of each row."""
        return self.t0 + np.arange(len(self.values), dtype=np.float64) * self.period_s

    @property
    def n_channels(self) -> int:
        return int(self.values.shape[1])

    def __len__(self) -> int:
        return len(self.values)


def forward_fill(values: np.ndarray, max_fill_steps: int) -> np.ndarray:
    """Copy of (N, C) `values` with each NaN replaced by the channel's last value at most `max_fill_steps` rows back."""
    out = np.array(values, copy=True)
    if max_fill_steps <= 0 or out.size == 0:
        return out
    n = out.shape[0]
    observed = ~np.isnan(out)  # (N, C)
    rows = np.arange(n)[:, None]
    # Row of the last observation at or before each row (-1: none yet).
    last_row = np.maximum.accumulate(np.where(observed, rows, -1), axis=0)  # (N, C)
    fill = ~observed & (last_row >= 0) & (rows - last_row <= max_fill_steps)
    cols = np.broadcast_to(np.arange(out.shape[1]), out.shape)
    out[fill] = out[last_row[fill], cols[fill]]
    return out


def build_grid(
    ts: np.ndarray,
    channel_idx: np.ndarray,
    values: np.ndarray,
    n_channels: int,
    period_s: float,
    max_fill_steps: int,
    t0: float | None = None,
    t1: float | None = None,
) -> Grid:
    """Place readings on the grid: the newest reading per (step, channel) wins, then forward fill.

    `t0`/`t1` (inclusive, snapped to the grid) bound the grid; by default it spans
    the readings. Readings outside the bounds and non-finite values are ignored.
    """
    if period_s <= 0:
        raise ValueError(f"period_s must be positive, got {period_s}")
    ts = np.asarray(ts, dtype=np.float64)
    channel_idx = np.asarray(channel_idx, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if not (ts.shape == channel_idx.shape == values.shape) or ts.ndim != 1:
        raise ValueError("ts, channel_idx and values must be 1-D arrays of the same length")
    if channel_idx.size and (channel_idx.min() < 0 or channel_idx.max() >= n_channels):
        raise ValueError(f"channel_idx out of range for {n_channels} channels")

    keep = np.isfinite(ts) & np.isfinite(values)
    ts, channel_idx, values = ts[keep], channel_idx[keep], values[keep]
    buckets = bucket_of(ts, period_s)
    if t0 is None and t1 is None and buckets.size == 0:
        return Grid(0.0, period_s, np.empty((0, n_channels), dtype=np.float32))
    k0 = int(bucket_of(t0, period_s)) if t0 is not None else int(buckets.min())
    k1 = int(bucket_of(t1, period_s)) if t1 is not None else int(buckets.max())
    n_rows = max(k1 - k0 + 1, 0)
    grid = np.full((n_rows, n_channels), np.nan, dtype=np.float64)

    inside = (buckets >= k0) & (buckets <= k1)
    rows, cols, vals, tss = buckets[inside] - k0, channel_idx[inside], values[inside], ts[inside]
    if rows.size:
        # Newest reading per cell: walk readings newest-first and keep the first
        # occurrence of each cell (fancy assignment does not define which
        # duplicate wins).
        newest_first = np.argsort(tss, kind="stable")[::-1]
        cell = rows[newest_first] * n_channels + cols[newest_first]
        _, first = np.unique(cell, return_index=True)
        pick = newest_first[first]
        grid[rows[pick], cols[pick]] = vals[pick]

    filled = forward_fill(grid, max_fill_steps)
    return Grid(float(k0 * period_s), float(period_s), filled.astype(np.float32))


@dataclass(frozen=True)
class NormStats:
    """Per-channel mean and standard deviation, kept with the base model."""

    mean: np.ndarray  # (C,) float64
    std: np.ndarray  # (C,) float64, > 0

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        std = np.asarray(self.std, dtype=np.float64)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError("mean and std must be 1-D arrays of the same length")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("normalisation stats must be finite with std > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def n_channels(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, values: np.ndarray, min_std: float = 1e-3) -> NormStats:
        """Fit on (..., C) values, ignoring NaN.

        The std floor is max(min_std, 1e-3 * |mean|): a constant channel (a
        relay state, a stuck sensor) must not blow up to huge normalised values
        the moment it moves.
        """
        flat = np.asarray(values, dtype=np.float64).reshape(-1, np.shape(values)[-1])
        counts = np.sum(~np.isnan(flat), axis=0)
        mean = np.zeros(flat.shape[1])
        std = np.ones(flat.shape[1])
        seen = counts > 0
        if not seen.all():
            log.warning("channels %s have no values; using mean 0, std 1", np.flatnonzero(~seen).tolist())
        if seen.any():
            mean[seen] = np.nanmean(flat[:, seen], axis=0)
            std[seen] = np.nanstd(flat[:, seen], axis=0)
        std = np.maximum(std, np.maximum(min_std, 1e-3 * np.abs(mean)))
        return cls(mean, std)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """(..., C) raw -> normalised float32; NaN stays NaN."""
        return ((np.asarray(values, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def invert(self, normalised: np.ndarray) -> np.ndarray:
        """(..., n) normalised values of the first n channels (n <= C: the forecast ones lead) -> raw float64."""
        normalised = np.asarray(normalised, dtype=np.float64)
        n = normalised.shape[-1]
        return normalised * self.std[:n] + self.mean[:n]

    def to_dict(self) -> NormJson:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: NormJson) -> NormStats:
        """Inverse of to_dict; ValueError if the stats are malformed."""
        try:
            return cls(np.asarray(data["mean"], dtype=np.float64), np.asarray(data["std"], dtype=np.float64))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad normalisation stats: {exc}") from None


class NormJson(TypedDict):
    """NormStats in a base's config.json: per channel, in the base's channel order."""

    mean: list[float]
    std: list[float]


class ValueReference(TypedDict):
    """`value_reference`: interior quantile edges (ascending), each bin's share, and of how many values."""

    edges: list[float]
    proportions: list[float]  # one more than edges
    samples: int


def value_reference(values: np.ndarray, bins: int = 10) -> ValueReference:
    """The distribution of one channel's finite values: `bins`-quantile edges and each bin's share.

    What input drift is judged against (drift/reference.py); pretraining
    records it per channel with the base model. A value equal to an edge
    belongs to the bin above it.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < bins:
        raise ValueError(f"a reference needs at least {bins} finite values, got {x.size}")
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, x, side="right"), minlength=edges.size + 1)
    return {"edges": edges.tolist(), "proportions": (counts / x.size).tolist(), "samples": int(x.size)}


def normalise_grid(grid: Grid, norm: NormStats) -> Grid:
    """The same grid in normalised units (what windows for the model are cut from)."""
    return Grid(grid.t0, grid.period_s, norm.apply(grid.values))


def calendar_features(times: np.ndarray, periods_s: Sequence[float]) -> np.ndarray:
    """(N,) unix seconds -> (N, 2 * len(periods_s)) float32: sine and cosine of the phase in each
    period (a day, a week). Any fixed time zone is a rotation of these, which the model learns."""
    times = np.asarray(times, dtype=np.float64)
    columns = []
    for period in periods_s:
        phase = 2.0 * np.pi * np.mod(times, period) / period
        columns += [np.sin(phase), np.cos(phase)]
    if not columns:
        return np.zeros((len(times), 0), dtype=np.float32)
    return np.stack(columns, axis=1).astype(np.float32)


def with_calendar(grid: Grid, periods_s: Sequence[float]) -> Grid:
    """The grid with calendar columns appended: the model's input columns (channels first)."""
    if not periods_s:
        return grid
    return Grid(grid.t0, grid.period_s, np.concatenate([grid.values, calendar_features(grid.times, periods_s)], axis=1))


class Windows(NamedTuple):
    """Windows of consecutive grid rows and the time of each window's last row."""

    windows: np.ndarray  # (M, length, C) float32
    end_times: np.ndarray  # (M,) float64


def valid_window_starts(values: np.ndarray, length: int, stride: int = 1) -> np.ndarray:
    """Start rows of every window of `length` rows of (N, C) `values` without NaN.

    Strides count from the start of each NaN-free run, so a gap never shifts
    which windows the next run yields.
    """
    if length < 1 or stride < 1:
        raise ValueError("length and stride must be >= 1")
    n = len(values)
    if n < length:
        return np.empty(0, dtype=np.int64)
    valid = ~np.isnan(values).any(axis=1)  # (N,)
    bad_before = np.concatenate([[0], np.cumsum(~valid)])  # bad rows in [0, i)
    starts = np.arange(n - length + 1)
    clean = bad_before[starts + length] - bad_before[starts] == 0
    rows = np.arange(n)
    # First row of the NaN-free run each row belongs to.
    run_start = np.maximum.accumulate(np.where(valid & np.concatenate([[True], ~valid[:-1]]), rows, 0))
    aligned = (starts - run_start[starts]) % stride == 0
    return starts[clean & aligned]


def make_windows(grid: Grid, length: int, stride: int = 1) -> Windows:
    """Every NaN-free window of `length` rows (use model window + 1 for training targets)."""
    starts = valid_window_starts(grid.values, length, stride)
    offsets = np.arange(length)
    windows = grid.values[starts[:, None] + offsets[None, :]]  # (M, length, C)
    end_times = grid.t0 + (starts + length - 1).astype(np.float64) * grid.period_s
    return Windows(np.ascontiguousarray(windows, dtype=np.float32), end_times)


def split_by_time(
    windows: np.ndarray,
    end_times: np.ndarray,
    val_fraction: float,
    period_s: float | None = None,
) -> tuple[Windows, Windows]:
    """Hold out the newest `val_fraction` of windows; drop training windows that share a row with them.

    A window ending at t covers (t - (length - 1) * period, t]. `period_s`
    defaults to the smallest spacing of end times, which over-estimates it
    when windows were strided and so only drops more, never leaks.
    """
    windows = np.asarray(windows)
    end_times = np.asarray(end_times, dtype=np.float64)
    assert len(windows) == len(end_times), "one end time per window"
    train, val = split_indices_by_time(end_times, windows.shape[1], val_fraction, period_s)
    return Windows(windows[train], end_times[train]), Windows(windows[val], end_times[val])


def split_indices_by_time(
    end_times: np.ndarray, length: int, val_fraction: float, period_s: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`split_by_time` for windows of `length` rows known by their end times only: the indices of
    the training and the validation windows, each in time order."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    end_times = np.asarray(end_times, dtype=np.float64)
    order = np.argsort(end_times, kind="stable")
    end_times = end_times[order]
    m = len(order)
    if m == 0:
        return order, order
    n_val = min(max(math.ceil(m * val_fraction), 1), m)
    first_val = m - n_val
    val = order[first_val:]
    if first_val == 0:
        return order[:0], val
    if period_s is None:
        gaps = np.diff(np.unique(end_times))
        period_s = float(gaps[gaps > 0].min()) if (gaps > 0).any() else 0.0
    val_first_row = end_times[first_val] - (length - 1) * period_s
    # Half a period of slack absorbs float error in the end times.
    train_mask = end_times[:first_val] < val_first_row - 0.5 * period_s
    return order[:first_val][train_mask], val
