"""One adaptation (or the base-model bootstrap) as a training worker runs it.

The worker holds the base it trains, its LoRA layers (the project's own, no
peft) and activations; when it exits, all of that goes back to the OS, so the
daemon's steady state stays lean. Its steps: the data since the change plus
replay (`training.data`), the start plan (dry runs, `training.start`), training
under the governor, the gate, the baselines refitted for an accepted adapter (`training.refit`) and its
commit (not yet current) with the meta built from the job, the trainer's report and the data
(`records.adapter_meta`), with the update's trace (`training.trace`). The daemon's side is
`adaptation.runner`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_daemon.artifacts.traces import TraceJob, save_adapter_trace, save_update_trace
from edge_daemon.config import Config
from edge_daemon.training.governor import PlanGovernor
from edge_daemon.memory.pressure import SharedLevel
from edge_daemon.training.plan import PlanChange, TrainingPlan, forward_only
from edge_daemon.training.records import JobResult, Progress, ProgressEvent, UpdateJob, WorkerOrder, adapter_meta
from edge_daemon.training.data import prepare_update_data
from edge_daemon.training.recurrence import from_store
from edge_daemon.training.refit import refit_baselines
from edge_daemon.training.start import AFTER_TRAINING_MB, AUTOGRAD_SETUP_MB, measure_micro_batch_mb
from edge_daemon.training.trace import TRACE_INTERVAL_S, UpdateTrace, heavy_modules_loaded
from edge_daemon.training.worker import MessageWriter, SharedFlag

if TYPE_CHECKING:
    from edge_daemon.drift.prior import ValidationResiduals

log = logging.getLogger(__name__)


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
    _run_job(config, job, governor, stop_event, out, service_pid=order.service_pid, modules_at_fork=modules_at_fork)


def run_in_service(config: Config, job: UpdateJob, governor: PlanGovernor, stop_event: Any, out: MessageWriter) -> None:
    """An update that starts forward-only, run on a thread of the daemon itself: write one
    `JobResult` to `out`.

    Its memory is that of a scoring pass, which the daemon already makes; a forked worker would
    add its own pages (the copies of what it writes after the fork, ~17 MB on the default model)
    for nothing a forward pass needs isolating from. The thread's own priority is lowered (Linux
    keeps a nice value per thread); the governor is the daemon's level and stop flag.
    """
    import threading

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + config.train.nice)
    except (OSError, AttributeError, ValueError):
        pass  # best effort, as in a worker
    _run_job(config, job, governor, stop_event, out, service_pid=os.getpid(), modules_at_fork=None)


def _run_job(
    config: Config, job: UpdateJob, governor: PlanGovernor, stop_event: Any, out: Any,
    service_pid: int | None, modules_at_fork: frozenset[str] | None,
) -> None:  # fmt: skip
    """Run the job and write its one `JobResult` (a failure included) to `out`, then close it
    whatever ends it: the daemon's monitor waits for the end of the pipe."""
    try:
        if job.kind == "pretrain":
            result = _run_pretrain(config, stop_event, out)
        else:
            result = _run_update(config, job, governor, stop_event, out, service_pid=service_pid, modules_at_fork=modules_at_fork)
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
    finally:
        out.close()


def _check_stop(stop_event: Any) -> None:
    """Setup phases (data, dry runs) take seconds on a device: a shutdown need not wait for them."""
    from edge_daemon.errors import TrainingAborted

    if stop_event.is_set():
        raise TrainingAborted("stopped for shutdown before training")


def _run_pretrain(config: Config, stop_event: Any, out: Any) -> JobResult:
    from edge_daemon.training.pretrain import pretrain_from_config

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

    `service_pid` is the daemon, whose service's usage the trace records (in its training worker,
    or on its own thread for an update that starts forward-only); `modules_at_fork` what a worker
    had imported when it was forked. Run in-process in tests and benchmarks there is neither.
    """
    from edge_daemon.errors import TrainingAborted

    trace = UpdateTrace(TRACE_INTERVAL_S, service_pid, governor.level_reader).start()
    extra: TraceJob = {
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
        record = trace.to_dict(extra)
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
    from edge_daemon.training.plan import choose_start_plan, plan_limit_mb

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
        # How likely the old regime is to return, from the store's history: the gate's weight on it.
        recurrence = from_store(
            store, list(config.channels.names), data.recent_range[0], data.recent_range[1],
            min_weight=config.train.gate_min_weight, settle_hours=config.train.gate_settle_hours,
        )  # fmt: skip
    _check_stop(stop_event)
    trace.phase("planning")
    out.put(Progress("planning", recent_windows=len(data.recent_train), replay_windows=len(data.replay_train)))

    # Dry-run candidate plans and start with the loosest that stays within the update's share of
    # the serving usage and under "critical". What the worker holds already (its data, the base it
    # trains in place, its copies of shared pages) and what it adds after training count on top of
    # the service's usage.
    candidates = list(job.candidates)
    targets = list(config.lora.target_modules)
    limit_mb = plan_limit_mb(job.baseline_mb, job.budget_mb, config.memory.critical, config.memory.update_share)
    critical_mb = config.memory.critical * job.budget_mb  # where the update would stop
    plan = _forward_only_start(config, job, base.model, data.recent_train, targets, private_from, critical_mb)
    if plan is None:
        # A process's first backward sets torch's autograd up (~13 MB measured on the default model):
        # done once here, it is counted with what the worker holds, not as the tightest plan's cost
        # (which, scaled by the micro-batch, would rule out every looser plan).
        measure_micro_batch_mb(base.model, data.recent_train, candidates[-1], targets)
        held_mb = max(0.0, (private_mb() or 0.0) - private_from) + AFTER_TRAINING_MB
        plan = choose_start_plan(
            candidates,
            lambda p: measure_micro_batch_mb(base.model, data.recent_train, p, targets),
            baseline_mb=job.baseline_mb + held_mb,
            limit_mb=limit_mb,
            fallback=forward_only(candidates[-1]) if config.train.forward_only == "auto" else None,
            critical_mb=critical_mb,
        )
    _check_stop(stop_event)
    governor.begin_update(plan)
    trace.phase("training")
    trace.plan(plan, governor.level_reader().label)
    out.put(Progress("training", plan=plan, step=0))

    last_plan = [plan]  # the plan that runs (with fp32 state where 8-bit state does not pay)

    def on_progress(event: ProgressEvent) -> None:
        if isinstance(event, PlanChange):
            if event.plan == last_plan[0]:
                return  # the start plan as chosen, traced and reported above
            last_plan[0] = event.plan
            level = governor.level_reader().label
            trace.plan(event.plan, level)
            out.put(Progress("training", plan=event.plan, level=level))
            return
        trace.step(event.step, event.loss)
        out.put(
            Progress(
                "training", plan=event.plan, step=event.step, steps=event.steps, loss=event.loss,
                recent_windows=event.recent_windows, replay_windows=event.replay_windows,
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
        plan_source=governor.plan_source,
        should_stop=governor.should_stop,
        on_progress=on_progress,
        seed=job.seed,
        # The served model only for the metrics before training (with no adapter, that is the
        # base); the base itself is the worker's own, trained in place.
        incumbent=(lambda: serving_model(base, incumbent_version)) if incumbent_version is not None else None,
        in_place=True,
        recurrence=recurrence,
    )
    # Training's freed memory back to the kernel before saving and refitting allocate more.
    release_memory()
    trace.phase("saving" if trained.accepted else "done")
    result = JobResult("update", accepted=trained.accepted, reason=trained.reason, report=trained.report, outcome=governor.outcome())
    if not (trained.accepted and trained.adapted is not None):
        return result, None
    # An adapter is small, but the room is the readings': below the reserve nothing is written.
    reserve = config.store.disk_reserve_mb * 1024 * 1024
    if free_bytes(config.adapters_dir) < reserve:
        raise TrainingError(f"disk space short (under the {config.store.disk_reserve_mb:g} MB reserve): the accepted adapter is not saved")
    staging = adapters.staging_dir()
    try:
        save_adapter(trained.adapted, staging, config.lora.save)
    except BaseException:
        adapters.discard(staging)  # half written: never committed, so never served
        raise
    # The newest reading when the adapter goes live: where serving switches on the data's own
    # clock (a backfill or a sped-up replay runs ahead of the wall clock).
    with ReplayStore(config.store_path, config.store, config.channels.names) as store:
        span = store.time_range()
    # The baselines refitted on this update's windows, and how the adapted model compares with
    # them on its held-out ones: where serving starts (scoring.serving.ServingRule).
    baselines, held_out = refit_baselines(base, config, data, trained.adapted, batch_size=last_plan[0].micro_batch)
    validation = adapter_validation_residuals(trained.adapted, data, last_plan[0].micro_batch, trained.incumbent_val_mean_abs)
    meta = adapter_meta(
        job,
        result.report,
        data,
        created_unix=started,
        served_from_ts=span[1] if span is not None else None,
        base_fingerprint=base.fingerprint,
        previous_version=incumbent_version.version if incumbent_version else None,
        baselines=baselines,
        held_out=held_out,
        validation_residuals=validation,
    )
    # Stored, not yet current: the daemon points `current` at it once its scorer serves it.
    version = adapters.commit(staging, meta, make_current=False)
    result.version = version.version
    result.adapter_bytes = adapter_bytes(version.path)
    trace.phase("committed")
    return result, version.path


def _forward_only_start(
    config: Config, job: UpdateJob, model: Any, windows: Any, targets: list[str], private_from: float, critical_mb: float
) -> TrainingPlan | None:
    """The forward-only plan where the update must start with it, else None (dry-run the ladder).

    It must where the daemon offers nothing else (`[train] forward_only = "on"`, or its start rule
    found room for a forward-only update only), and where the last rung is on and even the first
    backward would cross the critical line (where the update would stop): what the worker holds,
    one forward of the tightest plan's micro-batch and the autograd set-up a backward pays once
    (AUTOGRAD_SETUP_MB). The backward is then never run, so the worker never pays for it. Above
    the update's share of the usage but under the critical line, the ladder's tightest plan runs.
    """
    from edge_daemon.memory.usage import private_mb

    candidates = list(job.candidates)
    if candidates[0].forward_only:
        return candidates[0]
    if config.train.forward_only != "auto":
        return None
    rung = forward_only(candidates[-1])
    forward_mb = measure_micro_batch_mb(model, windows, rung, targets)
    held_mb = max(0.0, (private_mb() or 0.0) - private_from) + AFTER_TRAINING_MB
    needed = job.baseline_mb + held_mb + AUTOGRAD_SETUP_MB + forward_mb
    if needed < critical_mb:
        return None
    log.info("a backward would need %.0f MB, over the critical line at %.0f MB: starting forward-only", needed, critical_mb)
    return rung


def adapter_validation_residuals(
    model: Any, data: Any, batch_size: int, incumbent_mean_abs: list[float] | None = None
) -> ValidationResiduals | None:
    """The adapted model's |residual| on the update's recent held-out windows, for its meta: where
    residual drift starts from once it serves (drift/prior.py); with the incumbent's on the same
    windows, to say how the two compare."""
    from edge_daemon.drift.prior import validation_residuals
    from edge_daemon.training.pretrain import last_step_errors

    if data.recent_val_ends is None or len(data.recent_val) == 0:
        return None
    summary = validation_residuals(last_step_errors(model, data.recent_val.numpy(), batch_size), data.recent_val_ends)
    if summary is not None and incumbent_mean_abs is not None and len(incumbent_mean_abs) == len(summary["mean_abs"]):
        summary["incumbent_mean_abs"] = [float(v) for v in incumbent_mean_abs]
    return summary


__all__ = ["run_in_service", "run_worker"]
