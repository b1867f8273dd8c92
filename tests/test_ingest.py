"""Payload parsing and validation, and the Ingestor against a real broker and a real store."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_daemon.broker import LocalBroker
from edge_daemon.config import Config
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.mqtt.payload import REASONS, PayloadLimits, parse_payload
from edge_daemon.store import Reading, ReplayStore
from conftest import CHANNELS, make_config
from payload_schemas import violations

NOW = 1_800_000_000.0
LIMITS = PayloadLimits(max_payload_bytes=1024, max_age_s=7 * 86400, max_skew_s=300)
KNOWN = set(CHANNELS)
# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0


def parse(topic: str, payload: bytes | str, skipped: list[PayloadError] | None = None) -> list[Reading]:
    raw = payload.encode() if isinstance(payload, str) else payload
    return parse_payload(topic, raw, NOW, KNOWN, LIMITS, skipped)


# -- parsing ----------------------------------------------------------------------------------


def test_every_design_form_is_accepted() -> None:
    assert parse("sensors/m1/temperature", '{"ts": 1799999990.5, "value": 21.5}') == [
        Reading("m1/temperature", 1799999990.5, 21.5)
    ]
    assert parse("sensors/m1/temperature", '{"value": -3, "ts": 1800000000}') == [
        Reading("m1/temperature", 1800000000.0, -3.0)
    ]
    # A bare number takes the arrival time.
    assert parse("sensors/m1/vibration", "0.25") == [Reading("m1/vibration", NOW, 0.25)]
    assert parse("sensors/m1/vibration", " 7 ") == [Reading("m1/vibration", NOW, 7.0)]
    assert parse("sensors/m1", '{"ts": 1799999999, "values": {"temperature": 20, "current": 1.5}}') == [
        Reading("m1/temperature", 1799999999.0, 20.0),
        Reading("m1/current", 1799999999.0, 1.5),
    ]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("sensors/m1/temperature", b"\xff\xfe12", "bad_utf8"),
        ("sensors/m1/temperature", '{"ts": 1800000000, "value": 1', "bad_json"),
        ("sensors/m1/temperature", "", "bad_json"),
        ("sensors/m1/temperature", "NaN", "non_finite"),
        ("sensors/m1/temperature", '{"ts": 1800000000, "value": Infinity}', "non_finite"),
        ("sensors/m1/temperature", '{"ts": 1800000000, "value": 1e999}', "non_finite"),
        ("sensors/m1/temperature", "1" + "0" * 400, "non_finite"),
        ("sensors/m1/temperature", '"21.5"', "not_a_number"),
        ("sensors/m1/temperature", "true", "not_a_number"),
        ("sensors/m1/temperature", '{"ts": 1800000000, "value": false}', "not_a_number"),
        ("sensors/m1/temperature", '{"ts": 1800000000, "value": null}', "not_a_number"),
        ("sensors/m1/temperature", "[1.0]", "not_a_number"),
        ("sensors/m1/humidity", "1.0", "unknown_channel"),
        ("sensors/m9/temperature", '{"ts": 1800000000, "value": 1}', "unknown_channel"),
        ("sensors/m1/temperature", '{"ts": 0, "value": 1}', "too_old"),
        ("sensors/m1/temperature", '{"ts": 1799395199, "value": 1}', "too_old"),
        ("sensors/m1/temperature", '{"ts": 1800000301, "value": 1}', "future"),
        ("sensors/m1/temperature", '{"ts": "1800000000", "value": 1}', "bad_ts"),
        ("sensors/m1/temperature", '{"ts": true, "value": 1}', "bad_ts"),
        ("sensors/m1/temperature", '{"ts": NaN, "value": 1}', "bad_ts"),
        ("sensors/m1/temperature", "1" + " " * 1024, "too_large"),
        ("sensors/m1/temperature", "[" * 200 + "]" * 200, "too_deep"),
        ("sensors/m1", '{"ts": 1800000000, "values": {"a": {"b": {"c": {"d": 1}}}}}', "too_deep"),
        ("sensors/m1/temperature", '{"value": 1}', "bad_shape"),
        ("sensors/m1/temperature", '{"ts": 1800000000, "value": 1, "unit": "C"}', "bad_shape"),
        ("sensors/m1", "1.0", "bad_shape"),
        ("sensors/m1", '{"ts": 1800000000, "values": [1, 2]}', "bad_shape"),
        ("sensors/m1", '{"ts": 1800000000, "values": {}}', "bad_shape"),
        ("sensors/m1", '{"values": {"temperature": 1}}', "bad_shape"),
        ("sensors/m1/temperature/extra", "1.0", "bad_topic"),
        ("sensors//temperature", "1.0", "bad_topic"),
        ("other/m1/temperature", "1.0", "bad_topic"),
    ],
)
def test_bad_payloads_are_rejected_with_their_reason(topic: str, payload: str | bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as err:
        parse(topic, payload)
    assert err.value.reason == reason
    assert reason in REASONS


def test_values_map_keeps_good_entries_and_reports_bad_ones() -> None:
    skipped: list[PayloadError] = []
    payload = '{"ts": 1800000000, "values": {"temperature": 1, "humidity": 2, "current": "x", "vibration": 3}}'
    readings = parse("sensors/m1", payload, skipped)
    assert readings == [Reading("m1/temperature", NOW, 1.0), Reading("m1/vibration", NOW, 3.0)]
    assert [e.reason for e in skipped] == ["unknown_channel", "not_a_number"]
    # With no good entry at all the message is rejected with the first entry's reason.
    skipped = []
    with pytest.raises(PayloadError) as err:
        parse("sensors/m1", '{"ts": 1800000000, "values": {"humidity": 2, "current": null}}', skipped)
    assert err.value.reason == "unknown_channel"
    assert [e.reason for e in skipped] == ["not_a_number"]


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    topic=st.sampled_from(["sensors/m1/temperature", "sensors/m1", "sensors/m1/current", "sensors/m2/x", "sensors/a/b/c"]),
    payload=st.binary(max_size=64) | _json.map(lambda doc: json.dumps(doc).encode()),
    now=st.floats(1e9, 2e9),
)
def test_parse_never_fails_otherwise_and_never_lets_bad_readings_through(topic: str, payload: bytes, now: float) -> None:
    try:
        readings = parse_payload(topic, payload, now, KNOWN, LIMITS, [])
    except PayloadError as exc:
        assert exc.reason in REASONS
        return
    for reading in readings:
        assert reading.channel in KNOWN
        assert math.isfinite(reading.value) and not isinstance(reading.value, bool)
        assert now - LIMITS.max_age_s <= reading.ts <= now + LIMITS.max_skew_s


# -- the Ingestor against a real broker -----------------------------------------------------------


def config_for(tmp_path: Path, broker: LocalBroker, **store: object) -> Config:
    mqtt_section: dict[str, object] = {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    if broker.kind != "mosquitto":
        mqtt_section["protocol"] = "3.1.1"
    return make_config(tmp_path, port=broker.port, mqtt=mqtt_section, store={"flush_interval_s": 0.05, **store})


def publisher(broker: LocalBroker, client_id: str = "test-publisher") -> mqtt.Client:
    """A QoS 1 publisher with a persistent session, so it resends across a broker restart."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(100)
    client.reconnect_delay_set(0.1, 0.5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def restartable_broker() -> Iterator[LocalBroker]:
    """A broker whose sessions and queued messages survive a restart.

    Run as root, mosquitto drops to its own user, so its persistence directory must be writable
    by that user (pytest's tmp_path is private to root). amqtt keeps nothing across a restart.
    """
    if not shutil.which("mosquitto"):
        pytest.skip("broker restart without loss needs mosquitto's persistence")
    workdir = Path(tempfile.mkdtemp(prefix="edge-broker-"))
    workdir.chmod(0o777)
    broker = LocalBroker(workdir=workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def running(tmp_path: Path, broker: LocalBroker):  # type: ignore[no-untyped-def]
    config = config_for(tmp_path, broker)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    yield config, store, ingestor
    ingestor.stop()
    store.close()


def test_duplicates_are_stored_once_and_hooks_see_committed_batches(running, broker: LocalBroker) -> None:  # type: ignore[no-untyped-def]
    config, store, ingestor = running
    batches: list[list[Reading]] = []
    ingestor.on_batch.append(lambda readings: batches.append(list(readings)))
    now = time.time()
    pub = publisher(broker)
    payload = json.dumps({"ts": now, "value": 1.5})
    infos = [pub.publish("sensors/m1/temperature", payload, qos=1) for _ in range(3)]
    infos.append(pub.publish("sensors/m1", json.dumps({"ts": now, "values": {"temperature": 1.5, "current": 2.0}}), qos=1))
    for info in infos:
        info.wait_for_publish(HANG_S)
    wait_for(lambda: ingestor.counters()["received"] == 4, HANG_S, "4 messages")
    wait_for(lambda: ingestor.counters()["readings"] == 5, HANG_S, "the batch to commit")
    counters = ingestor.counters()
    assert counters["stored"] == 2 and counters["duplicates"] == 3 and counters["rejected"] == 0
    assert store.count() == 2
    seen = [r for batch in batches for r in batch]
    assert sorted(set(seen)) == sorted({Reading("m1/temperature", now, 1.5), Reading("m1/current", now, 2.0)})
    pub.loop_stop()
    pub.disconnect()


def test_scoring_gets_readings_before_their_batch_commits(tmp_path: Path, broker: LocalBroker) -> None:
    """Commits are rare (each writes a page per channel to an SD card); readings reach the
    on_readings hooks (scoring) anyway, while their batch still waits, unacknowledged."""
    config = config_for(tmp_path, broker, flush_interval_s=3600.0, batch_size=10_000)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    handed: list[Reading] = []
    committed: list[Reading] = []
    ingestor.on_readings.append(handed.extend)
    ingestor.on_batch.append(committed.extend)
    ingestor.start()
    pub = publisher(broker, client_id=f"hand-over-publisher-{time.monotonic_ns()}")
    try:
        assert ingestor.wait_subscribed(HANG_S)
        now = time.time()
        for k in range(5):
            pub.publish("sensors/m1/temperature", json.dumps({"ts": now + k, "value": float(k)}), qos=1).wait_for_publish(HANG_S)
        wait_for(lambda: len(handed) == 5, HANG_S, "the readings handed over")
        assert [r.value for r in handed] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert committed == [] and store.count() == 0 and ingestor.counters()["stored"] == 0
    finally:
        pub.loop_stop()
        pub.disconnect()
        ingestor.stop()  # commits the waiting batch
    assert store.count() == 5 and len(committed) == 5
    store.close()


def test_a_fresh_session_misses_nothing_published_once_subscribed(tmp_path: Path, broker: LocalBroker) -> None:
    # A new session gets nothing published before its SUBACK. `wait_subscribed` (what the daemon
    # waits for before READY) must cover that: a reading published the moment it returns is stored.
    pub = publisher(broker, client_id=f"fresh-session-publisher-{time.monotonic_ns()}")
    try:
        for attempt in range(5):
            config = config_for(tmp_path / str(attempt), broker)
            store = ReplayStore(config.store_path, config.store, config.channels.names)
            ingestor = Ingestor(config, store)
            try:
                assert not ingestor.connected
                ingestor.start()
                assert ingestor.wait_subscribed(HANG_S)
                assert ingestor.connected
                pub.publish("sensors/m1/temperature", json.dumps({"ts": time.time(), "value": attempt}), qos=1).wait_for_publish(HANG_S)
                wait_for(lambda: store.count() == 1, HANG_S, f"the reading published right after the SUBACK (round {attempt})")
            finally:
                ingestor.stop()
                store.close()
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_status_is_retained_online_then_offline_after_stop(tmp_path: Path, broker: LocalBroker) -> None:
    config = config_for(tmp_path, broker)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)

    def retained_status() -> dict:
        got: list[bytes] = []
        done = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        client.on_message = lambda c, u, m: (got.append(m.payload), done.set())
        client.connect(broker.host, broker.port)
        client.subscribe(f"edge/{config.device.id}/status", qos=1)
        client.loop_start()
        done.wait(HANG_S)
        client.loop_stop()
        client.disconnect()
        assert got, f"no retained status within {HANG_S:.0f} s"
        return json.loads(got[0])

    wait_for(lambda: retained_status()["online"] is True, HANG_S, "retained online status")
    online = retained_status()
    assert violations(f"edge/{config.device.id}/status", online) == []
    ingestor.publish("forecast", {"step": 1}, qos=1).wait_for_publish(HANG_S)
    ingestor.stop()
    store.close()
    offline = retained_status()
    assert offline == {"online": False, "device": config.device.id}
    assert violations(f"edge/{config.device.id}/status", offline) == []


def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, restartable_broker: LocalBroker, caplog: pytest.LogCaptureFixture
) -> None:
    broker = restartable_broker
    caplog.set_level(logging.DEBUG, logger="edge_daemon.mqtt")
    config = config_for(tmp_path, broker)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    pub = publisher(broker)
    total = 3000
    base = time.time() - 600
    sent = threading.Event()

    def publish_all() -> None:
        for i in range(total):
            pub.publish(f"sensors/{CHANNELS[i % 3]}", json.dumps({"ts": base + i * 0.01, "value": i}), qos=1)
            time.sleep(0.0005)
        sent.set()

    thread = threading.Thread(target=publish_all)
    thread.start()
    wait_for(lambda: store.count() > 300, HANG_S, "the stream to start")
    broker.restart()
    thread.join()
    wait_for(lambda: store.count() == total, HANG_S, f"all {total} readings (have {store.count()})")
    pub.loop_stop()
    pub.disconnect()
    ingestor.stop()
    ts, idx, values = store.read()
    assert len(ts) == total
    assert sorted(values.astype(int).tolist()) == list(range(total))
    store.close()
    # One WARNING for the outage, retries at DEBUG only.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "connect" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_mqtt_311_with_small_broker_inflight(tmp_path: Path, broker: LocalBroker) -> None:
    # A flush interval no run of this test reaches: only flushing on the in-flight window keeps
    # the stream moving; waiting for the interval, the broker would stall at its in-flight limit.
    config = make_config(
        tmp_path, port=broker.port, mqtt={"protocol": "3.1.1", "broker_inflight": 20}, store={"flush_interval_s": 3600.0}
    )
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    pub = publisher(broker, "pub-311")
    base = time.time() - 60
    for i in range(2000):
        pub.publish("sensors/m1/current", json.dumps({"ts": base + i * 0.01, "value": i}), qos=1)
    wait_for(lambda: ingestor.counters()["received"] == 2000, HANG_S, "2000 messages over MQTT 3.1.1 with no timed flush")
    pub.loop_stop()
    pub.disconnect()
    ingestor.stop()  # flushes the last, partly filled batch
    assert store.count() == 2000
    store.close()


def test_acks_reach_the_broker_so_a_restarted_session_gets_nothing_again(tmp_path: Path, broker: LocalBroker) -> None:
    config = config_for(tmp_path, broker)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    assert ingestor.wait_subscribed(HANG_S)
    pub = publisher(broker, "pub-acks")
    total = 2500  # more than the receive maximum: the broker stalls unless batches are acknowledged
    base = time.time() - 60
    for i in range(total):
        pub.publish(f"sensors/{CHANNELS[i % 3]}", json.dumps({"ts": base + i * 0.01, "value": i}), qos=1)
    wait_for(lambda: store.count() == total, HANG_S, f"{total} readings")
    ingestor.stop()
    assert ingestor.counters()["received"] == total
    # Same client id, kept session: anything committed but not acknowledged would come again,
    # ahead of a reading published once the session is back.
    again = Ingestor(config, store)
    again.start()
    assert again.wait_subscribed(HANG_S)
    pub.publish("sensors/m1/current", json.dumps({"ts": base + total * 0.01, "value": -1}), qos=1).wait_for_publish(HANG_S)
    wait_for(lambda: store.count() == total + 1, HANG_S, "the reading published after the restart")
    pub.loop_stop()
    pub.disconnect()
    again.stop()
    assert again.counters()["received"] == 1
    store.close()
