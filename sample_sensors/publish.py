"""Replay generated motor data over MQTT at a chosen speed-up.

Owns the sample publisher: the payload forms of the input contract (one
reading per message, a `values` object per sensor, bare numbers), the same
motor in the formats of other projects (zigbee2mqtt, Tasmota, ESPHome, Shelly)
with the daemon config each needs, pacing on the synthetic timeline, a share
of malformed messages of many kinds, and the summary of what was sent. Run it
as `python -m sample_sensors.publish`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sample_sensors.generate import CHANNELS, REGIMES, SENSOR, Regime, generate, timestamps

log = logging.getLogger(__name__)

FORMS: tuple[str, ...] = ("single", "values", "bare", "mixed")
# Every kind of bad input the daemon must reject without storing it or dying.
MALFORMED_KINDS: tuple[str, ...] = (
    "bad_json",  # truncated JSON text
    "empty",  # zero-length payload
    "not_object",  # a JSON array where an object or number belongs
    "nan",  # {"value": NaN} (Python's json module writes and reads it)
    "infinity",  # {"value": Infinity}
    "bare_nan",  # bare-number form carrying NaN
    "string_value",  # {"value": "21.5"}: a number in a string is still a string
    "boolean_value",  # {"value": true}: bool is an int subclass in Python, a classic leak
    "missing_value",  # {"ts": ...} and nothing else
    "bad_values",  # sensor form whose "values" is not an object
    "unknown_channel",  # well-formed reading on a channel nobody configured
    "ancient_ts",  # a dead RTC sends 1970
    "future_ts",  # a day ahead of the device clock
    "oversize",  # 64 KiB, far beyond any sane max_payload_bytes
    "deep_nesting",  # 5000 nested arrays, small enough to reach the JSON parser
)
# The payload formats: the daemon's own, and those of other projects read through `[[inputs]]`.
FORMATS: tuple[str, ...] = ("native", "zigbee2mqtt", "tasmota", "esphome", "shelly")
# Malformed kinds of the other formats: a truncated JSON text, a number sent as a string.
FORMAT_MALFORMED_KINDS: dict[str, tuple[str, ...]] = {
    "zigbee2mqtt": ("bad_json", "string_value"),
    "tasmota": ("bad_json", "string_value"),
    "esphome": ("string_value",),
    "shelly": ("bad_json", "string_value"),
}
# Formats whose readings the daemon stamps on arrival: true to the timeline only at speed-up 1.
ARRIVAL_STAMPED: tuple[str, ...] = ("esphome", "shelly")
UNKNOWN_CHANNEL = "pressure"
OVERSIZE_BYTES = 65_536
NESTING_DEPTH = 5_000


@dataclass(frozen=True)
class Message:
    """One MQTT publish: topic, payload and what it is (a form or a malformed kind)."""

    topic: str
    payload: bytes
    kind: str
    readings: int = 0  # valid readings this message carries


def _channel_part(channel: str) -> str:
    return channel.split("/", 1)[1]


def valid_messages(ts: float, readings: dict[str, float], form: str, prefix: str = "sensors") -> list[Message]:
    """The messages that carry one step's readings in payload form `form` (single, values or bare).

    single: `sensors/<sensor>/<channel>` with {"ts", "value"}; values: `sensors/<sensor>` with
    {"ts", "values": {"<channel>": v}} (channel part without the sensor); bare: the number alone
    on the per-channel topic, so the receiver stamps it with its arrival time.
    """
    if form == "values":
        by_sensor: dict[str, dict[str, float]] = {}
        for channel, value in readings.items():
            sensor = channel.split("/", 1)[0]
            by_sensor.setdefault(sensor, {})[_channel_part(channel)] = value
        return [
            Message(f"{prefix}/{sensor}", json.dumps({"ts": ts, "values": vals}).encode(), "values", len(vals))
            for sensor, vals in by_sensor.items()
        ]
    if form == "single":
        return [
            Message(f"{prefix}/{ch}", json.dumps({"ts": ts, "value": v}).encode(), "single", 1)
            for ch, v in readings.items()
        ]
    if form == "bare":
        return [Message(f"{prefix}/{ch}", json.dumps(v).encode(), "bare", 1) for ch, v in readings.items()]
    raise ValueError(f"form must be one of single, values, bare, got {form!r}")


# Per format, where each motor channel's value goes: the daemon's channel name for it follows the
# format's rule (a device name, then the field path).
_FIELDS: dict[str, dict[str, str]] = {
    "native": {ch: _channel_part(ch) for ch in CHANNELS},
    # zigbee2mqtt: flat fields of the device's message.
    "zigbee2mqtt": {"m1/temperature": "temperature", "m1/vibration": "vibration", "m1/current": "current"},
    # Tasmota: a DS18B20 probe, the ADC input (the vibration transmitter's 0-10 V scaled) and the energy monitor.
    "tasmota": {"m1/temperature": "DS18B20.Temperature", "m1/vibration": "ANALOG.Range1", "m1/current": "ENERGY.Current"},
    # ESPHome: one sensor entity each.
    "esphome": {"m1/temperature": "temperature", "m1/vibration": "vibration", "m1/current": "current"},
    # Shelly Gen2: a Plus Add-on's temperature probe and voltmeter, the switch's power meter.
    "shelly": {"m1/temperature": "temperature:100.tC", "m1/vibration": "voltmeter:100.voltage", "m1/current": "switch:0.current"},
}
_INPUT_TOPICS = {"zigbee2mqtt": "zigbee2mqtt/#", "tasmota": "tele/#", "esphome": "{device}/#", "shelly": "{device}/#"}


def format_channels(fmt: str, device: str = SENSOR) -> list[str]:
    """The daemon's channel names for the motor's channels (in CHANNELS order) when sent in `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return [f"{device}/{_FIELDS[fmt][ch]}" for ch in CHANNELS]


def format_config(fmt: str, device: str = SENSOR, timezone: str = "UTC") -> str:
    """The `[channels]` and `[[inputs]]` config the daemon needs to read the motor in `fmt`."""
    names = ", ".join(json.dumps(name) for name in format_channels(fmt, device))
    lines = []
    if fmt != "native":
        lines += ["[[inputs]]", f'topic = "{_INPUT_TOPICS[fmt].format(device=device)}"', f'format = "{fmt}"']
        if fmt == "tasmota":
            lines.append(f'timezone = "{timezone}"')
        lines.append("")
    lines += ["[channels]", f"names = [{names}]"]
    return "\n".join(lines) + "\n"


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def format_messages(fmt: str, ts: float, readings: dict[str, float], device: str = SENSOR, timezone: str = "UTC") -> list[Message]:
    """The messages that carry one step's readings (keyed by the motor's channels) as `fmt` sends them.

    zigbee2mqtt: `zigbee2mqtt/<device>` with the flat fields, `linkquality` and `last_seen` (ISO
    8601, UTC); tasmota: `tele/<device>/SENSOR` with `Time` (local time in `timezone`, no zone)
    and sensor objects; esphome: `<device>/sensor/<name>/state`, the number alone; shelly:
    `<device>/status/<component>:<n>`, the component's status object. "native" is the `values` form.
    """
    if fmt == "native":
        return valid_messages(ts, readings, "values")
    temperature, vibration, current = (readings[ch] for ch in CHANNELS)
    if fmt == "zigbee2mqtt":
        last_seen = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body = {"temperature": temperature, "vibration": vibration, "current": current, "linkquality": 132, "last_seen": last_seen}
        return [Message(f"zigbee2mqtt/{device}", _compact(body), fmt, 3)]
    if fmt == "tasmota":
        local = datetime.fromtimestamp(ts, ZoneInfo(timezone)).replace(tzinfo=None).isoformat(timespec="seconds")
        body = {
            "Time": local,
            "DS18B20": {"Id": "0000053C0D1E", "Temperature": temperature},
            "ANALOG": {"Range1": vibration},
            "ENERGY": {"Power": round(current * 230.0 * 0.86), "ApparentPower": round(current * 230.0), "Voltage": 230, "Current": current},
            "TempUnit": "C",
        }
        return [Message(f"tele/{device}/SENSOR", _compact(body), fmt, 3)]
    if fmt == "esphome":
        return [
            Message(f"{device}/sensor/{name}/state", f"{value:g}".encode(), fmt, 1)
            for name, value in (("temperature", temperature), ("vibration", vibration), ("current", current))
        ]
    if fmt == "shelly":
        fahrenheit = round(temperature * 9 / 5 + 32, 1)
        switch = {
            "id": 0, "source": "init", "output": True, "apower": round(current * 230.0 * 0.86, 1), "voltage": 230.0,
            "current": current, "temperature": {"tC": 41.2, "tF": 106.2},
        }  # fmt: skip
        return [
            Message(f"{device}/status/temperature:100", _compact({"id": 100, "tC": temperature, "tF": fahrenheit}), fmt, 1),
            Message(f"{device}/status/voltmeter:100", _compact({"id": 100, "voltage": vibration}), fmt, 1),
            Message(f"{device}/status/switch:0", _compact(switch), fmt, 1),
        ]
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def format_malformed(fmt: str, kind: str, ts: float, rng: np.random.Generator, device: str = SENSOR, timezone: str = "UTC") -> Message:
    """One malformed message of `fmt` (kind from FORMAT_MALFORMED_KINDS) that the daemon must reject."""
    if kind not in FORMAT_MALFORMED_KINDS.get(fmt, ()):
        raise ValueError(f"{fmt} has no malformed kind {kind!r} (it has {', '.join(FORMAT_MALFORMED_KINDS.get(fmt, ()))})")
    value = round(float(rng.uniform(1.0, 50.0)), 2)
    good = format_messages(fmt, ts, {ch: value for ch in CHANNELS}, device, timezone)[0]
    if kind == "bad_json":
        return Message(good.topic, good.payload[:-1], kind, 0)  # closing brace missing
    # string_value: the temperature as text, which is not a number.
    if fmt == "esphome":
        return Message(good.topic, b"unknown", kind, 0)
    doc = json.loads(good.payload)
    if fmt == "zigbee2mqtt":
        doc = {"temperature": str(value), "last_seen": doc["last_seen"]}
    elif fmt == "tasmota":
        doc = {"Time": doc["Time"], "DS18B20": {"Id": "0000053C0D1E", "Temperature": str(value)}, "TempUnit": "C"}
    else:
        doc = {"id": 100, "tC": str(value)}
    return Message(good.topic, _compact(doc), kind, 0)


def malformed_message(kind: str, ts: float, rng: np.random.Generator, prefix: str = "sensors") -> Message:
    """One message of malformed kind `kind`, near step timestamp `ts`, that a daemon must reject."""
    channel = CHANNELS[int(rng.integers(len(CHANNELS)))]
    topic = f"{prefix}/{channel}"
    value = round(float(rng.uniform(1.0, 50.0)), 2)
    body: Any
    if kind == "bad_json":
        payload = f'{{"ts": {ts}, "value": {value}'.encode()  # closing brace missing
    elif kind == "empty":
        payload = b""
    elif kind == "not_object":
        payload = json.dumps([ts, value]).encode()
    elif kind == "nan":
        payload = json.dumps({"ts": ts, "value": math.nan}).encode()
    elif kind == "infinity":
        payload = json.dumps({"ts": ts, "value": -math.inf if rng.random() < 0.5 else math.inf}).encode()
    elif kind == "bare_nan":
        payload = b"NaN"
    elif kind == "string_value":
        payload = json.dumps({"ts": ts, "value": str(value)}).encode()
    elif kind == "boolean_value":
        payload = json.dumps({"ts": ts, "value": True}).encode()
    elif kind == "missing_value":
        payload = json.dumps({"ts": ts}).encode()
    elif kind == "bad_values":
        topic = f"{prefix}/{SENSOR}"
        payload = json.dumps({"ts": ts, "values": [value, value]}).encode()
    elif kind == "unknown_channel":
        topic = f"{prefix}/{SENSOR}/{UNKNOWN_CHANNEL}"
        payload = json.dumps({"ts": ts, "value": value}).encode()
    elif kind == "ancient_ts":
        payload = json.dumps({"ts": round(float(rng.uniform(0.0, 30 * 86_400.0)), 3), "value": value}).encode()
    elif kind == "future_ts":
        # Ahead of the device clock (wall time), whatever timeline the replay uses.
        payload = json.dumps({"ts": round(time.time() + 86_400.0, 3), "value": value}).encode()
    elif kind == "oversize":
        body = {"ts": ts, "value": value, "note": "x" * OVERSIZE_BYTES}
        payload = json.dumps(body).encode()
    elif kind == "deep_nesting":
        payload = (f'{{"ts": {ts}, "value": ' + "[" * NESTING_DEPTH + "1" + "]" * NESTING_DEPTH + "}").encode()
    else:
        raise ValueError(f"kind must be one of {', '.join(MALFORMED_KINDS)}, got {kind!r}")
    return Message(topic, payload, kind, 0)


def default_start_ts(n_steps: int, period_s: float, speedup: float, now: float | None = None) -> float:
    """A start time that keeps every reading's ts at or before the wall clock when it is sent.

    At speed-up S > 1 the timeline runs S times faster than the clock, so the replay starts
    n_steps * period_s * (1 - 1/S) in the past and its last step lands at the present: the
    whole run is a recent backfill, never a reading from the future.
    """
    now = time.time() if now is None else now
    return now - n_steps * period_s * max(0.0, 1.0 - 1.0 / speedup)


def _schedule_malformed(n_valid_messages_so_far: int, share: float) -> int:
    """How many malformed messages are due once this many valid ones went out."""
    # share is of all messages: malformed / (valid + malformed) = share.
    return int(math.floor(n_valid_messages_so_far * share / (1.0 - share) + 1e-9))


def publish(
    host: str = "127.0.0.1",
    port: int = 1883,
    *,
    steps: int = 3600,
    period_s: float = 1.0,
    speedup: float = 60.0,
    start_ts: float | None = None,
    seed: int = 0,
    regime_change_at: int | None = None,
    regime: Regime = "bearing_wear",
    time_scale: float = 1.0,
    malformed: float = 0.0,
    form: str = "single",
    fmt: str = "native",
    timezone: str = "UTC",
    qos: int = 1,
    prefix: str = "sensors",
    client_id: str = "",
    connect_timeout_s: float = 10.0,
    ack_timeout_s: float = 30.0,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay `steps` generated steps to the broker; return the summary of what was sent.

    Step k carries ts = start_ts + k * period_s and goes out at wall time t0 + k * period_s / speedup.
    `malformed` is the share of all messages that are malformed (kinds cycle in a seeded order so
    every kind appears). With qos 1, returns only after the broker acknowledged every publish
    (or `ack_timeout_s` passed: see `all_acknowledged`). `stop` ends the replay early;
    `progress(step, steps)` is called after each step. `fmt` other than "native" sends the motor
    as that project does (`format_messages`; `form` and `prefix` then do not apply) with its own
    malformed kinds; `timezone` is the zone of Tasmota's local `Time`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if not 0.0 <= malformed < 1.0:
        raise ValueError(f"malformed must be in [0, 1), got {malformed}")
    if speedup <= 0 or period_s <= 0 or steps < 1:
        raise ValueError("speedup and period_s must be > 0 and steps >= 1")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")
    if start_ts is None:
        # Whole milliseconds, so the summary's start_ts regenerates exactly the same timeline.
        start_ts = round(default_start_ts(steps, period_s, speedup), 3)

    values = generate(steps, period_s, start_ts, seed, regime_change_at, time_scale, regime=regime)
    ts = timestamps(steps, period_s, start_ts)
    # The publisher's own choices (forms, malformed kinds) use a separate stream so they never
    # change the data that generate() returns for the same seed.
    rng = np.random.default_rng([seed, 1])
    # Bare numbers are stamped on arrival, which matches the timeline only in real time.
    mixed_forms = ["single", "values"] + (["bare"] if speedup <= 1.0 else [])
    kinds = MALFORMED_KINDS if fmt == "native" else FORMAT_MALFORMED_KINDS[fmt]
    kind_cycle = list(kinds)

    client = _connect(host, port, client_id, connect_timeout_s)
    sent_by_kind: Counter[str] = Counter()
    readings_sent = 0
    valid_messages_sent = 0
    pending: deque[mqtt.MQTTMessageInfo] = deque()
    step = -1
    t0 = time.monotonic()
    try:
        for step in range(steps):
            if stop is not None and stop.is_set():
                step -= 1
                break
            # Pace on the synthetic timeline; a late step goes out at once rather than being skipped.
            delay = t0 + step * period_s / speedup - time.monotonic()
            if delay > 0 and (stop.wait(delay) if stop is not None else _sleep(delay)):
                step -= 1
                break
            step_form = mixed_forms[int(rng.integers(len(mixed_forms)))] if form == "mixed" else form
            readings = {ch: float(values[ch][step]) for ch in CHANNELS}
            if fmt == "native":
                batch = valid_messages(float(ts[step]), readings, step_form, prefix)
            else:
                batch = format_messages(fmt, float(ts[step]), readings, timezone=timezone)
            valid_messages_sent += len(batch)
            readings_sent += sum(m.readings for m in batch)
            for _ in range(_schedule_malformed(valid_messages_sent, malformed) - sum(sent_by_kind.values())):
                if not kind_cycle:
                    kind_cycle = list(kinds)
                kind = kind_cycle.pop(int(rng.integers(len(kind_cycle))))
                if fmt == "native":
                    batch.append(malformed_message(kind, float(ts[step]), rng, prefix))
                else:
                    batch.append(format_malformed(fmt, kind, float(ts[step]), rng, timezone=timezone))
                sent_by_kind[kind] += 1
            for message in batch:
                pending.append(client.publish(message.topic, message.payload, qos=qos))
            # Forget acknowledged publishes so a long replay holds only the in-flight ones.
            while pending and pending[0].is_published():
                pending.popleft()
            if step == regime_change_at:
                log.info("regime change (%s) at step %d, ts %.3f", regime, step, ts[step])
            if progress is not None:
                progress(step + 1, steps)
        unacknowledged = _wait_acknowledged(pending, ack_timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    duration = time.monotonic() - t0
    steps_done = step + 1
    summary: dict[str, Any] = {
        "host": host,
        "port": port,
        "form": form,
        "format": fmt,
        "qos": qos,
        "seed": seed,
        "steps": steps_done,
        "steps_planned": steps,
        "period_s": period_s,
        "speedup": speedup,
        "time_scale": time_scale,
        "start_ts": float(ts[0]),
        "end_ts": float(ts[steps_done - 1]) if steps_done else None,
        "regime": regime,
        "regime_change_at": regime_change_at,
        "regime_change_ts": (
            float(ts[regime_change_at]) if regime_change_at is not None and regime_change_at < steps else None
        ),
        "readings_sent": readings_sent,
        "valid_messages_sent": valid_messages_sent,
        "malformed_sent": sum(sent_by_kind.values()),
        "malformed_by_kind": dict(sorted(sent_by_kind.items())),
        "messages_sent": valid_messages_sent + sum(sent_by_kind.values()),
        "unacknowledged": unacknowledged,
        "all_acknowledged": unacknowledged == 0,
        "stopped_early": steps_done < steps,
        "duration_s": round(duration, 3),
    }
    log.info(
        "sent %d readings in %d steps, %d malformed, in %.1f s",
        readings_sent,
        steps_done,
        summary["malformed_sent"],
        duration,
    )
    return summary


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def _connect(host: str, port: int, client_id: str, timeout_s: float) -> mqtt.Client:
    """A connected paho client with its network loop running, or ConnectionError."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    # Matches the test broker's window; paho queues the rest itself.
    client.max_inflight_messages_set(100)
    connected = threading.Event()
    failure: list[str] = []

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        if reason_code.is_failure:
            failure.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise ConnectionError(f"cannot reach MQTT broker at {host}:{port}: {exc}") from exc
    client.loop_start()
    if not connected.wait(timeout_s) or failure:
        client.loop_stop()
        reason = failure[0] if failure else f"no CONNACK within {timeout_s} s"
        raise ConnectionError(f"MQTT broker at {host}:{port} refused the connection: {reason}")
    return client


def _wait_acknowledged(pending: deque[mqtt.MQTTMessageInfo], timeout_s: float) -> int:
    """Wait for every pending publish to complete; return how many did not within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while pending:
        info = pending[0]
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            break
        pending.popleft()
    if pending:
        log.warning("%d publishes not acknowledged within %.0f s", len(pending), timeout_s)
    return len(pending)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few human-readable lines."""
    kinds = ", ".join(f"{k} {n}" for k, n in summary["malformed_by_kind"].items()) or "none"
    lines = [
        f"sent {summary['readings_sent']} valid readings in {summary['valid_messages_sent']} messages "
        f"({summary['steps']} steps, form {summary['form']}, qos {summary['qos']}) in {summary['duration_s']:.1f} s",
        f"malformed sent: {summary['malformed_sent']} ({kinds})",
        f"timeline: ts {summary['start_ts']:.3f} .. {summary['end_ts'] or summary['start_ts']:.3f}, "
        f"period {summary['period_s']} s, "
        f"speed-up {summary['speedup']}",
    ]
    if summary["regime_change_ts"] is not None:
        lines.append(
            f"regime change ({summary['regime']}) at step {summary['regime_change_at']}, "
            f"ts {summary['regime_change_ts']:.3f}"
        )
    if not summary["all_acknowledged"]:
        lines.append(f"WARNING: {summary['unacknowledged']} publishes were not acknowledged by the broker")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sample_sensors.publish",
        description="Replay synthetic motor sensor data over MQTT.",
        epilog="example: python -m sample_sensors.publish --port 1883 --speedup 60 --steps 3600 "
        "--regime-change-at 2400 --malformed 0.05 --form mixed",
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    parser.add_argument("--speedup", type=float, default=60.0, help="timeline seconds per wall second (default 60)")
    parser.add_argument("--steps", type=int, default=3600, help="steps to replay (default 3600)")
    parser.add_argument("--period", type=float, default=1.0, help="seconds between steps on the timeline (default 1)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="motor seconds per timeline second (default 1)")
    parser.add_argument("--regime-change-at", type=int, default=None, help="step at which the regime changes")
    parser.add_argument("--regime", choices=REGIMES, default="bearing_wear", help="kind of regime change")
    parser.add_argument("--malformed", type=float, default=0.0, help="share of messages that are malformed (0..1)")
    parser.add_argument("--form", choices=FORMS, default="single", help="native payload form (default single)")
    parser.add_argument("--format", choices=FORMATS, default="native", dest="fmt",
                        help="payload format: the daemon's own (default) or that of zigbee2mqtt, Tasmota, ESPHome or Shelly")  # fmt: skip
    parser.add_argument("--timezone", default="UTC", help="zone of Tasmota's local Time (default UTC)")
    parser.add_argument("--print-config", action="store_true", help="print the [channels] and [[inputs]] config the daemon needs for --format, and exit")
    parser.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="publish QoS (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of data and malformed choices")
    parser.add_argument("--start-ts", type=float, default=None, help="ts of step 0 (default: replay ends now)")
    parser.add_argument("--prefix", default="sensors", help="topic prefix (default sensors)")
    parser.add_argument("--client-id", default="", help="MQTT client id (default: broker-assigned)")
    parser.add_argument("--summary-json", type=Path, default=None, help="also write the summary as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.print_config:
        print(format_config(args.fmt, timezone=args.timezone), end="")
        return 0
    if args.fmt in ARRIVAL_STAMPED and args.speedup > 1.0:
        log.warning("%s readings are stamped on arrival: the timeline holds only at --speedup 1", args.fmt)
    # SIGINT/SIGTERM end the replay at a step boundary, so the summary of what went out is still written.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        summary = publish(
            args.host,
            args.port,
            steps=args.steps,
            period_s=args.period,
            speedup=args.speedup,
            start_ts=args.start_ts,
            seed=args.seed,
            regime_change_at=args.regime_change_at,
            regime=args.regime,
            time_scale=args.time_scale,
            malformed=args.malformed,
            form=args.form,
            fmt=args.fmt,
            timezone=args.timezone,
            qos=args.qos,
            prefix=args.prefix,
            client_id=args.client_id,
            stop=stop,
        )
    except (ConnectionError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(format_summary(summary))
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["all_acknowledged"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
