"""Memory pressure on a running daemon: a real hog during an update, and a real cgroup limit.

The first test runs the daemon in this process with tests/memhog.py as a
child, so the hog counts in the process tree the watchdog watches; the second
runs `python -m edge_daemon run` inside a memory cgroup of its own (skipped
where none can be created) and trains under a limit just above serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_daemon.broker import LocalBroker
from edge_daemon.config import Config
from edge_daemon.control.client import request
from edge_daemon.daemon import Daemon
from edge_daemon.frames import build_grid
from edge_daemon.training.pretrain import pretrain
from edge_daemon.memory.budget import cgroup_usage_mb
from edge_daemon.memory.pressure import Level
from sample_sensors.generate import CHANNELS, generate_labeled, readings
from tests.conftest import make_config, start_daemon
from tests.support import config_toml, daemon_status, wait_for
from tests.test_end_to_end import publish_steps
from tests.cgroups import MemoryCgroup
from tests.test_watchdog import MemHog, memhog, memory_cgroup  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
HISTORY_STEPS = 1200  # readings per channel stored before the update
LATER_STEPS = 300  # published while memory is under pressure
PRETRAIN_STEPS = 40  # the base only has to exist; its accuracy is not under test here
# Every wait below is for an event; its timeout only bounds a hang, so it is generous enough
# for a loaded machine (the training worker runs at nice 10).
HANG_S = 300


def _sections(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A small model and an update that runs until stopped (or long enough to be squeezed)."""
    sections: dict[str, dict[str, Any]] = {
        "model": {"window": 32, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64},
        "train": {
            "steps": 100_000,
            "batch_size": 16,
            "micro_batch": 16,
            "check_interval_s": 0.3,
            "idle_cpu_percent": 100,
            "idle_window_s": 1,
            "min_interval_s": 0,
            "start_on": ["request"],  # neither drift nor new data: only the test's request starts one
            "recent_hours": 600 / 3600,
            "gate_tolerance": 5.0,
            "stop_timeout_s": 10,
        },
        "outputs": {"forecast_every": 0, "status_interval_s": 5},
        "store": {"segment_s": 300},
        "memory": {"sample_interval_s": 0.05},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


def _data_and_base(cfg: Config, seed: int) -> Any:
    total = HISTORY_STEPS + LATER_STEPS
    data = generate_labeled(total, start_ts=float(int(time.time()) - total - 30), seed=seed, time_scale=144)
    grid = build_grid(*readings(data, 0, HISTORY_STEPS), 3, 1.0, 5)
    pretrain(grid, list(CHANNELS), 1.0, cfg.model, cfg.base_dir, steps=PRETRAIN_STEPS)
    return data


class StatusWatcher:
    """Polls `status` over the control socket in a thread, keeping every training plan it sees."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.plans: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                reply = request(self.socket_path, {"cmd": "status"}, timeout=60)
            except Exception:
                self.errors += 1
                continue
            self.last = reply
            plan = (reply.get("training") or {}).get("plan")
            if plan and (not self.plans or self.plans[-1] != plan):
                self.plans.append(plan)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_pressure_during_an_update_tightens_the_plan_and_ingestion_goes_on(
    tmp_path: Path, broker: LocalBroker, memhog: MemHog
) -> None:
    # The update may add as much as the service uses: the loosest plan starts (this test is about
    # the watchdog tightening it), whatever this test process's own footprint.
    cfg = make_config(tmp_path, port=broker.port, **_sections(memory={"update_share": 1.0}))
    data = _data_and_base(cfg, seed=3)
    total = HISTORY_STEPS + LATER_STEPS
    daemon = Daemon(cfg)
    start_daemon(daemon)
    watcher: StatusWatcher | None = None
    publisher: threading.Thread | None = None
    try:
        assert daemon.store is not None and daemon.watchdog is not None and daemon.adaptation is not None
        watchdog, runner, store = daemon.watchdog, daemon.adaptation.runner, daemon.store
        publish_steps(broker.port, data.ts, data.values, 0, HISTORY_STEPS)
        wait_for(lambda: store.count() == 3 * HISTORY_STEPS, HANG_S, "the history stored", detail=lambda: store.count())

        watcher = StatusWatcher(cfg.device.socket)
        reply = request(cfg.device.socket, {"cmd": "train"})
        assert reply["ok"] and reply["accepted"]
        # Training proper: past the child's imports, data and dry-run planning.
        wait_for(lambda: (runner.progress.step or 0) >= 2, HANG_S, "the update's first steps", interval=0.05)
        start_plan = runner.progress.plan.to_dict()
        assert start_plan == {"micro_batch": 16, "accumulation": 1, "checkpointing": False, "optimizer": "adamw", "step_in_backward": False, "forward_only": False}

        # The budget (a config reload) puts the tree - this process, the training worker, the
        # hog - at 60 % of it (the largest of five watchdog samples), then the hog drives the
        # share through each level.
        usage = []
        while len(usage) < 5:
            after = watchdog.samples
            wait_for(lambda after=after: watchdog.samples > after, HANG_S, "a watchdog sample", interval=0.01)
            usage.append(watchdog.usage_mb)
        budget = max(usage) / 0.60
        watchdog.set_configured_budget(budget)
        after = watchdog.samples
        # Two samples on: the level has been computed against the new budget.
        wait_for(lambda: watchdog.budget_mb == budget and watchdog.samples > after + 1, HANG_S, "the new budget", interval=0.01)
        assert watchdog.level == Level.NORMAL, watchdog.snapshot()

        # Readings keep arriving while memory is squeezed.
        publisher = threading.Thread(target=publish_steps, args=(broker.port, data.ts, data.values, HISTORY_STEPS, total))
        publisher.start()

        def squeeze_to(share: float) -> None:
            memhog.hold(memhog.held_mb + share * budget - watchdog.usage_mb)

        def seen(predicate: Any) -> bool:
            return any(predicate(plan) for plan in watcher.plans)

        squeeze_to(0.75)
        wait_for(lambda: watchdog.level == Level.ELEVATED, HANG_S, "elevated", interval=0.02)
        wait_for(lambda: seen(lambda p: p["checkpointing"] and p["micro_batch"] == 16), HANG_S, "checkpointing on", interval=0.05)
        squeeze_to(0.85)
        wait_for(lambda: watchdog.level == Level.HIGH, HANG_S, "high", interval=0.02)
        wait_for(lambda: seen(lambda p: p["micro_batch"] == 8), HANG_S, "the micro-batch halved", interval=0.05)
        assert runner.running, "the update goes on at high"
        critical = cfg.memory.critical + 0.04  # clear of the line, whatever a sample's noise

        def stopped_at_critical() -> bool:
            if runner.last is not None:
                return True
            if watchdog.level < Level.CRITICAL:
                # The hog was sized on one sample; the worker's usage has moved since (on a busy
                # machine its micro-batch halves slowly): size it again.
                squeeze_to(critical)
            return False

        squeeze_to(critical)
        wait_for(stopped_at_critical, HANG_S, "the update to stop at critical", interval=0.25, detail=lambda: watchdog.snapshot())
        memhog.hold(0)

        # Plans only tightened: loose, then checkpointing, then half the micro-batch; with fp32 state,
        # since on this small LoRA 8-bit state saves less than importing bitsandbytes costs.
        assert watcher.plans[0] == start_plan
        assert [(p["micro_batch"], p["accumulation"], p["checkpointing"], p["optimizer"]) for p in watcher.plans[1:3]] == [
            (16, 1, True, "adamw"),
            (8, 2, True, "adamw"),
        ], watcher.plans
        # Stopped cleanly: a result (not a crash), nothing saved, a back-off before the retry.
        last = runner.last
        assert last is not None and last.kind == "update"
        assert last.aborted is True and last.accepted is False and last.version is None, last
        assert "TrainingAborted" in last.error, last
        outcome = last.outcome.to_json()
        assert outcome["stopped"] is True and outcome["worst_level"] == "critical", outcome
        assert outcome["start_plan"] == start_plan
        # Critical first turned it forward-only, the last rung (gradients and optimizer state
        # dropped); critical held on, so it stopped.
        assert outcome["final_plan"]["micro_batch"] <= 8 and outcome["final_plan"]["forward_only"], outcome
        assert not (cfg.adapters_dir / "v1").exists()
        status = request(cfg.device.socket, {"cmd": "status"})
        assert status["training"]["state"] == "paused" and status["training"]["retry_after_s"] > 0
        assert status["training"]["last"]["outcome"]["stopped"] is True

        # The data path never stopped: every reading published under pressure is stored.
        publisher.join(HANG_S)
        wait_for(lambda: store.count() == 3 * total, HANG_S, "the readings published under pressure stored")
        wait_for(lambda: watchdog.level == Level.NORMAL, HANG_S, "normal once the hog freed")
        assert status["memory"]["budget_mb"] == pytest.approx(budget, abs=0.1)
        assert all(part.alive for part in daemon.parts.values())
        assert watcher.errors == 0
    finally:
        if watcher is not None:
            watcher.close()
        if publisher is not None:
            publisher.join(HANG_S)
        daemon.stop()


# ------------------------------------------------------------------ real limit


@contextlib.contextmanager
def _serving_in_a_cgroup(tmp_path: Path, broker: LocalBroker, memory_cgroup: MemoryCgroup, sections: dict[str, dict[str, Any]]) -> Iterator[Serving]:
    """`python -m edge_daemon run` in `memory_cgroup`, its history stored and scored: the serving
    footprint. SIGTERM at the end (exit 0, no OOM kill); the log printed whatever happens."""
    cfg = make_config(tmp_path, port=broker.port, **sections)
    data = _data_and_base(cfg, seed=4)
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_toml(cfg.model_dump(mode="json", include=set(sections) | {"device", "mqtt", "channels"})))
    log_file = tmp_path / "daemon.log"
    with open(log_file, "w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edge_daemon", "run", "--config", str(config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=memory_cgroup.enter_fn(),
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
    try:
        socket_path = cfg.device.socket
        wait_for(lambda: daemon_status(socket_path), HANG_S, "the daemon's control socket")
        publish_steps(broker.port, data.ts, data.values, 0, HISTORY_STEPS)
        wait_for(lambda: (daemon_status(socket_path) or {}).get("store", {}).get("readings") == 3 * HISTORY_STEPS, HANG_S, "the history stored")
        # Scoring has assembled every stored step and scored the newest: the serving footprint.
        newest = float(data.ts[HISTORY_STEPS - 1])

        def scored_all() -> bool:
            scoring = (daemon_status(socket_path) or {}).get("scoring") or {}
            return scoring.get("steps") == HISTORY_STEPS and (scoring.get("last") or {}).get("ts") == newest

        wait_for(scored_all, HANG_S, "scoring to reach the newest step", detail=lambda: (daemon_status(socket_path) or {}).get("scoring"))
        # What the daemon counts is the cgroup's charge (its own figure is checked against the
        # kernel's below); the larger of the two readings leaves the margins below on the safe side.
        serving = daemon_status(socket_path) or {}
        serving_mb = max(memory_cgroup.charge_mb(), serving["memory"]["usage_mb"])
        # Before any update has run, the start rule expects the update's share of the usage.
        assert serving["training"]["expected_worker_measured"] is False
        expected_mb = serving["training"]["expected_worker_mb"]
        assert expected_mb == pytest.approx(cfg.memory.update_share * serving["memory"]["usage_mb"], rel=0.2)
        yield Serving(cfg, daemon, socket_path, serving_mb, expected_mb)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(HANG_S) == 0
        assert memory_cgroup.oom_kills() == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        print(log_file.read_text()[-3000:])


@dataclass
class Serving:
    cfg: Config
    daemon: subprocess.Popen[bytes]
    socket_path: Path
    serving_mb: float  # the cgroup's charge, serving
    expected_mb: float  # what the start rule expects a worker to add


# ~25 s each (a daemon process, its training worker, shutdown): out of the default run.
@pytest.mark.slow
def test_daemon_under_a_cgroup_limit_just_above_serving_trains_without_oom(
    tmp_path: Path, broker: LocalBroker, memory_cgroup: MemoryCgroup
) -> None:
    sections = _sections(train={"steps": 20}, memory={"retry_after_s": 0})
    with _serving_in_a_cgroup(tmp_path, broker, memory_cgroup, sections) as run:
        cfg, daemon, socket_path, serving_mb, expected_mb = run.cfg, run.daemon, run.socket_path, run.serving_mb, run.expected_mb
        critical = cfg.memory.critical
        # Room for only a quarter of the expected worker under the critical line (and for half
        # what an update that starts forward-only, in the service, is expected to add): the
        # trigger holds the request rather than start an update that would stop at once.
        limit_mb = (serving_mb + expected_mb / 4) / critical
        memory_cgroup.set_limit_mb(limit_mb)
        status = wait_for(
            lambda: (s := daemon_status(socket_path)) and abs(s["memory"]["budget_mb"] - limit_mb) < 1 and s, HANG_S, "the cgroup limit as budget"
        )
        assert status["memory"]["budget_source"].startswith(f"cgroup v{memory_cgroup.version}"), status["memory"]

        reply = request(socket_path, {"cmd": "train"})
        assert reply["ok"] and reply["accepted"]
        held = wait_for(
            lambda: (s := daemon_status(socket_path)) and "not enough memory for the training worker" in (s["training"].get("trigger") or "") and s,
            HANG_S, "the request held for lack of memory",
        )  # fmt: skip
        assert held["training"]["state"] == "idle" and held["training"]["last"] is None
        assert daemon.poll() is None and memory_cgroup.oom_kills() == 0
        # Room for the expected worker under the critical line, and a margin.
        limit_mb = (serving_mb + expected_mb) / critical + 16
        memory_cgroup.set_limit_mb(limit_mb)
        levels: set[str] = set()
        plans: list[dict[str, Any]] = []
        counted: list[tuple[float, float, str]] = []  # (the watchdog's usage, the kernel's charge, how counted)

        def finished() -> dict[str, Any] | None:
            s = daemon_status(socket_path)
            if s is None:
                return None
            kernel = cgroup_usage_mb(memory_cgroup.path)
            if kernel is not None:
                counted.append((s["memory"]["usage_mb"], kernel, s["memory"]["usage_source"]))
            levels.add(s["memory"]["level"])
            plan = s["training"]["plan"]
            if plan and (not plans or plans[-1] != plan):
                plans.append(plan)
            return s["training"]["last"]

        last = wait_for(finished, HANG_S, "the update to end", interval=0.1)
        peak_mb = int((memory_cgroup.path / "memory.max_usage_in_bytes").read_text()) / 2**20 if memory_cgroup.version == 1 else None
        print(
            f"serving {serving_mb:.0f} MB, limit {limit_mb:.0f} MB, cgroup peak {peak_mb} MB, levels {sorted(levels)}, "
            f"plans {plans}, outcome {last['outcome']}, accepted {last['accepted']}, version {last['version']}, "
            f"reason {last['reason']}"
        )
        assert daemon.poll() is None, "the daemon must survive its update"
        # Neither the daemon nor its worker loaded peft, transformers, bitsandbytes, torch._dynamo or sympy.
        assert daemon_status(socket_path)["training"]["heavy_modules"] == []
        (trace,) = [json.loads(p.read_text()) for p in (Path(cfg.device.state_dir) / "updates").glob("*.json")]
        assert trace["worker_imports"] == [], trace["worker_imports"]
        # Nor did the worker import anything the helper had not: all it runs was shared at the fork.
        assert trace["worker_new_modules"] == [], trace["worker_new_modules"]
        assert memory_cgroup.oom_kills() == 0
        assert last["kind"] == "update", last
        # Throughout the update the watchdog counted what the kernel charged (read a sample period apart).
        assert {how for _, _, how in counted} == {"cgroup limit"}, counted
        gaps = sorted(abs(usage - kernel) / kernel for usage, kernel, _ in counted)
        assert gaps[len(gaps) // 2] < 0.10, counted
        # With room for the child the update runs to its end: not stopped at a boundary, not crashed.
        outcome = last["outcome"]
        assert outcome is not None and outcome["stopped"] is False, last
        assert outcome["worst_level"] in ("normal", "elevated", "high"), outcome
        # ...and is gated: both sides of the comparison measured, then accepted with a version
        # that is on disk, or rejected with the gate's reason and nothing saved.
        assert last["metrics_before"] and last["metrics_after"], last
        if last["accepted"]:
            assert isinstance(last["version"], int) and (cfg.adapters_dir / f"v{last['version']}").is_dir(), last
        else:
            assert last["version"] is None and "rejected" in last["reason"] and last["gate"] is not None, last
            assert not (cfg.adapters_dir / "v1").exists()


@pytest.mark.slow
def test_daemon_with_room_for_a_forward_only_update_only_runs_one_in_the_service(
    tmp_path: Path, broker: LocalBroker, memory_cgroup: MemoryCgroup
) -> None:
    """Under a limit that leaves room under the critical line for what an update that starts
    forward-only is expected to add, but not for a worker: the update starts forward-only on a
    thread of the daemon (no worker forked), trains to the gate and ends unstopped, no OOM kill."""
    sections = _sections(train={"steps": 10}, memory={"retry_after_s": 0})
    with _serving_in_a_cgroup(tmp_path, broker, memory_cgroup, sections) as run:
        socket_path = run.socket_path
        # Three quarters of the worker's expected increment: a worker does not fit, and an update
        # in the service, expected to add half of it, does.
        limit_mb = (run.serving_mb + 0.75 * run.expected_mb) / run.cfg.memory.critical
        memory_cgroup.set_limit_mb(limit_mb)
        wait_for(lambda: (s := daemon_status(socket_path)) and abs(s["memory"]["budget_mb"] - limit_mb) < 1, HANG_S, "the cgroup limit as budget")
        reply = request(socket_path, {"cmd": "train"})
        assert reply["ok"] and reply["accepted"]
        jobs: list[dict[str, Any]] = []

        def finished() -> dict[str, Any] | None:
            s = daemon_status(socket_path)
            if s is None:
                return None
            if s["training"]["job"]:
                jobs.append(s["training"]["job"])
            return s["training"]["last"]

        last = wait_for(finished, HANG_S, "the update to end", interval=0.1)
        print(f"serving {run.serving_mb:.0f} MB, limit {limit_mb:.0f} MB, last {last}")
        assert jobs and all(job["in_service"] for job in jobs), jobs
        outcome = last["outcome"]
        assert outcome is not None and outcome["start_plan"]["forward_only"] and outcome["stopped"] is False, last
        assert "forward_only" in last["techniques"] and last["metrics_before"] and last["metrics_after"], last
        # No worker was forked: the trace of an update in the service records no worker's modules.
        (trace,) = [json.loads(p.read_text()) for p in (Path(run.cfg.device.state_dir) / "updates").glob("*.json")]
        assert trace["worker_new_modules"] is None and any(v is not None for v in trace["samples"]["service_mb"]), trace["samples"]
        assert run.daemon.poll() is None and memory_cgroup.oom_kills() == 0
