"""One adaptation (or the base-model bootstrap) as a training worker runs it.

The worker holds the base it trains, its LoRA layers (the project's own, no
peft) and activations; when it exits, all of that goes back to the OS, so the
daemon's steady state stays lean. Its steps: the data since the change plus
replay, the start plan (dry runs), training under the governor, the gate, and
the commit of an accepted adapter (not yet current). The daemon's side is
`adaptation.runner`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_daemon.artifacts.traces import save_adapter_trace, save_update_trace
from edge_daemon.config import Config
from edge_daemon.governor import PlanGovernor
from edge_daemon.memory.pressure import SharedLevel
from edge_daemon.plan import TrainingPlan
from edge_daemon.records import AdapterMeta, JobResult, Progress, UpdateJob, WorkerOrder
from edge_daemon.worker import MessageWriter, SharedFlag

log = logging.getLogger(__name__)

# Replay spans drawn per update; each segment yields several windows.
MAX_REPLAY_SEGMENTS = 24
# Recent windows kept per update: a longer span since a change is thinned (strided) to this many,
# so a day of data at 1 s costs what an hour does.
MAX_RECENT_WINDOWS = 4096
# Samples are thinned (every other one dropped, interval doubled) past this many, so a long
# update's trace stays a few tens of kB.
TRACE_MAX_POINTS = 600
TRACE_INTERVAL_S = 0.1  # first sampling period; fine enough to see a plan change take effect
# What a worker's own memory grows by after training, on top of what it held when it planned:
# the metrics after, the saved adapter, the baselines refitted (measured on the default model:
# 4-5 MB, the update's peak when the plan's activations are small). The plan leaves room for it.
AFTER_TRAINING_MB = 6.0
# Libraries of tens of MB each that neither the daemon nor (forked from it) a worker needs.
HEAVY_MODULES = ("peft", "transformers", "accelerate", "bitsandbytes", "torch._dynamo", "sympy")


def heavy_modules_loaded() -> list[str]:
    """Which of HEAVY_MODULES this process has loaded: anything here is a regression the memory figures would show."""
    return sorted(m for m in HEAVY_MODULES if m in sys.modules)


# ---------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------


@dataclass
class UpdateData:
    """Normalised (N, T+1, C) windows for one update (`trainer.GridWindows`: cut from the grid when read)."""

    recent_train: Any
    recent_val: Any
    replay_train: Any
    replay_val: Any
    recent_range: tuple[float, float]
    replay_spans: list[tuple[float, float]]


def prepare_update_data(
    store: Any, base: Any, config: Config, rng: np.random.Generator, since: float | None = None
) -> UpdateData:
    """Recent windows (split by time) and replayed windows from older segments of the store.

    Recent data is what came since `since` (when the residuals began to drift: the model is
    taught the new behaviour, not the old one it already knows), else the last
    `train.recent_hours`; replay comes from before it.
    """
    import torch

    from edge_daemon.errors import TrainingError
    from edge_daemon.frames import build_grid, split_indices_by_time, valid_window_starts
    from edge_daemon.training.batches import GridWindows

    span = store.time_range()
    if span is None:
        raise TrainingError("the store is empty")
    newest = span[1]
    cutoff = newest - config.train.recent_hours * 3600.0 if since is None else min(float(since), newest)
    length = base.cfg.window + 1
    n_channels = len(config.channels.names)  # grid columns, config order; the windows hold the model's inputs

    def rows_between(since: float | None, until: float | None, stride: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's input rows of the grid between the times, the start row of each gap-free
        window (every `stride`-th) and its end time."""
        ts, idx, values = store.read(since, until)
        grid = base.inputs(build_grid(ts, idx, values, n_channels, config.channels.period_s, config.channels.max_fill_steps))
        starts = valid_window_starts(grid.values, length, stride)
        ends = grid.t0 + (starts + length - 1).astype(np.float64) * grid.period_s
        return np.ascontiguousarray(grid.values, dtype=np.float32), starts, ends

    steps = (newest - cutoff) / config.channels.period_s
    rows, starts, ends = rows_between(cutoff, None, stride=max(1, math.ceil(steps / MAX_RECENT_WINDOWS)))
    train, val = split_indices_by_time(ends, length, config.train.val_fraction, period_s=config.channels.period_s)
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"not enough recent data: {len(starts)} windows of {length} gap-free steps since the cutoff")
    recent_rows = torch.from_numpy(rows)
    recent_starts = torch.from_numpy(starts)

    # Replay: the rows of each older segment one after the other, windows within each.
    spans = store.replay_segments(before=cutoff, rng=rng, max_segments=MAX_REPLAY_SEGMENTS)
    row_parts, start_parts, offset = [], [], 0
    for a, b in spans:
        seg_rows, seg_starts, _ = rows_between(a, b, stride=max(1, length // 4))
        if len(seg_starts):
            row_parts.append(seg_rows)
            start_parts.append(seg_starts + offset)
            offset += len(seg_rows)
    replay_rows = torch.from_numpy(np.concatenate(row_parts)) if row_parts else torch.empty((0, base.cfg.n_inputs))
    replay_starts = np.concatenate(start_parts) if start_parts else np.empty(0, np.int64)
    order = torch.from_numpy(replay_starts[rng.permutation(len(replay_starts))])
    n_val = int(round(len(order) * config.train.val_fraction))
    return UpdateData(
        recent_train=GridWindows(recent_rows, recent_starts[torch.from_numpy(train)], length),
        recent_val=GridWindows(recent_rows, recent_starts[torch.from_numpy(val)], length),
        replay_train=GridWindows(replay_rows, order[n_val:], length),
        replay_val=GridWindows(replay_rows, order[:n_val], length),
        recent_range=(float(cutoff), float(newest)),
        replay_spans=[(float(a), float(b)) for a, b in spans],
    )


def measure_micro_batch_mb(base_model: Any, windows: Any, plan: TrainingPlan, targets: list[str]) -> float:
    """Peak MB one forward/backward of `plan.micro_batch` windows adds (kernel high-water mark).

    Every target Linear of every block gets gradients: an upper bound on what
    LoRA on a subset of blocks keeps, cheap to set up, no peft needed. Runs on
    `base_model` itself (no copy: on the large model a copy is ~19 MB) and
    leaves its flags, mode and gradients as they were.
    """
    import torch

    from edge_daemon.model import forecast_loss
    from edge_daemon.memory.usage import peak_rss_mb, process_tree_rss_mb, release_memory, reset_peak_rss

    model = base_model
    flags = {p: p.requires_grad for p in model.parameters()}
    mode, checkpointing = model.training, model.gradient_checkpointing
    try:
        model.train()
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                module.weight.requires_grad_(True)
        model.gradient_checkpointing = plan.checkpointing
        batch = windows[: plan.micro_batch]
        release_memory()
        before = process_tree_rss_mb(os.getpid())
        reset_peak_rss()
        loss = forecast_loss(model, batch)
        loss.backward()
        peak = peak_rss_mb()
        del loss, batch
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(mode)
        model.gradient_checkpointing = checkpointing
    release_memory()
    return max(0.0, peak - before)


class UpdateTrace:
    """Memory over time, phases, plan changes and step losses of one update.

    Times are seconds since `start()`. Each sample holds this process's RSS
    and its private memory (pages no other process maps: what a forked worker
    adds to the service) and, with `service_pid` (the daemon, when this runs
    in its training worker), the whole service's usage as the watchdog counts
    it (the cgroup's charge, else the tree's PSS): what the budget is
    measured against. Reading private memory costs ~1 ms, ~1% of a core at
    the first sampling period. Samples come on the process's one sampling
    thread (`memory.sampling`), which also serves the training loop's peak RSS.
    """

    def __init__(self, interval_s: float = 0.1, service_pid: int | None = None, level_reader: Callable[[], Any] | None = None) -> None:
        from edge_daemon.memory.sampling import Subscription, process_sampler
        from edge_daemon.memory.usage import TreeMemory

        self.interval_s = interval_s
        self.service_pid = service_pid
        self._service = TreeMemory(service_pid) if service_pid is not None else None
        self.level_reader = level_reader
        self._sampler = process_sampler()
        self._subscription: Subscription | None = None
        self._lock = threading.Lock()
        self.started_unix = time.time()
        self._t0 = time.monotonic()
        self.samples: dict[str, list[float | None]] = {"t": [], "rss_mb": [], "private_mb": [], "service_mb": []}
        self.phases: list[dict[str, Any]] = []
        self.plans: list[dict[str, Any]] = []
        self.levels: list[dict[str, Any]] = []
        self.steps: dict[str, list[float]] = {"t": [], "step": [], "loss": []}

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def _sample(self, rss_bytes: int | None = None) -> None:
        """One sample; `rss_bytes` is the sampling thread's reading, read here when called at an event."""
        from edge_daemon.memory.usage import private_mb

        rss = (self._sampler.rss_bytes() if rss_bytes is None else rss_bytes) / 2**20
        private = private_mb()
        service = None
        if self._service is not None:
            try:
                service = round(self._service.usage_mb(), 1)
            except Exception:  # the daemon may be gone; the worker's own figures are still worth keeping
                service = None
        level = None
        if self.level_reader is not None:
            try:
                level = self.level_reader().label
            except Exception:
                level = None
        with self._lock:
            # Timed under the lock: a sample from the sampler thread and one at a phase change,
            # taken at once, then land in time order whichever measured first.
            t = self.now()
            self.samples["t"].append(t)
            self.samples["rss_mb"].append(round(rss, 1))
            self.samples["private_mb"].append(None if private is None else round(private, 1))
            self.samples["service_mb"].append(service)
            if level is not None and (not self.levels or self.levels[-1]["level"] != level):
                self.levels.append({"t": t, "level": level})
            if len(self.samples["t"]) > TRACE_MAX_POINTS:
                for key in self.samples:
                    self.samples[key] = self.samples[key][::2]
                self.interval_s *= 2
                if self._subscription is not None:
                    self._subscription.interval_s = self.interval_s

    def start(self) -> UpdateTrace:
        self.started_unix = time.time()
        self._t0 = time.monotonic()
        self._sample()
        self._subscription = self._sampler.add(self._sample, self.interval_s)
        return self

    def stop(self) -> None:
        if self._subscription is not None:
            self._sampler.remove(self._subscription)
            self._subscription = None
        self._sample()

    def phase(self, name: str) -> None:
        """Mark the start of a phase, with a memory sample at it (as at every plan change), so a
        trace has its memory at each event whatever the sampling period caught in between."""
        with self._lock:
            self.phases.append({"t": self.now(), "phase": name})
        self._sample()

    def plan(self, plan: TrainingPlan, level: str | None = None) -> None:
        with self._lock:
            self.plans.append({"t": self.now(), "plan": plan.to_dict(), "level": level})
        self._sample()

    def step(self, step: int, loss: float) -> None:
        with self._lock:
            if len(self.steps["t"]) >= 4 * TRACE_MAX_POINTS:
                for key in self.steps:
                    self.steps[key] = self.steps[key][::2]
            self.steps["t"].append(self.now())
            self.steps["step"].append(step)
            self.steps["loss"].append(float(loss))

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        with self._lock:
            def peak(key: str) -> float | None:
                values = [v for v in self.samples[key] if v is not None]
                return max(values) if values else None

            return {
                "started_unix": self.started_unix,
                "duration_s": self.now(),
                "interval_s": self.interval_s,
                "peak_sampled_rss_mb": peak("rss_mb"),
                "peak_sampled_private_mb": peak("private_mb"),
                "peak_sampled_service_mb": peak("service_mb"),
                "samples": {k: list(v) for k, v in self.samples.items()},
                "phases": list(self.phases),
                "plans": list(self.plans),
                "levels": list(self.levels),
                "steps": {k: list(v) for k, v in self.steps.items()},
                **extra,
            }


def run_worker(order: WorkerOrder, out: MessageWriter, level: SharedLevel, stop_event: SharedFlag) -> None:
    """Entry point of a training worker (forked, see `worker.py`): run the job, write one
    `JobResult` to `out`. The governor arrives without its level reader and stop event; the
    worker's are the shared ones it inherited."""
    # Taken only here, in a forked worker: also how the update knows every private page is its own.
    modules_at_fork = frozenset(sys.modules)
    job, governor = order.job, order.governor
    governor.level_reader, governor.stop_event = level, stop_event
    try:
        os.nice(int(order.config.get("train", {}).get("nice", 10)))
        import psutil

        psutil.Process().ionice(psutil.IOPRIO_CLASS_IDLE)
    except (OSError, AttributeError, ValueError):
        pass  # lower priority is best effort (no permission, or no ionice on this platform)
    import torch

    torch.set_num_threads(1)  # leave the other core(s) to ingestion and scoring
    from edge_daemon.config import parse_config

    config = parse_config(order.config)
    try:
        if job.kind == "pretrain":
            result = _run_pretrain(config, stop_event, out)
        else:
            result = _run_update(config, job, governor, stop_event, out, service_pid=order.service_pid, modules_at_fork=modules_at_fork)
        out.put(result)
    except Exception as exc:  # reported to the daemon, which logs it: a failed update is not fatal
        from edge_daemon.errors import TrainingAborted

        log.exception("update job failed") if not isinstance(exc, TrainingAborted) else None
        out.put(
            JobResult(
                job.kind,
                accepted=False,
                aborted=isinstance(exc, TrainingAborted),
                error=f"{type(exc).__name__}: {exc}",
                # No outcome when it failed before training began (no plan was chosen).
                outcome=governor.outcome() if job.kind == "update" and governor.current_plan is not None else None,
            )
        )
    out.close()


def _check_stop(stop_event: Any) -> None:
    """Setup phases (data, dry runs) take seconds on a device: a shutdown need not wait for them."""
    from edge_daemon.errors import TrainingAborted

    if stop_event.is_set():
        raise TrainingAborted("stopped for shutdown before training")


def _run_pretrain(config: Config, stop_event: Any, out: Any) -> JobResult:
    from edge_daemon.pretrain import pretrain_from_config

    out.put(Progress("pretrain"))
    metrics = pretrain_from_config(config, should_stop=stop_event.is_set)
    return JobResult("pretrain", accepted=True, metrics=metrics)


def _run_update(
    config: Config,
    job: UpdateJob,
    governor: PlanGovernor,
    stop_event: Any,
    out: Any,
    service_pid: int | None = None,
    modules_at_fork: frozenset[str] | None = None,
) -> JobResult:
    """One update with its memory/plan trace saved under the state dir whatever the outcome.

    In the daemon's training worker, `service_pid` is the daemon (whose service's usage the trace
    records) and `modules_at_fork` what the worker had imported when it was forked; run in-process
    (tests, benchmarks) there is neither.
    """
    from edge_daemon.errors import TrainingAborted

    trace = UpdateTrace(TRACE_INTERVAL_S, service_pid, governor.level_reader).start()
    extra: dict[str, Any] = {
        "reason": job.reason,
        "cause": job.cause,
        "budget_mb": job.budget_mb,
        "baseline_mb": job.baseline_mb,
        "thresholds": {"elevated": config.memory.elevated, "high": config.memory.high, "critical": config.memory.critical},
    }
    result: JobResult | None = None
    version_path: Path | None = None
    try:
        result, version_path = _update_traced(config, job, governor, stop_event, out, trace, in_worker=modules_at_fork is not None)
        extra.update(outcome="accepted" if result.accepted else "rejected", detail=result.reason, version=result.version)
        extra.update(metrics_before=result.metrics_before, metrics_after=result.metrics_after)
        return result
    except BaseException as exc:
        extra.update(outcome="aborted" if isinstance(exc, TrainingAborted) else "failed", detail=f"{type(exc).__name__}: {exc}", version=None)
        raise
    finally:
        trace.stop()
        extra["worker_imports"] = heavy_modules_loaded()
        extra["worker_new_modules"] = None if modules_at_fork is None else sorted(set(sys.modules) - modules_at_fork)
        record = trace.to_dict(**extra)
        try:
            save_update_trace(config.device.state_dir, record)
            if version_path is not None:
                save_adapter_trace(version_path, record)
        except OSError as exc:  # telemetry only: never turn a finished update into a failed one
            log.warning("could not save the update trace: %s", exc)


def _update_traced(
    config: Config, job: UpdateJob, governor: PlanGovernor, stop_event: Any, out: Any, trace: UpdateTrace, in_worker: bool
) -> tuple[JobResult, Path | None]:
    """The update's steps; returns its result and the committed version's directory (None when rejected)."""
    from edge_daemon.artifacts.adapters import AdapterStore
    from edge_daemon.artifacts.base import load_base
    from edge_daemon.artifacts.merge import serving_model
    from edge_daemon.errors import TrainingError
    from edge_daemon.store import ReplayStore, free_bytes
    from edge_daemon.training.loop import update
    from edge_daemon.training.lora import adapter_bytes, save_adapter
    from edge_daemon.memory.usage import private_mb, release_memory
    from edge_daemon.plan import choose_start_plan, plan_limit_mb

    started = time.time()
    # What this update holds of its own: in a forked worker, every private page; run in-process
    # (tests, benchmarks), what was added since here.
    private_from = 0.0 if in_worker else (private_mb() or 0.0)
    trace.phase("loading")
    _check_stop(stop_event)
    base = load_base(config.base_dir, config.channels.names, config.channels.period_s, config.channels.inputs_only)
    adapters = AdapterStore(config.adapters_dir, keep=config.train.keep_versions)
    incumbent_version = adapters.current()
    rng = np.random.default_rng(job.seed)
    with ReplayStore(config.store_path, config.store, config.channels.names) as store:
        data = prepare_update_data(store, base, config, rng, since=job.since)
    _check_stop(stop_event)
    trace.phase("planning")
    out.put(Progress("planning", recent_windows=len(data.recent_train), replay_windows=len(data.replay_train)))

    # Dry-run candidate plans and start with the loosest that stays within the update's share of
    # the serving usage and under "critical". What the worker holds already (its data, the base it
    # trains in place, its copies of shared pages) and what it adds after training count on top of
    # the service's usage.
    candidates = list(job.candidates)
    targets = list(config.lora.target_modules)
    # A process's first backward sets torch's autograd up (~13 MB measured on the default model):
    # done once here, it is counted with what the worker holds, not as the tightest plan's cost
    # (which, scaled by the micro-batch, would rule out every looser plan).
    measure_micro_batch_mb(base.model, data.recent_train, candidates[-1], targets)
    held_mb = max(0.0, (private_mb() or 0.0) - private_from) + AFTER_TRAINING_MB
    plan = choose_start_plan(
        candidates,
        lambda p: measure_micro_batch_mb(base.model, data.recent_train, p, targets),
        baseline_mb=job.baseline_mb + held_mb,
        limit_mb=plan_limit_mb(job.baseline_mb, job.budget_mb, config.memory.critical, config.memory.update_share),
    )
    _check_stop(stop_event)
    governor.begin_update(plan)
    trace.phase("training")
    trace.plan(plan, governor.level_reader().label)
    out.put(Progress("training", plan=plan, step=0))

    last_plan = [plan]  # the plan that runs
    asked = [plan]  # the governor's own last plan
    fp32_only = [False]  # set when the trainer finds 8-bit state not worth importing bitsandbytes

    def plan_source(current: TrainingPlan) -> TrainingPlan | None:
        new = governor.plan_source(asked[0])
        if new is None:
            return None
        asked[0] = new
        runs = replace(new, optimizer="adamw") if fp32_only[0] else new
        if runs != last_plan[0]:
            last_plan[0] = runs
            level = governor.level_reader().label
            trace.plan(runs, level)
            out.put(Progress("training", plan=runs, level=level))
        return runs

    def on_progress(info: dict[str, Any]) -> None:
        if "eight_bit" in info:  # the trainer's verdict on 8-bit state, before its first step
            fp32_only[0] = config.train.optimizer == "auto" and not info["eight_bit"]["pays"]
            return
        trace.step(int(info["step"]), float(info["loss"]))
        out.put(
            Progress(
                "training", plan=last_plan[0], step=int(info["step"]), steps=int(info["steps"]), loss=float(info["loss"]),
                recent_windows=int(info["recent_windows"]), replay_windows=int(info["replay_windows"]),
            )
        )  # fmt: skip

    trained = update(
        base.model,
        data.recent_train,
        data.recent_val,
        data.replay_train,
        data.replay_val,
        config.lora,
        config.train,
        plan,
        plan_source=plan_source,
        should_stop=governor.should_stop,
        on_progress=on_progress,
        seed=job.seed,
        # The served model only for the metrics before training (with no adapter, that is the
        # base); the base itself is the worker's own, trained in place.
        incumbent=(lambda: serving_model(base, incumbent_version)) if incumbent_version is not None else None,
        in_place=True,
    )
    # Training's freed memory back to the kernel before saving and refitting allocate more.
    release_memory()
    trace.phase("saving" if trained.accepted else "done")
    summary = trained.to_dict()
    summary.pop("train_losses", None)
    summary.pop("grad_norms", None)
    result = JobResult("update", accepted=trained.accepted, reason=trained.reason, summary=summary, outcome=governor.outcome())
    if not (trained.accepted and trained.adapted is not None):
        return result, None
    # An adapter is small, but the room is the readings': below the reserve nothing is written.
    reserve = config.store.disk_reserve_mb * 1024 * 1024
    if free_bytes(config.adapters_dir) < reserve:
        raise TrainingError(f"disk space short (under the {config.store.disk_reserve_mb:g} MB reserve): the accepted adapter is not saved")
    staging = adapters.staging_dir()
    try:
        save_adapter(trained.adapted, staging)
    except BaseException:
        adapters.discard(staging)  # half written: never committed, so never served
        raise
    # The newest reading when the adapter goes live: where serving switches on the data's own
    # clock (a backfill or a sped-up replay runs ahead of the wall clock).
    with ReplayStore(config.store_path, config.store, config.channels.names) as store:
        span = store.time_range()
    # The baselines refitted on this update's windows, and how the adapted model compares with
    # them on its held-out ones: where serving starts (scoring.ServingRule).
    baselines, held_out = refit_baselines(base, config, data, trained.adapted, batch_size=last_plan[0].micro_batch)
    meta = AdapterMeta(
        created_unix=started,
        served_from_ts=span[1] if span is not None else None,
        reason=job.reason,
        cause=job.cause,
        base_fingerprint=base.fingerprint,
        data_range={"recent": list(data.recent_range), "replay": [list(s) for s in data.replay_spans]},
        windows={
            "recent_train": len(data.recent_train),
            "recent_val": len(data.recent_val),
            "replay_train": len(data.replay_train),
            "replay_val": len(data.replay_val),
        },
        metrics_before=summary["metrics_before"],
        metrics_after=summary["metrics_after"],
        val_loss=summary["metrics_after"].get("recent_val_loss"),
        plan=plan.to_dict(),
        plan_history=summary["plan_history"],
        chosen_blocks=summary["chosen_blocks"],
        block_grad_norms=summary["block_grad_norms"],
        trainable_params=summary["trainable_params"],
        peak_rss_mb=summary["peak_rss_bytes"] / 2**20,
        wall_time_s=summary["wall_time_s"],
        previous_version=incumbent_version.version if incumbent_version else None,
        baselines=baselines,
        held_out=held_out,
    )
    # Stored, not yet current: the daemon points `current` at it once its scorer serves it.
    version = adapters.commit(staging, meta, make_current=False)
    result.version = version.version
    result.adapter_bytes = adapter_bytes(version.path)
    trace.phase("committed")
    return result, version.path


def refit_baselines(
    base: Any, config: Config, data: UpdateData, model: Any, batch_size: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Baselines fitted on an update's training windows (recent and replayed) and the held-out
    comparison on its recent validation windows, with `model` the adapted forecaster."""
    from edge_daemon.baselines import held_out_report, make_baselines
    from edge_daemon.pretrain import last_step_errors

    n_sensors = base.cfg.n_sensors  # the forecast channels, then the inputs only; the calendar after them
    # The ridge fit reads the last lags + horizon steps of each window (seasonal naive and
    # persistence read none): those of every window, not whole windows.
    tail = base.cfg.lags + max(base.cfg.horizons)
    train = np.concatenate([data.recent_train.tails(tail), data.replay_train.tails(tail)])[..., :n_sensors]
    season = base.meta.get("season_steps") or config.model.season_steps or None
    baselines = make_baselines(train, season, base.cfg.lags, base.cfg.horizons, base.cfg.n_channels)
    val = data.recent_val.numpy()
    # The adapted model forecasts as many windows at a time as the update's last plan trained on:
    # what fitted the memory then fits it now.
    held_out = held_out_report(baselines, val[..., :n_sensors], last_step_errors(model, val, batch_size), base.cfg.n_channels)
    return [b.to_dict() for b in baselines], held_out


__all__ = ["prepare_update_data", "refit_baselines", "run_worker", "UpdateTrace"]
