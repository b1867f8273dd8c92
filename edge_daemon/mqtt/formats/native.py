"""The native grammar as an `[[inputs]]` mapping: `sensors/<sensor>[/<channel>]` (see `payload`)."""

from __future__ import annotations

from edge_daemon.config import InputConfig
from edge_daemon.mqtt.formats.common import Outcome
from edge_daemon.mqtt.payload import PayloadLimits, parse_native
from edge_daemon.store import Reading


class NativeFormat:
    def __init__(self, mapping: InputConfig, channels: set[str]) -> None:
        self.channels = channels

    def parse(self, levels: list[str], payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]:
        return parse_native("/".join(levels), payload, now, self.channels, limits, outcome.skipped)
