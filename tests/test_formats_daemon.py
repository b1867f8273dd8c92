"""A daemon fed by four other projects' sensors at once (zigbee2mqtt, Tasmota, ESPHome, Shelly, as
the sample publisher shapes them): every reading stored once, and the daemon scores and forecasts
from them."""

from __future__ import annotations

import csv
import sqlite3
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_daemon.broker import LocalBroker
from edge_daemon.config import parse_config
from edge_daemon.daemon import Daemon
from edge_daemon.training.pretrain import pretrain_from_config
from sample_sensors.generate import CHANNELS, generate
from sample_sensors.publish import format_channels, format_messages
from tests.conftest import start_daemon
from tests.support import wait_for
from tests.test_end_to_end import Collector

HANG_S = 120.0
# A quarter-second grid keeps the live part short; Tasmota's whole-second `Time` then gives a
# reading every fourth step, which the grid's forward fill (5 steps) carries.
PERIOD_S = 0.25
LIVE_STEPS = 80
DEVICES = {"zigbee2mqtt": "z1", "tasmota": "t1", "esphome": "e1", "shelly": "s1"}
TOPICS = {"zigbee2mqtt": "zigbee2mqtt/#", "tasmota": "tele/+/SENSOR", "esphome": "e1/#", "shelly": "s1/#"}


def names() -> list[str]:
    return [name for fmt, device in DEVICES.items() for name in format_channels(fmt, device)]


def stored_by_channel(path: Path) -> dict[str, list[float]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT c.name, r.ts FROM readings r JOIN channels c ON c.id = r.channel_id").fetchall()
    out: dict[str, list[float]] = {}
    for name, ts in rows:
        out.setdefault(name, []).append(float(ts))
    return out


def test_a_daemon_stores_once_and_scores_from_four_formats(tmp_path: Path, broker: LocalBroker) -> None:
    channels = names()
    config = parse_config({
        "device": {"id": "formats", "state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "control.sock")},
        "mqtt": {"port": broker.port, "client_id": f"formats-daemon-{uuid.uuid4().hex[:8]}"},
        "channels": {"names": channels, "period_s": PERIOD_S},
        "inputs": [{"topic": TOPICS[fmt], "format": fmt, **({"timezone": "UTC"} if fmt == "tasmota" else {})} for fmt in DEVICES],
        "model": {"window": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "pretrain_steps": 60, "calendar": [],
                  "horizons": [1]},
        "outputs": {"forecast_every": 1},
        "store": {"clock_trust": "always", "flush_interval_s": 0.5},
        "train": {"start_on": ["request"]},
    })  # fmt: skip
    # The base: the motor's normal regime under each format's channel names, from a CSV.
    history = 1200
    start = time.time() - 3600
    columns = [generate(history, period_s=PERIOD_S, start_ts=start, seed=k) for k in range(len(DEVICES))]
    csv_path = tmp_path / "history.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ts", *channels])
        for i in range(history):
            writer.writerow([start + i * PERIOD_S] + [float(col[ch][i]) for col in columns for ch in CHANNELS])
    pretrain_from_config(config, csv_path=csv_path, seed=0)

    collector = Collector(broker.port)
    daemon = Daemon(config)
    start_daemon(daemon)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"formats-daemon-{time.monotonic_ns()}")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    sent_tasmota: set[int] = set()
    pending: list[mqtt.MQTTMessageInfo] = []
    try:
        live = [generate(LIVE_STEPS, period_s=PERIOD_S, seed=10 + k) for k in range(len(DEVICES))]
        t0 = time.time()
        for i in range(LIVE_STEPS):
            # Paced like sensors on a 4 Hz clock: ESPHome and Shelly readings are stamped on arrival.
            time.sleep(max(0.0, t0 + i * PERIOD_S - time.time()))
            ts = time.time()
            sent_tasmota.add(int(ts))
            for k, (fmt, device) in enumerate(DEVICES.items()):
                for message in format_messages(fmt, ts, {ch: float(live[k][ch][i]) for ch in CHANNELS}, device, "UTC"):
                    pending.append(pub.publish(message.topic, message.payload, qos=1))
        for info in pending:
            info.wait_for_publish(HANG_S)
        # Every message taken by the daemon (zigbee2mqtt and Tasmota one a step, ESPHome and Shelly
        # three): a message taken is stored before the daemon stops.
        wait_for(lambda: daemon.ingestor is not None and daemon.ingestor.counters()["received"] == 8 * LIVE_STEPS, HANG_S,
                 "every message received", detail=lambda: daemon.ingestor.counters() if daemon.ingestor else None)  # fmt: skip
        wait_for(lambda: daemon.pipeline is not None and daemon.pipeline.status()["scored"] >= LIVE_STEPS // 2, HANG_S,
                 "the live steps scored", detail=lambda: daemon.pipeline.status() if daemon.pipeline else None)  # fmt: skip
        wait_for(lambda: len(collector.of("forecast")) >= LIVE_STEPS // 2, HANG_S, "forecasts published")
    finally:
        pub.loop_stop()
        pub.disconnect()
        daemon.stop()
        collector.close()
    forecast = collector.of("forecast")[-1]
    assert sorted(forecast["forecast"]) == sorted(channels)
    counters = daemon.ingestor.counters() if daemon.ingestor else {}
    assert counters["rejected"] == 0, counters["rejected_by_reason"]
    by_channel = stored_by_channel(config.store_path)
    for fmt, device in DEVICES.items():
        for name in format_channels(fmt, device):
            stamps = by_channel.get(name, [])
            assert len(stamps) == len(set(stamps)), name
            # Tasmota's Time has whole seconds: one reading per channel and second, the rest duplicates.
            expected = len(sent_tasmota) if fmt == "tasmota" else LIVE_STEPS
            assert len(stamps) == expected, (name, len(stamps), expected)
