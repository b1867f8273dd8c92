"""Replay store: keyed writes, reads, migrations, retention under a byte budget, replay spans."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.config import StoreConfig
from edge_daemon.errors import StoreError
from edge_daemon.store import Reading, ReplayStore, segment_of
from tests.support import legacy_store

CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]
NOW = 1_800_000_000.0


def open_store(tmp_path: Path, **cfg: object) -> ReplayStore:
    return ReplayStore(tmp_path / "store.db", StoreConfig(**cfg), CHANNELS, seed=7)


def sql_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM readings").fetchone()[0])


def fill(store: ReplayStore, start: float, seconds: int, step: float = 1.0) -> int:
    """One reading per channel every `step` s from start; returns how many were written."""
    n = int(seconds / step)
    batch: list[Reading] = []
    written = 0
    for i in range(n):
        for c, name in enumerate(CHANNELS):
            batch.append(Reading(name, start + i * step, float(i * 10 + c)))
        if len(batch) >= 3000:
            written += store.write(batch)
            batch = []
    return written + store.write(batch)


def test_write_dedups_on_channel_and_ts(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    first = [Reading("m1/temperature", NOW, 1.0), Reading("m1/vibration", NOW, 2.0), Reading("m1/temperature", NOW + 1, 3.0)]
    assert store.write(first) == 3
    # A redelivered batch, plus one new reading and a duplicate inside the same batch.
    again = first + [Reading("m1/current", NOW, 4.0), Reading("m1/current", NOW, 5.0)]
    assert store.write(again) == 1
    assert store.count() == 4 == sql_count(store.path)
    ts, idx, values = store.read()
    assert list(zip(ts.tolist(), idx.tolist(), values.tolist())) == [
        (NOW, 0, 1.0), (NOW, 1, 2.0), (NOW, 2, 4.0), (NOW + 1, 0, 3.0),
    ]  # fmt: skip
    store.close()


def test_large_batch_across_segments_and_insert_chunks_counts_every_new_key_once(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_s=60)
    # 1,001 distinct keys over three segments: several multi-row INSERT chunks of different sizes.
    batch = [Reading(CHANNELS[i % 3], NOW + 50 + (i // 3) * 0.25, float(i)) for i in range(1001)]
    assert store.write(batch) == 1001
    # Redelivered keys (first and last chunk), duplicates within the batch, and new ones.
    again = batch[:300] + batch[-5:] + [Reading("m1/current", NOW + 500.0, -1.0)] * 3 + [Reading("m2/new", NOW, 7.0)]
    assert store.write(again) == 2
    assert store.count() == 1003 == sql_count(store.path)
    with sqlite3.connect(store.path) as conn:
        per_segment = dict(conn.execute("SELECT id, rows FROM segments").fetchall())
    assert sum(per_segment.values()) == 1003 and len(per_segment) == 4
    ts, idx, values = store.read()
    assert sorted(values.tolist()) == sorted([float(i) for i in range(1001)] + [-1.0])  # m2/new is not configured
    store.close()


def test_read_orders_by_ts_filters_range_and_unconfigured_channels(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    rng = np.random.default_rng(1)
    stamps = NOW + rng.permutation(1000).astype(float) * 0.5
    store.write([Reading(CHANNELS[i % 3], float(t), float(i)) for i, t in enumerate(stamps)])
    store.write([Reading("m2/other", NOW + 10, -1.0)])  # stored, but not a configured channel
    ts, idx, values = store.read()
    assert ts.dtype == np.float64 and idx.dtype == np.int64 and values.dtype == np.float64
    assert len(ts) == 1000 and np.all(np.diff(ts) >= 0)
    assert -1.0 not in values
    ts, idx, values = store.read(since=NOW + 100, until=NOW + 200)
    assert len(ts) == 200 and ts.min() == NOW + 100 and ts.max() == NOW + 199.5
    # Values map back to the reading they were written with.
    by_ts = {float(t): (CHANNELS[i % 3], float(i)) for i, t in enumerate(stamps)}
    for t, c, v in zip(ts, idx, values):
        assert by_ts[float(t)] == (CHANNELS[c], v)
    assert store.count() == 1001
    assert store.time_range() == (NOW, NOW + 499.5)
    store.close()


def test_empty_store(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert store.count() == 0 and store.time_range() is None
    ts, idx, values = store.read()
    assert len(ts) == len(idx) == len(values) == 0
    assert store.replay_segments(NOW, np.random.default_rng(0), 5) == []
    store.close()


def test_wal_mode_and_migrations_recorded_once(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.write([Reading("m1/current", NOW, 1.0)])
    assert store.migrations() == ["0001_initial", "0002_held", "0003_readings_by_time"]
    store.close()
    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM _sqlite_migrations").fetchone()[0] == 3
        # A migration this version does not know means a newer version wrote the file.
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('edge-daemon', '9999_future', '')"
        )
    with pytest.raises(StoreError, match="newer version"):
        open_store(tmp_path)


def test_a_store_from_before_sqlite_utils_migrations_keeps_its_record_and_data(tmp_path: Path) -> None:
    legacy_store(tmp_path / "store.db", [(name, NOW + i, float(i)) for i in range(60) for name in CHANNELS])
    with sqlite3.connect(tmp_path / "store.db") as conn:  # the record as earlier versions kept it
        conn.execute("DROP TABLE _sqlite_migrations")
        conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        conn.executemany("INSERT INTO migrations VALUES (?, ?)", [("0001_initial", NOW), ("0002_held", NOW + 1)])
    store = open_store(tmp_path)  # applying 0001_initial again would fail: its tables exist
    assert store.migrations() == ["0001_initial", "0002_held", "0003_readings_by_time"]
    assert store.count() == 180
    store.close()
    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'migrations'").fetchone()[0] == 0


def test_reopen_keeps_data_and_segment_change_rebuilds_counts(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_s=300)
    assert fill(store, NOW, 900) == 2700
    store.close()
    store = open_store(tmp_path, segment_s=60)
    assert store.count() == 2700
    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 15
    store.close()


def test_segment_of_agrees_with_range_comparisons() -> None:
    rng = np.random.default_rng(3)
    for ts in rng.uniform(0, 2e9, 10000):
        for seg_s in (300.0, 7.3, 0.1):
            k = segment_of(float(ts), seg_s)
            assert k * seg_s <= ts < (k + 1) * seg_s


def test_concurrent_reader_while_writing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    errors: list[BaseException] = []
    seen: list[int] = []

    def reader() -> None:
        try:
            for _ in range(50):
                ts, _, _ = store.read()
                seen.append(len(ts))
                store.count()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(100):
        store.write([Reading(c, NOW + i, float(i)) for c in CHANNELS])
    thread.join()
    assert not errors
    assert seen == sorted(seen)  # every read saw a committed prefix, never less than before
    assert store.count() == 300
    store.close()


def sqlite_heap_bytes() -> int:
    """Heap memory SQLite holds in this process (its page caches included)."""
    import _sqlite3
    import ctypes

    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    return int(used())


def test_connections_keep_a_small_page_cache_after_reading_the_whole_store(tmp_path: Path) -> None:
    """SQLite's default page cache (2 MB per connection) stays on the heap for the connection's
    life: a daemon's writer and pooled readers grew by megabytes as the store filled."""
    store = open_store(tmp_path, budget_mb=64.0)
    fill(store, NOW - 150_000, 150_000)
    assert store.size_bytes() > 5 * 2**20
    base = sqlite_heap_bytes()
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def reader() -> None:
        try:
            start.wait(timeout=30)
            for _ in range(2):
                assert len(store.read()[0]) == 450_000
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    grown = sqlite_heap_bytes() - base
    # Four pooled readers, each holding at most its 256 KiB cache (plus page headers).
    assert grown < 2 * 2**20, f"SQLite heap grew {grown / 2**20:.1f} MB"
    store.close()


def test_retention_keeps_file_under_budget_recent_whole_and_old_as_segment_reservoir(tmp_path: Path) -> None:
    budget_mb = 1.0
    store = open_store(tmp_path, budget_mb=budget_mb, recent_hours=1.0, segment_s=60.0, reservoir_fraction=0.3)
    now = NOW + 12 * 3600
    old_start = now - 12 * 3600
    fill(store, old_start, 12 * 3600, step=2.0)  # 12 h, 64,800 readings: well over 1 MB
    assert store.size_bytes() > budget_mb * 1024 * 1024
    report = store.run_retention(now=now)
    budget = budget_mb * 1024 * 1024
    assert store.size_bytes() <= budget, report
    assert report["deleted_rows"] > 0 and report["bytes_after"] == store.size_bytes()
    assert store.count() == sql_count(store.path) == report["rows_after"]

    ts, idx, _ = store.read()
    recent_from = now - 3600
    # Recent data whole: every reading of the last hour (1800 steps x 3 channels).
    assert int(np.sum(ts >= recent_from)) == 1800 * 3
    # Old data: present, but only as whole segments (each kept segment has all its 30 x 3 readings).
    old_ts = ts[ts < recent_from]
    assert len(old_ts) > 0
    segments, counts = np.unique(np.floor(old_ts / 60.0), return_counts=True)
    assert np.all(counts == 90)
    # A uniform sample over the whole old span, not just the newest old data.
    span = recent_from - old_start
    assert segments.min() * 60 < old_start + span / 4 and segments.max() * 60 > old_start + span * 3 / 4
    # The reservoir gets at least its share of the budget (allowing for the estimate's slack).
    assert len(old_ts) >= 0.3 * 0.75 * store.count() * 0.8

    # A second run with nothing new deletes nothing and stays under budget.
    again = store.run_retention(now=now)
    assert again["deleted_rows"] == 0 and store.size_bytes() <= budget
    store.close()


def test_retention_judges_recent_by_the_newest_reading_when_the_clock_runs_ahead(tmp_path: Path) -> None:
    """A clock set a month ahead must not turn the last hour into old data and sample it away."""
    store = open_store(tmp_path, budget_mb=1.0, recent_hours=1.0, segment_s=60.0, reservoir_fraction=0.3)
    end = math.floor(time.time() / 60.0) * 60.0 - 30 * 86400  # data that stops a month before the clock
    fill(store, end - 12 * 3600, 12 * 3600, step=2.0)
    report = store.run_retention()  # now: the clock
    assert report["deleted_rows"] > 0 and store.size_bytes() <= 1024 * 1024
    ts, _, _ = store.read()
    assert int(np.sum(ts >= end - 3600)) == 1800 * 3  # the data's last hour, whole
    store.close()


@pytest.mark.parametrize("into_segment_s", [20.0, 50.0])
def test_retention_keeps_every_reading_within_recent_hours_of_the_newest_when_it_ends_mid_segment(
    tmp_path: Path, into_segment_s: float
) -> None:
    """The data's newest reading partway into a segment, the clock ahead: recent is measured from
    that reading, not from its segment's end (which would count up to a segment of the last
    hour as old)."""
    store = open_store(tmp_path, budget_mb=1.0, recent_hours=1.0, segment_s=60.0, reservoir_fraction=0.3)
    end = math.floor(time.time() / 60.0) * 60.0 - 30 * 86400 + into_segment_s
    fill(store, end - 12 * 3600, 12 * 3600, step=2.0)
    report = store.run_retention()
    assert report["deleted_rows"] > 0
    ts, _, _ = store.read()
    newest = float(ts.max())
    assert int(np.sum(ts > newest - 3600)) == 1800 * 3  # every reading within the hour before the newest
    store.close()


def test_retention_under_budget_deletes_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget_mb=64.0, recent_hours=1.0, segment_s=60.0)
    fill(store, NOW - 6 * 3600, 6 * 3600, step=10.0)
    before = store.count()
    report = store.run_retention(now=NOW)
    assert report["deleted_rows"] == 0 and store.count() == before
    store.close()


def test_retention_drops_oldest_recent_data_when_recent_alone_exceeds_budget(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget_mb=0.5, recent_hours=24.0, segment_s=60.0)
    fill(store, NOW - 6 * 3600, 6 * 3600, step=1.0)  # all recent, ~1 MB
    store.run_retention(now=NOW)
    assert store.size_bytes() <= 0.5 * 1024 * 1024
    ts, _, _ = store.read()
    # What is kept is the newest data, contiguous up to now.
    assert ts.max() == NOW - 1.0
    assert np.all(np.diff(np.unique(ts)) == 1.0)
    store.close()


def test_replay_segments_are_whole_old_spans(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_s=60.0)
    fill(store, NOW, 3600)
    rng = np.random.default_rng(5)
    before = NOW + 1800
    spans = store.replay_segments(before, rng, max_segments=8)
    assert len(spans) == 8 and spans == sorted(spans)
    assert len(set(spans)) == 8
    for start, end in spans:
        assert end - start == 60.0 and end <= before
        ts, _, _ = store.read(start, end)
        assert len(ts) == 60 * 3 and ts.min() == start and ts.max() == end - 1
    # Asking for more than exist returns each eligible segment once.
    assert len(store.replay_segments(before, rng, max_segments=1000)) == 30
    store.close()


@pytest.mark.parametrize("period_s", [1.0, 60.0, 1800.0])
def test_an_update_gets_replay_windows_at_any_period(tmp_path: Path, period_s: float) -> None:
    """Segments are sized in grid steps: at a 30-minute period a segment still holds whole windows."""
    import torch

    from edge_daemon.artifacts.base import BaseModel
    from edge_daemon.frames import NormStats
    from edge_daemon.model import Forecaster, ForecasterConfig
    from edge_daemon.training.data import prepare_update_data
    from tests.conftest import make_config

    steps, recent_steps = 3000, 400
    config = make_config(
        tmp_path,
        channels={"period_s": period_s},
        store={"recent_hours": 10 * steps * period_s / 3600},  # nothing is dropped here
        train={"recent_hours": recent_steps * period_s / 3600},
    )
    assert config.store.segment_s == config.store.segment_steps * period_s
    cfg = ForecasterConfig(n_channels=3, window=32, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    norm = NormStats(np.zeros(3), np.ones(3))
    base = BaseModel(Forecaster(cfg), cfg, norm, CHANNELS, period_s, np.ones(3, np.float32), {}, tmp_path, "0")
    start = float(int(NOW / config.store.segment_s) * config.store.segment_s)  # on a segment boundary
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        assert fill(store, start, int(steps * period_s), step=period_s) == 3 * steps
        data = prepare_update_data(store, base, config, np.random.default_rng(0))
    assert len(data.recent_train) > 0 and len(data.recent_val) > 0
    assert len(data.replay_train) > 0 and len(data.replay_val) > 0
    assert data.replay_train.shape[1:] == (cfg.window + 1, 3) and torch.isfinite(data.replay_train[:]).all()
    assert all(b <= data.recent_range[0] for _, b in data.replay_spans)


def test_an_update_after_drift_learns_from_the_data_since_the_change(tmp_path: Path) -> None:
    """Recent data starts where the drift judges dated the change (not the last recent_hours), a
    long span is thinned to a bounded number of windows, and replay comes from before it."""
    from edge_daemon.artifacts.base import BaseModel
    from edge_daemon.frames import NormStats
    from edge_daemon.model import Forecaster, ForecasterConfig
    from edge_daemon.training.data import MAX_RECENT_WINDOWS, prepare_update_data
    from tests.conftest import make_config

    steps = 3 * MAX_RECENT_WINDOWS
    config = make_config(tmp_path, store={"recent_hours": 10 * steps / 3600}, train={"recent_hours": 300 / 3600})
    cfg = ForecasterConfig(n_channels=3, window=32, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    base = BaseModel(Forecaster(cfg), cfg, NormStats(np.zeros(3), np.ones(3)), CHANNELS, 1.0, np.ones(3, np.float32), {}, tmp_path, "0")
    start = float(int(NOW / config.store.segment_s) * config.store.segment_s)
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        fill(store, start, steps)
        newest = store.time_range()[1]
        last_hours = prepare_update_data(store, base, config, np.random.default_rng(0))
        change = newest - 2 * MAX_RECENT_WINDOWS  # two windows' worth of steps per kept window
        since_change = prepare_update_data(store, base, config, np.random.default_rng(0), since=change)
    assert last_hours.recent_range == (newest - 300, newest)
    assert since_change.recent_range == (change, newest)
    recent = len(since_change.recent_train) + len(since_change.recent_val)
    assert MAX_RECENT_WINDOWS // 2 < recent <= MAX_RECENT_WINDOWS  # strided by 2, less the train/val gap
    assert len(since_change.replay_train) > 0 and all(b <= change for _, b in since_change.replay_spans)
