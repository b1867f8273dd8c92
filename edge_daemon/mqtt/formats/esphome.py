"""ESPHome's MQTT component: `<node>/sensor/<name>/state` with the state as bare text ("21.50"),
and `<node>/binary_sensor/<name>/state` with "ON" or "OFF" (1 or 0); channel `<node>/<name>`,
stamped on arrival. Other topics of a node (`status`, `debug`, commands) carry no readings.
"""

from __future__ import annotations

import re
from math import isfinite

from edge_daemon.config import InputConfig
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.formats.common import ON_OFF, Outcome
from edge_daemon.mqtt.payload import PayloadLimits
from edge_daemon.store import Reading

_KINDS = {"sensor", "binary_sensor"}
# A decimal number as ESPHome writes one; float() alone would also take "1_000", other scripts'
# digits and "infinity".
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
# How ESPHome writes a state it does not know (a sensor not yet read, a failed read): no reading.
_NO_STATE = {"nan", "NaN", "-nan", "unknown", "unavailable", "None"}


class EsphomeFormat:
    def __init__(self, mapping: InputConfig, channels: set[str]) -> None:
        self.channels = channels

    def parse(self, levels: list[str], payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]:
        if len(levels) < 4 or levels[-1] != "state" or levels[-3] not in _KINDS or not all(levels):
            outcome.ignore("not_readings")
            return []
        channel = f"{'/'.join(levels[:-3])}/{levels[-2]}"
        if channel not in self.channels:
            outcome.ignore("not_a_channel")
            return []
        if len(payload) > limits.max_payload_bytes:
            raise PayloadError("too_large", f"{len(payload)} bytes")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise PayloadError("bad_utf8") from None
        if levels[-3] == "binary_sensor":
            if text not in ON_OFF:
                raise PayloadError("not_a_number", f"binary state {text[:20]!r} (want ON or OFF)")
            return [Reading(channel, now, ON_OFF[text])]
        if text in _NO_STATE:
            outcome.ignore("no_state")
            return []
        if not _NUMBER.fullmatch(text):
            raise PayloadError("not_a_number", f"state {text[:20]!r}")
        value = float(text)
        if not isfinite(value):  # digits beyond a float's range
            raise PayloadError("non_finite", f"state {text[:20]!r}")
        return [Reading(channel, now, value)]
