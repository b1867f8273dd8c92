"""Ingest throughput: readings/s persisted by the ingestor vs a bare paho subscriber that only counts.

For QoS 0 and 1, single-reading and batched (`values` map) payloads: a publisher in its own
process sends as fast as it can; the same run measures the client ceiling (a paho subscriber
that counts messages and does nothing else) and the real path (parse, batch, commit to SQLite,
acknowledge). Both see the same publisher, broker, protocol (MQTT 5), QoS and receive maximum.
Each case runs `--repeats` ceiling/persisted pairs, alternating which goes first so a change in
machine load does not favour either side; the table holds medians (the ratio is the median of
the per-pair ratios) and the most readings lost in any repeat.

    python benchmarks/ingest.py [--messages 30000] [--channels 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_daemon.broker import LocalBroker
from edge_daemon.config import Config, parse_config
from edge_daemon.ingest import Ingestor
from edge_daemon.store import Reading, ReplayStore

PUBLISHER = r"""
import json, sys, time
import paho.mqtt.client as mqtt
port, qos, form, n, channels, base = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
names = [f"c{k:02d}" for k in range(channels)]
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{time.time_ns()}", protocol=mqtt.MQTTv311)
client.max_inflight_messages_set(1000)
client.max_queued_messages_set(0)
client.connect("127.0.0.1", port)
client.loop_start()
time.sleep(0.2)
last = None
for i in range(n):
    ts = round(base + i * 0.001, 3)
    if form == "single":
        last = client.publish(f"sensors/bench/{names[i % channels]}", json.dumps({"ts": ts, "value": i}), qos=qos)
    else:
        last = client.publish("sensors/bench", json.dumps({"ts": ts, "values": {name: i + k for k, name in enumerate(names)}}), qos=qos)
last.wait_for_publish(120)
time.sleep(0.5)
client.disconnect()
client.loop_stop()
"""


def start_publisher(port: int, qos: int, form: str, n: int, channels: int, base: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", PUBLISHER, str(port), str(qos), form, str(n), str(channels), str(base)])


class Meter:
    """Counts arrivals and notes the time of the first and of the one that completes `target`.

    The rate leaves out what the first arrival brought: its readings were received before the
    clock started. (The persisted path reports per committed batch, so counting the first batch
    would credit it with up to a whole batch received in no measured time.)
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.first_count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()

    def add(self, k: int) -> None:
        with self.lock:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
                self.first_count = k
            self.count += k
            self.last = now
            if self.count >= self.target:
                self.done.set()

    def wait(self, publisher: subprocess.Popen[bytes], idle_s: float = 5.0, limit_s: float = 300.0) -> None:
        """Until every reading arrived, or nothing arrived for idle_s after the publisher ended."""
        deadline = time.monotonic() + limit_s
        while not self.done.wait(0.2) and time.monotonic() < deadline:
            if publisher.poll() is not None and self.last is not None and time.perf_counter() - self.last > idle_s:
                break

    def rate(self) -> float:
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return (self.count - self.first_count) / (self.last - self.first)


def ceiling(broker: LocalBroker, qos: int, form: str, n: int, channels: int, receive_maximum: int) -> tuple[float, int]:
    """Readings/s a bare paho subscriber receives (it only counts), and readings lost."""
    per_message = 1 if form == "single" else channels
    meter = Meter(n * per_message)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-ceiling-{time.time_ns()}", protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: meter.add(per_message)
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = receive_maximum  # the same window the ingestor announces
    client.connect(broker.host, broker.port, properties=props)
    client.subscribe("sensors/#", qos=qos)
    client.loop_start()
    time.sleep(0.3)
    publisher = start_publisher(broker.port, qos, form, n, channels, time.time() - 3600)
    meter.wait(publisher)
    publisher.wait()
    client.disconnect()
    client.loop_stop()
    return meter.rate(), n * per_message - meter.count


def drop_session(broker: LocalBroker, client_id: str) -> None:
    """End the ingestor's persistent session, so the broker does not go on queueing every later
    QoS 1 message for it (which would slow every later run, ceiling and persisted alike)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port, clean_start=True)  # session expiry 0: gone at disconnect
    client.loop_start()
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()


def bench_config(port: int, qos: int, channels: int, state: Path, batch_size: int | None) -> Config:
    store = {} if batch_size is None else {"batch_size": batch_size}
    return parse_config({
        "device": {"id": f"bench-{time.time_ns()}", "state_dir": str(state), "socket": str(state / "control.sock")},
        "mqtt": {"port": port, "qos": qos},
        "channels": {"names": [f"bench/c{k:02d}" for k in range(channels)]},
        "store": store,
    })  # fmt: skip


def persisted(
    broker: LocalBroker, qos: int, form: str, n: int, channels: int, workdir: Path, batch_size: int | None = None
) -> tuple[float, int]:
    """Readings/s the ingestor commits to the store (and acknowledges), and readings lost."""
    per_message = 1 if form == "single" else channels
    state = Path(tempfile.mkdtemp(dir=workdir))
    config = bench_config(broker.port, qos, channels, state, batch_size)
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    meter = Meter(n * per_message)
    ingestor = Ingestor(config, store)

    def count(readings: Sequence[Reading]) -> None:
        meter.add(len(readings))

    ingestor.on_batch.append(count)
    ingestor.start()
    ingestor.wait_subscribed(10)
    time.sleep(0.3)
    publisher = start_publisher(broker.port, qos, form, n, channels, time.time() - 3600)
    meter.wait(publisher)
    publisher.wait()
    ingestor.stop()
    stored = store.count()
    store.close()
    drop_session(broker, config.mqtt.client_id or f"edge-daemon-{config.device.id}")
    return meter.rate(), n * per_message - stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=30000, help="messages per single-reading run")
    parser.add_argument("--batched-messages", type=int, default=10000, help="messages per batched run")
    parser.add_argument("--channels", type=int, default=16, help="channels (entries per values map)")
    parser.add_argument("--repeats", type=int, default=3, help="ceiling/persisted pairs per case (medians reported)")
    parser.add_argument("--batch-size", type=int, default=None, help="store.batch_size (default: the config default)")
    parser.add_argument("--only", choices=["single", "batched"], default=None, help="run one payload form only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    defaults = bench_config(1883, 1, args.channels, Path(tempfile.gettempdir()), args.batch_size)
    receive_maximum = defaults.mqtt.receive_maximum
    sizes = {"single": args.messages, "batched": args.batched_messages}
    forms = [(form, n) for form, n in sizes.items() if args.only in (None, form)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        for form, n in forms:
            for qos in (0, 1):
                ceil_rates: list[float] = []
                rates: list[float] = []
                ratios: list[float] = []
                ceil_lost = lost = 0
                for rep in range(args.repeats):
                    # Alternate which side runs first, so drifting load does not favour either.
                    if rep % 2:
                        rate, p_lost = persisted(broker, qos, form, n, args.channels, Path(tmp), args.batch_size)
                        ceil_rate, c_lost = ceiling(broker, qos, form, n, args.channels, receive_maximum)
                    else:
                        ceil_rate, c_lost = ceiling(broker, qos, form, n, args.channels, receive_maximum)
                        rate, p_lost = persisted(broker, qos, form, n, args.channels, Path(tmp), args.batch_size)
                    ceil_rates.append(ceil_rate)
                    rates.append(rate)
                    ratios.append(rate / ceil_rate if ceil_rate else float("nan"))
                    ceil_lost, lost = max(ceil_lost, c_lost), max(lost, p_lost)
                    print(
                        f"  {form} qos{qos} #{rep + 1}: ceiling {ceil_rate:,.0f}/s, persisted {rate:,.0f}/s,"
                        f" ratio {ratios[-1]:.2f}, lost {p_lost}", file=sys.stderr, flush=True,
                    )  # fmt: skip
                median = statistics.median
                rows.append((form, qos, n, median(ceil_rates), ceil_lost, median(rates), median(ratios), lost))
        kind = broker.kind

    print(
        f"\nbroker: {kind}; {args.channels} channels; MQTT 5 subscribers, receive maximum {receive_maximum};"
        f" store.batch_size {defaults.store.batch_size}, synchronous {defaults.store.synchronous};"
        f" medians of {args.repeats} runs\n"
    )
    print("| payload | QoS | messages | bare subscriber (readings/s) | persisted (readings/s) | ratio | lost |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for form, qos, n, ceil_rate, ceil_lost, rate, ratio, lost in rows:
        label = "single reading" if form == "single" else f"values map ({args.channels} readings)"
        lost_text = f"{lost}" + (f" (bare: {ceil_lost})" if ceil_lost else "")
        print(f"| {label} | {qos} | {n:,} | {ceil_rate:,.0f} | {rate:,.0f} | {ratio:.2f}x | {lost_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
