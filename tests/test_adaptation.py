"""The update path's owner and its typed records: which adapter may serve, and what a result says."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_daemon.adaptation.commands import handle_rollback
from edge_daemon.adaptation.owner import Adaptation
from edge_daemon.artifacts.adapters import AdapterStore
from edge_daemon.artifacts.base import load_base, save_base
from edge_daemon.artifacts.merge import serving_model
from edge_daemon.errors import AdapterError
from edge_daemon.frames import NormStats
from edge_daemon.model import Forecaster, ForecasterConfig
from edge_daemon.config import Config
from edge_daemon.memory.watchdog import MemoryWatchdog
from edge_daemon.mqtt.ingestor import Ingestor
from edge_daemon.pipeline import ScoringPipeline
from edge_daemon.store import Reading, ReplayStore
from edge_daemon.training.worker import WorkerForker
from edge_daemon.training.plan import TrainingPlan
from edge_daemon.training.records import AdapterMeta, JobResult, Progress, UpdateJob
from edge_daemon.training.governor import UpdateOutcome
from edge_daemon.memory.pressure import Level
from tests.conftest import CHANNELS, make_config, save_random_peft_adapter

torch.set_num_threads(1)
TARGETS = ["blocks.0.attn.qkv", "head"]


def _save_base(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(n_channels=3)).eval()
    norm = NormStats(np.array([20.0, 0.5, 3.0]), np.array([2.0, 0.1, 0.4]))
    save_base(directory, model, norm, CHANNELS, 1.0, np.ones(3), {})


def _commit(store: AdapterStore, model: torch.nn.Module, meta: AdapterMeta, seed: int) -> int:
    staging = store.staging_dir()
    save_random_peft_adapter(model, staging, TARGETS, seed=seed)
    return store.commit(staging, meta, make_current=False).version


def test_an_adapter_of_another_base_is_not_served_and_a_rollback_to_it_leaves_current(tmp_path: Path) -> None:
    """An adapter's LoRA deltas fit the weights it was trained on: merged into a new base they make
    a model nobody validated. The meta records the base; serving refuses another's, and a rollback
    to one fails before `current` moves."""
    config = make_config(tmp_path)
    _save_base(config.base_dir, seed=0)
    base = load_base(config.base_dir, CHANNELS, 1.0)
    store = AdapterStore(config.adapters_dir)
    ours = _commit(store, base.model, AdapterMeta(reason="requested", base_fingerprint=base.fingerprint), seed=1)
    older = _commit(store, base.model, AdapterMeta(reason="requested", base_fingerprint="0" * 16), seed=2)
    unrecorded = _commit(store, base.model, AdapterMeta(reason="shipped"), seed=3)
    store.make_current(ours)

    assert serving_model(base, store.get(ours)) is not None
    assert serving_model(base, store.get(unrecorded)) is not None  # from before bases were recorded
    with pytest.raises(AdapterError, match="trained on base"):
        serving_model(base, store.get(older))

    published: list[Any] = []
    pipeline = ScoringPipeline(config, lambda *args, **kwargs: published.append(args))
    adaptation = _adaptation(config, store, pipeline)
    adaptation.start()
    scorer = pipeline.scorer
    assert scorer is not None and scorer.version == ours and adaptation.base is not None
    with pytest.raises(AdapterError, match="trained on base"):
        handle_rollback(adaptation, {"cmd": "rollback", "version": older})
    assert store.current_version() == ours and scorer.version == ours
    # A rollback it can serve moves both.
    handle_rollback(adaptation, {"cmd": "rollback", "version": unrecorded})
    assert store.current_version() == unrecorded and scorer.version == unrecorded


def _adaptation(config: Config, adapters: AdapterStore, pipeline: ScoringPipeline) -> Adaptation:
    """The update path over real parts, none of them started (nothing here trains)."""
    forker = WorkerForker()
    replay = ReplayStore(config.store_path, config.store, config.channels.names)
    return Adaptation(
        config, threading.Event(), adapters=adapters, forker=forker, serving=pipeline, drift=pipeline.drift_signal,
        scored_steps=lambda: pipeline.steps, memory=MemoryWatchdog.from_config(config.memory, shared_level=forker.level),
        replay=replay, ingest=Ingestor(config, replay), publish_status=lambda: None,
    )  # fmt: skip


def test_new_windows_count_the_scored_steps_since_an_update_started(tmp_path: Path) -> None:
    """The scoring thread only counts its steps; the update path keeps its own mark."""
    config = make_config(tmp_path)
    pipeline = ScoringPipeline(config, lambda *args, **kwargs: None)
    adaptation = _adaptation(config, AdapterStore(config.adapters_dir), pipeline)
    names = config.channels.names
    pipeline.feed([Reading(name, 1_800_000_000.0 + t, 1.0) for t in range(30) for name in names])
    assert pipeline.steps > 0 and adaptation.new_windows.count == pipeline.steps
    adaptation.new_windows.reset()
    assert adaptation.new_windows.count == 0
    pipeline.feed([Reading(name, 1_800_000_030.0 + t, 1.0) for t in range(10) for name in names])
    assert adaptation.new_windows.count == 10


def test_meta_keeps_what_a_newer_writer_added(tmp_path: Path) -> None:
    meta = AdapterMeta.from_json({"reason": "drift detected", "val_loss": 0.12, "written_by_v2": {"x": 1}})
    assert meta.reason == "drift detected" and meta.val_loss == 0.12
    assert meta.to_json()["written_by_v2"] == {"x": 1}
    assert AdapterMeta.from_json(meta.to_json()) == meta


def test_status_reports_when_a_job_finished_not_when_it_was_asked() -> None:
    plan = TrainingPlan(8, 4, True, "adamw")
    job = UpdateJob("update", "requested", candidates=(plan,)).started()
    result = JobResult(
        "update", accepted=False, reason="recent loss 0.2 -> 0.3 does not improve", job=job,
        outcome=UpdateOutcome(plan, plan, Level.HIGH, False), finished_unix=1_000_000.0,
    )  # fmt: skip
    shown = result.to_json()
    assert shown["finished"] == "1970-01-12T13:46:40+00:00"
    assert shown["outcome"] == {"start_plan": plan.to_dict(), "final_plan": plan.to_dict(), "worst_level": "high", "stopped": False}
    assert result.ran_to_end and not result.stopped_for_memory
    assert "candidates" not in job.to_json() and job.to_json()["started"] is not None
    assert Progress("training", plan=plan, step=3).to_json() == {"phase": "training", "plan": plan.to_dict(), "step": 3}


def test_without_a_base_baselines_are_served_and_fitted_again_once_the_data_has_doubled(tmp_path: Path) -> None:
    """No base: start() serves baselines fitted on the store; a check on the same data keeps them,
    and once the stored span has doubled they are fitted again on it."""
    config = make_config(tmp_path, model={"window": 16})
    pipeline = ScoringPipeline(config, lambda *args, **kwargs: None)
    adaptation = _adaptation(config, AdapterStore(config.adapters_dir), pipeline)
    replay = adaptation.replay
    rng = np.random.default_rng(0)
    start = 1_800_000_000.0

    def store(first: int, last: int) -> None:
        replay.write([Reading(name, start + t, float(np.sin(t / 30) + 0.05 * rng.normal())) for t in range(first, last) for name in CHANNELS])  # type: ignore[attr-defined]

    store(0, 600)
    adaptation.start()
    first = pipeline.scorer
    assert first is not None and first.base.stand_in and adaptation.base is None
    assert first.base.meta["data_end"] <= start + 600
    adaptation.serve_stand_in()
    assert pipeline.scorer is first  # nothing new to fit on
    store(600, 1000)  # 1,000 s stored: not yet twice the 600 s fitted on
    adaptation.serve_stand_in()
    assert pipeline.scorer is first
    store(1000, 1300)  # now more than twice
    adaptation.serve_stand_in()
    again = pipeline.scorer
    assert again is not first and again is not None and again.base.stand_in
    assert again.base.meta["data_end"] > first.base.meta["data_end"] + 600
