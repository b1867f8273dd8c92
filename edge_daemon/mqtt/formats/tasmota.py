"""Tasmota: `tele/<device>/SENSOR` (sensor readings) and `tele/<device>/STATE` (the device's own
state), JSON whose nested objects are flattened with dots: `<device>/ENERGY.Power`,
`<device>/DS18B20.Temperature`, list items by index (`ENERGY.Power.0`).

`Time` is the device's local time written without a zone: the mapping's `timezone` (default the
daemon's own zone) places it; a `Time` with an offset keeps it. Other topics of a device (LWT,
INFO1, RESULT, ...) carry no readings.
"""

from __future__ import annotations

from edge_daemon.config import InputConfig
from edge_daemon.mqtt.formats.common import Outcome, flatten, iso_timestamp, json_object, take_fields, zone_of
from edge_daemon.mqtt.payload import PayloadLimits
from edge_daemon.store import Reading

_READINGS = {"SENSOR", "STATE"}


class TasmotaFormat:
    def __init__(self, mapping: InputConfig, channels: set[str]) -> None:
        self.channels = channels
        self.zone = zone_of(mapping.timezone)

    def parse(self, levels: list[str], payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]:
        if len(levels) < 2 or levels[-1] not in _READINGS or not levels[-2]:
            outcome.ignore("not_readings")
            return []
        doc = json_object(payload, limits, f"tasmota {levels[-1]}")
        time = doc.pop("Time", None)
        ts = now if time is None else iso_timestamp(time, self.zone, now, limits, "Time")
        return take_fields(levels[-2], flatten(doc), ts, self.channels, outcome)
