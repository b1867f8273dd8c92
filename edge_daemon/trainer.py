"""One low-memory LoRA update of the forecaster, from windows to a gated adapter.

Owns selective freezing (which blocks get adapters, measured on a probe batch),
the micro-batch training loop (gradient accumulation, checkpointing, 8-bit
optimizer state, replay mixing, plan changes at micro-batch boundaries), the
validation gate and the update's peak RSS (sampled by `memory.sampling`).
LoRA layers are the project's own (`lora.py`, saved in peft's format):
training imports neither peft nor transformers, and bitsandbytes only when
8-bit state pays for its import.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_daemon.errors import TrainingAborted, TrainingError
from edge_daemon.lora import attach_lora, save_adapter
from edge_daemon.memory.sampling import RssSampler
from edge_daemon.memory.usage import release_memory
from edge_daemon.optim import AdamW
from edge_daemon.model import Forecaster, forecast_loss
from edge_daemon.plan import TrainingPlan

if TYPE_CHECKING:
    from edge_daemon.config import LoraConfigSection, TrainConfig

log = logging.getLogger(__name__)

PlanSource = Callable[[TrainingPlan], "TrainingPlan | None"]
Optimizer = Any  # optim.AdamW or a bitsandbytes (torch.optim) optimizer: step(), zero_grad(), state


# ---------------------------------------------------------------------------
# Selective freezing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockChoice:
    blocks: list[int]  # chosen block indices, highest gradient norm first
    grad_norms: list[float]  # per block (index = block), norm of d loss / d target weights
    target_modules: list[str]  # exact module names that get adapters, e.g. "blocks.2.attn.qkv"


def block_target_modules(model: Forecaster, block: int, targets: Sequence[str]) -> list[str]:
    """Exact names of the Linear layers of `block` matching `targets` ("qkv" or "attn.qkv")."""
    prefix = f"blocks.{block}."
    names = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not isinstance(module, nn.Linear):
            continue
        inner = name[len(prefix) :]
        if any(inner == t or inner.endswith("." + t) for t in targets):
            names.append(name)
    return names


def measure_block_grad_norms(model: Forecaster, probe: torch.Tensor, targets: Sequence[str], checkpointing: bool = False) -> list[float]:
    """Gradient norm of the probe loss w.r.t. each block's target weights.

    One forward/backward on `probe` (B, T+1, C). Each gradient is reduced to its
    norm and dropped the moment it is accumulated, so the probe never holds a
    full set of weight gradients. The model's requires_grad flags, mode and
    checkpointing switch are restored afterwards.
    """
    n_blocks = len(model.blocks)
    owners: dict[nn.Parameter, int] = {}
    for block in range(n_blocks):
        for name in block_target_modules(model, block, targets):
            owners[model.get_submodule(name).weight] = block
    if not owners:
        raise TrainingError(f"no Linear layers match target_modules {list(targets)}")

    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_mode, saved_ckpt = model.training, model.gradient_checkpointing
    squares = [0.0] * n_blocks
    handles = []

    def reduce_and_drop(param: torch.Tensor) -> None:
        assert param.grad is not None
        squares[owners[param]] += float(param.grad.detach().pow(2).sum())
        param.grad = None

    try:
        for p in model.parameters():
            p.requires_grad_(p in owners)
        for p in owners:
            handles.append(p.register_post_accumulate_grad_hook(reduce_and_drop))
        model.train()
        model.gradient_checkpointing = checkpointing
        loss = forecast_loss(model, probe)
        if not torch.isfinite(loss):
            raise TrainingError(f"probe loss is {float(loss)}")
        loss.backward()
        del loss
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(saved_mode)
        model.gradient_checkpointing = saved_ckpt
    return [math.sqrt(s) for s in squares]


def choose_blocks(model: Forecaster, probe: torch.Tensor, lora_cfg: LoraConfigSection, checkpointing: bool = False) -> BlockChoice:
    """Pick the `lora_cfg.max_blocks` blocks whose target weights get the largest gradients."""
    norms = measure_block_grad_norms(model, probe, lora_cfg.target_modules, checkpointing)
    ranked = sorted(range(len(norms)), key=lambda b: norms[b], reverse=True)
    chosen = ranked[: lora_cfg.max_blocks]
    modules = [name for b in sorted(chosen) for name in block_target_modules(model, b, lora_cfg.target_modules)]
    modules += expand_modules(model, lora_cfg.extra_modules)
    return BlockChoice(blocks=chosen, grad_norms=norms, target_modules=modules)


def expand_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The Linear layers `names` stand for: a Linear itself, or every Linear of a ModuleList (a
    further horizon's head each; none when the model forecasts the next step only)."""
    expanded: list[str] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.ModuleList):
            expanded += [f"{name}.{i}" for i, child in enumerate(module) if isinstance(child, nn.Linear)]
        elif isinstance(module, nn.Linear):
            expanded.append(name)
        else:
            raise TrainingError(f"extra module {name!r} is not a Linear layer or a list of them")
    return expanded


# ---------------------------------------------------------------------------
# Model, optimizer and batches
# ---------------------------------------------------------------------------


def build_lora_model(model: Forecaster, target_modules: list[str], lora_cfg: LoraConfigSection) -> nn.Module:
    """Add LoRA layers to `model` in place on `target_modules`; every base weight frozen."""
    return attach_lora(model, target_modules, lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout)


def forecaster_of(model: nn.Module) -> Forecaster:
    """The Forecaster itself, or the one inside a peft wrapper (the reference the tests train with)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert isinstance(inner, Forecaster), type(inner)
    return inner


def set_checkpointing(model: nn.Module, on: bool) -> None:
    # The switch lives on the Forecaster; a peft wrapper would not forward the attribute write.
    forecaster_of(model).gradient_checkpointing = on


def make_optimizer(
    params: Sequence[nn.Parameter], kind: str, lr: float, weight_decay: float = 0.0, min_8bit_size: int = 0
) -> Optimizer:
    """AdamW (our own, `optim.py`: torch.optim would load torch._dynamo), or bitsandbytes
    AdamW8bit (CPU kernels since 0.50).

    bitsandbytes keeps tensors under `min_8bit_size` elements in fp32 and its
    default (4096) is larger than most LoRA tensors, so it is passed through.
    """
    if kind == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    raise ValueError(f"optimizer must be one of adamw, adamw8bit; got {kind!r}")


# What importing bitsandbytes adds to a training process that has torch already (measured: ~44 MB).
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

    def to_dict(self) -> dict[str, Any]:
        return {"saving_mb": round(self.saving_mb, 3), "import_mb": self.import_mb, "pays": self.pays}


def optimizer_state_bytes(optimizer: Optimizer) -> dict[str, int]:
    """Bytes of optimizer state per dtype, e.g. {"uint8": 12288, "float32": 2176}.

    Tensors shared between parameters (bitsandbytes' quantisation maps) count once.
    """
    totals: dict[str, int] = {}
    seen: set[int] = set()
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                key = str(value.dtype).removeprefix("torch.")
                totals[key] = totals.get(key, 0) + value.numel() * value.element_size()
    return totals


class GridWindows:
    """(N, length, C) windows of consecutive grid rows, cut when read.

    Held as copies, overlapping windows repeat every row once per window that
    covers it: 4096 windows of 257 steps and 3 channels are ~13 MB, cut from
    a grid of a few thousand rows. Held here as start rows over the grid, a
    window costs 8 bytes. Indexing (a LongTensor, a slice, an int) returns a
    float32 tensor, as indexing the (N, length, C) tensor would; so does
    `split`, as a tensor's does. What the trainer reads of windows is that.
    """

    def __init__(self, rows: torch.Tensor, starts: torch.Tensor, length: int) -> None:
        if rows.dim() != 2:
            raise ValueError(f"rows must be (R, C), got {tuple(rows.shape)}")
        self.rows = rows
        self.starts = starts.to(torch.long)
        self.length = int(length)
        self._offsets = torch.arange(self.length)
        if len(self.starts) and (int(self.starts.min()) < 0 or int(self.starts.max()) + self.length > len(rows)):
            raise ValueError("a window runs past the grid's rows")

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.starts), self.length, self.rows.shape[1]))

    def dim(self) -> int:
        return 3

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.rows[self.starts[index].unsqueeze(-1) + self._offsets]

    def split(self, size: int) -> Iterator[torch.Tensor]:
        return (self[i : i + size] for i in range(0, len(self), size))

    def tails(self, steps: int) -> np.ndarray:
        """(N, steps, C) the last `steps` rows of every window, as a numpy array (a copy)."""
        steps = min(steps, self.length)
        offsets = torch.arange(self.length - steps, self.length)
        return self.rows[self.starts.unsqueeze(-1) + offsets].numpy()

    def numpy(self) -> np.ndarray:
        return self[:].numpy()


class _Cycle:
    """Indices 0..n-1 in seeded random order, reshuffled each time they run out."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        taken = []
        while k > 0:
            if self.pos >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            chunk = self.order[self.pos : self.pos + k]
            self.pos += len(chunk)
            k -= len(chunk)
            taken.append(chunk)
        return torch.cat(taken) if taken else torch.empty(0, dtype=torch.long)


class BatchMixer:
    """Draws the windows of each optimizer step: recent and replay in a fixed share.

    Each source is visited in a seeded random order without repeats until it is
    exhausted. The batch is shuffled so every micro-batch mixes both sources.
    """

    def __init__(
        self, recent: torch.Tensor, replay: torch.Tensor, effective_batch: int, replay_fraction: float, generator: torch.Generator
    ) -> None:
        if len(recent) == 0:
            raise TrainingError("no recent training windows")
        if not 0 <= replay_fraction < 1:
            raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
        self.recent = recent
        self.replay = replay
        self.effective_batch = effective_batch
        self.n_replay = round(effective_batch * replay_fraction) if len(replay) else 0
        self.n_recent = effective_batch - self.n_replay
        self.generator = generator
        self._recent_order = _Cycle(len(recent), generator)
        self._replay_order = _Cycle(len(replay), generator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(effective_batch, T+1, C) windows and a (effective_batch,) bool mask of replay ones."""
        parts = [self.recent[self._recent_order.take(self.n_recent)]]
        if self.n_replay:
            parts.append(self.replay[self._replay_order.take(self.n_replay)])
        windows = torch.cat(parts)
        is_replay = torch.arange(self.effective_batch) >= self.n_recent
        order = torch.randperm(self.effective_batch, generator=self.generator)
        return windows[order], is_replay[order]


def evaluate_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float | None:
    """Mean next-step loss (`forecast_loss`) over `windows` (None when there are none), without autograd."""
    if len(windows) == 0:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.inference_mode():
            for chunk in windows.split(max(1, batch_size)):
                # forecast_loss averages per chunk; weight by size for the exact overall mean.
                total += float(forecast_loss(model, chunk)) * len(chunk)
    finally:
        model.train(was_training)
    return total / len(windows)


# ---------------------------------------------------------------------------
# Validation gate
# ---------------------------------------------------------------------------


def gate(before: dict[str, float | None], after: dict[str, float | None], tolerance: float, min_improvement: float = 0.0) -> tuple[bool, str]:
    """Accept iff recent loss improves and replayed loss worsens by at most `tolerance` (a fraction)."""
    recent_before, recent_after = before["recent_val_loss"], after["recent_val_loss"]
    if recent_before is None or recent_after is None:
        return False, "no recent validation windows"
    if not math.isfinite(recent_after):
        return False, f"recent validation loss is {recent_after}"
    needed = recent_before * (1.0 - min_improvement)
    if not recent_after < needed:
        return False, f"recent loss {recent_after:.5g} does not improve on {recent_before:.5g}"
    replay_before, replay_after = before["replay_val_loss"], after["replay_val_loss"]
    if replay_before is not None and replay_after is not None:
        allowed = replay_before * (1.0 + tolerance)
        if not replay_after <= allowed:
            return False, f"replay loss {replay_after:.5g} worse than {replay_before:.5g} by more than {tolerance:.0%}"
        return True, f"recent loss {recent_before:.5g} -> {recent_after:.5g}, replay {replay_before:.5g} -> {replay_after:.5g}"
    return True, f"recent loss {recent_before:.5g} -> {recent_after:.5g} (no replay windows to check)"


# ---------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanChange:
    step: int  # optimizer step during which the plan took effect (0-based)
    window: int  # windows of that step already done when it took effect
    plan: TrainingPlan

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "window": self.window, "plan": self.plan.to_dict()}


@dataclass
class UpdateResult:
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
    eight_bit: dict[str, Any] = field(default_factory=dict)  # EightBitPayoff.to_dict(): whether 8-bit state paid
    adapted: nn.Module | None = field(default=None, repr=False)  # only when accepted (or keep_rejected)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def replay_share(self) -> float:
        return self.replay_windows_seen / self.windows_seen if self.windows_seen else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for meta.json and status); the model itself is left out."""
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
            "eight_bit": dict(self.eight_bit),
        }


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
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    seed: int = 0,
    incumbent: nn.Module | Callable[[], nn.Module] | None = None,
    keep_rejected: bool = False,
    in_place: bool = False,
) -> UpdateResult:
    """Train one LoRA adapter on a copy of `base_model` (or, `in_place`, on `base_model` itself:
    a training worker's own, which nothing else uses) and gate it.

    Windows are (N, T+1, C) normalised tensors. `plan_source(current)` is asked
    at every micro-batch boundary and may return a new plan (None = keep);
    `should_stop()` is asked there too and stops the update. The gate compares
    against `incumbent` (the model currently served, e.g. base with the current
    adapter merged, or a function that builds it: built for the metrics before
    training and dropped before training starts), by default the base. Nothing is saved here; the result
    carries the adapted model only if accepted (or if `keep_rejected`, for
    benchmarks and tests).

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
                plan_source, should_stop, on_progress, seed, incumbent, keep_rejected, in_place,
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
    on_progress: Callable[[dict[str, Any]], None] | None,
    seed: int,
    incumbent: nn.Module | Callable[[], nn.Module] | None,
    keep_rejected: bool,
    in_place: bool,
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
    del reference

    # 3. Selective freezing: rank blocks by gradient norm on a probe batch of recent data.
    n_probe = min(lora_cfg.probe_windows, plan.micro_batch, len(recent_train))
    probe = recent_train[torch.randperm(len(recent_train), generator=generator)[:n_probe]]
    choice = choose_blocks(model, probe, lora_cfg, checkpointing=plan.checkpointing)
    del probe
    log.info(
        "adapting blocks %s (gradient norms %s)", choice.blocks, ", ".join(f"{n:.3g}" for n in choice.grad_norms)
    )

    # 4. LoRA on the chosen blocks; the copy's own weights stay frozen.
    lora_model = build_lora_model(model, choice.target_modules, lora_cfg)
    lora_model.train()
    trainable = [p for p in lora_model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    total_params = sum(p.numel() for p in lora_model.parameters())
    set_checkpointing(lora_model, plan.checkpointing)
    # 8-bit state only where it saves more than importing bitsandbytes costs, unless the config
    # asks for it outright: on a LoRA of a few thousand parameters it saves kilobytes.
    payoff = EightBitPayoff.of(trainable_params)
    if on_progress is not None:
        on_progress({"eight_bit": payoff.to_dict()})
    if train_cfg.optimizer == "auto" and not payoff.pays:
        log.info("8-bit optimizer state would save %.3f MB, importing bitsandbytes costs %.0f MB: fp32 state", payoff.saving_mb, payoff.import_mb)
        if plan_source is not None:
            plan_source = _Fp32Source(plan_source, plan)
        plan = _without_8bit(plan)
    optimizer = make_optimizer(trainable, plan.optimizer, train_cfg.lr, train_cfg.weight_decay, train_cfg.min_8bit_size)

    # 5. The loop: one optimizer step per effective batch, fed in micro-batches.
    effective = plan.effective_batch
    mixer = BatchMixer(recent_train, replay_train, effective, train_cfg.replay_fraction, generator)
    history = [PlanChange(0, 0, plan)]
    train_losses: list[float] = []
    grad_norms: list[float] = []
    windows_seen = replay_seen = 0
    for step in range(train_cfg.steps):
        windows, is_replay = mixer.next_batch()  # (effective, T+1, C), (effective,)
        done = 0
        step_loss = 0.0
        while done < effective:
            # Micro-batch boundary: stop if asked, else take any tighter plan.
            if should_stop is not None and should_stop():
                raise TrainingAborted(f"stopped at step {step}/{train_cfg.steps}, window {done}/{effective}")
            if plan_source is not None:
                new_plan = plan_source(plan)
                if new_plan is not None and new_plan != plan:
                    optimizer = _apply_plan(plan, new_plan, lora_model, trainable, optimizer, train_cfg)
                    plan = new_plan
                    history.append(PlanChange(step, done, plan))
            chunk = windows[done : done + plan.micro_batch]
            loss = forecast_loss(lora_model, chunk)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss {loss.item()} at step {step}")
            # Scale by the chunk's share so the summed gradients equal the full batch's mean.
            share = len(chunk) / effective
            (loss * share).backward()
            step_loss += loss.item() * share
            done += len(chunk)
            del loss, chunk
        # Clip the accumulated gradient, step, and free the gradients (not zero them).
        # An infinite max_norm only measures: the norm is kept as telemetry either way.
        max_norm = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else math.inf
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        windows_seen += effective
        replay_seen += int(is_replay.sum())
        train_losses.append(step_loss)
        del windows, is_replay
        if on_progress is not None:
            on_progress(
                {
                    "step": step + 1,
                    "steps": train_cfg.steps,
                    "loss": step_loss,
                    "replay_windows": mixer.n_replay,
                    "recent_windows": mixer.n_recent,
                    "plan": plan.to_dict(),
                }
            )
    state_bytes = optimizer_state_bytes(optimizer)
    del optimizer, mixer
    gc.collect()

    # 6. Gate: better on recent held-out windows, not much worse on replayed ones.
    after = {
        "recent_val_loss": evaluate_loss(lora_model, recent_val, plan.micro_batch),
        "replay_val_loss": evaluate_loss(lora_model, replay_val, plan.micro_batch),
    }
    accepted, reason = gate(before, after, train_cfg.gate_tolerance, train_cfg.gate_min_improvement)
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
        steps=train_cfg.steps,
        windows_seen=windows_seen,
        replay_windows_seen=replay_seen,
        train_losses=train_losses,
        grad_norms=grad_norms,
        optimizer_state=state_bytes,
        wall_time_s=0.0,
        peak_rss_bytes=0,
        start_rss_bytes=0,
        eight_bit=payoff.to_dict(),
        adapted=lora_model if accepted or keep_rejected else None,
    )


def _without_8bit(plan: TrainingPlan | None) -> TrainingPlan | None:
    """The plan with fp32 optimizer state."""
    return plan if plan is None or plan.optimizer == "adamw" else replace(plan, optimizer="adamw")


class _Fp32Source:
    """A plan source whose plans run with fp32 optimizer state. The source is asked with the plan it
    last gave (not the fp32 one that runs), so it does not read the difference as a looser plan."""

    def __init__(self, source: PlanSource, start: TrainingPlan) -> None:
        self.source = source
        self.last = start

    def __call__(self, current: TrainingPlan) -> TrainingPlan | None:
        proposed = self.source(self.last)
        if proposed is not None:
            self.last = proposed
        return _without_8bit(proposed)


def _apply_plan(
    old: TrainingPlan,
    new: TrainingPlan,
    lora_model: nn.Module,
    trainable: list[nn.Parameter],
    optimizer: Optimizer,
    train_cfg: TrainConfig,
) -> Optimizer:
    """Switch to `new` between micro-batches; returns the optimizer to use from now on.

    The micro-batch size takes effect with the next chunk (the step's remaining
    windows are re-split; its effective batch is kept). A change of optimizer
    starts a fresh one: Adam moments are not carried across (bias correction
    restarts too), which costs a few steps of warm-up, not correctness.
    Gradients accumulated so far in this step are kept.
    """
    log.info("plan %s -> %s", old.describe(), new.describe())
    if new.effective_batch != old.effective_batch:
        log.warning("plan changes the effective batch (%d -> %d); this update keeps %d", old.effective_batch, new.effective_batch, old.effective_batch)
    if new.checkpointing != old.checkpointing:
        set_checkpointing(lora_model, new.checkpointing)
    if new.optimizer != old.optimizer:
        del optimizer
        gc.collect()
        return make_optimizer(trainable, new.optimizer, train_cfg.lr, train_cfg.weight_decay, train_cfg.min_8bit_size)
    return optimizer


# ---------------------------------------------------------------------------
# Adapter files
# ---------------------------------------------------------------------------


def adapter_bytes(directory: str | Path) -> int:
    """Size of the adapter files in `directory`."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


__all__ = [
    "BatchMixer",
    "BlockChoice",
    "PlanChange",
    "UpdateResult",
    "adapter_bytes",
    "block_target_modules",
    "build_lora_model",
    "choose_blocks",
    "evaluate_loss",
    "forecaster_of",
    "gate",
    "make_optimizer",
    "measure_block_grad_norms",
    "optimizer_state_bytes",
    "save_adapter",
    "set_checkpointing",
    "update",
]
