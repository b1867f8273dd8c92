"""The Ingestor, the one object the daemon builds for MQTT: a broker connection and the writer
it feeds, started, stopped and counted together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge_daemon.clock import ClockWatch
from edge_daemon.config import Config
from edge_daemon.mqtt.client import Connection
from edge_daemon.mqtt.writer import BatchHook, Writer
from edge_daemon.mqtt.outputs import OnlineStatus
from edge_daemon.control.replies import IngestStatus
from edge_daemon.store import ReplayStore

log = logging.getLogger(__name__)


class Ingestor:
    """Subscribes to sensor topics and writes readings to the store in acknowledged batches;
    publishes the daemon's outputs on the same connection.

    Threads: paho's network thread only queues messages; one writer thread parses, batches,
    commits, acknowledges and calls the `on_batch` hooks (see `Writer`).
    """

    def __init__(
        self, config: Config, store: ReplayStore, clock: Callable[[], float] = time.time, clock_watch: ClockWatch | None = None
    ) -> None:
        self.store = store
        self.connection = Connection(config)
        self.writer = Writer(config, store, self.connection, clock, clock_watch)
        # paho's network thread hands each message straight to the writer's inbox.
        self.connection.client.on_message = self.writer.on_message
        self.clock_watch = self.writer.clock_watch
        # The writer's hook lists (see `Writer`): appended to, never replaced.
        self.on_batch: list[BatchHook] = self.writer.on_batch
        self.on_readings: list[BatchHook] = self.writer.on_readings
        self._stopped = False

    @property
    def online_status(self) -> Callable[[], OnlineStatus]:
        """The retained `status` published at every (re)connect; the daemon supplies it."""
        return self.connection.online_status

    @online_status.setter
    def online_status(self, status: Callable[[], OnlineStatus]) -> None:
        self.connection.online_status = status

    @property
    def on_disk_full(self) -> Callable[[bool], None]:
        """Called in the writer thread when a batch starts or stops waiting for disk space, and
        before each retry with `full=True` so space can be freed."""
        return self.writer.on_disk_full

    @on_disk_full.setter
    def on_disk_full(self, hook: Callable[[bool], None]) -> None:
        self.writer.on_disk_full = hook

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()
        self.connection.start()

    def wait_subscribed(self, timeout: float) -> bool:
        """Block until connected with the subscriptions granted, so nothing published from now on is missed."""
        return self.connection.wait_subscribed(timeout)

    @property
    def connected(self) -> bool:
        """Connected with the subscriptions granted: readings published now reach us."""
        return self.connection.connected

    @property
    def broker_problem(self) -> str | None:
        """Why the broker is not reachable, in a few words ("TLS: certificate verify failed for
        <host>"); None while connected."""
        return self.connection.problem

    @property
    def alive(self) -> bool:
        """False once the writer thread has died (the daemon must then exit non-zero)."""
        return self.writer.alive

    def stop(self, timeout: float = 10.0) -> None:
        """Flush and acknowledge the pending batch, publish `offline` (retained), disconnect."""
        if self._stopped:
            return
        self._stopped = True
        self.connection.stopping()
        self.writer.stop(timeout)
        self.connection.stop(timeout)
        log.info("ingest stopped: %s", self.counters())

    def publish(self, topic_suffix: str, payload: Any, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish on `edge/<device.id>/<topic_suffix>`; dicts and lists are sent as JSON."""
        return self.connection.publish(topic_suffix, payload, qos=qos, retain=retain)

    def publish_topic(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Publish on `topic` itself (outside `edge/<device.id>/`); dicts and lists are sent as JSON."""
        return self.connection.publish_topic(topic, payload, qos=qos, retain=retain)

    def add_subscription(self, topic_filter: str, qos: int, callback: Callable[[mqtt.MQTTMessage], None]) -> None:
        """Subscribe to `topic_filter` at every connect with its own `callback(message)` (in paho's
        network thread); the writer never sees these messages (see `Connection.add_subscription`)."""
        self.connection.add_subscription(topic_filter, qos, callback)

    @property
    def on_connect(self) -> list[Callable[[], None]]:
        """Hooks called in paho's network thread after every (re)connect: appended to, never replaced."""
        return self.connection.on_connect

    # -- counters ----------------------------------------------------------------------------

    @property
    def disk_full(self) -> bool:
        """A batch is waiting for disk space (nothing is stored or acknowledged meanwhile)."""
        return self.writer.disk_full

    @property
    def backlog(self) -> int:
        """Messages received but not yet parsed and committed."""
        return self.writer.backlog

    def status(self) -> IngestStatus:
        """Its section of `status`: the counters."""
        return self.counters()

    def counters(self) -> IngestStatus:
        """received/rejected count messages (and rejected entries of `values` maps); readings,
        stored and duplicates count readings."""
        snapshot: IngestStatus = self.writer.stats()  # type: ignore[assignment]
        snapshot["connected"] = self.connected
        snapshot["broker"] = self.connection.broker_status()
        snapshot["disk_full"] = self.disk_full
        snapshot["clock"] = {**self.clock_watch.status(), "holding": self.store.held_rows}
        return snapshot
