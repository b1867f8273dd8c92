"""A month in an hour: the real daemon on `--days` of the sample motor at 1 reading/s per channel,
in time compressed `--speed` times, with regime changes, broker restarts, SIGKILLs and retention
under a small store budget.

    python benchmarks/soak.py                         # 30 days at 720x: about an hour
    python benchmarks/soak.py --days 3 --speed 1440 --budget-mb 8 --recent-hours 3   # the slow suite's short run

The motor runs normally for the first third of the days, with a worn bearing for the second and
overloaded for the last. One publisher sends a values map of the three channels per step (QoS 1,
a persistent session, paced at `--speed` steps a second), stamped over the last `--days` days.
The daemon (`python -m edge_daemon run`, a small base model trained beforehand, scoring every
step, batches of its default size committed within 10 s, retention every second) runs in a memory cgroup of its own,
under a store budget of `--budget-mb`. At 30% and 60% of the steps the broker is restarted
(mosquitto with persistence); at 40% and 80% the daemon is SIGKILLed while readings flow and
started again, the publisher paused until it has subscribed (at 1 reading/s a restart's few
seconds bring a handful of readings, not the hours they would in compressed time). The
publisher is paused four times (once a day and an hour of readings are in, when the day-long
drift windows are full; before each SIGKILL; at the end) until the store holds every step sent
and scoring has stopped moving: the daemon's charge (the cgroup's usage less its inactive page
cache) is read then, so the points compare the same idle state. A process that has seen less
than a day of readings holds less (its day-long windows are not full; a restarted daemon does
not refill them), so growth is taken over the points whose process has seen a day.

At the end (the daemon stopped with SIGTERM) the store is read back: every reading of the last
`recent_hours` (kept whole) must be there exactly once, every older segment kept by the
reservoir must be whole, the store must never have been over its budget (sampled every
second), and the reservoir must still hold segments of the first regime. Prints one table and,
with `--json`, the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

from edge_daemon.broker import LocalBroker  # noqa: E402
from edge_daemon.config import parse_config  # noqa: E402
from edge_daemon.frames import build_grid  # noqa: E402
from edge_daemon.store import decode_keys, segment_of  # noqa: E402
from edge_daemon.training.pretrain import pretrain  # noqa: E402
from sample_sensors.generate import CHANNELS, generate_labeled, readings  # noqa: E402
from tests.cgroups import MemoryCgroup, create_memory_cgroup  # noqa: E402
from tests.support import config_toml, daemon_status, wait_for  # noqa: E402

DAY = 86400
HANG_S = 600.0
MODEL = {"window": 32, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}
REGIMES = (None, "bearing_wear", "overload")  # thirds of the run

# One process publishing the run's steps: a day generated at a time (the regime of its third of
# the run), one values map per step, paced at `speed` steps a second. It prints how many steps
# the broker has acknowledged, so the driver can act at a share of the run; it pauses while the
# file `pause` exists (still printing), and does not catch up in a burst afterwards.
PUBLISHER = r"""
import json, os, sys, time, threading
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sample_sensors.generate import generate_labeled

port, days, speed, start_ts = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
regimes, pause = json.loads(sys.argv[5]), sys.argv[6]
acked = [0]
lock = threading.Lock()

def on_publish(client, userdata, mid, reason_code, properties):
    with lock:
        acked[0] += 1

client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-publisher", clean_session=False, protocol=mqtt.MQTTv311)
client.max_inflight_messages_set(500)
client.max_queued_messages_set(0)
client.reconnect_delay_set(0.2, 2.0)
client.on_publish = on_publish
client.connect("127.0.0.1", port)
client.loop_start()
sent = 0
t0 = time.monotonic()
last_print = 0.0
for day in range(days):
    regime = regimes[day * len(regimes) // days]
    data = generate_labeled(86400, start_ts=start_ts + day * 86400, seed=100 + day,
                            regime_change_at=None if regime is None else 0, regime=regime or "bearing_wear")
    names = [c.split("/", 1)[1] for c in data.values]
    columns = [data.values[c] for c in data.values]
    for k in range(86400):
        while os.path.exists(pause):
            with lock:
                print("paused", sent, acked[0], flush=True)
            time.sleep(0.2)
        due = t0 + sent / speed
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        elif now - due > 1.0:  # paused or starved: go on at the pace, no burst
            t0 = now - sent / speed
        payload = json.dumps({"ts": round(float(data.ts[k]), 3), "values": {n: round(float(col[k]), 6) for n, col in zip(names, columns)}})
        client.publish("sensors/m1", payload, qos=1)
        sent += 1
        if now - last_print >= 0.5:
            with lock:
                print(sent, acked[0], flush=True)
            last_print = now
while True:
    with lock:
        done = acked[0] >= sent
    print(sent, acked[0], flush=True)
    if done:
        break
    time.sleep(0.5)
client.disconnect()
client.loop_stop()
print("done", sent, flush=True)
"""


class Publisher:
    """The publisher process, its progress read from its output in a thread."""

    def __init__(self, port: int, days: int, speed: float, start_ts: float, workdir: Path) -> None:
        self.pause_file = workdir / "pause"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(port), str(days), str(speed), str(start_ts), json.dumps(list(REGIMES)), str(self.pause_file)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )  # fmt: skip
        self.sent = 0
        self.acked = 0
        self.done = False
        self.paused = False
        self.tail: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            self.paused = parts[:1] == ["paused"]
            if self.paused:
                parts = parts[1:]
            if len(parts) == 2 and parts[0].isdigit():
                self.sent, self.acked = int(parts[0]), int(parts[1])
            elif parts[:1] == ["done"]:
                self.done = True
            else:
                self.tail = (self.tail + [line])[-20:]

    def pause(self) -> None:
        self.pause_file.touch()
        wait_for(lambda: self.paused or self.proc.poll() is not None, HANG_S, "the publisher paused", interval=0.1)

    def resume(self) -> None:
        self.pause_file.unlink(missing_ok=True)
        wait_for(lambda: not self.paused or self.proc.poll() is not None, HANG_S, "the publisher resumed", interval=0.1)

    def check(self) -> None:
        if self.proc.poll() not in (None, 0):
            raise RuntimeError("the publisher failed:\n" + "".join(self.tail))


class Daemon:
    """The daemon process in the run's memory cgroup; killed and started again on demand."""

    def __init__(self, config_file: Path, cgroup: MemoryCgroup, workdir: Path) -> None:
        self.config_file = config_file
        self.cgroup = cgroup
        self.workdir = workdir
        self.socket = workdir / "control.sock"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        with open(self.workdir / f"daemon-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_daemon", "run", "--config", str(self.config_file)],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.cgroup.enter_fn(), cwd=ROOT,
            )  # fmt: skip
        wait_for(self.status, HANG_S, "the daemon's control socket", interval=0.2)

    def status(self) -> dict[str, Any] | None:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.workdir / f"daemon-{self.starts}.log").read_text()[-3000:]
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}):\n{log}")
        return daemon_status(self.socket)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def newest_stored(store_path: Path) -> float | None:
    """The newest stored timestamp, read from the file beside the daemon (WAL: no blocking)."""
    try:
        with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=30) as conn:
            key = conn.execute("SELECT MAX(key) FROM samples").fetchone()[0]
    except sqlite3.Error:
        return None
    return None if key is None else float(decode_keys(np.asarray([key]))[0][0])


def drop_clean_page_cache() -> None:
    """Write back dirty pages and ask the kernel to drop clean page cache, machine-wide (root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def idle_charge(daemon: Daemon, publisher: Publisher, store_path: Path, last_ts: Any) -> tuple[float, float, float]:
    """Pause the publisher, wait until the store holds every step it sent and scoring stops
    moving, read the cgroup's charge, and read it again after dropping clean page cache."""
    wait_for(lambda: publisher.acked >= publisher.sent > 0, HANG_S, "the broker acknowledged every step sent")
    sent = publisher.sent
    wait_for(lambda: (newest_stored(store_path) or 0) >= last_ts(sent), HANG_S, f"step {sent} stored")
    steps = [-1]

    def scoring_still() -> bool:
        now = ((daemon.status() or {}).get("scoring") or {}).get("steps")
        still = now == steps[0]
        steps[0] = now
        return still

    wait_for(scoring_still, HANG_S, "scoring caught up", interval=2.0)
    charge, anon = daemon.cgroup.charge_mb(), daemon.cgroup.anon_mb()
    # What the kernel cannot take back without the process: page cache a restarted process
    # found there and activated (the libraries it maps, the store's pages) counts in the charge
    # above but would be reclaimed first; dropping clean page cache leaves what the process holds.
    drop_clean_page_cache()
    return charge, anon, daemon.cgroup.charge_mb()


def run(days: int, speed: float, budget_mb: float, recent_hours: float, keep: Path | None) -> dict[str, Any]:
    workdir = Path(keep or tempfile.mkdtemp(prefix="edge-soak-", dir="/var/tmp"))
    (workdir / "broker").mkdir(parents=True, exist_ok=True)
    broker = LocalBroker(workdir=workdir / "broker")
    broker.start()
    cgroup = create_memory_cgroup()
    if not isinstance(cgroup, MemoryCgroup):
        raise SystemExit(f"cannot create a memory cgroup here: {cgroup}")
    steps_total = days * DAY
    end_ts = float(int(time.time()))
    start_ts = end_ts - steps_total  # the run's readings end about now

    def ts_of(steps: int) -> float:
        return start_ts + steps - 1

    sections: dict[str, dict[str, Any]] = {
        "device": {"id": "soak", "state_dir": str(workdir / "state"), "socket": str(workdir / "control.sock")},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "qos": 1, "client_id": "edge-daemon-soak"},
        "channels": {"names": list(CHANNELS), "period_s": 1.0},
        # Retention every second: at 720x, its default minute would be 12 hours of readings
        # (at 1 reading/s, what a minute brings is 4 kB; a second at 1440x brings 100 kB). A
        # batch commits at its default size (4000 readings: every 1-2 s at these speeds) or
        # after 10 s at most (the default 60 s only delays the idle points).
        "store": {
            "budget_mb": budget_mb, "recent_hours": recent_hours, "max_age_s": float(steps_total + 2 * DAY),
            "disk_reserve_mb": 0.0, "retention_interval_s": 1.0, "flush_interval_s": 10.0,
        },
        "model": MODEL,
        "train": {"start_on": ["request"]},
        "outputs": {"forecast_every": 60},
    }
    config_file = workdir / "config.toml"
    config_file.write_text(config_toml(sections))
    cfg = parse_config(sections)
    # A base trained on a day of the normal motor before the run, as on a device that has one.
    data = generate_labeled(DAY, start_ts=start_ts - DAY, seed=7)
    ts, idx, values = readings(data, 0, DAY)
    pretrain(build_grid(ts, idx, values, len(CHANNELS), 1.0, 5), list(CHANNELS), 1.0, cfg.model, cfg.base_dir, steps=200)
    daemon = Daemon(config_file, cgroup, workdir)
    store_path = cfg.store_path
    samples: list[tuple[float, float, float]] = []  # (elapsed s, store bytes, charge MB)
    stop_sampling = threading.Event()
    figures: dict[str, Any] = {"days": days, "speed": speed, "budget_mb": budget_mb, "recent_hours": recent_hours}
    # (when, charge MB, anon MB, days of readings the process has seen, charge MB after dropping clean page cache)
    charges: list[tuple[str, float, float, float, float]] = []
    started_at = [0]  # steps sent when the running daemon process started
    started = time.monotonic()
    publisher: Publisher | None = None
    try:
        daemon.start()

        def sample() -> None:
            while not stop_sampling.wait(1.0):
                size = sum(p.stat().st_size for p in (store_path, store_path.with_name(store_path.name + "-wal")) if p.exists())
                samples.append((time.monotonic() - started, float(size), cgroup.charge_mb()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        publisher = Publisher(broker.port, days, speed, start_ts, workdir)
        # The reference charge once a day of readings is in: the day-long drift windows full.
        events = sorted([
            (min(0.9, max(0.03, (DAY + 3600) / steps_total)), "start", None),
            (0.30, "broker restart", broker.restart),
            (0.40, "SIGKILL", daemon.kill),
            (0.60, "broker restart", broker.restart),
            (0.80, "SIGKILL", daemon.kill),
        ], key=lambda e: e[0])
        for share, what, action in events:
            wait_for(lambda share=share: (publisher.check(), publisher.sent >= share * steps_total)[1], HANG_S * 10, f"{share:.0%} of the steps sent")
            if what == "start" or what == "SIGKILL":
                publisher.pause()
                label = f"a day in ({share:.0%})" if what == "start" else f"before the SIGKILL at {share:.0%}"
                mb, anon, held = idle_charge(daemon, publisher, store_path, ts_of)
                charges.append((label, mb, anon, (publisher.sent - started_at[0]) / DAY, held))
                publisher.resume()
            if what == "SIGKILL":
                # Killed while readings flow (some unacknowledged), then started again with the
                # publisher paused: at 1 reading/s the few seconds of a restart bring a handful
                # of readings, not the hours they would at 1440x.
                flowing = publisher.sent + int(2 * speed)
                wait_for(lambda: publisher.sent >= flowing, HANG_S, "readings flowing again")
                daemon.kill()
                publisher.pause()
                daemon.start()
                wait_for(lambda: ((daemon.status() or {}).get("ingest") or {}).get("connected"), HANG_S, "the daemon subscribed")
                started_at[0] = publisher.sent
                publisher.resume()
            elif action is not None:
                action()
            print(f"{time.monotonic() - started:7.0f} s  {what} at {publisher.sent:,} steps", file=sys.stderr, flush=True)
            figures.setdefault("events", []).append((round(time.monotonic() - started, 1), what, publisher.sent))
        wait_for(lambda: (publisher.check(), publisher.done)[1], HANG_S * 10, "every step sent and acknowledged")
        mb, anon, held = idle_charge(daemon, publisher, store_path, ts_of)
        charges.append(("the end", mb, anon, (publisher.sent - started_at[0]) / DAY, held))
        figures["wall_s"] = time.monotonic() - started
        figures["restarts"] = daemon.starts - 1
        figures["stop_code"] = daemon.stop()
    finally:
        stop_sampling.set()
        if publisher is not None and publisher.proc.poll() is None:
            publisher.proc.kill()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
        cgroup.remove(60)
        broker.stop()
    figures.update(check_store(store_path, start_ts, steps_total, recent_hours, float(cfg.store.segment_s)))
    figures["charges_mb"] = charges
    # Growth against the first point: over the points whose process has seen a day of readings
    # (its day-long windows full), as a process younger than that holds less.
    start, start_anon, start_held = next((mb, anon, held) for label, mb, anon, _, held in charges if label.startswith("a day in"))
    figures["charge_growth_mb"] = max(mb - start for _, mb, _, age, _ in charges if age >= 1.0)
    figures["anon_growth_mb"] = max(anon - start_anon for _, _, anon, age, _ in charges if age >= 1.0)
    figures["held_growth_mb"] = max(held - start_held for _, _, _, age, held in charges if age >= 1.0)
    figures["max_store_bytes"] = max(s[1] for s in samples) if samples else None
    figures["max_store_at_s"] = max(samples, key=lambda s: s[1])[0] if samples else None
    figures["store_samples"] = [(round(t, 1), int(b)) for t, b, _ in samples]
    figures["max_charge_mb"] = max(s[2] for s in samples) if samples else None
    figures["workdir"] = str(workdir)
    return figures


def check_store(path: Path, start_ts: float, steps: int, recent_hours: float, segment_s: float) -> dict[str, Any]:
    """What the stopped daemon left: the recent readings (within `recent_hours` of the newest)
    whole and once, older segments whole, and how far back the reservoir reaches."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        keys = np.fromiter((k for (k,) in conn.execute("SELECT key FROM samples")), dtype=np.int64)
        size = path.stat().st_size
    ts, _ = decode_keys(keys)
    end_ts = start_ts + steps - 1
    recent_from = end_ts - recent_hours * 3600 + 1
    recent = ts >= recent_from
    expected_recent = 3 * int(end_ts - recent_from + 1)
    segments = np.asarray([segment_of(t, segment_s) for t in ts[~recent].tolist()], dtype=np.int64)
    seg_ids, counts = np.unique(segments, return_counts=True)
    # A whole segment inside the run holds a reading of each channel each second.
    inside = (seg_ids * segment_s >= start_ts) & ((seg_ids + 1) * segment_s <= recent_from)
    third = steps / len(REGIMES)
    first_regime = int(np.sum(seg_ids[inside] * segment_s < start_ts + third))
    return {
        "store_bytes_end": size,
        "recent_expected": expected_recent,
        "recent_stored": int(recent.sum()),
        "duplicates": int(len(keys) - len(np.unique(keys))),
        "old_segments": int(inside.sum()),
        "old_segments_partial": int(np.sum(counts[inside] != 3 * segment_s)),
        "old_segments_first_regime": first_regime,
        "oldest_stored_day": float((ts.min() - start_ts) / DAY) if len(ts) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--speed", type=float, default=720.0, help="steps per second (720: 30 days in an hour)")
    parser.add_argument("--budget-mb", type=float, default=8.0, help="[store] budget_mb")
    parser.add_argument("--recent-hours", type=float, default=6.0, help="[store] recent_hours")
    parser.add_argument("--keep", type=Path, help="run in (and keep) this directory")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    # A SIGTERM ends the run through its cleanup (the daemon, its cgroup and the broker).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    f = run(args.days, args.speed, args.budget_mb, args.recent_hours, args.keep)
    charges = f["charges_mb"]
    growth = f["charge_growth_mb"]
    print(f"\n{f['days']} days at {f['speed']:g} steps/s in {f['wall_s'] / 60:.1f} min; {f['restarts']} SIGKILLs, 2 broker restarts; "
          f"budget {f['budget_mb']:g} MB, recent {f['recent_hours']:g} h\n")
    print("| figure | value | target |")
    print("| --- | --: | --- |")
    print(f"| recent readings stored (last {f['recent_hours']:g} h) | {f['recent_stored']:,} of {f['recent_expected']:,} | all, once |")
    print(f"| duplicates | {f['duplicates']} | 0 |")
    print(f"| older segments kept / of them partial | {f['old_segments']} / {f['old_segments_partial']} | whole |")
    print(f"| older segments from the first regime (days 0-{f['days'] // 3}) | {f['old_segments_first_regime']} | > 0 |")
    print(f"| store bytes: largest sampled / at the end | {f['max_store_bytes'] / 2**20:.2f} MB / {f['store_bytes_end'] / 2**20:.2f} MB | <= {f['budget_mb']:g} MB |")
    for label, mb, anon, age, held in charges:
        print(f"| idle charge (of it anonymous; after dropping clean page cache), {label}; the process has seen {age:.1f} days"
              f" | {mb:.1f} MB ({anon:.1f} MB; {held:.1f} MB) | |")
    print(f"| idle charge, largest growth over the day-in point (processes that have seen a day) | {growth:+.1f} MB | within 10 MB |")
    print(f"| anonymous memory, largest growth over the day-in point (the same points) | {f['anon_growth_mb']:+.1f} MB | within 10 MB |")
    print(f"| idle charge after dropping clean page cache, largest growth over the day-in point (the same points) | {f['held_growth_mb']:+.1f} MB | within 10 MB |")
    print(f"| largest charge sampled | {f['max_charge_mb']:.1f} MB | |")
    print(f"| exit code at SIGTERM | {f['stop_code']} | 0 |")
    if args.json:
        args.json.write_text(json.dumps(f, indent=1))


if __name__ == "__main__":
    main()
