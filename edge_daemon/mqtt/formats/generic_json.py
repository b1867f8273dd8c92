"""Any JSON payload, read by a mapping's own table: the sensor from topic levels (`sensor =
"{1}"`), each channel field from a JSON path (`values = {temperature = "$.env.temp"}`), and the
time from an optional path (`ts`, in `ts_unit`: s, ms or iso), else the arrival time.
"""

from __future__ import annotations

import re
from typing import Any

from edge_daemon.config import InputConfig
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.formats.common import Outcome, epoch_timestamp, iso_timestamp, json_object, take_fields, zone_of
from edge_daemon.mqtt.payload import PayloadLimits
from edge_daemon.store import Reading

_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")
_LEVEL = re.compile(r"\{(\d+)\}")
_MISSING = object()


def compile_path(path: str) -> list[str | int]:
    """`$.a.b[0]` -> ["a", "b", 0] (the config has checked its form)."""
    return [key if key else int(index) for key, index in _STEP.findall(path[1:])]


def lookup(doc: Any, steps: list[str | int]) -> Any:
    for step in steps:
        if type(step) is int:
            if type(doc) is not list or step >= len(doc):
                return _MISSING
        elif type(doc) is not dict or step not in doc:
            return _MISSING
        doc = doc[step]
    return doc


class JsonFormat:
    def __init__(self, mapping: InputConfig, channels: set[str]) -> None:
        assert mapping.sensor is not None  # the config requires it for format json
        self.channels = channels
        self.sensor = mapping.sensor
        self.values = [(field, compile_path(path)) for field, path in mapping.values.items()]
        self.ts_path = None if mapping.ts is None else compile_path(mapping.ts)
        self.ts_unit = mapping.ts_unit
        self.zone = zone_of(mapping.timezone)

    def _sensor(self, levels: list[str]) -> str:
        def level(match: re.Match[str]) -> str:
            index = int(match.group(1))
            if index >= len(levels) or not levels[index]:
                raise PayloadError("bad_topic", f"no level {index} in {'/'.join(levels)[:120]!r}")
            return levels[index]

        return _LEVEL.sub(level, self.sensor)

    def _ts(self, doc: dict[str, Any], now: float, limits: PayloadLimits) -> float:
        if self.ts_path is None:
            return now
        raw = lookup(doc, self.ts_path)
        if raw is _MISSING:
            raise PayloadError("bad_ts", "no timestamp at the ts path")
        if self.ts_unit == "iso":
            return iso_timestamp(raw, self.zone, now, limits, "ts")
        return epoch_timestamp(raw, 1000.0 if self.ts_unit == "ms" else 1.0, now, limits, "ts")

    def parse(self, levels: list[str], payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]:
        sensor = self._sensor(levels)
        doc = json_object(payload, limits, "json payload")
        ts = self._ts(doc, now, limits)
        fields = [(field, raw) for field, path in self.values if (raw := lookup(doc, path)) is not _MISSING]
        if len(fields) < len(self.values):
            outcome.ignore("missing", len(self.values) - len(fields))
        return take_fields(sensor, iter(fields), ts, self.channels, outcome)
