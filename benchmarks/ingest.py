"""Ingest throughput: readings/s persisted by the ingestor vs a bare paho subscriber that only counts.

For QoS 0 and 1, single-reading and batched (`values` map) payloads: a publisher in its own
process sends as fast as it can; the same run measures the client ceiling (a paho subscriber
that counts messages and does nothing else) and the real path (parse, batch, commit to SQLite,
acknowledge). Both see the same publisher, broker, protocol (MQTT 5), QoS and receive maximum.
Each case runs `--repeats` ceiling/persisted pairs, alternating which goes first so a change in
machine load does not favour either side; the table holds medians (the ratio is the median of
the per-pair ratios) and the most readings lost in any repeat.

    python benchmarks/ingest.py [--messages 30000] [--channels 16] [--repeats 3]

`--wear` measures instead what storing costs an SD card: the real daemon
(`python -m edge_daemon run`, no model, so nothing but ingestion and
retention) receives single-reading QoS 1 messages at 1, 10 and 100 readings/s;
the bytes it made the kernel write to storage (`write_bytes` in
/proc/<pid>/io: commits to the WAL, its checkpoints into store.db, retention)
are divided by the readings stored. Each rate runs with the current defaults
and with the earlier `[store] flush_interval_s` of 0.2 s, side by side.

    python benchmarks/ingest.py --wear [--wear-seconds 150]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support, run from a checkout

from edge_daemon.broker import LocalBroker  # noqa: E402
from edge_daemon.config import Config, parse_config  # noqa: E402
from edge_daemon.mqtt.ingestor import Ingestor  # noqa: E402
from edge_daemon.store import Reading, ReplayStore  # noqa: E402

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


WEAR_PUBLISHER = r"""
import json, sys, time
import paho.mqtt.client as mqtt
port, rate, seconds, channels = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"wear-pub-{time.time_ns()}", protocol=mqtt.MQTTv311)
client.connect("127.0.0.1", port)
client.loop_start()
t0 = time.time()
n = int(rate * seconds)
last = None
for i in range(n):
    due = t0 + i / rate
    time.sleep(max(0.0, due - time.time()))
    last = client.publish(f"sensors/bench/c{i % channels:02d}", json.dumps({"ts": round(due, 3), "value": i}), qos=1)
last.wait_for_publish(60)
client.disconnect()
client.loop_stop()
print(n)
"""
# A retention run (which checkpoints the WAL into store.db) every this many seconds in the wear
# runs, and the idle wait after the last reading: the bytes of every checkpoint are counted.
WEAR_RETENTION_S = 30.0


def _write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as handle:
        for line in handle:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")


def wear_run(rate: float, seconds: float, store: dict[str, object], workdir: Path) -> dict[str, float]:
    """One daemon, one rate: bytes written to storage per stored reading."""
    from edge_daemon.control.client import request
    from tests.support import config_toml, daemon_status, wait_for

    channels = max(1, min(10, int(rate)))
    state = Path(tempfile.mkdtemp(dir=workdir))
    with LocalBroker(workdir=state) as broker:
        sections = {
            "device": {"id": f"wear-{time.time_ns()}", "state_dir": str(state / "state"), "socket": str(state / "control.sock")},
            "mqtt": {"port": broker.port, "qos": 1},
            "channels": {"names": [f"bench/c{k:02d}" for k in range(channels)], "period_s": 1.0},
            "store": {"retention_interval_s": WEAR_RETENTION_S, **store},
            # Nothing but ingestion: no base model is trained from the store, no update asked for.
            "model": {"bootstrap_min_windows": 10**9},
            "train": {"start_on": ["request"]},
        }
        (state / "config.toml").write_text(config_toml(sections))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon", "run", "--config", str(state / "config.toml")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        socket_path = state / "control.sock"
        try:
            wait_for(lambda: (daemon_status(socket_path) or {}).get("ingest", {}).get("connected"), 120, "the daemon subscribed")
            before = _write_bytes(daemon.pid)
            publisher = subprocess.run(
                [sys.executable, "-c", WEAR_PUBLISHER, str(broker.port), str(rate), str(seconds), str(channels)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            sent = int(publisher.stdout.strip())
            wait_for(lambda: request(socket_path, {"cmd": "status"})["store"]["readings"] >= sent, 120, "every reading stored")
            time.sleep(WEAR_RETENTION_S + 5)  # the last checkpoint of what came in
            written = _write_bytes(daemon.pid) - before
            stored = request(socket_path, {"cmd": "status"})["store"]["readings"]
        finally:
            daemon.terminate()
            daemon.wait(60)
    return {"rate": rate, "readings": stored, "bytes": written, "per_reading": written / max(1, stored)}


def wear(seconds: float, flushes: Sequence[float] = (0.2,)) -> None:
    variants = [("defaults", {})] + [
        (f"flush_interval_s = {flush:g}" + (" (before)" if flush == 0.2 else ""), {"flush_interval_s": flush}) for flush in flushes
    ]
    defaults = parse_config({"device": {"id": "x"}, "mqtt": {}, "channels": {"names": ["a/b"]}}).store
    results: dict[tuple[str, float], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        threads = []
        for label, store in variants:
            for rate in (1.0, 10.0, 100.0):
                def run(label: str = label, store: dict[str, object] = store, rate: float = rate) -> None:
                    results[(label, rate)] = wear_run(rate, seconds, store, Path(tmp))
                threads.append(threading.Thread(target=run))
        for thread in threads:  # one daemon each: their I/O counters are their own
            thread.start()
        for thread in threads:
            thread.join()
    year = 365 * 24 * 3600
    print(
        f"\n{seconds:.0f} s per run; store defaults: flush_interval_s {defaults.flush_interval_s}, batch_size "
        f"{defaults.batch_size}, synchronous {defaults.synchronous}; retention every {WEAR_RETENTION_S:.0f} s\n"
    )
    print("| store settings | readings/s | readings stored | bytes written | bytes per reading | a year at this rate |")
    print("| --- | --: | --: | --: | --: | --: |")
    for label, _store in variants:
        for rate in (1.0, 10.0, 100.0):
            r = results[(label, rate)]
            print(
                f"| {label} | {rate:g} | {r['readings']:,.0f} | {r['bytes']:,.0f} | {r['per_reading']:,.0f} "
                f"| {r['per_reading'] * rate * year / 1e9:,.1f} GB |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=30000, help="messages per single-reading run")
    parser.add_argument("--batched-messages", type=int, default=10000, help="messages per batched run")
    parser.add_argument("--channels", type=int, default=16, help="channels (entries per values map)")
    parser.add_argument("--repeats", type=int, default=3, help="ceiling/persisted pairs per case (medians reported)")
    parser.add_argument("--batch-size", type=int, default=None, help="store.batch_size (default: the config default)")
    parser.add_argument("--only", choices=["single", "batched"], default=None, help="run one payload form only")
    parser.add_argument("--wear", action="store_true", help="bytes written to storage per stored reading instead")
    parser.add_argument("--wear-seconds", type=float, default=150.0, help="seconds of readings per wear run")
    parser.add_argument("--wear-flush", type=float, action="append", default=None, help="also run with this flush_interval_s (repeatable; default 0.2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.wear:
        wear(args.wear_seconds, args.wear_flush or (0.2,))
        return 0
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
