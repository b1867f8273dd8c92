"""The sd_notify protocol (READY, STATUS, WATCHDOG) and the heartbeat that drives it.

A few lines over `$NOTIFY_SOCKET` (an AF_UNIX datagram socket, possibly
abstract) instead of a library; every call is a no-op outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def _address() -> str | None:
    """The socket address systemd gave us, in the form `socket.sendto` takes."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        # Abstract namespace: a leading NUL instead of '@', no file on disk.
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    # systemd >= 253 may hand out "vsock:CID:PORT" (VMs); not a case for a device.
    log.debug("NOTIFY_SOCKET %r is not an AF_UNIX address; notifications disabled", addr)
    return None


def notify(*assignments: str) -> bool:
    """Send `KEY=VALUE` assignments in one datagram, e.g. `notify("READY=1")`.

    Returns True if systemd got the message, False outside systemd or on a
    socket error (logged; a lost notification must not take the daemon down).
    """
    addr = _address()
    if addr is None:
        return False
    message = "\n".join(assignments).encode("utf-8")
    # A fresh socket per call: notifications are seconds apart, and nothing
    # is left open across fork() into the training child.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, addr)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd start-up is complete (Type=notify), optionally with a status line."""
    if status_text is None:
        return notify("READY=1")
    return notify("READY=1", f"STATUS={_one_line(status_text)}")


def status(text: str) -> bool:
    """Set the line `systemctl status` shows."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    """Tell systemd the service is alive (resets the WatchdogSec= timer)."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd shutdown has begun, so it does not count the time as a hang."""
    if status_text is None:
        return notify("STOPPING=1")
    return notify("STOPPING=1", f"STATUS={_one_line(status_text)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start or stop timeout fires (slow first start)."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval() -> float | None:
    """WatchdogSec= in seconds if this process must ping, else None.

    Follows sd_watchdog_enabled(): WATCHDOG_USEC must be a positive integer
    and WATCHDOG_PID, when set, must name this process (a child that
    inherited the environment must not ping on the parent's behalf).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        interval_us = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    if interval_us <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", pid)
            return None
    return interval_us / 1_000_000


def _one_line(text: str) -> str:
    # One datagram carries newline-separated assignments: a newline inside
    # the status text would start a bogus assignment.
    return " ".join(text.split("\n"))


class Heartbeat:
    """Pings WATCHDOG=1 only while every registered part is alive, and keeps STATUS= fresh.

    Parts register a name and a liveness callable (a thread's `is_alive`, a
    "last loop iteration was recent" check, ...). A background thread runs
    `beat()` every `period` seconds: half of WatchdogSec= under systemd, as
    sd_watchdog_enabled(3) advises. While any part is dead the pings stop, so
    systemd's watchdog fires and `Restart=on-failure` restarts the service;
    the status line then names the dead parts.

    Without a watchdog (not under systemd, or WatchdogSec= unset) the thread
    still refreshes the status and reports dead parts through `on_dead`.
    """

    def __init__(
        self,
        status_text: Callable[[], str] | None = None,
        *,
        period: float | None = None,
        on_dead: Callable[[list[str]], None] | None = None,
    ) -> None:
        interval = watchdog_interval()
        self.watchdog_enabled = interval is not None
        if period is None:
            period = interval / 2 if interval is not None else 10.0
        if period <= 0:
            raise ValueError(f"period must be positive, got {period}")
        self.period = period
        self._status_text = status_text
        self._on_dead = on_dead
        self._parts: dict[str, Callable[[], bool]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_status: str | None = None
        self._dead: list[str] = []
        self.pings = 0  # WATCHDOG=1 messages sent; read by status and tests
        self.beats = 0  # rounds completed, pinging or not; read by tests

    def register(self, name: str, alive: Callable[[], bool]) -> None:
        """Add a part; `alive()` must be cheap and must not block."""
        with self._lock:
            if name in self._parts:
                raise ValueError(f"part {name!r} is already registered")
            self._parts[name] = alive

    def unregister(self, name: str) -> None:
        """Remove a part (it stopped on purpose); unknown names are ignored."""
        with self._lock:
            self._parts.pop(name, None)

    def dead_parts(self) -> list[str]:
        """Names of parts whose liveness check says dead (or raised), in registration order."""
        with self._lock:
            parts = list(self._parts.items())
        dead = []
        for name, alive in parts:
            try:
                ok = bool(alive())
            except Exception:
                log.exception("liveness check of %s raised; counting it dead", name)
                ok = False
            if not ok:
                dead.append(name)
        return dead

    def beat(self) -> bool:
        """One round: check the parts, send STATUS= if it changed, then WATCHDOG=1 if all alive.

        Returns True if every part was alive.
        """
        dead = self.dead_parts()
        if dead != self._dead:
            if dead:
                log.error("parts not alive: %s; watchdog pings stop", ", ".join(dead))
                if self._on_dead is not None:
                    self._on_dead(dead)
            else:
                log.info("all parts alive again; watchdog pings resume")
            self._dead = dead
        text = self._compose_status(dead)
        if text is not None and text != self._last_status:
            if status(text):
                self._last_status = text
        alive = not dead
        if alive and self.watchdog_enabled and watchdog_ping():
            self.pings += 1
        self.beats += 1
        return alive

    def _compose_status(self, dead: list[str]) -> str | None:
        text = None
        if self._status_text is not None:
            try:
                text = self._status_text()
            except Exception:
                log.exception("status text callable raised")
        if dead:
            prefix = "not alive: " + ", ".join(dead)
            return f"{prefix}; {text}" if text else prefix
        return text

    def start(self) -> None:
        """Beat once now, then every `period` seconds in a daemon thread until stop()."""
        if self._thread is not None:
            raise RuntimeError("heartbeat already started")
        self._stop.clear()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.beat()
            except Exception:
                # A broken status callable must not kill the watchdog thread:
                # that would look like a hang and get the service restarted.
                log.exception("heartbeat round failed")
        log.debug("heartbeat thread exiting")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop pinging (call before shutting parts down, then `stopping()`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def is_alive(self) -> bool:
        """Whether the heartbeat thread runs (so the daemon can watch the watcher)."""
        return self._thread is not None and self._thread.is_alive()
