"""End to end with a real broker: a regime change is detected, adapted to, served and alerted.

The base model is trained on the old regime; the daemon then ingests the old
regime and a bearing-wear regime over MQTT, detects residual drift, runs a
LoRA update in its training worker when idle, gates and serves the adapter,
and the residual on fresh data of the new regime falls.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion

from edge_daemon.artifacts.base import load_base
from edge_daemon.artifacts.merge import serving_model
from edge_daemon.broker import LocalBroker
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.training.records import AdapterMeta
from edge_daemon.frames import build_grid
from edge_daemon.training.pretrain import pretrain
from sample_sensors.generate import CHANNELS, generate_labeled, readings
from sample_sensors.publish import valid_messages
from tests.conftest import make_config, save_random_peft_adapter, start_daemon
from tests.payload_schemas import violations
from tests.support import wait_for

OLD_STEPS = 2400
NEW_STEPS = 900
EXTRA_STEPS = 400  # new-regime data published after the update, to see the residual fall
# Storing a few thousand readings takes seconds; a full suite on two busy cores has needed more than 60.
READINGS_TIMEOUT_S = 180


def small_config(tmp_path: Path, port: int, **overrides: dict):
    sections: dict = {
        "model": {"window": 32, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64},
        "train": {
            "steps": 40,
            "batch_size": 16,
            "micro_batch": 16,
            "lr": 5e-3,
            "check_interval_s": 0.5,
            "idle_cpu_percent": 100,
            "idle_window_s": 2,
            "min_interval_s": 0,
            "start_on": ["drift", "request"],  # not new data alone
            "recent_hours": NEW_STEPS / 3600,
            "gate_tolerance": 0.5,
        },
        "outputs": {"forecast_every": 50, "status_interval_s": 1},
        "store": {"segment_s": 300},
        # Drift windows span a whole (compressed: 600 steps) day, so daily swings are not drift.
        "drift": {"input_window_s": 600, "residual_window_s": 600},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return make_config(tmp_path, port=port, **sections)


class Collector:
    """A plain paho subscriber that keeps every message on edge/#, each checked on arrival against
    its topic's JSON Schema (`violations`: what did not match; tests assert it stays empty)."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, dict]] = []
        self.violations: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"e2e-collector-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("edge/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(message.payload)
        except ValueError:
            payload = {"raw": message.payload.decode(errors="replace")}
        self.violations += violations(message.topic, payload)
        self.messages.append((message.topic, payload))

    def of(self, suffix: str) -> list[dict]:
        return [payload for topic, payload in self.messages if topic.endswith("/" + suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish_steps(port: int, ts: np.ndarray, values: dict[str, np.ndarray], start: int, stop: int) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"e2e-publisher-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    for k in range(start, stop):
        readings = {channel: float(values[channel][k]) for channel in CHANNELS}
        for message in valid_messages(float(ts[k]), readings, "values"):
            infos.append(client.publish(message.topic, message.payload, qos=1))
    for info in infos:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()


def test_regime_change_is_detected_adapted_and_alerted(tmp_path: Path, broker: LocalBroker) -> None:
    total = OLD_STEPS + NEW_STEPS + EXTRA_STEPS
    start_ts = float(int(time.time()) - total - 30)
    data = generate_labeled(total, start_ts=start_ts, seed=0, regime_change_at=OLD_STEPS, time_scale=144)
    # The model serves throughout, so the residuals before and after the update are both its own
    # (serving a baseline instead has its tests in test_scoring and below).
    cfg = small_config(tmp_path, broker.port, outputs={"serve": "model"})

    # Base model: trained on the old regime only, as a fleet's base would be.
    grid = build_grid(*readings(data, 0, OLD_STEPS), 3, 1.0, 5)
    pretrain(grid, list(CHANNELS), 1.0, cfg.model, cfg.base_dir, steps=500)

    collector = Collector(broker.port)
    daemon = Daemon(cfg)
    start_daemon(daemon)
    try:
        publish_steps(broker.port, data.ts, data.values, 0, OLD_STEPS + NEW_STEPS)
        assert daemon.store is not None
        wait_for(lambda: daemon.store.count() == 3 * (OLD_STEPS + NEW_STEPS), READINGS_TIMEOUT_S, "every reading stored",
                 detail=lambda: (daemon.store.count(), daemon.ingestor.counters()))  # fmt: skip

        # Drift on the residuals, then an update started by it, accepted and served.
        accepted = wait_for(lambda: collector.of("alert") and [a for a in collector.of("alert") if a["type"] == "adapter_accepted"], 240, "adapter_accepted alert")
        alerts = collector.of("alert")
        kinds = [a["type"] for a in alerts]
        assert "drift" in kinds and kinds.index("drift") < kinds.index("adapter_accepted")
        drift_alerts = [a for a in alerts if a["type"] == "drift" and a["kind"] == "residuals"]
        assert drift_alerts, "the residuals must drift"
        assert any(a["ts"] >= data.ts[OLD_STEPS] for a in drift_alerts), "the new regime drifts the residuals"
        assert accepted[0]["version"] == 1
        status = request(cfg.device.socket, {"cmd": "status"})
        assert status["ok"] and status["adapter"]["version"] == 1
        assert status["training"]["last"]["accepted"] is True, (status["training"], kinds)
        assert status["training"]["last"]["reason"]
        # The next start rule uses what this worker measurably added, not the assumption it began with.
        expected = status["training"]["expected_worker_mb"]
        assert status["training"]["expected_worker_measured"] is True and 0 < expected < 2000, expected
        assert daemon.adaptation is not None and daemon.adaptation.runner.last is not None
        assert daemon.adaptation.runner.last.job is not None and daemon.adaptation.runner.last.job.reason == "drift detected"
        assert (cfg.adapters_dir / "v1" / "adapter_model.safetensors").stat().st_size < 100_000
        # The update mixed in replay windows drawn from the store's older segments, and the gate
        # judged forgetting on held-out ones.
        meta = json.loads((cfg.adapters_dir / "v1" / "meta.json").read_text())
        assert meta["windows"]["replay_train"] > 0 and meta["windows"]["replay_val"] > 0, meta["windows"]
        recent_from = meta["data_range"]["recent"][0]
        # The update learnt from the data since the drift judges dated the change, not a fixed span.
        assert daemon.adaptation.runner.last.job.since == recent_from
        spans = meta["data_range"]["replay"]
        segment_s = cfg.store.segment_s  # spans are whole store segments holding old readings
        assert spans and all(data.ts[0] - segment_s < a < b <= recent_from for a, b in spans), (spans, recent_from)
        for metrics in (meta["metrics_before"], meta["metrics_after"]):
            assert np.isfinite(metrics["replay_val_loss"]), metrics
        # The baselines were refitted on the update's windows and judged beside it on held-out ones.
        assert {b["kind"] for b in meta["baselines"]} >= {"persistence", "ridge"}
        assert set(meta["held_out"]["mae"]) >= {"model", "persistence", "ridge"}
        assert status["drift"]["detected"] is False  # the accepted adapter reset the residual baseline

        # The residual falls: fresh new-regime data is forecast better by base + adapter.
        assert daemon.pipeline is not None
        history = list(daemon.pipeline.history)
        before = [s for t, s, v in history if t >= data.ts[OLD_STEPS + 100] and v is None and np.isfinite(s)]
        publish_steps(broker.port, data.ts, data.values, OLD_STEPS + NEW_STEPS, total)
        wait_for(lambda: daemon.store.count() == 3 * total, READINGS_TIMEOUT_S, "the extra readings stored")
        wait_for(lambda: sum(1 for _, _, v in daemon.pipeline.history if v == 1) > EXTRA_STEPS - 80, 30, "scores with v1")
        after = [s for t, s, v in daemon.pipeline.history if v == 1 and np.isfinite(s)]
        # The base starts from the ridge fit, so it already follows much of the new regime: the
        # adapter's gain is in vibration (benchmarks/forecast.py: new-regime MAE 0.85x the base's).
        assert np.mean(after) < 0.9 * np.mean(before), (np.mean(before), np.mean(after))

        forecasts = collector.of("forecast")
        assert forecasts and set(forecasts[-1]["forecast"]) == set(CHANNELS)
        # The further horizon: one hour's worth at 1 s, capped at half the 32-step window.
        (far,) = forecasts[-1]["horizons"]
        assert far["steps"] == 16 and far["forecast_ts"] == forecasts[-1]["ts"] + 16 and set(far["forecast"]) == set(CHANNELS)
        assert far["model"] == "adapter" and far["adapter_version"] == 1
        assert any(f["adapter_version"] == 1 and f["model"] == "adapter" for f in forecasts)
        assert {f["model"] for f in forecasts} == {"base", "adapter"}
        statuses = collector.of("status")
        # min_interval_s is 0 here: a later drift may have started a second update meanwhile.
        assert statuses and statuses[-1]["online"] is True and statuses[-1]["adapter_version"] >= 1
        assert not collector.violations, collector.violations
    finally:
        daemon.stop()
        collector.close()
    assert cfg.store_path.exists()


def test_train_request_and_rollback_over_the_socket(tmp_path: Path, broker: LocalBroker) -> None:
    total = OLD_STEPS + NEW_STEPS
    start_ts = float(int(time.time()) - total - 30)
    data = generate_labeled(total, start_ts=start_ts, seed=1, regime_change_at=OLD_STEPS, time_scale=144)
    # Only a request may start an update here, though the residuals drift. The gate is loose:
    # this test is about requests and rollback, the gate has its own tests.
    cfg = small_config(tmp_path, broker.port, train={"gate_tolerance": 5.0, "start_on": ["request"]})
    grid = build_grid(*readings(data, 0, OLD_STEPS), 3, 1.0, 5)
    pretrain(grid, list(CHANNELS), 1.0, cfg.model, cfg.base_dir, steps=500)
    daemon = Daemon(cfg)
    start_daemon(daemon)
    try:
        publish_steps(broker.port, data.ts, data.values, 0, total)
        wait_for(lambda: daemon.store.count() == 3 * total, READINGS_TIMEOUT_S, "every reading stored", detail=lambda: (daemon.store.count(), daemon.ingestor.counters()))
        # The new regime drifts the residuals, and the trigger judges that on an idle device (twice,
        # so one decision comes after the drift is seen): no reason of its own may start an update.
        assert daemon.pipeline is not None
        wait_for(lambda: daemon.pipeline.drift.residual_drift_detected, 120, "residual drift")
        checks = daemon.adaptation.trigger_checks
        wait_for(lambda: daemon.adaptation.trigger_checks >= checks + 2, 60, "two more trigger decisions")
        # A decision on an idle device (one while the machine is busy says so instead) after the drift.
        wait_for(
            lambda: request(cfg.device.socket, {"cmd": "status"})["training"]["trigger"] == "no reason to adapt", 120,
            "a trigger decision on an idle device", detail=lambda: request(cfg.device.socket, {"cmd": "status"})["training"]["trigger"],
        )  # fmt: skip
        assert daemon.adaptation is not None and daemon.adaptation.runner.last is None, "nothing may start an update unasked"
        status = request(cfg.device.socket, {"cmd": "status"})
        serving = status["scoring"]["serving"]  # the model and the baselines, compared live
        assert serving["steps_compared"] > 0 and set(serving["mae"]) >= {"model", "persistence", "ridge"}, serving

        reply = request(cfg.device.socket, {"cmd": "train"})
        assert reply["ok"] and reply["accepted"]
        wait_for(lambda: daemon.adaptation.runner.last is not None, 240, "the requested update")
        last = daemon.adaptation.runner.last
        assert last.accepted and last.version == 1, last
        # The result is known before it is handled: `current` moves once the scorer serves it.
        wait_for(lambda: daemon.adaptation.adapters.current_version() == 1, 60, "v1 served and current")
        assert last.job is not None and last.job.reason == "requested"
        adapters = request(cfg.device.socket, {"cmd": "adapters"})
        assert adapters["current"] == 1 and [a["version"] for a in adapters["adapters"]] == [1]
        first = adapters["adapters"][0]
        assert first["metrics"]["recent_after"] < first["metrics"]["recent_before"]

        # A second version in the store (peft's format, as one shipped to the device would be),
        # served by a rollback to it; then a rollback to the older v1 serves v1's weights again.
        base = load_base(cfg.base_dir, list(CHANNELS), 1.0)
        staging = daemon.adaptation.adapters.staging_dir()
        save_random_peft_adapter(base.model, staging, ["blocks.0.attn.qkv", "blocks.1.fc2", "head"])
        assert daemon.adaptation.adapters.commit(staging, AdapterMeta(reason="shipped"), make_current=False).version == 2
        window = torch.randn(1, cfg.model.window, len(CHANNELS), generator=torch.Generator().manual_seed(0))

        def forecast_of(model: torch.nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return model.eval()(window)

        served_v1, served_v2 = (forecast_of(serving_model(base, daemon.adaptation.adapters.get(v))) for v in (1, 2))
        assert not torch.allclose(served_v1, served_v2, atol=1e-4)
        assert daemon.pipeline.scorer.version == 1
        assert torch.allclose(forecast_of(daemon.pipeline.scorer.model), served_v1)
        rolled = request(cfg.device.socket, {"cmd": "rollback", "version": 2})
        assert rolled["ok"] and rolled["adapter"]["version"] == 2
        assert daemon.pipeline.scorer.version == 2
        assert torch.allclose(forecast_of(daemon.pipeline.scorer.model), served_v2)
        rolled = request(cfg.device.socket, {"cmd": "rollback", "version": 1})
        assert rolled["ok"] and rolled["adapter"]["version"] == 1
        assert daemon.pipeline.scorer.version == 1
        assert torch.allclose(forecast_of(daemon.pipeline.scorer.model), served_v1)
        assert request(cfg.device.socket, {"cmd": "adapter"})["adapter"]["version"] == 1
        missing = request(cfg.device.socket, {"cmd": "rollback", "version": 7})
        assert not missing["ok"] and "7" in missing["error"]
        assert daemon.pipeline.scorer.version == 1
        assert torch.allclose(forecast_of(daemon.pipeline.scorer.model), served_v1)
    finally:
        daemon.stop()


def test_device_without_a_base_model_bootstraps_one_from_its_store(tmp_path: Path, broker: LocalBroker) -> None:
    total = 1500
    start_ts = float(int(time.time()) - total - 30)
    data = generate_labeled(total, start_ts=start_ts, seed=2, time_scale=144)
    cfg = small_config(tmp_path, broker.port, model={"bootstrap_min_windows": 400, "pretrain_steps": 150})
    collector = Collector(broker.port)
    daemon = Daemon(cfg)
    start_daemon(daemon)
    try:
        assert daemon.adaptation.base is None and daemon.pipeline is not None and daemon.pipeline.scorer is None
        publish_steps(broker.port, data.ts, data.values, 0, total)
        wait_for(lambda: daemon.store.count() == 3 * total, READINGS_TIMEOUT_S, "every reading stored", detail=lambda: (daemon.store.count(), daemon.ingestor.counters()))
        # Idle and enough gap-free windows: the daemon trains its own base in the child.
        wait_for(lambda: daemon.adaptation.base is not None, 180, "a bootstrapped base model")
        assert (cfg.base_dir / "model.safetensors").exists()
        assert daemon.pipeline.scorer is not None and daemon.pipeline.scorer.version is None
        wait_for(lambda: any(a["type"] == "base_model" for a in collector.of("alert")), 10, "base_model alert")
        assert daemon.adaptation is not None and daemon.adaptation.runner.last.kind == "pretrain" and daemon.adaptation.runner.last.accepted
        assert collector.of("status") and not collector.violations, collector.violations
    finally:
        daemon.stop()
        collector.close()


def test_a_base_of_an_earlier_layout_is_set_aside_and_trained_again(tmp_path: Path, broker: LocalBroker) -> None:
    """After an upgrade that changes the forecaster, the daemon starts (no restart loop), keeps the
    old base aside, serves no adapter of it, and waits to bootstrap a new base from its store."""
    cfg = small_config(tmp_path, broker.port)
    data = generate_labeled(600, start_ts=1.7e9, seed=2, time_scale=144)
    ts, idx, val = readings(data)
    pretrain(build_grid(ts, idx, val, 3, 1.0, 2), list(CHANNELS), 1.0, cfg.model, cfg.base_dir, steps=1)
    config_file = cfg.base_dir / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "format": 1}))
    daemon = Daemon(cfg)
    start_daemon(daemon)
    try:
        assert daemon.adaptation.base is None and daemon.pipeline is not None and daemon.pipeline.scorer is None
        assert not cfg.base_dir.exists()
        aside = list(cfg.base_dir.parent.glob("base.old-format-*"))
        assert len(aside) == 1 and (aside[0] / "model.safetensors").exists()
        assert daemon.adaptation.adapters.current_version() is None
    finally:
        daemon.stop()
