"""The demo: the whole mission on a fresh machine in a few minutes.

Starts a broker if none answers (mosquitto, else amqtt), trains a base model
on the sample motor's old regime, runs the daemon on a temporary state
directory, replays the motor over MQTT with a bearing-wear regime change and
a share of malformed messages, and shows the daemon detect drift, adapt when
idle and serve the new adapter. Ends with a summary table.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from edge_daemon.broker import LocalBroker
from edge_daemon.config import Config, parse_config
from edge_daemon.errors import EdgeDaemonError

if TYPE_CHECKING:
    from edge_daemon.artifacts.traces import UpdateTraceJson
    from edge_daemon.mqtt.outputs import Alert
    from edge_daemon.control.replies import MemoryStatus

log = logging.getLogger(__name__)

CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]


def demo_config(state_dir: Path, port: int, quick: bool) -> Config:
    return parse_config(
        {
            "device": {"id": "demo-motor", "state_dir": str(state_dir), "socket": str(state_dir / "control.sock")},
            "mqtt": {"host": "127.0.0.1", "port": port, "topics": ["sensors/#"], "qos": 1},
            "channels": {"names": CHANNELS, "period_s": 1.0},
            # Commits every 2 s rather than 30: the demo's readings come 20x faster than real
            # time, and its summary counts them stored a moment after the last is sent.
            "store": {"flush_interval_s": 2.0},
            "model": {"window": 32, "d_model": 32, "n_layers": 2, "d_ff": 64} if quick else {},
            "train": {
                "steps": 40 if quick else 60,
                "batch_size": 16 if quick else 32,
                "micro_batch": 16 if quick else 32,
                "check_interval_s": 1.0,
                "idle_cpu_percent": 100.0,  # the demo's own publisher keeps the CPU busy
                "idle_window_s": 3.0,
                "min_interval_s": 30.0,
                "min_new_windows": 10**6,  # adapt on drift, the point of the demo
                "recent_hours": 900 / 3600,
                "gate_tolerance": 0.5,
            },
            # The sample motor's day lasts 600 steps here (time_scale 144): drift windows hold one.
            "drift": {"input_window_s": 600, "residual_window_s": 600},
            "outputs": {"forecast_every": 10, "status_interval_s": 2.0},
        }
    )


def run_demo(
    old_steps: int = 2400,
    new_steps: int = 900,
    after_steps: int = 400,
    malformed: float = 0.02,
    quick: bool = True,
    state_dir: Path | None = None,
    report_dir: Path | None = None,
    live: bool = True,
    timeout_s: float = 300.0,
) -> DemoSummary:
    """Run the demo end to end; returns the summary (also printed as a table when `live`)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edge_daemon.daemon import Daemon
    from edge_daemon.frames import build_grid
    from edge_daemon.training.pretrain import pretrain
    from sample_sensors.generate import generate_labeled, readings
    from sample_sensors.publish import malformed_message, valid_messages

    workdir = Path(state_dir or tempfile.mkdtemp(prefix="edge-demo-"))
    # Always a broker of its own on a free port: a broker already on 1883 may hold queued
    # messages of an earlier run's persistent session, which would mix into this one.
    (workdir / "broker").mkdir(parents=True, exist_ok=True)
    broker = LocalBroker(workdir=workdir / "broker")
    broker.start()
    port = broker.port
    config = demo_config(workdir / "state", port, quick)
    total = old_steps + new_steps + after_steps
    # From the last midnight (UTC) before the readings must start: the motor's daily load cycle
    # (144 s of its time per step) is then in the same phase in every run, whatever the hour.
    start_ts = float((int(time.time()) - total - 10) // 86400 * 86400)
    data = generate_labeled(total, start_ts=start_ts, seed=7, regime_change_at=old_steps, time_scale=144)
    summary: DemoSummary = {"state_dir": str(workdir), "broker": broker.kind}
    console = None
    if live:
        from rich.console import Console

        console = Console()
        console.rule("edge-daemon demo")
        console.print(f"broker: {summary['broker']} on 127.0.0.1:{port}; state dir {workdir}")

    # 1. Base model trained on the old regime, as a fleet's base would be.
    t0 = time.monotonic()
    grid = build_grid(*readings(data, 0, old_steps), len(CHANNELS), 1.0, config.channels.max_fill_steps)
    base_metrics = pretrain(grid, CHANNELS, 1.0, config.model, config.base_dir, steps=500 if quick else None, progress=live)
    summary["base_train_s"] = round(time.monotonic() - t0, 1)
    summary["base_val_loss"] = base_metrics.get("val_loss")

    alerts: list[Alert] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edge-demo-watcher")
    sub.on_message = lambda c, u, m: alerts.append(json.loads(m.payload)) if m.topic.endswith("/alert") else None
    sub.connect("127.0.0.1", port)
    sub.subscribe(f"edge/{config.device.id}/alert", qos=1)
    sub.loop_start()

    daemon = Daemon(config)
    daemon.start()
    # Publish only once the daemon's subscription is granted: a fresh session gets nothing before.
    assert daemon.ingestor is not None
    if not daemon.ingestor.wait_subscribed(30):
        daemon.stop()
        raise EdgeDaemonError(f"the daemon did not subscribe to the demo broker on port {port} within 30 s")
    rng = np.random.default_rng(7)
    sent = {"valid_readings": 0, "malformed": 0}

    def publish_range(begin: int, end: int) -> None:
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-demo-publisher-{begin}")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        infos = []
        for k in range(begin, end):
            readings = {c: float(data.values[c][k]) for c in CHANNELS}
            for message in valid_messages(float(data.ts[k]), readings, "values"):
                infos.append(pub.publish(message.topic, message.payload, qos=1))
            sent["valid_readings"] += 3
            if rng.random() < malformed:
                bad = malformed_message(str(rng.choice(["bad_json", "nan", "string_value", "unknown_channel", "ancient_ts", "deep_nesting"])), float(data.ts[k]), rng)
                infos.append(pub.publish(bad.topic, bad.payload, qos=1))
                sent["malformed"] += 1
        for info in infos:
            info.wait_for_publish(60)
        pub.loop_stop()
        pub.disconnect()

    stop_watch = threading.Event()
    try:
        publisher = threading.Thread(target=publish_range, args=(0, old_steps + new_steps), name="demo-publisher")
        publisher.start()
        deadline = time.monotonic() + timeout_s
        accepted_at = None
        progress = _live_view(console, daemon, alerts) if console else None
        with progress if progress is not None else _Null():
            while time.monotonic() < deadline:
                if progress is not None:
                    progress.update(_render(daemon, alerts))
                if any(a.get("type") == "adapter_accepted" for a in alerts) and not publisher.is_alive():
                    accepted_at = time.monotonic()
                    break
                time.sleep(0.5)
            publisher.join()
            if accepted_at is not None:
                publish_range(old_steps + new_steps, total)
                end = time.monotonic() + 60
                while time.monotonic() < end and daemon.store.count() < 3 * total:
                    if progress is not None:
                        progress.update(_render(daemon, alerts))
                    time.sleep(0.5)
                time.sleep(2.0)
        status = daemon._status({})
        memory = status["memory"]
        last = status["training"]["last"] or {}
        summary.update(
            {
                "readings_sent": sent["valid_readings"],
                "readings_stored": status["store"]["readings"],
                "readings_lost": sent["valid_readings"] - status["store"]["readings"],
                "malformed_sent": sent["malformed"],
                "rejected": status["ingest"]["rejected"],
                "drift_alerts": sum(1 for a in alerts if a.get("type") == "drift"),
                "adapter_version": status["adapter"]["version"],
                "adapter_bytes": status["adapter"]["size_bytes"],
                "update_accepted": bool(last.get("accepted")),
                "update_reason": ran.job.reason if daemon.adaptation and (ran := daemon.adaptation.runner.last) and ran.job else None,
                # Memory as the daemon's watchdog counts it (the kernel's charge of its cgroup, or
                # the PSS of its process tree: `memory_source`). The demo process hosts the daemon
                # (and the broker it started): its usage at the end, the update child gone, is what
                # serving costs here; the update's figures are from its trace.
                "memory_source": memory.get("usage_source"),
                "serving_mb": memory.get("usage_mb"),
                "metrics_before": last.get("metrics_before"),
                "metrics_after": last.get("metrics_after"),
            }
        )
    finally:
        stop_watch.set()
        daemon.stop()
        sub.loop_stop()
        sub.disconnect()
        broker.stop()
    # The anomaly scores and the report come from one replay of the store (report.data.collect):
    # the summary's scores are the report's statistics over the same steps.
    from edge_daemon.report.data import collect

    try:
        report_data = collect(config)
    except EdgeDaemonError as exc:
        log.warning("no replay of the store: %s", exc)
        report_data = None
    version = summary.get("adapter_version")
    summary.update(_replayed_scores(report_data, float(data.ts[old_steps + 100]), version))
    summary.update(_update_memory(report_data.updates if report_data is not None else [], version))
    summary["report"] = _write_report(config, Path(report_dir) if report_dir is not None else workdir / "report", report_data)
    if live and console is not None:
        _print_summary(console, summary)
    return summary


class ReplayedScores(TypedDict):
    score_before: float | None  # mean anomaly score of the base on the new regime
    score_after: float | None  # of the adapter while it was in use


class UpdateMemory(TypedDict):
    update_peak_mb: float | None  # the service's peak while the accepted update ran
    update_added_mb: float | None  # what it added to the usage before it


class DemoSummary(ReplayedScores, UpdateMemory, total=False):
    """What `run_demo` returns (and prints as a table when live); filled in as the demo runs."""

    state_dir: str
    broker: str
    base_train_s: float
    base_val_loss: float | None
    readings_sent: int
    readings_stored: int
    readings_lost: int
    malformed_sent: int
    rejected: int
    drift_alerts: int
    adapter_version: int | None
    adapter_bytes: int
    update_accepted: bool
    update_reason: str | None
    memory_source: str | None  # how the watchdog counts memory: "pss" or "cgroup"
    serving_mb: float | None
    metrics_before: dict[str, float | None] | None
    metrics_after: dict[str, float | None] | None
    report: str | None


def _replayed_scores(data: Any, new_regime_from: float, version: int | None) -> ReplayedScores:
    """Mean anomaly score of the model in use, replayed as the report does: the base on the new
    regime before the adapter (from `new_regime_from`), and adapter `version` over the steps it was
    in use (the report's "mean anomaly score while vN was in use")."""
    fc = data.forecasts if data is not None else None
    if fc is None:
        return {"score_before": None, "score_after": None}
    before = (fc.served_version == 0) & (fc.t >= new_regime_from)
    after = fc.served_version == (version or -1)
    return {
        "score_before": float(np.mean(fc.served_score[before])) if before.any() else None,
        "score_after": float(np.mean(fc.served_score[after])) if after.any() else None,
    }


def _update_memory(traces: list[UpdateTraceJson], version: int | None) -> UpdateMemory:
    """What the accepted update cost, from its trace: the service's peak usage while it ran and what
    it added to the usage before it, counted as the watchdog counts (`memory_source`)."""
    accepted = [t for t in traces if t.get("outcome") == "accepted" and t.get("version") == version] or traces
    if not accepted:
        return {"update_peak_mb": None, "update_added_mb": None}
    trace = accepted[-1]
    peak, before = trace.get("peak_sampled_service_mb"), trace.get("baseline_mb")
    added = peak - before if isinstance(peak, (int, float)) and isinstance(before, (int, float)) and before > 0 else None
    return {"update_peak_mb": peak, "update_added_mb": added}


def memory_text(memory: MemoryStatus) -> str:
    """The daemon's memory as its watchdog counts it (PSS or cgroup charge), for the live panel."""
    source = {"pss": "PSS", "cgroup": "cgroup charge"}.get(str(memory.get("usage_source")), "RSS")
    used = memory.get("usage_mb", memory.get("rss_mb", 0))  # older daemon: RSS only
    return f"{used:.0f} MB {source} of {memory.get('budget_mb', 0):.0f} MB ({memory.get('level')})"


def _write_report(config: Config, out_dir: Path, data: Any = None) -> str | None:
    """The report of the demo's state dir; None (logged) if it cannot be made, e.g. without matplotlib."""
    from edge_daemon.report import write_report

    try:
        files = write_report(config, out_dir, data=data)
    except (ImportError, EdgeDaemonError) as exc:
        log.warning("no report: %s", exc)
        return None
    return str(files[-1])


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _live_view(console: Any, daemon: Any, alerts: list[Alert]) -> Any:
    from rich.live import Live

    return Live(_render(daemon, alerts), console=console, refresh_per_second=4)


def _render(daemon: Any, alerts: list[Alert]) -> Any:
    from rich.table import Table

    status = daemon._status({})
    table = Table(title="edge-daemon (live)", show_header=False)
    ingest = status.get("ingest", {})
    table.add_row("readings stored", str(status["store"]["readings"]))
    table.add_row("rejected (malformed)", f"{ingest.get('rejected', 0)} {ingest.get('rejected_by_reason', {})}")
    drift = status.get("drift", {})
    drifting = [c for c, s in drift.get("channels", {}).items() if s.get("state") == "drift"]
    table.add_row("drift", ", ".join(drifting) or "none")
    training = status.get("training", {})
    plan = training.get("plan")
    table.add_row("training", f"{training.get('state')} {json.dumps(plan) if plan else ''}")
    table.add_row("memory", memory_text(status.get("memory", {})))
    table.add_row("adapter", f"v{status['adapter']['version']}" if status["adapter"]["version"] else "base model")
    table.add_row("alerts", ", ".join(a.get("type", "?") for a in alerts[-6:]))
    return table


def _print_summary(console: Any, summary: DemoSummary) -> None:
    from rich.table import Table

    table = Table(title="demo summary")
    table.add_column("what")
    table.add_column("value", justify="right")

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    def score(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)  # as the report prints it

    def mb(value: Any, sign: str = "") -> str:
        return f"{sign}{value:.0f} MB" if isinstance(value, (int, float)) else "-"

    source = {"pss": "PSS of the demo process tree", "cgroup": "cgroup charge"}.get(str(summary.get("memory_source")), "?")
    before, after = summary.get("metrics_before") or {}, summary.get("metrics_after") or {}
    rows = [
        ("readings sent / stored / lost", f"{summary.get('readings_sent')} / {summary.get('readings_stored')} / {summary.get('readings_lost')}"),
        ("malformed sent / rejected", f"{summary.get('malformed_sent')} / {summary.get('rejected')}"),
        ("drift alerts", fmt(summary.get("drift_alerts"))),
        ("update accepted (reason)", f"{summary.get('update_accepted')} ({summary.get('update_reason')})"),
        ("forecast loss on recent data before -> after", f"{fmt(before.get('recent_val_loss'))} -> {fmt(after.get('recent_val_loss'))}"),
        ("forecast loss on replayed old data before -> after", f"{fmt(before.get('replay_val_loss'))} -> {fmt(after.get('replay_val_loss'))}"),
        ("mean anomaly score on the new regime (as in the report): base -> adapter",
         f"{score(summary.get('score_before'))} -> {score(summary.get('score_after'))}"),
        (f"memory ({source}): serving / during the update (peak) / added by the update",
         f"{mb(summary.get('serving_mb'))} / {mb(summary.get('update_peak_mb'))} / {mb(summary.get('update_added_mb'), '+')}"),
        ("adapter version / size", f"v{summary.get('adapter_version')} / {summary.get('adapter_bytes')} bytes"),
        ("state dir", summary.get("state_dir")),
        ("report", summary.get("report") or "not written (pip install 'edge-daemon[report]')"),
    ]
    for what, value in rows:
        table.add_row(what, str(value))
    console.print(table)
