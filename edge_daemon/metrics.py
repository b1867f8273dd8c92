"""Prometheus metrics (`[metrics]`): the daemon's status as counters and gauges, served over HTTP
and/or written to a file for node_exporter's textfile collector.

Nothing is instrumented: a collector on a registry of its own reads the typed status (the same
`StatusReport` the `status` command answers with) at each scrape. Only imported when `[metrics]`
is configured, so a daemon without it does not load prometheus_client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest, start_http_server, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edge_daemon import __version__
from edge_daemon.adaptation.tally import DURATION_BUCKETS_S
from edge_daemon.config import Config
from edge_daemon.control.status import StatusParts, StatusReport
from edge_daemon.memory.budget import MB
from edge_daemon.memory.pressure import Level

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

PREFIX = "edge_daemon_"
TRAINING_STATES = ("idle", "running", "paused")


class DaemonCollector(Collector):
    """Every `edge_daemon_*` metric, read from the parts at collect time (one StatusReport per scrape).

    A section that fails to build is left out of that scrape (and counted in
    `edge_daemon_metrics_errors_total`) rather than failing the whole scrape.
    """

    def __init__(self, config: Config, parts: Callable[[], StatusParts]) -> None:
        self.config = config
        self.parts = parts
        self.errors = 0  # sections that failed while collected
        self._errors_lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        report = StatusReport(self.parts())
        yield InfoMetricFamily(PREFIX.rstrip("_"), "The daemon's version and device id", value={"version": __version__, "device": report.parts.device})
        yield GaugeMetricFamily(PREFIX + "start_time_seconds", "When the daemon started (unix seconds)", value=report.parts.started_unix)
        for section in (self._ingest, self._store, self._scoring, self._drift, self._memory, self._training):
            try:
                yield from list(section(report))  # built whole before any is yielded: all or nothing per section
            except Exception as exc:  # noqa: BLE001 - one broken section must not cost the scrape
                with self._errors_lock:
                    self.errors += 1
                log.debug("metrics: %s failed: %s", section.__name__, exc)
        yield CounterMetricFamily(PREFIX + "metrics_errors", "Status sections that failed while metrics were collected", value=self.errors)

    # -- the sections ----------------------------------------------------------------------------

    def _ingest(self, report: StatusReport) -> Iterator[Metric]:
        ingest = report.ingest()
        if ingest is None:
            return
        counters = (
            ("messages_received", "MQTT messages received on the subscribed topics", ingest["received"]),
            ("readings_received", "Readings parsed from received messages", ingest["readings"]),
            ("readings_stored", "Readings committed to the store (and acknowledged)", ingest["stored"]),
            ("readings_duplicate", "Readings already in the store (same channel and timestamp), not stored again", ingest["duplicates"]),
            ("readings_held", "Readings held back while the device clock was not trusted", ingest["held"]),
            ("readings_released", "Held readings released into the store once the clock was trusted", ingest["released"]),
            ("ingest_batches", "Write batches committed to the store", ingest["batches"]),
            ("messages_dropped_disk_full", "QoS 0 messages dropped while ingestion waited for disk space", ingest["dropped_disk_full"]),
        )
        for name, help_text, value in counters:
            yield CounterMetricFamily(PREFIX + name, help_text, value=value)
        rejected = CounterMetricFamily(
            PREFIX + "readings_rejected", "Messages (or entries of a values map, or held readings) rejected, by reason", labels=["reason"]
        )
        for reason, count in sorted(ingest["rejected_by_reason"].items()):
            rejected.add_metric([reason], count)
        yield rejected
        ignored = CounterMetricFamily(
            PREFIX + "readings_ignored",
            "Fields that are not configured channels and messages on topics without readings, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(ingest["ignored_by_reason"].items()):
            ignored.add_metric([reason], count)
        yield ignored
        yield GaugeMetricFamily(PREFIX + "readings_holding", "Readings held now until the device clock is trusted", value=ingest["clock"]["holding"])
        yield GaugeMetricFamily(PREFIX + "clock_trusted", "1 while the device clock is trusted to judge reading times", value=int(ingest["clock"]["trusted"]))
        yield GaugeMetricFamily(PREFIX + "broker_connected", "1 while connected to the broker with the subscriptions granted", value=int(ingest["connected"]))
        yield GaugeMetricFamily(PREFIX + "disk_full", "1 while ingestion waits for disk space", value=int(ingest["disk_full"]))

    def _store(self, report: StatusReport) -> Iterator[Metric]:
        store = report.store()
        if store is None:
            return
        yield GaugeMetricFamily(PREFIX + "store_readings", "Readings (rows) in the replay store", value=store["readings"])
        yield GaugeMetricFamily(PREFIX + "store_size_bytes", "Bytes of the replay store on disk (database and WAL)", value=store["bytes"])
        yield GaugeMetricFamily(PREFIX + "store_disk_free_bytes", "Free bytes on the store's file system", value=store["disk_free_bytes"])
        check = store["check"]
        yield GaugeMetricFamily(PREFIX + "store_check_seconds", "Time of the store's newest PRAGMA quick_check (at start or scheduled)", value=check["seconds"])
        yield CounterMetricFamily(
            PREFIX + "store_damaged", "Damaged stores moved aside for a new one since the daemon started (at start and while running)",
            value=store["damaged"],
        )  # fmt: skip

    def _scoring(self, report: StatusReport) -> Iterator[Metric]:
        scoring = report.scoring()
        if scoring is None:
            return
        yield CounterMetricFamily(PREFIX + "grid_steps", "Grid steps completed from the live readings", value=scoring["steps"])
        yield CounterMetricFamily(PREFIX + "steps_scored", "Grid steps forecast and scored", value=scoring["scored"])
        yield CounterMetricFamily(
            PREFIX + "readings_late", "Readings that arrived after their grid step was completed: stored, dropped from scoring", value=scoring["late_readings"]
        )
        yield CounterMetricFamily(PREFIX + "readings_outliers", "Readings far ahead of the stream, set aside and dropped unconfirmed", value=scoring["outliers"])
        yield CounterMetricFamily(PREFIX + "scoring_batches_dropped", "Batches dropped from scoring while it was behind (they are stored)", value=scoring["dropped_batches"])
        yield CounterMetricFamily(PREFIX + "scoring_readings_dropped", "Readings dropped from scoring while it was behind (they are stored)", value=scoring["dropped_readings"])
        yield CounterMetricFamily(PREFIX + "anomaly_alerts", "Anomaly alerts published (score over the threshold)", value=scoring["anomalies"])
        yield GaugeMetricFamily(PREFIX + "anomaly_threshold", "Anomaly score over which an alert is published ([outputs] anomaly_threshold)", value=self.config.outputs.anomaly_threshold)
        last = scoring["last"]
        score = GaugeMetricFamily(PREFIX + "anomaly_score", "Anomaly score of the last scored grid step (none before the first)")
        if last is not None and last["score"] is not None:
            score.add_metric([], last["score"])
        yield score
        yield GaugeMetricFamily(PREFIX + "scoring_stalled", "1 while readings arrive but no grid step completes", value=int(scoring["stalled"] is not None))

    def _drift(self, report: StatusReport) -> Iterator[Metric]:
        drift = report.drift()
        if drift is None:
            return
        state = GaugeMetricFamily(PREFIX + "drift", "1 while a forecast channel is in drift (inputs, residuals or level), else 0", labels=["channel"])
        detections = CounterMetricFamily(PREFIX + "drift_detections", "Drift detections per forecast channel since start", labels=["channel"])
        for channel, detail in sorted(drift["channels"].items()):
            state.add_metric([channel], int(detail["state"] == "drift"))
            detections.add_metric([channel], detail["detections"])
        yield state
        yield detections

    def _memory(self, report: StatusReport) -> Iterator[Metric]:
        memory = report.memory()
        if memory is None:
            return
        usage = GaugeMetricFamily(
            PREFIX + "memory_usage_bytes", "The service's memory as the watchdog counts it; source: cgroup limit, cgroup or pss", labels=["source"]
        )
        usage.add_metric([memory["usage_source"]], memory["usage_mb"] * MB)
        yield usage
        budget = GaugeMetricFamily(PREFIX + "memory_budget_bytes", "Memory the service may use; source: where the budget comes from", labels=["source"])
        budget.add_metric([memory["budget_source"]], memory["budget_mb"] * MB)
        yield budget
        yield GaugeMetricFamily(
            PREFIX + "memory_level", "Memory pressure level: 0 normal, 1 elevated, 2 high, 3 critical", value=Level[memory["level"].upper()].value
        )
        yield GaugeMetricFamily(PREFIX + "memory_rss_bytes", "Summed RSS of the daemon's process tree", value=memory["rss_mb"] * MB)
        yield GaugeMetricFamily(PREFIX + "memory_available_bytes", "The system's MemAvailable", value=memory["available_mb"] * MB)

    def _training(self, report: StatusReport) -> Iterator[Metric]:
        adapter, training, adaptation = report.adapter(), report.training(), report.parts.adaptation
        if adapter is None or training is None or adaptation is None:
            return
        yield GaugeMetricFamily(PREFIX + "adapter_version", "Version of the served adapter (0: the base model alone, or none yet)", value=adapter["version"] or 0)
        yield GaugeMetricFamily(PREFIX + "base_model_loaded", "1 once a base model is served", value=int(adapter["base"]))
        state = GaugeMetricFamily(PREFIX + "training_state", "1 for the update path's state now (idle, running, paused)", labels=["state"])
        for name in TRAINING_STATES:
            state.add_metric([name], int(training["state"] == name))
        yield state
        updates = CounterMetricFamily(PREFIX + "updates", "Updates (and base bootstraps) that ended, by cause and outcome", labels=["cause", "outcome"])
        for (cause, outcome), count in adaptation.updates.counts().items():
            updates.add_metric([cause, outcome], count)
        yield updates
        durations = HistogramMetricFamily(
            PREFIX + "update_duration_seconds", "How long updates took, start to result, by cause and outcome", labels=["cause", "outcome"]
        )
        for (cause, outcome), counts in sorted(adaptation.updates.durations().items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*DURATION_BUCKETS_S, float("inf")), counts.buckets, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # "30.0", "+Inf": as client_python writes them
            durations.add_metric([cause, outcome], buckets, counts.sum_s)
        yield durations


class Metrics:
    """The metrics part: an HTTP endpoint (`[metrics] listen`) and/or a textfile rewritten every
    `textfile_interval_s` (`[metrics] textfile`), both over one `DaemonCollector`."""

    def __init__(self, config: Config, parts: Callable[[], StatusParts]) -> None:
        self.config = config
        self.collector = DaemonCollector(config, parts)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None
        self._textfile_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.textfile_writes = 0
        self.textfile_errors = 0

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) served on (the real port when `listen` names port 0); None without an endpoint."""
        if self._server is None:
            return None
        return str(self._server.server_address[0]), int(self._server.server_address[1])

    def render(self) -> bytes:
        """One scrape's text exposition (what /metrics serves)."""
        return generate_latest(self.registry)

    def start(self) -> None:
        cfg = self.config.metrics
        address = cfg.address
        if address is not None:
            host, port = address
            try:
                self._server, self._server_thread = start_http_server(port, host, registry=self.registry)
            except OSError as exc:
                raise OSError(exc.errno, f"metrics: cannot listen on {cfg.listen}: {exc.strerror or exc}") from exc
            self._server_thread.name = "metrics-http"
            served = self.address
            assert served is not None
            shown = f"[{served[0]}]" if ":" in served[0] else served[0]
            log.info("metrics served on http://%s:%d/metrics", shown, served[1])
            if cfg.warnings():
                log.warning("%s", cfg.warnings()[0])
        if cfg.textfile is not None:
            self.write_textfile()  # at once: a node_exporter scrape right after start finds it
            self._textfile_thread = threading.Thread(target=self._textfile_loop, args=(cfg.textfile_interval_s,), name="metrics-textfile", daemon=True)
            self._textfile_thread.start()
            log.info("metrics written to %s every %g s", cfg.textfile, cfg.textfile_interval_s)

    def write_textfile(self) -> bool:
        """Replace the textfile atomically (prometheus_client writes a temp file beside it and renames)."""
        path = self.config.metrics.textfile
        assert path is not None
        try:
            write_to_textfile(str(path), self.registry)
        except OSError as exc:
            self.textfile_errors += 1
            log.log(logging.WARNING if self.textfile_errors == 1 else logging.DEBUG, "metrics: cannot write %s: %s", path, exc)
            return False
        self.textfile_writes += 1
        return True

    def _textfile_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.write_textfile()
        log.debug("metrics textfile writer stopped")

    def stop(self) -> None:
        self._stop.set()
        if self._textfile_thread is not None:
            self._textfile_thread.join(10.0)
            self._textfile_thread = None
            self.write_textfile()  # the final counts, while the parts it reads still run
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(10.0)
            self._server, self._server_thread = None, None

    @property
    def alive(self) -> bool:
        """Its threads run (a failed textfile write is logged and retried, not fatal)."""
        if self._stop.is_set():
            return True
        for thread in (self._server_thread, self._textfile_thread):
            if thread is not None and not thread.is_alive():
                return False
        return True

    def status(self) -> None:
        return None


__all__ = ["DaemonCollector", "Metrics", "PREFIX"]
