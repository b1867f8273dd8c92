"""The daemon's status, composed in one place: a typed report over the daemon's parts, read as
the socket `status` reply, the retained MQTT `edge/<id>/status` payload and the STATUS= line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from edge_daemon import __version__
from edge_daemon.adaptation.commands import adapter_summary
from edge_daemon.mqtt.outputs import OnlineStatus, online_status
from edge_daemon.control.replies import (
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
    from edge_daemon.adaptation.owner import Adaptation
    from edge_daemon.memory.watchdog import MemoryWatchdog
    from edge_daemon.mqtt.ingestor import Ingestor
    from edge_daemon.parts import StorePart
    from edge_daemon.pipeline import ScoringPipeline

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StatusParts:
    """What status is read from: the device, its clock, and each part started so far (None
    before it starts)."""

    device: str
    started_unix: float
    uptime_s: float
    store: StorePart | None = None
    memory: MemoryWatchdog | None = None
    scoring: ScoringPipeline | None = None
    adaptation: Adaptation | None = None
    ingest: Ingestor | None = None


class StatusReport:
    """One look at the daemon: a section per part started so far (each part's `status()`, or
    for the `drift` and `adapter` sections the drift signal's and the update path's), each
    built at most once and only when read. The STATUS= line and the MQTT payload, sent often
    and from other parts' threads, read the parts' cheap accessors and counters instead.

    A section that raises raises again for every reader: the `status` reply fails with it (an
    error reply), while the STATUS= line leaves out only the pieces that read it.
    """

    def __init__(self, parts: StatusParts) -> None:
        self.parts = parts
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
        store = self.parts.store
        return None if store is None else self._once("store", store.status)

    def memory(self) -> MemoryStatus | None:
        memory = self.parts.memory
        return None if memory is None else self._once("memory", memory.status)

    def drift(self) -> DriftStatus | None:
        scoring = self.parts.scoring
        return None if scoring is None else self._once("drift", scoring.drift_signal.status)

    def adapter(self) -> AdapterSummary | None:
        adaptation = self.parts.adaptation
        return None if adaptation is None else self._once("adapter", lambda: adapter_summary(adaptation))

    def scoring(self) -> ScoringStatus | None:
        scoring = self.parts.scoring
        return None if scoring is None else self._once("scoring", scoring.status)

    def ingest(self) -> IngestStatus | None:
        ingest = self.parts.ingest
        return None if ingest is None else self._once("ingest", ingest.status)

    def training(self) -> TrainingStatus | None:
        adaptation = self.parts.adaptation
        return None if adaptation is None else self._once("training", adaptation.status)

    # -- what it is read as ------------------------------------------------------------------

    def reply(self) -> StatusReply:
        """The `status` reply: device, uptime and every section there is."""
        reply: StatusReply = {"device": self.parts.device, "uptime_s": round(self.parts.uptime_s, 3)}
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
        parts = self.parts
        store, scoring, adaptation, ingest = parts.store, parts.scoring, parts.adaptation, parts.ingest
        return online_status(
            device=parts.device,
            version=__version__,
            started_unix=parts.started_unix,
            adapter_version=None if adaptation is None else adapter_summary(adaptation)["version"],
            disk_full=ingest is not None and ingest.disk_full,
            scoring=None if scoring is None else (scoring.drift_signal.detected, scoring.counters()),
            drift_channels=None if scoring is None else scoring.drift_signal.channels,
            training=None if adaptation is None else adaptation.training_state,
            readings=None if store is None else store.readings,
        )

    def online_state(self) -> tuple[object, ...]:
        """What of the retained status a consumer acts on (the adapter served, drift, training),
        without the counters that move with every reading: the daemon republishes the status
        as soon as this changes, not only every `[outputs] status_interval_s`. Cheap accessors only."""
        scoring, adaptation = self.parts.scoring, self.parts.adaptation
        return (
            None if adaptation is None else adapter_summary(adaptation)["version"],
            None if scoring is None else tuple(sorted(scoring.drift_signal.channels.items())),
            None if scoring is None else scoring.drift_signal.detected,
            None if adaptation is None else adaptation.training_state,
        )

    def line(self) -> str:
        """The one-line STATUS= text: adapter, memory, drift, a scoring stall, readings, broker and training.

        Sent with every watchdog heartbeat, so it reads the parts' cheap accessors rather than
        whole sections. Each piece is best effort: one that fails is left out rather than
        losing the line.
        """
        parts = self.parts
        store, memory, scoring, adaptation, ingest = parts.store, parts.memory, parts.scoring, parts.adaptation, parts.ingest
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
        add(lambda: f"memory {memory.level.label}" if memory is not None else None)
        add(self._drift_piece)
        add(lambda: "scoring stalled" if scoring is not None and scoring.stall_warning() else None)
        add(lambda: f"{store.readings} readings" if store is not None else None)
        add(lambda: store.damaged_store_moved if store is not None else None)
        add(lambda: "disk full: ingestion waiting" if ingest is not None and ingest.disk_full else None)
        add(self._clock_piece)
        add(lambda: ingest.broker_problem if ingest is not None else None)
        add(lambda: adaptation.training if adaptation is not None else None)
        return ", ".join(pieces)

    def _adapter_piece(self) -> str | None:
        adaptation = self.parts.adaptation
        if adaptation is None:
            return None
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
        store, ingest = self.parts.store, self.parts.ingest
        if ingest is None or store is None:
            return None
        held = store.held_rows
        if not held:
            return None  # an unsynchronised clock alone changes nothing (`status` shows it)
        return f"{held} readings held" if ingest.clock_watch.trusted else f"clock not trusted: {held} readings held"
