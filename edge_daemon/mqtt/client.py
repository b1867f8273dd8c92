"""The broker connection: the paho client's lifecycle (connect over TCP or TLS, reconnect,
subscribe, the MQTT 5 receive window), the state of the broker link as `status` reports it, the
manual PUBACKs of committed messages, and the publishing of every daemon output on
`edge/<device.id>/...`.
"""

from __future__ import annotations

import inspect
import json
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_daemon import __version__
from edge_daemon.config import Config
from edge_daemon.control.replies import BrokerStatus
from edge_daemon.mqtt.credentials import configure_client, describe_connect_error
from edge_daemon.mqtt.outputs import OnlineStatus, offline_status, online_status

log = logging.getLogger(__name__)

# PUBACK fixed header (type 4, remaining length 2) in the high half of a big-endian uint32
# whose low half is the message id: one PUBACK packet per packed integer.
_PUBACK_WORD = 0x4002 << 16


class Connection:
    """The paho client the ingestor receives on and the daemon publishes through.

    Its callbacks run in paho's network thread. Incoming messages are not handled here: the
    Ingestor points `client.on_message` at its writer, which acknowledges them through `ack`
    once their batch is committed.

    The password and key files are read and the TLS context built when it is made (ConfigError
    naming the key if one cannot be). With `tls` it only ever speaks TLS: a failed handshake is
    kept as the broker error and retried with the back-off, never tried again in plaintext.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.prefix = config.topic_prefix
        # The retained `status` published at every (re)connect; the daemon supplies it (until
        # then: this connection's, with no adapter and no scoring yet).
        started = time.time()
        self.online_status: Callable[[], OnlineStatus] = lambda: online_status(config.device.id, __version__, started, None, False)
        mqtt_cfg = config.mqtt
        self._v5 = mqtt_cfg.protocol == "5"
        # The broker stops sending once this many QoS 1 messages wait for our ack.
        self.inflight = mqtt_cfg.receive_maximum if self._v5 else mqtt_cfg.broker_inflight
        # The connection a message arrived on, bumped at every connect and disconnect: a message
        # id is only valid on its own connection.
        self._gen_lock = threading.Lock()
        self.generation = 0
        self._connected = threading.Event()
        # Set when the broker has granted our subscriptions: before that, a message published
        # on a fresh session is not routed to us at all.
        self._subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._down_reported = False
        self._stopped = False
        # Called (in paho's network thread) after every connect, once the status is published:
        # appended to, never replaced.
        self.on_connect: list[Callable[[], None]] = []
        # Subscriptions beside the sensor topics, each with its own callback (add_subscription).
        self._extra_lock = threading.Lock()
        self._extra_subscriptions: list[tuple[str, int]] = []
        # The last failure to reach the broker as (STATUS= words, detail), until the next connect.
        self._error: tuple[str, str] | None = None
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
        configure_client(client, mqtt_cfg)
        client.will_set(self.prefix + "status", json.dumps(offline_status(self.config.device.id)), qos=1, retain=True)
        client.reconnect_delay_set(mqtt_cfg.reconnect_min_s, mqtt_cfg.reconnect_max_s)  # type: ignore[arg-type]
        # Our own publishes (status, forecasts) may queue while the broker is away.
        client.max_queued_messages_set(10000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        # on_message is the writer's: the Ingestor connects the two.
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
            refused = f"broker refused the connection: {reason}"
            self._error = (refused, refused)
            self._report_down(self._error[1])
            return
        with self._gen_lock:
            self.generation += 1
        self._down_reported = False
        self._error = None
        log.info(
            "connected to %s:%d%s (session present: %s)",
            self.config.mqtt.host, self.config.mqtt.port, " over TLS" if self.config.mqtt.tls else "",
            bool(flags.session_present),
        )
        # Subscribe on every connect: a broker that lost our session (restart without
        # persistence) must get the subscriptions again; with a kept session it is harmless.
        qos = self.config.mqtt.qos
        _, self._subscribe_mid = client.subscribe([(topic, qos) for topic in self.config.subscriptions])
        # The last will may have replaced the retained status while we were away.
        self.publish("status", self.online_status(), qos=1, retain=True)
        self._connected.set()
        with self._extra_lock:
            extra = list(self._extra_subscriptions)
        if extra:
            client.subscribe(extra)
        for hook in list(self.on_connect):
            try:
                hook()
            except Exception:  # noqa: BLE001 - one hook's failure must not keep the others (or the connection) from running
                log.exception("on-connect hook failed")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list, props: Any) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [
            f"{topic} ({code})" for topic, code in zip(self.config.subscriptions, reason_codes) if code.is_failure
        ]
        if refused:
            # Nothing arrives on a refused topic (an ACL, a bad filter): say so loudly, keep the rest.
            log.error("broker refused the subscription to %s", ", ".join(refused))
        self._subscribed.set()

    def _report_down(self, what: str) -> None:
        # The first failure after being up (or at start) is a WARNING; the retries are DEBUG.
        if not self._down_reported:
            self._down_reported = True
            log.warning("%s; reconnecting with backoff up to %g s", what, self.config.mqtt.reconnect_max_s)
        else:
            log.debug("%s; still retrying", what)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        # Message ids of the old connection mean nothing on the next one: acks still pending
        # for them are dropped (the broker redelivers those messages, the store dedups them).
        with self._gen_lock:
            self.generation += 1
        was_up = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if self._stopped:
            return
        if not was_up and self._error is not None and self._error[0].startswith("broker refused"):
            return  # the end of a connection the broker refused: the refusal stays the reason
        mqtt_cfg = self.config.mqtt
        if not was_up and mqtt_cfg.tls:
            # With TLS 1.3 a broker that rejects our certificate (or its absence) says so only
            # after the handshake: the connection ends before the CONNACK.
            short = f"TLS: {mqtt_cfg.host} closed the connection"
            what = f"{short} before accepting it ({reason}): does it want a client certificate (cert_file, key_file)?"
        else:
            short, what = "broker unreachable", f"lost connection to broker {mqtt_cfg.host}:{mqtt_cfg.port} ({reason})"
        self._error = (short, what)
        self._report_down(what)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError:` around the connect (socket, TLS
        # handshake), passing no exception: the one being handled is the reason.
        mqtt_cfg = self.config.mqtt
        self._error = describe_connect_error(sys.exc_info()[1], mqtt_cfg.host, mqtt_cfg.port, mqtt_cfg.tls)
        self._report_down(self._error[1])

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        mqtt_cfg = self.config.mqtt
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
    def problem(self) -> str | None:
        """Why the broker is not reachable, in a few words for the STATUS= line ("TLS: certificate
        verify failed for <host>", "broker unreachable"); None while connected."""
        if self.connected:
            return None
        error = self._error
        return error[0] if error is not None else "broker unreachable"

    def broker_status(self) -> BrokerStatus:
        """The broker link as `status` shows it: where, whether over TLS, and the last failure."""
        mqtt_cfg = self.config.mqtt
        error = self._error
        return {
            "host": mqtt_cfg.host,
            "port": mqtt_cfg.port,
            "tls": mqtt_cfg.tls,
            "connected": self.connected,
            "error": None if error is None else error[1],
        }

    def stopping(self) -> None:
        """From now on a lost connection is the shutdown's doing: it is not reported."""
        self._stopped = True

    def stop(self, timeout: float = 10.0) -> None:
        """Publish `offline` (retained), disconnect."""
        self._stopped = True
        if self._connected.is_set():
            info = self.publish("status", offline_status(self.config.device.id), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=min(timeout, 5.0))
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish offline status: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic_suffix: str, payload: Any, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish on `edge/<device.id>/<topic_suffix>`; dicts and lists are sent as JSON."""
        return self.publish_topic(self.prefix + topic_suffix, payload, qos=qos, retain=retain)

    def publish_topic(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish on `topic` itself (outside `edge/<device.id>/`); dicts and lists are sent as JSON."""
        if not isinstance(payload, (bytes, bytearray, str)):
            payload = json.dumps(payload, separators=(",", ":"))
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def add_subscription(self, topic_filter: str, qos: int, callback: Callable[[mqtt.MQTTMessage], None]) -> None:
        """Subscribe to `topic_filter` now (if connected) and at every connect; its messages go to
        `callback(message)` in paho's network thread, never to the ingest writer. They are
        acknowledged on arrival: they are not readings, nothing is committed for them."""

        def route(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            if message.qos > 0:
                client.ack(message.mid, message.qos)  # manual_ack: nobody else acknowledges these
            try:
                callback(message)
            except Exception:  # noqa: BLE001 - a callback's failure must not end paho's network thread
                log.exception("handling a message on %s failed", message.topic)

        # The route first, then the subscription: nothing arrives before it can be routed.
        self.client.message_callback_add(topic_filter, route)
        with self._extra_lock:
            self._extra_subscriptions.append((topic_filter, qos))
        if self._connected.is_set():
            self.client.subscribe(topic_filter, qos)

    # -- acknowledgements --------------------------------------------------------------------

    def ack(self, acks: list[tuple[int, int, int]]) -> None:
        """Acknowledge committed messages, given as (generation, mid, qos) in arrival order: those
        that came on an earlier connection are skipped (the broker redelivers them)."""
        # The lock keeps a reconnect from slipping in between the generation check and the ack.
        with self._gen_lock:
            current = self.generation
            mids = [mid for generation, mid, qos in acks if generation == current and qos == 1]
            if mids:
                self._send_pubacks(mids)
            for generation, mid, qos in acks:
                if generation == current and qos > 1:
                    rc = self.client.ack(mid, qos)
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        log.debug("ack of mid %d failed: %s", mid, rc)

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
