"""The MQTT payloads' records (edge_daemon/mqtt/outputs.py) and the JSON Schemas generated from them.

The schema files shipped in the package and in docs/ are what the records generate; a payload
built by a record is the documented example, key for key and in order (the JSON on the wire);
and a schema rejects what its topic never carries. The payloads real daemons publish are
validated where they are received: tests/test_end_to_end.py's Collector, tests/test_contract.py,
tests/test_daemon_ingest.py and tests/test_ingest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from edge_daemon.mqtt import outputs as payloads
from edge_daemon.pipeline import forecast_payload
from edge_daemon.scoring.serving import HorizonForecast, ScoreResult
from tests.payload_schemas import violations
from tests.test_contract import one

REPO = Path(__file__).resolve().parents[1]


def example(name: str) -> dict:
    """docs/contract.md's example of output `name`."""
    return json.loads(one("output", name).body)


# -- the schema files -----------------------------------------------------------------------------


def test_the_committed_schemas_are_what_the_records_generate() -> None:
    generated = payloads.json_schemas()
    assert set(generated) == {"forecast", "alert", "status"}
    for directory in (REPO / "edge_daemon" / "data" / "schemas", REPO / "docs" / "schemas"):
        assert sorted(p.name for p in directory.iterdir()) == sorted(f"{topic}.schema.json" for topic in generated)
        for topic, schema in generated.items():
            path = directory / f"{topic}.schema.json"
            assert path.read_text(encoding="utf-8") == payloads.schema_text(schema), f"{path} is stale: python -m edge_daemon.mqtt.outputs --write-schemas"
    assert payloads.stale_schemas() == []


def test_check_and_write_from_the_command_line(tmp_path: Path) -> None:
    check = subprocess.run([sys.executable, "-m", "edge_daemon.mqtt.outputs", "--check"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert check.returncode == 0, check.stderr
    # A stale copy is named; writing makes it current again.
    stale = tmp_path / "alert.schema.json"
    stale.write_text("{}\n")
    assert tmp_path / "alert.schema.json" in payloads.stale_schemas([tmp_path])
    written = payloads.write_schemas([tmp_path])
    assert {p.name for p in written} == {"forecast.schema.json", "alert.schema.json", "status.schema.json"}
    assert payloads.stale_schemas([tmp_path]) == []
    usage = subprocess.run([sys.executable, "-m", "edge_daemon.mqtt.outputs"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert usage.returncode == 2 and "--write-schemas" in usage.stderr


def test_the_schemas_are_package_data() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "data/schemas/*" in pyproject["tool"]["setuptools"]["package-data"]["edge_daemon"]


# -- the records build the documented payloads ----------------------------------------------------


def same_json(built: object, documented: dict) -> None:
    """The same keys, values and key order: the same compact JSON on the wire."""
    assert json.dumps(built, separators=(",", ":")) == json.dumps(documented, separators=(",", ":"))


def test_each_alert_record_builds_its_documented_example() -> None:
    anomaly = example("alert-anomaly")
    same_json(payloads.anomaly_alert(anomaly["ts"], anomaly["score"], anomaly["threshold"]), anomaly)
    drift = example("alert-drift")
    built = payloads.drift_alert(drift["channel"], drift["kind"], drift["ts"], drift["detections"], drift["residual_level"], drift["residual_baseline"])
    same_json(built, drift)
    accepted = example("alert-adapter_accepted")
    same_json(payloads.adapter_accepted_alert(accepted["version"], accepted["reason"], accepted["metrics_before"], accepted["metrics_after"], accepted["gate"]), accepted)
    rejected = example("alert-adapter_rejected")
    same_json(payloads.adapter_rejected_alert(rejected["reason"], rejected["metrics_before"], rejected["metrics_after"], rejected["gate"]), rejected)
    same_json(payloads.base_model_alert(), example("alert-base_model"))
    same_json(payloads.rollback_alert(1), example("alert-rollback"))
    # Input drift says so in its message.
    assert payloads.drift_alert("m1/current", "inputs", drift["ts"], 1, None, None)["message"] == "input drift on m1/current"


def test_the_status_records_build_their_documented_examples() -> None:
    online = example("status")
    started = datetime.fromisoformat(online["started"]).timestamp()
    built = payloads.online_status(online["device"], online["version"], started, online["adapter_version"], online["disk_full"],
                                   scoring=(online["drift"], online["scoring"]), drift_channels=online["drift_channels"],
                                   training=online["training"], readings=online["readings"])  # fmt: skip
    same_json(built, online)
    # Before the parts run: neither `drift`, `drift_channels`, `scoring`, `training` nor `readings`.
    early = payloads.online_status(online["device"], online["version"], started, None, False)
    assert list(early) == ["online", "device", "version", "started", "adapter_version", "disk_full"]
    assert violations("edge/pump-1/status", early) == []
    same_json(payloads.offline_status("pump-1"), example("status-offline"))


def test_the_forecast_record_builds_its_documented_example() -> None:
    documented = example("forecast")
    channels = list(documented["forecast"])
    (far,) = documented["horizons"]
    result = ScoreResult(
        t=documented["ts"],
        actual=np.array([documented["actual"][c] for c in channels]),
        forecast_t=documented["forecast_ts"],
        forecast=np.array([documented["forecast"][c] for c in channels]),
        residual=np.zeros(len(channels)),
        score=documented["anomaly_score"],
        anomaly=False,
        model_version=None,
        forecast_version=None,
        served_by="model",
        forecast_by="model",
        forecast_by_channel=("model",) * len(channels),
        horizons=(HorizonForecast(far["steps"], far["forecast_ts"], np.array([far["forecast"][c] for c in channels]), ("model",) * len(channels)),),
    )
    same_json(forecast_payload(result, documented["anomaly_score"], channels), documented)


# -- the schemas reject what a topic never carries --------------------------------------------------


def test_a_payload_that_is_not_its_record_is_rejected() -> None:
    forecast = example("forecast")
    assert violations("edge/pump-1/forecast", forecast) == []
    wrong = {
        "forecast without ts": ("forecast", {k: v for k, v in forecast.items() if k != "ts"}),
        "forecast with a key of no record": ("forecast", {**forecast, "confidence": 0.9}),
        "forecast by an unknown model": ("forecast", {**forecast, "model": "gpt"}),
        "forecast value not a number": ("forecast", {**forecast, "forecast": {"m1/temperature": "27.9"}}),
        "horizon without steps": ("forecast", {**forecast, "horizons": [{k: v for k, v in forecast["horizons"][0].items() if k != "steps"}]}),
        "alert of no kind": ("alert", {"type": "overheat", "message": "hot"}),
        "anomaly score as text": ("alert", {**example("alert-anomaly"), "score": "6.0"}),
        "anomaly without message": ("alert", {k: v for k, v in example("alert-anomaly").items() if k != "message"}),
        "drift of an unknown kind": ("alert", {**example("alert-drift"), "kind": "both"}),
        "rejected adapter with a version": ("alert", {**example("alert-adapter_rejected"), "version": 2}),
        "rollback without version": ("alert", {"type": "rollback", "message": "rolled back"}),
        "online without disk_full": ("status", {k: v for k, v in example("status").items() if k != "disk_full"}),
        "online with partial counters": ("status", {**example("status"), "scoring": {"steps": 1}}),
        "offline with more": ("status", {**example("status-offline"), "started": "2026-12-07T03:00:55+00:00"}),
        "online as a string": ("status", {**example("status-offline"), "online": "false"}),
        "not an object": ("alert", ["anomaly"]),
    }
    for what, (topic, payload) in wrong.items():
        assert violations(f"edge/pump-1/{topic}", payload), f"accepted: {what}"
    found = violations("edge/pump-1/alert", {**example("alert-anomaly"), "score": "6.0"})
    assert len(found) == 1 and "'6.0' is not of type 'number'" in found[0], found
    assert violations("edge/pump-1/telemetry", {}) == ["edge/pump-1/telemetry: no payload schema for 'telemetry'"]


@pytest.mark.parametrize("topic", sorted(payloads.TOPICS))
def test_each_schema_is_closed_and_names_the_topic(topic: str) -> None:
    schema = payloads.json_schemas()[topic]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == f"edge/<device.id>/{topic}"
    objects = [node for node in _nodes(schema) if "properties" in node]
    assert objects and all(node["additionalProperties"] is False for node in objects)


def _nodes(node: object) -> list[dict]:
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += _nodes(value)
    elif isinstance(node, list):
        for value in node:
            found += _nodes(value)
    return found
