"""One low-memory LoRA update of the forecaster, from windows to a gated adapter.

Owns the micro-batch training loop (gradient accumulation, checkpointing,
8-bit optimizer state where it pays, replay mixing, plan changes at
micro-batch boundaries), its typed progress events and report
(`records.ProgressEvent`, `records.UpdateReport`) and the update's peak RSS
(sampled by `memory.sampling`). LoRA layers are the project's own (`training.lora`,
saved in peft's format): training imports neither peft nor transformers, and
bitsandbytes only when 8-bit state pays for its import.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_daemon.errors import TrainingAborted, TrainingError
from edge_daemon.memory.sampling import RssSampler
from edge_daemon.memory.usage import release_memory
from edge_daemon.model import Forecaster, forecast_loss
from edge_daemon.training.forward_only import forward_only_step
from edge_daemon.training.plan import (
    MIN_STEP_IN_BACKWARD_SAVING_MB,
    EightBitPayoff,
    Fp32State,
    PlanChange,
    TrainingPlan,
    with_fp32_state,
    with_step_in_backward,
)
from edge_daemon.training.records import ProgressEvent, TrainingStep, UpdateReport
from edge_daemon.training.batches import BatchMixer
from edge_daemon.training.blocks import BlockChoice, choose_blocks
from edge_daemon.training.gate import AttemptJson, GateVerdict, evaluate_loss, judge, window_losses
from edge_daemon.training.lora import build_lora_model, forecaster_of, lora_layers, set_checkpointing
from edge_daemon.training.recurrence import Recurrence
from edge_daemon.training.pretrain import last_step_errors
from edge_daemon.training.optimizer import Optimizer, make_optimizer, optimizer_state_bytes

if TYPE_CHECKING:
    from edge_daemon.config import LoraConfigSection, TrainConfig

log = logging.getLogger(__name__)

PlanSource = Callable[[TrainingPlan], "TrainingPlan | None"]


@dataclass
class UpdateResult(UpdateReport):
    """The update's report with the adapted model (only when accepted, or `keep_rejected`)."""

    adapted: nn.Module | None = field(default=None, repr=False)
    # The incumbent's mean |residual| per forecast channel on the recent held-out windows: how the
    # adapter's own compare with it there (drift/prior.py).
    incumbent_val_mean_abs: list[float] | None = field(default=None, repr=False)

    @property
    def report(self) -> UpdateReport:
        """The report alone, without the model: what the worker sends the daemon."""
        return UpdateReport(**{f.name: getattr(self, f.name) for f in fields(UpdateReport)})


def _check_windows(base: Forecaster, **named: torch.Tensor) -> None:
    for name, windows in named.items():
        if len(windows) == 0:  # "no replay data" may come as any empty tensor
            continue
        if windows.dim() != 3 or windows.shape[-1] != base.cfg.n_inputs:
            raise TrainingError(f"{name}: expected (N, T+1, {base.cfg.n_inputs}) windows, got {tuple(windows.shape)}")
        if not 2 <= windows.shape[1] <= base.cfg.window + 1:
            raise TrainingError(f"{name}: window length {windows.shape[1]} must be 2..{base.cfg.window + 1}")


def update(
    base_model: Forecaster,
    recent_train: torch.Tensor,
    recent_val: torch.Tensor,
    replay_train: torch.Tensor,
    replay_val: torch.Tensor,
    lora_cfg: LoraConfigSection,
    train_cfg: TrainConfig,
    plan: TrainingPlan,
    plan_source: PlanSource | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    seed: int = 0,
    incumbent: nn.Module | Callable[[], nn.Module] | None = None,
    keep_rejected: bool = False,
    in_place: bool = False,
    recurrence: Recurrence | None = None,
    start_from: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> UpdateResult:
    """Train one LoRA adapter on a copy of `base_model` (or, `in_place`, on `base_model` itself:
    a training worker's own, which nothing else uses) and gate it.

    Windows are (N, T+1, C) normalised tensors. `plan_source(current)` is asked
    at every micro-batch boundary and may return a new plan (None = keep);
    `should_stop()` is asked there too and stops the update. `on_progress(event)`
    hears each plan as it takes effect (`PlanChange`) and each step (`TrainingStep`). The gate compares
    against `incumbent` (the model currently served, e.g. base with the current
    adapter merged, or a function that builds it: built for the metrics before
    training and dropped before training starts), by default the base. Nothing is saved here; the result
    carries the adapted model only if accepted (or if `keep_rejected`, for
    benchmarks and tests). `recurrence` weighs the replayed loss in the gate (how likely the old
    regime is to return; None: in full, the fixed rule). Before a rejection for forgetting the
    adapter trains once more (`[train] gate_retry`) and is judged again. `start_from` (a fleet's
    adapter: (lora_A, lora_B) of rank `[lora] r` by module name) is where the adapter starts, on
    its modules, instead of a fresh one on the blocks the probe chooses.

    Raises TrainingAborted (stopped; nothing kept) or TrainingError (non-finite
    loss, no data). In both cases every reference to the training copy is
    dropped and memory released before the exception leaves this function.
    """
    _check_windows(base_model, recent_train=recent_train, recent_val=recent_val, replay_train=replay_train, replay_val=replay_val)
    started = time.monotonic()
    sampler = RssSampler(train_cfg.rss_sample_interval_s).start()
    failure: Exception | None = None
    try:
        # A private RNG stream: LoRA init and dropout are reproducible per seed
        # and the caller's global RNG state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            result = _update(
                base_model, recent_train, recent_val, replay_train, replay_val, lora_cfg, train_cfg, plan,
                plan_source, should_stop, on_progress, seed, incumbent, keep_rejected, in_place, recurrence, start_from,
            )  # fmt: skip
    except (TrainingAborted, TrainingError) as exc:
        # A fresh exception, logged as text only: the original's traceback (also
        # via a kept log record) would hold the training frames, and with them
        # the model copy and optimizer, alive.
        failure = type(exc)(str(exc))
        log.warning("update %s: %s", "stopped" if isinstance(exc, TrainingAborted) else "failed", str(exc))
    finally:
        memory = sampler.stop()
    if failure is not None:
        release_memory()
        raise failure
    result.wall_time_s = time.monotonic() - started
    result.peak_rss_bytes = memory.peak_rss_bytes
    result.start_rss_bytes = memory.start_rss_bytes
    log.info(
        "update %s in %.1fs (peak RSS %.0f MB): %s",
        "accepted" if result.accepted else "rejected", result.wall_time_s, memory.peak_rss_bytes / 2**20, result.reason,
    )  # fmt: skip
    return result


def _start_choice(start_from: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> BlockChoice:
    """The modules an adapter that starts from `start_from` adapts: its own (no probe, so no norms)."""
    if not start_from:
        raise TrainingError("the adapter to start from has no modules")
    targets = sorted(start_from)
    blocks = sorted({int(name.split(".")[1]) for name in targets if name.startswith("blocks.") and name.split(".")[1].isdigit()})
    return BlockChoice(blocks, [], targets)


def load_factors(lora_model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set every LoRA layer's lora_A and lora_B to `factors` (by module name); TrainingError where a
    module is missing or a shape differs (another model, or another `[lora] r`)."""
    layers = lora_layers(lora_model)
    if set(layers) != set(factors):
        raise TrainingError(f"the adapter to start from covers {sorted(factors)}, the LoRA layers are {sorted(layers)}")
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = factors[name]
            if tuple(a.shape) != tuple(layer.lora_A.weight.shape) or tuple(b.shape) != tuple(layer.lora_B.weight.shape):
                raise TrainingError(
                    f"{name}: the adapter to start from has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                    f"this model's LoRA {tuple(layer.lora_A.weight.shape)} and {tuple(layer.lora_B.weight.shape)}"
                )  # fmt: skip
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)


def _update(
    base_model: Forecaster,
    recent_train: torch.Tensor,
    recent_val: torch.Tensor,
    replay_train: torch.Tensor,
    replay_val: torch.Tensor,
    lora_cfg: LoraConfigSection,
    train_cfg: TrainConfig,
    plan: TrainingPlan,
    plan_source: PlanSource | None,
    should_stop: Callable[[], bool] | None,
    on_progress: Callable[[ProgressEvent], None] | None,
    seed: int,
    incumbent: nn.Module | Callable[[], nn.Module] | None,
    keep_rejected: bool,
    in_place: bool,
    recurrence: Recurrence | None,
    start_from: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> UpdateResult:
    if len(recent_val) == 0:
        raise TrainingError("no recent validation windows for the gate")
    generator = torch.Generator().manual_seed(seed)

    # 1. A private copy to train: the base may be serving right now and is never touched.
    model = base_model if in_place else copy.deepcopy(base_model)
    for p in model.parameters():
        p.requires_grad_(False)

    # 2. Metrics before, on what is served now.
    if incumbent is not None and not isinstance(incumbent, nn.Module):
        incumbent = incumbent()
    reference = incumbent if incumbent is not None else model
    incumbent = None
    before = {
        "recent_val_loss": evaluate_loss(reference, recent_val, plan.micro_batch),
        "replay_val_loss": evaluate_loss(reference, replay_val, plan.micro_batch),
    }
    # The incumbent's loss on each recent held-out window, for the gate's paired (median) judgement.
    recent_before = window_losses(reference, recent_val, plan.micro_batch) if train_cfg.gate_recent_statistic == "median" else None
    incumbent_val_mean_abs = (
        [float(v) for v in np.abs(last_step_errors(reference, recent_val.numpy(), plan.micro_batch)).mean(0)] if len(recent_val) else None
    )
    del reference

    # 3. Selective freezing: rank blocks by gradient norm on a probe batch of recent data (or the
    # modules of the adapter it starts from).
    if start_from is None:
        n_probe = min(lora_cfg.probe_windows, plan.micro_batch, len(recent_train))
        probe = recent_train[torch.randperm(len(recent_train), generator=generator)[:n_probe]]
        choice = choose_blocks(model, probe, lora_cfg, checkpointing=plan.checkpointing, forward_only=plan.forward_only)
        del probe
        log.info(
            "adapting blocks %s (gradient norms %s)", choice.blocks, ", ".join(f"{n:.3g}" for n in choice.grad_norms)
        )
    else:
        choice = _start_choice(start_from)
        log.info("adapting from the given adapter's %d modules (blocks %s)", len(choice.target_modules), choice.blocks)

    # 4. LoRA on the chosen blocks; the copy's own weights stay frozen.
    lora_model = build_lora_model(model, choice.target_modules, lora_cfg)
    if start_from is not None:
        load_factors(lora_model, start_from)
    lora_model.train()
    trainable = [p for p in lora_model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    total_params = sum(p.numel() for p in lora_model.parameters())
    set_checkpointing(lora_model, plan.checkpointing)
    # 8-bit state only where it saves more than importing bitsandbytes costs, unless the config
    # asks for it outright: on a LoRA of a few thousand parameters it saves kilobytes.
    payoff = EightBitPayoff.of(trainable_params)
    if Fp32State.runs_fp32(train_cfg.optimizer, payoff):
        log.info("8-bit optimizer state would save %.3f MB, importing bitsandbytes costs %.0f MB: fp32 state", payoff.saving_mb, payoff.import_mb)
        if plan_source is not None:
            plan_source = Fp32State(plan_source, plan)
        plan = with_fp32_state(plan)
    # The optimizer step in backward where it pays (a full set of gradients of at least
    # MIN_STEP_IN_BACKWARD_SAVING_MB) or is asked for, on the plans that allow it.
    in_backward = train_cfg.step_in_backward == "on" or (train_cfg.step_in_backward == "auto" and StepInBackward.pays(trainable_params))
    plan = with_step_in_backward(plan, in_backward)
    optimizer = None if plan.forward_only else make_optimizer(trainable, plan.optimizer, train_cfg.lr, train_cfg.weight_decay, train_cfg.min_8bit_size)

    # 5. The loop: one optimizer step per effective batch, fed in micro-batches.
    effective = plan.effective_batch
    history = [PlanChange(0, 0, plan)]
    if on_progress is not None:
        on_progress(history[0])
    train_losses: list[float] = []
    grad_norms: list[float] = []
    counts = [0, 0]  # windows seen, replay windows seen
    max_norm = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else math.inf
    state: dict[str, Any] = {"plan": plan, "optimizer": optimizer, "hooks": None}
    if plan.step_in_backward:
        state["hooks"] = StepInBackward(trainable, optimizer, max_norm)

    def take_plan(step: int, total: int, done: int) -> None:
        """A micro-batch boundary: stop if asked, else take any tighter plan."""
        if should_stop is not None and should_stop():
            raise TrainingAborted(f"stopped at step {step}/{total}, window {done}/{effective}")
        if plan_source is None:
            return
        new_plan = plan_source(state["plan"])
        if new_plan is None:
            return
        new_plan = with_step_in_backward(new_plan, in_backward)
        if new_plan == state["plan"]:
            return
        _apply_plan(state, new_plan, lora_model, trainable, train_cfg, max_norm)
        history.append(PlanChange(step, done, new_plan))
        if on_progress is not None:
            on_progress(history[-1])

    def run_steps(replay_fraction: float, anchor: float, first_step: int) -> None:
        """`train_cfg.steps` optimizer steps (each of those left turns into
        `forward_only_step_factor` steps once the plan is forward-only); `anchor` > 0 adds
        anchor * |theta - theta_0|^2 / n (L2-SP toward the adapter's start, i.e. toward the base)."""
        mixer = BatchMixer(recent_train, replay_train, effective, replay_fraction, generator)
        start = [p.detach().clone() for p in trainable] if anchor > 0 else []
        n_params = max(1, sum(p.numel() for p in trainable))
        factor = train_cfg.forward_only_step_factor

        def penalty() -> torch.Tensor:
            return sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, start)) * (anchor / n_params)  # type: ignore[return-value]

        @torch.no_grad()
        def penalty_value() -> float:
            return float(penalty())

        step, total = first_step, first_step + train_cfg.steps * (factor if state["plan"].forward_only else 1)
        while step < total:
            windows, is_replay = mixer.next_batch()  # (effective, T+1, C), (effective,)
            done = 0
            step_loss = 0.0
            asked = False
            while done < effective and not state["plan"].forward_only:
                take_plan(step, total, done)
                asked = True
                if state["plan"].forward_only:
                    # Turned forward-only: this step's gradients are gone with the optimizer;
                    # the step starts again forward-only, and each one left becomes `factor`.
                    total = step + (total - step) * factor
                    break
                chunk = windows[done : done + state["plan"].micro_batch]
                loss = forecast_loss(lora_model, chunk)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss {loss.item()} at step {step}")
                # Scale by the chunk's share so the summed gradients equal the full batch's mean.
                share = len(chunk) / effective
                step_loss += loss.item() * share
                done += len(chunk)
                # The anchor's pull joins the step's last backward: one backward per step when
                # the optimizer steps in it.
                objective = loss * share + (penalty() if anchor > 0 and done >= effective else 0.0)
                objective.backward()
                del loss, chunk, objective
            if state["plan"].forward_only:
                if not asked:
                    take_plan(step, total, 0)  # a step is a forward-only update's boundary
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
                step_loss, slope = forward_only_step(
                    lora_model, trainable, windows, state["plan"].micro_batch, train_cfg.forward_only_lr, train_cfg.forward_only_eps, seed,
                    penalty=penalty_value if anchor > 0 else None,
                )  # fmt: skip
                if not math.isfinite(step_loss) or not math.isfinite(slope):
                    raise TrainingError(f"non-finite loss {step_loss} at step {step}")
                grad_norms.append(abs(slope))
            elif state["hooks"] is not None:
                grad_norms.append(state["hooks"].take_norm())  # stepped and freed in backward
            else:
                # Clip the accumulated gradient, step, and free the gradients (not zero them).
                # An infinite max_norm only measures: the norm is kept as telemetry either way.
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
                state["optimizer"].step()
                state["optimizer"].zero_grad(set_to_none=True)
            counts[0] += effective
            counts[1] += int(is_replay.sum())
            train_losses.append(step_loss)
            del windows, is_replay
            step += 1
            if on_progress is not None:
                on_progress(TrainingStep(step, total, step_loss, mixer.n_recent, mixer.n_replay, state["plan"]))
        steps_done.append(step - first_step)

    def judged(kind: str, replay_fraction: float) -> tuple[dict[str, float | None], GateVerdict]:
        after = {
            "recent_val_loss": evaluate_loss(lora_model, recent_val, state["plan"].micro_batch),
            "replay_val_loss": evaluate_loss(lora_model, replay_val, state["plan"].micro_batch),
        }
        weighed = recurrence if train_cfg.gate_recurrence else None
        paired = None
        if recent_before is not None:
            recent_after = window_losses(lora_model, recent_val, state["plan"].micro_batch)
            paired = None if recent_after is None else (recent_before, recent_after)
        verdict = judge(before, after, train_cfg.gate_tolerance, train_cfg.gate_min_improvement, weighed, paired)
        attempts.append({"kind": kind, "replay_fraction": replay_fraction, **after, "accepted": verdict.accepted, "reason": verdict.reason})  # type: ignore[typeddict-item]
        return after, verdict

    attempts: list[AttemptJson] = []
    steps_done: list[int] = []
    run_steps(train_cfg.replay_fraction, 0.0, 0)
    # 6. Gate: better on recent held-out windows, not much worse on replayed ones (weighed).
    after, verdict = judged("first", train_cfg.replay_fraction)
    if verdict.failed_on == "forgetting" and train_cfg.gate_retry != "off" and len(replay_train):
        # One more attempt before rejecting for forgetting, from where the first left off.
        heavier = train_cfg.gate_retry == "replay"
        fraction = max(train_cfg.replay_fraction, train_cfg.gate_retry_replay_fraction) if heavier else train_cfg.replay_fraction
        log.info("rejected for forgetting (%s); retrying with %s", verdict.reason, "heavier replay" if heavier else "an anchor to the incumbent")
        run_steps(fraction, 0.0 if heavier else train_cfg.gate_retry_anchor, sum(steps_done))
        after, verdict = judged("heavier replay" if heavier else "anchored to the incumbent", fraction)
    verdict.attempts = attempts
    if state["hooks"] is not None:
        state["hooks"].remove()
    optimizer = state["optimizer"]
    windows_seen, replay_seen = counts
    state_bytes = {} if optimizer is None else optimizer_state_bytes(optimizer)
    del optimizer
    state.clear()
    gc.collect()

    accepted, reason = verdict.accepted, verdict.reason
    set_checkpointing(lora_model, False)
    lora_model.eval()
    return UpdateResult(
        accepted=accepted,
        reason=reason,
        metrics_before=before,
        metrics_after=after,
        plan_history=history,
        chosen_blocks=choice.blocks,
        block_grad_norms=choice.grad_norms,
        target_modules=choice.target_modules,
        trainable_params=trainable_params,
        total_params=total_params,
        steps=sum(steps_done),
        windows_seen=windows_seen,
        replay_windows_seen=replay_seen,
        train_losses=train_losses,
        grad_norms=grad_norms,
        optimizer_state=state_bytes,
        wall_time_s=0.0,
        peak_rss_bytes=0,
        start_rss_bytes=0,
        eight_bit=payoff,
        gate=verdict.to_json(),
        techniques=techniques_of(lora_model, history),
        adapted=lora_model if accepted or keep_rejected else None,
        incumbent_val_mean_abs=incumbent_val_mean_abs,
    )


def _apply_plan(
    state: dict[str, Any], new: TrainingPlan, lora_model: nn.Module, trainable: list[nn.Parameter], train_cfg: TrainConfig, max_norm: float
) -> None:
    """Switch `state` ("plan", "optimizer", "hooks") to `new` between micro-batches.

    The micro-batch size takes effect with the next chunk (the step's remaining
    windows are re-split; its effective batch is kept). A change of optimizer
    starts a fresh one: Adam moments are not carried across (bias correction
    restarts too), which costs a few steps of warm-up, not correctness.
    Gradients accumulated so far in this step are kept, except when the plan
    turns forward-only: gradients, optimizer state and the step-in-backward
    hooks all go, which is the memory the switch is for.
    """
    old: TrainingPlan = state["plan"]
    log.info("plan %s -> %s", old.describe(), new.describe())
    if new.effective_batch != old.effective_batch:
        log.warning("plan changes the effective batch (%d -> %d); this update keeps %d", old.effective_batch, new.effective_batch, old.effective_batch)
    state["plan"] = new
    if new.checkpointing != old.checkpointing:
        set_checkpointing(lora_model, new.checkpointing)
    if state["hooks"] is not None and not new.step_in_backward:
        state["hooks"].remove()
        state["hooks"] = None
    if new.forward_only:
        for p in trainable:
            p.grad = None
        state["optimizer"] = None
        gc.collect()
        release_memory()
        return
    if new.optimizer != old.optimizer:
        state["optimizer"] = None
        gc.collect()
        state["optimizer"] = make_optimizer(trainable, new.optimizer, train_cfg.lr, train_cfg.weight_decay, train_cfg.min_8bit_size)
    if new.step_in_backward and state["hooks"] is None:
        state["hooks"] = StepInBackward(trainable, state["optimizer"], max_norm)


# What every update runs: adapters on a few blocks chosen by gradient norm, and attention that
# never builds the T x T matrix in Python (torch's scaled_dot_product_attention).
ALWAYS = ["lora", "selective_freezing", "memory_efficient_attention"]


def techniques_of(lora_model: nn.Module, history: list[PlanChange]) -> list[str]:
    """The low-memory techniques an update ran: ALWAYS, the model's own (reversible blocks,
    int8-trained adapters) and every plan's, in a fixed order."""
    names = list(ALWAYS)
    if getattr(forecaster_of(lora_model).cfg, "reversible", False):
        names.append("reversible_blocks")
    if any(getattr(layer, "fake_quant", False) for layer in lora_layers(lora_model).values()):
        names.append("int8_adapter")
    for change in history:
        names += [name for name in change.plan.techniques if name not in names]
    return names


class StepInBackward:
    """The optimizer step fused into backward: each trainable parameter is stepped, and its
    gradient freed, by a hook that runs as soon as backward has accumulated it, so the update
    never holds a full set of gradients (`TrainingPlan.step_in_backward`).

    Clipping cannot wait for the global norm: each parameter's gradient is clipped to its share,
    max_norm / sqrt(number of parameters), which bounds the global norm by max_norm. Under the
    bound, the weights are exactly the ordinary step's."""

    def __init__(self, params: list[nn.Parameter], optimizer: Optimizer, max_norm: float) -> None:
        self._squares = 0.0
        per_param = max_norm / math.sqrt(max(1, len(params)))

        def step_now(param: torch.Tensor) -> None:
            grad = param.grad
            assert grad is not None
            norm = float(grad.norm())
            self._squares += norm * norm
            if norm > per_param:
                grad.mul_(per_param / (norm + 1e-6))
            optimizer.step_param(param)
            param.grad = None

        self._handles = [p.register_post_accumulate_grad_hook(step_now) for p in params]

    @staticmethod
    def pays(trainable_params: int) -> bool:
        """Whether freeing each gradient as it is made saves at least MIN_STEP_IN_BACKWARD_SAVING_MB
        (a full set of fp32 gradients): never for a LoRA of a few thousand weights."""
        return trainable_params * 4 / 2**20 >= MIN_STEP_IN_BACKWARD_SAVING_MB

    def take_norm(self) -> float:
        """The norm of the gradients stepped since the last call, before clipping."""
        norm, self._squares = math.sqrt(self._squares), 0.0
        return norm

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = ["PlanChange", "UpdateResult", "update"]
