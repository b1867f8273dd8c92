"""A damaged replay store is a state, not a crash: the check at start (`PRAGMA quick_check`) moves
a damaged file aside for inspection, a new store starts, the alert, `status` and STATUS= say so,
and every reading acknowledged after that is stored once. Real files on a real file system,
damaged as power loss on a worn card damages them."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_daemon.broker import LocalBroker
from edge_daemon.cli.render import describe_store
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.errors import StoreError, StoreReplacedError
from edge_daemon.store import CORRUPT_KEEP, Reading, ReplayStore, check_store, damaged_stores
from tests.cgroups import MemoryCgroup
from tests.conftest import CHANNELS, make_config, start_daemon
from tests.support import AlertSubscriber, publish_motor, wait_for
from tests.test_metrics import scrape, value
from tests.test_watchdog import memory_cgroup  # noqa: F401 - the fixture

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
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.DatabaseError, match="malformed"):
        conn.execute("SELECT COUNT(*), SUM(value) FROM samples").fetchone()  # what reading it anyway meets
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
        assert value(scrape(daemon), "edge_daemon_store_damaged_total") == 1
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


# ------------------------------------------------------------------ damage met while running


def damage_under(store: ReplayStore, offset_of: Callable[[int], int], size: int) -> None:
    """Garbage at `offset_of(file size)` of the running store's file, as a worn card leaves it:
    another connection first commits (so the store's connections drop their page caches, as
    they do after any other writer) and checkpoints the WAL into the file, so reads of the
    damaged pages go to the file (again until no reader of the daemon holds an older snapshot)."""
    other = sqlite3.connect(store.path, isolation_level=None, timeout=30)
    try:
        other.execute("UPDATE meta SET value = value WHERE key = 'segment_s'")
        wait_for(lambda: other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, HANG_S, "a whole checkpoint")
    finally:
        other.close()
    overwrite(store.path, offset_of(store.path.stat().st_size), size)


def batch(start: float, n: int) -> list[Reading]:
    return [Reading(CHANNELS[k % 3], start + k // 3, float(k)) for k in range(n)]


def test_damage_a_read_meets_while_running_replaces_the_store_once_and_it_carries_on(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS, recovers=True) as store:
        replaced: list = []
        store.on_replaced.append(replaced.append)
        store.write(batch(1.7e9, READINGS))
        assert store.count() == READINGS  # a pooled reader, with pages of the old file cached
        damage_under(store, lambda size: size // 2, 64 * 1024)
        with pytest.raises(StoreReplacedError):
            store.read(None, None)
        assert [c.moved_to for c in replaced] == [c.moved_to for c in store.replaced] and len(replaced) == 1
        check = replaced[0]
        assert check.moved_to is not None and check.moved_to.is_file() and check.problem and "malformed" in check.cause
        assert store.last_check == check
        # A thread that met the same damage on the old file afterwards replaces nothing more.
        assert store.recover("database disk image is malformed", generation=0) == check and len(store.replaced) == 1
        assert store.count() == 0 and store.time_range() is None
        assert store.write(batch(1.8e9, 600)) == 600 and store.count() == 600
        assert len(store.read(None, None)[0]) == 600
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        assert store.count() == 600 and check_store(config.store_path).problem is None


def test_damage_a_write_meets_replaces_the_store_and_the_batch_can_go_to_the_new_one(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS, recovers=True) as store:
        store.write(batch(1.7e9, READINGS))
        damage_under(store, lambda size: size - 16 * 1024, 16 * 1024)  # the newest pages, where a commit appends
        new = batch(1.8e9, 600)
        with pytest.raises(StoreReplacedError):
            store.write(new)
        assert len(store.replaced) == 1 and store.count() == 0
        assert store.write(new) == 600 and store.write(new) == 0  # once
        assert store.count() == 600


def test_a_store_that_does_not_recover_leaves_a_damaged_file_where_it_is(tmp_path: Path) -> None:
    """Another process's store (a training worker's, the report's) meets the damage: it raises,
    and the file stays for the daemon's store to replace (moving it from under the daemon would
    send the daemon's acknowledged readings to the file moved aside)."""
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS, recovers=True) as daemon_store:
        daemon_store.write(batch(1.7e9, READINGS))
        damage_under(daemon_store, lambda size: size // 2, 64 * 1024)
        with ReplayStore(config.store_path, config.store, CHANNELS) as other:
            with pytest.raises(StoreError) as raised:
                other.read(None, None)
            assert not isinstance(raised.value, StoreReplacedError)
            with pytest.raises(StoreError, match="damaged"):
                other.check_now()
        assert config.store_path.is_file() and not damaged_stores(config.store_path) and not daemon_store.replaced
        with pytest.raises(StoreReplacedError):  # the daemon's own store does replace it
            daemon_store.read(None, None)
        assert len(damaged_stores(config.store_path)) == 1


def test_readers_during_a_replacement_read_the_new_store(tmp_path: Path) -> None:
    """Threads reading while the store is replaced (the status, scoring, the control socket): a
    connection opened then must not stay pooled on the file moved aside."""
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS, recovers=True) as store:
        store.write(batch(1.7e9, READINGS))
        stop = threading.Event()
        errors: list[BaseException] = []

        def read() -> None:
            while not stop.is_set():
                try:
                    store.count()
                except StoreError:
                    pass  # the reader that met the damage, or one during the replacement
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        readers = [threading.Thread(target=read) for _ in range(4)]
        for thread in readers:
            thread.start()
        try:
            # A few replacements: a reader that opens during one is a race each time.
            for rounds in range(1, 6):
                damage_under(store, lambda size: size // 2, 64 * 1024)
                with pytest.raises(StoreReplacedError):
                    store.read(None, None)
                assert store.write(batch(1.8e9, 600)) == 600
                # Every pooled reader is on the new file (one left on the old would count more).
                assert [store.count() for _ in range(8)] == [600] * 8, rounds
                store.write(batch(1.9e9, READINGS))  # enough for the next round's damage
        finally:
            stop.set()
            for thread in readers:
                thread.join(HANG_S)
        assert not errors, errors
        assert len(store.replaced) == rounds


def test_the_scheduled_check_finds_damage_no_read_has_met_and_passes_an_intact_store(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS, recovers=True) as store:
        store.write(batch(1.7e9, READINGS))
        check = store.check_now()
        assert (check.problem, check.moved_to, check.cause) == (None, None, "scheduled") and check.seconds > 0
        assert store.last_check == check and not store.replaced
        damage_under(store, lambda size: size // 2, 64 * 1024)
        check = store.check_now()
        assert check.problem and check.moved_to is not None and check.moved_to.is_file() and check.cause == "scheduled"
        assert store.replaced == [check] and store.count() == 0
        assert store.write(batch(1.8e9, 600)) == 600


def test_an_error_after_which_the_store_passes_its_check_keeps_the_store(tmp_path: Path) -> None:
    """An I/O error a card gave once: the store is checked, found intact, and kept as it is."""
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS, recovers=True) as store:
        store.write(batch(1.7e9, READINGS))
        count = store.count()  # a pooled reader, closed by the check
        check = store.recover("disk I/O error")
        assert (check.problem, check.moved_to, check.cause) == (None, None, "disk I/O error")
        assert not store.replaced and store.count() == count == READINGS
        assert store.write(batch(1.8e9, 600)) == 600 and store.count() == READINGS + 600
    assert not list(config.store_path.parent.glob("store.db.corrupt-*"))


def test_a_running_daemon_whose_store_a_commit_finds_damaged_replaces_it_and_stores_every_reading_after(
    tmp_path: Path, broker: LocalBroker
) -> None:
    """The writer's commit meets the damage: the store is replaced while the daemon runs (no
    restart), the batch goes to the new store before it is acknowledged, and every reading sent
    after the damage is stored once; the alert, `status`, STATUS= and /metrics say so."""
    config = make_config(tmp_path, port=broker.port, metrics={"listen": "127.0.0.1:0"}, store={"check_interval_s": 0})
    alerts = AlertSubscriber(broker.port)
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        store = daemon.store
        assert store is not None
        before = READINGS // 3
        publish_motor(broker.port, float(int(time.time()) - 2 * before - 600), before)
        wait_for(lambda: store.count() >= READINGS, HANG_S, "the first readings stored", detail=lambda: store.count())
        damage_under(store, lambda size: size - 16 * 1024, 16 * 1024)
        steps = 2_000
        publish_motor(broker.port, float(int(time.time()) - steps - 60), steps)
        alert = wait_for(lambda: alerts.of("store_damaged"), HANG_S, "the store_damaged alert")
        moved = Path(alert["moved_to"])
        assert moved.is_file() and "malformed" in alert["problem"]
        wait_for(lambda: store.count() >= 3 * steps, HANG_S, "every reading after the damage stored", detail=lambda: store.count())
        ts, _idx, _values = store.read(None, None)
        assert len(ts) == 3 * steps == store.count()  # once each, none of the damaged store's
        status = request(config.device.socket, {"cmd": "status"})
        assert status["store"]["check"]["moved_to"] == str(moved) and "malformed" in status["store"]["check"]["cause"]
        assert status["store"]["damaged"] == 1 and status["ingest"]["stored"] == READINGS + 3 * steps
        assert "store was damaged" in daemon.status_line()
        assert "damaged after database disk image is malformed" in describe_store(status["store"])
        assert value(scrape(daemon), "edge_daemon_store_damaged_total") == 1
        assert all(part.alive for part in daemon.parts.values()), [name for name, p in daemon.parts.items() if not p.alive]
    finally:
        daemon.stop()
        alerts.close()
    assert [a["type"] for a in alerts.received].count("store_damaged") == 1


def test_a_wal_cut_short_mid_write_loses_only_its_unfinished_commit_and_the_daemon_stores_every_reading_after(
    tmp_path: Path, broker: LocalBroker
) -> None:
    """Power lost while the card wrote the WAL: the file ends partway through a frame. SQLite
    keeps every commit before it and drops the unfinished one; the store passes its check and
    the daemon carries on from there."""
    import shutil

    source = make_config(tmp_path / "before")
    with ReplayStore(source.store_path, source.store, CHANNELS) as store:
        for b in range(5):
            store.write(batch(1.7e9 + 1000 * b, 3000))
        # The files as a power cut leaves them: the WAL not yet checkpointed into store.db.
        config = make_config(tmp_path, port=broker.port)
        config.store_path.parent.mkdir(parents=True)
        for suffix in ("", "-wal"):
            shutil.copy(f"{source.store_path}{suffix}", f"{config.store_path}{suffix}")
    wal = Path(f"{config.store_path}-wal")
    os.truncate(wal, wal.stat().st_size - 700)  # into the last commit's last frame
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        status = request(config.device.socket, {"cmd": "status"})
        assert status["store"]["check"]["problem"] is None and status["store"]["damaged"] == 0
        assert status["store"]["readings"] == 4 * 3000  # every commit before the cut
        steps = 2_000
        publish_motor(broker.port, float(int(time.time()) - steps - 60), steps)
        assert daemon.store is not None
        wait_for(lambda: daemon.store.count() >= 4 * 3000 + 3 * steps, HANG_S, "every reading stored", detail=lambda: daemon.store.count())
        assert len(daemon.store.read(None, None)[0]) == daemon.store.count() == 4 * 3000 + 3 * steps
        assert all(part.alive for part in daemon.parts.values())
    finally:
        daemon.stop()
    assert not list(config.store_path.parent.glob("store.db.corrupt-*"))


CHECK_IN_CHILD = r"""
import sys
from pathlib import Path
from edge_daemon.store import check_store
print(check_store(Path(sys.argv[1])).problem, flush=True)
"""


def test_the_check_leaves_no_page_cache_of_the_store_charged_to_the_service(tmp_path: Path, memory_cgroup: MemoryCgroup) -> None:
    """A check reads the whole store; its pages must not stay charged to the daemon's cgroup,
    where a second read would make them active and the memory watchdog count the store's size."""
    config = make_config(tmp_path)
    with ReplayStore(config.store_path, config.store, CHANNELS) as store:
        for b in range(8):
            store.write(batch(1.7e9 + 20_000 * b, 60_000))
    size_mb = config.store_path.stat().st_size / 2**20
    assert size_mb > 4
    fd = os.open(config.store_path, os.O_RDONLY)
    try:  # cold, as after a boot: the child's reads are charged to its cgroup
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    before = memory_cgroup.cache_mb()
    child = subprocess.run(
        [sys.executable, "-c", CHECK_IN_CHILD, str(config.store_path)], preexec_fn=memory_cgroup.enter_fn(),
        capture_output=True, text=True, timeout=HANG_S, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert child.returncode == 0 and child.stdout.strip() == "None", child.stderr
    # Python, torch-free imports and SQLite's own pages stay; not the store the check read.
    assert memory_cgroup.cache_mb() - before < size_mb / 4, (memory_cgroup.cache_mb(), before, size_mb)
