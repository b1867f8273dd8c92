"""The daemon as a process: zero loss across SIGKILLs, bad input never fatal, SIGTERM, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHANNELS
from payload_schemas import violations
from edge_daemon.broker import LocalBroker
from edge_daemon.config import StoreConfig
from edge_daemon.control.client import request
from edge_daemon.store import ReplayStore, stored_ts

REPO = Path(__file__).resolve().parents[1]
# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0


def write_config(tmp_path: Path, broker: LocalBroker, **extra: dict[str, object]) -> Path:
    """A TOML config for a daemon of this test's own."""
    sections: dict[str, dict[str, object]] = {
        "device": {"id": "test-dev", "state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "control.sock")},
        "mqtt": {"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "channels": {"names": list(CHANNELS)},
        "store": {"flush_interval_s": 0.05},
    }
    if broker.kind != "mosquitto":
        sections["mqtt"]["protocol"] = "3.1.1"
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """`python -m edge_daemon run --config PATH` as a child process."""

    def __init__(self, config_path: Path, socket_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = HANG_S, env: dict[str, str] | None = None) -> None:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_daemon", "run", "--config", str(self.config_path)],
                stdout=log_file, stderr=log_file, cwd=REPO, env=None if env is None else {**os.environ, **env},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited at start:\n{self.log_path.read_text()[-3000:]}"
            try:
                if self.status(10.0)["ingest"]["connected"]:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not connected within {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def status(self, timeout: float = HANG_S) -> dict:
        return request(self.socket_path, {"cmd": "status"}, timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(HANG_S)

    def terminate(self, timeout: float = HANG_S) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(HANG_S)


@pytest.fixture
def daemon(tmp_path: Path, broker: LocalBroker) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(write_config(tmp_path, broker), tmp_path / "control.sock", tmp_path / "daemon.log")
    try:
        yield proc
    finally:
        proc.close()


def stored_keys(tmp_path: Path) -> set[tuple[int, float]]:
    store = ReplayStore(tmp_path / "state" / "store.db", StoreConfig(), list(CHANNELS))
    try:
        ts, idx, _ = store.read()
        return set(zip(idx.tolist(), ts.tolist()))
    finally:
        store.close()


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# A publisher in its own process: QoS 1 readings at a steady rate, each with its own ts. Given a
# fifth argument `hold_at`, it holds back the readings from there on until a line arrives on its
# stdin (test_shutdown: the stream is still flowing at SIGTERM however fast the machine is).
PUBLISHER = r"""
import json, os, sys, time
import paho.mqtt.client as mqtt
port, total, rate, base = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
hold_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1
channels = ["m1/temperature", "m1/vibration", "m1/current"]
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-publisher-{os.getpid()}", protocol=mqtt.MQTTv311)
client.max_inflight_messages_set(200)
client.connect("127.0.0.1", port)
client.loop_start()
started = time.monotonic()
infos = []
for i in range(total):
    if i == hold_at:
        sys.stdin.readline()
        started = time.monotonic() - i / rate
    payload = json.dumps({"ts": base + (i // 3) * 0.01, "value": i})
    infos.append(client.publish("sensors/" + channels[i % 3], payload, qos=1))
    ahead = started + i / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
for info in infos:
    info.wait_for_publish(300)
client.disconnect()
client.loop_stop()
print("published", total, flush=True)
"""


def test_zero_loss_across_sigkills(tmp_path: Path, broker: LocalBroker, daemon: DaemonProcess) -> None:
    total = 20_000
    daemon.start()
    base = time.time() - 3600
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(broker.port), str(total), "2500", str(base)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        kills = 0
        for fraction in (0.25, 0.55):
            # Kill while the stream is flowing: some readings committed, some in a pending batch.
            wait_for(lambda f=fraction: daemon.status()["store"]["readings"] >= f * total, HANG_S, f"{fraction:.0%} stored")
            daemon.kill()
            kills += 1
            # An outage of at least this long, so the broker queues for the persistent session
            # meanwhile; nothing below depends on how long it really lasts.
            time.sleep(0.5)
            daemon.start()
        out, _ = publisher.communicate(timeout=2 * HANG_S)
        assert publisher.returncode == 0, out
        wait_for(lambda: daemon.status()["store"]["readings"] >= total, HANG_S, "every reading stored")
        status = daemon.status()
        assert daemon.terminate() == 0
    finally:
        if publisher.poll() is None:
            publisher.kill()
    assert kills == 2
    assert status["store"]["readings"] == total
    expected = {(i % 3, stored_ts(base + (i // 3) * 0.01)) for i in range(total)}  # kept to the microsecond
    assert stored_keys(tmp_path) == expected


# -- bad input ----------------------------------------------------------------------------------

MAX_AGE = StoreConfig().max_age_s
MAX_SKEW = StoreConfig().max_skew_s
NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10)
VALUE = st.floats(-1e6, 1e6, allow_nan=False)


@st.composite
def payload_case(draw: st.DrawFn, now: float, serial: Iterator[int]) -> tuple[str, bytes, list[tuple[str, float, float]], Counter[str]]:
    """(topic, payload, readings it must store, rejections by reason it must count)."""
    kind = draw(st.sampled_from([
        "valid", "valid_map", "partial_map", "bad_utf8", "bad_json", "non_finite", "not_a_number", "unknown_channel",
        "too_old", "future", "bad_ts", "too_large", "too_deep", "bad_shape", "bad_topic",
    ]))  # fmt: skip
    sensor, channel = draw(st.sampled_from(CHANNELS)).split("/")
    topic = f"sensors/{sensor}/{channel}"
    # A ts no other case uses, so every stored reading can be traced back to its payload.
    ts = round(now - 1800 + next(serial) * 0.001, 3)
    value = draw(VALUE)

    def obj(ts_value: object, val: object) -> bytes:
        return json.dumps({"ts": ts_value, "value": val}).encode()

    if kind == "valid":
        return topic, obj(ts, value), [(f"{sensor}/{channel}", ts, value)], Counter()
    if kind in ("valid_map", "partial_map"):
        chosen = draw(st.lists(st.sampled_from(["temperature", "vibration", "current"]), min_size=1, unique=True))
        values: dict[str, object] = {name: draw(VALUE) for name in chosen}
        rejected: Counter[str] = Counter()
        if kind == "partial_map":
            values[draw(NAMES.filter(lambda n: n not in values)) + "_x"] = 1.0
            rejected["unknown_channel"] += 1
        payload = json.dumps({"ts": ts, "values": values}).encode()
        good = [(f"m1/{name}", ts, float(v)) for name, v in values.items() if name in chosen]  # type: ignore[arg-type]
        return "sensors/m1", payload, good, rejected
    if kind == "bad_utf8":
        return topic, b"\xff" + draw(st.binary(max_size=40)), [], Counter(bad_utf8=1)
    if kind == "bad_json":
        # An object that never closes is never valid JSON, whatever follows the brace.
        rest = draw(st.text(st.characters(blacklist_characters="{}[]", blacklist_categories=["Cs"]), max_size=40))
        return topic, ("{" + rest).encode(), [], Counter(bad_json=1)
    if kind == "non_finite":
        bad = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]))
        form = draw(st.booleans())
        payload = bad.encode() if form else f'{{"ts": {ts}, "value": {bad}}}'.encode()
        return topic, payload, [], Counter(non_finite=1)
    if kind == "not_a_number":
        bad = draw(st.sampled_from([True, False, None, "12.5", [1.0], {"v": 1}]))
        return topic, obj(ts, bad), [], Counter(not_a_number=1)
    if kind == "unknown_channel":
        other = draw(NAMES.filter(lambda n: n not in ("temperature", "vibration", "current")))
        return f"sensors/{sensor}/{other}", obj(ts, value), [], Counter(unknown_channel=1)
    if kind == "too_old":
        return topic, obj(now - MAX_AGE - draw(st.floats(3600, 1.7e9)), value), [], Counter(too_old=1)
    if kind == "future":
        return topic, obj(now + MAX_SKEW + draw(st.floats(3600, 1e10)), value), [], Counter(future=1)
    if kind == "bad_ts":
        return topic, obj(draw(st.sampled_from(["now", None, True, [1]])), value), [], Counter(bad_ts=1)
    if kind == "too_large":
        return topic, obj(ts, value) + b" " * 17000, [], Counter(too_large=1)
    if kind == "too_deep":
        depth = draw(st.integers(5, 5000))
        return topic, b"[" * depth + b"]" * depth, [], Counter(too_deep=1)
    if kind == "bad_shape":
        payload = draw(st.sampled_from([
            json.dumps({"value": value}),
            json.dumps({"ts": ts, "value": value, "extra": 1}),
            json.dumps({"ts": ts, "values": {"temperature": value}}),
            json.dumps({"ts": ts}),
        ]))  # fmt: skip
        return topic, payload.encode(), [], Counter(bad_shape=1)
    assert kind == "bad_topic"
    return f"sensors/{sensor}/{channel}/{draw(NAMES)}", obj(ts, value), [], Counter(bad_topic=1)


def test_malformed_payloads_never_fatal_and_every_valid_reading_stored(
    tmp_path: Path, broker: LocalBroker, daemon: DaemonProcess
) -> None:
    # A trusted clock: readings outside the time window are rejected at once, never held (the
    # hold is tested in test_clock.py), whatever this machine's kernel says of its clock.
    write_config(tmp_path, broker, store={"flush_interval_s": 0.05, "clock_trust": "always"})
    daemon.start()
    now = time.time()
    serial = iter(range(10**9))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzz-publisher", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(200)
    client.connect(broker.host, broker.port)
    client.loop_start()
    expected_readings: list[tuple[str, float, float]] = []
    expected_rejected: Counter[str] = Counter()
    sent = 0
    lock = threading.Lock()

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(payload_case(now, serial), min_size=80, max_size=120))
    def publish_cases(cases: list[tuple[str, bytes, list[tuple[str, float, float]], Counter[str]]]) -> None:
        nonlocal sent
        infos = []
        for topic, payload, readings, rejected in cases:
            infos.append(client.publish(topic, payload, qos=1))
            with lock:
                expected_readings.extend(readings)
                expected_rejected.update(rejected)
                sent += 1
        for info in infos:
            info.wait_for_publish(30)

    publish_cases()
    client.disconnect()
    client.loop_stop()
    assert sent >= 2000
    wait_for(lambda: daemon.status()["ingest"]["received"] >= sent, HANG_S, f"{sent} messages received")
    wait_for(lambda: daemon.status()["ingest"]["readings"] >= len(expected_readings), HANG_S, "the last batch")
    status = daemon.status()
    assert daemon.proc is not None and daemon.proc.poll() is None  # alive throughout
    ingest = status["ingest"]
    assert ingest["received"] == sent
    assert ingest["rejected_by_reason"] == dict(expected_rejected)
    assert ingest["rejected"] == sum(expected_rejected.values())
    assert ingest["stored"] == len({(c, t) for c, t, _ in expected_readings}) == status["store"]["readings"]
    assert daemon.terminate() == 0
    store = ReplayStore(tmp_path / "state" / "store.db", StoreConfig(), list(CHANNELS))
    ts, idx, values = store.read()
    store.close()
    got = {(CHANNELS[i], t): v for i, t, v in zip(idx.tolist(), ts.tolist(), values.tolist())}
    assert got == {(c, t): v for c, t, v in expected_readings}


# -- shutdown and the command line ----------------------------------------------------------


def test_sigterm_flushes_publishes_offline_and_exits_zero(tmp_path: Path, broker: LocalBroker, daemon: DaemonProcess) -> None:
    # A flush interval no run of this test reaches: the readings are still in the pending batch
    # when SIGTERM arrives, however slowly the steps before it go.
    write_config(tmp_path, broker, store={"flush_interval_s": 3600.0, "batch_size": 10_000}, mqtt={"broker_inflight": 1000})
    daemon.start()
    statuses: list[bytes] = []
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    watcher.on_message = lambda c, u, m: statuses.append(m.payload)
    watcher.connect(broker.host, broker.port)
    watcher.subscribe("edge/test-dev/status", qos=1)
    watcher.loop_start()
    wait_for(lambda: bool(statuses), HANG_S, "retained online status")
    online = json.loads(statuses[-1])
    assert online["online"] is True and online["device"] == "test-dev"

    base = time.time() - 60
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    for i in range(50):
        pub.publish("sensors/m1/current", json.dumps({"ts": base + i, "value": i}), qos=1).wait_for_publish(HANG_S)
    wait_for(lambda: daemon.status()["ingest"]["received"] == 50, HANG_S, "50 messages received")
    assert daemon.status()["store"]["readings"] == 0  # still pending
    assert daemon.terminate() == 0
    wait_for(lambda: json.loads(statuses[-1])["online"] is False, HANG_S, "offline status")
    pub.loop_stop()
    watcher.loop_stop()
    assert len(stored_keys(tmp_path)) == 50
    assert not (tmp_path / "control.sock").exists()
    # Every status it published (online at connect and refreshed, offline at stop) has its schema's shape.
    assert not [problem for payload in statuses for problem in violations("edge/test-dev/status", json.loads(payload))]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_daemon", *args], capture_output=True, text=True, cwd=REPO, timeout=2 * HANG_S)


def test_cli_validate_config_and_status(tmp_path: Path, broker: LocalBroker, daemon: DaemonProcess) -> None:
    good = write_config(tmp_path, broker)
    assert run_cli("validate-config", str(good)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("[store]", "[store]\nbudget_mb = -1\nbogus = 2"))
    result = run_cli("validate-config", str(bad))
    assert result.returncode == 1
    assert "store.budget_mb" in result.stderr and "store.bogus: unknown key" in result.stderr

    daemon.start()
    result = run_cli("status", "--json", "--config", str(good))
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] is True and reply["device"] == "test-dev"
    assert set(reply["ingest"]) >= {"received", "stored", "rejected", "rejected_by_reason"}
    assert set(reply["store"]) == {"readings", "bytes", "disk_free_bytes", "disk_full", "check", "damaged"}
    human = run_cli("status", "--socket", str(tmp_path / "control.sock"))
    assert human.returncode == 0 and "test-dev" in human.stdout and "readings" in human.stdout
    assert daemon.terminate() == 0
    gone = run_cli("status", "--socket", str(tmp_path / "control.sock"))
    assert gone.returncode == 3 and "no daemon socket" in gone.stderr
    for command in ("run", "validate-config", "status"):
        assert "example:" in run_cli(command, "--help").stdout


def test_control_socket_mode_and_errors(tmp_path: Path, daemon: DaemonProcess) -> None:
    daemon.start()
    mode = os.stat(tmp_path / "control.sock").st_mode & 0o777
    assert mode & 0o007 == 0 and mode <= 0o660
    reply = request(tmp_path / "control.sock", {"cmd": "no-such-command"}, HANG_S)
    assert reply["ok"] is False and "unknown command" in reply["error"]
    assert daemon.terminate() == 0
