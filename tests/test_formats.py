"""The [[inputs]] payload forms, read as the projects that publish them shape them: zigbee2mqtt,
Tasmota, ESPHome, Shelly Gen2 and generic JSON. Parsing here; storing through a real broker in
test_formats_broker.py."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from edge_daemon.config import Config, parse_config
from edge_daemon.errors import ConfigError, PayloadError
from edge_daemon.mqtt.formats import InputRouter, Outcome
from edge_daemon.mqtt.payload import PayloadLimits
from edge_daemon.store import Reading

NOW = 1_767_268_800.0  # 2026-01-01T12:00:00Z
LIMITS = PayloadLimits()


def config(inputs: list[dict], channels: list[str]) -> Config:
    return parse_config({
        "device": {"id": "formats"},
        "mqtt": {},
        "channels": {"names": channels},
        "inputs": inputs,
    })  # fmt: skip


def parse(router: InputRouter, topic: str, payload: object, now: float = NOW) -> tuple[list[Reading], Outcome]:
    raw = payload if isinstance(payload, bytes) else (payload if isinstance(payload, str) else json.dumps(payload)).encode()
    outcome = Outcome()
    return router.parse(topic, raw, now, LIMITS, outcome), outcome


def iso_z(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- zigbee2mqtt -------------------------------------------------------------------------------

Z2M_CHANNELS = ["pump_room/temperature", "pump_room/humidity", "door/contact", "kitchen/plug/power"]


@pytest.fixture
def z2m() -> InputRouter:
    return InputRouter(config([{"topic": "zigbee2mqtt/#", "format": "zigbee2mqtt"}], Z2M_CHANNELS))


def test_zigbee2mqtt_device_state_gives_its_configured_fields(z2m: InputRouter) -> None:
    # An Aqara temperature sensor's state as zigbee2mqtt publishes it, last_seen in ISO_8601 mode.
    state = {
        "battery": 100, "humidity": 58.25, "linkquality": 72, "power_outage_count": 2, "pressure": 1002.4,
        "temperature": 22.31, "voltage": 3015, "last_seen": iso_z(NOW - 2),
        "update": {"installed_version": 1, "latest_version": 1, "state": "idle"}, "update_available": False,
    }  # fmt: skip
    readings, outcome = parse(z2m, "zigbee2mqtt/pump_room", state)
    assert sorted(readings) == [Reading("pump_room/humidity", NOW - 2, 58.25), Reading("pump_room/temperature", NOW - 2, 22.31)]
    # linkquality, battery, ... and the nested update object's fields are not channels: ignored, not rejected.
    assert outcome.ignored == {"not_a_channel": 9} and outcome.skipped == []


def test_zigbee2mqtt_last_seen_epoch_ms_local_iso_booleans_and_names_with_a_slash(z2m: InputRouter) -> None:
    readings, _ = parse(z2m, "zigbee2mqtt/door", {"contact": False, "battery": 91, "last_seen": int((NOW - 5) * 1000)})
    assert readings == [Reading("door/contact", NOW - 5, 0.0)]
    local = datetime.fromtimestamp(NOW - 7, ZoneInfo("Europe/Berlin")).isoformat()  # ISO_8601_local: "...+01:00"
    readings, _ = parse(z2m, "zigbee2mqtt/kitchen/plug", {"power": 41.5, "state": "ON", "last_seen": local})
    assert readings == [Reading("kitchen/plug/power", NOW - 7, 41.5)]
    # Without last_seen: the arrival time.
    readings, _ = parse(z2m, "zigbee2mqtt/pump_room", {"temperature": 21.0})
    assert readings == [Reading("pump_room/temperature", NOW, 21.0)]


def test_zigbee2mqtt_bridge_availability_and_commands_are_ignored(z2m: InputRouter) -> None:
    for topic, payload in [
        ("zigbee2mqtt/bridge/state", '{"state":"online"}'),
        ("zigbee2mqtt/bridge/devices", "[]"),
        ("zigbee2mqtt/pump_room/availability", '{"state":"online"}'),
        ("zigbee2mqtt/kitchen/plug/set", '{"state":"OFF"}'),
    ]:
        readings, outcome = parse(z2m, topic, payload)
        assert readings == [] and outcome.ignored == {"not_readings": 1}, topic


def test_zigbee2mqtt_bad_payloads_are_rejected_by_reason(z2m: InputRouter) -> None:
    cases = [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_shape"),
        ({"temperature": "warm"}, "not_a_number"),
        ({"temperature": 21.0, "last_seen": "yesterday"}, "bad_ts"),
        ({"temperature": 21.0, "last_seen": int((NOW - 30 * 86400) * 1000)}, "too_old"),
        ({"temperature": 21.0, "last_seen": [1]}, "bad_ts"),
        (b"\xff\xfe", "bad_utf8"),
    ]
    for payload, reason in cases:
        with pytest.raises(PayloadError) as caught:
            parse(z2m, "zigbee2mqtt/pump_room", payload)
        assert caught.value.reason == reason, payload
    # One bad configured field does not cost the good one.
    readings, outcome = parse(z2m, "zigbee2mqtt/pump_room", {"temperature": None, "humidity": 40.0})
    assert readings == [Reading("pump_room/humidity", NOW, 40.0)] and [e.reason for e in outcome.skipped] == ["not_a_number"]


# -- Tasmota -----------------------------------------------------------------------------------

TASMOTA_CHANNELS = ["plug1/ENERGY.Power", "plug1/ENERGY.Current", "th1/DS18B20.Temperature", "plug1/Wifi.RSSI", "pdu/ENERGY.Power.1"]


def tasmota(zone: str | None = "Europe/Berlin") -> InputRouter:
    mapping = {"topic": "tele/+/+", "format": "tasmota"}
    if zone:
        mapping["timezone"] = zone
    return InputRouter(config([mapping], TASMOTA_CHANNELS))


def local_time(ts: float, zone: str) -> str:
    """Tasmota's `Time`: the device's local time, no zone."""
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).replace(tzinfo=None).isoformat(timespec="seconds")


def test_tasmota_sensor_energy_and_ds18b20_flattened_with_dots() -> None:
    router = tasmota()
    energy = {
        "Time": local_time(NOW - 10, "Europe/Berlin"),
        "ENERGY": {"TotalStartTime": "2025-11-02T09:12:03", "Total": 12.345, "Yesterday": 0.512, "Today": 0.108, "Period": 2,
                   "Power": 45, "ApparentPower": 58, "ReactivePower": 37, "Factor": 0.78, "Voltage": 229, "Current": 0.253},
    }  # fmt: skip
    readings, outcome = parse(router, "tele/plug1/SENSOR", energy)
    assert sorted(readings) == [Reading("plug1/ENERGY.Current", NOW - 10, 0.253), Reading("plug1/ENERGY.Power", NOW - 10, 45.0)]
    assert outcome.ignored == {"not_a_channel": 9}
    ds = {"Time": local_time(NOW, "Europe/Berlin"), "DS18B20": {"Id": "01144A0CB2AA", "Temperature": 22.6}, "TempUnit": "C"}
    assert parse(router, "tele/th1/SENSOR", ds)[0] == [Reading("th1/DS18B20.Temperature", NOW, 22.6)]
    # A multi-channel device's arrays: items by index.
    pdu = {"Time": local_time(NOW, "Europe/Berlin"), "ENERGY": {"Power": [12, 80], "Voltage": [230, 230]}}
    assert parse(router, "tele/pdu/SENSOR", pdu)[0] == [Reading("pdu/ENERGY.Power.1", NOW, 80.0)]


def test_tasmota_state_lwt_and_the_time_zone() -> None:
    router = tasmota()
    state = {"Time": local_time(NOW, "Europe/Berlin"), "Uptime": "0T01:02:03", "UptimeSec": 3723, "Heap": 26, "POWER": "ON",
             "Wifi": {"AP": 1, "SSId": "plant", "Channel": 6, "RSSI": 76, "Signal": -62, "LinkCount": 1}}  # fmt: skip
    assert parse(router, "tele/plug1/STATE", state)[0] == [Reading("plug1/Wifi.RSSI", NOW, 76.0)]
    assert parse(router, "tele/plug1/LWT", "Online")[1].ignored == {"not_readings": 1}
    # The same local text read in another zone is another instant; an explicit offset wins.
    text = local_time(NOW, "America/New_York")
    assert parse(tasmota("America/New_York"), "tele/th1/SENSOR", {"Time": text, "DS18B20": {"Temperature": 1.0}})[0][0].ts == NOW
    offset = datetime.fromtimestamp(NOW, ZoneInfo("Asia/Tokyo")).isoformat()
    assert parse(router, "tele/th1/SENSOR", {"Time": offset, "DS18B20": {"Temperature": 1.0}})[0][0].ts == NOW
    # Without a zone in the mapping: the device's own.
    mine = datetime.fromtimestamp(NOW).isoformat(timespec="seconds")
    assert parse(tasmota(None), "tele/th1/SENSOR", {"Time": mine, "DS18B20": {"Temperature": 1.0}})[0][0].ts == NOW


# -- ESPHome -----------------------------------------------------------------------------------

ESPHOME_CHANNELS = ["boiler/flow_temperature", "boiler/pump_running"]


@pytest.fixture
def esphome() -> InputRouter:
    return InputRouter(config([{"topic": "boiler/#", "format": "esphome"}], ESPHOME_CHANNELS))


def test_esphome_states_are_bare_text(esphome: InputRouter) -> None:
    assert parse(esphome, "boiler/sensor/flow_temperature/state", "48.25")[0] == [Reading("boiler/flow_temperature", NOW, 48.25)]
    assert parse(esphome, "boiler/binary_sensor/pump_running/state", "ON")[0] == [Reading("boiler/pump_running", NOW, 1.0)]
    for topic, payload in [("boiler/status", "online"), ("boiler/debug", "[D][sensor]"), ("boiler/switch/pump/command", "ON")]:
        assert parse(esphome, topic, payload)[1].ignored == {"not_readings": 1}
    assert parse(esphome, "boiler/sensor/wifi_signal/state", "-61")[1].ignored == {"not_a_channel": 1}
    for payload, reason in [("12a", "not_a_number"), (b"\xff", "bad_utf8")]:
        with pytest.raises(PayloadError) as caught:
            parse(esphome, "boiler/sensor/flow_temperature/state", payload)
        assert caught.value.reason == reason
    with pytest.raises(PayloadError) as caught:
        parse(esphome, "boiler/binary_sensor/pump_running/state", "1")
    assert caught.value.reason == "not_a_number"


# -- Shelly ------------------------------------------------------------------------------------

SHELLY_CHANNELS = ["shellyplus1pm-a8032ab1/switch:0.apower", "shellyplus1pm-a8032ab1/switch:0.aenergy.total",
                   "shellyplusht-c4d8d5/temperature:0.tC"]  # fmt: skip


@pytest.fixture
def shelly() -> InputRouter:
    return InputRouter(config([{"topic": "+/status/+", "format": "shelly"}, {"topic": "+/events/rpc", "format": "shelly"}], SHELLY_CHANNELS))


def test_shelly_component_status_and_notifications(shelly: InputRouter) -> None:
    switch = {"id": 0, "source": "timer", "output": True, "apower": 8.9, "voltage": 237.5, "current": 0.068,
              "aenergy": {"total": 6.532, "by_minute": [45.199, 47.141, 88.397], "minute_ts": 1654511972},
              "temperature": {"tC": 53.3, "tF": 127.9}}  # fmt: skip
    readings, outcome = parse(shelly, "shellyplus1pm-a8032ab1/status/switch:0", switch)
    assert sorted(readings) == [Reading("shellyplus1pm-a8032ab1/switch:0.aenergy.total", NOW, 6.532),
                                Reading("shellyplus1pm-a8032ab1/switch:0.apower", NOW, 8.9)]  # fmt: skip
    assert outcome.ignored == {"not_a_channel": 11}
    temp = {"id": 0, "tC": 21.4, "tF": 70.5}
    assert parse(shelly, "shellyplusht-c4d8d5/status/temperature:0", temp)[0] == [Reading("shellyplusht-c4d8d5/temperature:0.tC", NOW, 21.4)]
    event = {"src": "shellyplusht-c4d8d5", "dst": "shellyplusht-c4d8d5/events", "method": "NotifyStatus",
             "params": {"ts": NOW - 3.25, "temperature:0": {"id": 0, "tC": 21.6, "tF": 70.9}}}  # fmt: skip
    assert parse(shelly, "shellyplusht-c4d8d5/events/rpc", event)[0] == [Reading("shellyplusht-c4d8d5/temperature:0.tC", NOW - 3.25, 21.6)]
    press = {"src": "shellyplus1pm-a8032ab1", "method": "NotifyEvent", "params": {"ts": NOW, "events": [{"component": "input:0", "event": "single_push"}]}}
    assert parse(shelly, "shellyplus1pm-a8032ab1/events/rpc", press)[1].ignored == {"not_readings": 1}


# -- generic JSON ------------------------------------------------------------------------------


def test_json_mapping_reads_paths_and_timestamps() -> None:
    mapping = {"topic": "plant/+/telemetry", "format": "json", "sensor": "{1}",
               "values": {"temperature": "$.env.temp", "flow": "$.flows[1]", "pressure": "$.p"}, "ts": "$.time", "ts_unit": "ms"}  # fmt: skip
    router = InputRouter(config([mapping], ["pump7/temperature", "pump7/flow"]))
    doc = {"time": int((NOW - 1) * 1000), "env": {"temp": 31.5, "hum": 20}, "flows": [1.0, 2.5], "p": 3.0}
    readings, outcome = parse(router, "plant/pump7/telemetry", doc)
    assert sorted(readings) == [Reading("pump7/flow", NOW - 1, 2.5), Reading("pump7/temperature", NOW - 1, 31.5)]
    assert outcome.ignored == {"not_a_channel": 1}  # pump7/pressure is not configured
    readings, outcome = parse(router, "plant/pump7/telemetry", {"time": int(NOW * 1000), "env": {"temp": 30.0}})
    assert readings == [Reading("pump7/temperature", NOW, 30.0)] and outcome.ignored == {"missing": 2}
    with pytest.raises(PayloadError) as caught:
        parse(router, "plant/pump7/telemetry", {"env": {"temp": 30.0}})
    assert caught.value.reason == "bad_ts"
    iso = InputRouter(config([{**mapping, "ts": "$.at", "ts_unit": "iso"}], ["pump7/temperature"]))
    assert parse(iso, "plant/pump7/telemetry", {"at": iso_z(NOW), "env": {"temp": 1.5}})[0] == [Reading("pump7/temperature", NOW, 1.5)]


# -- every format ------------------------------------------------------------------------------


def test_unmapped_topics_are_rejected_under_their_own_reason(z2m: InputRouter) -> None:
    with pytest.raises(PayloadError) as caught:
        parse(z2m, "sensors/m1/temperature", "1.0")
    assert caught.value.reason == "unmapped_topic"


def test_the_first_matching_mapping_reads_a_topic_and_native_is_a_mapping_too() -> None:
    router = InputRouter(config(
        [{"topic": "sensors/#", "format": "native"}, {"topic": "#", "format": "esphome"}], ["m1/temperature", "n1/t"]
    ))  # fmt: skip
    assert parse(router, "sensors/m1/temperature", {"ts": NOW, "value": 2.0})[0] == [Reading("m1/temperature", NOW, 2.0)]
    assert parse(router, "n1/sensor/t/state", "3")[0] == [Reading("n1/t", NOW, 3.0)]


def test_wild_timestamps_in_any_format_are_held_or_rejected_like_native_ones(z2m: InputRouter) -> None:
    held: list[Reading] = []
    ahead = {"temperature": 20.0, "last_seen": int((NOW + 86400) * 1000)}
    assert z2m.parse("zigbee2mqtt/pump_room", json.dumps(ahead).encode(), NOW, LIMITS, Outcome(), held) == []
    assert held == [Reading("pump_room/temperature", NOW + 86400, 20.0)]
    with pytest.raises(PayloadError) as caught:
        z2m.parse("zigbee2mqtt/pump_room", json.dumps(ahead).encode(), NOW, LIMITS, Outcome(), None)
    assert caught.value.reason == "future"


@pytest.mark.parametrize(
    ("mapping", "problem"),
    [
        ({"topic": "a/#/b", "format": "native"}, "'#' must be the whole last level"),
        ({"topic": "a/b+", "format": "esphome"}, "'+' must be a whole level"),
        ({"topic": "a/#", "format": "xml"}, "Input should be"),
        ({"topic": "a/#", "format": "json", "values": {"t": "$.t"}}, "needs sensor"),
        ({"topic": "a/#", "format": "json", "sensor": "{0}"}, "needs values"),
        ({"topic": "a/+", "format": "json", "sensor": "{3}", "values": {"t": "$.t"}}, "has no level 3"),
        ({"topic": "a/+", "format": "json", "sensor": "{1}", "values": {"t": "temp"}}, "is not a JSON path"),
        ({"topic": "a/+", "format": "zigbee2mqtt", "values": {"t": "$.t"}}, "only for format 'json'"),
        ({"topic": "a/+", "format": "tasmota", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"topic": "a/+", "format": "esphome", "timezone": "UTC"}, "only for formats 'tasmota' and 'json'"),
    ],
)
def test_validate_config_checks_every_mapping(mapping: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config([{"topic": "ok/#", "format": "native"}, mapping], ["a/t"])
    assert any(path.startswith("inputs.1") and problem in message for path, message in caught.value.problems), caught.value.problems


def test_subscriptions_follow_the_mappings() -> None:
    cfg = config([{"topic": "zigbee2mqtt/#", "format": "zigbee2mqtt"}, {"topic": "tele/+/SENSOR", "format": "tasmota"}], ["a/t"])
    assert cfg.subscriptions == ["zigbee2mqtt/#", "tele/+/SENSOR"]
    assert config([], ["a/t"]).subscriptions == ["sensors/#"]
    with pytest.raises(ConfigError, match="more than two levels"):
        config([], ["kitchen/plug/power"])


def test_hostile_payloads_are_rejected_never_raised() -> None:
    """Whatever the field sends, parsing ends in readings or a PayloadError: a retained bad
    message would otherwise end the writer at every start."""
    tz_less = InputRouter(config([{"topic": "tele/+/+", "format": "tasmota"}], ["t1/DS18B20.Temperature"]))
    z2m = InputRouter(config([{"topic": "zigbee2mqtt/#", "format": "zigbee2mqtt"}], ["d/t"]))
    shelly = InputRouter(config([{"topic": "+/events/rpc", "format": "shelly"}], ["s/temperature:0.tC"]))
    deep: object = {"t": 1}
    for _ in range(12):
        deep = {"x": deep}
    cases = [
        (tz_less, "tele/t1/SENSOR", {"Time": "0001-01-01T00:00:00", "DS18B20": {"Temperature": 1}}, "bad_ts"),
        (tz_less, "tele/t1/SENSOR", {"Time": "9999-12-31T23:59:59", "DS18B20": {"Temperature": 1}}, {"bad_ts", "future"}),
        (tz_less, "tele/t1/SENSOR", {"Time": "2024-13-45T00:00:00", "DS18B20": {"Temperature": 1}}, "bad_ts"),
        (z2m, "zigbee2mqtt/d", {"t": 1, "last_seen": "0001-01-01"}, "bad_ts"),
        (z2m, "zigbee2mqtt/d", {"t": 1, "last_seen": 10**400}, "bad_ts"),
        (z2m, "zigbee2mqtt/d", deep, "too_deep"),
        (shelly, "s/events/rpc", {"method": [1], "params": {}}, None),
        (shelly, "s/events/rpc", {"method": "NotifyStatus", "params": []}, "bad_shape"),
    ]
    for router, topic, payload, reasons in cases:
        try:
            parse(router, topic, payload)
        except PayloadError as exc:
            assert reasons is not None and exc.reason in ({reasons} if isinstance(reasons, str) else reasons), (payload, exc)
        else:
            assert reasons is None, payload


def test_esphome_reads_only_plain_numbers_and_ignores_unknown_states(esphome: InputRouter) -> None:
    for text in ("1_000", "\u0661\u0662", "infinity", "0x10"):
        with pytest.raises(PayloadError) as caught:
            parse(esphome, "boiler/sensor/flow_temperature/state", text)
        assert caught.value.reason == "not_a_number", text
    assert parse(esphome, "boiler/sensor/flow_temperature/state", "-1.5e2")[0] == [Reading("boiler/flow_temperature", NOW, -150.0)]
    # A sensor not read yet publishes "nan": no reading, not an error every time.
    readings, outcome = parse(esphome, "boiler/sensor/flow_temperature/state", "nan")
    assert readings == [] and outcome.ignored == {"no_state": 1}
