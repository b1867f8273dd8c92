"""The training plan: how one update spends memory, the ladder of plans and where an update starts.

A plan is the knob set the memory watchdog turns (micro-batch size, gradient
accumulation, gradient checkpointing, optimizer state precision, the optimizer
step in backward, forward-only updates); the trainer runs whatever plan it is
handed at each micro-batch boundary. The ladder runs from the loosest plan to
the tightest, and a forward-only plan is its last rung before a pause; `tighten`
steps down it for a pressure level and `choose_start_plan` picks the start by
dry runs. Where 8-bit optimizer state does
not pay for its import (`EightBitPayoff`), `Fp32State` runs every plan with fp32 state
instead. No torch here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

from edge_daemon.memory.pressure import Level
from edge_daemon.control.replies import EightBitJson, PlanChangeJson, PlanStatus

if TYPE_CHECKING:
    from edge_daemon.config import TrainConfig

log = logging.getLogger(__name__)

OptimizerKind = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class TrainingPlan:
    micro_batch: int  # windows per forward/backward pass
    accumulation: int  # micro-batches summed per optimizer step
    checkpointing: bool  # recompute block activations in backward instead of keeping them
    optimizer: OptimizerKind  # adamw8bit keeps Adam moments in 8 bits
    # Each parameter stepped, and its gradient freed, as soon as backward has made it: no full set
    # of gradients is ever held. One backward per step, so no accumulation; our own AdamW only.
    step_in_backward: bool = False
    # Forward passes only (two per perturbation of the adapter, regenerated from a seed): an
    # update's memory is a scoring pass's. The last rung before an update pauses.
    forward_only: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.accumulation < 1:
            raise ValueError(f"micro_batch and accumulation must be >= 1, got {self.micro_batch}, {self.accumulation}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.step_in_backward and (self.accumulation != 1 or self.optimizer != "adamw" or self.forward_only):
            raise ValueError("the optimizer step in backward needs accumulation 1, fp32 AdamW and a backward pass")

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation

    def to_dict(self) -> PlanStatus:
        return PlanStatus(**asdict(self))

    @classmethod
    def from_dict(cls, data: PlanStatus) -> TrainingPlan:
        return cls(
            micro_batch=int(data["micro_batch"]),
            accumulation=int(data["accumulation"]),
            checkpointing=bool(data["checkpointing"]),
            optimizer=data["optimizer"],
            # Plans recorded before these knobs existed ran without them.
            step_in_backward=bool(data.get("step_in_backward", False)),
            forward_only=bool(data.get("forward_only", False)),
        )

    def describe(self) -> str:
        """Short human form for logs: `8x4 ckpt adamw8bit`, `32x1 no-ckpt adamw step-in-backward`,
        `8x4 forward-only`."""
        if self.forward_only:
            return f"{self.micro_batch}x{self.accumulation} forward-only"
        text = f"{self.micro_batch}x{self.accumulation} {'ckpt' if self.checkpointing else 'no-ckpt'} {self.optimizer}"
        return text + " step-in-backward" if self.step_in_backward else text

    @property
    def techniques(self) -> list[str]:
        """The low-memory techniques this plan runs, by name (for an update's meta and status)."""
        if self.forward_only:
            return ["forward_only"] + (["micro_batching"] if self.accumulation > 1 else [])
        names = ["micro_batching"] if self.accumulation > 1 else []
        names += ["checkpointing"] if self.checkpointing else []
        names += ["8bit_optimizer_state"] if self.optimizer == "adamw8bit" else []
        return names + (["step_in_backward"] if self.step_in_backward else [])


@dataclass(frozen=True)
class PlanChange:
    """A plan taking effect during an update: the start plan (step 0, window 0), then every change
    at a micro-batch boundary. The trainer records each in its report and emits each as it happens."""

    step: int  # optimizer step during which the plan took effect (0-based)
    window: int  # windows of that step already done when it took effect
    plan: TrainingPlan

    def to_dict(self) -> PlanChangeJson:
        return {"step": self.step, "window": self.window, "plan": self.plan.to_dict()}


def plan_from_config(train: TrainConfig) -> TrainingPlan:
    """The loosest plan the config allows; the watchdog may start tighter.

    The micro-batch is the largest divisor of `batch_size` not above
    `micro_batch`, so micro-batches always add up to exactly the effective
    batch. 'auto' settings start loose (no checkpointing, fp32 state).
    """
    limit = min(train.micro_batch, train.batch_size)
    micro = max(d for d in range(1, limit + 1) if train.batch_size % d == 0)
    plan = TrainingPlan(
        micro_batch=micro,
        accumulation=train.batch_size // micro,
        checkpointing=train.gradient_checkpointing == "on",
        optimizer="adamw8bit" if train.optimizer == "adamw8bit" else "adamw",
    )
    return forward_only(plan) if train.forward_only == "on" else plan


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


# The largest micro-batch a forward-only plan runs. Measured (benchmarks/toolbox.py --only
# in-service; default model, one thread, a batch of 32): 28 ms a step at 32 and at 8 with glibc's
# malloc defaults (33 at 4, 65 at 1), 46 and 53 ms with the daemon's settings; charged 14.4 MB
# against 4.5 MB (glibc's), 6.7 against 2.2 MB (the daemon's).
FORWARD_ONLY_MAX_MICRO_BATCH = 8


def forward_only(plan: TrainingPlan) -> TrainingPlan:
    """The last rung: `plan`'s batches, forward passes only (no backward, gradients or optimizer
    state), in micro-batches of at most FORWARD_ONLY_MAX_MICRO_BATCH (the largest divisor of the
    effective batch up to there, so the batch stays exact)."""
    effective = plan.effective_batch
    micro = max(d for d in range(1, min(plan.micro_batch, FORWARD_ONLY_MAX_MICRO_BATCH) + 1) if effective % d == 0)
    return TrainingPlan(micro, effective // micro, False, "adamw", forward_only=True)


def tighten(plan: TrainingPlan, level: Level, forward_only_rung: bool = False) -> TrainingPlan | None:
    """The plan for `level`, never looser than `plan`; None means stop the update.

    elevated: gradient checkpointing on. high: micro-batch halved (to the
    largest divisor of the effective batch at or below half, so the effective
    batch stays exact), accumulation raised to match, 8-bit optimizer state
    and checkpointing (the step in backward ends: it excludes accumulation).
    Each call at high halves again: the caller decides how often to apply it
    (PlanGovernor: once per entry into high). critical: with
    `forward_only_rung`, the forward-only plan; a forward-only plan at critical
    stops, and a forward-only plan stays one below it.
    """
    if level >= Level.CRITICAL:
        return forward_only(plan) if forward_only_rung and not plan.forward_only else None
    if plan.forward_only:
        return plan  # nothing left to tighten but the pause
    if level == Level.HIGH:
        effective = plan.effective_batch
        micro = _largest_divisor_at_most(effective, plan.micro_batch // 2)
        return TrainingPlan(micro, effective // micro, True, "adamw8bit")
    if level == Level.ELEVATED:
        return plan if plan.checkpointing else replace(plan, checkpointing=True)
    return plan


def plan_candidates(effective_batch: int, max_micro: int) -> list[TrainingPlan]:
    """The ladder, loosest first: full micro fp32 state, + checkpointing, then halving with 8-bit state to micro 1."""
    if effective_batch < 1 or max_micro < 1:
        raise ValueError(f"effective_batch and max_micro must be >= 1, got {effective_batch}, {max_micro}")
    micro = _largest_divisor_at_most(effective_batch, max_micro)
    ladder = [
        TrainingPlan(micro, effective_batch // micro, False, "adamw"),
        TrainingPlan(micro, effective_batch // micro, True, "adamw"),
    ]
    while micro > 1:
        tighter = tighten(ladder[-1], Level.HIGH)
        assert tighter is not None
        ladder.append(tighter)
        micro = tighter.micro_batch
    if len(ladder) == 2:
        # micro 1 already: 8-bit state is the only step left.
        ladder.append(TrainingPlan(1, effective_batch, True, "adamw8bit"))
    return ladder



def plan_ladder(train: TrainConfig) -> list[TrainingPlan]:
    """The plans an update may train with, tightest last, within `[train]`'s choices of
    checkpointing and optimizer (where they leave none, as 8-bit state without checkpointing does,
    the one plan they name); with `forward_only = "on"`, the forward-only plan alone."""
    if train.forward_only == "on":
        return [plan_from_config(train)]
    ladder = plan_candidates(train.batch_size, plan_from_config(train).micro_batch)
    return [
        p
        for p in ladder
        if not (train.gradient_checkpointing == "off" and p.checkpointing)
        and not (train.gradient_checkpointing == "on" and not p.checkpointing)
        and not (train.optimizer == "adamw" and p.optimizer == "adamw8bit")
        and not (train.optimizer == "adamw8bit" and p.optimizer == "adamw")
    ] or [plan_from_config(train)]

# What 8-bit state costs a training process that has torch but neither of these loaded, measured
# here: bitsandbytes ~44 MB, and its optimizer, a torch.optim one, loads torch._dynamo ~70 MB.
BITSANDBYTES_IMPORT_MB = 44.0
TORCH_DYNAMO_IMPORT_MB = 70.0
# 8-bit moments cost precision and time: worth it only for a saving of at least this much.
MIN_8BIT_SAVING_MB = 1.0


@dataclass(frozen=True)
class EightBitPayoff:
    """Whether 8-bit Adam state is worth importing bitsandbytes for, on this many trainable parameters."""

    saving_mb: float  # two fp32 moments (8 bytes a parameter) kept in 8 bits (2 bytes) instead
    import_mb: float  # what loading bitsandbytes (and torch._dynamo) costs now (0 once loaded)

    @property
    def pays(self) -> bool:
        return self.saving_mb > self.import_mb + MIN_8BIT_SAVING_MB

    @classmethod
    def of(cls, trainable_params: int) -> EightBitPayoff:
        cost = 0.0 if sys.modules.get("bitsandbytes") is not None else BITSANDBYTES_IMPORT_MB
        cost += 0.0 if sys.modules.get("torch._dynamo") is not None else TORCH_DYNAMO_IMPORT_MB
        return cls(trainable_params * 6 / 2**20, cost)

    def to_dict(self) -> EightBitJson:
        return {"saving_mb": round(self.saving_mb, 3), "import_mb": self.import_mb, "pays": self.pays}


# The optimizer step in backward frees a full set of gradients: worth its per-parameter clipping
# (no global norm) only where that is at least this much.
MIN_STEP_IN_BACKWARD_SAVING_MB = 1.0


def with_step_in_backward(plan: TrainingPlan, wanted: bool) -> TrainingPlan:
    """`plan` with the optimizer step in backward where it is `wanted` and the plan allows it (one
    micro-batch a step, fp32 AdamW, a backward pass), without it elsewhere."""
    allowed = wanted and plan.accumulation == 1 and plan.optimizer == "adamw" and not plan.forward_only
    return plan if plan.step_in_backward == allowed else replace(plan, step_in_backward=allowed)


def with_fp32_state(plan: TrainingPlan) -> TrainingPlan:
    """The plan with fp32 optimizer state."""
    return plan if plan.optimizer == "adamw" else replace(plan, optimizer="adamw")


class Fp32State:
    """Where 8-bit optimizer state does not pay (`runs_fp32`): a plan source whose plans run with
    fp32 state. The source is asked with the plan it last gave (not the fp32 one that runs), so a
    governor does not read the difference as a looser plan and its outcome is its own plans'."""

    def __init__(self, source: Callable[[TrainingPlan], TrainingPlan | None], start: TrainingPlan) -> None:
        self.source = source
        self.last = start

    @staticmethod
    def runs_fp32(optimizer_setting: str, payoff: EightBitPayoff) -> bool:
        """Under `[train] optimizer = "auto"`, 8-bit state only where it saves more than its import
        costs; a setting that names an optimizer is taken as it is."""
        return optimizer_setting == "auto" and not payoff.pays

    def __call__(self, current: TrainingPlan) -> TrainingPlan | None:
        proposed = self.source(self.last)
        if proposed is None:
            return None
        self.last = proposed
        return with_fp32_state(proposed)


# How many times a micro-batch's activations grow when checkpointing is dropped (measured on the
# large model at micro-batch 32: +455 MB with, +904 MB without); used to predict before a dry run.
CHECKPOINTING_SAVES = 2.0


def plan_limit_mb(serving_mb: float, budget_mb: float, critical: float, update_share: float) -> float:
    """Where an update's predicted peak must stay: within `update_share` of the service's usage
    before the update (`serving_mb`) above it, so that a roomy budget does not buy a plan many
    times the serving footprint, and under the critical threshold, where it would stop. Not under
    elevated: under a tight limit the service serves above it, and the plan would always be the
    tightest (micro-batch 1, twice the wall time); the watchdog tightens a plan that crosses it."""
    return min(critical * budget_mb, serving_mb * (1.0 + update_share))


def choose_start_plan(
    candidates: Sequence[TrainingPlan],
    measure_peak_mb: Callable[[TrainingPlan], float],
    baseline_mb: float,
    limit_mb: float,
    fallback: TrainingPlan | None = None,
    critical_mb: float | None = None,
) -> TrainingPlan:
    """The loosest candidate whose one-micro-batch dry run stays under `limit_mb` (`plan_limit_mb`).

    `measure_peak_mb(plan)` returns the MB a dry run of one micro-batch adds
    above `baseline_mb` (the service's usage with the worker's data and model
    loaded). A dry run
    costs what it measures, and the loosest plan's can be several times the
    tightest's (large model: +209 MB at 8x4 with checkpointing, +904 MB at
    32x1 without), so candidates are measured from the tightest up, and a
    looser one only where its predicted cost fits: the last measured cost
    scaled by the micro-batch ratio, times CHECKPOINTING_SAVES where it drops
    checkpointing. Measuring stops at the first that does not fit, predicted
    or measured. Where twice the loosest's predicted cost fits, it is measured
    right after the tightest. If even the tightest does not fit, it is still
    the plan (logged: the watchdog tightens it and stops it at critical),
    unless it would cross `critical_mb` (the critical line; None: `limit_mb` is
    it) and there is a `fallback` (the forward-only plan), which is returned.
    """
    if not candidates:
        raise ValueError("no candidate plans")

    def predicted(plan: TrainingPlan, measured: TrainingPlan, cost: float) -> float:
        scaled = cost * plan.micro_batch / measured.micro_batch
        return scaled * CHECKPOINTING_SAVES if measured.checkpointing and not plan.checkpointing else scaled

    def dry_run(plan: TrainingPlan) -> tuple[float, bool]:
        cost = measure_peak_mb(plan)
        fits = baseline_mb + cost < limit_mb
        log.info(
            "plan %s: dry run +%.0f MB over %.0f MB baseline, %s the %.0f MB limit",
            plan.describe(), cost, baseline_mb, "under" if fits else "over", limit_mb,
        )  # fmt: skip
        return cost, fits

    tightest, loosest = candidates[-1], candidates[0]
    last_cost, fits = dry_run(tightest)
    chosen: TrainingPlan | None = tightest if fits else None
    # Where there is room for twice what the loosest is predicted to cost (the usual case: a small
    # model, a roomy budget), it is dry-run next: two dry runs, not the whole ladder.
    if chosen is not None and loosest != tightest and baseline_mb + 2 * predicted(loosest, tightest, last_cost) < limit_mb:
        if dry_run(loosest)[1]:
            return loosest
    for plan in reversed(candidates[:-1]):
        if chosen is None:
            break
        guess = predicted(plan, chosen, last_cost)
        if baseline_mb + guess >= limit_mb:
            log.info("plan %s: predicted +%.0f MB over %.0f MB baseline, over the %.0f MB limit: not tried", plan.describe(), guess, baseline_mb, limit_mb)
            break
        cost, fits = dry_run(plan)
        if not fits:
            break
        chosen, last_cost = plan, cost
    if chosen is None:
        line = limit_mb if critical_mb is None else critical_mb
        if fallback is not None and baseline_mb + last_cost >= line:
            log.warning("no plan with a backward fits under the critical line (%.0f MB); starting with %s", line, fallback.describe())
            return fallback
        log.warning("no plan fits under %.0f MB; starting with the tightest, %s", limit_mb, tightest.describe())
        return tightest
    return chosen
