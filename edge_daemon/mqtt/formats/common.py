"""What the input formats share: the outcome of a message beyond its readings, turning one
field's JSON value into a reading, flattening nested JSON, and reading their timestamps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Protocol

from edge_daemon.config import InputConfig
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.payload import PayloadLimits, decode_json, number, timestamp
from edge_daemon.store import Reading

# Other projects nest deeper than the native grammar (Shelly's NotifyStatus: params, component,
# aenergy, by_minute), but no sensor payload needs more than this.
MAX_DEPTH = 8
# The text states switches and binary sensors publish (Tasmota's POWER, ESPHome's binary_sensor).
ON_OFF = {"ON": 1.0, "OFF": 0.0}


@dataclass
class Outcome:
    """What one message yielded besides its readings: entries rejected alone, and fields or
    whole messages ignored (not configured channels, or topics that carry no readings)."""

    skipped: list[PayloadError] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    def ignore(self, reason: str, count: int = 1) -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + count


class Format(Protocol):
    """One payload form; `parse` raises PayloadError for a message rejected whole."""

    def __init__(self, mapping: InputConfig, channels: set[str]) -> None: ...

    def parse(self, levels: list[str], payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]: ...


def base_levels(topic_filter: str) -> int:
    """How many levels of a filter come before its first wildcard: `zigbee2mqtt/#` -> 1."""
    levels = topic_filter.split("/")
    return next((i for i, level in enumerate(levels) if level in ("+", "#")), len(levels))


def value_of(raw: Any, what: str) -> float:
    """A JSON value as a reading's value: a finite number, a boolean (1/0), or "ON"/"OFF"."""
    kind = type(raw)
    if kind is bool:
        return 1.0 if raw else 0.0
    if kind is str and raw in ON_OFF:
        return ON_OFF[raw]
    return number(raw, what)  # the native form's rule for numbers


def flatten(doc: dict[str, Any], prefix: str = "", depth: int = 1) -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) of a JSON object: `{"ENERGY": {"Power": [1, 2]}}` gives
    `ENERGY.Power.0` and `ENERGY.Power.1`. Deeper than MAX_DEPTH: PayloadError("too_deep")."""
    if depth > MAX_DEPTH:
        raise PayloadError("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if type(value) is dict:
            yield from flatten(value, path + ".", depth + 1)
        elif type(value) is list:
            yield from flatten({str(i): item for i, item in enumerate(value)}, path + ".", depth + 1)
        else:
            yield path, value


def take_fields(
    sensor: str, fields: Iterator[tuple[str, Any]], ts: float, channels: set[str], outcome: Outcome
) -> list[Reading]:
    """Readings of `<sensor>/<field>` for the fields that are configured channels; the others are
    ignored. As in the native `values` map, a bad entry is skipped and the good ones kept; if
    there were configured fields and none is good, the first one's error is raised."""
    readings: list[Reading] = []
    first_error: PayloadError | None = None
    ignored = 0
    for name, raw in fields:
        channel = f"{sensor}/{name}"
        if channel not in channels:
            ignored += 1
            continue
        try:
            readings.append(Reading(channel, ts, value_of(raw, name)))
        except PayloadError as exc:
            if first_error is None:
                first_error = exc
            else:
                outcome.skipped.append(exc)
    if ignored:
        outcome.ignore("not_a_channel", ignored)
    if first_error is not None:
        if not readings:
            raise first_error
        outcome.skipped.insert(0, first_error)
    return readings


def json_object(payload: bytes, limits: PayloadLimits, what: str) -> dict[str, Any]:
    # No per-character nesting scan: these objects hold many brackets, and the scan would cost
    # more than the parse. `flatten` refuses what nests deeper than MAX_DEPTH.
    doc = decode_json(payload, limits, None)
    if type(doc) is not dict:
        raise PayloadError("bad_shape", f"{what}: want a JSON object, got {type(doc).__name__}")
    return doc  # type: ignore[no-any-return]


def iso_timestamp(text: Any, zone: tzinfo | None, now: float, limits: PayloadLimits, what: str) -> float:
    """ISO 8601 text as unix seconds, checked against the time window like any timestamp; a time
    written without an offset is in `zone` (None: the device's own zone)."""
    if type(text) is not str:
        raise PayloadError("bad_ts", f"{what} is {type(text).__name__}, not ISO 8601 text")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise PayloadError("bad_ts", f"{what} {text[:40]!r} is not ISO 8601") from None
    try:
        if moment.tzinfo is None:
            # astimezone() on a naive time reads it as the device's local time (DST included).
            moment = moment.replace(tzinfo=zone) if zone is not None else moment.astimezone()
        seconds = moment.timestamp()
    except (ValueError, OverflowError):  # year 1 or 9999 moved out of datetime's range by a zone
        raise PayloadError("bad_ts", f"{what} {text[:40]!r} is out of range") from None
    return timestamp(seconds, now, limits)


def epoch_timestamp(raw: Any, per_second: float, now: float, limits: PayloadLimits, what: str) -> float:
    """A number of seconds (per_second 1) or milliseconds (1000) since the epoch, checked like any timestamp."""
    if type(raw) is not int and type(raw) is not float:
        raise PayloadError("bad_ts", f"{what} is {type(raw).__name__}")
    try:
        return timestamp(raw / per_second, now, limits)
    except OverflowError:
        raise PayloadError("bad_ts", f"{what} overflows a float") from None


def zone_of(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)
