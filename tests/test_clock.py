"""A wrong device clock loses nothing: the hold in the store, the clock watch, and the Ingestor
holding readings against a real broker and store while its clock is off, then releasing them."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from edge_daemon.broker import LocalBroker
from edge_daemon.clock import ClockWatch, kernel_synchronized
from edge_daemon.config import StoreConfig
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.mqtt.payload import HOLD_FLOOR_TS, PayloadLimits, parse_payload
from edge_daemon.store import MIGRATIONS, Reading, ReplayStore
from conftest import CHANNELS
from test_ingest import HANG_S, config_for, publisher, wait_for
from tests.support import legacy_store

NOW = 1_800_000_000.0
LIMITS = PayloadLimits(max_payload_bytes=1024, max_age_s=7 * 86400, max_skew_s=300)
DAY = 86400.0


def open_store(tmp_path: Path) -> ReplayStore:
    return ReplayStore(tmp_path / "store.db", StoreConfig(), CHANNELS, seed=3)


def stored(path: Path) -> list[tuple[str, float, float]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT c.name, r.ts, r.value FROM readings r JOIN channels c ON c.id = r.channel_id ORDER BY r.ts, c.name"
        ).fetchall()
    return [(name, float(ts), float(value)) for name, ts, value in rows]


# -- parsing ------------------------------------------------------------------------------------


def test_out_of_window_readings_go_to_the_hold_list_only_when_given_one() -> None:
    future = json.dumps({"ts": NOW + DAY, "values": {"temperature": 1.0, "nope": 2.0}}).encode()
    with pytest.raises(PayloadError, match="future"):
        parse_payload("sensors/m1", future, NOW, set(CHANNELS), LIMITS)
    held: list[Reading] = []
    skipped: list[PayloadError] = []
    assert parse_payload("sensors/m1", future, NOW, set(CHANNELS), LIMITS, skipped, held) == []
    assert held == [Reading("m1/temperature", NOW + DAY, 1.0)]
    assert [e.reason for e in skipped] == ["unknown_channel"]
    old = json.dumps({"ts": NOW - 30 * DAY, "value": 2.5}).encode()
    assert parse_payload("sensors/m1/current", old, NOW, set(CHANNELS), LIMITS, None, held) == []
    assert held[-1] == Reading("m1/current", NOW - 30 * DAY, 2.5)
    # A dead RTC's 1970 is never a clock that will be corrected: rejected at once.
    dead = json.dumps({"ts": 12.0, "value": 2.5}).encode()
    with pytest.raises(PayloadError, match="too_old"):
        parse_payload("sensors/m1/current", dead, NOW, set(CHANNELS), LIMITS, None, held)
    # Bad values are bad whatever the clock: not held.
    bad = json.dumps({"ts": NOW + DAY, "value": "x"}).encode()
    with pytest.raises(PayloadError, match="not_a_number"):
        parse_payload("sensors/m1/current", bad, NOW, set(CHANNELS), LIMITS, None, held)
    assert len(held) == 2
    # In the window, the hold list is not touched.
    fine = json.dumps({"ts": NOW, "value": 1.0}).encode()
    assert parse_payload("sensors/m1/current", fine, NOW, set(CHANNELS), LIMITS, None, held) == [Reading("m1/current", NOW, 1.0)]
    assert len(held) == 2


def test_a_timestamp_no_clock_error_explains_is_rejected_at_once_never_held() -> None:
    """Past 2100, or more than a year ahead of the device clock: `future` at once, even with a hold list."""
    held: list[Reading] = []
    for ts in (NOW + 366 * DAY, 4_102_444_800.5, 1e11, 1e20):
        for topic, doc in (("sensors/m1/current", {"ts": ts, "value": 1.0}), ("sensors/m1", {"ts": ts, "values": {"current": 1.0}})):
            with pytest.raises(PayloadError, match="future") as raised:
                parse_payload(topic, json.dumps(doc).encode(), NOW, set(CHANNELS), LIMITS, None, held)
            assert raised.value.reason == "future"
    assert held == []
    # A day, or up to a year, ahead is still a clock that may be wrong: held.
    for ts in (NOW + DAY, NOW + 364 * DAY):
        assert parse_payload("sensors/m1/current", json.dumps({"ts": ts, "value": 1.0}).encode(), NOW, set(CHANNELS), LIMITS, None, held) == []
    assert [r.ts for r in held] == [NOW + DAY, NOW + 364 * DAY]
    # A device clock before any working clock (a dead RTC) measures nothing: only the 2100 limit applies.
    dead_clock = HOLD_FLOOR_TS - 1000 * DAY
    assert parse_payload("sensors/m1/current", json.dumps({"ts": NOW, "value": 1.0}).encode(), dead_clock, set(CHANNELS), LIMITS, None, held) == []
    assert held[-1].ts == NOW


# -- the store's hold ---------------------------------------------------------------------------


def test_the_hold_survives_a_restart_and_releases_ranges_exactly_once(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    held = [Reading(CHANNELS[i % 3], NOW + i, float(i)) for i in range(30)]
    assert store.write([Reading("m1/current", NOW - 5, 9.0)], held + held[:5]) == 1
    assert store.count() == 1 and store.held_rows == 30 and store.held_span == (NOW, NOW + 29)
    # Stored meanwhile by another delivery: released, but not stored twice.
    store.write([held[3]])
    store.close()

    store = open_store(tmp_path)
    assert store.held_rows == 30 and store.held_span == (NOW, NOW + 29)
    assert store.release_held(NOW + 100, NOW + 200) == ([], 0)
    moved, new = store.release_held(NOW - 1, NOW + 9.5)
    assert moved == held[:10] and new == 9
    assert store.count() == 1 + 10 and store.held_rows == 20 and store.held_span == (NOW + 10, NOW + 29)
    assert store.drop_held(NOW + 15) == (5, 15)
    assert store.held_rows == 0 and store.held_span is None
    store.close()
    assert stored(tmp_path / "store.db") == sorted([("m1/current", NOW - 5, 9.0), *held[:10]], key=lambda r: (r[1], r[0]))


def test_held_readings_expire_by_how_long_each_has_waited(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    early = [Reading("m1/current", NOW + i, 1.0) for i in range(4)]
    late = [Reading("m1/vibration", NOW - 30 * DAY + i, 2.0) for i in range(3)]
    store.write([], early, held_at=1000.0)
    store.write([], late + early[:1], held_at=2000.0)  # a duplicate keeps its first wait
    assert store.held_rows == 7
    assert store.drop_held(NOW, held_before=1000.0) == (0, 0)
    assert store.drop_held(NOW, held_before=1500.0) == (0, 4)  # only the early ones, all ahead of NOW
    assert store.held_rows == 3 and store.held_span == (late[0].ts, late[-1].ts)
    assert store.drop_held(NOW, held_before=2000.5) == (3, 0)
    assert store.held_rows == 0 and store.held_span is None
    store.close()


def test_a_store_from_before_the_hold_gains_it_and_keeps_its_readings(tmp_path: Path) -> None:
    # The file as the version before the hold left it.
    legacy_store(tmp_path / "store.db", [("m1/current", NOW, 1.0)], migrations=1)
    store = open_store(tmp_path)
    assert store.migrations() == [name for name, _ in MIGRATIONS]
    assert store.count() == 1 and store.held_rows == 0
    store.write([], [Reading("m1/current", NOW + DAY, 2.0)])
    assert store.held_rows == 1
    store.close()


# -- the clock watch ----------------------------------------------------------------------------


class Clocks:
    """A wall and a monotonic clock the test moves, and the kernel's answer it sets."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.offset = NOW - 100.0
        self.synchronized: bool | None = False

    def wall(self) -> float:
        return self.mono + self.offset

    def tick(self, seconds: float) -> None:
        self.mono += seconds


def test_the_watch_counts_jumps_and_follows_the_kernel() -> None:
    clocks = Clocks()
    watch = ClockWatch("kernel", wall=clocks.wall, mono=lambda: clocks.mono, synchronized=lambda: clocks.synchronized)
    assert not watch.trusted and watch.synchronized is False
    clocks.tick(10)
    assert not watch.poll() and watch.jumps == 0  # time passing is not a jump
    clocks.offset += 2 * DAY  # NTP steps the clock forward and says it is synchronised
    clocks.synchronized = True
    clocks.tick(1)
    assert watch.poll() and watch.jumps == 1 and watch.last_jump_s == pytest.approx(2 * DAY)
    assert watch.trusted and watch.status()["synchronized"] is True
    clocks.synchronized = None  # a kernel that cannot be asked: trusted, as before holding existed
    clocks.tick(1)
    watch.poll()
    assert watch.trusted
    assert ClockWatch("always", synchronized=lambda: False).trusted
    assert not ClockWatch("never", synchronized=lambda: True).trusted


def test_the_kernel_answers_with_its_synchronisation_state() -> None:
    # Whatever this machine's clock state is, the real adjtimex call answers it (Linux).
    assert kernel_synchronized() in (True, False)


# -- the ingestor -------------------------------------------------------------------------------


def _publish_readings(broker: LocalBroker, client_id: str, start: float, count: int) -> list[tuple[str, float, float]]:
    pub = publisher(broker, client_id)
    expected = []
    infos = []
    for i in range(count):
        channel = CHANNELS[i % 3]
        ts = round(start + (i // 3) * 0.5, 3)  # stamped to the millisecond, as sensors do
        infos.append(pub.publish(f"sensors/{channel}", json.dumps({"ts": ts, "value": float(i)}), qos=1))
        expected.append((channel, ts, float(i)))
    for info in infos:
        info.wait_for_publish(HANG_S)
    pub.loop_stop()
    pub.disconnect()
    return sorted(expected, key=lambda r: (r[1], r[0]))


def test_readings_ahead_of_an_unsynchronised_clock_are_held_then_stored_once_it_is_corrected(
    tmp_path: Path, broker: LocalBroker
) -> None:
    """A device booted with the clock of its last shutdown, two days behind the sensors: their
    readings are held (acknowledged, not scored), nothing is lost across a restart, and all are
    stored and handed to scoring exactly once when NTP corrects the clock."""
    config = config_for(tmp_path, broker)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    state = {"behind": 2 * DAY, "synchronized": False}

    def device_clock() -> float:
        return time.time() - state["behind"]

    def watch() -> ClockWatch:
        return ClockWatch("kernel", wall=device_clock, synchronized=lambda: state["synchronized"])

    ingestor = Ingestor(config, store, clock=device_clock, clock_watch=watch())
    scored: list[Reading] = []
    ingestor.on_readings.append(scored.extend)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    now = time.time()
    expected = _publish_readings(broker, "pub-behind", now - 60, 300)
    # A 1970 reading is rejected at once, hold or not.
    dead = publisher(broker, "pub-dead")
    dead.publish("sensors/m1/current", json.dumps({"ts": 1.0, "value": 0.0}), qos=1).wait_for_publish(HANG_S)
    dead.loop_stop()
    dead.disconnect()
    wait_for(lambda: ingestor.counters()["held"] == 300, HANG_S, "300 readings held")
    wait_for(lambda: ingestor.counters()["rejected_by_reason"].get("too_old") == 1, HANG_S, "the 1970 reading rejected")
    counters = ingestor.counters()
    assert store.count() == 0 and store.held_rows == 300
    assert counters["clock"]["trusted"] is False and counters["clock"]["holding"] == 300
    ingestor.stop()
    # Stopped with its pending batch flushed: nothing held reached scoring.
    assert scored == []

    # Restarted with the clock still wrong: the held readings were acknowledged (the broker
    # sends none again) and are still held.
    again = Ingestor(config, store, clock=device_clock, clock_watch=watch())
    batches: list[Reading] = []
    again.on_batch.append(batches.extend)
    again.on_readings.append(scored.extend)
    again.start()
    assert again.wait_subscribed(HANG_S)
    assert store.held_rows == 300 and store.count() == 0
    # NTP steps the clock and says so: every held reading is stored, once.
    state["behind"] = 0.0
    state["synchronized"] = True
    wait_for(lambda: store.count() == 300, HANG_S, "the held readings released")
    assert store.held_rows == 0
    # Released into the store, they reach scoring, each once.
    wait_for(lambda: len(scored) == 300, HANG_S, "the released readings handed to scoring")
    assert sorted(scored) == sorted(Reading(*r) for r in expected)
    later = _publish_readings(broker, "pub-after", now + 200, 30)
    wait_for(lambda: store.count() == 330, HANG_S, "readings after the correction")
    again.stop()
    store.close()
    counters = again.counters()
    assert counters["received"] == 30 and counters["released"] == 300
    assert counters["clock"]["jumps"] == 1 and counters["clock"]["trusted"] is True
    assert sorted(set(batches)) == sorted(Reading(*r) for r in expected + later)
    assert sorted(scored) == sorted(Reading(*r) for r in expected + later)
    assert stored(config.store_path) == sorted(expected + later, key=lambda r: (r[1], r[0]))


def test_a_hold_that_times_out_rejects_what_the_clock_still_refuses(tmp_path: Path, broker: LocalBroker) -> None:
    """`never` trusts the clock: readings wait in the hold until they fit the window as the
    clock advances, or until the hold times out; then the rest are rejected, counted by reason."""
    config = config_for(tmp_path, broker, clock_trust="never", clock_hold_s=0.05)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    now = time.time()
    _publish_readings(broker, "pub-far", now + 10 * DAY, 9)
    wait_for(lambda: ingestor.counters()["rejected_by_reason"].get("future") == 9, HANG_S, "the hold to time out")
    counters = ingestor.counters()
    assert counters["held"] == 9 and counters["released"] == 0 and counters["rejected"] == 9
    assert store.held_rows == 0 and store.count() == 0
    ingestor.stop()
    store.close()


def test_a_full_hold_rejects_instead_of_growing(tmp_path: Path, broker: LocalBroker) -> None:
    config = config_for(tmp_path, broker, clock_trust="never", clock_hold_max=6)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    _publish_readings(broker, "pub-full", time.time() + 10 * DAY, 30)
    wait_for(lambda: ingestor.counters()["received"] == 30, HANG_S, "30 messages")
    wait_for(lambda: ingestor.counters()["held"] + ingestor.counters()["rejected"] == 30, HANG_S, "every message judged")
    counters = ingestor.counters()
    assert counters["held"] == 6 and counters["rejected_by_reason"]["future"] == 24
    ingestor.stop()
    assert store.held_rows == counters["held"]
    store.close()


def test_hold_floor_is_a_date_no_working_clock_is_behind() -> None:
    assert HOLD_FLOOR_TS < time.time() - 300 * DAY


def test_a_reading_just_ahead_waits_in_the_hold_until_the_clock_reaches_it(tmp_path: Path, broker: LocalBroker) -> None:
    """A clock that never syncs but runs a little behind: each reading waits until it fits."""
    config = config_for(tmp_path, broker, clock_trust="never", max_skew_s=0.0)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    behind = {"s": 300.0}
    ingestor = Ingestor(config, store, clock=lambda: time.time() - behind["s"])
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    now = time.time()
    early = _publish_readings(broker, "pub-early", now - 100.0, 3)
    late = _publish_readings(broker, "pub-late", now + 100.0, 3)
    expected = sorted(early + late, key=lambda r: (r[1], r[0]))
    wait_for(lambda: ingestor.counters()["held"] == 6, HANG_S, "the readings held")
    assert store.count() == 0
    behind["s"] = 50.0  # the device clock passes the early ones only
    wait_for(lambda: store.count() == 3, HANG_S, "the readings the clock has reached")
    assert store.held_rows == 3 and stored(config.store_path) == early
    behind["s"] = -150.0
    wait_for(lambda: store.count() == 6, HANG_S, "the rest")
    ingestor.stop()
    counters = ingestor.counters()
    assert counters["held"] == 6 and counters["released"] == 6 and counters["rejected"] == 0
    assert stored(config.store_path) == expected
    store.close()
