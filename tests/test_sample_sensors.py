"""Sample sensors: the generated motor data and the MQTT publisher that replays it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.broker import LocalBroker
from sample_sensors.generate import CHANNELS, generate, generate_labeled, read_csv, timestamps, to_csv
from sample_sensors.publish import MALFORMED_KINDS, default_start_ts, malformed_message, publish

REPO = Path(__file__).resolve().parents[1]
DAY_STEPS = 600  # time_scale 144 with 1 s steps puts one day in 600 steps
MAX_PAYLOAD = 16384  # the daemon's default mqtt.max_payload_bytes
# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0


# ---------------------------------------------------------------- generate


def test_channels_are_the_configured_model_inputs() -> None:
    # The same names tests/conftest.py puts into [channels].names.
    assert list(CHANNELS) == ["m1/temperature", "m1/vibration", "m1/current"]


def test_generate_is_reproducible_from_the_seed() -> None:
    first = generate(2000, seed=7, regime_change_at=1000, time_scale=144)
    again = generate(2000, seed=7, regime_change_at=1000, time_scale=144)
    other = generate(2000, seed=8, regime_change_at=1000, time_scale=144)
    assert list(first) == list(CHANNELS)
    for channel in CHANNELS:
        assert first[channel].shape == (2000,)
        assert np.isfinite(first[channel]).all()
        np.testing.assert_array_equal(first[channel], again[channel])
        assert not np.array_equal(first[channel], other[channel])


def test_values_are_in_physical_ranges() -> None:
    values = generate(3 * DAY_STEPS, seed=1, time_scale=144)
    temperature, vibration, current = (values[c] for c in CHANNELS)
    assert 10 < np.median(temperature) < 80
    assert 0 < np.median(vibration) < 4.5  # healthy machine: ISO 10816 zones A/B
    assert 3 < np.median(current) < 20
    assert (vibration >= 0).all() and (current >= 0).all()


@pytest.mark.parametrize("seed", [0, 3])
def test_bearing_wear_raises_vibration_level_scatter_and_temperature(seed: int) -> None:
    n, change = 10 * DAY_STEPS, 5 * DAY_STEPS  # whole days on both sides: same daily phases
    worn = generate(n, seed=seed, regime_change_at=change, time_scale=144)
    healthy = generate(n, seed=seed, time_scale=144)
    before, after = slice(0, change), slice(change + 50, n)

    def ratios(values: dict[str, np.ndarray]) -> tuple[float, float, float]:
        vib, temp = values["m1/vibration"], values["m1/temperature"]
        return (
            vib[after].mean() / vib[before].mean(),
            vib[after].std() / vib[before].std(),
            temp[after].mean() - temp[before].mean(),
        )

    level, scatter, warming = ratios(worn)
    assert level > 1.6 and scatter > 1.5 and warming > 3.0
    # Without the change the same statistics stay put: the margin is the regime's doing.
    level0, scatter0, warming0 = ratios(healthy)
    assert 0.9 < level0 < 1.1 and 0.8 < scatter0 < 1.2 and abs(warming0) < 1.0


def test_current_recalibration_changes_current_but_not_the_motor() -> None:
    n, change = 6 * DAY_STEPS, 3 * DAY_STEPS
    values = generate(n, seed=2, regime_change_at=change, time_scale=144, regime="current_recalibration")
    before, after = slice(0, change), slice(change + 50, n)
    current, temperature, vibration = values["m1/current"], values["m1/temperature"], values["m1/vibration"]
    assert current[after].mean() / current[before].mean() > 1.15
    # The true current is unchanged, so the winding temperature it drives is too.
    assert abs(temperature[after].mean() - temperature[before].mean()) < 1.0
    assert 0.9 < vibration[after].mean() / vibration[before].mean() < 1.1


def test_daily_cycle_is_in_the_load() -> None:
    current = generate(4 * DAY_STEPS, seed=4, time_scale=144)["m1/current"]

    def autocorr(lag: int) -> float:
        return float(np.corrcoef(current[:-lag], current[lag:])[0, 1])

    assert autocorr(DAY_STEPS) > 0.8  # same hour next day looks alike
    assert autocorr(DAY_STEPS // 2) < 0.0  # day shift against night


def test_temperature_lags_current() -> None:
    values = generate(4 * DAY_STEPS, seed=5, time_scale=144)

    def high_pass(x: np.ndarray, width: int = 61) -> np.ndarray:
        return (x - np.convolve(x, np.ones(width) / width, mode="same"))[width:-width]

    temp, current = high_pass(values["m1/temperature"]), high_pass(values["m1/current"])
    corr = [np.corrcoef(current[: len(current) - lag], temp[lag:])[0, 1] for lag in range(4)]
    # A first-order thermal lag: temperature follows current with a delay, not at once.
    assert int(np.argmax(corr)) >= 1
    assert max(corr) > 0.4


def test_spikes_are_short_labelled_and_large() -> None:
    data = generate_labeled(4 * DAY_STEPS, seed=6, time_scale=144)
    vibration, spikes = data.values["m1/vibration"], data.anomalies["m1/vibration"]
    assert 0 < spikes.sum() < 0.02 * len(spikes)
    calm = np.median(vibration[~spikes])
    assert np.median(vibration[spikes]) > calm + 2.5
    assert sum(a.sum() for a in data.anomalies.values()) > spikes.sum()  # other channels get them too


def test_to_csv_writes_the_wide_format(tmp_path: Path) -> None:
    path = to_csv(tmp_path / "motor.csv", 120, period_s=2.0, start_ts=1_700_000_000.0, seed=9, time_scale=60)
    lines = path.read_text().splitlines()
    assert lines[0] == "ts,m1/temperature,m1/vibration,m1/current"
    assert len(lines) == 121
    assert lines[1].startswith("1700000000.0,") and lines[2].startswith("1700000002.0,")
    ts, values = read_csv(path)
    np.testing.assert_array_equal(ts, timestamps(120, 2.0, 1_700_000_000.0))
    expected = generate(120, 2.0, 1_700_000_000.0, 9, None, 60)
    for channel in CHANNELS:
        np.testing.assert_array_equal(values[channel], expected[channel])


def test_default_start_never_puts_a_reading_in_the_future() -> None:
    now = 1_800_000_000.0
    for speedup in (0.5, 1.0, 60.0, 1e6):
        start = default_start_ts(1000, 1.0, speedup, now=now)
        for k in (0, 500, 999):
            sent_at = now + k * 1.0 / speedup
            assert start + k * 1.0 <= sent_at + 1e-6
    assert default_start_ts(1000, 1.0, 1e6, now=now) == pytest.approx(now - 1000, abs=0.01)


# ---------------------------------------------------------------- publisher


class Subscriber:
    """A plain paho client on `sensors/#` that records (arrival, topic, payload)."""

    MARKER_TOPIC = "test/marker"

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[float, str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._marker = b""
        self._marker_back = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("sensors/#", 1), (self.MARKER_TOPIC, 1)])
        self.client.loop_start()
        assert self._subscribed.wait(HANG_S), "subscription not acknowledged"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.MARKER_TOPIC:
            if msg.payload == self._marker:
                self._marker_back.set()
            return
        with self._lock:
            self.messages.append((time.time(), msg.topic, bytes(msg.payload)))

    def wait_for(self, count: int, timeout: float = HANG_S) -> list[tuple[float, str, bytes]]:
        """Every message received, once `count` have arrived and any more would have too.

        Call once the broker has acknowledged all the publisher's messages: a marker this
        client publishes after that is queued behind every one of them, so a message beyond
        `count` (a bug) arrives before the marker comes back.
        """
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {count} messages (have {len(self.messages)})")
            time.sleep(0.02)
        self._marker = uuid.uuid4().hex.encode()
        self._marker_back.clear()
        self.client.publish(self.MARKER_TOPIC, self._marker, qos=1)
        assert self._marker_back.wait(timeout), f"the marker published after {count} messages did not come back"
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker: LocalBroker) -> Iterator[Subscriber]:
    sub = Subscriber(broker.port)
    try:
        yield sub
    finally:
        sub.close()


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite constant {name}")


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def strict_readings(topic: str, payload: bytes) -> list[tuple[str, float | None, float]] | None:
    """Readings in a message read strictly by the contract, or None if it is malformed."""
    if len(payload) > MAX_PAYLOAD:
        return None
    try:
        obj = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    parts = topic.split("/")
    if parts[0] != "sensors":
        return None
    if len(parts) == 3:
        channel = f"{parts[1]}/{parts[2]}"
        if channel not in CHANNELS:
            return None
        if _number(obj):
            return [(channel, None, float(obj))]
        if isinstance(obj, dict) and set(obj) == {"ts", "value"} and _number(obj["ts"]) and _number(obj["value"]):
            return [(channel, float(obj["ts"]), float(obj["value"]))]
        return None
    if len(parts) == 2 and isinstance(obj, dict) and set(obj) == {"ts", "values"}:
        values = obj["values"]
        if not _number(obj["ts"]) or not isinstance(values, dict) or not values:
            return None
        readings = [(f"{parts[1]}/{name}", float(obj["ts"]), v) for name, v in values.items()]
        if all(ch in CHANNELS and _number(v) for ch, _, v in readings):
            return [(ch, ts, float(v)) for ch, ts, v in readings]
    return None


def test_every_malformed_kind_breaks_the_contract() -> None:
    rng = np.random.default_rng(0)
    ts = time.time()
    for kind in MALFORMED_KINDS:
        message = malformed_message(kind, ts, rng)
        readings = strict_readings(message.topic, message.payload)
        # Shape-valid ones (bad timestamps) must at least fail the daemon's time window.
        if readings is not None:
            assert kind in ("ancient_ts", "future_ts"), kind
            ((_, reading_ts, _),) = readings
            assert reading_ts is not None
            assert reading_ts < ts - 7 * 86400 if kind == "ancient_ts" else reading_ts > ts + 300
    assert len(malformed_message("oversize", ts, rng).payload) > MAX_PAYLOAD
    assert len(malformed_message("deep_nesting", ts, rng).payload) < MAX_PAYLOAD  # reaches the parser


def test_publisher_payloads_follow_the_contract_and_match_generate(
    broker: LocalBroker, subscriber: Subscriber, tmp_path: Path
) -> None:
    steps, seed, change = 300, 11, 150
    start_ts = round(time.time() - 3600.0, 3)
    summary_path = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "sample_sensors.publish",
            "--port", str(broker.port), "--steps", str(steps), "--speedup", "1000000",
            "--form", "mixed", "--malformed", "0.1", "--seed", str(seed), "--start-ts", str(start_ts),
            "--regime-change-at", str(change), "--time-scale", "144", "--summary-json", str(summary_path),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=2 * HANG_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(summary_path.read_text())
    assert "malformed sent" in proc.stdout
    assert summary["readings_sent"] == steps * len(CHANNELS)
    assert summary["all_acknowledged"] and summary["steps"] == steps
    assert summary["messages_sent"] == summary["valid_messages_sent"] + summary["malformed_sent"]
    assert set(summary["malformed_by_kind"]) == set(MALFORMED_KINDS)  # every kind at least once
    share = summary["malformed_sent"] / summary["messages_sent"]
    assert 0.09 < share < 0.11

    received = subscriber.wait_for(summary["messages_sent"])
    assert len(received) == summary["messages_sent"]

    ts = timestamps(steps, 1.0, start_ts)
    expected = generate(steps, 1.0, start_ts, seed, change, 144)
    expected_at = {(ch, float(ts[k])): float(expected[ch][k]) for ch in CHANNELS for k in range(steps)}
    seen: Counter[tuple[str, float]] = Counter()
    topics_used: Counter[str] = Counter()
    malformed = 0
    for _, topic, payload in received:
        readings = strict_readings(topic, payload)
        if readings is None or any(
            reading_ts is None or expected_at.get((ch, reading_ts)) != value for ch, reading_ts, value in readings
        ):
            malformed += 1
            continue
        topics_used[topic] += 1
        for ch, reading_ts, _ in readings:
            seen[(ch, reading_ts)] += 1  # type: ignore[index]
    assert malformed == summary["malformed_sent"]
    # Every generated reading arrived exactly once, with its exact value and timestamp.
    assert set(seen) == set(expected_at) and set(seen.values()) == {1}
    # Mixed form: both the per-channel and the per-sensor topic carried readings.
    assert topics_used["sensors/m1"] > 0 and topics_used["sensors/m1/vibration"] > 0


def test_bare_form_sends_numbers_in_order(broker: LocalBroker, subscriber: Subscriber) -> None:
    steps = 40
    summary = publish(port=broker.port, steps=steps, speedup=1e6, form="bare", seed=2, start_ts=1_704_067_200.0)
    assert summary["all_acknowledged"]
    received = subscriber.wait_for(summary["messages_sent"])
    assert summary["malformed_sent"] == 0 and len(received) == steps * len(CHANNELS)
    expected = generate(steps, 1.0, 1_704_067_200.0, 2)
    for channel in CHANNELS:
        numbers = [json.loads(p) for _, t, p in received if t == f"sensors/{channel}"]
        assert numbers == expected[channel].tolist()  # QoS 1 from one client keeps per-topic order


def test_publish_paces_at_the_speedup_and_ends_at_the_present(broker: LocalBroker, subscriber: Subscriber) -> None:
    steps, speedup = 41, 20.0  # 40 periods of 1 s at 20x: at least 2 s of wall time
    sent_at: list[float] = []
    wall_before = time.time()
    started = time.monotonic()
    summary = publish(
        port=broker.port, steps=steps, speedup=speedup, form="values", seed=3,
        progress=lambda _step, _steps: sent_at.append(time.monotonic()),
    )  # fmt: skip
    assert summary["all_acknowledged"] and summary["readings_sent"] == steps * 3
    # Never ahead of the timeline: step k goes out no sooner than k periods / speedup after the
    # start. A late step goes out at once; how late depends on the machine and is not checked.
    assert len(sent_at) == steps
    early = [(k, round(at - started, 3)) for k, at in enumerate(sent_at) if at - started < k * 1.0 / speedup - 1e-3]
    assert not early, early
    received = subscriber.wait_for(steps)
    assert len(received) == steps
    arrivals = [at for at, _, _ in received]
    # With the default start the replay is a backfill that catches up with the clock: no reading is
    # stamped ahead of its arrival, and the last one is stamped within the replay's own wall time.
    stamps = [json.loads(p)["ts"] for _, _, p in received]
    assert all(ts <= at + 0.05 for ts, at in zip(stamps, arrivals, strict=True))
    assert stamps[-1] >= wall_before
    assert stamps[-1] - stamps[0] == pytest.approx(40.0)


def test_publish_stops_early_on_request(broker: LocalBroker) -> None:
    stop = threading.Event()

    def progress(step: int, _total: int) -> None:
        if step == 10:
            stop.set()

    summary = publish(port=broker.port, steps=500, speedup=1e6, stop=stop, progress=progress)
    assert summary["stopped_early"] and summary["steps"] == 10
    assert summary["readings_sent"] == 30 and summary["all_acknowledged"]


def test_publish_reports_an_unreachable_broker() -> None:
    from edge_daemon.broker import free_port

    with pytest.raises(ConnectionError):
        publish(port=free_port(), steps=5, connect_timeout_s=2.0)


def test_daemon_parser_rejects_exactly_the_malformed_share(broker: LocalBroker, subscriber: Subscriber) -> None:
    from edge_daemon.errors import PayloadError
    from edge_daemon.mqtt.payload import PayloadLimits, parse_payload

    steps, seed = 200, 13
    summary = publish(port=broker.port, steps=steps, speedup=1e6, form="mixed", malformed=0.2, seed=seed)
    assert summary["all_acknowledged"]
    received = subscriber.wait_for(summary["messages_sent"])
    assert len(received) == summary["messages_sent"]

    accepted: dict[tuple[str, float], float] = {}
    reasons: Counter[str] = Counter()
    for arrival, topic, payload in received:
        try:
            readings = parse_payload(topic, payload, arrival, set(CHANNELS), PayloadLimits())
        except PayloadError as exc:
            reasons[exc.reason] += 1
            continue
        for reading in readings:
            assert (reading.channel, reading.ts) not in accepted
            accepted[(reading.channel, reading.ts)] = reading.value

    assert sum(reasons.values()) == summary["malformed_sent"]
    by_kind = summary["malformed_by_kind"]
    # Kinds whose reason is unambiguous; the rest (shape, type, JSON errors) count in the total.
    assert reasons["too_large"] == by_kind["oversize"]
    assert reasons["too_deep"] == by_kind["deep_nesting"]
    assert reasons["too_old"] == by_kind["ancient_ts"]
    assert reasons["future"] == by_kind["future_ts"]
    assert reasons["unknown_channel"] == by_kind["unknown_channel"]
    assert reasons["non_finite"] == by_kind["nan"] + by_kind["infinity"] + by_kind["bare_nan"]
    # Everything valid got through, unchanged.
    ts = timestamps(steps, 1.0, summary["start_ts"])
    expected = generate(steps, 1.0, summary["start_ts"], seed)
    assert accepted == {(ch, float(ts[k])): float(expected[ch][k]) for ch in CHANNELS for k in range(steps)}


# ---------------------------------------------------------------- other formats


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """Nested objects joined with dots, list items by index: the tasmota and shelly channel rule."""
    if isinstance(doc, dict):
        return {k: v for key, item in doc.items() for k, v in _flatten(item, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(doc, list):
        return {k: v for i, item in enumerate(doc) for k, v in _flatten(item, f"{prefix}.{i}").items()}
    return {prefix: doc}


def _channels_by_the_formats_rules(fmt: str, messages: list[Any]) -> dict[str, float]:
    """The numeric readings each message carries, named by the format's rule in the input contract."""
    found: dict[str, float] = {}
    for message in messages:
        levels = message.topic.split("/")
        if fmt == "zigbee2mqtt":
            assert levels[0] == "zigbee2mqtt"
            doc = json.loads(message.payload)
            assert set(doc) >= {"linkquality", "last_seen"}
            found.update({f"{'/'.join(levels[1:])}/{k}": v for k, v in doc.items() if type(v) in (int, float)})
        elif fmt == "tasmota":
            assert levels[0] == "tele" and levels[-1] == "SENSOR"
            doc = json.loads(message.payload)
            time.strptime(doc.pop("Time"), "%Y-%m-%dT%H:%M:%S")  # local time, no zone
            found.update({f"{levels[-2]}/{k}": v for k, v in _flatten(doc).items() if type(v) in (int, float)})
        elif fmt == "esphome":
            assert levels[1] == "sensor" and levels[3] == "state" and len(levels) == 4
            found[f"{levels[0]}/{levels[2]}"] = float(message.payload)
        elif fmt == "shelly":
            assert levels[1] == "status" and len(levels) == 3
            doc = json.loads(message.payload)
            found.update({f"{levels[0]}/{levels[2]}.{k}": v for k, v in _flatten(doc).items() if type(v) in (int, float)})
    return found


@pytest.mark.parametrize("fmt", ["zigbee2mqtt", "tasmota", "esphome", "shelly"])
def test_each_format_carries_every_motor_reading_under_the_channel_its_config_names(fmt: str) -> None:
    from sample_sensors.publish import format_channels, format_messages

    readings = {"m1/temperature": 21.5, "m1/vibration": 0.82, "m1/current": 7.9}
    messages = format_messages(fmt, 1_717_171_717.5, readings, timezone="Europe/Berlin")
    assert sum(m.readings for m in messages) == 3
    carried = _channels_by_the_formats_rules(fmt, messages)
    for motor_channel, name in zip(CHANNELS, format_channels(fmt), strict=True):
        assert carried[name] == readings[motor_channel], (name, carried)


def test_format_timestamps_are_as_the_projects_send_them() -> None:
    from sample_sensors.publish import format_messages

    readings = {"m1/temperature": 21.5, "m1/vibration": 0.82, "m1/current": 7.9}
    (z2m,) = format_messages("zigbee2mqtt", 1_717_171_717.5, readings)
    assert json.loads(z2m.payload)["last_seen"] == "2024-05-31T16:08:37.500Z"
    (tasmota,) = format_messages("tasmota", 1_717_171_717.5, readings, timezone="Europe/Berlin")
    assert json.loads(tasmota.payload)["Time"] == "2024-05-31T18:08:37"  # Berlin summer time, no zone
    assert [m.payload for m in format_messages("esphome", 1_717_171_717.5, readings)] == [b"21.5", b"0.82", b"7.9"]


@pytest.mark.parametrize("fmt", ["native", "zigbee2mqtt", "tasmota", "esphome", "shelly"])
def test_printed_config_is_valid_toml_with_channel_names_the_contract_allows(fmt: str) -> None:
    import tomllib

    from sample_sensors.publish import format_channels, format_config

    config = tomllib.loads(format_config(fmt, timezone="Europe/Berlin"))
    assert config["channels"]["names"] == format_channels(fmt)
    for name in config["channels"]["names"]:
        assert "/" in name and all(name.split("/")) and not set(name) & {"+", "#"}, name
    if fmt == "native":
        assert "inputs" not in config
    else:
        (mapping,) = config["inputs"]
        assert mapping["format"] == fmt and mapping["topic"].endswith("#")
        assert mapping.get("timezone") == ("Europe/Berlin" if fmt == "tasmota" else None)
    result = subprocess.run(
        [sys.executable, "-m", "sample_sensors.publish", "--format", fmt, "--print-config", "--timezone", "Europe/Berlin"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    assert result.stdout == format_config(fmt, timezone="Europe/Berlin")


@pytest.mark.parametrize("fmt", ["zigbee2mqtt", "tasmota", "esphome", "shelly"])
def test_malformed_messages_of_a_format_carry_no_reading(fmt: str) -> None:
    from sample_sensors.publish import FORMAT_MALFORMED_KINDS, format_malformed

    rng = np.random.default_rng(0)
    for kind in FORMAT_MALFORMED_KINDS[fmt]:
        message = format_malformed(fmt, kind, 1_717_171_717.5, rng)
        assert message.kind == kind and message.readings == 0
        if kind == "bad_json":
            with pytest.raises(ValueError):
                json.loads(message.payload)
        elif fmt == "esphome":
            with pytest.raises(ValueError):
                float(message.payload)
        else:  # the temperature, a configured channel, as a string
            leaves = _flatten(json.loads(message.payload))
            assert isinstance(leaves.get("temperature", leaves.get("DS18B20.Temperature", leaves.get("tC"))), str), leaves
