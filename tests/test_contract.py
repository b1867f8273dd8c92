"""docs/contract.md against the real thing: every example in it is checked here.

Input examples: a real Ingestor on a real broker, configured with the example's own config
block, receives the example payload on its topic; the store must then hold exactly the readings
the example's `yields` block lists. Output examples: a real daemon (base model bootstrapped from
its own store, an update, a rollback, a stop) publishes on `edge/<id>/#`; each kind of payload it
sends must have exactly the keys of its example, recursively, with compatible types. The `status`
reply example is compared with a real socket reply the same way.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.broker import LocalBroker
from edge_daemon.config import Config, parse_config
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.store import ReplayStore
from sample_sensors.generate import generate_labeled
from tests.conftest import start_daemon
from tests.payload_schemas import violations
from tests.support import wait_for
from tests.test_end_to_end import Collector, publish_steps, small_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "contract.md"
# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0
TRAIN_HANG_S = 300.0


# -- the document's example blocks -------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    attrs: dict[str, str]
    body: str
    line: int


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block whose info string carries `key=value` attributes."""
    text = DOC.read_text(encoding="utf-8") if text is None else text
    found: list[Block] = []
    for match in re.finditer(r"^```(\S+)((?: +[\w-]+=\S+)+)[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        attrs = dict(item.split("=", 1) for item in match.group(2).split())
        found.append(Block(match.group(1), attrs, match.group(3), text.count("\n", 0, match.start()) + 1))
    return found


def examples(key: str) -> list[Block]:
    return [b for b in blocks() if key in b.attrs]


def one(key: str, value: str) -> Block:
    (block,) = [b for b in blocks() if b.attrs.get(key) == value]
    return block


def test_the_document_has_every_kind_of_example() -> None:
    outputs = {b.attrs["output"] for b in examples("output")}
    assert outputs >= {
        "status", "status-offline", "forecast", "alert-anomaly", "alert-drift", "alert-adapter_accepted",
        "alert-adapter_rejected", "alert-base_model", "alert-rollback", "reply-status",
    }  # fmt: skip
    inputs = {b.attrs["input"].split("-")[0] for b in examples("input")}
    assert inputs == {"native", "zigbee2mqtt", "tasmota", "esphome", "shelly", "json"}
    for block in examples("input"):
        name = block.attrs["input"]
        one("config", name), one("yields", name)  # noqa: B018 - each input example has both
        assert "topic" in block.attrs, name
    for block in blocks():
        if block.lang == "json":
            json.loads(block.body)
        elif block.lang == "toml":
            tomllib.loads(block.body)


# -- inputs --------------------------------------------------------------------------------------


def inputs_supported() -> bool:
    return "inputs" in Config.model_fields


@dataclass(frozen=True)
class Expected:
    channel: str
    value: float
    ts: float | None  # None: the arrival time


def yields(name: str) -> tuple[list[Expected], dict[str, int]]:
    """The readings an input example must store, and its ignored counts by reason."""
    readings: list[Expected] = []
    ignored: dict[str, int] = {}
    for raw in one("yields", name).body.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("ignored "):
            _, reason, count = line.split()
            ignored[reason] = int(count)
            continue
        channel, value, stamp = line.split()
        ts = None if stamp == "arrival" else datetime.fromisoformat(stamp).timestamp()
        readings.append(Expected(channel, float(value), ts))
    return readings, ignored


def input_config(name: str, tmp_path: Path, port: int) -> Config:
    """The example's config block, completed to a whole config for this test's broker and state dir."""
    data: dict[str, Any] = tomllib.loads(one("config", name).body)
    data["device"] = {"id": "contract", "state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "control.sock")}
    data.setdefault("mqtt", {}).update(host="127.0.0.1", port=port, qos=1, client_id=f"contract-{uuid.uuid4().hex[:8]}")
    # The device clock is trusted: a reading outside the time window is rejected, never held.
    data.setdefault("store", {})["clock_trust"] = "always"
    return parse_config(data)


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"contract-pub-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


INPUT_NAMES = [b.attrs["input"] for b in examples("input")] if DOC.exists() else []


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_input_example_stores_what_the_document_says(name: str, tmp_path: Path, broker: LocalBroker) -> None:
    if not name.startswith("native") and not inputs_supported():
        pytest.skip("waits for [[inputs]] in the config")
    block = one("input", name)
    expected, ignored = yields(name)
    config = input_config(name, tmp_path, broker.port)
    # The device clock stands just after the example's timestamp, so the example is recent.
    stamps = [e.ts for e in expected if e.ts is not None]
    now = (max(stamps) if stamps else 1_800_000_000.0) + 5.0
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store, clock=lambda: now)
    ingestor.start()
    pub = publisher(broker.port)
    try:
        assert ingestor.wait_subscribed(HANG_S)
        payload = block.body.strip().encode()
        pub.publish(block.attrs["topic"], payload, qos=1).wait_for_publish(HANG_S)
        wait_for(lambda: ingestor.counters()["received"] == 1, HANG_S, "the example received")
    finally:
        pub.loop_stop()
        pub.disconnect()
        ingestor.stop()  # commits the batch
    counters = ingestor.counters()
    ts, idx, values = store.read()
    store.close()
    stored = sorted((config.channels.names[i], float(v), float(t)) for t, i, v in zip(ts, idx, values, strict=True))
    want = sorted((e.channel, e.value, now if e.ts is None else e.ts) for e in expected)
    assert [(c, v) for c, v, _ in stored] == [(c, v) for c, v, _ in want], counters
    for (_, _, got), (_, _, should) in zip(stored, want, strict=True):
        assert got == pytest.approx(should, abs=1e-3), (stored, want)
    assert counters["rejected"] == 0, counters
    if ignored:
        assert counters.get("ignored_by_reason", {}) == ignored, counters


# -- outputs -------------------------------------------------------------------------------------


def same_shape(example: Any, real: Any, where: str = "$", optional: frozenset[str] = frozenset()) -> list[str]:
    """Where `real` differs from `example` in keys (recursively) or in kind of value.

    null in either is compatible with anything (a field that may be null); int and float are
    one kind; a list's items are each compared with the example's first item. `optional`: paths
    (`$.a.b`, list indices left out) of keys the real payload may lack.
    """
    if example is None or real is None:
        return []
    if isinstance(example, dict) or isinstance(real, dict):
        if not (isinstance(example, dict) and isinstance(real, dict)):
            return [f"{where}: example {type(example).__name__}, real {type(real).__name__}"]
        problems = []
        missing = {key for key in set(example) - set(real) if f"{where}.{key}" not in optional}
        if missing or set(real) - set(example):
            problems.append(f"{where}: keys only in the example {sorted(missing)}, only in the real one {sorted(set(real) - set(example))}")
        for key in set(example) & set(real):
            problems += same_shape(example[key], real[key], f"{where}.{key}", optional)
        return problems
    if isinstance(example, list) or isinstance(real, list):
        if not (isinstance(example, list) and isinstance(real, list)):
            return [f"{where}: example {type(example).__name__}, real {type(real).__name__}"]
        if not example or not real:
            return []
        return [p for item in real for p in same_shape(example[0], item, where, optional)]
    kinds = (bool, str)
    for kind in kinds:
        if isinstance(example, kind) or isinstance(real, kind):
            ok = isinstance(example, kind) and isinstance(real, kind)
            return [] if ok else [f"{where}: example {example!r}, real {real!r}"]
    if isinstance(example, (int, float)) and isinstance(real, (int, float)):
        return []
    return [f"{where}: example {example!r}, real {real!r}"]


def test_same_shape_sees_missing_extra_and_retyped_keys() -> None:
    assert same_shape({"a": 1, "b": {"c": [1.5]}}, {"a": 2.5, "b": {"c": [3, 4]}}) == []
    assert same_shape({"a": None}, {"a": {"x": 1}}) == []
    assert same_shape({"a": 1}, {"a": 1, "b": 2})
    assert same_shape({"a": {"b": 1}}, {"a": {"c": 1}})
    assert same_shape({"a": "x"}, {"a": 1})
    assert same_shape({"a": [{"b": 1}]}, {"a": [{"b": 1}, {"c": 1}]})
    assert same_shape({"a": 1, "b": {"c": 1}}, {"b": {}}, optional=frozenset({"$.a", "$.b.c"})) == []


OLD_STEPS = 1200
NEW_STEPS = 400


@dataclass
class Live:
    """What a real daemon published on edge/<id>/# and answered on its socket."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of(self, output: str) -> list[dict[str, Any]]:
        if output == "status":
            return [p for t, p in self.messages if t.endswith("/status") and p.get("online") is True]
        if output == "status-offline":
            return [p for t, p in self.messages if t.endswith("/status") and p.get("online") is False]
        if output == "forecast":
            return [p for t, p in self.messages if t.endswith("/forecast")]
        if output.startswith("alert-"):
            kind = output.removeprefix("alert-")
            return [p for t, p in self.messages if t.endswith("/alert") and p.get("type") == kind]
        if output.startswith("reply-"):
            reply = self.replies.get(output.removeprefix("reply-"))
            return [] if reply is None else [reply]
        raise AssertionError(f"unknown output {output!r}")


def run_live(workdir: Path, broker: LocalBroker) -> Live:
    """A daemon without a base model: it bootstraps one from the motor's normal regime, forecasts and
    alerts on a bearing-wear regime, runs a requested update, is rolled back, then stopped."""
    total = OLD_STEPS + NEW_STEPS
    data = generate_labeled(total, start_ts=float(int(time.time()) - total - 30), seed=3, regime_change_at=OLD_STEPS, time_scale=144)
    cfg = small_config(
        workdir, broker.port,
        model={"bootstrap_min_windows": 300, "pretrain_steps": 60},
        train={"start_on": ["request"], "gate_tolerance": 10.0, "recent_hours": NEW_STEPS / 3600},
        outputs={"forecast_every": 1, "anomaly_threshold": 2.0, "status_interval_s": 1},
        drift={"input_window_s": 120, "residual_window_s": 120, "min_samples": 30},
    )  # fmt: skip
    live = Live()
    collector = Collector(broker.port)
    daemon = Daemon(cfg)
    start_daemon(daemon)
    socket_path = cfg.device.socket
    stopped = False
    try:
        assert daemon.store is not None

        def alerts(kind: str) -> list[dict[str, Any]]:
            return [a for a in collector.of("alert") if a.get("type") == kind]

        publish_steps(broker.port, data.ts, data.values, 0, OLD_STEPS)
        wait_for(lambda: alerts("base_model"), TRAIN_HANG_S, "a base model bootstrapped", detail=lambda: daemon.status_line())
        publish_steps(broker.port, data.ts, data.values, OLD_STEPS, total)
        wait_for(lambda: daemon.store.count() == 3 * total, HANG_S * 3, "every reading stored")
        wait_for(lambda: collector.of("forecast") and alerts("anomaly") and alerts("drift"), HANG_S * 2, "forecasts, anomalies and drift",
                 detail=lambda: sorted({a.get("type") for a in collector.of("alert")}))  # fmt: skip
        assert request(socket_path, {"cmd": "train"})["accepted"]
        wait_for(lambda: alerts("adapter_accepted") or alerts("adapter_rejected"), TRAIN_HANG_S, "the update's verdict")
        version = daemon.adaptation.adapters.current_version()
        if version is not None:
            assert request(socket_path, {"cmd": "rollback", "version": version})["ok"]
            wait_for(lambda: alerts("rollback"), HANG_S, "the rollback alert")
        for cmd in ("status", "adapter", "adapters", "drift", "train"):
            live.replies[cmd] = request(socket_path, {"cmd": cmd})
        if version is not None:
            live.replies["rollback"] = request(socket_path, {"cmd": "rollback", "version": version})
        live.replies["error"] = request(socket_path, {"cmd": "rollback", "version": 99})
        daemon.stop()
        stopped = True
        wait_for(lambda: any(p.get("online") is False for t, p in collector.messages if t.endswith("/status")), HANG_S, "the offline status")
        live.messages = list(collector.messages)
    finally:
        if not stopped:
            daemon.stop()
        collector.close()
    return live


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("contract-live")
    (workdir / "broker").mkdir()
    broker = LocalBroker(workdir=workdir / "broker")
    broker.start()
    try:
        yield run_live(workdir, broker)
    finally:
        broker.close()


OUTPUT_NAMES = [b.attrs["output"] for b in examples("output")] if DOC.exists() else []


@pytest.mark.parametrize("name", OUTPUT_NAMES)
def test_output_example_has_the_keys_of_the_real_payload(name: str, live: Live, tmp_path: Path) -> None:
    block = one("output", name)
    example = json.loads(block.body)
    optional = frozenset(f"$.{path}" for path in block.attrs.get("optional", "").split(",") if path)
    real = live.of(name)
    if name == "alert-store_damaged" and not real:
        # The live run's store is intact: the alert a really damaged one gets (published by the
        # daemon in tests/test_store_damaged.py).
        real = [damaged_store_alert(tmp_path)]
    if name in ("alert-adapter_damaged", "alert-base_damaged") and not real:
        # Nor is a file of its models damaged: the alerts' own builders (published by the daemon
        # in tests/test_artifacts_damaged.py).
        from edge_daemon.mqtt.outputs import adapter_damaged_alert, base_damaged_alert

        real = [dict(adapter_damaged_alert(3, 2, "adapter v3 is damaged")) if name == "alert-adapter_damaged"
                else dict(base_damaged_alert("base model is damaged", str(tmp_path / "base.damaged-1")))]  # fmt: skip
    if name == "alert-adapter_rejected" and not real:
        # One update ran and was accepted: a rejection carries the same fields (version null).
        real = [{**payload, "type": "adapter_rejected"} for payload in live.of("alert-adapter_accepted")]
    if name == "alert-adapter_accepted" and not real:
        real = [{**payload, "type": "adapter_accepted"} for payload in live.of("alert-adapter_rejected")]
    assert real, f"the daemon sent no {name}"
    for payload in real:
        assert payload.get("type", example.get("type")) == example.get("type"), payload
        problems = same_shape(example, payload, optional=optional)
        assert not problems, (problems, json.dumps(payload, indent=2))


def damaged_store_alert(tmp_path: Path) -> dict[str, Any]:
    from edge_daemon.mqtt.outputs import store_damaged_alert
    from edge_daemon.store import check_store

    path = tmp_path / "store.db"
    path.write_bytes(b"not a database" * 1000)
    check = check_store(path)
    assert check.problem is not None and check.moved_to is not None
    return dict(store_damaged_alert(check.problem, str(check.moved_to)))


def test_every_published_payload_matches_its_schema(live: Live) -> None:
    """Every message the daemon published, on every topic, against the schema shipped for it."""
    topics = {topic.rsplit("/", 1)[-1] for topic, _ in live.messages}
    assert topics == {"status", "forecast", "alert"}, topics
    problems = [problem for topic, payload in live.messages for problem in violations(topic, payload)]
    assert not problems, problems


def mqtt_topic_of(output: str) -> str | None:
    """The topic an output example is published on (None: a socket reply)."""
    if output.startswith("reply-"):
        return None
    return output.split("-", 1)[0]


@pytest.mark.parametrize("name", [n for n in OUTPUT_NAMES if mqtt_topic_of(n) is not None])
def test_output_example_matches_its_schema(name: str) -> None:
    topic = mqtt_topic_of(name)
    assert violations(f"edge/pump-1/{topic}", json.loads(one("output", name).body)) == []
