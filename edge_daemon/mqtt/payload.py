"""The sensor payload grammar: the topic and JSON forms a reading may come in, the limits a
message must keep (size, nesting, time window), and the reasons a message is rejected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from math import isfinite
from typing import Any

from edge_daemon.config import Config
from edge_daemon.errors import PayloadError
from edge_daemon.store import Reading

# Every valid payload nests at most two levels ({"values": {...}}); anything deeper is rejected
# before json.loads can recurse through it.
MAX_JSON_DEPTH = 4

# Integers below this magnitude convert to a finite float without the OverflowError check.
_INT_LIMIT = 1 << 1000

REASONS = (
    "bad_topic", "too_large", "bad_utf8", "too_deep", "bad_json", "bad_shape",
    "bad_ts", "not_a_number", "non_finite", "unknown_channel", "too_old", "future",
    "unmapped_topic", "parse_error",
)  # fmt: skip


@dataclass(frozen=True)
class PayloadLimits:
    """What parse_payload accepts; built from the config by `from_config`."""

    max_payload_bytes: int = 16384
    max_age_s: float = 7 * 24 * 3600.0
    max_skew_s: float = 300.0

    @classmethod
    def from_config(cls, config: Config) -> PayloadLimits:
        return cls(config.mqtt.max_payload_bytes, config.store.max_age_s, config.store.max_skew_s)


def decode_json(payload: bytes, limits: PayloadLimits, max_depth: int | None = MAX_JSON_DEPTH) -> Any:
    """The JSON document of a payload, after the size, UTF-8 and nesting checks.

    `max_depth` None skips the nesting pre-check: json.loads still refuses what would exhaust
    the recursion limit ("too_deep"), and the caller bounds the depth it walks."""
    # The cap comes before any decoding, so a huge payload costs nothing.
    if len(payload) > limits.max_payload_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("bad_utf8") from None
    if max_depth is not None and _json_depth_exceeds(text, max_depth):
        raise PayloadError("too_deep")
    try:
        return json.loads(text)
    except RecursionError:
        raise PayloadError("too_deep") from None
    except ValueError as exc:
        raise PayloadError("bad_json", str(exc)[:80]) from None


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """True if brackets outside strings nest deeper than limit."""
    # Cheap pre-check: a payload with few brackets cannot nest deeply.
    if text.count("{") + text.count("[") <= limit:
        return False
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _number(value: Any, what: str) -> float:
    # Exact type checks first: the usual JSON number takes one comparison, and bool (an int
    # subclass: `true` is not a sensor reading) never matches `type(value) is int`.
    kind = type(value)
    if kind is float:
        if isfinite(value):
            return value  # type: ignore[no-any-return]
        raise PayloadError("non_finite", f"{what} is {value}")
    if kind is not int:
        raise PayloadError("not_a_number", f"{what} is {kind.__name__}")
    try:
        return float(value)
    except OverflowError:
        raise PayloadError("non_finite", f"{what} overflows a float") from None


# A reading stamped before this (2024-01-01 UTC) was not stamped by a working clock (a dead RTC
# sends 1970): it is rejected at once, never held for the device clock to be corrected.
HOLD_FLOOR_TS = 1_704_067_200.0
# Nor was one stamped after 2100-01-01 UTC, or more than a year ahead of a working device clock:
# no clock error explains it, so it is rejected as "future" at once, whatever the clock trust.
FUTURE_LIMIT_TS, MAX_AHEAD_S = 4_102_444_800.0, 365 * 86400.0


class _OutOfWindow(Exception):
    """A valid timestamp outside the window the device clock allows (internal to parse_payload)."""

    def __init__(self, error: PayloadError, ts: float) -> None:
        self.error = error
        self.ts = ts


def _timestamp(value: Any, now: float, limits: PayloadLimits) -> float:
    kind = type(value)
    if kind is not float and kind is not int:
        raise PayloadError("bad_ts", f"ts is {kind.__name__}")
    try:
        ts = float(value)
    except OverflowError:
        raise PayloadError("bad_ts", "ts overflows a float") from None
    if not isfinite(ts):
        raise PayloadError("bad_ts", f"ts is {ts}")
    if ts > FUTURE_LIMIT_TS or (now >= HOLD_FLOOR_TS and ts > now + MAX_AHEAD_S):
        raise PayloadError("future", f"ts {ts:.3f} is past 2100 or a year ahead")
    if ts < now - limits.max_age_s:
        raise _OutOfWindow(PayloadError("too_old", f"ts {ts:.3f} is {now - ts:.0f} s old"), ts)
    if ts > now + limits.max_skew_s:
        raise _OutOfWindow(PayloadError("future", f"ts {ts:.3f} is {ts - now:.0f} s ahead"), ts)
    return ts


def _channel(name: str, channels: set[str]) -> str:
    if name not in channels:
        raise PayloadError("unknown_channel", repr(name[:80]))
    return name


# A Reading built by tuple.__new__ directly skips the namedtuple's Python-level __new__, which
# is a measurable share of the per-reading cost in the ingest writer.
_new_tuple: Callable[[type[Reading], tuple[str, float, float]], Reading] = tuple.__new__  # type: ignore[assignment]


def parse_payload(
    topic: str,
    payload: bytes,
    now: float,
    channels: set[str],
    limits: PayloadLimits,
    skipped: list[PayloadError] | None = None,
    held: list[Reading] | None = None,
) -> list[Reading]:
    """The readings in one MQTT message, or PayloadError(reason) for a message with none.

    Forms (docs/contract.md): `sensors/<sensor>/<channel>` with `{"ts": t, "value": v}` or a bare
    number (ts = now, the arrival time); `sensors/<sensor>` with `{"ts": t, "values": {...}}`.
    In a `values` map each entry stands alone: bad entries are appended to `skipped` and the
    good ones returned; if no entry is good, the first entry's error is raised.

    A timestamp older than max_age_s or more than max_skew_s ahead of `now` is rejected
    ("too_old", "future"); given a `held` list, such readings (stamped after HOLD_FLOOR_TS) are
    appended to it instead, and the message returns none.
    """
    # The native form is the hot path: parsed directly, a closure made only for a held reading.
    try:
        return _parse(topic, payload, now, channels, limits, skipped)
    except _OutOfWindow as out:
        return _hold(out, lambda at, window: _parse(topic, payload, at, channels, window, skipped), limits, held)


def parse_holding(
    parse: Callable[[float, PayloadLimits], list[Reading]], now: float, limits: PayloadLimits, held: list[Reading] | None
) -> list[Reading]:
    """`parse(now, limits)`, with the hold rule of `parse_payload` for any payload form.

    `parse` must check a message's timestamp (raising through `timestamp`) before it appends to
    `skipped` or counts anything, so that the second parse, without the window, counts once."""
    try:
        return parse(now, limits)
    except _OutOfWindow as out:
        return _hold(out, parse, limits, held)


def _hold(
    out: _OutOfWindow, parse: Callable[[float, PayloadLimits], list[Reading]], limits: PayloadLimits, held: list[Reading] | None
) -> list[Reading]:
    if held is None or out.ts < HOLD_FLOOR_TS:
        raise out.error from None
    # Parsed again without the window, the value checks and `skipped` exactly as in range.
    held.extend(parse(out.ts, replace(limits, max_age_s=math.inf, max_skew_s=math.inf)))
    return []


def _parse(
    topic: str, payload: bytes, now: float, channels: set[str], limits: PayloadLimits, skipped: list[PayloadError] | None
) -> list[Reading]:
    levels = topic.split("/")
    if levels[0] != "sensors" or len(levels) not in (2, 3) or not all(levels):
        raise PayloadError("bad_topic", repr(topic[:120]))
    doc = decode_json(payload, limits)

    if len(levels) == 3:
        channel = _channel(f"{levels[1]}/{levels[2]}", channels)
        if type(doc) is dict:
            if len(doc) != 2 or "ts" not in doc or "value" not in doc:
                raise PayloadError("bad_shape", f"object keys {sorted(doc)[:5]} (want ts, value)")
            value = _number(doc["value"], "value")
            return [_new_tuple(Reading, (channel, _timestamp(doc["ts"], now, limits), value))]
        return [_new_tuple(Reading, (channel, now, _number(doc, "payload")))]

    values = doc.get("values") if type(doc) is dict and len(doc) == 2 and "ts" in doc else None
    if type(values) is not dict:
        raise PayloadError("bad_shape", "want {\"ts\": t, \"values\": {channel: number}}")
    ts = _timestamp(doc["ts"], now, limits)
    if not values:
        raise PayloadError("bad_shape", "empty values map")
    prefix = levels[1] + "/"
    readings: list[Reading] = []
    first_error: PayloadError | None = None
    for key, raw in values.items():
        # Configured names hold exactly one "/" and no wildcard, so a key with "/", "+" or "#"
        # (or an empty one) can never match: the set lookup alone rejects it.
        channel = prefix + key
        kind = type(raw)
        if channel in channels and (kind is float and isfinite(raw) or kind is int and -_INT_LIMIT < raw < _INT_LIMIT):
            readings.append(_new_tuple(Reading, (channel, ts, float(raw))))
            continue
        try:
            readings.append(_new_tuple(Reading, (_channel(channel, channels), ts, _number(raw, f"values[{key!r}]"))))
        except PayloadError as exc:
            if first_error is None:
                first_error = exc
            if skipped is not None:
                skipped.append(exc)
    if not readings:
        assert first_error is not None
        if skipped:
            skipped.pop(0)  # raised instead of skipped
        raise first_error
    return readings


# The shared checks, under the names the other payload forms (`edge_daemon.mqtt.formats`) use.
number = _number
timestamp = _timestamp
parse_native = _parse
