"""Home Assistant MQTT discovery against a real broker: the retained device config holds what Home
Assistant requires, is published again when Home Assistant comes online, names state topics that
really carry what its templates read, follows the daemon's availability, and is removed when
discovery is turned off or the daemon is uninstalled with --purge.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon import install as inst
from edge_daemon.artifacts.base import save_base
from edge_daemon.broker import LocalBroker, free_port
from edge_daemon.config import Config
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.errors import ConfigError
from edge_daemon.frames import NormStats
from edge_daemon.homeassistant import Discovery, config_topic, discovery_payload, marker_path, published_topic
from edge_daemon.model import Forecaster
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.store import ReplayStore
from edge_daemon.training.pretrain import forecaster_config
from tests.conftest import CHANNELS, make_config, running_broker, start_daemon
from tests.support import config_toml, wait_for
from tests.test_contract import one, same_shape
from tests.test_end_to_end import publish_steps

# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0
STEPS = 40  # readings per channel published: more than a window, so forecasts are scored and sent
SMALL_MODEL = {"window": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 16, "horizons": [1, 4]}
UNITS = {"m1/temperature": "°C", "m1/current": "A"}


# -- what Home Assistant requires of a device discovery config ----------------------------------


def home_assistant_problems(topic: str, config: dict[str, Any]) -> list[str]:
    """What Home Assistant would refuse in a device-based discovery message, by its MQTT
    integration's documentation (home-assistant.io, source/_integrations/mqtt.markdown: "Discovery
    topic", "Device discovery payload" and "Supported abbreviations"): the topic is
    `<prefix>/device/<object_id>/config` with an object id of [a-zA-Z0-9_-]; the root holds the
    `device` (`dev`) mapping with `identifiers` (`ids`) and the `origin` (`o`) mapping with its
    required `name`; every component under `components` (`cmps`) has its `platform` (`p`), an
    entity's a `unique_id` (`uniq_id`) and at least one option of its own; a `sensor` and a
    `binary_sensor` read a `state_topic` (`stat_t`)."""
    problems = []
    if not re.fullmatch(r"[^/#+]+(/[^/#+]+)*/device/[a-zA-Z0-9_-]+/config", topic):
        problems.append(f"topic {topic!r} is not <prefix>/device/<object_id>/config")
    device = config.get("dev", config.get("device"))
    if not isinstance(device, dict) or not (device.get("ids") or device.get("identifiers")):
        problems.append("no dev.ids")
    origin = config.get("o", config.get("origin"))
    if not isinstance(origin, dict) or not origin.get("name"):
        problems.append("no o.name")
    components = config.get("cmps", config.get("components"))
    if not isinstance(components, dict) or not components:
        return problems + ["no cmps"]
    for key, component in components.items():
        platform = component.get("p", component.get("platform"))
        if not platform:
            problems.append(f"cmps.{key}: no p")
        if not (component.get("unique_id") or component.get("uniq_id")):
            problems.append(f"cmps.{key}: no unique_id")
        if len(set(component) - {"p", "platform"}) < 1:
            problems.append(f"cmps.{key}: no option of its own")
        if platform in ("sensor", "binary_sensor") and not (component.get("state_topic") or component.get("stat_t") or config.get("state_topic")):
            problems.append(f"cmps.{key}: no state_topic")
    unique_ids = [c.get("unique_id") for c in components.values()]
    if len(set(unique_ids)) != len(unique_ids):
        problems.append("unique_id repeated")
    return problems


def test_the_check_sees_what_home_assistant_requires() -> None:
    good = {"dev": {"ids": ["a"]}, "o": {"name": "x"}, "cmps": {"t": {"p": "sensor", "unique_id": "u", "state_topic": "s/t"}}}
    assert home_assistant_problems("homeassistant/device/a/config", good) == []
    assert home_assistant_problems("homeassistant/device/a.b/config", good)
    assert home_assistant_problems("homeassistant/device/a/config", {**good, "dev": {"name": "a"}}) == ["no dev.ids"]
    assert home_assistant_problems("homeassistant/device/a/config", {**good, "o": {"sw": "1"}}) == ["no o.name"]
    assert home_assistant_problems("homeassistant/device/a/config", {**good, "cmps": {"t": {"p": "sensor", "state_topic": "s"}}})
    assert home_assistant_problems("homeassistant/device/a/config", {**good, "cmps": {"t": {"unique_id": "u", "state_topic": "s"}}})
    assert home_assistant_problems("homeassistant/device/a/config", {**good, "cmps": {"t": {"p": "sensor", "unique_id": "u"}}})


# -- templates, rendered as Home Assistant renders them ------------------------------------------


def render(template: str, payload: bytes) -> str:
    """A value_template applied to a payload: `value_json` is the parsed JSON; an undefined path
    fails (Home Assistant logs a template error and the entity has no state)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(value_json=json.loads(payload), value=payload.decode()).strip()


def test_render_fails_on_a_path_the_payload_lacks() -> None:
    assert render("{{ value_json.forecast['a/b'] }}", b'{"forecast": {"a/b": 1.5}}') == "1.5"
    with pytest.raises(jinja2.UndefinedError):
        render("{{ value_json.forecast['a/c'] }}", b'{"forecast": {"a/b": 1.5}}')


# -- a running daemon with discovery on ------------------------------------------------------------


@dataclass
class Listener:
    """A plain subscriber on `homeassistant/#` and `edge/#`: every message, with its retain flag."""

    port: int
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ha-listener-{uuid.uuid4().hex[:8]}")
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", self.port)
        self.client.subscribe([("homeassistant/#", 1), ("edge/#", 1)])
        self.client.loop_start()
        assert subscribed.wait(HANG_S)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def on(self, topic: str) -> list[tuple[bytes, bool]]:
        with self.lock:
            return [(payload, retain) for t, payload, retain in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publisher(port: int, auth: tuple[str, str] | None = None) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ha-pub-{uuid.uuid4().hex[:8]}")
    if auth is not None:
        client.username_pw_set(*auth)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def retained(port: int, topic: str, auth: tuple[str, str] | None = None) -> bytes | None:
    """The message retained on `topic` (None: none). A probe published after the subscription is
    granted arrives after any retained message, so its arrival ends the wait."""
    probe = f"ha-probe/{uuid.uuid4().hex[:8]}"
    got: dict[str, bytes] = {}
    done, subscribed = threading.Event(), threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ha-retained-{uuid.uuid4().hex[:8]}")
    if auth is not None:
        client.username_pw_set(*auth)

    def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == probe:
            done.set()
        elif message.retain:
            got[message.topic] = bytes(message.payload)

    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe([(topic, 1), (probe, 1)])
    client.loop_start()
    try:
        assert subscribed.wait(HANG_S)
        client.publish(probe, b"x", qos=1)
        assert done.wait(HANG_S), "the probe never came back"
    finally:
        client.loop_stop()
        client.disconnect()
    return got.get(topic)


@dataclass
class Running:
    broker: LocalBroker
    config: Config
    daemon: Daemon
    listener: Listener


def ha_config(workdir: Path, port: int, **sections: dict[str, Any]) -> Config:
    defaults: dict[str, dict[str, Any]] = {
        "homeassistant": {"discovery": True},
        "channels": {"units": UNITS},
        "model": SMALL_MODEL,
        # The periodic refresh is out of the way: what the status says of training reaches Home
        # Assistant by the change check alone.
        "outputs": {"forecast_every": 1, "status_interval_s": 3600},
        # The readings below are recent: none is held for an unsynchronised kernel clock.
        "store": {"clock_trust": "always"},
        # An update runs as soon as it is requested, for longer than the module's tests.
        "train": {"start_on": ["request"], "idle_cpu_percent": 100, "idle_window_s": 1, "min_interval_s": 0, "check_interval_s": 0.2, "steps": 1_000_000},
    }
    for name, values in sections.items():
        defaults.setdefault(name, {}).update(values)
    return make_config(workdir, port=port, **defaults)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One daemon for the module's tests (a start costs seconds): discovery on, a base model so it
    forecasts, `STEPS` steps of readings published."""
    workdir = tmp_path_factory.mktemp("homeassistant")
    (workdir / "broker").mkdir()
    broker = LocalBroker(workdir=workdir / "broker")
    broker.start()
    listener = Listener(broker.port)
    config = ha_config(workdir, broker.port)
    model = Forecaster(forecaster_config(config.model, len(CHANNELS), period_s=1.0)).eval()
    save_base(config.base_dir, model, NormStats(np.array([20.0, 0.5, 3.0]), np.array([2.0, 0.1, 0.4])), list(CHANNELS), 1.0, np.ones(3), {})
    daemon = Daemon(config)
    try:
        start_daemon(daemon)
        start = float(int(time.time()) - STEPS - 5)
        ts = start + np.arange(STEPS, dtype=float)
        rng = np.random.default_rng(0)
        values = {"m1/temperature": 20 + rng.normal(0, 1, STEPS), "m1/vibration": 0.5 + rng.normal(0, 0.05, STEPS), "m1/current": 3 + rng.normal(0, 0.2, STEPS)}
        publish_steps(broker.port, ts, values, 0, STEPS)
        yield Running(broker, config, daemon, listener)
    finally:
        daemon.stop()
        listener.close()
        broker.close()


def the_config(running: Running) -> dict[str, Any]:
    payload = wait_for(lambda: [p for p, _ in running.listener.on(config_topic(running.config)) if p], HANG_S, "the discovery config")[-1]
    return json.loads(payload)


def test_the_config_is_retained_and_has_what_home_assistant_requires(running: Running) -> None:
    topic = config_topic(running.config)
    assert topic == "homeassistant/device/test-dev/config"
    payload = retained(running.broker.port, topic)
    assert payload is not None, "no retained discovery config"
    config = json.loads(payload)
    assert home_assistant_problems(topic, config) == []
    assert config["o"]["name"] == "edge-daemon" and config["dev"]["name"] == "test-dev"
    components = config["cmps"]
    # Per forecast channel: the next step, the further horizon (4 steps) and drift; then the device's own.
    for channel, key in (("m1/temperature", "m1_temperature"), ("m1/vibration", "m1_vibration"), ("m1/current", "m1_current")):
        assert components[f"forecast_{key}"]["p"] == "sensor"
        assert components[f"forecast_4_{key}"]["name"] == f"{channel} forecast +4 s"
        assert components[f"drift_{key}"]["p"] == "binary_sensor"
    assert {"anomaly_score", "adapter_version", "training", "readings"} <= set(components)
    assert len(components) == 3 * 3 + 4
    # A configured unit goes with the channel's forecasts; a channel without one has none.
    assert components["forecast_m1_temperature"]["unit_of_measurement"] == "°C"
    assert components["forecast_4_m1_current"]["unit_of_measurement"] == "A"
    assert "unit_of_measurement" not in components["forecast_m1_vibration"]
    assert components["training"]["options"] == ["idle", "running", "paused"]
    # The marker remembers where it was published, for its removal.
    assert published_topic(running.config.device.state_dir) == topic


def test_it_is_published_again_when_home_assistant_comes_online(running: Running) -> None:
    topic = config_topic(running.config)
    the_config(running)
    before = len(running.listener.on(topic))
    client = publisher(running.broker.port)
    try:
        client.publish("homeassistant/status", b"offline", qos=1).wait_for_publish(HANG_S)
        client.publish("homeassistant/status", b"online", qos=1).wait_for_publish(HANG_S)
        wait_for(lambda: len(running.listener.on(topic)) > before, HANG_S, "the config published again")
    finally:
        client.loop_stop()
        client.disconnect()
    again = running.listener.on(topic)[before:]
    assert len(again) == 1, "once for `online`, not for `offline`"
    assert json.loads(again[0][0]) == the_config(running)
    # Home Assistant's birth message is not a reading: the ingest writer never saw it.
    assert running.daemon.ingestor is not None and running.daemon.ingestor.counters()["rejected"] == 0


def test_every_state_topic_receives_what_its_template_reads(running: Running) -> None:
    components = the_config(running)["cmps"]
    forecast_topic = "edge/test-dev/forecast"
    # The anomaly score judges the forecast of a step before: wait for one that carries it.
    wait_for(lambda: any(json.loads(p)["anomaly_score"] is not None for p, _ in running.listener.on(forecast_topic)), HANG_S * 2,
             "a forecast with an anomaly score", detail=lambda: running.daemon.status_line())  # fmt: skip
    for key, component in components.items():
        messages = running.listener.on(component["state_topic"])
        assert messages, f"{key}: nothing on {component['state_topic']}"
        states = []
        for payload, _ in messages:
            if component["state_topic"].endswith("/status") and not json.loads(payload)["online"]:
                continue  # the entities are unavailable then: their templates are not read
            states.append(render(component["value_template"], payload))
        assert states, key
        if component["p"] == "binary_sensor":
            assert set(states) <= {component["payload_on"], component["payload_off"]}, (key, states)
        elif component.get("device_class") == "enum":
            assert set(states) <= set(component["options"]), (key, states)
        elif component.get("state_class") == "measurement":
            numbers = [float(s) for s in states if s != "None"]  # None: Home Assistant's "unknown"
            assert numbers, (key, states)
        else:
            assert all(states), (key, states)
    assert "base" in {render(components["adapter_version"]["value_template"], p) for p, _ in running.listener.on("edge/test-dev/status")}


def test_readings_training_and_drift_are_in_the_status_it_reads(running: Running) -> None:
    assert running.daemon.store is not None
    wait_for(lambda: running.daemon.store.count() == STEPS * len(CHANNELS), HANG_S, "every reading stored")
    # The status is refreshed hourly here; a change of what it says of training is published at once.
    adaptation = running.daemon.adaptation
    assert adaptation is not None and adaptation.training_state == "idle"
    status = json.loads(retained(running.broker.port, "edge/test-dev/status") or b"{}")
    assert status["training"] == "idle" and set(status["drift_channels"]) == set(CHANNELS), status
    assert isinstance(status["readings"], int)


def test_a_change_of_training_reaches_the_status_at_once(running: Running) -> None:
    """Home Assistant's `training` entity follows an update within seconds, not at the hourly refresh."""
    status_topic = "edge/test-dev/status"
    assert running.daemon.store is not None
    # An update on an empty store ends at once; with every reading stored it runs until the stop.
    wait_for(lambda: running.daemon.store.count() == STEPS * len(CHANNELS), HANG_S, "every reading stored")
    before = len(running.listener.on(status_topic))
    reply = request(running.config.device.socket, {"cmd": "train"})
    assert reply["ok"] and reply["accepted"], reply
    wait_for(
        lambda: any(json.loads(p).get("training") == "running" for p, _ in running.listener.on(status_topic)[before:]),
        HANG_S, "a status saying the update runs", detail=lambda: running.daemon.status_line(),
    )  # fmt: skip
    components = the_config(running)["cmps"]
    latest = running.listener.on(status_topic)[-1][0]
    assert render(components["training"]["value_template"], latest) == "running"


def test_availability_follows_the_status_and_its_last_will(running: Running) -> None:
    config = the_config(running)
    assert config["availability_topic"] == "edge/test-dev/status"
    status = retained(running.broker.port, config["availability_topic"])
    assert status is not None
    assert render(config["availability_template"], status) == config["payload_available"]
    # The last will and the stop's status are the same record: offline.
    running.daemon.stop()
    status = retained(running.broker.port, config["availability_topic"])
    assert status is not None
    assert render(config["availability_template"], status) == config["payload_not_available"]
    # Stopping removes nothing: Home Assistant shows the device unavailable.
    assert retained(running.broker.port, config_topic(running.config)) is not None


# -- the part on its own: turning discovery off removes the config ---------------------------------


def test_turning_discovery_off_removes_the_config(tmp_path: Path, broker: LocalBroker) -> None:
    topic = "homeassistant/device/test-dev/config"

    def run(config: Config, until: str) -> None:
        store = ReplayStore(config.store_path, config.store, config.channels.names)
        ingestor = Ingestor(config, store)
        part = Discovery(config, ingestor)
        ingestor.start()
        part.start()
        try:
            assert ingestor.wait_subscribed(HANG_S)
            if until == "published":
                wait_for(lambda: retained(broker.port, topic) is not None, HANG_S, "the retained config")
            else:
                wait_for(lambda: not marker_path(config.device.state_dir).exists(), HANG_S, "the marker removed")
        finally:
            part.stop()
            ingestor.stop()
            store.close()

    on = ha_config(tmp_path, broker.port)
    assert Discovery.wanted(on)
    run(on, "published")
    assert published_topic(on.device.state_dir) == topic
    off = ha_config(tmp_path, broker.port, homeassistant={"discovery": False})
    assert Discovery.wanted(off), "a config published before must be removed"
    assert "homeassistant" in [name for name, _ in Daemon(off).builders()]
    run(off, "removed")
    assert retained(broker.port, topic) is None
    # Nothing left to do: the daemon builds no discovery part at all.
    assert not Discovery.wanted(off)
    assert "homeassistant" not in [name for name, _ in Daemon(off).builders()]


def test_a_new_prefix_removes_the_config_under_the_old_one(tmp_path: Path, broker: LocalBroker) -> None:
    config = ha_config(tmp_path, broker.port)
    config.device.state_dir.mkdir(parents=True)
    marker_path(config.device.state_dir).write_text(json.dumps({"topic": "old/device/test-dev/config"}))
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    part = Discovery(ha_config(tmp_path, broker.port, homeassistant={"prefix": "ha/one"}), Ingestor(config, store))
    store.close()
    assert part.topic == "ha/one/device/test-dev/config" and part.stale == ["old/device/test-dev/config"]


# -- uninstall --purge -------------------------------------------------------------------------------


def installed(prefix: Path, port: int, mqtt_password_file: Path | None = None) -> Path:
    """An installed service whose config turns discovery on and points at the broker on `port`."""
    inst.install(prefix=prefix, with_venv=False, device_id="pump-7", mqtt_password_file=mqtt_password_file)
    config = prefix / "etc/edge-daemon/config.toml"
    config.write_text(config_toml({
        "device": {"id": "pump-7"},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "channels": {"names": ["m1/temperature"]},
        "homeassistant": {"discovery": True},
    }))  # fmt: skip
    (prefix / "var/lib/edge-daemon").mkdir(parents=True, exist_ok=True)
    return config


def test_uninstall_purge_removes_the_config(tmp_path: Path, broker: LocalBroker) -> None:
    installed(tmp_path, broker.port)
    topic = "homeassistant/device/pump-7/config"
    client = publisher(broker.port)
    client.publish(topic, json.dumps({"dev": {"ids": ["x"]}}), qos=1, retain=True).wait_for_publish(HANG_S)
    client.loop_stop()
    client.disconnect()
    assert retained(broker.port, topic) is not None
    inst.uninstall(prefix=tmp_path, purge=True)
    assert retained(broker.port, topic) is None
    assert not (tmp_path / "var/lib/edge-daemon").exists()


def test_uninstall_purge_logs_in_with_the_password_the_service_is_given(tmp_path: Path) -> None:
    """The config names ${CREDENTIALS_DIRECTORY}/mqtt-password, as under the unit: uninstall reads the
    credential store's file the unit loads as that, and the broker (passwords only) takes it."""
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "edge", "s3cret"], check=True, capture_output=True)
    passwords.chmod(0o600)
    auth = ("edge", "s3cret")
    with running_broker(tmp_path / "broker", f"allow_anonymous false\npassword_file {passwords}\n") as broker:
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        root = tmp_path / "root"
        config = installed(root, broker.port, mqtt_password_file=secret)
        config.write_text(config.read_text().replace('port = ', 'username = "edge"\npassword_file = "${CREDENTIALS_DIRECTORY}/mqtt-password"\nport = ', 1))
        topic = "homeassistant/device/pump-7/config"
        client = publisher(broker.port, auth)
        client.publish(topic, json.dumps({"dev": {"ids": ["x"]}}), qos=1, retain=True).wait_for_publish(HANG_S)
        client.loop_stop()
        client.disconnect()
        assert retained(broker.port, topic, auth) is not None
        inst.uninstall(prefix=root, purge=True)
        assert retained(broker.port, topic, auth) is None


def test_uninstall_purge_goes_on_without_the_broker(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    installed(tmp_path, free_port())  # nothing listens there
    inst.uninstall(prefix=tmp_path, purge=True)
    assert not (tmp_path / "var/lib/edge-daemon").exists() and not (tmp_path / "etc/edge-daemon").exists()
    assert any("not reachable" in r.getMessage() and "uninstalling anyway" in r.getMessage() for r in caplog.records), caplog.text


# -- config and docs ---------------------------------------------------------------------------------


def test_the_prefix_is_a_topic_without_wildcards(tmp_path: Path) -> None:
    for bad in ("", "home/#", "ha/+/x", "/ha", "ha/", "a//b"):
        with pytest.raises(ConfigError, match="homeassistant.prefix"):
            make_config(tmp_path, homeassistant={"prefix": bad})
    assert make_config(tmp_path, homeassistant={"prefix": "site/ha"}).homeassistant.prefix == "site/ha"
    with pytest.raises(ConfigError, match="units names channels not in names"):
        make_config(tmp_path, channels={"units": {"m9/x": "V"}})
    off = make_config(tmp_path)
    assert off.homeassistant.discovery is False and off.homeassistant.prefix == "homeassistant"


def test_the_documented_example_is_what_the_daemon_publishes(tmp_path: Path) -> None:
    """docs/contract.md's discovery example: its config block builds exactly its payload (keys,
    and every value but the version)."""
    import tomllib

    documented = json.loads(one("discovery", "device").body)
    data = tomllib.loads(one("discovery-config", "device").body)
    config = make_config(tmp_path, **{section: values for section, values in data.items() if section != "device"},
                         device={"id": data["device"]["id"]})  # fmt: skip
    built = json.loads(json.dumps(discovery_payload(config)))
    assert same_shape(documented, built) == []
    for record in (built, documented):
        record["dev"]["sw"] = record["o"]["sw"] = "<version>"
    assert built == documented
