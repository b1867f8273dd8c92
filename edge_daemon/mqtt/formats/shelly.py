"""Shelly Gen2 and later: `<device>/status/<component>:<n>` with the component's status as JSON
(`temperature:0` gives `tC`, `switch:0` gives `apower`, `voltage`, `current`, ...), and
`<device>/events/rpc` notifications (`NotifyStatus`, `NotifyFullStatus`) whose `params` hold
components by name and the device's `ts`. Channel `<device>/<component>:<n>.<field>`, nested
fields joined with dots (`switch:0.aenergy.total`). Status topics are stamped on arrival.
"""

from __future__ import annotations

from typing import Any

from edge_daemon.config import InputConfig
from edge_daemon.errors import PayloadError
from edge_daemon.mqtt.formats.common import Outcome, epoch_timestamp, flatten, json_object, take_fields
from edge_daemon.mqtt.payload import PayloadLimits
from edge_daemon.store import Reading

_STATUS_METHODS = {"NotifyStatus", "NotifyFullStatus"}


class ShellyFormat:
    def __init__(self, mapping: InputConfig, channels: set[str]) -> None:
        self.channels = channels

    def parse(self, levels: list[str], payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]:
        if len(levels) >= 3 and levels[-2] == "status" and levels[-1]:
            device = "/".join(levels[:-2])
            doc = json_object(payload, limits, f"shelly {levels[-1]} status")
            return take_fields(device, flatten(doc, levels[-1] + "."), now, self.channels, outcome)
        if len(levels) >= 3 and levels[-2:] == ["events", "rpc"]:
            return self._notification("/".join(levels[:-2]), payload, now, limits, outcome)
        outcome.ignore("not_readings")
        return []

    def _notification(self, device: str, payload: bytes, now: float, limits: PayloadLimits, outcome: Outcome) -> list[Reading]:
        doc = json_object(payload, limits, "shelly rpc event")
        params = doc.get("params")
        method = doc.get("method")
        if type(method) is not str or method not in _STATUS_METHODS:
            outcome.ignore("not_readings")  # NotifyEvent (button presses, ...) and the rest
            return []
        if type(params) is not dict:
            raise PayloadError("bad_shape", "NotifyStatus without a params object")
        ts = now if "ts" not in params else epoch_timestamp(params["ts"], 1.0, now, limits, "params.ts")
        components: dict[str, Any] = {key: value for key, value in params.items() if type(value) is dict}
        if not components:
            outcome.ignore("not_readings")
            return []
        return take_fields(device, flatten(components), ts, self.channels, outcome)
