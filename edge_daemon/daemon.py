"""The daemon: builds every part, starts them in a fixed order and stops them in reverse.

One `threading.Event` means "stop"; signal handlers only set it. A part that dies makes the
process exit non-zero so systemd's Restart=on-failure takes over: never a half-alive daemon.
Under systemd it also speaks sd_notify: READY=1 once started, STATUS= lines, WATCHDOG=1 only
while every part (and the main loop) is alive, STOPPING=1 on shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Any

from edge_daemon import __version__, notify
from edge_daemon.adaptation import commands
from edge_daemon.adaptation.owner import Adaptation, register_worker
from edge_daemon.adaptation.runner import UpdateRunner
from edge_daemon.artifacts.adapters import AdapterStore
from edge_daemon.artifacts.base import BaseModel
from edge_daemon.config import Config
from edge_daemon.control.protocol import Handler
from edge_daemon.control.server import ControlServer
from edge_daemon.model import warm_up
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.notify import Heartbeat
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.payloads import OnlineStatus
from edge_daemon.replies import DriftReply, StatusReply
from edge_daemon.scheduler import JobScheduler
from edge_daemon.status import StatusReport
from edge_daemon.store import ReplayStore
from edge_daemon.memory.pressure import Level
from edge_daemon.memory.watchdog import MemoryWatchdog
from edge_daemon.worker import WorkerForker

log = logging.getLogger(__name__)

# How often the main thread checks that every part is still alive.
HEALTH_INTERVAL_S = 1.0
# The main loop counts as wedged (and the watchdog pings stop) when its last iteration is older
# than this: many missed iterations, yet well inside WatchdogSec/2.
MAIN_LOOP_STALE_S = 10.0
# How long start-up waits for the broker subscription before READY=1 is sent anyway. A device
# often boots before its broker (or network) is up: failing the start instead would make systemd
# restart the daemon until StartLimitBurst gives up for good, while the ingestor reconnects by
# itself and the broker keeps our persistent session's messages meanwhile. So a missing broker is
# reported in STATUS= (and the log), not treated as a failed start; well inside TimeoutStartSec.
READY_BROKER_WAIT_S = 30.0


@dataclass
class Part:
    """One started component: how to stop it and how to tell it is still alive."""

    name: str
    stop: Callable[[], None]
    alive: Callable[[], bool] = field(default=lambda: True)


class Daemon:
    """Owns every part of the running service; `run()` blocks until stopped."""

    def __init__(self, config: Config, broker_wait_s: float = READY_BROKER_WAIT_S) -> None:
        self.config = config
        self.broker_wait_s = broker_wait_s
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
        self.exit_code = 0
        self._disk_full_published = False  # what the retained status last said of the disk
        self.stop_signal: str | None = None
        self.watchdog: MemoryWatchdog | None = None
        self.pipeline: ScoringPipeline | None = None
        self.scheduler: JobScheduler | None = None
        self.forker: WorkerForker | None = None
        # The update path: trigger, start rule, training workers, serving switch, rollback.
        self.adaptation = Adaptation(config, self.stop_event)
        self.heartbeat: Heartbeat | None = None
        # Monotonic time of the main loop's last health check; the heartbeat watches it.
        self._loop_mono = time.monotonic()
        self.handlers.update(
            {
                "adapter": partial(commands.handle_adapter, self.adaptation),
                "adapters": partial(commands.handle_adapters, self.adaptation),
                "drift": self._drift,
                "train": partial(commands.handle_train, self.adaptation),
                "rollback": partial(commands.handle_rollback, self.adaptation),
            }
        )

    @property
    def runner(self) -> UpdateRunner | None:
        return self.adaptation.runner

    @property
    def base(self) -> BaseModel | None:
        return self.adaptation.base

    @property
    def adapters(self) -> AdapterStore:
        return self.adaptation.adapters

    @property
    def trigger_checks(self) -> int:
        return self.adaptation.trigger_checks

    # -- build and start, in order -----------------------------------------------------------

    def _start_store(self) -> Part:
        self.store = ReplayStore(self.config.store_path, self.config.store, self.config.channels.names)
        return Part("store", self.store.close)

    def _start_worker_helper(self) -> Part:
        # First, before any thread of ours: training workers are forked from this helper and share
        # the memory of everything imported and set up so far (see worker.py), torch's lazily
        # built state included.
        warm_up()
        self.forker = WorkerForker()
        register_worker(self.forker)
        self.forker.start()
        forker = self.forker
        return Part("training helper", forker.stop, lambda: forker.alive)

    def _start_watchdog(self) -> Part:
        assert self.forker is not None
        self.watchdog = MemoryWatchdog.from_config(self.config.memory, shared_level=self.forker.level)
        watchdog = self.watchdog
        watchdog.add_listener(self._on_level_change)
        watchdog.start()
        return Part("watchdog", watchdog.stop, lambda: watchdog.alive)

    def _start_pipeline(self) -> Part:
        store = self.store
        held_rows = (lambda: store.held_rows) if store is not None else None
        self.pipeline = ScoringPipeline(self.config, self._publish, self.adaptation.load_serving(), held_rows)
        pipeline = self.pipeline
        pipeline.start()
        return Part("scoring", pipeline.stop, lambda: pipeline.alive)

    def _start_scheduler(self) -> Part:
        assert self.watchdog is not None and self.store is not None and self.pipeline is not None and self.forker is not None
        cfg = self.config
        store, adaptation = self.store, self.adaptation
        runner = adaptation.attach(
            self.watchdog, self.pipeline, self.forker, store,
            backlog=lambda: self.ingestor.backlog if self.ingestor else 0,
            ingest_waiting=lambda: self.disk_full,
            publish_status=self._publish_status,
        )  # fmt: skip
        scheduler = JobScheduler()
        scheduler.add("idle", adaptation.idle.sample, interval_s=max(1.0, cfg.train.idle_window_s / 30), run_now=True)
        scheduler.add("update-trigger", adaptation.check, interval_s=cfg.train.check_interval_s)
        scheduler.add("retention", store.run_retention, interval_s=cfg.store.retention_interval_s)
        scheduler.add("status", self._publish_status, interval_s=cfg.outputs.status_interval_s)
        scheduler.start()
        self.scheduler = scheduler
        if self.ingestor is not None:
            self.ingestor.clock_watch.on_jump.append(scheduler.clock_jumped)

        def stop() -> None:
            scheduler.stop()
            # An update stops at its next micro-batch boundary; nothing partial is saved.
            runner.stop(timeout=max(5.0, cfg.train.stop_timeout_s))

        return Part("scheduler", stop, lambda: scheduler.alive)

    def _start_control(self) -> Part:
        self.control = ControlServer(self.config.device.socket, self.handlers)
        control = self.control
        control.start()
        return Part("control", control.stop, lambda: control.alive)

    def _start_ingest(self) -> Part:
        assert self.store is not None
        self.ingestor = Ingestor(self.config, self.store)
        self.ingestor.online_status = self._online_status
        self.ingestor.on_disk_full = self._on_disk_full
        ingestor = self.ingestor
        if self.pipeline is not None:
            # Scoring gets readings as they arrive, not when their batch commits.
            ingestor.on_readings.append(self.pipeline.on_batch)
        ingestor.start()
        return Part("ingest", ingestor.stop, lambda: ingestor.alive)

    def starters(self) -> list[tuple[str, Callable[[], Part]]]:
        """The start order. Later parts (scorer, scheduler, watchdog, trainer) go in here."""
        return [
            ("training helper", self._start_worker_helper),
            ("store", self._start_store),
            ("watchdog", self._start_watchdog),
            ("scoring", self._start_pipeline),
            ("control", self._start_control),
            ("ingest", self._start_ingest),
            ("scheduler", self._start_scheduler),
        ]

    def start(self) -> None:
        """Start every part in order; if one fails, stop those already started and re-raise."""
        # Scoring forwards one small step at a time: a second intra-op thread only contends with
        # ingestion and whatever else the device runs, and with the other core busy it makes a
        # forward many times slower (benchmarks/scoring.py). Training runs in its own process
        # and sets its own.
        import torch

        torch.set_num_threads(1)
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
        # Whoever calls stop() (run()'s shutdown or an embedding program), it means "stop".
        self.stop_event.set()
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
        _claim_watchdog()
        self.start()
        reason = ""
        try:
            self._wait_for_broker()
            if not self.stop_event.is_set():
                self._loop_mono = time.monotonic()  # start-up (and the broker wait) is not a wedged loop
                self.heartbeat = self._make_heartbeat()
                # READY first, then the heartbeat's first beat sends STATUS= and WATCHDOG=1 at once
                # (no window after READY in which systemd waits for a first ping).
                notify.ready()
                self.heartbeat.start()
            while not self.stop_event.wait(HEALTH_INTERVAL_S):
                self._loop_mono = time.monotonic()
                dead = [part.name for part in self.parts if not part.alive()]
                if self.heartbeat is not None and not self.heartbeat.is_alive():
                    dead.append("heartbeat")
                if dead:
                    log.error("part(s) %s died; exiting so the service manager restarts the daemon", ", ".join(dead))
                    self.exit_code = 1
                    reason = f"not alive: {', '.join(dead)}"
                    break
            if self.stop_signal:
                log.info("received %s; shutting down", self.stop_signal)
                reason = self.stop_signal
        finally:
            # Pings end before any part stops: a part stopping on purpose is not a dead part, and
            # after STOPPING=1 systemd times the shutdown with TimeoutStopSec, not the watchdog.
            if self.heartbeat is not None:
                self.heartbeat.stop()
            training = self.runner is not None and self.runner.running
            notify.stopping(
                "stopping" + (f" ({reason})" if reason else "") + (": ending the running update" if training else "")
            )
            self.stop()
        log.info("edge-daemon stopped (exit code %d)", self.exit_code)
        return self.exit_code

    def _wait_for_broker(self) -> bool:
        """Block until the broker subscription is up, `broker_wait_s` passes, or stop is asked."""
        ingestor = self.ingestor
        if ingestor is None:
            return False
        deadline = time.monotonic() + self.broker_wait_s
        while not self.stop_event.is_set():
            left = deadline - time.monotonic()
            if ingestor.wait_subscribed(min(max(left, 0.0), 0.5)):
                return True
            if left <= 0:
                log.warning(
                    "broker %s:%d not reachable after %.0f s; ready anyway, storing nothing until it is",
                    self.config.mqtt.host, self.config.mqtt.port, self.broker_wait_s,
                )  # fmt: skip
                return False
        return False

    def _make_heartbeat(self) -> Heartbeat:
        """A heartbeat over every started part plus the main loop's own liveness."""
        heartbeat = Heartbeat(self.status_line)
        for part in self.parts:
            heartbeat.register(part.name, part.alive)
        heartbeat.register("main-loop", self._main_loop_alive)
        return heartbeat

    def _main_loop_alive(self) -> bool:
        return time.monotonic() - self._loop_mono < MAIN_LOOP_STALE_S

    def status_line(self) -> str:
        """The one-line STATUS= text (see status.StatusReport.line)."""
        return StatusReport(self).line()

    # -- status ------------------------------------------------------------------------------

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono

    def _online_status(self) -> OnlineStatus:
        """The retained `edge/<id>/status` payload published at every (re)connect."""
        return StatusReport(self).online()

    def _status(self, request: dict[str, Any]) -> StatusReply:
        return StatusReport(self).reply()

    # -- outputs -----------------------------------------------------------------------------

    def _publish(self, suffix: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        ingestor = self.ingestor
        if ingestor is None:
            return
        try:
            ingestor.publish(suffix, payload, qos=qos, retain=retain)
        except Exception as exc:  # publishing is best effort while the broker is away
            log.debug("publish %s failed: %s", suffix, exc)

    def _publish_status(self) -> None:
        """Refresh the retained `edge/<id>/status`."""
        self._publish("status", self._online_status(), self.config.outputs.qos, True)

    @property
    def disk_full(self) -> bool:
        """Ingestion is waiting for disk space."""
        return self.ingestor is not None and self.ingestor.disk_full

    def _on_disk_full(self, full: bool) -> None:
        """In the ingest writer: the disk is full (called before each retry) or has room again."""
        if full and self.store is not None:
            # Older replay data and empty pages go first: the store's budget shrinks to the
            # free space less the reserve (store.run_retention). On a full disk even that may fail.
            try:
                report = self.store.run_retention()
                log.info("disk full: retention freed %d readings", report["deleted_rows"])
            except Exception as exc:  # noqa: BLE001 - the write is retried whatever happens here
                log.debug("retention on a full disk failed: %s", exc)
        if full != self._disk_full_published:
            self._disk_full_published = full
            self._publish_status()
            notify.status(self.status_line())

    def _on_level_change(self, old: Level, new: Level) -> None:
        log.log(logging.WARNING if new >= Level.HIGH else logging.INFO, "memory level %s -> %s", old.label, new.label)

    # -- control handlers --------------------------------------------------------------------

    def _drift(self, request: dict[str, Any]) -> DriftReply:
        assert self.pipeline is not None
        return {"drift": self.pipeline.drift.status()}


def _claim_watchdog() -> None:
    """Pin WatchdogSec= to this process before any child is started.

    sd_watchdog_enabled() treats a missing WATCHDOG_PID as "for me"; the training helper and workers inherit
    the environment and must not take the parent's watchdog as its own, so it is set to our pid.
    """
    if os.environ.get("WATCHDOG_USEC") and not os.environ.get("WATCHDOG_PID"):
        os.environ["WATCHDOG_PID"] = str(os.getpid())
