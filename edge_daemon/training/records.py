"""The update path's typed records: a job, its progress and result messages, an update's report,
an adapter's meta.json.

The daemon sends an `UpdateJob` to a training worker, the worker sends back
`Progress` messages and one `JobResult` (pickled over a pipe: both ends are
the same code, forked). The trainer emits `ProgressEvent`s as it runs and
returns an `UpdateReport`, which the `JobResult` carries; a committed adapter
carries an `AdapterMeta`, built from the job, the report and the data in one
place (`adapter_meta`). Each turns into JSON in one place (`to_json()`), for
the control socket, the update traces and `meta.json`. No torch here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Literal, TypedDict, Union

from edge_daemon.times import iso
from edge_daemon.training.plan import EightBitPayoff, PlanChange, TrainingPlan
from edge_daemon.control.replies import EightBitJson, GateJson, JobStatus, JsonObject, LastUpdate, PlanChangeJson, PlanStatus, ProgressStatus

if TYPE_CHECKING:
    from edge_daemon.artifacts.base import BaseMeta
    from edge_daemon.baselines import BaselineJson, HeldOut
    from edge_daemon.drift.prior import ValidationResiduals
    from edge_daemon.training.governor import PlanGovernor, UpdateOutcome
    from edge_daemon.training.data import UpdateData

JobKind = Literal["update", "pretrain"]
# What started an update, in `[train] start_on`'s words: an operator's request, residual drift,
# or enough new data since the last one (a routine update).
UpdateCause = Literal["request", "drift", "new_data"]
# How earlier versions worded a cause in `reason`, before it was recorded on its own.
_LEGACY_REASONS: dict[str, UpdateCause] = {"requested": "request", "drift detected": "drift"}
_LEGACY_NEW_DATA_SUFFIX = " new windows"


def resets_drift_baseline(cause: UpdateCause | None) -> bool:
    """Whether an adapter from an update started by `cause` restarts the drift references.

    After drift, a request or a rollback the served model meets data it was
    not judged on, so the references are learnt again. A routine update on
    new data is not: the gate found it no worse on recent data, so the
    current references stay the yardstick. Were they restarted, updates every
    few hours would keep a day-long window learning for ever.
    """
    return cause != "new_data"


@dataclass(frozen=True)
class UpdateJob:
    """What the daemon asks a training worker to do."""

    kind: JobKind
    reason: str  # why it started, for people ("drift detected", "requested", "<N> new windows", "no base model")
    since: float | None = None  # recent data starts here (drift's dated onset); None: the last train.recent_hours
    candidates: tuple[TrainingPlan, ...] = ()  # start plans to dry-run, loosest first (updates only)
    baseline_mb: float = 0.0  # the service's usage when the job was made: what the plan's share is of
    budget_mb: float = 0.0
    seed: int = 0
    started_unix: float | None = None  # set when a worker takes it
    cause: UpdateCause | None = None  # what started an update (None: a pretraining job)
    in_service: bool = False  # runs on a thread of the daemon (an update that starts forward-only), not in a worker

    def started(self) -> UpdateJob:
        return replace(self, started_unix=time.time())

    def to_json(self) -> JobStatus:
        """The job as `status` shows it (the candidate plans left out: they are the ladder's)."""
        return {
            "kind": self.kind,
            "reason": self.reason,
            "cause": self.cause,
            "since": self.since,
            "baseline_mb": self.baseline_mb,
            "budget_mb": self.budget_mb,
            "seed": self.seed,
            "started": self.started_unix,
            "in_service": self.in_service,
        }


@dataclass
class WorkerOrder:
    """What a worker is forked with: the job, the daemon's config (as JSON: parsed again in the
    worker), the plan governor (without its level reader and stop flag, which the worker gets as
    shared memory) and the daemon's pid (whose service's usage the worker's trace records)."""

    job: UpdateJob
    config: JsonObject  # Config.model_dump(mode="json")
    governor: PlanGovernor
    service_pid: int


@dataclass(frozen=True)
class Progress:
    """One progress message of a running job."""

    phase: str  # starting | planning | training | pretrain
    plan: TrainingPlan | None = None
    step: int | None = None  # optimizer steps done
    steps: int | None = None  # of this many
    loss: float | None = None  # the last step's batch loss
    level: str | None = None  # the memory level at a plan change
    recent_windows: int | None = None
    replay_windows: int | None = None

    def to_json(self) -> ProgressStatus:
        return {k: v for k, v in asdict(self).items() if v is not None}  # asdict turns the plan into its dict too


@dataclass(frozen=True)
class TrainingStep:
    """The trainer's event after each optimizer step."""

    step: int  # optimizer steps done
    steps: int  # of this many
    loss: float  # the step's batch loss
    recent_windows: int  # the windows it draws from
    replay_windows: int
    plan: TrainingPlan  # the plan that ran it


# What the trainer emits while it runs (`training.loop.update(on_progress=...)`): the plan
# taking effect (the start plan, then every change at a micro-batch boundary) and each step.
ProgressEvent = Union[PlanChange, TrainingStep]


class UpdateReportJson(TypedDict):
    """UpdateReport.to_json()."""

    accepted: bool
    reason: str
    metrics_before: dict[str, float | None]
    metrics_after: dict[str, float | None]
    plan_history: list[PlanChangeJson]
    chosen_blocks: list[int]
    block_grad_norms: list[float]
    target_modules: list[str]
    trainable_params: int
    total_params: int
    trainable_fraction: float
    steps: int
    windows_seen: int
    replay_share: float
    train_losses: list[float]
    grad_norms: list[float]
    optimizer_state: dict[str, int]
    wall_time_s: float
    peak_rss_bytes: int
    start_rss_bytes: int
    eight_bit: EightBitJson | None
    gate: GateJson | None
    techniques: list[str]


@dataclass
class UpdateReport:
    """What one update did and how it did: the trainer's result without the model.

    Returned by `training.loop.update` (with the adapted model beside it), carried
    to the daemon in `JobResult.report`, and the source of an adapter's meta.json
    (`adapter_meta`). A new training metric is a field here and a line there.
    """

    accepted: bool
    reason: str
    metrics_before: dict[str, float | None]  # recent_val_loss, replay_val_loss of the incumbent (default: base)
    metrics_after: dict[str, float | None]  # the same with the new adapter
    plan_history: list[PlanChange]  # the initial plan, then every change at a micro-batch boundary
    chosen_blocks: list[int]
    block_grad_norms: list[float]
    target_modules: list[str]
    trainable_params: int
    total_params: int
    steps: int
    windows_seen: int
    replay_windows_seen: int
    train_losses: list[float]  # mean loss of each optimizer step's batch
    grad_norms: list[float]  # norm of each step's accumulated gradient, before clipping
    optimizer_state: dict[str, int]  # bytes per dtype at the end of training
    wall_time_s: float
    peak_rss_bytes: int  # sampled during the update
    start_rss_bytes: int
    eight_bit: EightBitPayoff | None = None  # whether 8-bit state paid for its import
    gate: GateJson | None = None  # how the gate decided: the old regime's weight, its evidence, the attempts
    techniques: list[str] = field(default_factory=list)  # the low-memory techniques that ran (`training.loop.techniques_of`)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def replay_share(self) -> float:
        return self.replay_windows_seen / self.windows_seen if self.windows_seen else 0.0

    @property
    def peak_rss_mb(self) -> float | None:
        return self.peak_rss_bytes / 2**20 if self.peak_rss_bytes else None

    def to_json(self) -> UpdateReportJson:
        """JSON-ready, with the per-step lists."""
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "metrics_before": dict(self.metrics_before),
            "metrics_after": dict(self.metrics_after),
            "plan_history": [change.to_dict() for change in self.plan_history],
            "chosen_blocks": list(self.chosen_blocks),
            "block_grad_norms": list(self.block_grad_norms),
            "target_modules": list(self.target_modules),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_fraction": self.trainable_fraction,
            "steps": self.steps,
            "windows_seen": self.windows_seen,
            "replay_share": self.replay_share,
            "train_losses": list(self.train_losses),
            "grad_norms": list(self.grad_norms),
            "optimizer_state": dict(self.optimizer_state),
            "wall_time_s": self.wall_time_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "start_rss_bytes": self.start_rss_bytes,
            "eight_bit": None if self.eight_bit is None else self.eight_bit.to_dict(),
            "techniques": list(self.techniques),
            "gate": self.gate,
        }


@dataclass
class JobResult:
    """How a job ended, as the worker reported it (or, when it died without a word, as its exit
    status says), with what the runner adds: the job and how long it took."""

    kind: JobKind
    accepted: bool
    reason: str | None = None  # the gate's verdict ("recent loss 0.12 -> 0.08 ...")
    error: str | None = None  # set when the job failed or was stopped before a verdict
    aborted: bool = False  # stopped at a micro-batch boundary (shutdown or critical memory)
    version: int | None = None  # the committed adapter (not yet current)
    adapter_bytes: int | None = None
    report: UpdateReport | None = None  # an update's, once it reached the gate
    outcome: UpdateOutcome | None = None  # how the plan went (updates that began training)
    metrics: BaseMeta | None = None  # a pretrain's
    job: UpdateJob | None = None
    duration_s: float | None = None
    finished_unix: float | None = None

    @property
    def stopped_for_memory(self) -> bool:
        return self.outcome is not None and self.outcome.stopped

    @property
    def ran_to_end(self) -> bool:
        """It reached a verdict (accepted or not): its memory is what a whole job costs."""
        return not (self.stopped_for_memory or self.aborted or self.error)

    @property
    def metrics_before(self) -> dict[str, float | None] | None:
        return None if self.report is None else self.report.metrics_before

    @property
    def metrics_after(self) -> dict[str, float | None] | None:
        return None if self.report is None else self.report.metrics_after

    @property
    def gate(self) -> GateJson | None:
        """How the gate decided (None: no verdict)."""
        return None if self.report is None else self.report.gate

    def to_json(self) -> LastUpdate:
        """The summary `status` shows as `training.last`."""
        return {
            "kind": self.kind,
            "accepted": self.accepted,
            "version": self.version,
            "reason": self.reason or self.error,
            "duration_s": self.duration_s,
            "metrics_before": self.metrics_before,
            "metrics_after": self.metrics_after,
            "peak_rss_mb": None if self.report is None else self.report.peak_rss_mb,
            "outcome": None if self.outcome is None else self.outcome.to_json(),
            "finished": iso(self.finished_unix),
            "gate": self.gate,
            "techniques": None if self.report is None else list(self.report.techniques),
        }


class DataRange(TypedDict, total=False):
    """The data an update trained on: its recent span and the replayed spans (unix seconds); empty
    in adapters from before it was recorded."""

    recent: list[float]  # [t0, t1]
    replay: list[list[float]]  # [[a, b], ...]


class AdapterMetaJson(TypedDict):
    """AdapterMeta.to_json(): an adapter's meta.json (with any keys a newer writer added)."""

    created_unix: float | None
    served_from_ts: float | None
    reason: str | None
    cause: UpdateCause | None
    base_fingerprint: str | None
    data_range: DataRange
    windows: dict[str, int]
    metrics_before: dict[str, float | None]
    metrics_after: dict[str, float | None]
    val_loss: float | None
    plan: PlanStatus | None
    plan_history: list[PlanChangeJson]
    chosen_blocks: list[int]
    block_grad_norms: list[float]
    trainable_params: int | None
    peak_rss_mb: float | None
    wall_time_s: float | None
    previous_version: int | None
    baselines: list[BaselineJson]
    held_out: HeldOut | None
    gate: GateJson | None
    validation_residuals: ValidationResiduals | None
    techniques: list[str]
    sha256: dict[str, str] | None
    version: int | None
    created: str | None


@dataclass(frozen=True)
class AdapterMeta:
    """An adapter's `meta.json`: where it came from, how it did, and what serves beside it.

    Written by the worker that trained it (`AdapterStore.commit` adds `version`
    and `created`); read by the daemon (serving, status), the report and the
    CLI. Keys it does not know (a newer writer's) are kept in `extra` and
    written back unchanged.
    """

    created_unix: float | None = None
    served_from_ts: float | None = None  # the newest reading when it was committed (the data's clock)
    reason: str | None = None  # why its update started, for people
    cause: UpdateCause | None = None  # what started its update (None in adapters from before it was recorded)
    base_fingerprint: str | None = None  # the base it was trained on (None: an adapter from before this was recorded)
    data_range: DataRange = field(default_factory=lambda: DataRange())
    windows: dict[str, int] = field(default_factory=dict)
    metrics_before: dict[str, float | None] = field(default_factory=dict)
    metrics_after: dict[str, float | None] = field(default_factory=dict)
    val_loss: float | None = None
    plan: PlanStatus | None = None  # the start plan
    plan_history: list[PlanChangeJson] = field(default_factory=list)
    chosen_blocks: list[int] = field(default_factory=list)
    block_grad_norms: list[float] = field(default_factory=list)
    trainable_params: int | None = None
    peak_rss_mb: float | None = None
    wall_time_s: float | None = None
    previous_version: int | None = None
    baselines: list[BaselineJson] = field(default_factory=list)  # refitted with the update (scoring.serving.baselines_of)
    held_out: HeldOut | None = None  # the adapted model against them on held-out windows
    gate: GateJson | None = None  # how the gate decided (None in adapters from before it was recorded)
    # The adapted model's |residual| on its held-out windows: where residual drift starts from once
    # it serves (None: an adapter from before they were recorded; the judges learn from the stream).
    validation_residuals: ValidationResiduals | None = None
    techniques: list[str] = field(default_factory=list)  # the low-memory techniques its update ran (empty: from before they were recorded)
    # sha256 of each of the adapter's files, written at commit and checked before it is served
    # (None: an adapter from before they were recorded, served unchecked).
    sha256: dict[str, str] | None = None
    version: int | None = None
    created: str | None = None  # iso8601
    extra: JsonObject = field(default_factory=dict)  # free-form: this version does not know them

    @classmethod
    def from_json(cls, data: JsonObject) -> AdapterMeta:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> AdapterMetaJson:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **out}  # type: ignore[typeddict-item]  # the fields are AdapterMetaJson's keys

    @property
    def update_cause(self) -> UpdateCause | None:
        """`cause`, or for an adapter written before it was recorded, read from its `reason`."""
        if self.cause is not None or self.reason is None:
            return self.cause
        if self.reason.endswith(_LEGACY_NEW_DATA_SUFFIX):
            return "new_data"
        return _LEGACY_REASONS.get(self.reason)


def adapter_meta(
    job: UpdateJob,
    report: UpdateReport,
    data: UpdateData,
    *,
    created_unix: float,
    served_from_ts: float | None,
    base_fingerprint: str | None,
    previous_version: int | None,
    baselines: list[BaselineJson],
    held_out: HeldOut | None,
    validation_residuals: ValidationResiduals | None = None,
) -> AdapterMeta:
    """An accepted update's meta.json, from its job, its report and its data (with where its
    adapter stands: when, on which base, after which version, beside which baselines)."""
    return AdapterMeta(
        created_unix=created_unix,
        served_from_ts=served_from_ts,
        reason=job.reason,
        cause=job.cause,
        base_fingerprint=base_fingerprint,
        data_range={"recent": list(data.recent_range), "replay": [list(s) for s in data.replay_spans]},
        windows={
            "recent_train": len(data.recent_train),
            "recent_val": len(data.recent_val),
            "replay_train": len(data.replay_train),
            "replay_val": len(data.replay_val),
        },
        metrics_before=dict(report.metrics_before),
        metrics_after=dict(report.metrics_after),
        val_loss=report.metrics_after.get("recent_val_loss"),
        plan=report.plan_history[0].plan.to_dict() if report.plan_history else None,
        plan_history=[change.to_dict() for change in report.plan_history],
        chosen_blocks=list(report.chosen_blocks),
        block_grad_norms=list(report.block_grad_norms),
        trainable_params=report.trainable_params,
        peak_rss_mb=report.peak_rss_bytes / 2**20,
        wall_time_s=report.wall_time_s,
        previous_version=previous_version,
        baselines=baselines,
        held_out=held_out,
        gate=report.gate,
        validation_residuals=validation_residuals,
        techniques=list(report.techniques),
    )


__all__ = [
    "AdapterMeta",
    "AdapterMetaJson",
    "DataRange",
    "JobKind",
    "JobResult",
    "Progress",
    "ProgressEvent",
    "TrainingStep",
    "UpdateCause",
    "UpdateJob",
    "UpdateReport",
    "UpdateReportJson",
    "WorkerOrder",
    "adapter_meta",
    "resets_drift_baseline",
]
