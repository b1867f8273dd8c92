"""The daemon's status, composed in one place: a typed report over the daemon's parts, read as
the socket `status` reply, the retained MQTT `edge/<id>/status` payload and the STATUS= line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from edge_daemon import __version__
from edge_daemon.adaptation.commands import adapter_summary, training_status
from edge_daemon.payloads import OnlineStatus, online_status
from edge_daemon.replies import (
    AdapterSummary,
    DriftStatus,
    IngestStatus,
    MemoryStatus,
    ScoringStatus,
    StatusReply,
    StoreStatus,
    TrainingStatus,
)

if TYPE_CHECKING:
    from edge_daemon.daemon import Daemon

log = logging.getLogger(__name__)

T = TypeVar("T")


class StatusReport:
    """One look at the daemon: a section per part started so far, each built at most once and
    only when read. The STATUS= line and the MQTT payload, sent often and from other parts'
    threads, read the parts' cheap accessors instead.

    A section that raises raises again for every reader: the `status` reply fails with it (an
    error reply), while the STATUS= line leaves out only the pieces that read it.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._built: dict[str, object] = {}
        self._failed: dict[str, Exception] = {}

    def _once(self, key: str, build: Callable[[], T]) -> T:
        if key in self._failed:
            raise self._failed[key]
        if key not in self._built:
            try:
                self._built[key] = build()
            except Exception as exc:
                self._failed[key] = exc
                raise
        return self._built[key]  # type: ignore[return-value]

    # -- the sections, in start order --------------------------------------------------------

    def store(self) -> StoreStatus | None:
        store = self.daemon.store
        if store is None:
            return None
        return self._once("store", lambda: StoreStatus(
            readings=store.count(),
            bytes=store.size_bytes(),
            disk_free_bytes=store.free_bytes(),
            disk_full=self.daemon.disk_full,
        ))  # fmt: skip

    def memory(self) -> MemoryStatus | None:
        watchdog = self.daemon.watchdog
        return None if watchdog is None else self._once("memory", watchdog.snapshot)

    def drift(self) -> DriftStatus | None:
        pipeline = self.daemon.pipeline
        return None if pipeline is None else self._once("drift", pipeline.drift.status)

    def adapter(self) -> AdapterSummary | None:
        # Beside scoring, which serves it.
        return None if self.daemon.pipeline is None else self._once("adapter", lambda: adapter_summary(self.daemon.adaptation))

    def scoring(self) -> ScoringStatus | None:
        pipeline = self.daemon.pipeline
        return None if pipeline is None else self._once("scoring", pipeline.status)

    def ingest(self) -> IngestStatus | None:
        ingestor = self.daemon.ingestor
        return None if ingestor is None else self._once("ingest", ingestor.counters)

    def training(self) -> TrainingStatus | None:
        # Once the scheduler has attached the update path's parts.
        adaptation = self.daemon.adaptation
        return None if adaptation.runner is None else self._once("training", lambda: training_status(adaptation))

    # -- what it is read as ------------------------------------------------------------------

    def reply(self) -> StatusReply:
        """The `status` reply: device, uptime and every section there is."""
        reply: StatusReply = {"device": self.daemon.config.device.id, "uptime_s": round(self.daemon.uptime_s(), 3)}
        if (store := self.store()) is not None:
            reply["store"] = store
        if (memory := self.memory()) is not None:
            reply["memory"] = memory
        if (drift := self.drift()) is not None:
            reply["drift"] = drift
        if (adapter := self.adapter()) is not None:
            reply["adapter"] = adapter
        if (scoring := self.scoring()) is not None:
            reply["scoring"] = scoring
        if (ingest := self.ingest()) is not None:
            reply["ingest"] = ingest
        if (training := self.training()) is not None:
            reply["training"] = training
        return reply

    def online(self) -> OnlineStatus:
        """The retained `edge/<id>/status` payload published at every (re)connect (on paho's
        network thread and the ingest writer's: cheap accessors only, no whole section)."""
        daemon = self.daemon
        pipeline = daemon.pipeline
        return online_status(
            device=daemon.config.device.id,
            version=__version__,
            started_unix=daemon.started_at,
            adapter_version=adapter_summary(daemon.adaptation)["version"],
            disk_full=daemon.disk_full,
            scoring=None if pipeline is None else (pipeline.drift.residual_drift_detected, pipeline.counters()),
        )

    def line(self) -> str:
        """The one-line STATUS= text: adapter, memory, drift, a scoring stall, readings, broker and training.

        Sent with every watchdog heartbeat, so it reads the parts' cheap accessors rather than
        whole sections. Each piece is best effort: one that fails is left out rather than
        losing the line.
        """
        daemon = self.daemon
        pieces: list[str] = []

        def add(build: Callable[[], str | None]) -> None:
            try:
                piece = build()
            except Exception as exc:  # noqa: BLE001 - a status line must never raise
                log.debug("status line piece failed: %s", exc)
                return
            if piece:
                pieces.append(piece)

        add(self._adapter_piece)
        add(lambda: f"memory {daemon.watchdog.level.label}" if daemon.watchdog is not None else None)
        add(self._drift_piece)
        add(lambda: "scoring stalled" if daemon.pipeline is not None and daemon.pipeline.stall_warning() else None)
        add(lambda: f"{daemon.store.count()} readings" if daemon.store is not None else None)
        add(lambda: "disk full: ingestion waiting" if daemon.disk_full else None)
        add(self._clock_piece)
        add(lambda: "broker unreachable" if daemon.ingestor is not None and not daemon.ingestor.connected else None)
        add(self._training_piece)
        return ", ".join(pieces)

    def _adapter_piece(self) -> str | None:
        adaptation = self.daemon.adaptation
        if adaptation.base is None:
            return "no base model yet"
        version = adaptation.current_adapter()
        return f"adapter v{version.version}" if version is not None else "base model"

    def _drift_piece(self) -> str | None:
        drift = self.drift()
        if drift is None:
            return None
        drifted = [name for name, detail in drift["channels"].items() if detail["state"] == "drift"]
        return f"drift {' '.join(drifted)}" if drifted else "drift none"

    def _clock_piece(self) -> str | None:
        daemon = self.daemon
        if daemon.ingestor is None or daemon.store is None:
            return None
        held = daemon.store.held_rows
        if not held:
            return None  # an unsynchronised clock alone changes nothing (`status` shows it)
        return f"{held} readings held" if daemon.ingestor.clock_watch.trusted else f"clock not trusted: {held} readings held"

    def _training_piece(self) -> str | None:
        """While a job runs."""
        runner = self.daemon.adaptation.runner
        if runner is None or not runner.running:
            return None
        job, progress = runner.job, runner.progress
        step = f" step {progress.step}" if progress.step is not None else ""
        return f"{job.kind if job is not None else 'update'} {progress.phase}{step}"
