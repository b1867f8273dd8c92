"""A damaged replay store is a state, not a crash: the check at start (`PRAGMA quick_check`) moves
a damaged file aside for inspection, a new store starts, the alert, `status` and STATUS= say so,
and every reading acknowledged after that is stored once. Real files on a real file system,
damaged as power loss on a worn card damages them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_daemon.broker import LocalBroker
from edge_daemon.cli.render import describe_store
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.errors import StoreError
from edge_daemon.store import CORRUPT_KEEP, Reading, ReplayStore, check_store, damaged_stores
from tests.conftest import CHANNELS, make_config, start_daemon
from tests.support import AlertSubscriber, publish_motor, wait_for
from tests.test_metrics import scrape, value

HANG_S = 120.0  # bounds a hang only
READINGS = 6_000


def filled_store(tmp_path: Path) -> Path:
    """A store of READINGS readings, closed cleanly; its path."""
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        store.write([Reading(CHANNELS[k % 3], 1.7e9 + k // 3, float(k)) for k in range(READINGS)])
        assert store.count() == READINGS
    return config.store_path


def overwrite(path: Path, offset: int, size: int, seed: int = 0) -> None:
    """`size` bytes of garbage at `offset`, written through to the disk."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size) if seed == 0 else bytes((seed * 31 + i * 7) % 256 for i in range(size)))
        f.flush()
        os.fsync(f.fileno())


def test_an_intact_store_passes_and_a_damaged_one_is_moved_aside_for_a_new_one(tmp_path: Path) -> None:
    path = filled_store(tmp_path)
    check = check_store(path)
    assert check.problem is None and check.moved_to is None and check.seconds > 0
    overwrite(path, path.stat().st_size // 2, 64 * 1024)  # 64 KiB in the middle
    with pytest.raises(StoreError):  # what opening it anyway would have met on the first write
        with ReplayStore(path, make_config(tmp_path).store, CHANNELS) as store:
            store.write([Reading(CHANNELS[0], 1.8e9 + k, 1.0) for k in range(READINGS)])
            store.read(None, None)
    check = check_store(path)
    assert check.problem and check.moved_to is not None, check
    assert check.moved_to.is_file() and check.moved_to.name.startswith("store.db.corrupt-") and not path.exists()
    with ReplayStore(path, make_config(tmp_path).store, CHANNELS) as store:
        assert store.count() == 0
        assert store.write([Reading(CHANNELS[0], 1.8e9, 1.0)]) == 1 and store.count() == 1
    assert check_store(path).problem is None


def test_a_file_that_is_not_a_database_is_moved_aside_and_no_wal_is_left_for_the_new_store(tmp_path: Path) -> None:
    path = filled_store(tmp_path)
    overwrite(path, 0, 100)  # the header: SQLite no longer calls it a database
    Path(f"{path}-wal").write_bytes(b"\0" * 32)
    check = check_store(path)
    assert check.problem and "not a database" in check.problem, check
    # The old WAL would be replayed into the new store: it goes with the damaged file.
    assert check.moved_to is not None and check.moved_to.is_file() and not Path(f"{path}-wal").exists()


def test_only_the_newest_damaged_stores_are_kept(tmp_path: Path) -> None:
    moved = []
    for k in range(CORRUPT_KEEP + 2):
        path = filled_store(tmp_path)
        overwrite(path, 0, 100, seed=k + 1)
        check = check_store(path)
        assert check.moved_to is not None
        moved.append(check.moved_to)
    assert len(set(moved)) == len(moved)  # damaged again within the second: a name of its own
    assert damaged_stores(path) == moved[-CORRUPT_KEEP:], moved


def test_a_locked_store_is_not_called_damaged(tmp_path: Path) -> None:
    """Only SQLite's "corrupt" and "not a database" move a store aside: a store another process
    holds locked, or cannot be read, is the caller's error, and nothing moves."""
    path = filled_store(tmp_path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads it anyway: lock the directory instead
            path.chmod(0o600)
            import sqlite3

            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("PRAGMA locking_mode = EXCLUSIVE")
            holder.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(StoreError):
                    check_store(path, busy_timeout_s=0.2)
            finally:
                holder.execute("ROLLBACK")
                holder.close()
        else:
            with pytest.raises(StoreError):
                check_store(path)
    finally:
        path.chmod(0o600)
    assert path.is_file() and not list(path.parent.glob("store.db.corrupt-*"))


def test_the_daemon_starts_on_a_damaged_store_says_so_and_stores_every_reading_after_it(tmp_path: Path, broker: LocalBroker) -> None:
    config = make_config(tmp_path, port=broker.port, metrics={"listen": "127.0.0.1:0"})
    path = filled_store(tmp_path)
    assert path == config.store_path
    overwrite(path, path.stat().st_size // 2, 64 * 1024)
    alerts = AlertSubscriber(broker.port)
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        alert = wait_for(lambda: alerts.of("store_damaged"), HANG_S, "the store_damaged alert")
        moved = Path(alert["moved_to"])
        assert moved.is_file() and moved.parent == path.parent and alert["problem"] and "moved aside" in alert["message"]
        status = request(config.device.socket, {"cmd": "status"})
        assert status["store"]["check"]["moved_to"] == str(moved) and status["store"]["check"]["problem"] == alert["problem"]
        assert "store was damaged" in daemon.status_line()
        assert f"moved aside to {moved}" in describe_store(status["store"])  # what `edge-daemon status` prints
        assert value(scrape(daemon), "edge_daemon_store_damaged_at_start") == 1
        steps = 2_000
        publish_motor(broker.port, float(int(time.time()) - steps - 60), steps)
        assert daemon.store is not None
        wait_for(lambda: daemon.store.count() >= 3 * steps, HANG_S, "every reading stored", detail=lambda: daemon.store.count())
        ts, _idx, _values = daemon.store.read(None, None)
        assert len(ts) == 3 * steps and daemon.store.count() == 3 * steps  # once each
        assert all(part.alive for part in daemon.parts.values()), [name for name, p in daemon.parts.items() if not p.alive]
    finally:
        daemon.stop()
        alerts.close()
    assert [a["type"] for a in alerts.received].count("store_damaged") == 1
    # Started again on the new store: intact, nothing moved, no alert.
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        status = request(config.device.socket, {"cmd": "status"})
        assert status["store"]["check"]["problem"] is None and status["store"]["readings"] == 3 * steps
    finally:
        daemon.stop()
