"""Readings -> grid -> windows -> train/validation split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_daemon.frames import (
    Grid,
    NormStats,
    build_grid,
    calendar_features,
    forward_fill,
    make_windows,
    normalise_grid,
    split_by_time,
    with_calendar,
)


def _naive_grid(ts, ch, vals, n_channels, period, max_fill, k0, k1):
    """Reference implementation: a dict per cell, then a loop for forward fill."""
    cells: dict[tuple[int, int], tuple[float, float]] = {}
    for t, c, v in zip(ts, ch, vals, strict=True):
        k = int(np.floor(t / period + 0.5))
        if k0 <= k <= k1 and ((k, c) not in cells or t >= cells[(k, c)][0]):
            cells[(k, c)] = (t, v)
    out = np.full((k1 - k0 + 1, n_channels), np.nan)
    for c in range(n_channels):
        last, last_k = np.nan, None
        for k in range(k0, k1 + 1):
            if (k, c) in cells:
                last, last_k = cells[(k, c)][1], k
                out[k - k0, c] = last
            elif last_k is not None and k - last_k <= max_fill:
                out[k - k0, c] = last
    return out


def test_bucket_rounding_and_newest_reading_wins() -> None:
    ts = np.array([10.2, 9.6, 10.49, 10.5, 11.0])
    ch = np.array([0, 0, 1, 0, 1])
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    grid = build_grid(ts, ch, vals, n_channels=2, period_s=1.0, max_fill_steps=0)
    assert grid.t0 == 10.0
    np.testing.assert_array_equal(grid.times, [10.0, 11.0])
    # Step 10 holds 9.6 and 10.2 for channel 0: the later one (10.2 -> 1.0) wins, whatever the input order.
    np.testing.assert_array_equal(grid.values, np.array([[1.0, 3.0], [4.0, 5.0]], dtype=np.float32))
    assert grid.values.dtype == np.float32


def test_forward_fill_stops_at_limit() -> None:
    ts = np.array([0.0, 1.0, 8.0])
    ch = np.array([0, 0, 0])
    vals = np.array([1.0, 2.0, 3.0])
    grid = build_grid(ts, ch, vals, n_channels=2, period_s=1.0, max_fill_steps=3)
    col = grid.values[:, 0]
    np.testing.assert_array_equal(col[:5], [1.0, 2.0, 2.0, 2.0, 2.0])  # filled 3 steps past t=1
    assert np.isnan(col[5:8]).all()
    assert col[8] == 3.0
    assert np.isnan(grid.values[:, 1]).all()  # a channel never seen stays unknown


def test_bounds_period_and_bad_input() -> None:
    ts = np.array([0.0, 2.0, 4.0, 6.0])
    grid = build_grid(ts, np.zeros(4, dtype=np.int64), np.arange(4.0), 1, period_s=2.0, max_fill_steps=0, t0=2.0, t1=4.9)
    np.testing.assert_array_equal(grid.times, [2.0, 4.0])
    np.testing.assert_array_equal(grid.values[:, 0], [1.0, 2.0])
    nan_value = build_grid(np.array([0.0, 1.0]), np.array([0, 0]), np.array([np.nan, 5.0]), 1, 1.0, 0, t0=0.0)
    assert np.isnan(nan_value.values[0, 0]) and nan_value.values[1, 0] == 5.0
    with pytest.raises(ValueError, match="out of range"):
        build_grid(np.array([0.0]), np.array([3]), np.array([1.0]), 2, 1.0, 0)
    empty = build_grid(np.array([]), np.array([], dtype=np.int64), np.array([]), 3, 1.0, 2)
    assert empty.values.shape == (0, 3)


@settings(max_examples=60, deadline=None)
@given(
    readings=st.lists(
        st.tuples(st.floats(0, 40, allow_nan=False), st.integers(0, 2), st.floats(-1e3, 1e3, allow_nan=False)),
        min_size=1,
        max_size=60,
    ),
    max_fill=st.integers(0, 4),
    period=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_build_grid_matches_reference(readings, max_fill, period) -> None:
    ts, ch, vals = (np.array(x) for x in zip(*readings, strict=True))
    grid = build_grid(ts, ch, vals, 3, period, max_fill)
    k = np.floor(ts / period + 0.5).astype(int)
    expected = _naive_grid(ts, ch, vals, 3, period, max_fill, int(k.min()), int(k.max()))
    np.testing.assert_array_equal(grid.values, expected.astype(np.float32))
    assert grid.t0 == k.min() * period


def test_forward_fill_zero_limit_is_identity() -> None:
    values = np.array([[1.0], [np.nan], [2.0]])
    np.testing.assert_array_equal(forward_fill(values, 0), values)


def test_norm_stats_nan_aware_roundtrip_and_floor() -> None:
    rng = np.random.default_rng(1)
    values = np.stack([rng.normal(50, 4, 1000), np.full(1000, 7.0), rng.normal(0, 1, 1000)], axis=1)
    values[::7, 0] = np.nan
    norm = NormStats.fit(values)
    assert norm.mean[0] == pytest.approx(np.nanmean(values[:, 0]))
    assert norm.std[0] == pytest.approx(np.nanstd(values[:, 0]))
    assert norm.std[1] == pytest.approx(7e-3)  # constant channel: floor 1e-3 * |mean|
    z = norm.apply(values)
    assert z.dtype == np.float32
    assert np.isnan(z[::7, 0]).all()
    assert abs(np.nanmean(z[:, 0])) < 1e-4 and abs(np.nanstd(z[:, 0]) - 1) < 1e-4
    np.testing.assert_allclose(norm.invert(z), values, rtol=1e-5, atol=1e-4)
    grid = normalise_grid(Grid(5.0, 2.0, values.astype(np.float32)), norm)
    assert grid.t0 == 5.0 and grid.period_s == 2.0
    np.testing.assert_allclose(grid.values, z, rtol=1e-5, atol=1e-5)
    again = NormStats.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.mean, norm.mean)
    np.testing.assert_array_equal(again.std, norm.std)
    with pytest.raises(ValueError):
        NormStats.from_dict({"mean": [0.0, 1.0], "std": [1.0, 0.0]})
    with pytest.raises(ValueError):
        NormStats.from_dict({"mean": [0.0]})


def test_windows_never_span_gaps() -> None:
    values = np.arange(30, dtype=np.float32).reshape(15, 2)
    values[6, 1] = np.nan  # rows 0-5 and 7-14 are the runs
    grid = Grid(100.0, 2.0, values)
    windows, end_times = make_windows(grid, length=4)
    # Run of 6 rows gives 3 windows, run of 8 rows gives 5.
    assert windows.shape == (8, 4, 2)
    assert not np.isnan(windows).any()
    np.testing.assert_array_equal(end_times, 100.0 + 2.0 * np.array([3, 4, 5, 10, 11, 12, 13, 14]))
    np.testing.assert_array_equal(windows[3], values[7:11])
    # Strides count from the start of each run.
    strided, strided_ends = make_windows(grid, length=4, stride=3)
    np.testing.assert_array_equal(strided_ends, 100.0 + 2.0 * np.array([3, 10, 13]))
    assert strided.shape == (3, 4, 2)
    short = make_windows(Grid(0.0, 1.0, values[:3]), length=4)
    assert short.windows.shape == (0, 4, 2) and short.end_times.shape == (0,)


def test_split_by_time_holds_out_newest_without_overlap() -> None:
    grid = Grid(0.0, 1.0, np.arange(200, dtype=np.float32).reshape(100, 2))
    windows, end_times = make_windows(grid, length=10)
    shuffled = np.random.default_rng(0).permutation(len(windows))
    (train, train_ends), (val, val_ends) = split_by_time(windows[shuffled], end_times[shuffled], 0.2)
    assert len(val) == int(np.ceil(len(windows) * 0.2))
    assert val_ends.min() > train_ends.max()
    # Every training row is strictly older than every validation row: no shared step.
    assert train[:, :, 0].max() < val[:, :, 0].min()
    # Only the windows straddling the boundary are dropped (length - 1 of them).
    assert len(train) == len(windows) - len(val) - 9
    np.testing.assert_array_equal(np.sort(train_ends), train_ends)


def test_split_by_time_infers_period_conservatively_with_stride() -> None:
    grid = Grid(0.0, 1.0, np.arange(100, dtype=np.float32).reshape(100, 1))
    windows, end_times = make_windows(grid, length=10, stride=4)
    (train, _), (val, _) = split_by_time(windows, end_times, 0.25)
    assert train[:, :, 0].max() < val[:, :, 0].min()
    with pytest.raises(ValueError):
        split_by_time(windows, end_times, 1.0)


def test_calendar_features_are_the_phase_of_the_day_and_the_week() -> None:
    day, week = 86400.0, 7 * 86400.0
    t = np.array([0.0, day / 4, day / 2, day + day / 4, week / 2])
    f = calendar_features(t, (day, week))  # sin(day), cos(day), sin(week), cos(week)
    np.testing.assert_allclose(f[:, 0], [0, 1, 0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(f[:, 1], [1, 0, -1, 0, -1], atol=1e-6)  # half a week is noon
    np.testing.assert_allclose(f[4, 2:], [0, -1], atol=1e-6)
    assert calendar_features(t, ()).shape == (5, 0)
    grid = Grid(day / 4, 600.0, np.full((3, 2), np.nan, dtype=np.float32))
    extended = with_calendar(grid, (day,))
    assert extended.values.shape == (3, 4) and np.isnan(extended.values[:, :2]).all()
    np.testing.assert_allclose(extended.values[:, 2:], calendar_features(grid.times, (day,)))
