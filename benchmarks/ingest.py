"""Ingest throughput: readings/s persisted by the ingestor vs a bare paho subscriber that only counts.

For QoS 0 and 1 and each payload form: a publisher in its own process sends as fast as it can;
the same run measures the client ceiling (a paho subscriber that counts readings and does nothing
else) and the real path (parse, batch, commit to SQLite, acknowledge). Both see the same
publisher, broker, topics, protocol (MQTT 5), QoS and receive maximum. Each case runs `--repeats`
rounds of one measurement per side, rotating which side goes first so a change in machine load
does not favour any; the table holds medians (each ratio is the median of the per-round ratios
persisted / bare) and the most readings lost in any round.

Payload forms: the native grammar (`single`: one reading per message on
`sensors/bench/<channel>`; `batched`: a `values` map of every channel on `sensors/bench`), and
each `[[inputs]]` format shaped the way its project publishes:

- `zigbee2mqtt`: `zigbee2mqtt/bench`, a flat state object of the channels' fields plus
  `linkquality` (not a channel) and `last_seen` in epoch ms, 1 ms later per message;
- `tasmota`: `tele/bench/SENSOR`, `{"Time": <local time without zone>, "ANALOG": {"A0": ..},
  "TempUnit": "C"}`; `Time` has 1 s resolution, so it steps 1 s per message (from a base a few
  hours back) or readings of a channel in the same second would be duplicates;
- `esphome`: `bench/sensor/<channel>/state`, a bare number, stamped on arrival;
- `shelly`: `bench/status/switch:<k>`, a switch's status (apower, voltage, current and
  aenergy.total are channels; id, output, aenergy.by_minute, temperature ... are not), on arrival;
- `json`: `json/bench/data` read by a `json` mapping with value paths and a `ts` path (unix s).

Fields that are not configured channels are ignored by the ingestor and are not counted as
readings on either side.

Every measurement runs in a child process (a small script below, not this module): the bare
subscriber, and the ingestor of this tree or, with `--checkout PATH`, of another checkout, run
with `PYTHONPATH` and the working directory set to that tree and this interpreter. The native
forms then get one persisted column per checkout, measured in the same rounds (other formats run
for this tree only, as an older revision need not read them).

    python benchmarks/ingest.py [--messages 30000] [--channels 16] [--repeats 3]
    python benchmarks/ingest.py --checkout ../old-main   # native before/after in the same run
    python benchmarks/ingest.py --only tasmota --only shelly
    python benchmarks/ingest.py --parse --checkout ../old-main  # CPU per native message, parse only

`--wear` measures instead what storing costs an SD card: the real daemon
(`python -m edge_daemon run`, no model, so nothing but ingestion and
retention) receives single-reading QoS 1 messages at 1, 10 and 100 readings/s;
the bytes it made the kernel write to storage from the first reading until it
exited after a SIGTERM (`write_bytes` in /proc/<pid>/io at the start, its
rusage at the end: commits to the WAL, checkpoints into store.db, retention,
the checkpoint at the stop) are divided by the readings stored. Each rate runs with the current defaults,
with each `--wear-flush` as `[store] flush_interval_s` (default: 5 s, the
earlier default) and with the daemon of each `--checkout` (its own defaults),
all side by side in the same run.

    python benchmarks/ingest.py --wear [--wear-seconds 150] [--wear-flush 5] [--checkout ../old-main]

`--scrape` measures instead what the Prometheus endpoint (`[metrics] listen`) costs: the real
daemon, with a store of `--scrape-hours` hours of readings on `--channels` channels, scraped
`--scrapes` times back to back over HTTP; per scrape, the wall time the client waits, the daemon's
CPU (utime + stime from /proc, less what it spends idle over the same time) and the bytes served.
Beside it the same daemon without `[metrics]`: its idle CPU per second, to compare with the idle
CPU of the one that serves metrics.

    python benchmarks/ingest.py --scrape [--scrapes 200] [--channels 16]

`--tls` measures what TLS costs ingestion: the ingestor of this tree, QoS 1, the native `single`
and `batched` forms, once over plaintext and once over TLS (a client certificate required, a
CA and certificates made by openssl for the run), alternating in each round. One mosquitto
serves both: the same config, a plaintext listener and a TLS one; the publisher sends on the
plaintext one in both cases, so only the ingestor's link differs.

    python benchmarks/ingest.py --tls [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support, run from a checkout

from edge_daemon.broker import LocalBroker  # noqa: E402
from edge_daemon.config import parse_config  # noqa: E402

NATIVE = ("single", "batched")
FORMS = (*NATIVE, "zigbee2mqtt", "tasmota", "esphome", "shelly", "json")
# The zone of the Tasmota device's clock (no daylight saving: no hour repeats in its local time).
TASMOTA_ZONE = "Asia/Kolkata"
# The fields of a Shelly switch status taken as channels (the rest of the status is ignored).
SHELLY_FIELDS = ("apower", "voltage", "current", "aenergy.total")

PUBLISHER = r"""
import json, sys, time
from datetime import datetime
from zoneinfo import ZoneInfo
import paho.mqtt.client as mqtt
port, qos, form, n, channels, base = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
zone = ZoneInfo(sys.argv[7])
names = [f"c{k:02d}" for k in range(channels)]
switches = max(1, channels // 4)


def message(i):
    ts = round(base + i * 0.001, 3)
    if form == "single":
        return f"sensors/bench/{names[i % channels]}", json.dumps({"ts": ts, "value": i})
    if form == "batched":
        return "sensors/bench", json.dumps({"ts": ts, "values": {name: i + k for k, name in enumerate(names)}})
    if form == "zigbee2mqtt":
        doc = {name: round(20 + 0.01 * ((i + k) % 500), 2) for k, name in enumerate(names)}
        doc["linkquality"] = 60 + i % 195
        doc["last_seen"] = int(base * 1000) + i  # epoch ms, 1 ms later per message
        return "zigbee2mqtt/bench", json.dumps(doc)
    if form == "tasmota":
        local = datetime.fromtimestamp(int(base) + i, zone).replace(tzinfo=None)  # 1 s per message
        doc = {"Time": local.isoformat(), "ANALOG": {f"A{k}": (i + 37 * k) % 4096 for k in range(channels)}, "TempUnit": "C"}
        return "tele/bench/SENSOR", json.dumps(doc)
    if form == "esphome":
        return f"bench/sensor/{names[i % channels]}/state", f"{20 + 0.01 * (i % 500):.2f}"
    if form == "shelly":
        k = i % switches
        power = round(50 + (i % 200) * 0.5, 1)
        doc = {
            "id": k, "source": "timer", "output": True, "apower": power, "voltage": round(229 + (i % 20) * 0.1, 1),
            "current": round(power / 230, 3), "aenergy": {"total": round(1000 + i * 0.01, 3), "by_minute": [45.199, 47.141, 88.397], "minute_ts": int(base) + i // 60},
            "temperature": {"tC": 41.2, "tF": 106.2},
        }
        return f"bench/status/switch:{k}", json.dumps(doc)
    if form == "json":
        doc = {"meta": {"time": ts, "seq": i}, "data": {name: round(i * 0.1 + k, 1) for k, name in enumerate(names)}, "rssi": -60 - i % 20}
        return "json/bench/data", json.dumps(doc)
    raise SystemExit(f"unknown form {form}")


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{time.time_ns()}", protocol=mqtt.MQTTv311)
client.max_inflight_messages_set(1000)
client.max_queued_messages_set(0)
client.connect("127.0.0.1", port)
client.loop_start()
time.sleep(0.2)
last = None
for i in range(n):
    topic, payload = message(i)
    last = client.publish(topic, payload, qos=qos)
last.wait_for_publish(120)
time.sleep(0.5)
client.disconnect()
client.loop_stop()
"""

# One measurement, in a process of its own started with the measured tree on PYTHONPATH: the bare
# subscriber ("ceiling") or the ingestor ("persisted"), each starting the publisher once it
# listens. It does not import the benchmark module (whose sys.path.insert would put this tree
# first), and uses only what every measured revision has: parse_config, ReplayStore, Ingestor
# (start, wait_subscribed, on_batch, stop) and store.count.
CHILD = r"""
import json, logging, subprocess, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Meter:
    # Counts arrivals and notes the time of each. The rate runs from the first arrival to the one
    # before the last, and leaves out what the first brought: its readings were received before
    # the clock started. (The persisted path reports per committed batch, so counting the first
    # batch would credit it with up to a whole batch received in no measured time.) The last is
    # left out because the persisted path commits a final partial batch only once its
    # flush_interval_s has run out: an idle wait of up to that long, not throughput.

    def __init__(self, target):
        self.target = target
        self.count = 0
        self.first_count = 0
        self.first = None
        self.last = None
        self.before_last = None  # (count, time) as of the arrival before the last
        self.done = threading.Event()
        self.lock = threading.Lock()

    def add(self, k):
        with self.lock:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
                self.first_count = k
            else:
                self.before_last = (self.count, self.last)
            self.count += k
            self.last = now
            if self.count >= self.target:
                self.done.set()

    def wait(self, publisher, idle_s=5.0, limit_s=300.0):
        # Until every reading arrived, or nothing arrived for idle_s after the publisher ended.
        deadline = time.monotonic() + limit_s
        while not self.done.wait(0.2) and time.monotonic() < deadline:
            if publisher.poll() is not None and self.last is not None and time.perf_counter() - self.last > idle_s:
                break

    def rate(self):
        if self.before_last is None or self.before_last[1] <= self.first:
            return 0.0
        count, at = self.before_last
        return (count - self.first_count) / (at - self.first)


def drop_session(spec, client_id):
    # End the ingestor's persistent session, so the broker does not go on queueing every later
    # QoS 1 message for it (which would slow every later run, ceiling and persisted alike).
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect(spec["host"], spec["port"], clean_start=True)  # session expiry 0: gone at disconnect
    client.loop_start()
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()


def ceiling(spec, meter):
    per_message = spec["per_message"]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-ceiling-{time.time_ns()}", protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: meter.add(per_message)
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = spec["receive_maximum"]  # the same window the ingestor announces
    client.connect(spec["host"], spec["port"], properties=props)
    client.subscribe([(topic, spec["qos"]) for topic in spec["topics"]])
    client.loop_start()
    time.sleep(0.3)
    publisher = subprocess.Popen(spec["publisher"])
    meter.wait(publisher)
    publisher.wait()
    client.disconnect()
    client.loop_stop()
    return {"rate": meter.rate(), "lost": meter.target - meter.count}


def persisted(spec, meter):
    import edge_daemon
    from edge_daemon.config import parse_config
    from edge_daemon.mqtt.ingestor import Ingestor
    from edge_daemon.store import ReplayStore

    config = parse_config(spec["config"])
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    ingestor = Ingestor(config, store)
    ingestor.on_batch.append(lambda readings: meter.add(len(readings)))
    ingestor.start()
    ingestor.wait_subscribed(10)
    time.sleep(0.3)
    publisher = subprocess.Popen(spec["publisher"])
    meter.wait(publisher)
    publisher.wait()
    ingestor.stop()
    stored = store.count()
    store.close()
    drop_session(spec, config.mqtt.client_id or f"edge-daemon-{config.device.id}")
    return {"rate": meter.rate(), "lost": meter.target - stored, "package": edge_daemon.__file__}


logging.basicConfig(level=logging.WARNING)
spec = json.loads(sys.argv[1])
meter = Meter(spec["readings"])
result = (ceiling if spec["kind"] == "ceiling" else persisted)(spec, meter)
print(json.dumps(result), flush=True)
"""


def form_setup(form: str, channels: int) -> tuple[list[dict[str, Any]], list[str], int]:
    """The `[[inputs]]` mappings, the channel names and the readings per message of a payload form."""
    plain = [f"bench/c{k:02d}" for k in range(channels)]
    if form == "single":
        return [], plain, 1
    if form == "batched":
        return [], plain, channels
    if form == "zigbee2mqtt":
        return [{"topic": "zigbee2mqtt/#", "format": "zigbee2mqtt"}], plain, channels
    if form == "tasmota":
        names = [f"bench/ANALOG.A{k}" for k in range(channels)]
        return [{"topic": "tele/#", "format": "tasmota", "timezone": TASMOTA_ZONE}], names, channels
    if form == "esphome":
        return [{"topic": "bench/#", "format": "esphome"}], plain, 1
    if form == "shelly":
        names = [f"bench/switch:{k}.{field}" for k in range(max(1, channels // 4)) for field in SHELLY_FIELDS]
        return [{"topic": "bench/#", "format": "shelly"}], names, len(SHELLY_FIELDS)
    if form == "json":
        values = {f"c{k:02d}": f"$.data.c{k:02d}" for k in range(channels)}
        mapping = {"topic": "json/+/data", "format": "json", "sensor": "{1}", "values": values, "ts": "$.meta.time", "ts_unit": "s"}
        return [mapping], plain, channels
    raise ValueError(form)


def bench_sections(form: str, port: int, qos: int, channels: int, state: Path, batch_size: int | None) -> dict[str, Any]:
    """The ingestor's config; the native forms leave out `inputs`, which older revisions do not know."""
    inputs, names, _ = form_setup(form, channels)
    sections: dict[str, Any] = {
        "device": {"id": f"bench-{time.time_ns()}", "state_dir": str(state), "socket": str(state / "control.sock")},
        "mqtt": {"port": port, "qos": qos},
        "channels": {"names": names},
        "store": {} if batch_size is None else {"batch_size": batch_size},
    }
    if inputs:
        sections["inputs"] = inputs
    return sections


def publisher_base(form: str, n: int) -> float:
    """Time of the first message: an hour back; for Tasmota (1 s per message) far enough back
    that the last one is still in the past."""
    if form == "tasmota":
        return float(int(time.time()) - max(3 * 3600, n + 600))
    return time.time() - 3600


def _revision(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(checkout)


def measure(checkout: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a child process with `checkout` first on its path and as its cwd."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], cwd=checkout, env=dict(os.environ, PYTHONPATH=str(checkout)),
        stdout=subprocess.PIPE, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['kind']} measurement in {checkout} failed ({proc.returncode}): {proc.stdout[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    package = result.get("package")
    if package is not None and not Path(package).resolve().is_relative_to(checkout):
        raise RuntimeError(f"the child meant for {checkout} imported edge_daemon from {package}")
    return result


def run_case(
    broker: LocalBroker, form: str, qos: int, n: int, args: argparse.Namespace, trees: list[tuple[str, Path]],
    receive_maximum: int, workdir: Path,
) -> dict[str, Any]:
    """`args.repeats` rounds of the bare subscriber and each tree's ingestor, in rotating order."""
    _, _, per_message = form_setup(form, args.channels)
    topics = parse_config(bench_sections(form, broker.port, qos, args.channels, workdir, None)).subscriptions
    sides: list[tuple[str, Path | None]] = [("bare", None), *trees]
    rates: dict[str, list[float]] = {label: [] for label, _ in sides}
    ratios: dict[str, list[float]] = {label: [] for label, _ in trees}
    lost = dict.fromkeys(rates, 0)
    for rep in range(args.repeats):
        order = sides[rep % len(sides):] + sides[:rep % len(sides)]  # each side goes first in turn
        got: dict[str, dict[str, Any]] = {}
        for label, checkout in order:
            spec: dict[str, Any] = {
                "kind": "ceiling" if checkout is None else "persisted", "host": broker.host, "port": broker.port, "qos": qos,
                "readings": n * per_message, "per_message": per_message, "topics": topics, "receive_maximum": receive_maximum,
                "publisher": [
                    sys.executable, "-c", PUBLISHER, str(broker.port), str(qos), form, str(n), str(args.channels),
                    repr(publisher_base(form, n)), TASMOTA_ZONE,
                ],
            }  # fmt: skip
            if checkout is not None:
                state = Path(tempfile.mkdtemp(dir=workdir))
                spec["config"] = bench_sections(form, broker.port, qos, args.channels, state, args.batch_size)
            got[label] = measure(checkout or ROOT, spec)
        bare = got["bare"]["rate"]
        for label, _ in sides:
            rates[label].append(got[label]["rate"])
            lost[label] = max(lost[label], got[label]["lost"])
            if label in ratios:
                ratios[label].append(got[label]["rate"] / bare if bare else float("nan"))
        text = ", ".join(
            f"{label} {got[label]['rate']:,.0f}/s" + (f" ({ratios[label][-1]:.2f})" if label in ratios else "") + f" lost {got[label]['lost']}"
            for label, _ in sides
        )
        print(f"  {form} qos{qos} #{rep + 1} [{' '.join(label for label, _ in order)}]: {text}", file=sys.stderr, flush=True)
    median = statistics.median
    return {
        "form": form, "qos": qos, "n": n, "per_message": per_message,
        "rates": {label: median(values) for label, values in rates.items()},
        "ratios": {label: median(values) for label, values in ratios.items()},
        "lost": lost,
    }  # fmt: skip


FORM_LABELS = {
    "single": "native, single reading",
    "batched": "native, values map",
    "zigbee2mqtt": "zigbee2mqtt state object",
    "tasmota": "tasmota tele SENSOR",
    "esphome": "esphome sensor state",
    "shelly": "shelly switch status",
    "json": "json mapping",
}


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


def _write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as handle:
        for line in handle:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")


def wear_run(rate: float, seconds: float, store: dict[str, object], workdir: Path, tree: Path = ROOT) -> dict[str, float]:
    """One daemon (of the checkout `tree`), one rate: bytes written to storage per stored reading."""
    from edge_daemon.control.client import request
    from tests.support import config_toml, daemon_status, wait_for

    channels = max(1, min(10, int(rate)))
    state = Path(tempfile.mkdtemp(dir=workdir))
    with LocalBroker(workdir=state) as broker:
        sections = {
            "device": {"id": f"wear-{time.time_ns()}", "state_dir": str(state / "state"), "socket": str(state / "control.sock")},
            "mqtt": {"port": broker.port, "qos": 1},
            "channels": {"names": [f"bench/c{k:02d}" for k in range(channels)], "period_s": 1.0},
            "store": store,
            # Nothing but ingestion: no base model is trained from the store, no update asked for.
            "model": {"bootstrap_min_windows": 10**9},
            "train": {"start_on": ["request"]},
        }
        (state / "config.toml").write_text(config_toml(sections))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon", "run", "--config", str(state / "config.toml")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
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
            stored = request(socket_path, {"cmd": "status"})["store"]["readings"]
            # Stopped, the daemon checkpoints its WAL into store.db: what it wrote until it
            # exited, that last checkpoint included, is in its rusage (ru_oublock counts the
            # same bytes as write_bytes, in 512-byte blocks).
            daemon.terminate()
            _, _, usage = os.wait4(daemon.pid, 0)
            written = usage.ru_oublock * 512 - before
        finally:
            if daemon.poll() is None:
                daemon.terminate()
                daemon.wait(60)
    return {"rate": rate, "readings": stored, "bytes": written, "per_reading": written / max(1, stored)}


def wear(seconds: float, flushes: Sequence[float] = (5.0,), checkouts: Sequence[Path] = ()) -> None:
    variants: list[tuple[str, dict[str, object], Path]] = [(f"{_revision(ROOT)}: defaults", {}, ROOT)]
    variants += [(f"{_revision(ROOT)}: flush_interval_s = {flush:g}", {"flush_interval_s": flush}, ROOT) for flush in flushes]
    variants += [(f"{_revision(c)}: its defaults", {}, c.resolve()) for c in checkouts]
    defaults = parse_config({"device": {"id": "x"}, "mqtt": {}, "channels": {"names": ["a/b"]}}).store
    results: dict[tuple[str, float], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        threads = []
        for label, store, tree in variants:
            for rate in (1.0, 10.0, 100.0):
                def run(label: str = label, store: dict[str, object] = store, rate: float = rate, tree: Path = tree) -> None:
                    results[(label, rate)] = wear_run(rate, seconds, store, Path(tmp), tree)
                threads.append(threading.Thread(target=run))
        for thread in threads:  # one daemon each: their I/O counters are their own
            thread.start()
        for thread in threads:
            thread.join()
    year = 365 * 24 * 3600
    print(
        f"\n{seconds:.0f} s per run; store defaults: flush_interval_s {defaults.flush_interval_s}, batch_size "
        f"{defaults.batch_size}, synchronous {defaults.synchronous}, retention every {defaults.retention_interval_s:g} s; "
        "bytes until the daemon exited (its last checkpoint included)\n"
    )
    print("| store settings | readings/s | readings stored | bytes written | bytes per reading | a year at this rate |")
    print("| --- | --: | --: | --: | --: | --: |")
    for label, _store, _tree in variants:
        for rate in (1.0, 10.0, 100.0):
            r = results[(label, rate)]
            print(
                f"| {label} | {rate:g} | {r['readings']:,.0f} | {r['bytes']:,.0f} | {r['per_reading']:,.0f} "
                f"| {r['per_reading'] * rate * year / 1e9:,.1f} GB |"
            )


def _cpu_s(pid: int) -> float:
    """CPU seconds the process has used (utime + stime of all its threads; not its children)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_daemon(state: Path, port: int, channels: int, hours: float, metrics_port: int | None) -> subprocess.Popen[bytes]:
    """The daemon on a store of `hours` of readings (no model: nothing trains), with [metrics] on `metrics_port` if given."""
    from edge_daemon.store import Reading, ReplayStore
    from tests.support import config_toml

    names = [f"bench/c{k:02d}" for k in range(channels)]
    sections: dict[str, dict[str, Any]] = {
        "device": {"id": f"scrape-{time.time_ns()}", "state_dir": str(state / "state"), "socket": str(state / "control.sock")},
        "mqtt": {"port": port, "qos": 1},
        "channels": {"names": names, "period_s": 1.0},
        "model": {"bootstrap_min_windows": 10**9},
        "train": {"start_on": ["request"]},
    }
    if metrics_port is not None:
        sections["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    (state / "config.toml").write_text(config_toml(sections))
    cfg = parse_config(sections)
    steps = int(hours * 3600)
    start = float(int(time.time()) - steps - 5)
    with ReplayStore(cfg.store_path, cfg.store, names) as store:
        batch: list[Reading] = []
        for step in range(steps):
            batch += [Reading(name, start + step, 20.0 + k + (step % 60) / 60) for k, name in enumerate(names)]
            if len(batch) >= 50_000:
                store.write(batch)
                batch = []
        store.write(batch)
    return subprocess.Popen(
        [sys.executable, "-m", "edge_daemon", "run", "--config", str(state / "config.toml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip


def _idle_cpu_per_s(pid: int, seconds: float) -> float:
    before, started = _cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_s(pid) - before) / (time.monotonic() - started)


def scrape_costs(scrapes: int, channels: int, hours: float, idle_s: float = 20.0) -> None:
    """The metrics endpoint's cost per scrape, and the idle CPU of the daemon with and without it."""
    import urllib.request

    from tests.support import daemon_status, wait_for

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, LocalBroker(workdir=Path(tmp)) as broker:
        for label in ("without [metrics]", "with [metrics]"):
            state = Path(tempfile.mkdtemp(dir=tmp))
            metrics_port = None
            if label == "with [metrics]":
                import socket

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    metrics_port = int(sock.getsockname()[1])
            daemon = scrape_daemon(state, broker.port, channels, hours, metrics_port)
            try:
                wait_for(lambda: (daemon_status(state / "control.sock") or {}).get("ingest", {}).get("connected"), 120, "the daemon subscribed")
                time.sleep(5.0)  # start-up's own work (the first retention run, warm-up) settles
                row = {"idle_cpu_ms_per_s": _idle_cpu_per_s(daemon.pid, idle_s) * 1e3}
                if metrics_port is not None:
                    url = f"http://127.0.0.1:{metrics_port}/metrics"
                    urllib.request.urlopen(url, timeout=10).read()  # the first scrape builds what later ones reuse
                    walls, size = [], 0
                    cpu_before, started = _cpu_s(daemon.pid), time.monotonic()
                    for _ in range(scrapes):
                        t0 = time.perf_counter()
                        with urllib.request.urlopen(url, timeout=10) as response:
                            size = len(response.read())
                        walls.append(time.perf_counter() - t0)
                    elapsed = time.monotonic() - started
                    cpu = _cpu_s(daemon.pid) - cpu_before - row["idle_cpu_ms_per_s"] / 1e3 * elapsed
                    walls.sort()
                    row |= {
                        "wall_ms_median": walls[len(walls) // 2] * 1e3, "wall_ms_p95": walls[int(len(walls) * 0.95)] * 1e3,
                        "cpu_ms_per_scrape": cpu / scrapes * 1e3, "bytes": size,
                        "cpu_share_at_15s": cpu / scrapes / 15.0 * 100,
                    }  # fmt: skip
                results[label] = row
            finally:
                daemon.terminate()
                daemon.wait(60)
    print(f"\n{channels} channels, a store of {hours:g} h of 1 s readings ({int(hours * 3600 * channels):,} rows); {scrapes} scrapes back to back; idle CPU over {idle_s:.0f} s\n")
    print("| daemon | idle CPU (ms/s) | scrape wall ms (median / p95) | daemon CPU ms per scrape | bytes per scrape | CPU share at a 15 s interval |")
    print("| --- | --: | --: | --: | --: | --: |")
    for label, r in results.items():
        if "bytes" in r:
            print(
                f"| {label} | {r['idle_cpu_ms_per_s']:.2f} | {r['wall_ms_median']:.2f} / {r['wall_ms_p95']:.2f} | {r['cpu_ms_per_scrape']:.2f} "
                f"| {r['bytes']:,.0f} | {r['cpu_share_at_15s']:.3f}% |"
            )
        else:
            print(f"| {label} | {r['idle_cpu_ms_per_s']:.2f} | – | – | – | – |")


def tls_case(
    broker: LocalBroker, tls_port: int, tls_options: dict[str, Any], form: str, n: int, args: argparse.Namespace, workdir: Path,
) -> dict[str, Any]:
    """`args.repeats` rounds of this tree's ingestor over plaintext and over TLS (QoS 1), in rotating order."""
    _, _, per_message = form_setup(form, args.channels)
    topics = parse_config(bench_sections(form, broker.port, 1, args.channels, workdir, None)).subscriptions
    links = ("plaintext", "TLS")
    rates: dict[str, list[float]] = {link: [] for link in links}
    lost = dict.fromkeys(links, 0)
    for rep in range(args.repeats):
        order = links[rep % 2:] + links[:rep % 2]
        got: dict[str, dict[str, Any]] = {}
        for link in order:
            state = Path(tempfile.mkdtemp(dir=workdir))
            config = bench_sections(form, broker.port, 1, args.channels, state, args.batch_size)
            if link == "TLS":
                config["mqtt"].update(port=tls_port, **tls_options)
            spec: dict[str, Any] = {
                "kind": "persisted", "host": broker.host, "port": broker.port, "qos": 1, "config": config,
                "readings": n * per_message, "per_message": per_message, "topics": topics, "receive_maximum": 0,
                "publisher": [
                    sys.executable, "-c", PUBLISHER, str(broker.port), "1", form, str(n), str(args.channels),
                    repr(publisher_base(form, n)), TASMOTA_ZONE,
                ],
            }  # fmt: skip
            got[link] = measure(ROOT, spec)
        for link in links:
            rates[link].append(got[link]["rate"])
            lost[link] = max(lost[link], got[link]["lost"])
        text = ", ".join(f"{link} {got[link]['rate']:,.0f}/s lost {got[link]['lost']}" for link in order)
        print(f"  {form} qos1 #{rep + 1}: {text}", file=sys.stderr, flush=True)
    ratios = [tls / plain for plain, tls in zip(rates["plaintext"], rates["TLS"]) if plain]
    median = statistics.median
    return {
        "form": form, "n": n, "per_message": per_message, "rates": {link: median(values) for link, values in rates.items()},
        "ratio": median(ratios) if ratios else float("nan"), "lost": lost,
    }  # fmt: skip


def tls_ingest(args: argparse.Namespace) -> None:
    """Readings/s persisted over plaintext and over TLS, side by side (see the module docstring)."""
    from edge_daemon.broker import free_port
    from tests.support import openssl_ca, openssl_signed

    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        pki.mkdir()
        ca = openssl_ca(pki, "bench-ca")
        server = openssl_signed(pki, ca, "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1")
        client = openssl_signed(pki, ca, "bench-ingestor", "extendedKeyUsage=clientAuth")
        tls_port = free_port()
        conf = (
            f"listener {tls_port} 127.0.0.1\ncafile {ca[0]}\ncertfile {server[0]}\nkeyfile {server[1]}\n"
            "require_certificate true\n"
        )
        tls_options = {"tls": True, "ca_file": str(ca[0]), "cert_file": str(client[0]), "key_file": str(client[1])}
        broker_dir = Path(tmp) / "broker"
        broker_dir.mkdir()
        with LocalBroker(workdir=broker_dir, conf=conf) as broker:
            for form in NATIVE:
                n = args.messages if form == "single" else args.batched_messages
                rows.append(tls_case(broker, tls_port, tls_options, form, n, args, Path(tmp)))
    minutes = (time.monotonic() - started) / 60
    import ssl

    print(
        f"\nmosquitto, one plaintext and one TLS listener (client certificate required, P-256 keys; {ssl.OPENSSL_VERSION});"
        f" QoS 1; {args.channels} channels; medians of {args.repeats} rounds; {minutes:.1f} min\n"
    )
    print("| payload | QoS | messages | plaintext (readings/s) | TLS (readings/s) | TLS / plaintext | lost |")
    print("| --- | --- | --: | --: | --: | --: | --- |")
    for row in rows:
        per = row["per_message"]
        label = f"{FORM_LABELS[row['form']]} ({per} reading{'s' if per != 1 else ''})"
        lost = row["lost"]
        lost_text = "0" if not any(lost.values()) else ", ".join(f"{link}: {count}" for link, count in lost.items())
        print(
            f"| {label} | 1 | {row['n']:,} | {row['rates']['plaintext']:,.0f} | {row['rates']['TLS']:,.0f} "
            f"| {row['ratio']:.2f}x | {lost_text} |"
        )


# The CPU cost of reading one message, without a broker or a store: the part of ingestion the
# payload forms change, measured apart from the network's noise. Run in a child process per tree.
PARSE_CHILD = r"""
import json, sys, timeit
from edge_daemon.mqtt.payload import PayloadLimits, parse_payload
import edge_daemon.mqtt.payload as payload_module
spec = json.loads(sys.argv[1])
now, n_channels = 1.7e9, spec["channels"]
fields = {f"c{k:02d}": 20.0 + k / 7 for k in range(n_channels)}
channels = {f"bench/{name}" for name in fields}
limits = PayloadLimits()
cases = {
    "single": ("sensors/bench/c00", json.dumps({"ts": now - 1.25, "value": 21.5}).encode()),
    "batched": ("sensors/bench", json.dumps({"ts": now - 1.25, "values": fields}).encode()),
}
out = {"module": payload_module.__file__}
for form, (topic, body) in cases.items():
    def one(topic=topic, body=body):
        return parse_payload(topic, body, now, channels, limits, [], [])
    assert len(one()) == (1 if form == "single" else n_channels)
    out[form] = min(timeit.repeat(one, number=spec["number"], repeat=spec["repeat"])) / spec["number"]
print(json.dumps(out))
"""


def parse_costs(trees: list[tuple[str, Path]], channels: int, rounds: int) -> None:
    """Microseconds of CPU to parse one native message, per tree: the best of `rounds` rounds."""
    spec = json.dumps({"channels": channels, "number": 20000, "repeat": 7})
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for label, tree in trees:  # the trees alternate within each round
            run = subprocess.run(
                [sys.executable, "-c", PARSE_CHILD, spec], cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(run.stdout)
            if not result["module"].startswith(str(tree)):
                raise RuntimeError(f"{label} imported {result['module']}, not its own tree")
            for form in ("single", "batched"):
                best.setdefault(label, {})[form] = min(best.get(label, {}).get(form, float("inf")), result[form])
    first = trees[0][0]
    print(f"\nCPU per native message, parse only (best of {rounds} rounds x 7 x 20,000 calls; {channels} channels)\n")
    print("| tree | single reading (us) | values map (us) | single vs " + first + " | values map vs " + first + " |")
    print("| --- | --: | --: | --: | --: |")
    for label, _ in trees:
        costs = best[label]
        print(
            f"| {label} | {costs['single'] * 1e6:.2f} | {costs['batched'] * 1e6:.2f} "
            f"| {costs['single'] / best[first]['single']:.2f}x | {costs['batched'] / best[first]['batched']:.2f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=30000, help="messages per run of a one-reading form (single, esphome)")
    parser.add_argument("--batched-messages", type=int, default=10000, help="messages per run of the other forms")
    parser.add_argument("--channels", type=int, default=16, help="channels (entries per values map or object; shelly: 4 per switch)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per case (medians reported)")
    parser.add_argument("--batch-size", type=int, default=None, help="store.batch_size (default: the config default)")
    parser.add_argument("--only", choices=FORMS, action="append", default=None, help="run this payload form only (repeatable)")
    parser.add_argument(
        "--checkout", type=Path, action="append", default=[],
        help="also measure the ingestor of this checkout on the native forms (another revision, with this interpreter and its packages)",
    )  # fmt: skip
    parser.add_argument("--parse", action="store_true", help="CPU per native message, parse only (with --checkout: before/after)")
    parser.add_argument("--wear", action="store_true", help="bytes written to storage per stored reading instead")
    parser.add_argument("--tls", action="store_true", help="QoS 1 native ingest over plaintext and over TLS instead, side by side")
    parser.add_argument("--wear-seconds", type=float, default=150.0, help="seconds of readings per wear run")
    parser.add_argument("--wear-flush", type=float, action="append", default=None, help="also run with this flush_interval_s (repeatable; default 5)")
    parser.add_argument("--scrape", action="store_true", help="the metrics endpoint's cost per scrape instead (and the daemon's idle CPU with and without it)")
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes measured with --scrape")
    parser.add_argument("--scrape-hours", type=float, default=1.0, help="hours of 1 s readings in the store with --scrape")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.scrape:
        scrape_costs(args.scrapes, args.channels, args.scrape_hours)
        return 0
    if args.wear:
        wear(args.wear_seconds, args.wear_flush or (5.0,), args.checkout)
        return 0
    if args.tls:
        tls_ingest(args)
        return 0
    if args.parse:
        trees = [(f"this tree ({_revision(ROOT)})", ROOT)] + [(_revision(c), c.resolve()) for c in args.checkout]
        parse_costs(trees, args.channels, max(3, args.repeats))
        return 0
    defaults = parse_config(bench_sections("single", 1883, 1, args.channels, Path(tempfile.gettempdir()), args.batch_size))
    receive_maximum = defaults.mqtt.receive_maximum
    this = f"this tree ({_revision(ROOT)})"
    others = [(_revision(checkout), checkout.resolve()) for checkout in args.checkout]
    forms = [form for form in FORMS if args.only is None or form in args.only]

    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        for form in forms:
            n = args.messages if form_setup(form, args.channels)[2] == 1 else args.batched_messages
            trees = [(this, ROOT), *(others if form in NATIVE else [])]
            for qos in (0, 1):
                rows.append(run_case(broker, form, qos, n, args, trees, receive_maximum, Path(tmp)))
        kind = broker.kind
    minutes = (time.monotonic() - started) / 60

    print(
        f"\nbroker: {kind}; {args.channels} channels; MQTT 5 subscribers, receive maximum {receive_maximum};"
        f" store.batch_size {defaults.store.batch_size}, synchronous {defaults.store.synchronous};"
        f" medians of {args.repeats} rounds; {minutes:.1f} min\n"
    )
    head = f"| payload | QoS | messages | bare subscriber (readings/s) | persisted, {this} | ratio |"
    rule = "| --- | --- | --: | --: | --: | --: |"
    for label, _ in others:
        head += f" persisted, {label} | ratio |"
        rule += " --: | --: |"
    print(head + " lost |")
    print(rule + " --- |")
    for row in rows:
        per = row["per_message"]
        label = f"{FORM_LABELS[row['form']]} ({per} reading{'s' if per != 1 else ''})"
        line = f"| {label} | {row['qos']} | {row['n']:,} | {row['rates']['bare']:,.0f} | {row['rates'][this]:,.0f} | {row['ratios'][this]:.2f}x |"
        for other, _ in others:
            if other in row["rates"]:
                line += f" {row['rates'][other]:,.0f} | {row['ratios'][other]:.2f}x |"
            else:
                line += " – | – |"
        lost = row["lost"]
        if not any(lost.values()):
            lost_text = "0"
        else:
            lost_text = ", ".join(f"{'this' if side == this else side}: {count}" for side, count in lost.items())
        print(f"{line} {lost_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
