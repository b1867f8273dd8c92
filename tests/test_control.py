"""The control socket server and client: protocol, bad clients, concurrency, permissions.

Handlers here return the reply shapes the daemon's handlers return; the real daemon is
exercised end to end in test_cli.py and test_daemon_ingest.py.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_daemon.control.client import request
from edge_daemon.control.protocol import Handler
from edge_daemon.control.server import ControlServer
from edge_daemon.errors import AdapterError, ControlError, DaemonUnreachable

# -- the reply shapes of the daemon's handlers -------------------------------------------------

ADAPTER = {"version": 3, "created": "2024-05-01T12:00:03+00:00", "size_bytes": 45678, "val_loss": 0.01234}
DRIFT = {
    "detected": True,
    "channels": {
        "m1/temperature": {"state": "stable", "detections": 0, "last_detected": None,
                           "residual_level": 0.4, "residual_baseline": 0.5,
                           "psi": {"value": 0.12, "threshold": 1.0, "reference": "training data", "window_filled": 1.0}},
        "m1/vibration": {"state": "drift", "detections": 2, "last_detected": "2024-05-01T12:00:03+00:00",
                         "residual_level": 1.8, "residual_baseline": 0.9,
                         "psi": {"value": 2.5, "threshold": 1.0, "reference": "training data", "window_filled": 1.0}},
        "m1/current": {"state": "stable", "detections": 1, "last_detected": "2024-04-30T08:00:00+00:00",
                       "residual_level": None, "residual_baseline": None,
                       "psi": {"value": None, "threshold": 1.0, "reference": "learning", "window_filled": 0.35},
                       "residual_window": {"ratio": None, "threshold": 2.0, "baseline": "learning", "window_filled": 0.4}},
    },
    "last_detected": "2024-05-01T12:00:03+00:00",
}  # fmt: skip
STATUS = {
    "device": "pump-07",
    "uptime_s": 3725.2,
    "store": {"readings": 123456, "bytes": 2_345_678},
    "ingest": {"received": 1000, "stored": 990, "rejected": 10, "rejected_by_reason": {"bad_json": 4, "too_old": 6}},
    "adapter": ADAPTER,
    "drift": DRIFT,
    "memory": {"rss_mb": 312.4, "budget_mb": 1024.0, "level": "elevated"},
    "training": {
        "state": "idle",
        "last": {"accepted": True, "version": 3, "finished": "2024-05-01T12:00:03+00:00", "reason": "beat the incumbent"},
        "plan": {"micro_batch": 8, "accumulation": 4, "checkpointing": True, "optimizer": "adamw8bit"},
    },
}
ADAPTERS = {
    "current": 3,
    "adapters": [
        {"version": v, "created": f"2024-05-0{v}T12:00:00+00:00", "size_bytes": 40000 + v, "val_loss": 0.1 / v,
         "current": v == 3,
         "metrics": {"recent_before": 0.2, "recent_after": 0.1 + v / 100, "replay_before": 0.3, "replay_after": 0.29}}
        for v in (1, 2, 3)
    ],
}  # fmt: skip

# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 60.0


class FakeDaemon:
    """Handlers with the daemon's reply shapes; records the requests it gets."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = copy.deepcopy(STATUS)
        self.adapters = copy.deepcopy(ADAPTERS)
        self.train_reply: dict[str, Any] = {"accepted": True, "state": "running", "message": "update started"}

    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self._record(lambda r: self.status),
            "adapter": self._record(lambda r: {"adapter": self.status.get("adapter") or {"version": None}}),
            "adapters": self._record(lambda r: self.adapters),
            "drift": self._record(lambda r: {"drift": self.status["drift"]}),
            "train": self._record(lambda r: self.train_reply),
            "rollback": self._record(self._rollback),
        }

    def _record(self, handler: Handler) -> Handler:
        def wrapped(req: dict[str, Any]) -> dict[str, Any]:
            self.requests.append(req)
            return handler(req)

        return wrapped

    def _rollback(self, req: dict[str, Any]) -> dict[str, Any]:
        versions = {a["version"]: a for a in self.adapters["adapters"]}
        if req["version"] not in versions:
            raise AdapterError(f"no adapter v{req['version']} (have {', '.join(f'v{v}' for v in sorted(versions))})")
        self.adapters["current"] = req["version"]
        chosen = versions[req["version"]]
        return {"adapter": {k: chosen[k] for k in ("version", "created", "size_bytes", "val_loss")}}


@pytest.fixture
def fake() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
def server(tmp_path: Path, fake: FakeDaemon) -> Iterator[ControlServer]:
    handlers = fake.handlers()
    handlers["echo"] = lambda r: {"n": r.get("n")}
    # A client timeout no test here runs into by being slow; the timeout tests build their own server.
    srv = ControlServer(tmp_path / "run" / "control.sock", handlers, client_timeout_s=HANG_S)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def connect(path: Path, timeout: float = HANG_S) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def read_line(sock: socket.socket) -> bytes:
    """One reply line, or b'' if the server closed without one."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


class LineReader:
    """Reply lines from one connection; several may arrive in one recv."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"


def wait_for(predicate: Any, what: str, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def held_open(sock: socket.socket) -> bool:
    """True while the server keeps `sock` open and has sent nothing on it."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(HANG_S)
    return False


def exchange(path: Path, raw: bytes) -> dict[str, Any] | None:
    """Send raw bytes on a fresh connection; the reply object, or None if closed without one."""
    with connect(path) as sock:
        sock.sendall(raw)
        line = read_line(sock)
    return json.loads(line) if line else None


# -- protocol ----------------------------------------------------------------------------------


def test_every_command_round_trips(server: ControlServer, fake: FakeDaemon) -> None:
    assert request(server.path, {"cmd": "status"}) == {"ok": True, **STATUS}
    assert request(server.path, {"cmd": "adapter"}) == {"ok": True, "adapter": ADAPTER}
    assert request(server.path, {"cmd": "adapters"}) == {"ok": True, **ADAPTERS}
    assert request(server.path, {"cmd": "drift"}) == {"ok": True, "drift": DRIFT}
    assert request(server.path, {"cmd": "train"}) == {"ok": True, "accepted": True, "state": "running", "message": "update started"}
    reply = request(server.path, {"cmd": "rollback", "version": 2})
    assert reply["ok"] is True and reply["adapter"]["version"] == 2
    missing = request(server.path, {"cmd": "rollback", "version": 9})
    assert missing == {"ok": False, "error": "no adapter v9 (have v1, v2, v3)"}
    assert [r["cmd"] for r in fake.requests] == ["status", "adapter", "adapters", "drift", "train", "rollback", "rollback"]


def test_several_requests_on_one_connection_are_answered_in_order(server: ControlServer) -> None:
    with connect(server.path) as sock:
        sock.sendall(b"".join(json.dumps({"cmd": "echo", "n": i}).encode() + b"\n" for i in range(50)) + b"\n\n")
        replies = []
        buf = b""
        while len(replies) < 50:
            buf += sock.recv(65536)
            *lines, buf = buf.split(b"\n")
            replies.extend(json.loads(line) for line in lines)
    assert [r["n"] for r in replies] == list(range(50))
    # The last request may end at EOF instead of a newline.
    with connect(server.path) as sock:
        sock.sendall(b'{"cmd": "echo", "n": 7}')
        sock.shutdown(socket.SHUT_WR)
        assert json.loads(read_line(sock)) == {"ok": True, "n": 7}


BAD_REQUESTS = [
    (b"\xff\xfe{}\n", "not valid UTF-8"),
    (b"{\"cmd\": \"status\"\n", "not valid JSON"),
    (b"status\n", "not valid JSON"),
    (b"[" * 100_00 + b"]" * 100_00 + b"\n", "not valid JSON"),  # deep nesting: RecursionError inside json
    (b'{"cmd": "rollback", "version": 1' + b"0" * 5000 + b"}\n", "not valid JSON"),  # int beyond Python's digit limit
    (b"[]\n", 'a JSON object with a "cmd" string'),
    (b'"status"\n', 'a JSON object with a "cmd" string'),
    (b"{}\n", 'a JSON object with a "cmd" string'),
    (b'{"cmd": 1}\n', 'a JSON object with a "cmd" string'),
    (b'{"cmd": null}\n', 'a JSON object with a "cmd" string'),
    (b'{"cmd": "reboot"}\n', "unknown command 'reboot' (known: adapter, adapters, drift, echo, rollback, status, train)"),
    (b'{"cmd": "rollback"}\n', "rollback: missing argument 'version'"),
    (b'{"cmd": "rollback", "version": "3"}\n', "'version' must be a positive integer, got str"),
    (b'{"cmd": "rollback", "version": true}\n', "'version' must be a positive integer, got bool"),
    (b'{"cmd": "rollback", "version": 2.0}\n', "'version' must be a positive integer, got float"),
    (b'{"cmd": "rollback", "version": 0}\n', "'version' must be a positive integer, got 0"),
    (b'{"cmd": "rollback", "version": -4}\n', "'version' must be a positive integer, got -4"),
    (b'{"cmd": "rollback", "version": null}\n', "'version' must be a positive integer, got NoneType"),
]


@pytest.mark.parametrize(("raw", "error"), BAD_REQUESTS, ids=[f"bad{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_an_error_reply(server: ControlServer, raw: bytes, error: str) -> None:
    reply = exchange(server.path, raw)
    assert reply is not None and reply["ok"] is False
    assert error in reply["error"]
    assert request(server.path, {"cmd": "status"})["ok"] is True


def test_overlong_line_is_refused_and_the_connection_closed(server: ControlServer) -> None:
    with connect(server.path) as sock:
        # More than the cap with no newline: refused before the client finishes sending.
        try:
            sock.sendall(b'{"cmd": "status", "pad": "' + b"x" * (server.max_request_bytes + 10))
        except OSError:
            pass
        reply = json.loads(read_line(sock))
        assert reply == {"ok": False, "error": f"request longer than {server.max_request_bytes} bytes"}
        assert read_line(sock) == b""  # closed
    # Also when the newline arrives in the same burst.
    with connect(server.path) as sock:
        try:
            sock.sendall(json.dumps({"cmd": "echo", "n": 1, "pad": "x" * 2 * server.max_request_bytes}).encode() + b"\n")
        except OSError:
            pass
        assert json.loads(read_line(sock))["error"] == f"request longer than {server.max_request_bytes} bytes"
    # A line of exactly the cap is still served.
    line = json.dumps({"cmd": "echo", "n": 1, "pad": ""}).encode()
    line = line[:-2] + b" " * (server.max_request_bytes - len(line)) + line[-2:]
    assert len(line) == server.max_request_bytes
    assert exchange(server.path, line + b"\n") == {"ok": True, "n": 1}


def test_handler_failures_become_error_replies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def boom(req: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    handlers: dict[str, Handler] = {
        "status": lambda r: {"device": "d"},
        "boom": boom,
        "adapter": lambda r: {"adapter": {"version": 1, "val_loss": float("nan")}},
        "weird": lambda r: ["not", "a", "dict"],  # type: ignore[return-value,arg-type]
        "fake_ok": lambda r: {"ok": False, "x": 1},
    }
    srv = ControlServer(tmp_path / "c.sock", handlers)
    srv.start()
    try:
        with caplog.at_level(logging.ERROR, logger="edge_daemon.control"):
            assert request(srv.path, {"cmd": "boom"}) == {"ok": False, "error": "internal error: RuntimeError: disk on fire"}
        assert "control command 'boom' failed" in caplog.text
        # NaN is not JSON: it is sent as null so strict parsers still read the reply.
        with connect(srv.path) as sock:
            sock.sendall(b'{"cmd": "adapter"}\n')
            line = read_line(sock)
        assert b"NaN" not in line and json.loads(line) == {"ok": True, "adapter": {"version": 1, "val_loss": None}}
        weird = request(srv.path, {"cmd": "weird"})
        assert weird["ok"] is False and weird["error"].startswith("internal error")
        assert request(srv.path, {"cmd": "fake_ok"}) == {"ok": True, "x": 1}
        assert request(srv.path, {"cmd": "status"}) == {"ok": True, "device": "d"}
        assert srv.running
    finally:
        srv.stop()


# -- bad clients never block others ------------------------------------------------------------


def test_silent_client_is_dropped_and_does_not_block_others(server: ControlServer, tmp_path: Path) -> None:
    silent = connect(server.path)
    dribbler = connect(server.path)
    dribbler.sendall(b'{"cmd": ')  # starts a request, never finishes it
    wait_for(lambda: server.stats["connections"] == 2, "the server to take both connections")
    # Others are served at once while both hold their connections (this server's client
    # timeout is far longer than anything here takes).
    for i in range(20):
        assert request(server.path, {"cmd": "echo", "n": i}) == {"ok": True, "n": i}
    assert server.stats["timeouts"] == 0
    assert held_open(silent) and held_open(dribbler)
    silent.close()
    dribbler.close()

    # Both are dropped (EOF, no reply) once client_timeout_s has passed, and not before.
    quick = ControlServer(tmp_path / "quick.sock", {"echo": lambda r: {"n": r.get("n")}}, client_timeout_s=0.5)
    quick.start()
    try:
        started = time.monotonic()
        silent = connect(quick.path)
        dribbler = connect(quick.path)
        dribbler.sendall(b'{"cmd": ')
        wait_for(lambda: quick.stats["timeouts"] == 2, "the server to drop both silent clients")
        assert time.monotonic() - started >= quick.client_timeout_s
        for sock in (silent, dribbler):
            with sock:
                assert read_line(sock) == b""
        assert request(quick.path, {"cmd": "echo", "n": 1}) == {"ok": True, "n": 1}
    finally:
        quick.stop()


def test_client_that_vanishes_mid_reply_does_not_hurt_the_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    big = {"blob": "x" * (4 * 1024 * 1024)}  # larger than the socket buffers: the send is still going on
    srv = ControlServer(tmp_path / "c.sock", {"big": lambda r: big, "status": lambda r: {"device": "d"}}, client_timeout_s=HANG_S)
    srv.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="edge_daemon.control"):
            for _ in range(5):
                sock = connect(srv.path)
                sock.sendall(b'{"cmd": "big"}\n')
                sock.recv(1024)  # the reply has started...
                sock.close()  # ...and the client is gone
            wait_for(lambda: caplog.text.count("vanished before its reply") == 5, "the server to see all five clients gone")
            # A client that asks and never reads is dropped after the timeout. The timeout is read
            # at each send: short for this client, long again for the readers below.
            srv.client_timeout_s = 0.5
            stuck = connect(srv.path)
            stuck.sendall(b'{"cmd": "big"}\n')
            wait_for(lambda: srv.stats["timeouts"] == 1 and "stopped reading" in caplog.text, "the server to drop the client that stopped reading")
            assert "stopped reading" in caplog.text
            stuck.close()
            srv.client_timeout_s = HANG_S
        assert request(srv.path, {"cmd": "status"}) == {"ok": True, "device": "d"}
        # The client-side limit: the full 4 MB reply arrives intact.
        assert len(request(srv.path, {"cmd": "big"}, timeout=HANG_S)["blob"]) == 4 * 1024 * 1024
    finally:
        srv.stop()


def test_hundred_clients_at_once(tmp_path: Path) -> None:
    clients = 100
    inside = 0
    most_inside = 0
    lock = threading.Lock()
    all_inside = threading.Event()
    deadline = time.monotonic() + HANG_S

    def gathering_echo(req: dict[str, Any]) -> dict[str, Any]:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
            if inside == clients:
                all_inside.set()
        # Each handler stays until every client's handler is running: served one at a time,
        # the first would wait here until the deadline.
        all_inside.wait(max(0.0, deadline - time.monotonic()))
        with lock:
            inside -= 1
        return {"n": req["n"], "status": {"device": "pump-07"}}

    srv = ControlServer(tmp_path / "c.sock", {"echo": gathering_echo})
    srv.start()
    barrier = threading.Barrier(clients)
    replies: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            sock = connect(srv.path)
            barrier.wait(HANG_S)
            with sock:
                sock.sendall(json.dumps({"cmd": "echo", "n": n}).encode() + b"\n")
                replies[n] = json.loads(read_line(sock))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline + HANG_S - time.monotonic()))
    finally:
        srv.stop()
    assert not any(t.is_alive() for t in threads), "clients still waiting for their replies"
    assert not errors
    assert replies == {n: {"ok": True, "n": n, "status": {"device": "pump-07"}} for n in range(clients)}
    # Served concurrently: all hundred handlers were running at once.
    assert most_inside == clients, most_inside


def test_clients_beyond_the_limit_are_told_busy(tmp_path: Path) -> None:
    srv = ControlServer(tmp_path / "c.sock", {"status": lambda r: {"device": "d"}}, max_clients=4, client_timeout_s=HANG_S)
    srv.start()
    try:
        holders = [connect(srv.path) for _ in range(4)]
        wait_for(lambda: srv.stats["connections"] == 4, "all four holders accepted, each holding a thread")
        reply = request(srv.path, {"cmd": "status"})
        assert reply == {"ok": False, "error": "busy: 4 clients connected; try again"}
        assert srv.stats["busy"] == 1
        for sock in holders:
            sock.close()
        wait_for(lambda: request(srv.path, {"cmd": "status"}).get("ok") is True, "a slot to free up once the holders left")
    finally:
        srv.stop()


# -- fuzz --------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
MALFORMED = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"cmd": st.sampled_from(["status", "adapter", "adapters", "drift", "train", "rollback", "x", ""]) | st.text(max_size=10)},
        optional={"version": JSON_VALUES, "n": JSON_VALUES},
    ).map(lambda d: json.dumps(d).encode()),
)


def test_fuzz_random_bytes_and_malformed_requests(server: ControlServer, fake: FakeDaemon) -> None:
    sent = 0

    @settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(MALFORMED, min_size=1, max_size=4), st.booleans())
    def one_connection(lines: list[bytes], close_early: bool) -> None:
        nonlocal sent
        with connect(server.path) as sock:
            reader = LineReader(sock)
            for raw in lines:
                sent += 1
                # Random bytes may hold newlines: each piece is a request line of its own.
                pieces = [p for p in raw.split(b"\n") if p.strip()]
                sock.sendall(raw + b"\n")
                if close_early:
                    continue  # vanish without reading
                for _ in pieces:
                    line = reader.line()
                    assert line, f"no reply to {raw!r}"
                    reply = json.loads(line)
                    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
                    if not reply["ok"]:
                        assert isinstance(reply["error"], str) and reply["error"]

    one_connection()
    assert sent >= 2000
    assert request(server.path, {"cmd": "status"}) == {"ok": True, **STATUS}
    assert server.running
    # Train and rollback were reached only with valid arguments.
    for req in fake.requests:
        if req["cmd"] == "rollback":
            assert type(req["version"]) is int and req["version"] >= 1


# -- socket file, directory, stale and live sockets --------------------------------------------


def test_socket_mode_and_directory_mode(server: ControlServer) -> None:
    assert stat.S_ISSOCK(os.lstat(server.path).st_mode)
    assert os.stat(server.path).st_mode & 0o777 == 0o660
    assert os.stat(server.path.parent).st_mode & 0o777 == 0o750  # created by start()
    server.stop()
    assert not server.path.exists()


def test_world_writable_directory_refused_unless_sticky(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(ControlError, match="world-writable"):
        ControlServer(open_dir / "c.sock", {}).start()
    assert not (open_dir / "c.sock").exists()
    os.chmod(open_dir, 0o1777)  # like /tmp: others cannot remove our socket
    srv = ControlServer(open_dir / "c.sock", {"status": lambda r: {}})
    with caplog.at_level(logging.WARNING, logger="edge_daemon.control"):
        srv.start()
    try:
        assert "world-writable (sticky)" in caplog.text
        assert request(srv.path, {"cmd": "status"}) == {"ok": True}
    finally:
        srv.stop()


def test_stale_socket_is_replaced_and_a_live_one_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    # A socket file nothing listens on, as a crashed daemon leaves it.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(DaemonUnreachable, match="stale"):
        request(path, {"cmd": "status"})
    first = ControlServer(path, {"status": lambda r: {"who": "first"}})
    first.start()
    try:
        assert request(path, {"cmd": "status"}) == {"ok": True, "who": "first"}
        second = ControlServer(path, {"status": lambda r: {"who": "second"}})
        with pytest.raises(ControlError, match="another daemon"):
            second.start()
        # A listener that is not a ControlServer (no lock) is detected by connecting to it.
        other = tmp_path / "other.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(other))
        listener.listen(1)
        try:
            with pytest.raises(ControlError, match="another daemon is listening"):
                ControlServer(other, {}).start()
        finally:
            listener.close()
        assert request(path, {"cmd": "status"}) == {"ok": True, "who": "first"}
    finally:
        first.stop()
    second = ControlServer(path, {"status": lambda r: {"who": "second"}})
    second.start()
    try:
        assert request(path, {"cmd": "status"}) == {"ok": True, "who": "second"}
    finally:
        second.stop()


def test_path_that_is_not_a_socket_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, {}).start()
    assert path.read_text() == "precious"


def test_stop_leaves_a_newer_servers_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    old = ControlServer(path, {"status": lambda r: {"who": "old"}})
    old.start()
    # Simulate a successor that took the path over (e.g. after the old one hung).
    old._server.socket.close()  # type: ignore[union-attr]  # the old one stops answering
    path.unlink()
    new_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    new_listener.bind(str(path))
    try:
        old.stop()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # not removed: it is not old's socket
    finally:
        new_listener.close()


def test_a_server_whose_socket_file_is_removed_is_dead(server: ControlServer) -> None:
    assert server.alive
    server.path.unlink()  # as a careless cleanup of the socket directory does
    # Still serving, but nobody can reach it: dead, so the daemon exits and its restart republishes.
    assert server.running and not server.alive


def test_a_chmod_of_the_socket_file_keeps_the_server_alive(server: ControlServer) -> None:
    # An administrator widening or narrowing access changes the file's ctime, not the socket.
    os.chmod(server.path, 0o600)
    assert server.alive
    assert request(server.path, {"cmd": "status"})["ok"]


def test_a_server_whose_socket_file_is_replaced_is_dead_and_leaves_the_new_one(server: ControlServer, tmp_path: Path) -> None:
    assert server.alive
    # Someone else's listener renamed over our path: the CLI now reaches it, not us.
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = tmp_path / "theirs.sock"
    theirs.bind(str(staging))
    theirs.listen(1)
    try:
        os.replace(staging, server.path)
        assert server.running and not server.alive
        server.stop()
        assert stat.S_ISSOCK(os.lstat(server.path).st_mode)  # not ours to remove
    finally:
        theirs.close()


def test_a_server_whose_serving_thread_ends_is_dead(server: ControlServer) -> None:
    assert server.alive
    assert server._server is not None
    server._server.shutdown()  # socketserver's own stop: serve_forever returns and the thread ends
    wait_for(lambda: not server.alive, "the server to count as dead")
    assert not server.running and server.path.exists()


# -- permissions -------------------------------------------------------------------------------

NOBODY = 65534


def run_as(uid: int, gid: int, groups: list[int], path: Path, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send `requests` from a forked child running as uid/gid/groups; return its replies."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only socket calls, then _exit, never back into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            replies = []
            for req in requests:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(HANG_S)
                    sock.connect(str(path))
                    sock.sendall(json.dumps(req).encode() + b"\n")
                    replies.append(json.loads(read_line(sock)))
            os.write(write_fd, json.dumps(replies).encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the pipe
            os.write(write_fd, json.dumps({"child error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(data)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="edge-control-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to another uid (nobody) to be a foreign client needs root"
)


@needs_root
def test_mutating_commands_refused_for_another_uid(shared_dir: Path, fake: FakeDaemon) -> None:
    srv = ControlServer(shared_dir / "c.sock", fake.handlers())
    srv.start()
    try:
        # Test only: let nobody reach the socket at all, so the peer-credential check is what refuses.
        os.chmod(srv.path, 0o666)
        replies = run_as(NOBODY, NOBODY, [], srv.path, [
            {"cmd": "train"}, {"cmd": "rollback", "version": 1}, {"cmd": "status"}, {"cmd": "adapters"},
        ])  # fmt: skip
        train, rollback, status, adapters = replies
        for reply, name in ((train, "train"), (rollback, "rollback")):
            assert reply["ok"] is False
            assert reply["error"].startswith(f"permission denied: {name!r} changes the daemon")
            assert f"you are uid {NOBODY}" in reply["error"]
        assert status == {"ok": True, **STATUS}
        assert adapters["ok"] is True
        # The handlers of refused commands never ran.
        assert [r["cmd"] for r in fake.requests] == ["status", "adapters"]
        # Root itself may.
        assert request(srv.path, {"cmd": "train"})["accepted"] is True
    finally:
        srv.stop()


@needs_root
def test_members_of_the_daemons_group_may_mutate(shared_dir: Path, fake: FakeDaemon) -> None:
    group = 4242  # the daemon's group, held by nobody only as a supplementary group
    srv = ControlServer(shared_dir / "c.sock", fake.handlers(), owner_uid=4243, owner_gid=group)
    srv.start()
    try:
        os.chmod(srv.path, 0o666)
        as_member = run_as(NOBODY, NOBODY, [group], srv.path, [{"cmd": "train"}])
        assert as_member == [{"ok": True, "accepted": True, "state": "running", "message": "update started"}]
        primary = run_as(NOBODY, group, [], srv.path, [{"cmd": "rollback", "version": 2}])
        assert primary[0]["ok"] is True and primary[0]["adapter"]["version"] == 2
        outsider = run_as(NOBODY, NOBODY, [], srv.path, [{"cmd": "train"}])
        assert outsider[0]["ok"] is False and "permission denied" in outsider[0]["error"]
    finally:
        srv.stop()


@needs_root
def test_socket_mode_keeps_other_users_out(shared_dir: Path) -> None:
    srv = ControlServer(shared_dir / "c.sock", {"status": lambda r: {}})
    srv.start()
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                request(srv.path, {"cmd": "status"}, timeout=HANG_S)
                code = 10  # connected: the mode let a stranger in
            except DaemonUnreachable as exc:
                code = 0 if exc.cause == "permission" else 11
            except BaseException:  # noqa: BLE001
                code = 12
            finally:
                os._exit(code)
        os.close(read_fd)
        os.close(write_fd)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        srv.stop()
