"""Every [[inputs]] format through a real broker into a real store: each reading stored once
(also when its message comes twice), bad payloads counted by reason, other fields ignored."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from datetime import datetime, timezone
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_daemon.broker import LocalBroker
from edge_daemon.config import parse_config
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.store import ReplayStore
from tests.support import wait_for

HANG_S = 60.0

CHANNELS = [
    "pump_room/temperature", "pump_room/humidity",                      # zigbee2mqtt
    "plug1/ENERGY.Power", "th1/DS18B20.Temperature",                     # tasmota
    "boiler/flow_temperature", "boiler/pump_running",                    # esphome
    "shellyplus1pm-a8/switch:0.apower", "shellyplusht-c4/temperature:0.tC",  # shelly
    "pump7/flow",                                                        # json
]  # fmt: skip
INPUTS = [
    {"topic": "zigbee2mqtt/#", "format": "zigbee2mqtt"},
    {"topic": "tele/+/+", "format": "tasmota", "timezone": "UTC"},
    {"topic": "boiler/#", "format": "esphome"},
    {"topic": "+/status/+", "format": "shelly"},
    {"topic": "+/events/rpc", "format": "shelly"},
    {"topic": "plant/+/telemetry", "format": "json", "sensor": "{1}", "values": {"flow": "$.flow"}, "ts": "$.t"},
]


def messages(now: float) -> tuple[list[tuple[str, str]], set[tuple[str, float, float]]]:
    """One real-shaped message per format and the readings they carry."""
    utc = datetime.fromtimestamp(now - 1, timezone.utc)
    sent = [
        ("zigbee2mqtt/pump_room", {"battery": 97, "humidity": 41.5, "linkquality": 120, "temperature": 19.75,
                                   "voltage": 2995, "last_seen": utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")}),
        ("tele/plug1/SENSOR", {"Time": utc.replace(tzinfo=None).isoformat(timespec="seconds"),
                               "ENERGY": {"Total": 1.5, "Power": 45, "Voltage": 230, "Current": 0.25}}),
        ("tele/th1/SENSOR", {"DS18B20": {"Id": "01144A0CB2AA", "Temperature": 22.6}, "TempUnit": "C"}),
        ("boiler/sensor/flow_temperature/state", "48.25"),
        ("boiler/binary_sensor/pump_running/state", "OFF"),
        ("shellyplus1pm-a8/status/switch:0", {"id": 0, "output": True, "apower": 8.9, "voltage": 237.5,
                                              "aenergy": {"total": 6.532, "by_minute": [1.0, 2.0, 3.0], "minute_ts": 1654511972}}),
        ("shellyplusht-c4/events/rpc", {"src": "shellyplusht-c4", "method": "NotifyStatus",
                                        "params": {"ts": now - 2.5, "temperature:0": {"id": 0, "tC": 21.6, "tF": 70.9}}}),
        ("plant/pump7/telemetry", {"t": now - 3, "flow": 2.25, "rpm": 1450}),
    ]  # fmt: skip
    return [(topic, p if isinstance(p, str) else json.dumps(p)) for topic, p in sent], {
        ("pump_room/humidity", now - 1, 41.5), ("pump_room/temperature", now - 1, 19.75),
        ("plug1/ENERGY.Power", float(int(now - 1)), 45.0), ("shellyplusht-c4/temperature:0.tC", now - 2.5, 21.6),
        ("pump7/flow", now - 3, 2.25),
    }  # fmt: skip


ARRIVAL_STAMPED = [
    ("th1/DS18B20.Temperature", 22.6), ("boiler/flow_temperature", 48.25), ("boiler/pump_running", 0.0),
    ("shellyplus1pm-a8/switch:0.apower", 8.9),
]  # fmt: skip


def stored(path: Path) -> list[tuple[str, float, float]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT c.name, r.ts, r.value FROM readings r JOIN channels c ON c.id = r.channel_id").fetchall()
    return [(name, float(ts), float(value)) for name, ts, value in rows]


BAD = [
    ("zigbee2mqtt/pump_room", '{"temperature": 21.0, "last_seen": "yesterday"}', "bad_ts"),
    ("zigbee2mqtt/pump_room", '{"temperature": "warm"}', "not_a_number"),
    ("tele/plug1/SENSOR", '{"ENERGY": {"Power": 45', "bad_json"),
    ("boiler/sensor/flow_temperature/state", "1e999", "non_finite"),
    ("shellyplus1pm-a8/status/switch:0", "[1, 2]", "bad_shape"),
    ("plant/pump7/telemetry", '{"flow": 1.0}', "bad_ts"),
    ("elsewhere/thing", "1.0", "unmapped_topic"),
]
IGNORED = [
    ("zigbee2mqtt/bridge/state", '{"state":"online"}'),
    ("tele/plug1/LWT", "Online"),
    ("boiler/status", "online"),
    ("shellyplus1pm-a8/events/rpc", json.dumps({"src": "shellyplus1pm-a8", "method": "NotifyEvent",
                                                "params": {"ts": 1.7e9, "events": [{"component": "input:0", "event": "single_push"}]}})),
]


@contextlib.contextmanager
def ingesting(tmp_path: Path, broker: LocalBroker, name: str, **sections: object) -> Iterator[tuple[ReplayStore, Ingestor, mqtt.Client]]:
    """A real Ingestor (and its store) on the test broker with `sections` of config, subscribed,
    and a publisher; stopped (the pending batch committed) on the way out."""
    config = parse_config({
        "device": {"id": name, "state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "control.sock")},
        "mqtt": {"port": broker.port, "client_id": f"{name}-{time.monotonic_ns()}", **sections.pop("mqtt", {})},  # type: ignore[dict-item]
        **sections,
    })  # fmt: skip
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-pub-{time.monotonic_ns()}")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        assert ingestor.wait_subscribed(HANG_S)
        yield store, ingestor, pub
    finally:
        pub.loop_stop()
        pub.disconnect()
        ingestor.stop()
        store.close()


def test_every_format_is_stored_once_and_bad_payloads_are_counted_by_reason(tmp_path: Path, broker: LocalBroker) -> None:
    with ingesting(
        tmp_path, broker, "formats", mqtt={"topics": ["elsewhere/#"]}, channels={"names": CHANNELS}, inputs=INPUTS,
        store={"flush_interval_s": 0.2, "clock_trust": "always"},
    ) as (store, ingestor, pub):  # fmt: skip
        now = float(int(time.time()))  # whole seconds: last_seen in ms and Tasmota's Time are exact
        good, expected = messages(now)
        # Each dated message twice, as a broker redelivers one whose ack was lost: the (channel, ts)
        # key stores it once. (A reading stamped with its arrival has no such key: a redelivered
        # copy would be a second reading, so those are sent once.)
        dated = [(topic, payload) for topic, payload in good if topic.split("/")[0] in ("zigbee2mqtt", "plant")
                 or topic.endswith("events/rpc") or topic == "tele/plug1/SENSOR"]  # fmt: skip
        sent = good + dated + [(t, p) for t, p, _ in BAD] + IGNORED
        for topic, payload in sent:
            pub.publish(topic, payload, qos=1).wait_for_publish(HANG_S)
        wait_for(lambda: ingestor.counters()["received"] == len(sent), HANG_S, "every message taken", detail=ingestor.counters)
        wait_for(lambda: store.count() == len(expected) + 4, HANG_S, "the readings committed", detail=ingestor.counters)
    counters = ingestor.counters()
    rows = stored(tmp_path / "state" / "store.db")
    assert {(c, round(ts, 3), v) for c, ts, v in expected} <= {(c, round(ts, 3), v) for c, ts, v in rows}
    arrival = [(c, v) for c, ts, v in rows if (c, v) in ARRIVAL_STAMPED]
    assert sorted(arrival) == sorted(ARRIVAL_STAMPED) and len(rows) == len(expected) + len(ARRIVAL_STAMPED), rows
    assert counters["stored"] == len(rows) and counters["duplicates"] == len(expected)
    assert counters["rejected_by_reason"] == {reason: sum(1 for _, _, r in BAD if r == reason) for _, _, reason in BAD}
    assert counters["rejected"] == len(BAD)
    assert counters["ignored_by_reason"]["not_readings"] == len(IGNORED)
    # battery, linkquality, voltage, Total, Voltage, Current, Id, TempUnit, output, voltage, aenergy.*,
    # id and tF of the event, rpm: fields of devices that are not channels, ignored (once per message).
    assert counters["ignored_by_reason"]["not_a_channel"] >= 15


def test_a_parser_bug_rejects_one_message_and_ingestion_goes_on(
    tmp_path: Path, broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A format that raises something other than PayloadError (a bug no test foresaw) costs one
    message, counted as parse_error; the writer thread lives on and stores the next one."""
    from edge_daemon.mqtt import formats
    from edge_daemon.mqtt.formats.esphome import EsphomeFormat

    class Buggy(EsphomeFormat):
        def parse(self, levels, payload, now, limits, outcome):  # type: ignore[no-untyped-def]
            if payload == b"boom":
                raise ZeroDivisionError("a bug")
            return super().parse(levels, payload, now, limits, outcome)

    monkeypatch.setitem(formats._FORMATS, "esphome", Buggy)
    with ingesting(
        tmp_path, broker, "buggy", channels={"names": ["boiler/flow_temperature"]},
        inputs=[{"topic": "boiler/#", "format": "esphome"}], store={"flush_interval_s": 0.2},
    ) as (store, ingestor, pub):  # fmt: skip
        for payload in (b"boom", b"48.5"):
            pub.publish("boiler/sensor/flow_temperature/state", payload, qos=1).wait_for_publish(HANG_S)
        wait_for(lambda: store.count() == 1, HANG_S, "the message after the bug stored", detail=ingestor.counters)
        assert ingestor.alive and ingestor.counters()["rejected_by_reason"] == {"parse_error": 1}
