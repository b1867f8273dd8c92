"""A full disk is a state, not a crash: ingestion waits unacknowledged, the daemon stays up and
answers, and every reading is stored once when space returns. The state directory lies on a
real tmpfs of 2 MB, grown to 64 MB to end the fault."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_daemon.adaptation.trigger import TriggerInputs, UpdateTrigger
from edge_daemon.broker import LocalBroker
from edge_daemon.config import TrainConfig
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.errors import DiskFullError
from edge_daemon.memory.pressure import Level
from edge_daemon.store import Reading, ReplayStore
from tests.conftest import CHANNELS, make_config, start_daemon
from tests.support import publish_motor, wait_for

STEPS = 50_000  # 150,000 readings (~24 bytes each): about twice what 2 MB holds with the WAL
HANG_S = 180.0  # bounds a hang only


class Tmpfs:
    """A tmpfs mounted for one test, resizable while mounted."""

    def __init__(self, path: Path, size_mb: float) -> None:
        self.path = path
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")

    def resize(self, size_mb: float) -> None:
        subprocess.run(["mount", "-o", f"remount,size={int(size_mb * 1024)}k", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Tmpfs]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs = Tmpfs(tmp_path / "fs", 2)
    try:
        yield fs
    finally:
        fs.unmount()


def test_the_store_says_a_full_disk_is_full(small_fs: Tmpfs, tmp_path: Path) -> None:
    config = make_config(tmp_path, device={"state_dir": str(small_fs.path / "state")}, store={"disk_reserve_mb": 0.25})
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        with pytest.raises(DiskFullError):
            for k in range(STEPS):
                store.write([Reading(CHANNELS[0], 1e9 + 500 * k + i, float(i)) for i in range(500)])
        assert store.disk_short() and store.disk_budget_bytes() < store.size_bytes()
        stored = store.count()
        small_fs.resize(64)
        assert store.write([Reading(CHANNELS[0], 2e9, 1.0)]) == 1 and store.count() == stored + 1
        assert not store.disk_short()


def test_a_write_that_finds_no_room_says_so_every_time(tmp_path: Path) -> None:
    """SQLite rolls a transaction back itself when the file cannot grow mid-statement: the store
    must still report a full disk (not a failed ROLLBACK), and the next write must not find a
    transaction left open."""
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        store.write([Reading(CHANNELS[0], 1e9, 1.0)])
        pages = int(store._conn.execute("PRAGMA page_count").fetchone()[0])
        store._conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # the file may hardly grow
        batch = [Reading(CHANNELS[k % 3], 1e9 + 1 + k, float(k)) for k in range(20_000)]
        for _ in range(3):
            with pytest.raises(DiskFullError):
                store.write(batch)
        assert store.count() == 1
        store._conn.execute("PRAGMA max_page_count = 1073741823")
        assert store.write(batch) == len(batch)


def test_retention_on_a_short_disk_keeps_recent_data_and_does_not_rewrite_the_file(tmp_path: Path) -> None:
    """A disk with less room than the reserve caps the budget below what recent data needs: the
    recent readings stay (ingestion waits instead), and no VACUUM rewrites the whole file at
    every run to no avail (SD wear)."""
    config = make_config(tmp_path, store={"disk_reserve_mb": 10**7})  # more than any disk has
    now = time.time()
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        store.write([Reading(CHANNELS[k % 3], now - 3600 + k / 3, float(k)) for k in range(30_000)])
        assert store.disk_short() and store.disk_budget_bytes() < 0
        for _ in range(2):
            report = store.run_retention(now)
            assert report["vacuumed"] is False and report["deleted_rows"] == 0, report
        assert store.count() == 30_000


def test_updates_wait_while_disk_space_is_short() -> None:
    trigger = UpdateTrigger(TrainConfig())
    assert trigger.request()
    inputs = dict(idle=True, memory_level=Level.NORMAL, backlog=0, drift_detected=True, new_windows=0, has_base=True)
    assert trigger.decide(TriggerInputs(**inputs, disk_short=True)).reason == "disk space short"
    assert trigger.decide(TriggerInputs(**inputs)).start


def test_a_full_disk_pauses_ingestion_until_there_is_room_and_loses_nothing(tmp_path: Path, broker: LocalBroker, small_fs: Tmpfs) -> None:
    config = make_config(
        tmp_path, port=broker.port, device={"state_dir": str(small_fs.path / "state")}, store={"disk_reserve_mb": 0.25},
    )  # fmt: skip
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        start_ts = float(int(time.time()) - STEPS - 60)
        publish_motor(broker.port, start_ts, STEPS, "disk-full-publisher")
        # The disk fills: the daemon says so everywhere and keeps answering.
        status = wait_for(
            lambda: (s := request(config.device.socket, {"cmd": "status"}))["store"]["disk_full"] and s, HANG_S, "disk full in status",
        )  # fmt: skip
        assert status["ingest"]["disk_full"] is True and status["store"]["readings"] < 3 * STEPS
        assert "disk full" in daemon.status_line()
        assert daemon.ingestor is not None and all(part.alive for part in daemon.parts.values()), [name for name, p in daemon.parts.items() if not p.alive]
        # The disk grows: ingestion resumes by itself and stores every reading once.
        small_fs.resize(64)
        assert daemon.store is not None
        wait_for(lambda: daemon.store.count() >= 3 * STEPS, HANG_S, "every reading stored", detail=lambda: daemon.store.count())
        ts, idx, _values = daemon.store.read(None, None)
        assert len(ts) == 3 * STEPS and daemon.store.count() == 3 * STEPS
        for channel in range(3):
            assert sorted(ts[idx == channel]) == [start_ts + k for k in range(STEPS)]
        after = request(config.device.socket, {"cmd": "status"})
        assert after["store"]["disk_full"] is False and after["ingest"]["dropped_disk_full"] == 0
        assert all(part.alive for part in daemon.parts.values())
    finally:
        daemon.stop()
