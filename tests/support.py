"""Helpers for tests and benchmarks that drive a daemon process: its config file, its status, waiting."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edge_daemon.control.client import request


def config_toml(data: dict[str, dict[str, Any]]) -> str:
    """Config sections as TOML: JSON scalars and lists of them are valid TOML values."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def daemon_status(socket_path: Path, timeout: float = 30.0) -> dict[str, Any] | None:
    """The daemon's `status` reply, or None while it is not listening (or answers with an error)."""
    try:
        reply = request(socket_path, {"cmd": "status"}, timeout=timeout)
    except Exception:
        return None
    return reply if reply.get("ok") else None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2, detail: Callable[[], Any] | None = None) -> Any:
    """The first truthy value of `predicate()`; the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {detail()}" if detail else ""))


def publish_motor(port: int, start_ts: float, steps: int, client_name: str = "publisher") -> None:
    """`steps` values maps of the three motor channels (`sensors/m1`, QoS 1, one a second from
    `start_ts`; temperature counts the steps), all acknowledged by the broker on return."""
    import uuid

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_name}-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    for k in range(steps):
        payload = '{"ts": %.1f, "values": {"temperature": %d, "vibration": 0.5, "current": 3}}' % (start_ts + k, k)
        infos.append(client.publish("sensors/m1", payload, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()


class AlertSubscriber:
    """The device's alerts (`edge/+/alert`; or another of its outputs, `topic`), subscribed (SUBACK
    received) before it returns, so a daemon started next cannot alert before it listens."""

    def __init__(self, port: int, topic: str = "edge/+/alert") -> None:
        import threading
        import uuid

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.received: list[dict[str, Any]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"alerts-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, m: self.received.append(json.loads(m.payload))
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(30), "no SUBACK"

    def of(self, kind: str) -> dict[str, Any] | None:
        """The first alert of `type` kind (None: none yet)."""
        return next((a for a in self.received if a.get("type") == kind), None)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def openssl_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (P-256, two days): (<name>.crt, <name>.key) in `directory`."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


def openssl_signed(
    directory: Path, ca: tuple[Path, Path], name: str, extensions: str, passphrase: str | None = None
) -> tuple[Path, Path]:
    """A certificate for CN `name` signed by `ca` with `extensions` ("subjectAltName=DNS:localhost,IP:127.0.0.1"),
    its key encrypted with `passphrase` if given: (<name>.crt, <name>.key)."""
    (directory / f"{name}.ext").write_text(extensions + "\n")
    key_args = ("-passout", f"pass:{passphrase}") if passphrase is not None else ("-nodes",)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", *key_args,
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=directory)  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


def legacy_store(
    path: Path, readings: Iterable[tuple[str, float, float]], migrations: int = 2, segment_s: float = 300.0
) -> None:
    """A store file as a version before its readings were keyed by time left it: the first
    `migrations` schema migrations applied, `readings` (channel, ts, value) in the (channel_id,
    ts) table, counted in their segments of `segment_s`."""
    import itertools
    import random

    import sqlite_utils

    from edge_daemon.store import segment_of
    from edge_daemon.store_schema import MIGRATION_SET, MIGRATIONS

    if migrations > 2:
        raise ValueError("a legacy store has at most the first two migrations")
    db = sqlite_utils.Database(path)
    db.conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.conn.execute("PRAGMA journal_mode = WAL")
    record = sqlite_utils.Migrations(MIGRATION_SET)
    for name, apply in MIGRATIONS[:migrations]:
        record(name=name)(apply)
    record.apply(db)
    rng = random.Random(1)
    ids: dict[str, int] = {}
    per: dict[int, int] = {}
    rows = iter(readings)
    while chunk := list(itertools.islice(rows, 100_000)):
        with db.conn:
            for channel, _, _ in chunk:
                if channel not in ids:
                    ids[channel] = int(db.conn.execute("INSERT INTO channels (name) VALUES (?)", (channel,)).lastrowid or 0)
            db.conn.executemany("INSERT INTO readings (channel_id, ts, value) VALUES (?, ?, ?)", [(ids[c], ts, v) for c, ts, v in chunk])
        for _, ts, _ in chunk:
            k = segment_of(ts, segment_s)
            per[k] = per.get(k, 0) + 1
    with db.conn:
        db.conn.executemany("INSERT INTO segments (id, priority, rows) VALUES (?, ?, ?)", [(k, rng.random(), n) for k, n in per.items()])
        db.conn.execute("INSERT INTO meta (key, value) VALUES ('segment_s', ?)", (repr(float(segment_s)),))
    db.conn.close()
