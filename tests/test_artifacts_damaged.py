"""Adapters and the base carry the sha256 of their files, checked before they are served: a byte
flipped on the card is never merged into a forecast. A damaged current adapter gives way to the
newest earlier version that is intact (or the base), a damaged base is moved aside for a new one
trained from the store, the best baseline served meanwhile; each with an alert, the daemon
running on. Real files, a real broker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_daemon.artifacts.adapters import AdapterDamagedError, AdapterStore, check_adapter
from edge_daemon.artifacts.base import load_base, save_base
from edge_daemon.artifacts.merge import serving_model
from edge_daemon.broker import LocalBroker
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.errors import AdapterError, BaseDamagedError
from edge_daemon.frames import NormStats
from edge_daemon.model import Forecaster, ForecasterConfig
from edge_daemon.training.records import AdapterMeta
from tests.conftest import CHANNELS, make_config, save_random_peft_adapter, start_daemon
from tests.support import AlertSubscriber, publish_motor, wait_for

torch.set_num_threads(1)
HANG_S = 120.0  # bounds a hang only


def flip_byte(path: Path, offset: int | None = None) -> None:
    """One byte of `path` inverted (in the middle by default): what a worn card does to a file."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def saved_base(directory: Path) -> Any:
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=3, window=16, d_model=32, n_layers=2, d_ff=64)).eval()
    norm = NormStats(np.array([20.0, 0.5, 3.0]), np.array([2.0, 0.1, 0.4]))
    save_base(directory, model, norm, list(CHANNELS), 1.0, np.ones(3, dtype=np.float32), {"steps": 1})
    return load_base(directory, list(CHANNELS), 1.0)


def commit_adapter(store: AdapterStore, base: Any, seed: int) -> Any:
    staging = store.staging_dir()
    save_random_peft_adapter(base.model, staging, ["blocks.0.attn.qkv", "blocks.1.fc2"], seed=seed)
    version = store.commit(staging, AdapterMeta(base_fingerprint=base.fingerprint, val_loss=0.1))
    return version


def test_a_flipped_byte_in_the_base_is_refused_and_an_older_base_still_loads(tmp_path: Path) -> None:
    saved_base(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert set(config["sha256"]) == {"model.safetensors", "norm.json"}
    flip_byte(tmp_path / "base" / "model.safetensors")
    with pytest.raises(BaseDamagedError, match="model.safetensors"):
        load_base(tmp_path / "base", list(CHANNELS), 1.0)
    # A base saved before checksums were recorded is loaded as it is.
    saved_base(tmp_path / "older")
    config = json.loads((tmp_path / "older" / "config.json").read_text())
    del config["sha256"]
    (tmp_path / "older" / "config.json").write_text(json.dumps(config))
    assert load_base(tmp_path / "older", list(CHANNELS), 1.0).cfg.window == 16


def test_a_flipped_byte_in_an_adapter_is_never_merged_nor_rolled_back_to(tmp_path: Path) -> None:
    base = saved_base(tmp_path / "base")
    store = AdapterStore(tmp_path / "adapters")
    first, second = commit_adapter(store, base, 1), commit_adapter(store, base, 2)
    assert set(second.meta.sha256) == {"adapter_config.json", "adapter_model.safetensors"}
    check_adapter(second)
    serving_model(base, second)
    flip_byte(second.path / "adapter_model.safetensors")
    with pytest.raises(AdapterDamagedError, match="adapter_model.safetensors"):
        serving_model(base, store.get(second.version))
    with pytest.raises(AdapterError):
        store.rollback(second.version)
    assert store.rollback(first.version).version == first.version


def test_a_damaged_current_adapter_gives_way_to_the_newest_intact_one(tmp_path: Path, broker: LocalBroker) -> None:
    config = make_config(tmp_path, port=broker.port, model={"window": 16, "d_model": 32, "n_layers": 2, "d_ff": 64})
    base = saved_base(config.base_dir)
    store = AdapterStore(config.adapters_dir)
    versions = [commit_adapter(store, base, seed) for seed in (1, 2, 3)]
    flip_byte(versions[2].path / "adapter_model.safetensors")  # the current one
    flip_byte(versions[1].path / "adapter_config.json", offset=2)  # and the one before it
    alerts = AlertSubscriber(broker.port)
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        alert = wait_for(lambda: alerts.of("adapter_damaged"), HANG_S, "the adapter_damaged alert")
        assert alert["version"] == 3 and alert["serving"] == 1 and "adapter_model.safetensors" in alert["problem"], alert
        status = request(config.device.socket, {"cmd": "status"})
        assert status["adapter"]["version"] == 1, status["adapter"]
        assert AdapterStore(config.adapters_dir).current_version() == 1  # the pointer moved: a restart serves v1 too
        publish_motor(broker.port, float(int(time.time()) - 600), 200)
        assert daemon.store is not None
        wait_for(lambda: daemon.store.count() >= 600, HANG_S, "every reading stored", detail=lambda: daemon.store.count())
    finally:
        daemon.stop()
        alerts.close()


def test_a_damaged_base_is_moved_aside_and_the_daemon_runs_on(tmp_path: Path, broker: LocalBroker) -> None:
    config = make_config(tmp_path, port=broker.port, model={"window": 16, "d_model": 32, "n_layers": 2, "d_ff": 64})
    base = saved_base(config.base_dir)
    commit_adapter(AdapterStore(config.adapters_dir), base, 1)
    flip_byte(config.base_dir / "model.safetensors")
    alerts = AlertSubscriber(broker.port)
    forecasts = AlertSubscriber(broker.port, "edge/+/forecast")
    daemon = Daemon(config)
    start_daemon(daemon)
    try:
        alert = wait_for(lambda: alerts.of("base_damaged"), HANG_S, "the base_damaged alert")
        moved = Path(alert["moved_to"])
        assert moved.is_dir() and (moved / "model.safetensors").is_file() and not config.base_dir.exists(), alert
        assert "model.safetensors" in alert["problem"]
        status = request(config.device.socket, {"cmd": "status"})
        assert status["adapter"]["version"] is None and AdapterStore(config.adapters_dir).current_version() is None
        start = float(int(time.time()) - 900)
        publish_motor(broker.port, start, 450)  # enough for the baselines' held-out judgement (30 windows)
        assert daemon.store is not None
        wait_for(lambda: daemon.store.count() >= 1350, HANG_S, "every reading stored", detail=lambda: daemon.store.count())
        # Until a new base is trained, the best baseline fitted on the stored readings is served.
        serving = wait_for(
            lambda: (request(config.device.socket, {"cmd": "status"})["scoring"]["serving"] or {}).get("baselines_only"),
            HANG_S, "baselines served", detail=lambda: request(config.device.socket, {"cmd": "status"})["scoring"],
        )  # fmt: skip
        assert serving
        publish_motor(broker.port, start + 450, 100, client_name="later")
        wait_for(lambda: len(forecasts.received) >= 20, HANG_S, "forecasts", detail=lambda: len(forecasts.received))
        made_by = {f["model"] for f in forecasts.received}
        assert made_by <= {"persistence", "seasonal_naive", "ridge", "mixed"} and all(f["adapter_version"] is None for f in forecasts.received), made_by
        status = request(config.device.socket, {"cmd": "status"})
        assert status["adapter"]["base"] is False and status["scoring"]["serving"]["baselines_only"], status["scoring"]
        assert "model" not in status["scoring"]["serving"]["mae"]
        assert all(part.alive for part in daemon.parts.values())
    finally:
        daemon.stop()
        alerts.close()
        forecasts.close()
