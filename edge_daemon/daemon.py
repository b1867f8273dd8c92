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
from datetime import datetime, timezone
from types import FrameType
from typing import Any

from edge_daemon import __version__, notify
from edge_daemon.adapters import AdapterStore, AdapterVersion, BaseModel, load_base, serving_model
from edge_daemon.config import Config
from edge_daemon.control import ControlServer, Handler
from edge_daemon.errors import AdapterError, BaseFormatError, ControlError, ModelError
from edge_daemon.ingest import Ingestor
from edge_daemon.model import warm_up
from edge_daemon.notify import Heartbeat
from edge_daemon.pipeline import ScoringPipeline, iso
from edge_daemon.plan import plan_from_config
from edge_daemon.scheduler import IdleDetector, JobScheduler, TriggerInputs, UpdateTrigger, resets_drift_baseline
from edge_daemon.baselines import Baseline
from edge_daemon.scoring import Scorer, ServingRule, baselines_of
from edge_daemon.store import ReplayStore
from edge_daemon.updater import UpdateRunner, heavy_modules_loaded, run_worker
from edge_daemon.watchdog import Level, MemoryWatchdog, PlanGovernor, plan_candidates
from edge_daemon.worker import WorkerForker

log = logging.getLogger(__name__)

# An update after drift trains on the data since the change once it spans this many windows
# (about 11 minutes at 1 s with the default window): enough to train and hold some out.
UPDATE_MIN_WINDOWS_SINCE_CHANGE = 10

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
        # Sections of the `status` reply beyond device/uptime, by key; later parts add theirs
        # (adapter, drift, memory, training).
        self.status_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        self.exit_code = 0
        self.stop_signal: str | None = None
        self.watchdog: MemoryWatchdog | None = None
        self.pipeline: ScoringPipeline | None = None
        self.base: BaseModel | None = None
        self.adapters = AdapterStore(config.adapters_dir, keep=config.train.keep_versions)
        self.scheduler: JobScheduler | None = None
        self.runner: UpdateRunner | None = None
        self.forker: WorkerForker | None = None
        self.governor: PlanGovernor | None = None
        self.trigger = UpdateTrigger(config.train)
        self.idle = IdleDetector(config.train.idle_cpu_percent, config.train.idle_window_s)
        self._model_lock = threading.Lock()
        self._bootstrap_not_before = 0.0
        self._last_decision: str | None = None  # why the trigger last did (not) start an update
        self.trigger_checks = 0  # decisions taken so far (a test waits for the next one)
        # What a training worker adds to the service's usage, as measured by the last one that
        # finished (peak usage while it ran, less the usage when it started); before any, what
        # its plan is chosen to stay within ([memory] update_share of the usage).
        self._measured_worker_mb: float | None = None
        self._usage_at_worker_start: float | None = None
        self.heartbeat: Heartbeat | None = None
        # Monotonic time of the main loop's last health check; the heartbeat watches it.
        self._loop_mono = time.monotonic()
        self.handlers.update(
            {
                "adapter": self._adapter,
                "adapters": self._adapters,
                "drift": self._drift,
                "train": self._train,
                "rollback": self._rollback,
            }
        )

    # -- build and start, in order -----------------------------------------------------------

    def _start_store(self) -> Part:
        self.store = ReplayStore(self.config.store_path, self.config.store, self.config.channels.names)
        store = self.store
        self.status_sections["store"] = lambda: {"readings": store.count(), "bytes": store.size_bytes()}
        return Part("store", store.close)

    def _start_worker_helper(self) -> Part:
        # First, before any thread of ours: training workers are forked from this helper and share
        # the memory of everything imported and set up so far (see worker.py), torch's lazily
        # built state included.
        warm_up()
        self.forker = WorkerForker()
        self.forker.register("update", run_worker)
        self.forker.start()
        forker = self.forker
        return Part("training helper", forker.stop, lambda: forker.alive)

    def _start_watchdog(self) -> Part:
        assert self.forker is not None
        self.watchdog = MemoryWatchdog.from_config(self.config.memory, shared_level=self.forker.level)
        watchdog = self.watchdog
        watchdog.add_listener(self._on_level_change)
        watchdog.start()
        self.status_sections["memory"] = watchdog.snapshot
        return Part("watchdog", watchdog.stop, lambda: watchdog.alive)

    def _load_serving(self) -> Scorer | None:
        """The base model with the current adapter merged in; None while there is no base yet."""
        cfg = self.config
        if not (cfg.base_dir / "config.json").exists():
            log.warning("no base model in %s yet: storing readings; one is trained once enough data is stored", cfg.base_dir)
            return None
        try:
            self.base = load_base(cfg.base_dir, cfg.channels.names, cfg.channels.period_s, cfg.channels.inputs_only)
        except BaseFormatError as exc:
            # An upgrade changed the forecaster's layout: keep the old base aside, serve nothing
            # from it (its adapters fit only it) and train a new one from the store.
            aside = cfg.base_dir.with_name(f"{cfg.base_dir.name}.old-format-{int(time.time())}")
            os.rename(cfg.base_dir, aside)
            self.adapters.use_base()
            log.error("%s; moved it to %s; a new one is trained once enough data is stored", exc, aside)
            return None
        version = self._current_adapter()
        try:
            model = serving_model(self.base, version)
        except AdapterError as exc:
            log.error("cannot serve adapter v%s (%s); serving the base model", version.version if version else "?", exc)
            version = None
            model = serving_model(self.base, None)
        baselines, held_out = self._baselines_for(version)
        return Scorer(
            self.base, model, cfg.outputs.anomaly_threshold, version=version.version if version else None,
            baselines=baselines, held_out=held_out, rule=serving_rule(cfg),
        )  # fmt: skip

    def _baselines_for(self, version: AdapterVersion | None) -> tuple[list[Baseline], dict[str, Any] | None]:
        """The baselines fitted with `version` (refitted with each update) and its held-out comparison,
        else the base's. An adapter from before baselines were refitted gets the base's baselines and
        no comparison: the base's says nothing about that adapter."""
        assert self.base is not None
        if version is not None and version.meta.get("baselines"):
            return baselines_of(version.meta), version.meta.get("held_out")
        return baselines_of(self.base.meta), self.base.meta.get("held_out") if version is None else None

    def _current_adapter(self) -> AdapterVersion | None:
        try:
            return self.adapters.current()
        except AdapterError as exc:
            log.error("current adapter unreadable: %s", exc)
            return None

    def _start_pipeline(self) -> Part:
        self.pipeline = ScoringPipeline(self.config, self._publish, self._load_serving())
        pipeline = self.pipeline
        pipeline.start()
        self.status_sections["drift"] = lambda: pipeline.drift.status()
        self.status_sections["adapter"] = self._adapter_summary
        self.status_sections["scoring"] = pipeline.status
        return Part("scoring", pipeline.stop, lambda: pipeline.alive)

    def _start_scheduler(self) -> Part:
        assert self.watchdog is not None and self.store is not None
        cfg = self.config
        ladder = plan_candidates(cfg.train.batch_size, plan_from_config(cfg.train).micro_batch)
        ladder = [
            p
            for p in ladder
            if not (cfg.train.gradient_checkpointing == "off" and p.checkpointing)
            and not (cfg.train.gradient_checkpointing == "on" and not p.checkpointing)
            and not (cfg.train.optimizer == "adamw" and p.optimizer == "adamw8bit")
            and not (cfg.train.optimizer == "adamw8bit" and p.optimizer == "adamw")
        ] or ladder
        shared = self.watchdog.shared_level
        assert shared is not None
        self.governor = PlanGovernor.from_config(cfg.memory, shared, ladder)
        assert self.forker is not None
        self.runner = UpdateRunner(cfg, self.governor, self.forker, self._on_update_result)
        self.governor.stop_event = self.forker.stop_flag
        self.status_sections["training"] = self._training_status
        store = self.store
        scheduler = JobScheduler()
        scheduler.add("idle", self.idle.sample, interval_s=max(1.0, cfg.train.idle_window_s / 30), run_now=True)
        scheduler.add("update-trigger", self._maybe_update, interval_s=cfg.train.check_interval_s)
        scheduler.add("retention", store.run_retention, interval_s=cfg.store.retention_interval_s)
        scheduler.add("status", self._publish_status, interval_s=cfg.outputs.status_interval_s)
        scheduler.start()
        self.scheduler = scheduler
        runner = self.runner

        def stop() -> None:
            scheduler.stop()
            # An update stops at its next micro-batch boundary; nothing partial is saved.
            runner.stop(timeout=max(5.0, cfg.train.stop_timeout_s))

        return Part("scheduler", stop, lambda: scheduler.alive)

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
        if self.pipeline is not None:
            ingestor.on_batch.append(self.pipeline.on_batch)
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
        """The one-line STATUS= text: adapter, memory, drift, readings, broker and training.

        Each piece is best effort: one that fails is left out rather than losing the line.
        """
        pieces: list[str] = []

        def add(build: Callable[[], str | None]) -> None:
            try:
                piece = build()
            except Exception as exc:  # noqa: BLE001 - a status line must never raise
                log.debug("status line piece failed: %s", exc)
                return
            if piece:
                pieces.append(piece)

        add(self._status_adapter)
        add(lambda: f"memory {self.watchdog.level.label}" if self.watchdog is not None else None)
        add(self._status_drift)
        add(lambda: f"{self.store.count()} readings" if self.store is not None else None)
        add(lambda: "broker unreachable" if self.ingestor is not None and not self.ingestor.connected else None)
        add(self._status_training)
        return ", ".join(pieces)

    def _status_adapter(self) -> str:
        if self.base is None:
            return "no base model yet"
        version = self._current_adapter()
        return f"adapter v{version.version}" if version is not None else "base model"

    def _status_drift(self) -> str | None:
        if self.pipeline is None:
            return None
        channels = self.pipeline.drift.status().get("channels", {})
        drifted = [name for name, detail in channels.items() if detail.get("state") == "drift"]
        return f"drift {' '.join(drifted)}" if drifted else "drift none"

    def _status_training(self) -> str | None:
        runner = self.runner
        if runner is None or not runner.running:
            return None
        job = runner.job or {}
        phase = runner.progress.get("phase", "starting")
        step = runner.progress.get("step")
        return f"{job.get('kind', 'update')} {phase}" + (f" step {step}" if step is not None else "")

    # -- status ------------------------------------------------------------------------------

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_mono

    def _online_status(self) -> dict[str, Any]:
        """The retained `edge/<id>/status` payload published at every (re)connect."""
        status: dict[str, Any] = {
            "online": True,
            "device": self.config.device.id,
            "version": __version__,
            "started": datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(),
            "adapter_version": self._adapter_summary()["version"],
        }
        if self.pipeline is not None:
            status["drift"] = self.pipeline.drift.residual_drift_detected
        return status

    def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = {"device": self.config.device.id, "uptime_s": round(self.uptime_s(), 3)}
        for key, section in list(self.status_sections.items()):
            reply[key] = section()
        return reply

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

    def _on_level_change(self, old: Level, new: Level) -> None:
        log.log(logging.WARNING if new >= Level.HIGH else logging.INFO, "memory level %s -> %s", old.label, new.label)

    # -- adaptation --------------------------------------------------------------------------

    def _maybe_update(self) -> None:
        """The update-trigger job: start an update (or the base bootstrap) when the trigger says so."""
        assert self.runner is not None and self.watchdog is not None and self.pipeline is not None
        if self.runner.running:
            return
        pipeline = self.pipeline
        if self.base is None:
            self._maybe_bootstrap()
            return
        decision = self.trigger.decide(
            TriggerInputs(
                idle=self.idle.idle(),
                memory_level=self.watchdog.level.label,
                backlog=self.ingestor.backlog if self.ingestor else 0,
                # Input detectors also fire on seasonal swings; what warrants an update is the
                # model's residuals drifting.
                drift_detected=pipeline.drift.residual_drift_detected,
                new_windows=pipeline.steps_since_update,
                has_base=True,
                headroom_mb=self._worker_headroom_mb(),
            )
        )
        self._last_decision = decision.reason
        self.trigger_checks += 1
        if not decision.start:
            log.debug("no update: %s", decision.reason)
            return
        # Drift dated by its judges: the update learns from the data since the change, once there
        # is enough of it to train and validate on (a request does not wait: it takes the last
        # train.recent_hours until then).
        since = pipeline.drift.residual_change_from
        if since is not None and self.base is not None:
            needed_s = UPDATE_MIN_WINDOWS_SINCE_CHANGE * (self.base.cfg.window + 1) * self.config.channels.period_s
            have_s = (pipeline.newest_ts or since) - since
            if have_s < needed_s:
                if not self.trigger.requested:
                    self._last_decision = f"waiting for data since the change: {have_s:.0f} of {needed_s:.0f} s"
                    return
                since = None
        self.start_update(decision.reason, since=since)

    def _worker_headroom_mb(self) -> float:
        """MB under the critical threshold left once a training worker of the expected size runs.

        Below it the watchdog tightens the plan as levels rise; at it the update stops. An update
        expected to reach it would stop at its first boundaries, so it does not start.
        """
        assert self.watchdog is not None
        limit = self.config.memory.critical * self.watchdog.budget_mb
        return limit - (self.watchdog.usage_mb + self._expected_worker_mb())

    def _expected_worker_mb(self) -> float:
        if self._measured_worker_mb is not None:
            return self._measured_worker_mb
        assert self.watchdog is not None
        return self.config.memory.update_share * self.watchdog.usage_mb

    def start_update(self, reason: str, since: float | None = None) -> bool:
        assert self.runner is not None and self.governor is not None and self.watchdog is not None
        job = {
            "kind": "update",
            "reason": reason,
            "since": since,  # recent data starts here (None: the last train.recent_hours)
            "candidates": [p.to_dict() for p in self.governor.start_candidates()],
            "baseline_mb": self.watchdog.usage_mb,
            "budget_mb": self.watchdog.budget_mb,
            "seed": int(time.time()),
        }
        if not self._start_worker(job):
            return False
        self.trigger.started()
        if self.pipeline is not None:
            self.pipeline.steps_since_update = 0
        return True

    def _maybe_bootstrap(self) -> None:
        """No base model yet: train one in a worker once the store holds enough gap-free windows."""
        assert self.runner is not None and self.store is not None and self.watchdog is not None
        if self.watchdog.level != Level.NORMAL or not (self.trigger.requested or self.idle.idle()):
            return
        if self._worker_headroom_mb() < 0:
            log.debug("no bootstrap: not enough memory for the training worker")
            return
        if time.monotonic() < self._bootstrap_not_before:
            return
        if self.store.count() < self.config.model.bootstrap_min_windows * len(self.config.channels.names):
            return
        if self._start_worker({"kind": "pretrain", "reason": "no base model"}):
            self.trigger.started()

    def _start_worker(self, job: dict[str, Any]) -> bool:
        """Start a training worker, with the service's usage now as the mark its increment is measured from."""
        assert self.runner is not None and self.watchdog is not None
        usage = self.watchdog.usage_mb
        if not self.runner.start(job):
            return False
        self.watchdog.reset_peak()
        self._usage_at_worker_start = usage
        return True

    def _learn_worker_increment(self, finished: bool) -> None:
        """After a worker that ran to its end: what it added to the service at its peak is the next
        worker's expected cost. One stopped or killed on the way needed at least what it reached:
        the next must have room for more than that (a start rule that kept expecting less would
        start it again after every back-off, to be stopped at the same point)."""
        if self.watchdog is None or self._usage_at_worker_start is None:
            return
        added = self.watchdog.peak_usage_mb - self._usage_at_worker_start
        self._usage_at_worker_start = None
        if added <= 0:
            return
        expected = self._expected_worker_mb()
        if finished:
            log.info("the training worker added %.0f MB at its peak (expected %.0f MB)", added, expected)
            self._measured_worker_mb = added
        elif added > expected:
            log.info("the training worker reached +%.0f MB before it ended (expected %.0f MB in all)", added, expected)
            self._measured_worker_mb = added

    def _on_update_result(self, result: dict[str, Any]) -> None:
        """In the runner's monitor thread: serve an accepted adapter, publish the outcome."""
        outcome = result.get("outcome") or {}
        stopped = bool(outcome.get("stopped")) if isinstance(outcome, dict) else False
        backoff = self.governor.retry_after_s if self.governor else 0.0
        self.trigger.finished(stopped_for_memory=stopped, backoff_s=backoff)
        self._learn_worker_increment(finished=not (stopped or result.get("aborted") or result.get("error")))
        if self.watchdog is not None:
            from edge_daemon.watchdog import release_memory

            release_memory()
        kind = result.get("kind")
        if result.get("aborted") and self.stop_event.is_set():
            # Stopped for shutdown at a micro-batch boundary: nothing was saved, and it is no
            # verdict on the adapter, so no `adapter_rejected` alert.
            log.info("%s stopped for shutdown; nothing saved", kind)
            return
        if kind == "pretrain":
            if result.get("accepted"):
                log.info("base model trained from the store")
                scorer = self._load_serving()
                if scorer is not None and self.pipeline is not None:
                    self.pipeline.set_scorer(scorer)
                    self.pipeline.alert({"type": "base_model", "message": "base model trained from the store"})
            else:
                # Usually too few gap-free windows yet; each try costs a worker.
                retry_s = max(60.0, self.config.train.min_interval_s)
                self._bootstrap_not_before = time.monotonic() + retry_s
                log.warning("base model bootstrap failed: %s; retrying in %.0f s", result.get("error"), retry_s)
            return
        if result.get("accepted") and result.get("version") is not None:
            version = int(result["version"])
            try:
                self._serve_version(self.adapters.get(version), resets_drift_baseline(result.get("job", {}).get("reason")))
                # Only now, with the scorer serving it, does `current` name it (a restart before
                # this serves what was served before).
                self.adapters.make_current(version)
            except (AdapterError, ModelError, OSError) as exc:
                log.error("accepted adapter v%d cannot be served: %s", version, exc)
                return
            summary = result.get("summary", {})
            self._alert_adapter("adapter_accepted", version, summary, result.get("reason"))
        else:
            reason = result.get("error") or result.get("reason")
            summary = result.get("summary", {})
            self._alert_adapter("adapter_rejected", None, summary, reason)
            log.info("update not accepted: %s", reason)

    def _alert_adapter(self, kind: str, version: int | None, summary: dict[str, Any], reason: Any) -> None:
        if self.pipeline is None:
            return
        self.pipeline.alert(
            {
                "type": kind,
                "version": version,
                "reason": reason,
                "metrics_before": summary.get("metrics_before"),
                "metrics_after": summary.get("metrics_after"),
                "message": f"{kind.replace('_', ' ')}" + (f": v{version}" if version is not None else f": {reason}"),
            }
        )
        self._publish_status()

    def _serve_version(self, version: AdapterVersion | None, reset_drift: bool = True) -> None:
        """Merge `version` into a copy of the base and swap it in; the drift baseline restarts
        unless `reset_drift` is False (see scheduler.resets_drift_baseline)."""
        assert self.base is not None and self.pipeline is not None
        with self._model_lock:
            model = serving_model(self.base, version)
            scorer = self.pipeline.scorer
            if scorer is not None:
                baselines, held_out = self._baselines_for(version)
                scorer.swap_model(model, version.version if version else None, baselines, held_out)
            if reset_drift:
                self.pipeline.drift.reset_baseline(time.time())

    # -- control handlers --------------------------------------------------------------------

    def _adapter_summary(self) -> dict[str, Any]:
        version = self._current_adapter()
        if version is None:
            return {"version": None, "created": None, "size_bytes": 0, "val_loss": None}
        return {
            "version": version.version,
            "created": version.created,
            "size_bytes": version.size_bytes,
            "val_loss": version.meta.get("val_loss"),
        }

    def _adapter(self, request: dict[str, Any]) -> dict[str, Any]:
        version = self._current_adapter()
        detail = self._adapter_summary()
        if version is not None:
            meta = version.meta
            detail.update(
                {
                    "metrics_before": meta.get("metrics_before"),
                    "metrics_after": meta.get("metrics_after"),
                    "plan": meta.get("plan"),
                    "chosen_blocks": meta.get("chosen_blocks"),
                    "peak_rss_mb": meta.get("peak_rss_mb"),
                    "reason": meta.get("reason"),
                }
            )
        return {"adapter": detail}

    def _adapters(self, request: dict[str, Any]) -> dict[str, Any]:
        current = self._current_adapter()
        listed = []
        for version in self.adapters.list():
            before = version.meta.get("metrics_before") or {}
            after = version.meta.get("metrics_after") or {}
            listed.append(
                {
                    "version": version.version,
                    "created": version.created,
                    "size_bytes": version.size_bytes,
                    "val_loss": version.meta.get("val_loss"),
                    "current": current is not None and version.version == current.version,
                    "metrics": {
                        "recent_before": before.get("recent_val_loss"),
                        "recent_after": after.get("recent_val_loss"),
                        "replay_before": before.get("replay_val_loss"),
                        "replay_after": after.get("replay_val_loss"),
                    },
                }
            )
        return {"current": current.version if current else None, "adapters": listed}

    def _drift(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.pipeline is not None
        return {"drift": self.pipeline.drift.status()}

    def _train(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.runner is not None and self.runner.running:
            return {"accepted": True, "state": "running", "message": "an update is already running"}
        if not self.trigger.request():
            message = 'requests may not start an update here: [train] start_on leaves out "request"'
            return {"accepted": False, "state": "idle", "message": message}
        message = "update requested: it starts when the device is idle and memory is normal"
        if self.base is None:
            message = "no base model yet: a base model is trained first, once enough data is stored"
        return {"accepted": True, "state": "idle", "message": message}

    def _rollback(self, request: dict[str, Any]) -> dict[str, Any]:
        version_number = int(request["version"])  # checked by the control server: an int >= 1
        if self.base is None:
            raise ControlError("no base model yet")
        version = self.adapters.rollback(version_number, data_ts=self.pipeline.newest_ts if self.pipeline else None)
        self._serve_version(version)
        log.info("rolled back to adapter v%d", version_number)
        if self.pipeline is not None:
            self.pipeline.alert({"type": "rollback", "version": version_number, "message": f"rolled back to v{version_number}"})
        return {"adapter": self._adapter_summary()}

    def _training_status(self) -> dict[str, Any]:
        runner = self.runner
        if runner is None:
            return {"state": "idle", "last": None, "plan": None}
        if runner.running:
            progress = dict(runner.progress)
            state = "running"
            plan = progress.get("plan")
        else:
            progress = {}
            state = "paused" if self.governor is not None and not self.governor.may_start() else "idle"
            plan = None
        last = runner.last
        return {
            "state": state,
            "plan": plan,
            "progress": progress,
            "job": {k: v for k, v in (runner.job or {}).items() if k != "candidates"} or None,
            "requested": self.trigger.requested,
            "trigger": self._last_decision,
            "retry_after_s": self.governor.retry_after_s if self.governor else 0.0,
            # What the start rule expects a training worker to add (measured by the last one that
            # finished, else the update's share of the usage now), and whether that is measured.
            "expected_worker_mb": round(self._expected_worker_mb(), 1),
            "expected_worker_measured": self._measured_worker_mb is not None,
            "heavy_modules": heavy_modules_loaded(),
            "last": _last_summary(last),
        }


def _claim_watchdog() -> None:
    """Pin WatchdogSec= to this process before any child is started.

    sd_watchdog_enabled() treats a missing WATCHDOG_PID as "for me"; the training helper and workers inherit
    the environment and must not take the parent's watchdog as its own, so it is set to our pid.
    """
    if os.environ.get("WATCHDOG_USEC") and not os.environ.get("WATCHDOG_PID"):
        os.environ["WATCHDOG_PID"] = str(os.getpid())


def _last_summary(last: dict[str, Any] | None) -> dict[str, Any] | None:
    if not last:
        return None
    summary = last.get("summary") or {}
    return {
        "kind": last.get("kind"),
        "accepted": last.get("accepted"),
        "version": last.get("version"),
        "reason": last.get("reason") or last.get("error"),
        "duration_s": last.get("duration_s"),
        "metrics_before": summary.get("metrics_before"),
        "metrics_after": summary.get("metrics_after"),
        "peak_rss_mb": (summary.get("peak_rss_bytes") or 0) / 2**20 or None,
        "outcome": last.get("outcome"),
        "finished": iso(time.time()),
    }


def serving_rule(config: Config) -> ServingRule:
    outputs = config.outputs
    return ServingRule(mode=outputs.serve, compare_steps=outputs.compare_steps, margin=outputs.switch_margin)
