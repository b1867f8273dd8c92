"""The update path's one owner on the daemon's side: when an update starts, what it is asked to
do, what happens to its result, and which adapter is served.

`Adaptation` holds the trigger, the start rule (the worker's expected memory
under the critical line), the runner of training workers, the serving switch
(the scorer swaps an accepted adapter in, then `current` names it) and rollback;
the replies built from it are in commands.py.

It is built complete, over narrow ports to the parts it works with (below): the
drift signal, the serving swap, the memory gauge, the replay data and the ingest
gauge; the count of new scoring windows since the last update is its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from edge_daemon.adaptation.runner import WORKER_TARGET, UpdateRunner
from edge_daemon.adaptation.tally import UpdateTally
from edge_daemon.adaptation.trigger import IdleDetector, TriggerInputs, UpdateTrigger
from edge_daemon.artifacts.adapters import AdapterDamagedError, AdapterStore, AdapterVersion
from edge_daemon.artifacts.base import BaseModel, load_base
from edge_daemon.artifacts.merge import serving_model
from edge_daemon.baselines import Baseline, HeldOut
from edge_daemon.config import Config
from edge_daemon.errors import AdapterError, BaseDamagedError, BaseFormatError, ControlError, ModelError, TrainingError
from edge_daemon.mqtt.outputs import (
    AdapterAcceptedAlert,
    Alert,
    AdapterRejectedAlert,
    TrainingState,
    adapter_accepted_alert,
    adapter_damaged_alert,
    adapter_rejected_alert,
    base_damaged_alert,
    base_model_alert,
    rollback_alert,
)
from edge_daemon.training.plan import forward_only, plan_ladder
from edge_daemon.training.records import JobResult, UpdateCause, UpdateJob, resets_drift_baseline
from edge_daemon.scoring.serving import Scorer, baselines_of, serving_rule
from edge_daemon.training.job import run_worker
from edge_daemon.training.governor import PlanGovernor
from edge_daemon.memory.pressure import Level
from edge_daemon.memory.usage import release_memory
from edge_daemon.model import Forecaster
from edge_daemon.control.replies import TrainingStatus
from edge_daemon.training.trace import heavy_modules_loaded
from edge_daemon.training.worker import WorkerForker

log = logging.getLogger(__name__)

# An update after drift trains on the data since the change once it spans this many windows
# (about 11 minutes at 1 s with the default window): enough to train and hold some out.
UPDATE_MIN_WINDOWS_SINCE_CHANGE = 10
# The newest stored data the baselines served while there is no base are fitted on (fitted
# again each time the span of data they were fitted on could double), and the level judges start
# from: a day, every hour of it (at 1 s and 3 channels about 6 MB read; the baselines' windows
# every few steps, pretrain.STAND_IN_MAX_WINDOWS).
NEWEST_DAY_S = 86400.0
# A fit that failed (too few gap-free windows yet) is tried again after this long.
STAND_IN_RETRY_S = 300.0
# What an update that starts forward-only (in the service: its data, the base it adapts, a scoring
# pass's activations, its metrics and refitted baselines) is expected to add before one has been
# measured, as a share of what a worker is expected to add before one has. Measured on the default
# model (benchmarks/memory.py, five runs): 8.2 to 11.8 MB over a serving charge of 181 to 191 MB,
# 0.29 to 0.43 of a worker's 0.15 x usage; half of it leaves a margin.
FORWARD_ONLY_SHARE = 0.5


# -- the ports: what the update path needs of the other parts, and nothing more --------------


class DriftSignal(Protocol):
    """Whether the model's residuals (or a judged channel's level) drifted, what warrants an
    update, since when, and the restart of the judges once a new adapter serves
    (pipeline.ResidualDrift)."""

    @property
    def detected(self) -> bool: ...

    @property
    def since(self) -> float | None: ...

    def reset(self, t: float | None = None, validation: Mapping[str, Any] | None = None) -> None: ...

    def start_from(self, validation: Mapping[str, Any] | None) -> None: ...

    def start_levels(self, ts: np.ndarray, channel_idx: np.ndarray, values: np.ndarray) -> None: ...


class ServingSwap(Protocol):
    """The scorer's side of serving (pipeline.ScoringPipeline): a new scorer (a new base), a new
    merged model in the scorer there is, alerts, and the data's clock."""

    def set_scorer(self, scorer: Scorer) -> None: ...

    def swap_model(self, model: Forecaster, version: int | None, baselines: list[Baseline], held_out: HeldOut | None) -> None: ...

    def alert(self, payload: Alert) -> None: ...

    @property
    def newest_ts(self) -> float | None: ...


class MemoryGauge(Protocol):
    """The service's memory as the watchdog measures it (memory.watchdog.MemoryWatchdog)."""

    @property
    def level(self) -> Level: ...

    @property
    def usage_mb(self) -> float: ...

    @property
    def budget_mb(self) -> float: ...

    @property
    def peak_usage_mb(self) -> float: ...

    def reset_peak(self) -> None: ...


class ReplayData(Protocol):
    """What the store holds, for the start rules (store.ReplayStore)."""

    def count(self) -> int: ...

    def time_range(self) -> tuple[float, float] | None: ...

    def read(self, since: float | None = None, until: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def disk_short(self) -> bool: ...


class IngestGauge(Protocol):
    """Ingestion's state (mqtt.ingestor.Ingestor): readings received and not yet committed, and
    whether a batch waits for disk space."""

    @property
    def backlog(self) -> int: ...

    @property
    def disk_full(self) -> bool: ...


class NewWindows:
    """Scoring windows completed since the last update started.

    The scoring thread only counts its steps (`steps()`, one writer); this keeps the mark an
    update sets when it starts, under its own lock, so nothing writes across threads.
    """

    def __init__(self, steps: Callable[[], int]) -> None:
        self._steps = steps
        self._lock = threading.Lock()
        self._mark = steps()

    @property
    def count(self) -> int:
        with self._lock:
            return self._steps() - self._mark

    def reset(self) -> None:
        with self._lock:
            self._mark = self._steps()


def register_worker(forker: WorkerForker) -> None:
    """Make the training worker's entry point known to the helper (before it forks)."""
    forker.register(WORKER_TARGET, run_worker)


class Adaptation:
    """Decides, starts, relays and serves updates; knows the base and the served adapter.

    A part of the daemon: `start()` loads the served model (the base with the current adapter
    merged in) into the scorer, `stop()` ends a running update at its next micro-batch
    boundary, `status()` is the `training` section. The update-trigger job calls `check()`.
    """

    def __init__(
        self,
        config: Config,
        stop_event: threading.Event,
        *,
        adapters: AdapterStore,
        forker: WorkerForker,
        serving: ServingSwap,
        drift: DriftSignal,
        scored_steps: Callable[[], int],
        memory: MemoryGauge,
        replay: ReplayData,
        ingest: IngestGauge,
        publish_status: Callable[[], None],
    ) -> None:
        cfg = config
        self.config = config
        self.stop_event = stop_event
        self.adapters = adapters
        self.serving = serving
        self.drift = drift
        self.memory = memory
        self.replay = replay
        self.ingest = ingest
        self.publish_status = publish_status
        self.new_windows = NewWindows(scored_steps)
        self.trigger = UpdateTrigger(cfg.train)
        self.idle = IdleDetector(cfg.train.idle_cpu_percent, cfg.train.idle_window_s)
        self.base: BaseModel | None = None  # None until one is stored (then trained from the store)
        # The plan governor reads the level the watchdog shares with the helper and its workers.
        self.governor = PlanGovernor.from_config(cfg.memory, forker.level, plan_ladder(cfg.train), train=cfg.train)
        self.governor.stop_event = forker.stop_flag
        self.runner = UpdateRunner(cfg, self.governor, forker, self.on_result)
        self._model_lock = threading.Lock()
        self._bootstrap_not_before = 0.0
        self._stand_in_span_s: float | None = None  # data span the served stand-in was fitted on
        self._stand_in_not_before = 0.0
        self.last_decision: str | None = None  # why the trigger last did (not) start an update
        self.trigger_checks = 0  # decisions taken so far
        self.updates = UpdateTally()  # every job that ended, by cause and outcome (the metrics read it)
        # What a training worker adds to the service's usage, as measured by the last one that
        # finished (peak usage while it ran, less the usage when it started); before any, what
        # its plan is chosen to stay within ([memory] update_share of the usage).
        self.measured_worker_mb: float | None = None
        self.measured_forward_only_mb: float | None = None  # the same, of an update that started forward-only
        self._usage_at_worker_start: float | None = None

    # -- the part ----------------------------------------------------------------------------

    def start(self) -> None:
        """Serve what was served before the restart; while there is no base yet, the best
        baseline fitted on the store (once it holds enough)."""
        scorer = self.load_serving()
        stored = self.replay.time_range()
        if stored is not None and (scorer is None or self.config.drift.level_channels):
            # The store's newest day, read once: what baselines are fitted on while there is no
            # base, and where the level judges start instead of learning a day.
            newest = self.replay.read(stored[1] - NEWEST_DAY_S, None)
            if scorer is None:
                self.serve_stand_in(newest)
            if self.config.drift.level_channels:
                self.drift.start_levels(*newest)
            del newest
        if scorer is not None:
            self.serving.set_scorer(scorer)
            if scorer.version is not None:  # the drift judges start from the served adapter's validation residuals
                self.drift.start_from(self._validation_residuals(self.adapters.get(scorer.version)))

    def stop(self, timeout: float | None = None) -> None:
        """End a running update at its next micro-batch boundary (nothing partial is saved);
        kill its worker after `timeout` (`[train] stop_timeout_s`, at least 5 s)."""
        self.runner.stop(timeout=timeout if timeout is not None else max(5.0, self.config.train.stop_timeout_s))

    @property
    def alive(self) -> bool:
        """Its work runs in the scheduler's update-trigger job (dead with the scheduler) and
        in a training worker watched by the runner's thread while one runs."""
        return True

    def status(self) -> TrainingStatus:
        """The `training` section of `status`."""
        runner, governor = self.runner, self.governor
        if runner.running:
            progress = runner.progress
            state = "running"
        else:
            progress = None
            state = "paused" if not governor.may_start() else "idle"
        job = runner.job
        return {
            "state": state,
            "plan": progress.plan.to_dict() if progress is not None and progress.plan is not None else None,
            "progress": progress.to_json() if progress is not None else {},
            "job": job.to_json() if job is not None else None,
            "requested": self.trigger.requested,
            "trigger": self.last_decision,
            "retry_after_s": governor.retry_after_s,
            # What the start rule expects a training worker to add (measured by the last one that
            # finished, else the update's share of the usage now), and whether that is measured.
            "expected_worker_mb": round(self.expected_worker_mb(), 1),
            "expected_worker_measured": self.measured_worker_mb is not None,
            "heavy_modules": heavy_modules_loaded(),
            "last": runner.last.to_json() if runner.last is not None else None,
        }

    @property
    def training_state(self) -> TrainingState:
        """Training (an update or a base), paused (a memory back-off), or idle. Cheap: read for
        the retained MQTT status."""
        if self.runner.running:
            return "running"
        return "paused" if not self.governor.may_start() else "idle"

    @property
    def training(self) -> str | None:
        """What runs now, for the STATUS= line ("update training step 3"); None while idle.
        Cheap: the runner's last progress message."""
        runner = self.runner
        if not runner.running:
            return None
        job, progress = runner.job, runner.progress
        step = f" step {progress.step}" if progress.step is not None else ""
        return f"{job.kind if job is not None else 'update'} {progress.phase}{step}"

    # -- what is served ----------------------------------------------------------------------

    def load_serving(self) -> Scorer | None:
        """The base model with the current adapter merged in; None while there is no base yet."""
        cfg = self.config
        if not (cfg.base_dir / "config.json").exists():
            log.warning("no base model in %s yet: storing readings; one is trained once enough data is stored", cfg.base_dir)
            return None
        try:
            base = load_base(cfg.base_dir, cfg.channels.names, cfg.channels.period_s, cfg.channels.inputs_only)
        except (BaseFormatError, BaseDamagedError) as exc:
            # An upgrade changed the forecaster's layout, or the card damaged a file: keep the old
            # base aside, serve nothing from it (its adapters fit only it) and train a new one from
            # the store.
            kind = "damaged" if isinstance(exc, BaseDamagedError) else "old-format"
            aside = cfg.base_dir.with_name(f"{cfg.base_dir.name}.{kind}-{int(time.time())}")
            os.rename(cfg.base_dir, aside)
            self.adapters.use_base()
            log.error("%s; moved it to %s; baselines fitted on the store are served until a new one is trained from it", exc, aside)
            if isinstance(exc, BaseDamagedError):
                self.serving.alert(base_damaged_alert(str(exc), str(aside)))
            return None
        self.base = base
        model, version = self._intact_serving(base, self.current_adapter())
        baselines, held_out = self._baselines_for(base, version)
        return Scorer(
            base, model, cfg.outputs.anomaly_threshold, version=version.version if version else None,
            baselines=baselines, held_out=held_out, rule=serving_rule(cfg.outputs),
        )  # fmt: skip

    def _intact_serving(self, base: BaseModel, current: AdapterVersion | None) -> tuple[Any, AdapterVersion | None]:
        """The model to serve and its version: `current`, or when it cannot be served (damaged
        files, another base's) the newest earlier version that can, else the base alone. A
        fallback moves the pointer (recorded in the history) and a damaged adapter is alerted."""
        candidates: list[AdapterVersion | None] = [current]
        if current is not None:
            candidates += [v for v in reversed(self.adapters.list()) if v.version < current.version] + [None]
        damaged: list[str] = []
        for candidate in candidates:
            try:
                model = serving_model(base, candidate)
            except AdapterError as exc:
                log.error("cannot serve adapter v%s: %s", candidate.version if candidate else "?", exc)
                if isinstance(exc, AdapterDamagedError):
                    damaged.append(str(exc))
                continue
            if current is not None and candidate is not current:
                try:
                    if candidate is None:
                        self.adapters.use_base()
                    else:
                        self.adapters.rollback(candidate.version)
                except AdapterError as exc:  # the pointer stays; what serves is right for this run
                    log.error("could not record the fallback: %s", exc)
                served = f"v{candidate.version}" if candidate is not None else "the base model"
                log.error("adapter v%d cannot be served: serving %s instead", current.version, served)
                if damaged:
                    self.serving.alert(adapter_damaged_alert(current.version, None if candidate is None else candidate.version, damaged[0]))
            return model, candidate
        raise AssertionError("the base model alone always serves")  # pragma: no cover - candidates end with None

    @staticmethod
    def _baselines_for(base: BaseModel, version: AdapterVersion | None) -> tuple[list[Baseline], HeldOut | None]:
        """The baselines fitted with `version` (refitted with each update) and its held-out comparison,
        else the base's. An adapter from before baselines were refitted gets the base's baselines and
        no comparison: the base's says nothing about that adapter."""
        if version is not None and version.meta.baselines:
            return baselines_of(version.meta.baselines), version.meta.held_out
        return baselines_of(base.meta.get("baselines")), base.meta.get("held_out") if version is None else None

    def current_adapter(self) -> AdapterVersion | None:
        try:
            return self.adapters.current()
        except AdapterError as exc:
            log.error("current adapter unreadable: %s", exc)
            return None

    def serve_version(self, version: AdapterVersion | None, reset_drift: bool = True) -> None:
        """Merge `version` into a copy of the base and swap it in; the drift baseline restarts
        unless `reset_drift` is False (see records.resets_drift_baseline)."""
        if self.base is None:
            raise ControlError("no base model yet")
        with self._model_lock:
            model = serving_model(self.base, version)
            baselines, held_out = self._baselines_for(self.base, version)
            self.serving.swap_model(model, version.version if version else None, baselines, held_out)
            if reset_drift:
                self.drift.reset(time.time(), self._validation_residuals(version))

    def _validation_residuals(self, version: AdapterVersion | None) -> Mapping[str, Any] | None:
        """What the served model's held-out validation residuals say is normal (the adapter's meta,
        or the base's when no adapter serves): where the drift judges restart from. None for an
        artifact from before they were recorded: the judges learn from the stream."""
        if version is None:
            return None if self.base is None else self.base.meta.get("validation_residuals")
        recorded = version.meta.validation_residuals
        return None if recorded is None else dict(recorded)

    # -- starting ----------------------------------------------------------------------------

    def check(self) -> None:
        """The update-trigger job: start an update (or the base bootstrap) when the trigger says so."""
        if self.runner.running or self.trigger.running:  # a worker runs, or its result is being served
            return
        base = self.base
        if base is None:
            self.serve_stand_in()
            self._maybe_bootstrap()
            return
        decision = self.trigger.decide(
            TriggerInputs(
                idle=self.idle.idle(),
                memory_level=self.memory.level,
                backlog=self.ingest.backlog,
                # Input detectors also fire on seasonal swings; what warrants an update is the
                # model's residuals drifting.
                drift_detected=self.drift.detected,
                new_windows=self.new_windows.count,
                has_base=True,
                headroom_mb=max(self.worker_headroom_mb(), self.worker_headroom_mb(forward_only=True)),
                disk_short=self.disk_short(),
            )
        )
        self.last_decision = decision.reason
        self.trigger_checks += 1
        if not decision.start or decision.cause is None:
            log.debug("no update: %s", decision.reason)
            return
        # Drift dated by its judges: the update learns from the data since the change, once there
        # is enough of it to train and validate on (a request does not wait: it takes the last
        # train.recent_hours until then).
        since = self.drift.since
        if since is not None:
            needed_s = UPDATE_MIN_WINDOWS_SINCE_CHANGE * (base.cfg.window + 1) * self.config.channels.period_s
            # The update reads the store, which the scorer runs ahead of by up to a batch.
            have_s = ((self.replay.time_range() or (None, None))[1] or since) - since
            if have_s < needed_s:
                if not self.trigger.requested:
                    self.last_decision = f"waiting for data since the change: {have_s:.0f} of {needed_s:.0f} s"
                    return
                since = None
        self.start_update(decision.reason, decision.cause, since=since)

    def disk_short(self) -> bool:
        """Ingestion waits for disk space, or the free space is under `[store] disk_reserve_mb`."""
        return self.ingest.disk_full or self.replay.disk_short()

    def worker_headroom_mb(self, forward_only: bool = False) -> float:
        """MB under the critical threshold left once a training job of the expected size runs
        (`forward_only`: an update that starts forward-only, in the service, where `[train]
        forward_only` allows it; -inf where it does not).

        Below it the watchdog tightens the plan as levels rise; at it the update stops. An update
        expected to reach it would stop at its first boundaries, so it does not start.
        """
        if forward_only and self.config.train.forward_only == "off":
            return float("-inf")
        limit = self.config.memory.critical * self.memory.budget_mb
        return limit - (self.memory.usage_mb + self.expected_worker_mb(forward_only))

    def expected_worker_mb(self, forward_only: bool = False) -> float:
        """What the next worker is expected to add at its peak: what the last one that ran to its
        end added, else `[memory] update_share` of the service's usage. An update that starts
        forward-only runs on a thread of the daemon, without a worker's own pages: it is expected
        to add what the last such one did, and until one has run, FORWARD_ONLY_SHARE of what a
        worker is expected to before any has."""
        if forward_only:
            if self.measured_forward_only_mb is not None:
                return self.measured_forward_only_mb
            return FORWARD_ONLY_SHARE * self.config.memory.update_share * self.memory.usage_mb
        if self.measured_worker_mb is not None:
            return self.measured_worker_mb
        return self.config.memory.update_share * self.memory.usage_mb

    def _starts_forward_only(self) -> bool:
        """The update must start forward-only (and so in the service): `[train] forward_only =
        "on"`, or only a forward-only update fits under the critical line."""
        if self.config.train.forward_only == "on":
            return True
        return self.worker_headroom_mb() < 0 <= self.worker_headroom_mb(forward_only=True)

    def start_update(self, reason: str, cause: UpdateCause, since: float | None = None) -> bool:
        candidates = tuple(self.governor.start_candidates())
        if self._starts_forward_only() and not candidates[-1].forward_only:
            log.info("only a forward-only update fits under the critical line: starting one in the service")
            candidates = (forward_only(candidates[-1]),)
        job = UpdateJob(
            "update",
            reason,
            cause=cause,
            since=since,
            candidates=candidates,
            baseline_mb=self.memory.usage_mb,
            budget_mb=self.memory.budget_mb,
            seed=int(time.time()),
        )
        if not self._start_worker(job):
            return False
        self.trigger.started()
        self.new_windows.reset()
        return True

    def serve_stand_in(self, newest: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """No base: serve the best of the baselines (persistence, seasonal naive, ridge) fitted on
        the newest stored readings, so forecasts and anomaly scores go on while a base is trained
        (on a new device, or after a damaged base was moved aside). Fitted again as the data grows.
        `newest`: the store's newest day, when the caller has read it already."""
        if self.base is not None or time.monotonic() < self._stand_in_not_before or self.memory.level != Level.NORMAL:
            return
        stored = self.replay.time_range()
        if stored is None:
            return
        span = min(stored[1] - stored[0], NEWEST_DAY_S)
        fitted = self._stand_in_span_s  # the span of the data the served stand-in was fitted on
        if fitted is not None and (fitted >= NEWEST_DAY_S or span < min(2 * fitted, NEWEST_DAY_S)):
            return
        from edge_daemon.frames import build_grid
        from edge_daemon.training.pretrain import stand_in_base

        cfg = self.config
        try:
            ts, channel_idx, values = newest if newest is not None else self.replay.read(stored[1] - span, None)
            # What was read, not the store's range: an old reading before a long gap spans a day.
            read_span = float(ts[-1] - ts[0]) if len(ts) else 0.0
            grid = build_grid(ts, channel_idx, values, len(cfg.channels.names), cfg.channels.period_s, cfg.channels.max_fill_steps)
            del ts, channel_idx, values
            base = stand_in_base(grid, cfg.channels.names, cfg.model, inputs_only=cfg.channels.inputs_only)
        except TrainingError as exc:
            log.debug("no baselines to serve yet: %s", exc)
            self._stand_in_not_before = time.monotonic() + STAND_IN_RETRY_S
            return
        except Exception:  # noqa: BLE001 - the scheduler's job must go on; tried again later
            log.exception("fitting the baselines to serve without a base failed; trying again in %.0f s", STAND_IN_RETRY_S)
            self._stand_in_not_before = time.monotonic() + STAND_IN_RETRY_S
            return
        scorer = Scorer(base, None, cfg.outputs.anomaly_threshold, rule=serving_rule(cfg.outputs))
        with self._model_lock:
            if self.base is not None:  # a base was trained meanwhile: it serves
                return
            self.serving.set_scorer(scorer)
            self._stand_in_span_s = read_span
        held_out = base.meta["held_out"]
        log.info(
            "no base model: serving %s, fitted on %.1f h of stored readings (held-out one-step MAE: %s) until one is trained",
            scorer.served, read_span / 3600, ", ".join(f"{name} {mae:.4g}" for name, mae in held_out["mae"].items()),
        )  # fmt: skip

    def _maybe_bootstrap(self) -> None:
        """No base model yet: train one in a worker once the store holds enough gap-free windows."""
        if self.memory.level != Level.NORMAL or not (self.trigger.requested or self.idle.idle()):
            return
        if self.worker_headroom_mb() < 0:
            log.debug("no bootstrap: not enough memory for the training worker")
            return
        if self.disk_short():
            log.debug("no bootstrap: disk space short")
            return
        if time.monotonic() < self._bootstrap_not_before:
            return
        if self.replay.count() < self.config.model.bootstrap_min_windows * len(self.config.channels.names):
            return
        if self._start_worker(UpdateJob("pretrain", "no base model")):
            self.trigger.started()

    def _start_worker(self, job: UpdateJob) -> bool:
        """Start a training worker, with the service's usage now as the mark its increment is measured from."""
        usage = self.memory.usage_mb
        if not self.runner.start(job):
            return False
        self.memory.reset_peak()
        self._usage_at_worker_start = usage
        return True

    def _learn_worker_increment(self, finished: bool, forward: bool = False) -> None:
        """After a worker that ran to its end: what it added to the service at its peak is the next
        worker's expected cost. One stopped or killed on the way needed at least what it reached:
        the next must have room for more than that (a start rule that kept expecting less would
        start it again after every back-off, to be stopped at the same point)."""
        if self._usage_at_worker_start is None:
            return
        added = self.memory.peak_usage_mb - self._usage_at_worker_start
        self._usage_at_worker_start = None
        if added <= 0:
            return
        expected = self.expected_worker_mb(forward)
        if finished or added > expected:
            log.info(
                "the %straining worker %s %.0f MB (expected %.0f MB)", "forward-only " if forward else "",
                "added at its peak" if finished else "reached before it ended, in all:", added, expected,
            )  # fmt: skip
            if forward:
                self.measured_forward_only_mb = added
            else:
                self.measured_worker_mb = added

    # -- results -----------------------------------------------------------------------------

    def on_result(self, result: JobResult) -> None:
        """In the runner's monitor thread: serve an accepted adapter, publish the outcome; only
        then may the trigger start another update (before, it would still see the drift that the
        adapter now served is about to reset, or no base while a new one loads)."""
        self.updates.record(result, shutting_down=self.stop_event.is_set())
        try:
            self._handle_result(result)
        finally:
            backoff = self.governor.retry_after_s
            self.trigger.finished(stopped_for_memory=result.stopped_for_memory, backoff_s=backoff)

    def _handle_result(self, result: JobResult) -> None:
        # A worker that started forward-only (asked to, or finding no backward fits) is learnt apart.
        started = result.outcome.start_plan if result.outcome is not None else None
        self._learn_worker_increment(finished=result.ran_to_end, forward=started is not None and started.forward_only)
        release_memory()
        if result.aborted and self.stop_event.is_set():
            # Stopped for shutdown at a micro-batch boundary: nothing was saved, and it is no
            # verdict on the adapter, so no `adapter_rejected` alert.
            log.info("%s stopped for shutdown; nothing saved", result.kind)
            return
        if result.kind == "pretrain":
            self._on_pretrained(result)
            return
        if result.accepted and result.version is not None:
            try:
                cause = result.job.cause if result.job is not None else None
                self.serve_version(self.adapters.get(result.version), resets_drift_baseline(cause))
                # Only now, with the scorer serving it, does `current` name it (a restart before
                # this serves what was served before).
                self.adapters.make_current(result.version)
            except (AdapterError, ModelError, OSError) as exc:
                log.error("accepted adapter v%d cannot be served: %s", result.version, exc)
                return
            self._alert_adapter(adapter_accepted_alert(result.version, result.reason, result.metrics_before, result.metrics_after, result.gate))
        else:
            reason = result.error or result.reason
            self._alert_adapter(adapter_rejected_alert(reason, result.metrics_before, result.metrics_after, result.gate))
            log.info("update not accepted: %s", reason)

    def _on_pretrained(self, result: JobResult) -> None:
        if result.accepted:
            log.info("base model trained from the store")
            with self._model_lock:  # not interleaved with a stand-in being served
                scorer = self.load_serving()
                if scorer is not None:
                    self.serving.set_scorer(scorer)
            if scorer is not None:
                self.serving.alert(base_model_alert())
            return
        # Usually too few gap-free windows yet; each try costs a worker.
        retry_s = max(60.0, self.config.train.min_interval_s)
        self._bootstrap_not_before = time.monotonic() + retry_s
        log.warning("base model bootstrap failed: %s; retrying in %.0f s", result.error, retry_s)

    def _alert_adapter(self, alert: AdapterAcceptedAlert | AdapterRejectedAlert) -> None:
        self.serving.alert(alert)
        self.publish_status()

    # -- rollback ----------------------------------------------------------------------------

    def rollback(self, version_number: int) -> None:
        """Serve adapter `version_number` and make it current (the `rollback` command)."""
        if self.base is None:
            raise ControlError("no base model yet")
        # Served first, then pointed at: `current` never names what the scorer could not serve
        # (an adapter of another base, say); if the pointer cannot move (a full disk), what was
        # served before serves again.
        previous = self.current_adapter()
        self.serve_version(self.adapters.get(version_number))
        try:
            self.adapters.rollback(version_number, data_ts=self.serving.newest_ts)
        except BaseException:
            self.serve_version(previous)
            raise
        log.info("rolled back to adapter v%d", version_number)
        self.serving.alert(rollback_alert(version_number))


__all__ = [
    "Adaptation",
    "DriftSignal",
    "IngestGauge",
    "MemoryGauge",
    "NewWindows",
    "ReplayData",
    "ServingSwap",
    "UPDATE_MIN_WINDOWS_SINCE_CHANGE",
    "register_worker",
]
