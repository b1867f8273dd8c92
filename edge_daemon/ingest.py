"""MQTT ingestion: payload parsing and validation, and the paho client that feeds the replay store.

A QoS 1 message is acknowledged only after the batch holding it is committed, so a crash at any
moment loses nothing: the broker redelivers whatever was not acknowledged, and the store's
(channel, ts) key drops the duplicates.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from math import isfinite
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_daemon.clock import ClockWatch
from edge_daemon.config import Config
from edge_daemon.errors import DiskFullError, PayloadError, StoreError
from edge_daemon.replies import IngestStatus
from edge_daemon.store import Reading, ReplayStore

log = logging.getLogger(__name__)

# Every valid payload nests at most two levels ({"values": {...}}); anything deeper is rejected
# before json.loads can recurse through it.
MAX_JSON_DEPTH = 4
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
# PUBACK fixed header (type 4, remaining length 2) in the high half of a big-endian uint32
# whose low half is the message id: one PUBACK packet per packed integer.
_PUBACK_WORD = 0x4002 << 16

# Integers below this magnitude convert to a finite float without the OverflowError check.
_INT_LIMIT = 1 << 1000

REASONS = (
    "bad_topic", "too_large", "bad_utf8", "too_deep", "bad_json", "bad_shape",
    "bad_ts", "not_a_number", "non_finite", "unknown_channel", "too_old", "future",
)  # fmt: skip


@dataclass(frozen=True)
class PayloadLimits:
    """What parse_payload accepts; built from the config by `from_config`."""

    max_payload_bytes: int = 16384
    max_age_s: float = 7 * 24 * 3600.0
    max_skew_s: float = 300.0

    @classmethod
    def from_config(cls, config: Config) -> PayloadLimits:
        return cls(config.mqtt.max_payload_bytes, config.store.max_age_s, config.store.max_skew_s)


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """True if brackets outside strings nest deeper than limit."""
    # Cheap pre-check: a payload with few brackets cannot nest deeply.
    if text.count("{") + text.count("[") <= limit:
        return False
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _number(value: Any, what: str) -> float:
    # Exact type checks first: the usual JSON number takes one comparison, and bool (an int
    # subclass: `true` is not a sensor reading) never matches `type(value) is int`.
    kind = type(value)
    if kind is float:
        if isfinite(value):
            return value  # type: ignore[no-any-return]
        raise PayloadError("non_finite", f"{what} is {value}")
    if kind is not int:
        raise PayloadError("not_a_number", f"{what} is {kind.__name__}")
    try:
        return float(value)
    except OverflowError:
        raise PayloadError("non_finite", f"{what} overflows a float") from None


# A reading stamped before this (2024-01-01 UTC) was not stamped by a working clock (a dead RTC
# sends 1970): it is rejected at once, never held for the device clock to be corrected.
HOLD_FLOOR_TS = 1_704_067_200.0


class _OutOfWindow(Exception):
    """A valid timestamp outside the window the device clock allows (internal to parse_payload)."""

    def __init__(self, error: PayloadError, ts: float) -> None:
        self.error = error
        self.ts = ts


def _timestamp(value: Any, now: float, limits: PayloadLimits) -> float:
    kind = type(value)
    if kind is not float and kind is not int:
        raise PayloadError("bad_ts", f"ts is {kind.__name__}")
    try:
        ts = float(value)
    except OverflowError:
        raise PayloadError("bad_ts", "ts overflows a float") from None
    if not isfinite(ts):
        raise PayloadError("bad_ts", f"ts is {ts}")
    if ts < now - limits.max_age_s:
        raise _OutOfWindow(PayloadError("too_old", f"ts {ts:.3f} is {now - ts:.0f} s old"), ts)
    if ts > now + limits.max_skew_s:
        raise _OutOfWindow(PayloadError("future", f"ts {ts:.3f} is {ts - now:.0f} s ahead"), ts)
    return ts


def _channel(name: str, channels: set[str]) -> str:
    if name not in channels:
        raise PayloadError("unknown_channel", repr(name[:80]))
    return name


# A Reading built by tuple.__new__ directly skips the namedtuple's Python-level __new__, which
# is a measurable share of the per-reading cost in the ingest writer.
_new_tuple: Callable[[type[Reading], tuple[str, float, float]], Reading] = tuple.__new__  # type: ignore[assignment]


def parse_payload(
    topic: str,
    payload: bytes,
    now: float,
    channels: set[str],
    limits: PayloadLimits,
    skipped: list[PayloadError] | None = None,
    held: list[Reading] | None = None,
) -> list[Reading]:
    """The readings in one MQTT message, or PayloadError(reason) for a message with none.

    Forms (DESIGN.md): `sensors/<sensor>/<channel>` with `{"ts": t, "value": v}` or a bare
    number (ts = now, the arrival time); `sensors/<sensor>` with `{"ts": t, "values": {...}}`.
    In a `values` map each entry stands alone: bad entries are appended to `skipped` and the
    good ones returned; if no entry is good, the first entry's error is raised.

    A timestamp older than max_age_s or more than max_skew_s ahead of `now` is rejected
    ("too_old", "future"); given a `held` list, such readings (stamped after HOLD_FLOOR_TS) are
    appended to it instead, and the message returns none.
    """
    try:
        return _parse(topic, payload, now, channels, limits, skipped)
    except _OutOfWindow as out:
        if held is None or out.ts < HOLD_FLOOR_TS:
            raise out.error from None
        # Parsed again without the window, the value checks and `skipped` exactly as in range.
        held.extend(_parse(topic, payload, out.ts, channels, replace(limits, max_age_s=math.inf, max_skew_s=math.inf), skipped))
        return []


def _parse(
    topic: str, payload: bytes, now: float, channels: set[str], limits: PayloadLimits, skipped: list[PayloadError] | None
) -> list[Reading]:
    levels = topic.split("/")
    if levels[0] != "sensors" or len(levels) not in (2, 3) or not all(levels):
        raise PayloadError("bad_topic", repr(topic[:120]))
    # The cap comes before any decoding, so a huge payload costs nothing.
    if len(payload) > limits.max_payload_bytes:
        raise PayloadError("too_large", f"{len(payload)} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("bad_utf8") from None
    if _json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise PayloadError("too_deep")
    try:
        doc = json.loads(text)
    except RecursionError:
        raise PayloadError("too_deep") from None
    except ValueError as exc:
        raise PayloadError("bad_json", str(exc)[:80]) from None

    if len(levels) == 3:
        channel = _channel(f"{levels[1]}/{levels[2]}", channels)
        if type(doc) is dict:
            if len(doc) != 2 or "ts" not in doc or "value" not in doc:
                raise PayloadError("bad_shape", f"object keys {sorted(doc)[:5]} (want ts, value)")
            value = _number(doc["value"], "value")
            return [_new_tuple(Reading, (channel, _timestamp(doc["ts"], now, limits), value))]
        return [_new_tuple(Reading, (channel, now, _number(doc, "payload")))]

    values = doc.get("values") if type(doc) is dict and len(doc) == 2 and "ts" in doc else None
    if type(values) is not dict:
        raise PayloadError("bad_shape", "want {\"ts\": t, \"values\": {channel: number}}")
    ts = _timestamp(doc["ts"], now, limits)
    if not values:
        raise PayloadError("bad_shape", "empty values map")
    prefix = levels[1] + "/"
    readings: list[Reading] = []
    first_error: PayloadError | None = None
    for key, raw in values.items():
        # Configured names hold exactly one "/" and no wildcard, so a key with "/", "+" or "#"
        # (or an empty one) can never match: the set lookup alone rejects it.
        channel = prefix + key
        kind = type(raw)
        if channel in channels and (kind is float and isfinite(raw) or kind is int and -_INT_LIMIT < raw < _INT_LIMIT):
            readings.append(_new_tuple(Reading, (channel, ts, float(raw))))
            continue
        try:
            readings.append(_new_tuple(Reading, (_channel(channel, channels), ts, _number(raw, f"values[{key!r}]"))))
        except PayloadError as exc:
            if first_error is None:
                first_error = exc
            if skipped is not None:
                skipped.append(exc)
    if not readings:
        assert first_error is not None
        if skipped:
            skipped.pop(0)  # raised instead of skipped
        raise first_error
    return readings


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


class Ingestor:
    """Subscribes to sensor topics and writes readings to the store in acknowledged batches.

    Threads: paho's network thread only queues messages; one writer thread parses, batches,
    commits, acknowledges and calls the `on_batch` hooks. Both share the GIL, so the writer
    keeps its per-message work small and wakes up in bursts, not per message.
    """

    def __init__(
        self, config: Config, store: ReplayStore, clock: Callable[[], float] = time.time, clock_watch: ClockWatch | None = None
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
        self.prefix = config.topic_prefix
        # Called with each committed batch, in the writer thread: must be cheap and not block.
        self.on_batch: list[BatchHook] = []
        # Called in the writer thread with readings as they are taken, within HAND_OVER_S of
        # their arrival and before their batch commits (a commit waits for flush_interval_s, the
        # batch size or half the receive window): scoring need not wait for storage. Duplicates
        # of stored readings come too. Must be cheap and not block.
        self.on_readings: list[BatchHook] = []
        # The retained `status` published at every (re)connect; the daemon supplies it.
        self.online_status: Callable[[], dict[str, Any]] = lambda: {"online": True, "device": config.device.id}
        mqtt_cfg = config.mqtt
        self._v5 = mqtt_cfg.protocol == "5"
        # The broker stops sending once this many QoS 1 messages wait for our ack; flushing at
        # half of it keeps messages flowing while a batch commits.
        inflight = mqtt_cfg.receive_maximum if self._v5 else mqtt_cfg.broker_inflight
        self._ack_flush = max(1, inflight // 2)
        # Network thread -> writer. A deque append is atomic and wakes nobody: `_wake` is set
        # only while the writer waits on an empty inbox, not once per message.
        self._inbox: deque[_Inbound | object] = deque()
        self._wake = threading.Event()
        self._writer_idle = False
        self._gen_lock = threading.Lock()
        self._generation = 0
        self._connected = threading.Event()
        # Set when the broker has granted our subscriptions: before that, a message published
        # on a fresh session is not routed to us at all.
        self._subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._ever_connected = False
        self._down_reported = False
        self._stats_lock = threading.Lock()
        self._stats: dict[str, int] = {
            "received": 0, "readings": 0, "stored": 0, "duplicates": 0, "rejected": 0, "batches": 0, "dropped_disk_full": 0,
            "held": 0, "released": 0,
        }  # fmt: skip
        # Set while a batch waits for disk space; `on_disk_full(full)` is called when that changes
        # (in the writer thread), and before each retry with `full=True` so space can be freed.
        self._disk_full_since: float | None = None
        self._batch_qos0 = 0  # readings of the pending batch that came with QoS 0
        self.on_disk_full: Callable[[bool], None] = lambda full: None
        self._rejected_by_reason: dict[str, int] = {}
        self._log_reject = _RateLimitedLog(REJECT_LOG_INTERVAL_S)
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._stopped = False
        self._stop_wait = threading.Event()
        self.client = self._make_client()
        self._queue_packet = _packet_queue_of(self.client)

    # -- client ------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        mqtt_cfg = self.config.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=mqtt_cfg.client_id or f"edge-daemon-{self.config.device.id}",
            # MQTT 3.1.1: no clean session, so the broker keeps our subscription and queues
            # QoS 1 messages while we are away (MQTT 5 uses clean_start + session expiry).
            clean_session=None if self._v5 else False,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            # Acknowledge only after the batch holding a message is committed.
            manual_ack=True,
        )
        if mqtt_cfg.username:
            client.username_pw_set(mqtt_cfg.username, mqtt_cfg.password)
        client.will_set(self.prefix + "status", json.dumps({"online": False, "device": self.config.device.id}), qos=1, retain=True)
        client.reconnect_delay_set(mqtt_cfg.reconnect_min_s, mqtt_cfg.reconnect_max_s)  # type: ignore[arg-type]
        # Our own publishes (status, forecasts) may queue while the broker is away.
        client.max_queued_messages_set(10000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_properties(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.mqtt.session_expiry_s
        # Lets the broker keep enough unacknowledged messages in flight to fill a batch.
        props.ReceiveMaximum = self.config.mqtt.receive_maximum
        return props

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._report_down(f"broker refused the connection: {reason}")
            return
        with self._gen_lock:
            self._generation += 1
        self._ever_connected = True
        self._down_reported = False
        log.info(
            "connected to %s:%d (session present: %s)",
            self.config.mqtt.host, self.config.mqtt.port, bool(flags.session_present),
        )
        # Subscribe on every connect: a broker that lost our session (restart without
        # persistence) must get the subscriptions again; with a kept session it is harmless.
        qos = self.config.mqtt.qos
        _, self._subscribe_mid = client.subscribe([(topic, qos) for topic in self.config.mqtt.topics])
        # The last will may have replaced the retained status while we were away.
        self.publish("status", self.online_status(), qos=1, retain=True)
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list, props: Any) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [
            f"{topic} ({code})" for topic, code in zip(self.config.mqtt.topics, reason_codes) if code.is_failure
        ]
        if refused:
            # Nothing arrives on a refused topic (an ACL, a bad filter): say so loudly, keep the rest.
            log.error("broker refused the subscription to %s", ", ".join(refused))
        self._subscribed.set()

    def _report_down(self, what: str) -> None:
        # The first failure after being up (or at start) is a WARNING; the retries are DEBUG.
        if not self._down_reported:
            self._down_reported = True
            log.warning("%s; reconnecting with backoff up to %.0f s", what, self.config.mqtt.reconnect_max_s)
        else:
            log.debug("%s; still retrying", what)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        # Message ids of the old connection mean nothing on the next one: acks still pending
        # for them are dropped (the broker redelivers those messages, the store dedups them).
        with self._gen_lock:
            self._generation += 1
        self._connected.clear()
        self._subscribed.clear()
        if not self._stopped:
            self._report_down(f"lost connection to broker {self.config.mqtt.host}:{self.config.mqtt.port} ({reason})")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._report_down(f"cannot connect to broker {self.config.mqtt.host}:{self.config.mqtt.port}")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Network thread: only hand over; all the work happens in the writer thread.
        if self._disk_full_since is not None and message.qos == 0 and len(self._inbox) >= DISK_FULL_INBOX_MAX:
            with self._stats_lock:
                self._stats["dropped_disk_full"] += 1
            return
        self._inbox.append((self._generation, message, self.clock()))
        if self._writer_idle:
            self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        mqtt_cfg = self.config.mqtt
        self._writer = threading.Thread(target=self._writer_main, name="ingest-writer", daemon=True)
        self._writer.start()
        self.client.connect_async(
            mqtt_cfg.host,
            mqtt_cfg.port,
            keepalive=mqtt_cfg.keepalive_s,
            clean_start=False if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=self._connect_properties(),
        )
        self.client.loop_start()

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until connected with the subscriptions granted, so nothing published from now on is missed."""
        return self._subscribed.wait(timeout)

    @property
    def connected(self) -> bool:
        """Connected with the subscriptions granted: readings published now reach us."""
        return self._subscribed.is_set()

    @property
    def alive(self) -> bool:
        """False once the writer thread has died (the daemon must then exit non-zero)."""
        return self._writer is not None and self._writer.is_alive() or self._stopped

    def stop(self, timeout: float = 10.0) -> None:
        """Flush and acknowledge the pending batch, publish `offline` (retained), disconnect."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_wait.set()  # a batch waiting for disk space tries once more, then gives up
        if self._writer is not None:
            self._inbox.append(_STOP)
            self._wake.set()
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.error("ingest writer did not finish its last batch within %.0f s", timeout)
        if self._connected.is_set():
            info = self.publish("status", {"online": False, "device": self.config.device.id}, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=min(timeout, 5.0))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        log.info("ingest stopped: %s", self.counters())

    def publish(self, topic_suffix: str, payload: Any, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish on `edge/<device.id>/<topic_suffix>`; dicts and lists are sent as JSON."""
        if not isinstance(payload, (bytes, bytearray, str)):
            payload = json.dumps(payload, separators=(",", ":"))
        return self.client.publish(self.prefix + topic_suffix, payload, qos=qos, retain=retain)

    # -- counters ----------------------------------------------------------------------------

    @property
    def disk_full(self) -> bool:
        """A batch is waiting for disk space (nothing is stored or acknowledged meanwhile)."""
        return self._disk_full_since is not None

    @property
    def backlog(self) -> int:
        """Messages received but not yet parsed and committed."""
        return len(self._inbox)

    def counters(self) -> IngestStatus:
        """received/rejected count messages (and rejected entries of `values` maps); readings,
        stored and duplicates count readings."""
        with self._stats_lock:
            snapshot: IngestStatus = dict(self._stats)  # type: ignore[assignment]
            snapshot["rejected_by_reason"] = dict(self._rejected_by_reason)
        snapshot["connected"] = self.connected
        snapshot["disk_full"] = self.disk_full
        snapshot["clock"] = {**self.clock_watch.status(), "holding": self.store.held_rows}
        return snapshot

    def _reject(self, topic: str, error: PayloadError, count: int = 1) -> None:
        with self._stats_lock:
            self._stats["rejected"] += count
            self._rejected_by_reason[error.reason] = self._rejected_by_reason.get(error.reason, 0) + count
        self._log_reject(error.reason, topic, error.detail)

    # -- writer thread -----------------------------------------------------------------------

    def _writer_main(self) -> None:
        try:
            self._write_loop()
        except BaseException as exc:
            # Logged with its traceback here; the thread then ends, `alive` turns False and the
            # daemon exits non-zero so the service manager restarts it.
            self._writer_error = exc
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
        handed = held_handed = 0  # readings[:handed] and held[:held_handed] went to the on_readings hooks
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
                if hand_at is None and (len(readings) > handed or len(held) > held_handed):
                    hand_at = time.monotonic() + HAND_OVER_S
            if stop:
                self._hand_over(readings[handed:])
                self._hand_over(held[held_handed:])
                self._flush(readings, held, acks)
                return
            flush = deadline is not None and (
                len(readings) + len(held) >= batch_size or len(acks) >= ack_flush or time.monotonic() >= deadline
            )
            if hand_at is not None and (flush or time.monotonic() >= hand_at):
                # Held readings are scored too: their timestamps are the sensors', whatever the
                # device clock says, and scoring runs on those.
                self._hand_over(readings[handed:])
                self._hand_over(held[held_handed:])
                handed, held_handed, hand_at = len(readings), len(held), None
            if flush:
                # Also when only rejected QoS 0 messages were taken (nothing to write or ack):
                # the deadline must be cleared or the wait above would spin.
                self._flush(readings, held, acks)
                readings, held, acks, deadline, handed, held_handed = [], [], [], None, 0, 0
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
            parsed = parse_payload(topic, message.payload, arrival, self.channels, self.limits, skipped, held)
        except PayloadError as exc:
            self._reject(topic, exc)
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
        # Committed: now, and only now, the broker may forget these messages. The lock keeps a
        # reconnect from slipping in between the generation check and the ack.
        if acks:
            with self._gen_lock:
                current = self._generation
                mids = [mid for generation, mid, qos in acks if generation == current and qos == 1]
                if mids:
                    self._send_pubacks(mids)
                for generation, mid, qos in acks:
                    if generation == current and qos > 1:
                        rc = self.client.ack(mid, qos)
                        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                            log.debug("ack of mid %d failed: %s", mid, rc)
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

    def _send_pubacks(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 messages of the current connection (caller holds _gen_lock)."""
        if self._queue_packet is None:
            for mid in mids:
                rc = self.client.ack(mid, 1)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    log.debug("ack of mid %d failed: %s", mid, rc)
            return
        # The PUBACKs of a batch as one queued write: client.ack() queues each one on its own
        # and pokes the network thread's wake-up socket per message, and that thread then
        # makes one send() per 4-byte packet. Byte for byte what client.ack() sends.
        self._queue_packet(PUBACK, struct.pack(f">{len(mids)}I", *[_PUBACK_WORD | mid for mid in mids]), 0, 0)


def _packet_queue_of(client: mqtt.Client) -> Callable[[int, bytes, int, int], Any] | None:
    """paho's internal `_packet_queue(command, packet, mid, qos)` if this paho version has it
    with that signature, else None (acks then go one by one through the public `ack`)."""
    method = getattr(client, "_packet_queue", None)
    if method is None:
        return None
    try:
        params = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return None
    return method if params[:4] == ["command", "packet", "mid", "qos"] else None
