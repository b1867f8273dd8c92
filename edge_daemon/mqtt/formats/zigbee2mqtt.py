"""zigbee2mqtt: `<base>/<friendly_name>` with the device's state as one flat JSON object.

Each numeric (or boolean) field is channel `<friendly_name>/<field>` (nested objects such as
`color` are flattened with dots); `last_seen` (epoch milliseconds, or ISO 8601 text, as set by
zigbee2mqtt's `last_seen` option) stamps the readings, else their arrival. The bridge's own
topics and a device's `availability`, `set` and `get` topics carry no readings.
"""

from __future__ import annotations

from edge_daemon.config import InputConfig
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.formats.common import Outcome, base_levels, epoch_timestamp, flatten, iso_timestamp, json_object, take_fields
from edge_daemon.mqtt.payload import PayloadLimits
from edge_daemon.store import Reading

# Topic levels after a friendly name that are commands or availability, not state.
_NOT_STATE = {"set", "get", "availability"}


class Zigbee2mqttFormat:
    def __init__(self, mapping: InputConfig, channels: set[str]) -> None:
        self.channels = channels
        self.base = base_levels(mapping.topic)

    def parse(self, levels: list[str], payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]:
        name = levels[self.base:]
        if not name or name[0] == "bridge" or _NOT_STATE.intersection(name[1:]):
            outcome.ignore("not_readings")
            return []
        if not all(name):
            raise PayloadError("bad_topic", repr("/".join(levels)[:120]))
        doc = json_object(payload, limits, "zigbee2mqtt state")
        seen = doc.pop("last_seen", None)
        if seen is None:
            ts = now
        elif type(seen) is str:
            ts = iso_timestamp(seen, None, now, limits, "last_seen")
        else:
            ts = epoch_timestamp(seen, 1000.0, now, limits, "last_seen")  # epoch milliseconds
        return take_fields("/".join(name), flatten(doc), ts, self.channels, outcome)
