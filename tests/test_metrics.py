"""Prometheus metrics: scraped over real HTTP from a running daemon and parsed with prometheus_client's
parser; counters move as readings arrive over a real broker; the textfile is replaced atomically;
the Grafana dashboard names only metrics the daemon exports; `[metrics]` is validated.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from conftest import CHANNELS, make_config, start_daemon
from edge_daemon.broker import LocalBroker
from edge_daemon.cli import main as cli_main
from edge_daemon.config import listen_address
from edge_daemon.daemon import Daemon
from edge_daemon.errors import ConfigError
from edge_daemon.metrics import Metrics
from edge_daemon.training.records import JobResult, UpdateJob
from support import config_toml, wait_for

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "edge-daemon.json"
HANG_S = 60.0  # bounds a wait for something that must happen
TEXTFILE_INTERVAL_S = 0.1


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, LocalBroker, Path]]:
    """One daemon for the module, serving metrics on a free loopback port and writing a textfile."""
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "broker").mkdir()
    (tmp / "textfile").mkdir()
    broker = LocalBroker(workdir=tmp / "broker")
    broker.start()
    textfile = tmp / "textfile" / "edge_daemon.prom"
    config = make_config(
        tmp, port=broker.port, store={"flush_interval_s": 0.05},
        metrics={"listen": "127.0.0.1:0", "textfile": str(textfile), "textfile_interval_s": TEXTFILE_INTERVAL_S},
    )  # fmt: skip
    daemon = Daemon(config)
    try:
        start_daemon(daemon)
        yield daemon, broker, textfile
    finally:
        daemon.stop()
        broker.close()


def metrics_part(daemon: Daemon) -> Metrics:
    part = daemon.parts["metrics"]
    assert isinstance(part, Metrics)
    return part


def scrape(daemon: Daemon) -> dict[str, Sample]:
    """Every sample of one HTTP scrape, keyed by its name and labels as exposed."""
    address = metrics_part(daemon).address
    assert address is not None
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, Sample] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample
    return samples


def value(samples: dict[str, Sample], name: str, **labels: str) -> float | None:
    sample = samples.get(name + json.dumps(labels, sort_keys=True))
    return None if sample is None else sample.value


def exported_names(text: str) -> set[str]:
    """The series names a scrape can hold: each sample's, and for families without samples (yet)
    the names their type gives them."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["", "_sum", "_count"], "info": ["_info"]}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    return names


def publish(port: int, messages: list[tuple[str, str]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-metrics-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for info in [client.publish(topic, payload, qos=1) for topic, payload in messages]:
            info.wait_for_publish(HANG_S)
    finally:
        client.disconnect()
        client.loop_stop()


# -- a running daemon ---------------------------------------------------------------------------------


def test_scrape_serves_every_metric_with_the_prefix_and_no_timestamp_labels(running: tuple[Daemon, LocalBroker, Path]) -> None:
    daemon = running[0]
    samples = scrape(daemon)
    names = {sample.name for sample in samples.values()}
    assert all(name.startswith("edge_daemon_") for name in names), sorted(n for n in names if not n.startswith("edge_daemon_"))
    for expected in (
        "edge_daemon_info", "edge_daemon_start_time_seconds", "edge_daemon_messages_received_total", "edge_daemon_readings_stored_total",
        "edge_daemon_readings_duplicate_total", "edge_daemon_readings_held_total", "edge_daemon_steps_scored_total",
        "edge_daemon_readings_late_total", "edge_daemon_anomaly_alerts_total", "edge_daemon_drift", "edge_daemon_memory_usage_bytes",
        "edge_daemon_memory_budget_bytes", "edge_daemon_memory_level", "edge_daemon_updates_total", "edge_daemon_adapter_version",
        "edge_daemon_store_readings", "edge_daemon_store_size_bytes", "edge_daemon_broker_connected",
        "edge_daemon_store_check_seconds", "edge_daemon_store_damaged_total",
    ):  # fmt: skip
        assert expected in names, expected
    assert value(samples, "edge_daemon_store_damaged_total") == 0  # tests/test_store_damaged.py: 1
    info = next(s for s in samples.values() if s.name == "edge_daemon_info")
    assert info.labels["device"] == "test-dev" and info.labels["version"]
    assert value(samples, "edge_daemon_broker_connected") == 1
    # Drift per forecast channel; every label is a bounded set (no timestamps, no per-reading values).
    assert {s.labels["channel"] for s in samples.values() if s.name == "edge_daemon_drift"} == set(CHANNELS)
    label_names = {label for s in samples.values() for label in s.labels}
    assert label_names <= {"channel", "reason", "cause", "outcome", "source", "state", "device", "version", "le"}, label_names
    for s in samples.values():
        for label in s.labels.values():
            assert not re.fullmatch(r"\d{9,}(\.\d+)?|\d{4}-\d\d-\d\dT.*", label), (s.name, s.labels)
    # Base units: bytes (the budget is at least a megabyte), memory level 0..3.
    assert (value(samples, "edge_daemon_memory_budget_bytes", source=daemon.watchdog.budget.source) or 0) > 2**20  # type: ignore[union-attr]
    assert value(samples, "edge_daemon_memory_level") in (0, 1, 2, 3)
    # Updates by cause and outcome, zero before any.
    assert value(samples, "edge_daemon_updates_total", cause="drift", outcome="accepted") == 0


def test_counters_move_as_readings_arrive(running: tuple[Daemon, LocalBroker, Path]) -> None:
    daemon, broker, _ = running
    before = scrape(daemon)
    stored_before = value(before, "edge_daemon_readings_stored_total") or 0
    bad_json_before = value(before, "edge_daemon_readings_rejected_total", reason="bad_json") or 0
    base = time.time() - 30
    readings = [(f"sensors/{CHANNELS[i % 3]}", json.dumps({"ts": base + i // 3, "value": float(i)})) for i in range(30)]
    publish(broker.port, readings + [("sensors/m1/temperature", "{not json")])

    def moved() -> dict[str, Sample] | None:
        samples = scrape(daemon)
        stored = value(samples, "edge_daemon_readings_stored_total") or 0
        rejected = value(samples, "edge_daemon_readings_rejected_total", reason="bad_json") or 0
        return samples if stored >= stored_before + 30 and rejected >= bad_json_before + 1 else None

    after = wait_for(moved, HANG_S, "the stored and rejected counters to move")
    assert (value(after, "edge_daemon_messages_received_total") or 0) >= (value(before, "edge_daemon_messages_received_total") or 0) + 31
    assert (value(after, "edge_daemon_store_readings") or 0) >= stored_before + 30
    assert (value(after, "edge_daemon_grid_steps_total") or 0) > (value(before, "edge_daemon_grid_steps_total") or 0)



def test_an_ended_update_counts_by_cause_and_outcome_with_its_duration(running: tuple[Daemon, LocalBroker, Path]) -> None:
    daemon = running[0]
    assert daemon.adaptation is not None
    # What the runner hands over when a worker ends: a drift update the gate rejected after 42 s.
    job = UpdateJob("update", "drift detected", cause="drift", started_unix=time.time() - 42)
    daemon.adaptation.on_result(JobResult("update", accepted=False, reason="no better", job=job, duration_s=42.0))
    samples = scrape(daemon)
    assert value(samples, "edge_daemon_updates_total", cause="drift", outcome="rejected") == 1
    assert value(samples, "edge_daemon_updates_total", cause="drift", outcome="accepted") == 0
    labels = {"cause": "drift", "outcome": "rejected"}
    assert value(samples, "edge_daemon_update_duration_seconds_count", **labels) == 1
    assert value(samples, "edge_daemon_update_duration_seconds_sum", **labels) == 42.0
    assert value(samples, "edge_daemon_update_duration_seconds_bucket", **labels, le="30.0") == 0
    assert value(samples, "edge_daemon_update_duration_seconds_bucket", **labels, le="60.0") == 1
    assert value(samples, "edge_daemon_update_duration_seconds_bucket", **labels, le="+Inf") == 1

def test_textfile_is_replaced_atomically(running: tuple[Daemon, LocalBroker, Path]) -> None:
    textfile = running[2]
    wait_for(textfile.exists, HANG_S, "the textfile")
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:  # a reader like node_exporter's: it must only ever see whole files
        # Paced a little: a tight loop would hold the GIL and starve the daemon's writer in this process.
        while not stop.wait(0.001):
            seen.append(textfile.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        first = os.stat(textfile).st_ino
        wait_for(lambda: os.stat(textfile).st_ino != first, HANG_S, "the textfile replaced (a new inode)", interval=0.02)
        second = os.stat(textfile).st_ino
        wait_for(lambda: os.stat(textfile).st_ino != second, HANG_S, "the textfile replaced again", interval=0.02)
    finally:
        stop.set()
        reader.join()
    assert seen
    for text in seen:
        assert text.endswith("\n") and "edge_daemon_info{" in text and "edge_daemon_metrics_errors_total" in text
        assert {f.name for f in text_string_to_metric_families(text)} >= {"edge_daemon_info", "edge_daemon_readings_stored"}
    # The temporary files it is written through are renamed over it: none are left behind.
    wait_for(lambda: os.listdir(textfile.parent) == [textfile.name], HANG_S, "no temporary files beside the textfile",
             detail=lambda: os.listdir(textfile.parent))  # fmt: skip


def test_dashboard_names_only_metrics_the_daemon_exports(running: tuple[Daemon, LocalBroker, Path]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names(metrics_part(running[0]).render().decode())
    exprs = list(_exprs(dashboard))
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)
        used |= names
    # It is built on the metrics: the main ones all appear on it.
    for name in ("edge_daemon_readings_stored_total", "edge_daemon_readings_rejected_total", "edge_daemon_anomaly_score",
                 "edge_daemon_drift", "edge_daemon_memory_usage_bytes", "edge_daemon_updates_total", "edge_daemon_store_size_bytes"):  # fmt: skip
        assert name in used, name
    # Imported with its Prometheus data source chosen by the user, on an `instance` variable.
    assert any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus" for i in dashboard["__inputs"])
    assert any(v["name"] == "instance" for v in dashboard["templating"]["list"])
    panel_exprs = [expr for expr in exprs if not expr.startswith("label_values(")]
    assert all(expr.count('instance=~"$instance"') == len(promql_metric_names(expr)) for expr in panel_exprs), panel_exprs



def test_the_contract_lists_every_metric_exported(running: tuple[Daemon, LocalBroker, Path]) -> None:
    text = metrics_part(running[0]).render().decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    contract = (REPO / "docs" / "contract.md").read_text()
    section = contract[contract.index("## 5. Prometheus metrics") :]
    documented = set(re.findall(r"^\| `(edge_daemon_\w+)` \|", section, re.M))
    assert documented == exported, (sorted(documented - exported), sorted(exported - documented))

def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                yield item
            elif key == "query" and isinstance(item, dict) and isinstance(item.get("query"), str):
                yield item["query"]  # a template variable's query
            else:
                yield from _exprs(item)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a `label_values(metric, label)` query) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"label_values\s*\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_promql_names_are_read_out_of_expressions() -> None:
    assert promql_metric_names('sum by (reason) (rate(edge_daemon_readings_rejected_total{instance=~"$instance"}[5m]))') == {
        "edge_daemon_readings_rejected_total"
    }
    assert promql_metric_names("edge_daemon_memory_usage_bytes / on (instance) edge_daemon_memory_budget_bytes") == {
        "edge_daemon_memory_usage_bytes", "edge_daemon_memory_budget_bytes"
    }  # fmt: skip
    assert promql_metric_names("label_values(edge_daemon_info, instance)") == {"edge_daemon_info"}


# -- config and validate-config ---------------------------------------------------------------------


def test_listen_is_host_and_port_with_ipv6_in_brackets(tmp_path: Path) -> None:
    assert listen_address("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert listen_address("[::1]:9108") == ("::1", 9108)
    assert listen_address("localhost:0") == ("localhost", 0)
    for bad in ("9108", "127.0.0.1", "::1:9108", "[127.0.0.1]:9108", "[::1:9108", "127.0.0.1:http", "127.0.0.1:70000", ":9108"):
        with pytest.raises(ValueError):
            listen_address(bad)
    with pytest.raises(ConfigError, match="metrics.listen"):
        make_config(tmp_path, metrics={"listen": "0.0.0.0"})
    with pytest.raises(ConfigError, match="metrics.port"):
        make_config(tmp_path, metrics={"port": 9108})  # unknown keys are errors


def test_metrics_are_off_unless_configured(tmp_path: Path) -> None:
    names = [name for name, _ in Daemon(make_config(tmp_path)).builders()]
    assert "metrics" not in names
    assert [name for name, _ in Daemon(make_config(tmp_path, metrics={})).builders()] == names  # a [metrics] with neither key
    with_listen = [name for name, _ in Daemon(make_config(tmp_path, metrics={"listen": "127.0.0.1:9108"})).builders()]
    assert with_listen == names + ["metrics"]  # last: started once everything it reads runs
    assert [name for name, _ in Daemon(make_config(tmp_path, metrics={"textfile": str(tmp_path / "m.prom")})).builders()][-1] == "metrics"


def test_a_daemon_without_metrics_does_not_import_prometheus_client(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from pathlib import Path\n"
        "from conftest import make_config\n"
        "from edge_daemon.daemon import Daemon\n"
        f"Daemon(make_config(Path({str(tmp_path)!r}))).builders()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'edge_daemon.metrics'))) or 'clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd=REPO)
    assert out.stdout.strip() == "clean", out.stdout + out.stderr


def _validate(tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(config_toml({"device": {"id": "dev"}, "mqtt": {}, "channels": {"names": ["m1/t"]}, "metrics": {"listen": listen}}))
    assert cli_main(["validate-config", str(path)]) == 0
    return capsys.readouterr().err


def test_validate_config_warns_of_an_endpoint_other_machines_reach(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for exposed in ("0.0.0.0:9108", "192.168.1.20:9108", "[::]:9108", "edge.local:9108"):
        err = _validate(tmp_path, capsys, exposed)
        assert "warning: metrics.listen" in err and "reachable from other machines" in err, (exposed, err)
    for loopback in ("127.0.0.1:9108", "[::1]:9108", "localhost:9108"):
        assert _validate(tmp_path, capsys, loopback) == "", loopback
