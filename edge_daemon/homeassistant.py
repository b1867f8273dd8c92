"""Home Assistant MQTT discovery: the daemon as one Home Assistant device, its entities reading the
topics the daemon already publishes (`forecast`, the retained `status`).

Device-based discovery (Home Assistant 2024.11 and later): one retained JSON config on
`<prefix>/device/<object id>/config` with the device (`dev`), the origin (`o`) and every
component (`cmps`), as the MQTT integration's documentation describes ("Device discovery payload",
home-assistant.io source/_integrations/mqtt.markdown). The `Discovery` part publishes it at every
connect and whenever Home Assistant announces itself `online` on `<prefix>/status`; turned off,
it removes the config it published before (remembered in `<state_dir>/homeassistant.json`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, NotRequired, Protocol

import paho.mqtt.client as mqtt
from typing_extensions import TypedDict

from edge_daemon import __version__
from edge_daemon.artifacts.files import replace_atomically
from edge_daemon.config import Config
from edge_daemon.errors import ConfigError, DiscoveryError
from edge_daemon.mqtt.credentials import configure_client

log = logging.getLogger(__name__)

# What a Home Assistant device and its origin are called.
ORIGIN_NAME = "edge-daemon"
# Where the daemon remembers the discovery topic it published on, to remove it once discovery
# is turned off (or the prefix or device id changes).
MARKER_NAME = "homeassistant.json"
# How long removing a config waits for the broker's acknowledgement.
REMOVE_TIMEOUT_S = 10.0
# The training states the `training` entity may show (mqtt.outputs.TrainingState).
TRAINING_STATES = ["idle", "running", "paused"]
# The retained status says whether the daemon runs in `online`; availability reads it.
AVAILABLE, NOT_AVAILABLE = "online", "offline"
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.online else 'offline' }}"


# -- the discovery payload (keys and abbreviations as Home Assistant documents them) ---------


class DiscoveryDevice(TypedDict):
    """`dev`: the device registry entry (`ids` identifiers, `mdl` model, `sw` software version)."""

    ids: list[str]
    name: str
    mdl: str
    sw: str


class DiscoveryOrigin(TypedDict):
    """`o`: the application that publishes the config (`sw` its version)."""

    name: str
    sw: str


class SensorComponent(TypedDict):
    """A `sensor` entity (`p` is the platform) reading one value of a JSON payload."""

    p: Literal["sensor"]
    unique_id: str
    name: str
    state_topic: str
    value_template: str
    unit_of_measurement: NotRequired[str]
    device_class: NotRequired[Literal["enum"]]
    options: NotRequired[list[str]]  # the states of an `enum` sensor
    state_class: NotRequired[Literal["measurement"]]
    entity_category: NotRequired[Literal["diagnostic"]]


class BinarySensorComponent(TypedDict):
    """A `binary_sensor` entity; its template renders `payload_on` or `payload_off`."""

    p: Literal["binary_sensor"]
    unique_id: str
    name: str
    state_topic: str
    value_template: str
    payload_on: str
    payload_off: str
    device_class: Literal["problem"]


Component = SensorComponent | BinarySensorComponent


class DiscoveryConfig(TypedDict):
    """`<prefix>/device/<object id>/config`: the device, the origin, the components by id, and the
    availability every component shares (read from the retained `edge/<id>/status`)."""

    dev: DiscoveryDevice
    o: DiscoveryOrigin
    cmps: dict[str, Component]
    availability_topic: str
    availability_template: str
    payload_available: str
    payload_not_available: str


def object_id(device_id: str) -> str:
    """The device's id in discovery topics and ids: Home Assistant allows only [a-zA-Z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


def config_topic(config: Config) -> str:
    """`<prefix>/device/<object id>/config`."""
    return f"{config.homeassistant.prefix}/device/{object_id(config.device.id)}/config"


def _duration(seconds: float) -> str:
    """'30 s', '15 min', '1 h', '2 d': how far ahead a horizon is, for an entity's name (in the
    largest unit it is a whole number of)."""
    for unit, length in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= length and seconds % length == 0:
            return f"{seconds / length:g} {unit}"
    return f"{seconds:g} s"


def _keys(channels: list[str]) -> dict[str, str]:
    """Each channel's part of component ids ('m1/temperature' -> 'm1_temperature'), kept unique."""
    keys: dict[str, str] = {}
    for channel in channels:
        key = base = re.sub(r"[^A-Za-z0-9_]", "_", channel)
        n = 2
        while key in keys.values():
            key, n = f"{base}_{n}", n + 1
        keys[channel] = key
    return keys


def _literal(text: str) -> str:
    """`text` as a string literal of a template."""
    return f"'{text}'" if "'" not in text and "\\" not in text else json.dumps(text)


def discovery_payload(config: Config) -> DiscoveryConfig:
    """The device config: per forecast channel the next step's forecast, each further horizon's
    ([model] horizons) and drift; the anomaly score; the adapter served, the training state and
    the readings stored. The forecast entities come only when forecasts are published
    (`[outputs] forecast_every` > 0): their values come from nowhere else."""
    # Lazy: the horizons rule lives with training (torch); only the daemon builds this payload.
    from edge_daemon.training.pretrain import horizon_steps

    device = object_id(config.device.id)
    root = config.topic_prefix
    forecast_topic, status_topic = root + "forecast", root + "status"
    units = config.channels.units
    channels = config.channels.forecast
    keys = _keys(channels)
    cmps: dict[str, Component] = {}

    def sensor(key: str, name: str, topic: str, template: str, **options: Any) -> None:
        component: SensorComponent = {
            "p": "sensor", "unique_id": f"edge_daemon_{device}_{key}", "name": name, "state_topic": topic, "value_template": template,
        }  # fmt: skip
        component.update(options)  # type: ignore[typeddict-item]
        cmps[key] = component

    if config.outputs.forecast_every:
        further = horizon_steps(config.model, config.channels.period_s)[1:]
        for channel in channels:
            unit = {"unit_of_measurement": units[channel]} if channel in units else {}
            path = f"forecast[{_literal(channel)}]"
            sensor(f"forecast_{keys[channel]}", f"{channel} forecast", forecast_topic, "{{ value_json.%s }}" % path,
                   **unit, state_class="measurement")  # fmt: skip
            for index, steps in enumerate(further):
                ahead = _duration(steps * config.channels.period_s)
                sensor(f"forecast_{steps}_{keys[channel]}", f"{channel} forecast +{ahead}", forecast_topic,
                       "{{ value_json.horizons[%d].%s }}" % (index, path), **unit, state_class="measurement")  # fmt: skip
        sensor("anomaly_score", "Anomaly score", forecast_topic, "{{ value_json.anomaly_score }}", state_class="measurement")
    for channel in channels:
        cmps[f"drift_{keys[channel]}"] = BinarySensorComponent(
            p="binary_sensor",
            unique_id=f"edge_daemon_{device}_drift_{keys[channel]}",
            name=f"{channel} drift",
            state_topic=status_topic,
            value_template="{{ 'ON' if value_json.drift_channels[%s] else 'OFF' }}" % _literal(channel),
            payload_on="ON",
            payload_off="OFF",
            device_class="problem",
        )
    sensor("adapter_version", "Adapter served", status_topic,
           "{{ value_json.adapter_version if value_json.adapter_version is not none else 'base' }}", entity_category="diagnostic")  # fmt: skip
    sensor("training", "Training", status_topic, "{{ value_json.training }}",
           device_class="enum", options=list(TRAINING_STATES), entity_category="diagnostic")  # fmt: skip
    sensor("readings", "Readings stored", status_topic, "{{ value_json.readings }}", state_class="measurement", entity_category="diagnostic")
    return DiscoveryConfig(
        dev=DiscoveryDevice(ids=[f"edge_daemon_{device}"], name=config.device.id, mdl=ORIGIN_NAME, sw=__version__),
        o=DiscoveryOrigin(name=ORIGIN_NAME, sw=__version__),
        cmps=cmps,
        availability_topic=status_topic,
        availability_template=AVAILABILITY_TEMPLATE,
        payload_available=AVAILABLE,
        payload_not_available=NOT_AVAILABLE,
    )


# -- the marker: which config topic this device published on --------------------------------


class Marker(TypedDict):
    """`<state_dir>/homeassistant.json`."""

    topic: str


def marker_path(state_dir: Path) -> Path:
    return Path(state_dir) / MARKER_NAME


def published_topic(state_dir: Path) -> str | None:
    """The config topic the daemon last published on (None: none, or an unreadable marker)."""
    try:
        marker = json.loads(marker_path(state_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", marker_path(state_dir), exc)
        return None
    topic = marker.get("topic") if isinstance(marker, dict) else None
    return topic if isinstance(topic, str) and topic else None


def _remember(state_dir: Path, topic: str) -> None:
    replace_atomically(marker_path(state_dir), json.dumps(Marker(topic=topic)) + "\n", 0o644)


def _forget(state_dir: Path) -> None:
    marker_path(state_dir).unlink(missing_ok=True)


def topics_to_remove(config: Config, state_dir: Path | None = None) -> list[str]:
    """Every config topic a removal must clear: the one published on before (the marker) and, with
    discovery on, the current one."""
    topics = [published_topic(config.device.state_dir if state_dir is None else state_dir)]
    if config.homeassistant.discovery:
        topics.append(config_topic(config))
    return list(dict.fromkeys(t for t in topics if t))


# -- the part ---------------------------------------------------------------------------------


class DiscoveryConnection(Protocol):
    """What discovery needs of the broker connection (mqtt.ingestor.Ingestor)."""

    @property
    def on_connect(self) -> list[Callable[[], None]]: ...

    def add_subscription(self, topic_filter: str, qos: int, callback: Callable[[mqtt.MQTTMessage], None]) -> None: ...

    def publish_topic(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo: ...

    def wait_subscribed(self, timeout: float) -> bool: ...


class Discovery:
    """Publishes the device's discovery config (retained, QoS 1) at every connect and when Home
    Assistant comes `online`; removes a config published before that is no longer wanted (discovery
    turned off, or another prefix or device id) once connected. The daemon builds it only when
    there is either to do (`wanted`)."""

    def __init__(self, config: Config, connection: DiscoveryConnection) -> None:
        self.config = config
        self.connection = connection
        self.state_dir = config.device.state_dir
        self.enabled = config.homeassistant.discovery
        self.topic = config_topic(config)
        self.payload: DiscoveryConfig | None = discovery_payload(config) if self.enabled else None
        before = published_topic(self.state_dir)
        self.stale = [before] if before is not None and (not self.enabled or before != self.topic) else []
        self.published = 0  # configs published so far
        self._stopped = threading.Event()
        self._remover: threading.Thread | None = None

    @staticmethod
    def wanted(config: Config) -> bool:
        """Discovery is on, or a config published before must be removed."""
        return config.homeassistant.discovery or published_topic(config.device.state_dir) is not None

    def start(self) -> None:
        if self.stale:
            self._remover = threading.Thread(target=self._remove_stale, name="homeassistant", daemon=True)
            self._remover.start()
        if self.payload is None:
            return
        # Remembered before the first publish: a config is never out there without its marker.
        _remember(self.state_dir, self.topic)
        self.connection.add_subscription(f"{self.config.homeassistant.prefix}/status", 0, self._on_homeassistant_status)
        self.connection.on_connect.append(self.publish)
        # Now too (queued until connected, at QoS 1): the connection may be up already.
        self.publish()
        log.info("Home Assistant discovery on %s (%d entities)", self.topic, len(self.payload["cmps"]))

    def publish(self) -> None:
        """Publish the config, retained (QoS 1). Runs in paho's network thread at a connect."""
        if self.payload is None or self._stopped.is_set():
            return
        self.connection.publish_topic(self.topic, self.payload, qos=1, retain=True)
        self.published += 1

    def _on_homeassistant_status(self, message: mqtt.MQTTMessage) -> None:
        # Home Assistant's birth message: a restarted Home Assistant sets up its entities again
        # from the config (the retained one would do too; this one is what its documentation asks).
        if message.payload.strip() == b"online":
            log.debug("Home Assistant is online: discovery config published again")
            self.publish()

    def _remove_stale(self) -> None:
        """Once connected: an empty retained config on each stale topic, then forget it."""
        while not self.connection.wait_subscribed(1.0):
            if self._stopped.is_set():
                return
        for topic in self.stale:
            info = self.connection.publish_topic(topic, b"", qos=1, retain=True)
            try:
                info.wait_for_publish(REMOVE_TIMEOUT_S)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not remove the Home Assistant discovery config on %s: %s", topic, exc)
                return
            if not info.is_published():
                log.warning("could not remove the Home Assistant discovery config on %s: no acknowledgement; trying at next start", topic)
                return
            log.info("removed the Home Assistant discovery config on %s", topic)
        if self.payload is None:
            _forget(self.state_dir)

    def stop(self) -> None:
        self._stopped.set()
        if self.publish in self.connection.on_connect:
            self.connection.on_connect.remove(self.publish)
        if self._remover is not None:
            self._remover.join(REMOVE_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return True

    def status(self) -> None:
        return None


# -- removal without the daemon (uninstall --purge) ---------------------------------------------


def remove_published(
    config: Config, state_dir: Path | None = None, timeout: float = 5.0, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Clear every discovery config `topics_to_remove` names with an empty retained message, over
    a connection of its own to `[mqtt]`'s broker (its password and TLS as the daemon's, files read
    with `environ`'s `$CREDENTIALS_DIRECTORY`); forget the marker. The topics cleared (none: nothing
    was published). DiscoveryError when the broker cannot be reached within `timeout` seconds."""
    state_dir = config.device.state_dir if state_dir is None else state_dir
    topics = topics_to_remove(config, state_dir)
    if not topics:
        return []
    mqtt_cfg = config.mqtt
    v5 = mqtt_cfg.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"edge-daemon-{config.device.id}-remove-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        **({} if v5 else {"clean_session": True}),
    )
    try:
        configure_client(client, mqtt_cfg, environ)
    except ConfigError as exc:
        raise DiscoveryError(f"{exc}: the Home Assistant discovery config on {', '.join(topics)} stays") from None
    client.connect_timeout = timeout
    accepted = threading.Event()
    client.on_connect = lambda c, userdata, flags, reason, props: None if reason.is_failure else accepted.set()
    where = f"{mqtt_cfg.host}:{mqtt_cfg.port}"
    stays = f"the Home Assistant discovery config on {', '.join(topics)} stays"
    try:
        client.connect(mqtt_cfg.host, mqtt_cfg.port, keepalive=max(5, int(timeout) * 2))
    except OSError as exc:
        raise DiscoveryError(f"broker {where} not reachable ({exc}): {stays}") from None
    client.loop_start()
    try:
        if not accepted.wait(timeout):
            raise DiscoveryError(f"broker {where} did not accept the connection within {timeout:g} s: {stays}")
        for topic in topics:
            info = client.publish(topic, b"", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                raise DiscoveryError(f"broker {where}: could not remove the Home Assistant discovery config on {topic}: {exc}") from None
            if not info.is_published():
                raise DiscoveryError(f"broker {where} did not acknowledge the removal of the Home Assistant discovery config on {topic}")
    finally:
        client.disconnect()
        client.loop_stop()
    _forget(state_dir)
    return topics


__all__ = [
    "Discovery",
    "DiscoveryConfig",
    "config_topic",
    "discovery_payload",
    "object_id",
    "published_topic",
    "remove_published",
    "topics_to_remove",
]
