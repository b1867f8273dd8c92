"""The batch-commit-ack writer: messages from paho's network thread wait in an inbox; one thread
parses them, commits them to the store in batches and only then has them acknowledged. Also the
disk-full state, the readings held while the clock is not trusted, and the rate-limited reject log.
Over 400 lines because the write loop and its flush, clock check and disk-full retry share one
thread's batch state: split, they would pass it back and forth.

A QoS 1 message is acknowledged only after the batch holding it is committed, so a crash at any
moment loses nothing: the broker redelivers whatever was not acknowledged, and the store's
(channel, ts) key drops the duplicates.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt

from edge_daemon.clock import ClockWatch
from edge_daemon.config import Config
from edge_daemon.errors import DiskFullError, PayloadError, StoreError, StoreReplacedError
from edge_daemon.mqtt.client import Connection
from edge_daemon.mqtt.formats import InputRouter, Outcome
from edge_daemon.mqtt.payload import PayloadLimits, parse_payload
from edge_daemon.store import Reading, ReplayStore

log = logging.getLogger(__name__)

# A rejection reason is logged at most once per this many seconds (with a count of the rest).
REJECT_LOG_INTERVAL_S = 10.0
# A failed store write (other than a full disk) is retried this many times before the ingestor
# gives up (and the daemon exits non-zero, so systemd restarts it and the broker redelivers the
# unacknowledged batch).
WRITE_ATTEMPTS = 3
# A full disk is a state, not a failure: the batch waits, unacknowledged (the broker keeps it and,
# with QoS 1, sends no more than its receive maximum meanwhile), and the write is retried after
# a back-off that doubles from the first to the last of these.
DISK_FULL_RETRY_S = (1.0, 30.0)
# QoS 0 readings cannot wait at the broker: while the disk is full at most this many messages
# wait in memory, and QoS 0 ones beyond it are dropped (counted as `dropped_disk_full`).
DISK_FULL_INBOX_MAX = 20_000
# After taking what arrived, the writer sleeps this long before looking again (unless a batch
# is due), so a steady stream wakes it a few hundred times a second rather than once per
# message: each wake-up takes the GIL from paho's network thread, the ingest bottleneck.
LINGER_S = 0.004
# Readings reach the on_readings hooks (scoring) at most this long after they were taken,
# however long their batch waits to be committed.
HAND_OVER_S = 0.2
# The writer looks at the clock (jumps, the kernel's synchronisation state) and, while readings
# are held, releases those the clock now allows, at most this often.
CLOCK_CHECK_S = 1.0


class _RateLimitedLog:
    """At most one WARNING per reason per interval, with the count of those not logged."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, reason: str, topic: str, detail: str) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -math.inf) < self.interval_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last[reason] = now
        more = self._suppressed.pop(reason, 0)
        log.warning(
            "rejected payload on %r: %s%s%s",
            topic[:120], reason, f" ({detail})" if detail else "",
            f"; {more} more {reason} since the last report" if more else "",
        )


# (generation, message, arrival): the generation is the connection the message arrived on (its
# mid is only valid there). A plain tuple: the network thread builds one per message.
_Inbound = tuple[int, mqtt.MQTTMessage, float]


BatchHook = Callable[[Sequence[Reading]], None]
_STOP = object()


class Writer:
    """Takes messages from the network thread and writes their readings to the store in
    acknowledged batches, in a thread of its own.

    paho's network thread only queues messages (`on_message`); the writer thread parses, batches,
    commits, acknowledges and calls the `on_batch` hooks. Both share the GIL, so the writer
    keeps its per-message work small and wakes up in bursts, not per message.
    """

    def __init__(
        self,
        config: Config,
        store: ReplayStore,
        connection: Connection,
        clock: Callable[[], float] = time.time,
        clock_watch: ClockWatch | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        # Readings outside the time window are held, not rejected, while this does not trust the clock.
        self.clock_watch = clock_watch or ClockWatch(config.store.clock_trust, wall=clock)
        self._next_clock_check = 0.0
        self._hold_full_logged = False
        self.limits = PayloadLimits.from_config(config)
        self.channels = set(config.channels.names)
        self._connection = connection
        # Called with each committed batch, in the writer thread: must be cheap and not block.
        self.on_batch: list[BatchHook] = []
        # Called in the writer thread with readings as they are taken, within HAND_OVER_S of
        # their arrival and before their batch commits (a commit waits for flush_interval_s, the
        # batch size or half the receive window): scoring need not wait for storage. Duplicates
        # of stored readings come too. Readings held for the clock come only when released into
        # the store. Must be cheap and not block.
        self.on_readings: list[BatchHook] = []
        # Flushing at half the broker's in-flight window keeps messages flowing while a batch commits.
        self._ack_flush = max(1, connection.inflight // 2)
        # Network thread -> writer. A deque append is atomic and wakes nobody: `_wake` is set
        # only while the writer waits on an empty inbox, not once per message.
        self._inbox: deque[_Inbound | object] = deque()
        self._wake = threading.Event()
        self._writer_idle = False
        self._stats_lock = threading.Lock()
        self._stats: dict[str, int] = {
            "received": 0, "readings": 0, "stored": 0, "duplicates": 0, "rejected": 0, "batches": 0, "dropped_disk_full": 0,
            "held": 0, "released": 0, "ignored": 0,
        }  # fmt: skip
        # Set while a batch waits for disk space; `on_disk_full(full)` is called when that changes
        # (in the writer thread), and before each retry with `full=True` so space can be freed.
        self._disk_full_since: float | None = None
        self._batch_qos0 = 0  # readings of the pending batch that came with QoS 0
        self.on_disk_full: Callable[[bool], None] = lambda full: None
        self._rejected_by_reason: dict[str, int] = {}
        # Fields that are not configured channels, and messages on topics that carry no readings
        # (read through [[inputs]] mappings): neither stored nor rejected.
        self._ignored_by_reason: dict[str, int] = {}
        # Without [[inputs]] the native grammar is read directly: no topic matching per message.
        self._router = InputRouter(config) if config.inputs else None
        self._parse = self._parse_native if self._router is None else self._parse_mapped
        self._log_reject = _RateLimitedLog(REJECT_LOG_INTERVAL_S)
        self._parse_error_logged = False
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stop_wait = threading.Event()

    # -- network thread ----------------------------------------------------------------------

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Network thread: only hand over; all the work happens in the writer thread.
        if self._disk_full_since is not None and message.qos == 0 and len(self._inbox) >= DISK_FULL_INBOX_MAX:
            with self._stats_lock:
                self._stats["dropped_disk_full"] += 1
            return
        self._inbox.append((self._connection.generation, message, self.clock()))
        if self._writer_idle:
            self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="ingest-writer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the writer thread has died (the daemon must then exit non-zero)."""
        return self._thread is not None and self._thread.is_alive() or self._stopped

    def stop(self, timeout: float = 10.0) -> None:
        """Flush and acknowledge the pending batch; the thread then ends."""
        self._stopped = True
        self._stop_wait.set()  # a batch waiting for disk space tries once more, then gives up
        if self._thread is not None:
            self._inbox.append(_STOP)
            self._wake.set()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("ingest writer did not finish its last batch within %.0f s", timeout)

    # -- counters ----------------------------------------------------------------------------

    @property
    def disk_full(self) -> bool:
        """A batch is waiting for disk space (nothing is stored or acknowledged meanwhile)."""
        return self._disk_full_since is not None

    @property
    def backlog(self) -> int:
        """Messages received but not yet parsed and committed."""
        return len(self._inbox)

    def stats(self) -> dict[str, Any]:
        """The counts of `Ingestor.counters`, with `rejected_by_reason`."""
        with self._stats_lock:
            snapshot: dict[str, Any] = dict(self._stats)
            snapshot["rejected_by_reason"] = dict(self._rejected_by_reason)
            snapshot["ignored_by_reason"] = dict(self._ignored_by_reason)
        return snapshot

    def _parse_native(
        self, topic: str, payload: bytes, arrival: float, skipped: list[PayloadError], held: list[Reading] | None
    ) -> list[Reading]:
        return parse_payload(topic, payload, arrival, self.channels, self.limits, skipped, held)

    def _parse_mapped(
        self, topic: str, payload: bytes, arrival: float, skipped: list[PayloadError], held: list[Reading] | None
    ) -> list[Reading]:
        """Through the [[inputs]] mappings; what they ignore is counted, not rejected."""
        assert self._router is not None
        outcome = Outcome(skipped=skipped)
        try:
            return self._router.parse(topic, payload, arrival, self.limits, outcome, held)
        finally:
            if outcome.ignored:
                self._ignore(outcome.ignored)

    def _ignore(self, reasons: dict[str, int]) -> None:
        with self._stats_lock:
            for reason, count in reasons.items():
                self._stats["ignored"] += count
                self._ignored_by_reason[reason] = self._ignored_by_reason.get(reason, 0) + count

    def _reject(self, topic: str, error: PayloadError, count: int = 1) -> None:
        with self._stats_lock:
            self._stats["rejected"] += count
            self._rejected_by_reason[error.reason] = self._rejected_by_reason.get(error.reason, 0) + count
        self._log_reject(error.reason, topic, error.detail)

    # -- writer thread -----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._write_loop()
        except BaseException:
            # Logged with its traceback here; the thread then ends, `alive` turns False and the
            # daemon exits non-zero so the service manager restarts it.
            log.exception("ingest writer died")
        finally:
            log.info("ingest writer exiting")

    def _write_loop(self) -> None:
        batch_size = self.config.store.batch_size
        interval = self.config.store.flush_interval_s
        ack_flush = self._ack_flush
        inbox = self._inbox
        hold_max = self.config.store.clock_hold_max
        readings: list[Reading] = []
        held: list[Reading] = []  # outside the time window while the clock is not trusted
        acks: list[tuple[int, int, int]] = []  # (generation, mid, qos) in arrival order
        deadline: float | None = None  # flush time of the oldest message taken and not flushed
        handed = 0  # readings[:handed] went to the on_readings hooks
        hand_at: float | None = None  # when the rest go to them
        while True:
            if time.monotonic() >= self._next_clock_check:
                self._check_clock()
            if not inbox:
                due = deadline if hand_at is None else hand_at if deadline is None else min(deadline, hand_at)
                timeout = interval if due is None else due - time.monotonic()
                if self.store.held_rows:
                    timeout = min(timeout, self._next_clock_check - time.monotonic())
                if timeout > 0:
                    self._wake.clear()
                    self._writer_idle = True
                    # Looked at again after raising the flag: a message appended just before
                    # it was raised did not set `_wake`.
                    if not inbox:
                        self._wake.wait(timeout)
                    self._writer_idle = False
            taken = 0
            stop = False
            # Out-of-window readings go to `held` while it is shorter than this (never, with a trusted clock).
            hold_limit = -1 if self.clock_watch.trusted or not hold_max else hold_max - self.store.held_rows
            while inbox and len(readings) + len(held) < batch_size and len(acks) < ack_flush:
                item = inbox.popleft()
                if item is _STOP:
                    stop = True
                    break
                taken += 1
                self._take(item, readings, acks, held if len(held) < hold_limit else None)  # type: ignore[arg-type]
            if hold_limit >= 0:
                self._note_hold_room(len(held) < hold_limit, hold_max)
            if taken:
                with self._stats_lock:
                    self._stats["received"] += taken
                if deadline is None:
                    deadline = time.monotonic() + interval
                if hand_at is None and len(readings) > handed:
                    hand_at = time.monotonic() + HAND_OVER_S
            if stop:
                self._hand_over(readings[handed:])
                self._flush(readings, held, acks)
                return
            flush = deadline is not None and (
                len(readings) + len(held) >= batch_size or len(acks) >= ack_flush or time.monotonic() >= deadline
            )
            if hand_at is not None and (flush or time.monotonic() >= hand_at):
                # Held readings are not handed over: one stamped a day ahead would move scoring's
                # horizon with it and make every later reading late. They go to scoring when the
                # clock releases them into the store (`_check_clock`).
                self._hand_over(readings[handed:])
                handed, hand_at = len(readings), None
            if flush:
                # Also when only rejected QoS 0 messages were taken (nothing to write or ack):
                # the deadline must be cleared or the wait above would spin.
                self._flush(readings, held, acks)
                readings, held, acks, deadline, handed = [], [], [], None, 0
            elif taken and not inbox:
                time.sleep(LINGER_S)

    def _hand_over(self, readings: list[Reading]) -> None:
        """Readings taken and not yet committed, to the on_readings hooks (scoring)."""
        if not readings:
            return
        for hook in self.on_readings:
            try:
                hook(readings)
            except Exception:
                log.exception("on_readings hook %r failed", hook)

    def _note_hold_room(self, room: bool, hold_max: int) -> None:
        if room:
            self._hold_full_logged = False
        elif not self._hold_full_logged:
            self._hold_full_logged = True
            log.error(
                "%d readings held for the clock to be trusted ([store] clock_hold_max): readings outside the time window"
                " are rejected until it is", hold_max,
            )  # fmt: skip

    def _take(
        self, item: _Inbound, readings: list[Reading], acks: list[tuple[int, int, int]], held: list[Reading] | None = None
    ) -> None:
        generation, message, arrival = item
        if message.qos > 0:
            acks.append((generation, message.mid, message.qos))
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self._reject("<invalid utf-8>", PayloadError("bad_topic", "topic is not UTF-8"))
            return
        skipped: list[PayloadError] = []
        try:
            parsed = self._parse(topic, message.payload, arrival, skipped, held)
        except PayloadError as exc:
            self._reject(topic, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a parser's bug must not end ingestion
            # Whatever a message holds, it is one message: rejected and counted (the first
            # traceback logged), never the writer thread's end.
            if not self._parse_error_logged:
                self._parse_error_logged = True
                log.exception("parsing a message on %r failed; such messages are rejected as parse_error", topic[:120])
            self._reject(topic, PayloadError("parse_error", f"{type(exc).__name__}: {exc}"[:120]))
            return
        for exc in skipped:
            self._reject(topic, exc)
        readings.extend(parsed)
        if message.qos == 0:
            self._batch_qos0 += len(parsed)

    def _flush(self, readings: list[Reading], held: list[Reading], acks: list[tuple[int, int, int]]) -> None:
        qos0, self._batch_qos0 = self._batch_qos0, 0
        if readings or held:
            stored = self._write(readings, held)
            if stored is None:
                # Stopped while the disk was full: nothing acknowledged (the broker redelivers
                # QoS 1); QoS 0 readings are gone.
                with self._stats_lock:
                    self._stats["dropped_disk_full"] += qos0
                return
            with self._stats_lock:
                self._stats["readings"] += len(readings)
                self._stats["stored"] += stored
                self._stats["duplicates"] += len(readings) - stored
                self._stats["batches"] += 1
                self._stats["held"] += len(held)
        # Committed: now, and only now, the broker may forget these messages.
        if acks:
            self._connection.ack(acks)
        self._call_batch_hooks(readings)

    def _call_batch_hooks(self, readings: list[Reading]) -> None:
        if readings:
            for hook in self.on_batch:
                try:
                    hook(readings)
                except Exception:
                    log.exception("on_batch hook %r failed", hook)

    def _check_clock(self) -> None:
        """Poll the clock; release the held readings it now allows; reject those that waited enough.

        Once the clock is trusted again, what it still refuses was never in range; with the clock
        still untrusted, a reading waits at most `[store] clock_hold_s` (by the device clock). Either
        is then rejected as too old or future, as it would have been on arrival with a trusted clock.
        """
        self._next_clock_check = time.monotonic() + CLOCK_CHECK_S
        self.clock_watch.poll()
        if not self.store.held_rows:
            return
        now = self.clock()
        low, high = now - self.limits.max_age_s, now + self.limits.max_skew_s
        try:
            moved, stored = self.store.release_held(low, high)
            if moved:
                log.info("released %d held readings (%d new) the clock now allows", len(moved), stored)
                with self._stats_lock:
                    self._stats["released"] += len(moved)
                    self._stats["readings"] += len(moved)
                    self._stats["stored"] += stored
                    self._stats["duplicates"] += len(moved) - stored
                # Never handed over while held: scoring gets them now, once, like any new reading.
                self._hand_over(moved)
                self._call_batch_hooks(moved)
            hold_s = self.config.store.clock_hold_s
            if self.clock_watch.trusted:
                older, newer = self.store.drop_held(low)
                why = "the clock is trusted"
            else:
                older, newer = self.store.drop_held(low, held_before=now - hold_s)
                why = f"held for {hold_s:.0f} s"
            if older:
                self._reject("<held>", PayloadError("too_old", f"{older} held readings still too old: {why}"), older)
            if newer:
                self._reject("<held>", PayloadError("future", f"{newer} held readings still ahead: {why}"), newer)
        except StoreError as exc:  # a full disk included: the hold keeps them; tried again later
            log.warning("could not release held readings: %s", exc)

    def _write(self, readings: list[Reading], held: Sequence[Reading] = ()) -> int | None:
        """Store the batch: retried a few times on an error, and for as long as it takes while
        the disk is full. None when the ingestor stops before the disk has room."""
        attempt, retry_s = 0, DISK_FULL_RETRY_S[0]
        while True:
            try:
                stored = self.store.write(readings, held, self.clock())
            except DiskFullError as exc:
                if self._stopped:
                    log.warning(
                        "disk still full at shutdown: %d readings not stored; what came with QoS 1 is left unacknowledged "
                        "for the broker to redeliver, QoS 0 is lost (counted in dropped_disk_full)", len(readings) + len(held),
                    )  # fmt: skip
                    return None
                if self._disk_full_since is None:
                    self._disk_full_since = time.monotonic()
                    log.error("%s; ingestion waits (nothing acknowledged) and retries until there is room", exc)
                else:
                    log.debug("disk still full; retrying in %.0f s", retry_s)
                self._call_disk_hook(True)
                self._stop_wait.wait(retry_s)
                retry_s = min(DISK_FULL_RETRY_S[1], 2 * retry_s)
                continue
            except StoreError as exc:
                attempt += 1
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.warning("store write failed (attempt %d of %d): %s", attempt, WRITE_ATTEMPTS, exc)
                if not isinstance(exc, StoreReplacedError):  # a new store: the batch goes to it at once
                    time.sleep(0.5 * attempt)
                continue
            if self._disk_full_since is not None:
                log.warning("disk space back after %.0f s: ingestion resumed", time.monotonic() - self._disk_full_since)
                self._disk_full_since = None
                self._call_disk_hook(False)
            return stored

    def _call_disk_hook(self, full: bool) -> None:
        try:
            self.on_disk_full(full)
        except Exception:
            log.exception("disk-full hook failed")
