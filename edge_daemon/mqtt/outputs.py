"""The MQTT outputs under `edge/<device.id>/`, as typed records: `forecast`, every kind of
`alert`, and `status` (online, retained; offline at stop and as the last will).

Each payload is a TypedDict its producer builds (through the constructors below where a field
is derived, such as an alert's `message`) and the connection sends as compact JSON: the record
is the payload, key for key. JSON Schemas generated from these records ship with the package
(`edge_daemon/data/schemas/<topic>.schema.json`) and in `docs/schemas/`; regenerate both with
`python -m edge_daemon.mqtt.outputs --write-schemas` after changing a record (`--check`, and a test,
fail while they differ).

The TypedDicts are typing_extensions' (as in control/replies.py): pydantic, which generates the
schemas, reads only those on Python < 3.12. Only typing here at import; pydantic is imported
when schemas are generated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, NotRequired

from typing_extensions import TypedDict

from edge_daemon.control.replies import GateJson, ScoringCounters
from edge_daemon.times import iso

# Who made a forecast: the model ("base" alone or with an "adapter"), a baseline, or several
# ("mixed": see the per-channel `models`).
Forecaster = Literal["base", "adapter", "persistence", "seasonal_naive", "ridge", "mixed"]
# Who made the forecast an anomaly score judges: the model, a baseline, or several.
ScoredBy = Literal["model", "persistence", "seasonal_naive", "ridge", "mixed"]
DriftKind = Literal["inputs", "residuals", "level"]
# What the update path is doing: training an update (or a base), waiting out a memory back-off, or nothing.
TrainingState = Literal["idle", "running", "paused"]


# -- forecast ---------------------------------------------------------------------------------


class ForecastHorizon(TypedDict):
    """A further step ahead ([model] horizons), labelled like the next step's forecast."""

    steps: int
    forecast_ts: float
    forecast: dict[str, float]
    model: Forecaster
    models: dict[str, Forecaster]
    adapter_version: int | None


class Forecast(TypedDict):
    """`edge/<id>/forecast`: one scored grid step, the next step's forecast and further horizons."""

    ts: float  # the grid step just completed (unix seconds, the data's clock)
    forecast_ts: float  # the step `forecast` is for
    forecast: dict[str, float]
    actual: dict[str, float]
    anomaly_score: float | None  # of the forecast made one step earlier
    model: Forecaster
    models: dict[str, Forecaster]
    adapter_version: int | None  # the adapter in `forecast` when the model made any of it
    scored_by: ScoredBy | None
    horizons: list[ForecastHorizon]


# -- alert ------------------------------------------------------------------------------------


class AnomalyAlert(TypedDict):
    """A step's anomaly score exceeded [outputs] anomaly_threshold."""

    type: Literal["anomaly"]
    ts: float
    time: str
    score: float
    threshold: float
    message: str


class DriftAlert(TypedDict):
    """A channel's inputs, the model's residuals on it, or its level judged against the same time
    of day ([drift] level_channels) drifted; residual_level / residual_baseline are the recent and
    the reference mean |residual| (normalised; null for input and level drift, or unknown)."""

    type: Literal["drift"]
    channel: str
    kind: DriftKind  # the channel's inputs, the model's residuals on it, or its level by time of day
    ts: float
    time: str  # to the millisecond: a grid step
    detections: int  # the channel's, this one included
    residual_level: float | None
    residual_baseline: float | None
    message: str


class AdapterAcceptedAlert(TypedDict):
    """An update ended with a new adapter, served from now on."""

    type: Literal["adapter_accepted"]
    version: int  # served from now on
    reason: str | None  # the gate's verdict
    metrics_before: dict[str, float | None] | None
    metrics_after: dict[str, float | None] | None
    gate: GateJson | None  # how the gate decided: the old regime's weight and its evidence, the attempts
    message: str


class AdapterRejectedAlert(TypedDict):
    """An update ended without a new adapter."""

    type: Literal["adapter_rejected"]
    version: None
    reason: str | None  # the gate's verdict, or the error
    metrics_before: dict[str, float | None] | None
    metrics_after: dict[str, float | None] | None
    gate: GateJson | None  # how the gate decided (None: the update failed before its verdict)
    message: str


class BaseModelAlert(TypedDict):
    """A device without a base model trained one from its own store."""

    type: Literal["base_model"]
    message: str


class RollbackAlert(TypedDict):
    """An operator had an adapter version served (`edge-daemon rollback`)."""

    type: Literal["rollback"]
    version: int
    message: str


class StoreDamagedAlert(TypedDict):
    """The replay store failed its check at start: moved aside (kept for inspection) and a new one
    started; what it held is not replayed."""

    type: Literal["store_damaged"]
    problem: str  # what PRAGMA quick_check or SQLite said
    moved_to: str  # the damaged file's new path
    message: str


class AdapterDamagedAlert(TypedDict):
    """The current adapter's files no longer match the sha256 recorded at its commit: the newest
    earlier version that is intact serves instead (`serving`; null: the base model alone)."""

    type: Literal["adapter_damaged"]
    version: int  # the damaged one
    serving: int | None
    problem: str
    message: str


class BaseDamagedAlert(TypedDict):
    """The base model's files no longer match the sha256 recorded when it was saved: refused,
    moved aside (`moved_to`), and a new one is trained from the store once it holds enough data
    (meanwhile the best baseline fitted on the store is served)."""

    type: Literal["base_damaged"]
    problem: str
    moved_to: str
    message: str


# `edge/<id>/alert`: one record per kind, told apart by `type`.
Alert = (
    AnomalyAlert | DriftAlert | AdapterAcceptedAlert | AdapterRejectedAlert | BaseModelAlert | RollbackAlert | StoreDamagedAlert
    | AdapterDamagedAlert | BaseDamagedAlert
)


def anomaly_alert(ts: float, score: float, threshold: float) -> AnomalyAlert:
    """A step's anomaly score exceeded [outputs] anomaly_threshold."""
    return AnomalyAlert(
        type="anomaly", ts=ts, time=_iso(ts), score=score, threshold=threshold, message=f"anomaly score {score:.1f} over {threshold}"
    )


def drift_alert(
    channel: str, kind: DriftKind, ts: float, detections: int, residual_level: float | None, residual_baseline: float | None
) -> DriftAlert:
    """A channel's inputs, the model's residuals on it, or its level against the same time of day
    drifted (at grid step `ts`)."""
    what = {"inputs": "input drift", "residuals": "residual drift", "level": "level shift"}[kind]
    return DriftAlert(
        type="drift",
        channel=channel,
        kind=kind,
        ts=ts,
        time=_iso(ts, "milliseconds"),
        detections=detections,
        residual_level=residual_level,
        residual_baseline=residual_baseline,
        message=f"{what} on {channel}",
    )


def adapter_accepted_alert(
    version: int, reason: str | None, metrics_before: dict[str, float | None] | None, metrics_after: dict[str, float | None] | None,
    gate: GateJson | None = None,
) -> AdapterAcceptedAlert:
    """An update ended with adapter `version` served."""
    return AdapterAcceptedAlert(
        type="adapter_accepted",
        version=version,
        reason=reason,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        gate=gate,
        message=f"adapter accepted: v{version}" + (f" ({reason})" if gate is not None and reason else ""),
    )


def adapter_rejected_alert(
    reason: str | None, metrics_before: dict[str, float | None] | None, metrics_after: dict[str, float | None] | None,
    gate: GateJson | None = None,
) -> AdapterRejectedAlert:
    """An update ended without a new adapter: the gate's verdict or the error is `reason`."""
    return AdapterRejectedAlert(
        type="adapter_rejected",
        version=None,
        reason=reason,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        gate=gate,
        message=f"adapter rejected: {reason}",
    )


def base_model_alert() -> BaseModelAlert:
    """A device without a base model trained one from its own store."""
    return BaseModelAlert(type="base_model", message="base model trained from the store")


def store_damaged_alert(problem: str, moved_to: str) -> StoreDamagedAlert:
    """The replay store was damaged at start: moved aside to `moved_to`, a new one started."""
    name = moved_to.rsplit("/", 1)[-1]
    return StoreDamagedAlert(
        type="store_damaged", problem=problem, moved_to=moved_to, message=f"replay store damaged ({problem}): moved aside to {name}, a new store started"
    )


def adapter_damaged_alert(version: int, serving: int | None, problem: str) -> AdapterDamagedAlert:
    """Adapter `version` is damaged: `serving` (None: the base model) serves instead."""
    instead = f"v{serving}" if serving is not None else "the base model"
    return AdapterDamagedAlert(
        type="adapter_damaged", version=version, serving=serving, problem=problem, message=f"adapter v{version} is damaged: serving {instead} instead"
    )


def base_damaged_alert(problem: str, moved_to: str) -> BaseDamagedAlert:
    """The base model is damaged: moved aside to `moved_to`; a new one is trained from the store,
    and the best baseline fitted on it is served meanwhile."""
    name = moved_to.rsplit("/", 1)[-1]
    return BaseDamagedAlert(
        type="base_damaged", problem=problem, moved_to=moved_to,
        message=f"base model damaged: moved aside to {name}; the best baseline is served until a new one is trained from the store",
    )  # fmt: skip


def rollback_alert(version: int) -> RollbackAlert:
    """An operator had adapter `version` served."""
    return RollbackAlert(type="rollback", version=version, message=f"rolled back to v{version}")


# -- status -----------------------------------------------------------------------------------


class OnlineStatus(TypedDict):
    """`edge/<id>/status` while the daemon runs (retained; refreshed at every (re)connect)."""

    online: Literal[True]
    device: str
    version: str
    started: str
    adapter_version: int | None
    drift: NotRequired[bool]  # drift that warrants adapting (residuals, or a judged level); once scoring runs
    drift_channels: NotRequired[dict[str, bool]]  # per forecast channel: drifted (inputs, residuals or level); once scoring runs
    scoring: NotRequired[ScoringCounters]  # once scoring runs
    training: NotRequired[TrainingState]  # once the update path runs
    readings: NotRequired[int]  # readings in the store; once the store is open
    disk_full: bool


class OfflineStatus(TypedDict):
    """`edge/<id>/status` once the daemon stopped, and its last will (retained)."""

    online: Literal[False]
    device: str


# `edge/<id>/status`, told apart by `online`.
Status = OnlineStatus | OfflineStatus


def online_status(
    device: str,
    version: str,
    started_unix: float,
    adapter_version: int | None,
    disk_full: bool,
    scoring: tuple[bool, ScoringCounters] | None = None,
    drift_channels: dict[str, bool] | None = None,
    training: TrainingState | None = None,
    readings: int | None = None,
) -> OnlineStatus:
    """The retained status while running; `scoring` is (residual drift now, the scoring counters)
    and `drift_channels` each forecast channel's drift, once scoring runs; `training` once the
    update path runs; `readings` once the store is open (each absent before)."""
    # disk_full is set last: the keys go on the wire in this order.
    status = OnlineStatus(online=True, device=device, version=version, started=_iso(started_unix), adapter_version=adapter_version)  # type: ignore[typeddict-item]
    if scoring is not None:
        status["drift"] = scoring[0]
    if drift_channels is not None:
        status["drift_channels"] = drift_channels
    if scoring is not None:
        status["scoring"] = scoring[1]
    if training is not None:
        status["training"] = training
    if readings is not None:
        status["readings"] = readings
    status["disk_full"] = disk_full
    return status


def offline_status(device: str) -> OfflineStatus:
    """The retained status at stop and the broker's last will."""
    return OfflineStatus(online=False, device=device)


def _iso(ts: float, timespec: str = "seconds") -> str:
    text = iso(ts, timespec)
    assert text is not None  # a time in, a time out
    return text


# -- JSON Schemas -----------------------------------------------------------------------------

# Each topic's record, by the schema file's name.
TOPICS: dict[str, object] = {"forecast": Forecast, "alert": Alert, "status": Status}
# Which key tells a topic's records apart.
_DISCRIMINATORS = {"alert": "type", "status": "online"}
# A JSON Schema document, as json.loads reads one.
JsonSchema = dict[str, Any]
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "data" / "schemas"


def json_schemas() -> dict[str, JsonSchema]:
    """The JSON Schema (2020-12) of each topic's payload, generated from the records above.

    Closed: an object has exactly its record's keys (`additionalProperties: false`), so a key
    added to a payload without its record fails validation.
    """
    from typing import Annotated

    from pydantic import Field, TypeAdapter

    schemas: dict[str, JsonSchema] = {}
    for topic, record in TOPICS.items():
        if topic in _DISCRIMINATORS:
            record = Annotated[record, Field(discriminator=_DISCRIMINATORS[topic])]
        generated = TypeAdapter(record).json_schema(mode="serialization")
        _close(generated)
        schemas[topic] = {"$schema": "https://json-schema.org/draft/2020-12/schema", **generated, "title": f"edge/<device.id>/{topic}"}
    return schemas


def _close(node: Any) -> None:
    """Set `additionalProperties: false` on every object schema with named properties."""
    if isinstance(node, dict):
        if "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)


def schema_text(schema: JsonSchema) -> str:
    """A schema file's text: indented, keys in a stable order, one trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def schema_dirs() -> list[Path]:
    """Where the schema files live: the package's data, and docs/schemas in a source checkout."""
    root = Path(__file__).resolve().parents[2]
    return [SCHEMA_DIR, root / "docs" / "schemas"] if (root / "pyproject.toml").is_file() else [SCHEMA_DIR]


def stale_schemas(dirs: list[Path] | None = None) -> list[Path]:
    """The schema files (in `dirs`, default `schema_dirs()`) that differ from what the records
    generate, or are missing."""
    texts = {f"{topic}.schema.json": schema_text(schema) for topic, schema in json_schemas().items()}
    stale = []
    for directory in schema_dirs() if dirs is None else dirs:
        for name, text in texts.items():
            path = directory / name
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
    return stale


def write_schemas(dirs: list[Path] | None = None) -> list[Path]:
    """Write `<topic>.schema.json` of every topic into each of `dirs` (default `schema_dirs()`);
    the paths written."""
    texts = {f"{topic}.schema.json": schema_text(schema) for topic, schema in json_schemas().items()}
    written = []
    for directory in schema_dirs() if dirs is None else dirs:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            path = directory / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


USAGE = "usage: python -m edge_daemon.mqtt.outputs --write-schemas | --check"


def main(argv: list[str] | None = None) -> int:
    """`--write-schemas`: (re)write the schema files from the records; `--check`: exit 1 if any
    differs from what the records generate."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--write-schemas"]:
        for path in write_schemas():
            print(path)
        return 0
    if args == ["--check"]:
        stale = stale_schemas()
        for path in stale:
            print(f"{path}: differs from the records (python -m edge_daemon.mqtt.outputs --write-schemas)", file=sys.stderr)
        return 1 if stale else 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
