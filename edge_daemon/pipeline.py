"""The live data path after the store: grid steps -> scores -> drift -> MQTT outputs.

Committed batches are handed over by the ingest writer thread through a
queue, so scoring never slows ingestion; a named worker thread assembles grid
steps, scores them, feeds the drift monitor and publishes forecasts and
alerts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from edge_daemon.times import iso
from edge_daemon.baselines import MODEL, Baseline, HeldOut
from edge_daemon.config import Config
from edge_daemon.drift.feed import DriftFeed
from edge_daemon.drift.monitor import DriftMonitor
from edge_daemon.drift.prior import ResidualPrior
from edge_daemon.mqtt.outputs import Alert, Forecast, Forecaster, ForecastHorizon, ScoredBy, anomaly_alert
from edge_daemon.control.replies import DriftStatus, LastScore, ScoringCounters, ScoringStatus
from edge_daemon.scoring.grid import GridAssembler, GridStep
from edge_daemon.scoring.serving import Scorer, ScoreResult
from edge_daemon.store import Reading

if TYPE_CHECKING:
    from edge_daemon.model import Forecaster as ForecastModel

log = logging.getLogger(__name__)

Publish = Callable[[str, Any, int, bool], Any]

# Readings waiting for the scoring thread (about 110 bytes each). Beyond this the oldest batches
# are dropped from scoring only (they are stored): memory stays bounded on a device that scores
# slower than readings arrive (a slow CPU, a burst of redelivered readings), and what scoring
# catches up to is the live stream, not a past it would forecast too late to matter.
MAX_PENDING_READINGS = 20_000
# Scoring that fails this many batches (or clock flushes) in a row is broken, not unlucky: the
# thread ends, the part is dead and the daemon exits non-zero for the service manager to restart.
MAX_FAILURES_IN_A_ROW = 20
# The thread beats at least once a second while it runs; this long without a beat is a wedged
# scoring thread (dead too).
STALE_S = 120.0
# Scoring has stalled when readings were handed to it within the last STALL_S (or STALL_PERIODS
# periods, the longer) and no grid step completed for longer than that: every reading is late or
# set aside, and nothing else would say so.
STALL_S = 60.0
STALL_PERIODS = 30


class ScoringPipeline:
    """Owns the assembler, the scorer (once a base model exists) and the drift monitor."""

    def __init__(
        self,
        config: Config,
        publish: Publish,
        scorer: Scorer | None = None,
        held_rows: Callable[[], int] | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        """`held_rows` counts the readings the store holds for the clock (for `status`); `mono` is
        the monotonic clock stalls and the assembler's arrivals are measured by."""
        self.config = config
        self.publish = publish
        self.scorer = scorer
        self._held_rows = held_rows
        self._mono = mono
        self.assembler = GridAssembler(
            config.channels.names, config.channels.period_s, config.channels.max_fill_steps, config.channels.lateness_s, mono
        )
        self._drift_feed = DriftFeed(config, None if scorer is None or scorer.base.stand_in else scorer.base)
        self.drift = self._drift_feed.monitor
        self.drift_signal = ResidualDrift(self.drift, config.channels.names)
        self._pending: deque[Sequence[Reading]] = deque()
        self._pending_readings = 0
        self._pending_changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = 0
        self.scored = 0
        self.anomalies = 0
        self.dropped_batches = 0
        self.dropped_readings = 0
        self.last_score: LastScore | None = None
        self.heartbeat = time.monotonic()
        self.failures = 0  # batches (or flushes) failed in a row
        self.stall_s = max(STALL_S, STALL_PERIODS * config.channels.period_s)
        self._readings_at: float | None = None  # when (by `mono`) readings last reached the assembler
        self._step_at: float | None = None  # when a grid step last completed (or readings first came)
        self._stall_logged = False
        # Recent (t, anomaly score, adapter version) for the report; bounded.
        self.history: list[tuple[float, float, int | None]] = []

    # -- input (ingest writer thread) ------------------------------------------------------

    def on_batch(self, readings: Sequence[Reading]) -> None:
        dropped = 0
        with self._pending_changed:
            self._pending.append(readings)
            self._pending_readings += len(readings)
            while self._pending_readings > MAX_PENDING_READINGS and len(self._pending) > 1:
                oldest = self._pending.popleft()
                self._pending_readings -= len(oldest)
                dropped += len(oldest)
                self.dropped_batches += 1
            self._pending_changed.notify()
        if dropped:
            if not self.dropped_readings:
                log.warning(
                    "scoring is behind by more than %d readings: the oldest waiting are dropped from scoring (they are"
                    " stored); counted in status scoring.dropped_readings", MAX_PENDING_READINGS,
                )  # fmt: skip
            self.dropped_readings += dropped

    def _next_batch(self, timeout: float) -> Sequence[Reading] | None:
        """The oldest batch waiting; None after `timeout` with none, or once stopping."""
        with self._pending_changed:
            if not self._pending and not self._stopping:
                self._pending_changed.wait(timeout)
            if self._stopping or not self._pending:
                return None
            batch = self._pending.popleft()
            self._pending_readings -= len(batch)
            return batch

    # -- worker ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scoring", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        with self._pending_changed:
            self._stopping = True
            self._pending_changed.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The thread runs and beat within STALE_S (it ends after MAX_FAILURES_IN_A_ROW failures)."""
        return self._thread is not None and self._thread.is_alive() and time.monotonic() - self.heartbeat < STALE_S

    def _run(self) -> None:
        while self.failures < MAX_FAILURES_IN_A_ROW:
            batch = self._next_batch(1.0)
            if self._stopping:
                log.info("scoring thread exiting")
                return
            if batch is None:
                self.flush_by_clock()
                continue
            self.feed(batch)
        log.error("scoring failed %d times in a row; the scoring thread stops", self.failures)

    def flush_by_clock(self) -> None:
        """Readings stopped: the newest step is complete once the clock is past it (plus lateness).

        Bounded by the newest reading the assembler accepted (never one it set aside as an
        outlier), so no forward-filled steps are made up beyond the data and a backfill's next
        batch is not counted late.
        """
        newest = self.assembler.newest_ts
        if newest is not None:
            horizon = min(time.time(), newest + self.config.channels.period_s + self.config.channels.lateness_s)
            self._score(lambda: self.assembler.flush(horizon), "scoring flushed steps failed")
        self._note_stall()

    def feed(self, batch: Sequence[Reading]) -> None:
        """Assemble and score one batch in the calling thread (the scoring thread's work for each)."""
        self._score(lambda: self._add(batch), "scoring a batch failed")
        self._note_stall()

    def _add(self, batch: Sequence[Reading]) -> list[GridStep]:
        if batch:
            self._readings_at = self._mono()
            if self._step_at is None:
                self._step_at = self._readings_at  # a stall is measured from the first readings
        return self.assembler.add(batch)

    def _score(self, steps: Callable[[], list[GridStep]], what: str) -> None:
        """Score the steps `steps()` completes; one failure is logged and scoring goes on."""
        try:
            for step in steps():
                self._on_step(step.t, step.values)
                self._step_at = self._mono()
                self.heartbeat = time.monotonic()
        except Exception:  # one bad step must not stop scoring; it is logged with its traceback
            self.failures += 1
            log.exception("%s (%d in a row)", what, self.failures)
        else:
            self.failures = 0
        self.heartbeat = time.monotonic()

    def _on_step(self, t: float, values: np.ndarray) -> None:
        self.steps += 1  # only this thread writes it; the update path counts new windows from it
        for event in self._drift_feed.step(values, t):
            self._alert(event.alert())
        with self._lock:
            scorer = self.scorer
        if scorer is None:
            return
        result = scorer.add_step(t, values)
        if result is None or result.residual is None:
            return
        self.scored += 1
        # Drift is judged on the model's residuals; baselines alone (no base yet) give none.
        if result.model_residual is not None:
            for event in self._drift_feed.scored(result.model_residual, t):
                self._alert(event.alert())
        score = float(result.score) if result.score is not None else None
        self.last_score = {"ts": t, "score": score, "version": result.model_version, "served_by": result.served_by}
        if len(self.history) >= 20000:
            del self.history[:10000]
        self.history.append((t, score if score is not None else float("nan"), result.model_version))
        every = self.config.outputs.forecast_every
        if every and self.scored % every == 0:
            self.publish("forecast", forecast_payload(result, score, self.config.channels.forecast), self.config.outputs.qos, False)
        if result.anomaly:
            self.anomalies += 1
            assert score is not None  # an anomaly is a score over the threshold
            self._alert(anomaly_alert(t, score, self.config.outputs.anomaly_threshold))

    def _alert(self, payload: Alert) -> None:
        log.info("alert: %s", payload["message"])
        # Alerts always at QoS 1: an operator must not miss them over a flaky link.
        self.publish("alert", payload, 1, False)

    def alert(self, payload: Alert) -> None:
        """Publish an alert from another part (adapter accepted/rejected, base model, rollback)."""
        self._alert(payload)

    # -- model changes (update monitor / control threads) ----------------------------------

    def set_scorer(self, scorer: Scorer) -> None:
        """Score with `scorer` from the next step: a new base's (bootstrapped from the store), or
        while there is none, a stand-in of baselines alone (which the drift judges do not use)."""
        with self._lock:
            previous = self.scorer
            self.scorer = scorer
        if scorer.base.stand_in:
            return
        if previous is None or previous.base.fingerprint != scorer.base.fingerprint:
            self._drift_feed.new_base(scorer.base)  # e.g. bootstrapped from the store

    def swap_model(
        self, model: ForecastModel, version: int | None, baselines: list[Baseline], held_out: HeldOut | None
    ) -> None:
        """Serve `model` (the base with adapter `version` merged in, None for the base alone) from
        the next step; nothing while no scorer serves yet."""
        with self._lock:
            scorer = self.scorer
        if scorer is not None and scorer.base.stand_in:
            log.warning("adapter v%s not served: only baselines are served while there is no base", version)
        elif scorer is not None:
            scorer.swap_model(model, version, baselines, held_out)

    @property
    def newest_ts(self) -> float | None:
        """Time of the newest reading scoring accepted (the data's clock; not an outlier set
        aside), None before any."""
        return self.assembler.newest_ts

    # -- stalls ----------------------------------------------------------------------------

    def stall_warning(self) -> str | None:
        """Why scoring is stalled (readings arrive, no grid step completes), None while it is not.

        Counters only: read for the retained MQTT status on paho's network thread.
        """
        readings_at, step_at = self._readings_at, self._step_at
        if readings_at is None or step_at is None:
            return None
        now = self._mono()
        if now - readings_at > self.stall_s or now - step_at <= self.stall_s:
            return None
        stats = self.assembler.stats
        why = [f"{stats.late} late readings"]
        if stats.last_late_ts is not None:
            why[0] += f" (latest stamped {iso(stats.last_late_ts)})"
        if self.assembler.set_aside:
            why.append(f"{self.assembler.set_aside} readings set aside far ahead of the stream")
        return f"scoring stalled: readings arrive but no grid step completed for {now - step_at:.0f} s; " + ", ".join(why)

    def _note_stall(self) -> None:
        """Log a stall once when it starts (WARNING) and once when it ends (INFO)."""
        warning = self.stall_warning()
        if warning is not None and not self._stall_logged:
            self._stall_logged = True
            log.warning("%s", warning)
        elif warning is None and self._stall_logged:
            self._stall_logged = False
            resumed = self._step_at is not None and self._mono() - self._step_at <= self.stall_s
            log.info("scoring stall over: %s", "grid steps complete again" if resumed else "no readings arrive")

    # -- status ----------------------------------------------------------------------------

    def counters(self) -> ScoringCounters:
        """Counts for the retained MQTT status and the STATUS= line: no lock, no scorer, cheap."""
        stats = self.assembler.stats
        return {
            "steps": self.steps,
            "scored": self.scored,
            "late_readings": stats.late,
            "last_late": iso(stats.last_late_ts),
            "held": self._held_rows() if self._held_rows is not None else None,
            "outliers": stats.outliers,
            "set_aside": self.assembler.set_aside,
            "stalled": self.stall_warning(),
        }

    def status(self) -> ScoringStatus:
        with self._lock:
            scorer = self.scorer
        return {
            **self.counters(),
            "anomalies": self.anomalies,
            "dropped_batches": self.dropped_batches,
            "dropped_readings": self.dropped_readings,
            "failures_in_a_row": self.failures,
            "last": self.last_score,
            # Who is served, and the live mean |error| of the model and each baseline.
            "serving": scorer.comparison() if scorer is not None else None,
        }


class ResidualDrift:
    """The update path's view of drift: whether the model's residuals drifted, since when (the
    judges' estimate of the change), and a restart once a new adapter serves. Thread-safe: the
    monitor takes its lock for each."""

    def __init__(self, monitor: DriftMonitor, names: Sequence[str]) -> None:
        self._monitor = monitor
        self._names = list(names)  # the config's channels, in the store's channel order

    @property
    def detected(self) -> bool:
        """The residuals, or the level of a channel judged for it, drifted since the last reset."""
        return self._monitor.update_drift_detected

    @property
    def since(self) -> float | None:
        return self._monitor.change_from

    @property
    def channels(self) -> dict[str, bool]:
        """Per forecast channel: drifted (inputs, residuals or level) since the last reset."""
        return self._monitor.channels_drifted

    def reset(self, t: float | None = None, validation: Mapping[str, Any] | None = None) -> None:
        """Restart the judges (an adapter serves); from the served model's held-out validation
        residuals (a meta's `validation_residuals`) when it recorded them."""
        self._monitor.reset_baseline(t, ResidualPrior.from_json(validation, len(self._monitor.channels)))

    def start_from(self, validation: Mapping[str, Any] | None) -> None:
        """At start-up: the residual judges start from the served model's held-out validation
        residuals (an adapter's meta's; None: the base's, as the monitor was built with)."""
        if validation is not None:
            self._monitor.set_residual_prior(ResidualPrior.from_json(validation, len(self._monitor.channels)))

    def start_levels(self, ts: np.ndarray, channel_idx: np.ndarray, values: np.ndarray) -> None:
        """At start-up: the level judges start from stored readings (the newest day; `channel_idx`
        indexes the config's channels) instead of learning a day first."""
        masks = [channel_idx == self._names.index(name) for name in self._monitor.channels]
        self._monitor.seed_levels_from([(ts[mask], values[mask]) for mask in masks])

    def status(self) -> DriftStatus:
        """The `drift` section of `status`."""
        return self._monitor.status()


def forecaster_label(name: str, version: int | None) -> Forecaster:
    """"adapter" or "base" when the model forecasts, else the baseline's name (or "mixed")."""
    if name != MODEL:
        return cast(Forecaster, name)
    return "base" if version is None else "adapter"


def forecast_payload(result: ScoreResult, score: float | None, channels: Sequence[str]) -> Forecast:
    """The `forecast` payload of a scored step: who made the forecast it carries (the model, with
    adapter `adapter_version` or None for the base alone, or the baseline served while no model
    beats it) and its further horizons ([model] horizons), each labelled like the next step's.
    The anomaly score `score` is of the forecast made one step earlier. `channels` are the
    forecast channels in the model's output order."""
    version = result.forecast_version
    return Forecast(
        ts=result.t,
        forecast_ts=result.forecast_t,
        forecast={c: float(v) for c, v in zip(channels, result.forecast)},
        actual={c: float(v) for c, v in zip(channels, result.actual)},
        anomaly_score=score,
        model=forecaster_label(result.forecast_by, version),
        models={c: forecaster_label(name, version) for c, name in zip(channels, result.forecast_by_channel, strict=True)},
        adapter_version=version if MODEL in result.forecast_by_channel else None,
        scored_by=cast(ScoredBy | None, result.served_by),
        horizons=[
            ForecastHorizon(
                steps=far.steps,
                forecast_ts=far.t,
                forecast={c: float(v) for c, v in zip(channels, far.forecast, strict=True)},
                model=forecaster_label(far.by, version),
                models={c: forecaster_label(name, version) for c, name in zip(channels, far.by_channel, strict=True)},
                adapter_version=version if MODEL in far.by_channel else None,
            )
            for far in result.horizons
        ],
    )
