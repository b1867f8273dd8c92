"""What every part of the daemon is: started, stopped, alive or dead, and a typed status section.

The daemon holds its parts as `Part`s only: it starts them in order, stops them in reverse and
exits when one is not alive; `control.status` composes the `status` reply from their sections.
Most parts implement the protocol themselves (the scoring pipeline, the memory watchdog, the
update path, the control server, the ingestor, the scheduler); the two below adapt a component
whose own interface is not a part's (the replay store, the training helper).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from edge_daemon.control.replies import StoreCheckStatus, StoreStatus
from edge_daemon.store import ReplayStore, StoreCheck
from edge_daemon.times import iso
from edge_daemon.training.worker import WorkerForker

log = logging.getLogger(__name__)

S_co = TypeVar("S_co", covariant=True)


class Part(Protocol[S_co]):
    """One component of the running daemon.

    `start()` starts its threads (if any); `stop()` ends them and releases what it holds, safe
    to call twice; `alive` is False once it can no longer do its work (the daemon then exits
    non-zero for the service manager to restart it); `status()` is its section of the `status`
    reply (None for a part that has none).
    """

    def start(self) -> object: ...

    def stop(self) -> object: ...

    @property
    def alive(self) -> bool: ...

    def status(self) -> S_co: ...


class StorePart:
    """The replay store as a part: closed at stop; its section counts readings, bytes and disk.

    `on_disk_full(full)` is the ingest writer's hook (called before each retry while a batch
    waits for disk space, and once when there is room again): retention frees what it can, and
    the store's section says whether ingestion waits.
    """

    def __init__(self, store: ReplayStore, check: StoreCheck) -> None:
        self.store = store
        self.check = check  # what the check at start found (a damaged store moved aside); later ones are the store's
        self._disk_full = False

    def start(self) -> None:
        """Nothing to start: the store was opened when it was built."""

    def stop(self) -> None:
        self.store.close()

    @property
    def alive(self) -> bool:
        return True

    @property
    def readings(self) -> int:
        return self.store.count()

    @property
    def held_rows(self) -> int:
        """Readings held back until the clock can be trusted."""
        return self.store.held_rows

    @property
    def disk_full(self) -> bool:
        """Ingestion waits for disk space."""
        return self._disk_full

    def on_disk_full(self, full: bool) -> None:
        if full:
            # Older replay data and empty pages go first: the store's budget shrinks to the
            # free space less the reserve (store.run_retention). On a full disk even that may fail.
            try:
                report = self.store.run_retention()
                log.info("disk full: retention freed %d readings", report["deleted_rows"])
            except Exception as exc:  # noqa: BLE001 - the write is retried whatever happens here
                log.debug("retention on a full disk failed: %s", exc)
        self._disk_full = full

    def status(self) -> StoreStatus:
        store = self.store
        check = self.newest_check
        return StoreStatus(
            readings=store.count(), bytes=store.size_bytes(), disk_free_bytes=store.free_bytes(), disk_full=self._disk_full,
            check=StoreCheckStatus(
                time=iso(check.checked_unix) or "", seconds=round(check.seconds, 3), problem=check.problem,
                moved_to=None if check.moved_to is None else str(check.moved_to), cause=check.cause,
            ),
            damaged=len(self.damaged),
        )  # fmt: skip

    @property
    def newest_check(self) -> StoreCheck:
        """The check at start, or a newer one made while running."""
        return self.store.last_check or self.check

    @property
    def damaged(self) -> list[StoreCheck]:
        """The checks that moved a damaged store aside, oldest first (at start, while running)."""
        return ([self.check] if self.check.moved_to is not None else []) + self.store.replaced

    @property
    def damaged_store_moved(self) -> str | None:
        """The STATUS= piece once a damaged store was moved aside (None: none was)."""
        damaged = self.damaged
        return None if not damaged else f"store was damaged: moved aside to {damaged[-1].moved_to.name}"  # type: ignore[union-attr]


class HelperPart:
    """The training helper (the process training workers are forked from) as a part.

    Started first, before any thread of ours (see training/worker.py), with the worker entry points
    `register` makes known to it.
    """

    def __init__(self, forker: WorkerForker, register: Callable[[WorkerForker], None]) -> None:
        self.forker = forker
        self._register = register

    def start(self) -> None:
        self._register(self.forker)
        self.forker.start()

    def stop(self) -> None:
        self.forker.stop()

    @property
    def alive(self) -> bool:
        return self.forker.alive

    def status(self) -> None:
        return None


__all__ = ["HelperPart", "Part", "StorePart"]
