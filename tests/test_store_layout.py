"""The store's time-first layout: what a commit writes, microsecond timestamps, the channel id
limit, and the move of a store written with the (channel, ts) key (resumable when killed)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.config import StoreConfig
from edge_daemon.errors import StoreError
from edge_daemon.store import Reading, ReplayStore, stored_ts
from edge_daemon.store_schema import CHANNEL_MASK, LEGACY_READINGS, MIGRATIONS
from edge_daemon.broker import LocalBroker
from tests.support import legacy_store
from tests.test_notify import NotifyListener, listener  # noqa: F401 - the fixture

NOW = 1_800_000_000.0
CHANNELS = [f"m{k}/current" for k in range(10)]


def open_store(path: Path, channels: list[str] = CHANNELS, **cfg: object) -> ReplayStore:
    return ReplayStore(path, StoreConfig(**cfg), channels, seed=5)


def wal_frames(path: Path) -> int:
    """Frames in the WAL since it was last reset (a passive checkpoint reports them)."""
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


def test_a_commit_writes_the_pages_its_rows_fill_whatever_the_channel_count(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = open_store(path)
    page_size = int(store._conn.execute("PRAGMA page_size").fetchone()[0])  # noqa: SLF001 - the file's own property
    assert page_size == 1024
    t = NOW
    for _ in range(20):  # a day's worth of tree above the newest leaf
        store.write([Reading(CHANNELS[i % 10], t + i // 10, float(i)) for i in range(5000)])
        t += 500
    with sqlite3.connect(path) as conn:  # the WAL starts again from its first frame
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    commits = 30
    for _ in range(commits):
        # 10 s of 10 channels at 1 reading/s: 100 rows of ~24 bytes, 2.3 pages of data.
        store.write([Reading(CHANNELS[i % 10], t + i // 10, float(i)) for i in range(100)])
        t += 10
    per_commit = wal_frames(path) / commits  # fewer than SQLite's checkpoint threshold: none ran
    # The rows' own pages, the leaf left partly filled, the tree above it, the page with the
    # segment counts, the pointer map and the file header (7.1 measured). Keyed by (channel, ts)
    # it was a leaf per channel and the index's half-full splits: 47.5 frames on the same rows.
    assert per_commit <= 9.0, per_commit
    store.close()


def test_timestamps_are_kept_to_the_microsecond_and_one_per_channel_and_microsecond(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.db")
    written = store.write(
        [
            Reading(CHANNELS[0], NOW + 0.1234567, 1.0),
            Reading(CHANNELS[0], NOW + 0.12345674, 2.0),  # the same microsecond: stored once
            Reading(CHANNELS[1], NOW + 0.1234567, 3.0),
            Reading(CHANNELS[0], NOW + 0.001, 4.0),
        ]
    )
    assert written == 3 and store.count() == 3
    ts, idx, values = store.read()
    assert ts.tolist() == [stored_ts(NOW + 0.001), stored_ts(NOW + 0.1234567), stored_ts(NOW + 0.1234567)]
    assert ts[1] == NOW + 0.123457 and ts[0] == NOW + 0.001  # millisecond stamps come back as they were
    assert idx.tolist() == [0, 0, 1] and values.tolist() == [4.0, 1.0, 3.0]
    # Bounds are on the stored timestamps: since is inclusive, until exclusive.
    assert store.read(NOW + 0.001, NOW + 0.123457)[2].tolist() == [4.0]
    assert store.time_range() == (stored_ts(NOW + 0.001), stored_ts(NOW + 0.1234567))
    with sqlite3.connect(tmp_path / "store.db") as conn:  # the readings view for people and tools
        rows = conn.execute("SELECT c.name, r.ts, r.value FROM readings r JOIN channels c ON c.id = r.channel_id").fetchall()
    assert sorted(rows) == sorted([(CHANNELS[0], NOW + 0.001, 4.0), (CHANNELS[0], NOW + 0.123457, 1.0), (CHANNELS[1], NOW + 0.123457, 3.0)])
    store.close()


def test_a_store_holds_at_most_the_channel_ids_its_key_has_room_for(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store.db")
    names = [f"s/c{k}" for k in range(CHANNEL_MASK)]
    assert store.write([Reading(name, NOW, 1.0) for name in names]) == CHANNEL_MASK
    with pytest.raises(StoreError, match="at most 1023 channels"):
        store.write([Reading("s/one-too-many", NOW + 1, 1.0), Reading(names[0], NOW + 1, 2.0)])
    # The failed batch left nothing behind; the known channels are written as before.
    assert store.count() == CHANNEL_MASK
    assert store.write([Reading(names[5], NOW + 2, 3.0)]) == 1
    store.close()


def legacy_readings(hours: float, channels: list[str]) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    steps = int(hours * 3600)
    return [(name, round(NOW + i + 0.001 * c, 3), float(rng.normal())) for i in range(steps) for c, name in enumerate(channels)]


def test_a_store_keyed_by_channel_is_moved_to_the_time_key_keeping_every_reading_and_segment(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    channels = CHANNELS[:3]
    rows = legacy_readings(2.0, channels) + [("other/unconfigured", NOW + 5.5, 9.0)]
    legacy_store(path, rows)
    with sqlite3.connect(path) as conn:
        segments_before = sorted(conn.execute("SELECT id, priority, rows FROM segments").fetchall())
        pages_before = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    store = open_store(path, channels)
    assert store.migrations() == [name for name, _ in MIGRATIONS]
    assert store.count() == len(rows)
    ts, idx, values = store.read()
    mine = sorted((ts_, channels.index(c), v) for c, ts_, v in rows if c in channels)
    assert list(zip(ts.tolist(), idx.tolist(), values.tolist())) == mine
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = ?", (LEGACY_READINGS,)).fetchone()[0] == 0
        # The reservoir's sample is the one it was: every segment keeps its priority and count.
        assert sorted(conn.execute("SELECT id, priority, rows FROM segments").fetchall()) == segments_before
        # Moved oldest first, the rows fill the new table's pages whole: the file does not grow.
        pages_after = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        assert pages_after < pages_before, (pages_after, pages_before)


MOVE_AND_DIE = r"""
import logging, os, signal, sys
from pathlib import Path
import edge_daemon.store as store_module
from edge_daemon.config import StoreConfig

store_module.LEGACY_CHUNK = int(sys.argv[2])

class DieAfterTwoChunks(logging.Handler):
    def emit(self, record):
        if "moved" in record.getMessage() and "readings to the time-keyed table" in record.getMessage():
            self.count = getattr(self, "count", 0) + 1
            if self.count == 2:
                os.kill(os.getpid(), signal.SIGKILL)

logging.getLogger("edge_daemon.store").addHandler(DieAfterTwoChunks())
logging.getLogger("edge_daemon.store").setLevel(logging.INFO)
store_module.ReplayStore(Path(sys.argv[1]), StoreConfig(), ["m0/current", "m1/current", "m2/current"])
"""


def test_a_move_killed_midway_resumes_at_the_next_open_and_stores_every_reading_once(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    channels = CHANNELS[:3]
    rows = legacy_readings(1.0, channels)
    legacy_store(path, rows)
    died = subprocess.run([sys.executable, "-c", MOVE_AND_DIE, str(path), "2000"], capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL, died.stderr
    with sqlite3.connect(path) as conn:  # killed between two windows: the oldest moved, the rest waiting
        left = conn.execute(f"SELECT channel_id, ts, value FROM {LEGACY_READINGS}").fetchall()
        moved = conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    assert 3000 < moved < 5000 and moved + len(left) == len(rows)
    assert min(ts for _, ts, _ in left) > max(ts for _, ts, _ in sorted(rows, key=lambda r: r[1])[:moved])
    store = open_store(path, channels)
    assert store.count() == len(rows)
    ts, idx, values = store.read()
    assert list(zip(ts.tolist(), idx.tolist(), values.tolist())) == sorted((t, channels.index(c), v) for c, t, v in rows)
    store.close()


def test_the_service_manager_is_told_of_the_store_check_and_each_window_of_a_move_before_ready(
    tmp_path: Path, broker: LocalBroker, listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a large older store outlasts TimeoutStartSec on a slow card unless systemd hears
    of it: STATUS= says what is done, and each step extends the start timeout."""
    import edge_daemon.store as store_module
    from edge_daemon.daemon import Daemon
    from tests.conftest import CHANNELS as MOTOR, make_config, start_daemon

    monkeypatch.setattr(store_module, "LEGACY_CHUNK", 5_000)
    config = make_config(tmp_path, port=broker.port)
    config.store_path.parent.mkdir(parents=True)
    rows = legacy_readings(2.0, MOTOR)  # 21,600 readings: five windows
    legacy_store(config.store_path, rows)
    daemon = Daemon(config)
    # Started in a thread while this one reads the notifications, as systemd does: a datagram
    # socket nobody reads fills up and blocks the sender.
    starting = threading.Thread(target=start_daemon, args=(daemon,))
    starting.start()
    try:
        before = []  # what systemd hears while the daemon starts (READY=1 comes after, from `run`)
        while starting.is_alive():
            before += listener.pending()
            starting.join(0.05)
        before += listener.pending()
        assert before[0].startswith("STATUS=checking the replay store (") and before[1].startswith("EXTEND_TIMEOUT_USEC=")
        moves = [k for k, m in enumerate(before) if m.startswith("STATUS=moving stored readings to the time-keyed table: ")]
        assert len(moves) >= 4 and before[moves[-1]].endswith(f"of about {len(rows):,}"), before
        assert all(before[k + 1] == "EXTEND_TIMEOUT_USEC=120000000" for k in moves)
        assert daemon.store is not None and daemon.store.count() == len(rows)
    finally:
        daemon.stop()
