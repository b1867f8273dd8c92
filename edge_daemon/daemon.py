"""The daemon: builds every part, starts them in a fixed order and stops them in reverse.

One `threading.Event` means "stop"; signal handlers only set it. A part that dies makes the
process exit non-zero so systemd's Restart=on-failure takes over: never a half-alive daemon.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import FrameType
from typing import Any

from edge_daemon import __version__
from edge_daemon.config import Config
from edge_daemon.control import ControlServer, Handler
from edge_daemon.ingest import Ingestor
from edge_daemon.store import ReplayStore

log = logging.getLogger(__name__)

# How often the main thread checks that every part is still alive.
HEALTH_INTERVAL_S = 1.0


@dataclass
class Part:
    """One started component: how to stop it and how to tell it is still alive."""

    name: str
    stop: Callable[[], None]
    alive: Callable[[], bool] = field(default=lambda: True)


class Daemon:
    """Owns every part of the running service; `run()` blocks until stopped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.store: ReplayStore | None = None
        self.control: ControlServer | None = None
        self.ingestor: Ingestor | None = None
        # Started parts, in start order; stopped in reverse.
        self.parts: list[Part] = []
        # Control commands; parts add theirs while the daemon is built.
        self.handlers: dict[str, Handler] = {"status": self._status}
        # Sections of the `status` reply beyond device/uptime, by key; later parts add theirs
        # (adapter, drift, memory, training).
        self.status_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        self.exit_code = 0
        self.stop_signal: str | None = None

    # -- build and start, in order -----------------------------------------------------------

    def _start_store(self) -> Part:
        self.store = ReplayStore(self.config.store_path, self.config.store, self.config.channels.names)
        store = self.store
        self.status_sections["store"] = lambda: {"readings": store.count(), "bytes": store.size_bytes()}
        return Part("store", store.close)

    def _start_retention(self) -> Part:
        # A plain loop for now; the scheduler takes this job over when it exists.
        assert self.store is not None
        store = self.store
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.config.store.retention_interval_s):
                try:
                    store.run_retention()
                except Exception:
                    log.exception("retention run failed")
            log.info("retention loop exiting")

        thread = threading.Thread(target=loop, name="retention", daemon=True)
        thread.start()

        def stop() -> None:
            done.set()
            thread.join(30.0)

        return Part("retention", stop, thread.is_alive)

    def _start_control(self) -> Part:
        self.control = ControlServer(self.config.device.socket, self.handlers)
        self.control.start()
        return Part("control", self.control.stop)

    def _start_ingest(self) -> Part:
        assert self.store is not None
        self.ingestor = Ingestor(self.config, self.store)
        self.ingestor.online_status = self._online_status
        ingestor = self.ingestor
        self.status_sections["ingest"] = ingestor.counters
        ingestor.start()
        return Part("ingest", ingestor.stop, lambda: ingestor.alive)

    def starters(self) -> list[tuple[str, Callable[[], Part]]]:
        """The start order. Later parts (scorer, scheduler, watchdog, trainer) go in here."""
        return [
            ("store", self._start_store),
            ("retention", self._start_retention),
            ("control", self._start_control),
            ("ingest", self._start_ingest),
        ]

    def start(self) -> None:
        """Start every part in order; if one fails, stop those already started and re-raise."""
        for name, starter in self.starters():
            try:
                self.parts.append(starter())
            except BaseException:
                log.error("could not start %s", name)
                self.stop()
                raise
            log.debug("started %s", name)
        log.info("edge-daemon %s running as device %s", __version__, self.config.device.id)

    def stop(self) -> None:
        """Stop the started parts in reverse order; safe to call twice."""
        while self.parts:
            part = self.parts.pop()
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", part.name)
                self.exit_code = self.exit_code or 1

    # -- running -----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record and set the event: the main thread logs and shuts down outside the handler.
        self.stop_signal = signal.Signals(signum).name
        self.stop_event.set()

    def run(self) -> int:
        """Start, block until SIGTERM/SIGINT (or a dead part), stop; return the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        try:
            while not self.stop_event.wait(HEALTH_INTERVAL_S):
                dead = [part.name for part in self.parts if not part.alive()]
                if dead:
                    log.error("part(s) %s died; exiting so the service manager restarts the daemon", ", ".join(dead))
                    self.exit_code = 1
                    break
            if self.stop_signal:
                log.info("received %s; shutting down", self.stop_signal)
        finally:
            self.stop()
        log.info("edge-daemon stopped (exit code %d)", self.exit_code)
        return self.exit_code

    # -- status ------------------------------------------------------------------------------

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono

    def _online_status(self) -> dict[str, Any]:
        """The retained `edge/<id>/status` payload published at every (re)connect."""
        return {
            "online": True,
            "device": self.config.device.id,
            "version": __version__,
            "started": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(),
        }

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = {"device": self.config.device.id, "uptime_s": round(self.uptime_s(), 3)}
        for key, section in list(self.status_sections.items()):
            reply[key] = section()
        return reply
