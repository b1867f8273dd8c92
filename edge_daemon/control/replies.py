"""The shapes of what the daemon reports: each control-socket reply and every section of
`status`, as TypedDicts its producers return and the CLI reads (the MQTT payloads are
mqtt/outputs.py's).

A key is required where the daemon always sends it, NotRequired where it may not. The control
server adds `"ok": true` to every reply (`ErrorReply` is its failure form). Times are ISO 8601
UTC strings from `times.iso`: to the second, to the millisecond where a time names a grid step;
the exceptions are unix seconds a program compares, as the MQTT payloads' `ts` is:
`scoring.last.ts` and `training.job.since` / `started`.
Only typing here: the CLI imports this module on its cheap `--json` path. The TypedDicts are
typing_extensions' so pydantic can generate JSON Schemas of them (it reads no other on Python
< 3.12): the retained MQTT status carries `ScoringCounters`.
"""

from __future__ import annotations

from typing import Literal, NotRequired, Union

from typing_extensions import TypedDict

Track = Literal["drift", "stable"]

# Free-form JSON, for what has no shape of its own: a control request line before it is checked
# (and as the CLI sends it), a reply as a client reads it, the keys of a newer meta.json this
# version does not know.
JsonValue = Union[None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]]
JsonObject = dict[str, JsonValue]


class ErrorReply(TypedDict):
    """Any command's failure reply."""

    ok: Literal[False]
    error: str


# -- status sections ------------------------------------------------------------------------------


class StoreCheckStatus(TypedDict):
    """The store's newest check (`store.check_store` at start, `ReplayStore.check_now` or
    `ReplayStore.recover` while running)."""

    time: str  # when (ISO 8601)
    seconds: float  # PRAGMA quick_check's time (0: there was no store yet)
    problem: str | None  # what it found wrong (None: intact)
    moved_to: str | None  # the damaged file, moved aside; a new store started in its place
    cause: str  # why it was checked: "start", "scheduled", or the SQLite error met while running


class StoreStatus(TypedDict):
    readings: int
    bytes: int
    disk_free_bytes: int
    disk_full: bool  # ingestion waits for disk space
    check: StoreCheckStatus
    damaged: int  # damaged stores moved aside for a new one since the daemon started (at start and while running)


class ClockStatus(TypedDict):
    """clock.ClockWatch.status()."""

    trust: Literal["kernel", "always", "never"]
    synchronized: bool | None  # None: the kernel was not asked (or cannot say)
    trusted: bool
    jumps: int
    last_jump_s: float | None  # signed: > 0 the clock went forward


class IngestClockStatus(ClockStatus):
    holding: int  # readings held until the clock is trusted


class BrokerStatus(TypedDict):
    """The broker link (mqtt.client.Connection.broker_status)."""

    host: str
    port: int
    tls: bool
    connected: bool  # connected with the subscriptions granted
    # The last failure to connect or the lost connection, until the next successful connect:
    # "TLS: certificate verify failed for <host> (<why>)", "cannot connect to broker <host>:<port>: ...",
    # "broker refused the connection: Not authorized". Never holds a secret.
    error: str | None


class IngestStatus(TypedDict):
    """received/rejected count messages (and rejected entries of `values` maps); readings,
    stored and duplicates count readings."""

    received: int
    readings: int
    stored: int
    duplicates: int
    rejected: int
    batches: int
    dropped_disk_full: int
    held: int
    released: int
    rejected_by_reason: dict[str, int]
    ignored: int  # fields that are not configured channels, messages on topics without readings
    ignored_by_reason: dict[str, int]
    connected: bool
    broker: BrokerStatus
    disk_full: bool
    clock: IngestClockStatus


class AdapterSummary(TypedDict):
    """The served adapter (`version` None: the base model alone, or no base when `base` is False)."""

    version: int | None
    created: str | None
    size_bytes: int
    val_loss: float | None
    base: bool


class DriftTrackStatus(TypedDict):
    state: Track
    detections: int
    last_detected: str | None


class DriftSamples(TypedDict):
    inputs: int
    residuals: int


class PsiStatus(TypedDict):
    value: float | None
    threshold: float
    reference: Literal["learning", "first window", "training data"]
    window_filled: float


class ResidualWindowStatus(TypedDict):
    ratio: float | None
    threshold: float
    # "validation": the filling window is judged against the model's held-out residuals
    baseline: Literal["learning", "validation", "first window"]
    window_filled: float


class CusumStatus(TypedDict):
    statistic: float
    threshold: float
    # "validation": watching against the model's held-out residuals until a day of the stream refines them
    state: Literal["learning", "validation", "watching"]
    samples: int
    time_of_day_learnt: NotRequired[float]  # with [drift] cusum_by_time_of_day


class LevelStatus(DriftTrackStatus):
    """The level judge of a channel in [drift] level_channels (drift/level.py)."""

    statistic: float  # the larger CUSUM sum, in standard deviations
    threshold: float
    # "shift": in an episode (the level has not been back to normal since it fired)
    judging: Literal["learning", "watching", "shift"]
    time_of_day_learnt: float  # share of the slices of the day with a typical level
    change_from: str | None  # when the shift began, at the first detection since the last reset


class ChannelDriftStatus(DriftTrackStatus):
    """One channel: both tracks together, then each; the judges present depend on [drift]."""

    inputs: DriftTrackStatus
    residuals: DriftTrackStatus
    residual_level: float | None
    residual_baseline: float | None
    samples: DriftSamples
    psi: NotRequired[PsiStatus]  # inputs = "reference"
    residual_window: NotRequired[ResidualWindowStatus]  # residuals = "window"
    residual_change_from: NotRequired[str | None]  # residuals = "window"
    residual_cusum: NotRequired[CusumStatus]  # residuals = "window" with cusum
    level: NotRequired[LevelStatus]  # a channel in level_channels


class DriftStatus(TypedDict):
    detected: bool
    channels: dict[str, ChannelDriftStatus]
    last_detected: str | None
    detector: str
    inputs: str
    residuals: str
    baseline_since: str | None


class MemoryStatus(TypedDict):
    rss_mb: float
    budget_mb: float
    level: str  # pressure.Level.label
    usage_mb: float
    usage_source: str
    peak_rss_mb: float
    available_mb: float
    cgroup_mb: float | None
    budget_source: str


class LastScore(TypedDict):
    ts: float  # the grid step scored (unix seconds, the data's clock)
    score: float | None
    version: int | None
    served_by: str | None


class HorizonComparison(TypedDict):
    served_by_channel: dict[str, str]
    steps_compared: int
    mae: dict[str, float | None]


class ServingComparison(TypedDict):
    """scoring.serving.Scorer.comparison(): who is served and the live mean |error| of each forecaster."""

    served: str
    served_by_channel: dict[str, str]
    mode: str
    steps_compared: int
    baselines_only: bool  # no base yet: the best baseline fitted on the store is served
    mae: dict[str, float | None]
    mae_by_channel: dict[str, list[float] | None]
    switches: int
    horizons: dict[str, HorizonComparison]


class ScoringCounters(TypedDict):
    """ScoringPipeline.counters(): cheap counts, also in the retained MQTT status."""

    steps: int  # grid steps completed
    scored: int
    late_readings: int  # arrived after their grid step was completed: dropped from scoring
    last_late: str | None  # the timestamp of the latest of them (ISO 8601)
    held: int | None  # readings the store holds for the clock (scored once released); None without a store
    outliers: int  # readings set aside far ahead of the stream and dropped unconfirmed
    set_aside: int  # readings set aside now, waiting for later ones to confirm them
    stalled: str | None  # why scoring stalls while readings arrive; None while it does not


class ScoringStatus(ScoringCounters):
    anomalies: int
    dropped_batches: int  # batches dropped from scoring while it was behind (stored all the same)
    dropped_readings: int  # the readings in them
    failures_in_a_row: int
    last: LastScore | None
    serving: ServingComparison | None  # None while there is no base model


class PlanStatus(TypedDict):
    """plan.TrainingPlan.to_dict()."""

    micro_batch: int
    accumulation: int
    checkpointing: bool
    optimizer: str
    step_in_backward: bool
    forward_only: bool


class PlanChangeJson(TypedDict):
    """plan.PlanChange.to_dict(): a plan taking effect during an update."""

    step: int
    window: int
    plan: PlanStatus


class EightBitJson(TypedDict):
    """plan.EightBitPayoff.to_dict()."""

    saving_mb: float
    import_mb: float
    pays: bool


class ProgressStatus(TypedDict):
    """records.Progress.to_json(): its fields that are set (an empty object while no job runs)."""

    phase: NotRequired[str]
    plan: NotRequired[PlanStatus]
    step: NotRequired[int]
    steps: NotRequired[int]
    loss: NotRequired[float]
    level: NotRequired[str]
    recent_windows: NotRequired[int]
    replay_windows: NotRequired[int]


class JobStatus(TypedDict):
    """records.UpdateJob.to_json()."""

    kind: Literal["update", "pretrain"]
    reason: str
    cause: Literal["request", "drift", "new_data"] | None
    since: float | None  # unix seconds where its recent data starts (drift's dated onset)
    baseline_mb: float
    budget_mb: float
    seed: int
    started: float | None  # unix seconds
    in_service: bool  # runs on a thread of the daemon (an update that starts forward-only), not in a worker


class OutcomeStatus(TypedDict):
    """governor.UpdateOutcome.to_json()."""

    start_plan: PlanStatus
    final_plan: PlanStatus
    worst_level: str
    stopped: bool


class RecurrenceJson(TypedDict):
    """Recurrence.to_json(): the evidence behind the gate's weight."""

    weight: float
    distinct: bool
    changed: list[str]
    persists_s: float | None
    old_seen_s: float | None
    returns: int
    longest_absence_s: float | None
    buckets: int
    summary: str


class AttemptJson(TypedDict):
    """One training attempt as the gate judged it."""

    kind: str  # "first", "heavier replay" or "anchored to the incumbent"
    replay_fraction: float  # share of each batch drawn from older data
    recent_val_loss: float | None
    replay_val_loss: float | None
    accepted: bool
    reason: str


class GateJson(TypedDict):
    """GateVerdict.to_json(): how the gate decided, for the adapter's meta, the alerts and `status`."""

    accepted: bool
    reason: str  # in words an operator understands
    weight: float  # the old regime's weight (1: today's fixed rule)
    forgetting: float | None  # how much worse the replayed loss got (0.37: 37% worse)
    allowed_forgetting: float | None  # tolerance / weight (None: unlimited)
    failed_on: Literal["recent", "forgetting"] | None
    evidence: RecurrenceJson | None  # why the weight is what it is
    attempts: list[AttemptJson]  # the first training and, before a rejection for forgetting, the retry


class LastUpdate(TypedDict):
    """records.JobResult.to_json(): how the last job ended."""

    kind: Literal["update", "pretrain"]
    accepted: bool
    version: int | None
    reason: str | None
    duration_s: float | None
    metrics_before: dict[str, float | None] | None
    metrics_after: dict[str, float | None] | None
    peak_rss_mb: float | None
    outcome: OutcomeStatus | None
    finished: str | None
    gate: GateJson | None  # how the gate decided (None: no verdict, or a pretraining job)
    techniques: list[str] | None  # the low-memory techniques the update ran (None: it did not train, or a pretraining job)


class TrainingStatus(TypedDict):
    """Only state, plan and last before the update runner exists."""

    state: Literal["idle", "running", "paused"]
    plan: PlanStatus | None
    last: LastUpdate | None
    progress: NotRequired[ProgressStatus]
    job: NotRequired[JobStatus | None]
    requested: NotRequired[bool]
    trigger: NotRequired[str | None]  # why the trigger last did (not) start an update
    retry_after_s: NotRequired[float]
    expected_worker_mb: NotRequired[float]
    expected_worker_measured: NotRequired[bool]
    heavy_modules: NotRequired[list[str]]


# -- replies --------------------------------------------------------------------------------------


class StatusReply(TypedDict):
    """`status`: a section per part started so far (a request during start-up gets fewer)."""

    device: str
    uptime_s: float
    store: NotRequired[StoreStatus]
    memory: NotRequired[MemoryStatus]
    drift: NotRequired[DriftStatus]
    adapter: NotRequired[AdapterSummary]
    scoring: NotRequired[ScoringStatus]
    ingest: NotRequired[IngestStatus]
    training: NotRequired[TrainingStatus]


class AdapterDetail(AdapterSummary):
    """The served adapter with where it came from; the extra keys only while one is served."""

    metrics_before: NotRequired[dict[str, float | None]]
    metrics_after: NotRequired[dict[str, float | None]]
    plan: NotRequired[PlanStatus | None]
    chosen_blocks: NotRequired[list[int]]
    peak_rss_mb: NotRequired[float | None]
    reason: NotRequired[str | None]


class AdapterReply(TypedDict):
    """`adapter`."""

    adapter: AdapterDetail


class AdapterMetrics(TypedDict):
    recent_before: float | None
    recent_after: float | None
    replay_before: float | None
    replay_after: float | None


class AdapterListing(TypedDict):
    version: int
    created: str
    size_bytes: int
    val_loss: float | None
    current: bool
    metrics: AdapterMetrics


class AdaptersReply(TypedDict):
    """`adapters`: every stored version, oldest first."""

    current: int | None
    adapters: list[AdapterListing]


class DriftReply(TypedDict):
    """`drift`."""

    drift: DriftStatus


class TrainReply(TypedDict):
    """`train`: whether the request may start an update."""

    accepted: bool
    state: Literal["idle", "running"]
    message: str


class RollbackReply(TypedDict):
    """`rollback`: what is served now."""

    adapter: AdapterSummary

