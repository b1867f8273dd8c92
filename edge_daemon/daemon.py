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
from functools import partial
from types import FrameType
from typing import Any, TypeVar

from edge_daemon import __version__, notify
from edge_daemon.adaptation import commands
from edge_daemon.adaptation.owner import Adaptation, register_worker
from edge_daemon.artifacts.adapters import AdapterStore
from edge_daemon.config import Config
from edge_daemon.control.protocol import Handler, Request
from edge_daemon.control.server import ControlServer
from edge_daemon.homeassistant import Discovery
from edge_daemon.model import warm_up
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.notify import Heartbeat
from edge_daemon.parts import HelperPart, Part, StorePart
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.mqtt.outputs import OnlineStatus, store_damaged_alert
from edge_daemon.control.replies import DriftReply, StatusReply
from edge_daemon.scheduler import JobScheduler
from edge_daemon.control.status import StatusParts, StatusReport
from edge_daemon.store import ReplayStore, check_store
from edge_daemon.memory.pressure import Level
from edge_daemon.memory.watchdog import MemoryWatchdog
from edge_daemon.training.worker import WorkerForker

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
# How often the daemon looks whether what the retained status says of the served adapter, drift
# or training changed since it was published (it is then republished at once, so a consumer such
# as Home Assistant is not minutes behind `[outputs] status_interval_s`).
STATUS_CHANGE_CHECK_S = 1.0
# Opening the store can outlast TimeoutStartSec on a large store and a slow card: its check reads
# the whole file (taken at STORE_CHECK_BYTES_PER_S, a slow SD card's read rate, plus the grace),
# and the move of an older store's readings takes a window at a time (the grace after each).
STORE_OPEN_GRACE_S = 120.0
STORE_CHECK_BYTES_PER_S = 5 * 2**20


T = TypeVar("T")


def _built(part: T | None, name: str) -> T:
    """A part an earlier step of the start order built (the order in `builders` guarantees it)."""
    if part is None:
        raise RuntimeError(f"the {name} part is built later in the start order")
    return part


class Daemon:
    """Owns every part of the running service; `run()` blocks until stopped."""

    def __init__(self, config: Config, broker_wait_s: float = READY_BROKER_WAIT_S) -> None:
        self.config = config
        self.broker_wait_s = broker_wait_s
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        # Started parts by name, in start order; stopped in reverse.
        self.parts: dict[str, Part[Any]] = {}
        # The parts by what they are, once started (status reads them; each wires the next).
        self.forker: WorkerForker | None = None
        self.store: ReplayStore | None = None
        self._store_part: StorePart | None = None
        self.watchdog: MemoryWatchdog | None = None
        self.pipeline: ScoringPipeline | None = None
        # The update path: trigger, start rule, training workers, serving switch, rollback.
        self.adaptation: Adaptation | None = None
        self.control: ControlServer | None = None
        self.ingestor: Ingestor | None = None
        self._ingestor_built: Ingestor | None = None  # built with the update path, started later
        self.scheduler: JobScheduler | None = None
        self.exit_code = 0
        self._disk_full_published = False  # what the retained status last said of the disk
        self._pending_alerts: list[Any] = []  # raised while starting: sent at the first connect
        self._state_published: tuple[object, ...] | None = None  # StatusReport.online_state() last published
        self.stop_signal: str | None = None
        self.heartbeat: Heartbeat | None = None
        # Monotonic time of the main loop's last health check; the heartbeat watches it.
        self._loop_mono = time.monotonic()

    # -- build, in order (each builder returns its part; start() starts it) -----------------

    def _build_helper(self) -> Part[None]:
        # First, before any thread of ours: training workers are forked from this helper and share
        # the memory of everything imported and set up so far (see training/worker.py), torch's lazily
        # built state included.
        warm_up()
        self.forker = WorkerForker()
        return HelperPart(self.forker, register_worker)

    def _build_store(self) -> StorePart:
        # A damaged store (power lost mid-write on a worn card) is moved aside and a new one
        # started: an alert and the status say so once the broker is reached.
        path = self.config.store_path
        size = path.stat().st_size if path.exists() else None
        if size is not None:
            # Reading a large store from a slow card: the service manager is told, and waits longer.
            notify.status(f"checking the replay store ({size / 2**20:.0f} MB)")
            notify.extend_timeout(STORE_OPEN_GRACE_S + size / STORE_CHECK_BYTES_PER_S)
        check = check_store(path)
        # The daemon's store, and only it, replaces a file found damaged while running.
        self.store = ReplayStore(path, self.config.store, self.config.channels.names, progress=self._opening_store, recovers=True)
        self._store_part = StorePart(self.store, check)
        return self._store_part

    @staticmethod
    def _opening_store(text: str) -> None:
        """A step of a long store open (the move of an older store's readings, a window at a
        time): `systemctl status` shows it, and the start timeout is extended past the next step."""
        notify.status(text)
        notify.extend_timeout(STORE_OPEN_GRACE_S)

    def _build_watchdog(self) -> MemoryWatchdog:
        forker = _built(self.forker, "training helper")
        self.watchdog = MemoryWatchdog.from_config(self.config.memory, shared_level=forker.level)
        self.watchdog.add_listener(self._on_level_change)
        return self.watchdog

    def _build_pipeline(self) -> ScoringPipeline:
        # Without a scorer: the update path loads the served model into it when it starts.
        store = _built(self._store_part, "store")
        self.pipeline = ScoringPipeline(self.config, self._publish, None, held_rows=lambda: store.held_rows)
        check = store.check
        if check.moved_to is not None and check.problem is not None:
            self.pipeline.alert(store_damaged_alert(check.problem, str(check.moved_to)))
        # One found damaged while running is replaced by the store itself; the alert goes out then.
        pipeline = self.pipeline
        store.store.on_replaced.append(lambda check: pipeline.alert(store_damaged_alert(check.problem or "", str(check.moved_to))))
        return self.pipeline

    def _send_pending_alerts(self) -> None:
        """The alerts raised while starting, before the broker could be reached."""
        pending, self._pending_alerts = self._pending_alerts, []
        for payload in pending:
            self._publish("alert", payload, 1, False)

    def _build_ingestor(self) -> Ingestor:
        """The ingestor, built (not started: that comes after the control socket) with the update
        path, which reads its backlog."""
        if self._ingestor_built is None:
            ingestor = Ingestor(self.config, _built(self.store, "store"))
            ingestor.online_status = self._online_status
            ingestor.on_disk_full = self._on_disk_full
            # Scoring gets readings as they arrive, not when their batch commits.
            ingestor.on_readings.append(_built(self.pipeline, "scoring").on_batch)
            ingestor.on_connect.append(self._once(self._send_pending_alerts))
            self._ingestor_built = ingestor
        return self._ingestor_built

    def _build_adaptation(self) -> Adaptation:
        cfg = self.config
        pipeline = _built(self.pipeline, "scoring")
        self.adaptation = Adaptation(
            cfg,
            self.stop_event,
            adapters=AdapterStore(cfg.adapters_dir, keep=cfg.train.keep_versions),
            forker=_built(self.forker, "training helper"),
            serving=pipeline,
            drift=pipeline.drift_signal,
            scored_steps=lambda: pipeline.steps,
            memory=_built(self.watchdog, "watchdog"),
            replay=_built(self.store, "store"),
            ingest=self._build_ingestor(),
            publish_status=self._publish_status,
        )
        return self.adaptation

    def _build_control(self) -> ControlServer:
        adaptation = _built(self.adaptation, "adaptation")
        handlers: dict[str, Handler] = {
            "status": self._status,
            "adapter": partial(commands.handle_adapter, adaptation),
            "adapters": partial(commands.handle_adapters, adaptation),
            "drift": self._drift,
            "train": partial(commands.handle_train, adaptation),
            "rollback": partial(commands.handle_rollback, adaptation),
        }
        self.control = ControlServer(self.config.device.socket, handlers)
        return self.control

    def _build_ingest(self) -> Ingestor:
        self.ingestor = self._build_ingestor()
        return self.ingestor

    def _build_scheduler(self) -> JobScheduler:
        cfg = self.config
        store, adaptation = _built(self.store, "store"), _built(self.adaptation, "adaptation")
        scheduler = JobScheduler()
        scheduler.add("idle", adaptation.idle.sample, interval_s=max(1.0, cfg.train.idle_window_s / 30), run_now=True)
        scheduler.add("update-trigger", adaptation.check, interval_s=cfg.train.check_interval_s)
        scheduler.add("retention", store.run_retention, interval_s=cfg.store.retention_interval_s)
        if cfg.store.check_interval_s:
            scheduler.add("store-check", store.check_now, interval_s=cfg.store.check_interval_s)
        scheduler.add("status", self._publish_status, interval_s=cfg.outputs.status_interval_s)
        scheduler.add("status-changes", self._publish_status_on_change, interval_s=STATUS_CHANGE_CHECK_S)
        self.scheduler = scheduler
        if self.ingestor is not None:
            self.ingestor.clock_watch.on_jump.append(scheduler.clock_jumped)
        return scheduler

    def _build_homeassistant(self) -> Discovery:
        """Home Assistant discovery: publishes the device's config, or removes one published
        before discovery was turned off (built only then: `Discovery.wanted`)."""
        return Discovery(self.config, _built(self.ingestor, "ingest"))

    def _build_metrics(self) -> Part[None]:
        # Imported here: prometheus_client is loaded only by a daemon configured with [metrics].
        from edge_daemon.metrics import Metrics

        return Metrics(self.config, self.status_parts)

    def builders(self) -> list[tuple[str, Callable[[], Part[Any]]]]:
        """The start order: each part is built, then started, once those before it run.

        The update path comes before the control socket (whose commands it answers) and the
        ingestor after it (a second daemon whose socket claim fails must not take over our
        broker session); stopped in reverse, so a running update is asked to end once the
        scheduler, ingestion and the socket have stopped.
        """
        order: list[tuple[str, Callable[[], Part[Any]]]] = [
            ("training helper", self._build_helper),
            ("store", self._build_store),
            ("watchdog", self._build_watchdog),
            ("scoring", self._build_pipeline),
            ("adaptation", self._build_adaptation),
            ("control", self._build_control),
            ("ingest", self._build_ingest),
            ("scheduler", self._build_scheduler),
            *([("homeassistant", self._build_homeassistant)] if Discovery.wanted(self.config) else []),
        ]
        if self.config.metrics.enabled:  # last: it reads every other part (and stops first)
            order.append(("metrics", self._build_metrics))
        return order

    def start(self) -> None:
        """Start every part in order; if one fails, stop those already started and re-raise."""
        # Scoring forwards one small step at a time: a second intra-op thread only contends with
        # ingestion and whatever else the device runs, and with the other core busy it makes a
        # forward many times slower (benchmarks/scoring.py). A training worker sets its own.
        import torch

        from edge_daemon.memory.usage import tight_malloc

        torch.set_num_threads(1)
        tight_malloc()  # before the helper's fork and any thread: freed memory goes back at once
        for name, build in self.builders():
            try:
                part = build()
                part.start()
                self.parts[name] = part
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
            name, part = self.parts.popitem()
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", name)
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
                dead = [name for name, part in self.parts.items() if not part.alive]
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
            training = self.adaptation is not None and self.adaptation.runner.running
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
        for name, part in self.parts.items():
            heartbeat.register(name, partial(_alive, part))
        heartbeat.register("main-loop", self._main_loop_alive)
        return heartbeat

    def _main_loop_alive(self) -> bool:
        return time.monotonic() - self._loop_mono < MAIN_LOOP_STALE_S

    def status_line(self) -> str:
        """The one-line STATUS= text (see status.StatusReport.line)."""
        return StatusReport(self.status_parts()).line()

    # -- status ------------------------------------------------------------------------------

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono

    def status_parts(self) -> StatusParts:
        """The parts status is composed from: those started so far."""
        started = self.parts
        return StatusParts(
            device=self.config.device.id,
            started_unix=self.started_at,
            uptime_s=self.uptime_s(),
            store=self._store_part if "store" in started else None,
            memory=self.watchdog if "watchdog" in started else None,
            scoring=self.pipeline if "scoring" in started else None,
            adaptation=self.adaptation if "adaptation" in started else None,
            ingest=self.ingestor,
        )

    def _online_status(self) -> OnlineStatus:
        """The retained `edge/<id>/status` payload published at every (re)connect."""
        return StatusReport(self.status_parts()).online()

    def _status(self, request: Request) -> StatusReply:
        return StatusReport(self.status_parts()).reply()

    # -- outputs -----------------------------------------------------------------------------

    def _publish(self, suffix: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        ingestor = self.ingestor
        if ingestor is None:
            if suffix == "alert":  # found while starting (a damaged store or adapter): sent at the first connect
                self._pending_alerts.append(payload)
            return
        try:
            ingestor.publish(suffix, payload, qos=qos, retain=retain)
        except Exception as exc:  # publishing is best effort while the broker is away
            log.debug("publish %s failed: %s", suffix, exc)

    def _publish_status(self) -> None:
        """Refresh the retained `edge/<id>/status`."""
        report = StatusReport(self.status_parts())
        self._state_published = report.online_state()
        self._publish("status", report.online(), self.config.outputs.qos, True)

    def _publish_status_on_change(self) -> None:
        """Republish the retained status as soon as the adapter served, drift or training changed."""
        if StatusReport(self.status_parts()).online_state() != self._state_published:
            self._publish_status()

    @staticmethod
    def _once(action: Callable[[], None]) -> Callable[[], None]:
        """`action` the first time the returned hook is called (an alert at the first connect)."""
        done = threading.Event()

        def hook() -> None:
            if not done.is_set():
                done.set()
                action()

        return hook

    def _on_disk_full(self, full: bool) -> None:
        """In the ingest writer: the disk is full (called before each retry) or has room again."""
        if self._store_part is not None:
            self._store_part.on_disk_full(full)  # retention frees what it can
        if full != self._disk_full_published:
            self._disk_full_published = full
            self._publish_status()
            notify.status(self.status_line())

    def _on_level_change(self, old: Level, new: Level) -> None:
        log.log(logging.WARNING if new >= Level.HIGH else logging.INFO, "memory level %s -> %s", old.label, new.label)

    # -- control handlers --------------------------------------------------------------------

    def _drift(self, request: Request) -> DriftReply:
        return {"drift": _built(self.pipeline, "scoring").drift_signal.status()}


def _alive(part: Part[Any]) -> bool:
    return part.alive


def _claim_watchdog() -> None:
    """Pin WatchdogSec= to this process before any child is started.

    sd_watchdog_enabled() treats a missing WATCHDOG_PID as "for me"; the training helper and workers inherit
    the environment and must not take the parent's watchdog as its own, so it is set to our pid.
    """
    if os.environ.get("WATCHDOG_USEC") and not os.environ.get("WATCHDOG_PID"):
        os.environ["WATCHDOG_PID"] = str(os.getpid())
