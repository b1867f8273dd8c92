"""The payload forms of other projects' sensors, read through `[[inputs]]` mappings.

Each format is a module with one class (`parse` of a message's topic levels and payload); the
`InputRouter` picks the first mapping whose topic filter matches a message and applies the hold
rule of the native grammar to every form alike. Without mappings the writer reads the native
grammar directly (`payload.parse_payload`).
"""

from __future__ import annotations

from collections import OrderedDict

from paho.mqtt.client import topic_matches_sub

from edge_daemon.config import Config, InputConfig
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.formats.common import Format, Outcome
from edge_daemon.mqtt.formats.esphome import EsphomeFormat
from edge_daemon.mqtt.formats.generic_json import JsonFormat
from edge_daemon.mqtt.formats.native import NativeFormat
from edge_daemon.mqtt.formats.shelly import ShellyFormat
from edge_daemon.mqtt.formats.tasmota import TasmotaFormat
from edge_daemon.mqtt.formats.zigbee2mqtt import Zigbee2mqttFormat
from edge_daemon.mqtt.payload import PayloadLimits, parse_holding
from edge_daemon.store import Reading

__all__ = ["InputRouter", "Outcome", "make_format"]

_FORMATS: dict[str, type[Format]] = {
    "native": NativeFormat,
    "zigbee2mqtt": Zigbee2mqttFormat,
    "tasmota": TasmotaFormat,
    "esphome": EsphomeFormat,
    "shelly": ShellyFormat,
    "json": JsonFormat,
}
# Topics remembered with the mapping they matched: a device publishes on a handful of topics,
# each matched against every filter once. Beyond this many the oldest are forgotten.
_TOPIC_CACHE_SIZE = 4096


def make_format(mapping: InputConfig, channels: set[str]) -> Format:
    return _FORMATS[mapping.format](mapping, channels)


class InputRouter:
    """Reads each message by the first `[[inputs]]` mapping whose filter matches its topic."""

    def __init__(self, config: Config) -> None:
        channels = set(config.channels.names)
        self._mappings = [(mapping.topic, make_format(mapping, channels)) for mapping in config.inputs]
        self._by_topic: OrderedDict[str, Format | None] = OrderedDict()

    def format_of(self, topic: str) -> Format | None:
        try:
            found = self._by_topic[topic]
        except KeyError:
            found = next((fmt for sub, fmt in self._mappings if topic_matches_sub(sub, topic)), None)
            self._by_topic[topic] = found
            if len(self._by_topic) > _TOPIC_CACHE_SIZE:
                self._by_topic.popitem(last=False)
        return found

    def parse(
        self, topic: str, payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome, held: list[Reading] | None = None
    ) -> list[Reading]:
        """The readings of one message; PayloadError for a message rejected whole. Entries
        rejected alone go to `outcome.skipped`, fields that are not channels to `outcome.ignored`."""
        fmt = self.format_of(topic)
        if fmt is None:
            raise PayloadError("unmapped_topic", repr(topic[:120]))
        levels = topic.split("/")
        return parse_holding(lambda at, window: fmt.parse(levels, payload, at, window, outcome), now, limits, held)
