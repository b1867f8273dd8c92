"""Update traces on disk: each update's memory and plan trace (`training.trace.UpdateTrace`) as
written for `edge-daemon report`, and read back by it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict

from edge_daemon.artifacts.files import write_json

if TYPE_CHECKING:
    from edge_daemon.config import Config
    from edge_daemon.control.replies import PlanStatus

log = logging.getLogger(__name__)

# Memory and plan trace of each update, for `edge-daemon report`: `trace.json` in an accepted
# adapter's directory, and `updates/<start ms>.json` under the state dir for every update
# (rejected and failed ones too), of which the newest KEEP_UPDATE_TRACES are kept.
TRACE_FILE = "trace.json"
UPDATES_DIR = "updates"
KEEP_UPDATE_TRACES = 20


class TracePhase(TypedDict):
    t: float  # seconds since the trace started
    phase: str


class TracePlan(TypedDict):
    t: float
    plan: PlanStatus
    level: str | None  # the memory level that made the change (None: the start plan)


class TraceLevel(TypedDict):
    t: float
    level: str


class TraceJob(TypedDict, total=False):
    """What the training job adds to a trace: the job, and how it ended."""

    reason: str
    cause: str | None
    budget_mb: float
    baseline_mb: float
    thresholds: dict[str, float]  # memory level -> share of the budget
    outcome: Literal["accepted", "rejected", "aborted", "failed"]
    detail: str | None
    version: int | None
    metrics_before: dict[str, float | None] | None
    metrics_after: dict[str, float | None] | None
    worker_imports: list[str]
    worker_new_modules: list[str] | None


class UpdateTraceJson(TraceJob):
    """An update's trace as saved (`training.trace.UpdateTrace.to_dict`, with its `TraceJob`)."""

    started_unix: float
    duration_s: float
    interval_s: float
    peak_sampled_rss_mb: float | None
    peak_sampled_private_mb: float | None
    peak_sampled_service_mb: float | None
    samples: dict[str, list[float | None]]  # t, rss_mb, private_mb, service_mb
    phases: list[TracePhase]
    plans: list[TracePlan]
    levels: list[TraceLevel]
    steps: dict[str, list[float]]  # t, step, loss


def save_update_trace(state_dir: Path, trace: UpdateTraceJson, keep: int = KEEP_UPDATE_TRACES) -> Path:
    """Write `state_dir/updates/<start ms>.json` and keep only the newest `keep` traces."""
    directory = Path(state_dir) / UPDATES_DIR
    path = directory / f"{int(trace['started_unix'] * 1000)}.json"
    write_json(path, trace, compact=True)
    # Names are start times in ms: same width for centuries, so name order is time order.
    for old in sorted(directory.glob("*.json"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def save_adapter_trace(version_dir: Path, trace: UpdateTraceJson) -> Path:
    """Write `trace.json` into an accepted adapter's directory: the trace of the update that made it."""
    path = Path(version_dir) / TRACE_FILE
    write_json(path, trace, compact=True)
    return path


def read_update_traces(config: Config) -> list[UpdateTraceJson]:
    """Traces of past updates (`updates/*.json`, plus adapters' `trace.json` not among them), oldest first."""
    traces: dict[float, UpdateTraceJson] = {}
    candidates = sorted((config.device.state_dir / UPDATES_DIR).glob("*.json"))
    if config.adapters_dir.is_dir():
        candidates += sorted(config.adapters_dir.glob(f"v*/{TRACE_FILE}"))
    for path in candidates:
        try:
            trace = json.loads(path.read_text(encoding="utf-8"))
            started = float(trace["started_unix"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unreadable update trace %s: %s", path, exc)
            continue
        traces.setdefault(started, trace)  # the same update in both places: keep one
    return [traces[k] for k in sorted(traces)]
