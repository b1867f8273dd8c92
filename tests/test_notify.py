"""sd_notify and the heartbeat against a real AF_UNIX datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_daemon import notify
from edge_daemon.notify import Heartbeat


# Bounds a wait for something that must happen; never how long anything is expected to take.
HANG_S = 30.0


class NotifyListener:
    """Plays systemd's side: a bound datagram socket that collects messages.

    A local datagram is queued at the receiver before the sender's sendto() returns, so once a
    sender is known to have finished a round, `pending()` holds everything that round sent.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[str] = []  # every message taken off the socket, in order

    def recv(self, timeout: float = HANG_S, what: str = "a notification") -> str:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode("utf-8")
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; last received {self.received[-3:]}") from None
        self.received.append(message)
        return message

    def wait_for(self, wanted: str, timeout: float = HANG_S) -> list[str]:
        """Receive until `wanted` arrives; return what came before it."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {wanted!r}; got {before}")
            message = self.recv(left, repr(wanted))
            if message == wanted:
                return before
            before.append(message)

    def pending(self) -> list[str]:
        """The messages already queued, without waiting for more."""
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(4096).decode("utf-8"))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        self.received.extend(messages)
        return messages


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = HANG_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    # A short directory: AF_UNIX paths are limited to 108 bytes and pytest's
    # tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        try:
            yield NotifyListener(sock)
        finally:
            sock.close()


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert notify.watchdog_ping() is False
    assert notify.status("x") is False


def test_messages_arrive(listener: NotifyListener) -> None:
    assert notify.ready() is True
    assert listener.recv() == "READY=1"
    assert notify.status("adapter v3,\nmemory normal")
    # A newline would start a new assignment; the text stays one line.
    assert listener.recv() == "STATUS=adapter v3, memory normal"
    assert notify.watchdog_ping()
    assert listener.recv() == "WATCHDOG=1"
    assert notify.ready("serving")
    assert listener.recv() == "READY=1\nSTATUS=serving"
    assert notify.stopping()
    assert listener.recv() == "STOPPING=1"
    assert notify.extend_timeout(90)
    assert listener.recv() == "EXTEND_TIMEOUT_USEC=90000000"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-daemon-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(HANG_S)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_unreachable_socket_returns_false(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="edge_daemon.notify"):
        assert notify.watchdog_ping() is False
    assert "sd_notify" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "other", None),  # inherited by a child: not ours to ping
        ("0", None, None),
        ("soon", None, None),
        ("30000000", "x", None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert notify.watchdog_interval() == expected


def test_child_process_does_not_inherit_the_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd sets WATCHDOG_PID to the main process; a training child started
    # with the same environment must see no watchdog of its own.
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 30.0
    out = subprocess.run(
        [sys.executable, "-c", "from edge_daemon.notify import watchdog_interval; print(watchdog_interval())"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()
    assert out == "None"


def test_heartbeat_pings_only_while_parts_alive(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    # WatchdogSec=0.2 s: the heartbeat pings every 0.1 s.
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    ingest_alive = threading.Event()
    ingest_alive.set()
    dead_reports: list[list[str]] = []
    hb = Heartbeat(status_text=lambda: "adapter v3, memory normal", on_dead=dead_reports.append)
    assert hb.watchdog_enabled and hb.period == pytest.approx(0.1)
    hb.register("ingest", ingest_alive.is_set)
    hb.register("store", lambda: True)

    notify.ready()
    hb.start()
    thread = hb._thread
    try:
        # READY, then the status line once, then pings; the status is not resent unchanged.
        first = [listener.recv() for _ in range(5)]
        assert first == ["READY=1", "STATUS=adapter v3, memory normal"] + ["WATCHDOG=1"] * 3

        ingest_alive.clear()
        # Pings sent before the next beat noticed are fine; from the status
        # change on there must be none.
        dying = listener.wait_for("STATUS=not alive: ingest; adapter v3, memory normal")
        assert set(dying) <= {"WATCHDOG=1"}
        pings, beats = hb.pings, hb.beats
        # Rounds that found ingest dead (the one that sent the status may still be finishing).
        wait_until(lambda: hb.beats >= beats + 3, "heartbeat rounds with ingest dead")
        assert listener.pending() == [], "watchdog pinged while a part was dead"
        assert hb.pings == pings
        assert dead_reports == [["ingest"]]

        ingest_alive.set()
        assert listener.wait_for("STATUS=adapter v3, memory normal") == []
        revived = len(listener.received)
        assert [listener.recv(), listener.recv()] == ["WATCHDOG=1", "WATCHDOG=1"]
    finally:
        # Read while stopping: a sender blocks while the socket's queue is full (net.unix.max_dgram_qlen, often 10).
        stopper = threading.Thread(target=hb.stop, kwargs={"timeout": HANG_S})
        stopper.start()
        while stopper.is_alive():
            listener.pending()
            stopper.join(0.01)
    assert not hb.is_alive()
    assert thread is not None and not thread.is_alive()
    # The thread has ended, so all it ever sent is queued by now: since the revival only
    # pings, and every ping it counted arrived.
    listener.pending()
    assert set(listener.received[revived:]) == {"WATCHDOG=1"}
    assert listener.received.count("WATCHDOG=1") == hb.pings


def test_heartbeat_counts_a_raising_check_dead(listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")

    def broken() -> bool:
        raise RuntimeError("store handle gone")

    hb = Heartbeat()
    hb.register("store", broken)
    assert hb.beat() is False
    assert listener.recv() == "STATUS=not alive: store"
    # beat() has returned: a ping it sent would be queued already.
    assert listener.pending() == [] and hb.pings == 0
    hb.unregister("store")
    assert hb.beat() is True
    assert listener.recv() == "WATCHDOG=1"


def test_heartbeat_without_watchdog_sends_status_only(listener: NotifyListener) -> None:
    hb = Heartbeat(status_text=lambda: "memory normal")
    assert not hb.watchdog_enabled and hb.period == 10.0
    hb.register("ingest", lambda: True)
    assert hb.beat() is True
    assert listener.pending() == ["STATUS=memory normal"]
    with pytest.raises(ValueError):
        hb.register("ingest", lambda: True)
