"""Live scoring under a clock that is never trusted: a reading stamped a day ahead waits in the
hold (not scored), one stamped in the year 5138 is rejected at once, and scoring keeps up with
the stream around them. A real broker, the real Ingestor and ScoringPipeline, a real model."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import torch

from conftest import CHANNELS
from edge_daemon.artifacts.base import BaseModel, load_base
from edge_daemon.broker import LocalBroker
from edge_daemon.config import ModelConfig
from edge_daemon.frames import Grid
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.training.pretrain import pretrain
from edge_daemon.scoring.serving import Scorer, ServingRule
from edge_daemon.store import ReplayStore
from test_ingest import HANG_S, config_for, publisher, wait_for

torch.set_num_threads(1)

TINY = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
DAY = 86400.0
STEPS = 600
INJECT_AFTER = 300  # the two bad readings come between this step's message and the next


def _values(k: int) -> list[float]:
    return [20.0 + 3.0 * np.sin(2 * np.pi * k / 40), 1.0 + 0.5 * np.cos(2 * np.pi * k / 25), 3.0 + 0.1 * (k % 5)]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    out = tmp_path_factory.mktemp("clock-scoring") / "base"
    series = np.array([_values(k) for k in range(2000)], dtype=np.float32)
    pretrain(Grid(0.0, 1.0, series), CHANNELS, 1.0, TINY, out, steps=200, lr=1e-2)
    return load_base(out)


def test_readings_no_clock_explains_never_move_live_scoring(tmp_path: Path, broker: LocalBroker, base: BaseModel) -> None:
    config = config_for(tmp_path, broker, clock_trust="never")
    store = ReplayStore(config.store_path, config.store, config.channels.names)
    scorer = Scorer(base, copy.deepcopy(base.model), anomaly_threshold=6.0, rule=ServingRule(mode="model"))
    pipeline = ScoringPipeline(config, lambda *args: None, scorer, held_rows=lambda: store.held_rows)
    ingestor = Ingestor(config, store)
    handed: list[int] = [0]
    ingestor.on_readings.append(pipeline.on_batch)  # as the daemon wires it
    ingestor.on_readings.append(lambda readings: handed.__setitem__(0, handed[0] + len(readings)))
    pipeline.start()
    ingestor.start()
    try:
        assert ingestor.wait_subscribed(HANG_S)
        # A regular 1 s series near the device clock (the last ten minutes), as fast as the broker takes it.
        start = float(int(time.time()) - STEPS)
        pub = publisher(broker, "pub-clock-scoring")
        infos: list[mqtt.MQTTMessageInfo] = []
        for k in range(STEPS):
            values = dict(zip(("temperature", "vibration", "current"), _values(k), strict=True))
            infos.append(pub.publish("sensors/m1", json.dumps({"ts": start + k, "values": values}), qos=1))
            if k == INJECT_AFTER:
                day_ahead = time.time() + DAY
                infos.append(pub.publish("sensors/m1/temperature", json.dumps({"ts": day_ahead, "value": 21.0}), qos=1))
                infos.append(pub.publish("sensors/m1/temperature", json.dumps({"ts": 1e11, "value": 21.0}), qos=1))
        for info in infos:
            info.wait_for_publish(HANG_S)
        pub.loop_stop()
        pub.disconnect()

        last = start + STEPS - 1
        stats = pipeline.assembler.stats

        def done() -> bool:
            """The last step scored (the clock completes it once readings stop), or every reading
            handed over assembled with some of them late: scoring will not catch up."""
            assembled = stats.accepted + stats.late + stats.outliers + pipeline.assembler.set_aside
            return bool(pipeline.history and pipeline.history[-1][0] >= last) or (assembled >= handed[0] >= STEPS * 3 and stats.late > 0)

        wait_for(lambda: ingestor.counters()["received"] == STEPS + 2, HANG_S, "every message")
        wait_for(done, HANG_S, "scoring to reach the end of the stream")
        counters = ingestor.counters()
        # The year-5138 reading no clock error explains: rejected at once, never held.
        assert counters["rejected_by_reason"] == {"future": 1}
        # The day-ahead one waits in the hold, and scoring never saw it.
        assert counters["held"] == 1 and store.held_rows == 1 and counters["clock"]["trusted"] is False
        assert handed[0] == STEPS * 3
        following = [t for t, _, _ in pipeline.history if start + INJECT_AFTER < t <= last]
        expected = STEPS - 1 - INJECT_AFTER
        assert len(following) >= 0.99 * expected, f"{len(following)} of the {expected} steps after the injection scored"
        assert max(t for t, _, _ in pipeline.history) == last
        status = pipeline.status()
        assert status["late_readings"] == 0 and status["last_late"] is None
        assert status["outliers"] == 0 and status["set_aside"] == 0 and status["held"] == 1 and status["stalled"] is None
        assert pipeline.newest_ts == last
    finally:
        ingestor.stop()
        pipeline.stop()
        store.close()
