"""The LoRA trainer: each low-memory technique proven on a small real model.

Real torch training throughout (no mocks); the base is a tiny forecaster
pretrained for a few seconds on one regime, adapted to another.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edge_daemon.config import LoraConfigSection, TrainConfig
from edge_daemon.errors import TrainingAborted, TrainingError
from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss
from edge_daemon.training.plan import TrainingPlan, plan_from_config
from edge_daemon.memory.sampling import RssSampler
from edge_daemon.training.batches import BatchMixer
from edge_daemon.training.blocks import block_target_modules, choose_blocks
from edge_daemon.training.loop import update
from edge_daemon.training.lora import build_lora_model, lora_state_dict, save_adapter, set_checkpointing
from edge_daemon.training.optimizer import BITSANDBYTES_IMPORT_MB, EightBitPayoff, make_optimizer
from tests.conftest import peft_lora_model, without_bitsandbytes

torch.set_num_threads(1)

SMALL = ForecasterConfig(n_channels=3, window=32, d_model=32, n_heads=4, n_layers=3, d_ff=64)
REPLAY_MARK = 3.0  # replay windows in the mixing tests carry this constant in channel 2


def regime(n: int, period: float, amp: float = 1.0, offset: float = 0.0, seed: int = 0, length: int = 33) -> torch.Tensor:
    """(n, length, 3) noisy sinusoid windows; one (period, amp, offset) is one regime."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    w = 2 * math.pi / period
    x = torch.stack(
        [amp * torch.sin(w * t + phase) + offset, amp * torch.cos(w * t + phase) - offset, 0.5 * torch.sin(2 * w * t + phase)], -1
    )
    return x + 0.05 * torch.randn(n, length, 3, generator=g)


@pytest.fixture(scope="module")
def base() -> Forecaster:
    """A small forecaster that has learned regime A (period 16)."""
    torch.manual_seed(0)
    model = Forecaster(SMALL)
    windows = regime(512, 16, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = forecast_loss(model, windows[torch.randint(0, 512, (16,), generator=g)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    """Recent windows from regime B (period 12), replayed ones from regime A."""
    return {
        "recent_train": regime(128, 12, seed=2),
        "recent_val": regime(32, 12, seed=3),
        "replay_train": regime(128, 16, seed=4),
        "replay_val": regime(32, 16, seed=5),
    }


def lora(**kw: Any) -> LoraConfigSection:
    return LoraConfigSection(**kw)


def train_cfg(**kw: Any) -> TrainConfig:
    defaults: dict[str, Any] = {"batch_size": 8, "micro_batch": 8, "steps": 4, "lr": 3e-3, "replay_fraction": 0.5}
    defaults.update(kw)
    return TrainConfig(**defaults)


def plan(micro: int = 8, accumulation: int = 1, checkpointing: bool = False, optimizer: str = "adamw") -> TrainingPlan:
    return TrainingPlan(micro_batch=micro, accumulation=accumulation, checkpointing=checkpointing, optimizer=optimizer)  # type: ignore[arg-type]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def all_blocks_lora(base: Forecaster, targets: list[str] | None = None) -> nn.Module:
    """A model with LoRA adapters on every block, B made non-zero so every LoRA tensor gets gradients."""
    cfg = lora(max_blocks=SMALL.n_layers)
    model = copy.deepcopy(base)
    names = [n for b in range(SMALL.n_layers) for n in block_target_modules(model, b, targets or cfg.target_modules)]
    torch.manual_seed(1)
    lora_model = build_lora_model(model, names, cfg)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    lora_model.train()
    return lora_model


# --- gradient checkpointing -------------------------------------------------


def loss_grads_and_saved_bytes(model: nn.Module, windows: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, LoRA gradients, and bytes of activations autograd keeps between forward and backward.

    Counted with saved-tensor hooks (deterministic, unlike RSS): every distinct
    non-parameter storage saved for backward, plus each block's input, which
    non-reentrant checkpointing keeps itself instead of through the hooks.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def note(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            kept[ptr] = t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    handles = [blk.register_forward_pre_hook(lambda _m, args: note(args[0])) for blk in model.blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forecast_loss(model, windows)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), grads, sum(kept.values())


def test_checkpointing_same_loss_and_gradients_with_fewer_saved_activations(base: Forecaster, data: dict) -> None:
    windows = data["recent_train"][:8]
    model = all_blocks_lora(base)
    set_checkpointing(model, False)
    loss_plain, grads_plain, bytes_plain = loss_grads_and_saved_bytes(model, windows)
    model.zero_grad(set_to_none=True)
    set_checkpointing(model, True)
    loss_ckpt, grads_ckpt, bytes_ckpt = loss_grads_and_saved_bytes(model, windows)

    assert len(grads_plain) == 3 * 4 * 2  # every LoRA A and B of every block got a gradient
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6, abs=0)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-8, msg=name)
    # Per block only its input survives the forward instead of ~a dozen intermediates.
    assert bytes_ckpt < 0.4 * bytes_plain, (bytes_ckpt, bytes_plain)


# --- micro-batching -----------------------------------------------------------


def test_micro_batch_1_4_and_full_batch_give_the_same_update(base: Forecaster, data: dict) -> None:
    cfg = train_cfg(steps=3, lr=1e-2)
    weights = {}
    losses = {}
    norms = {}  # of each step's accumulated gradient: a wrong loss scale shows here, Adam would hide it
    for micro in (1, 4, 8):
        result = update(base, **data, lora_cfg=lora(), train_cfg=cfg, plan=plan(micro, 8 // micro), keep_rejected=True)
        assert result.adapted is not None
        weights[micro] = lora_state(result.adapted)
        losses[micro] = result.train_losses
        norms[micro] = result.grad_norms
    full = weights[8]
    assert full and any(v.abs().max() > 0 for k, v in full.items() if "lora_B" in k)  # training moved B off zero
    for micro in (1, 4):
        assert weights[micro].keys() == full.keys()
        for name, tensor in full.items():
            torch.testing.assert_close(weights[micro][name], tensor, rtol=1e-4, atol=1e-6, msg=f"micro {micro}: {name}")
        assert losses[micro] == pytest.approx(losses[8], rel=1e-5)
        assert norms[micro] == pytest.approx(norms[8], rel=1e-4)


def test_plan_from_config_splits_the_batch_exactly() -> None:
    assert plan_from_config(train_cfg(batch_size=32, micro_batch=32)) == plan(32, 1)
    assert plan_from_config(train_cfg(batch_size=32, micro_batch=12)) == plan(8, 4)
    assert plan_from_config(train_cfg(batch_size=30, micro_batch=7, gradient_checkpointing="on", optimizer="adamw8bit")) == plan(
        6, 5, True, "adamw8bit"
    )
    assert TrainingPlan.from_dict(plan(4, 2, True).to_dict()) == plan(4, 2, True)
    with pytest.raises(ValueError, match="adamw, adamw8bit"):
        plan(optimizer="sgd")


# --- 8-bit optimizer state --------------------------------------------------


def test_adamw8bit_keeps_lora_optimizer_state_in_uint8(base: Forecaster, data: dict) -> None:
    model = all_blocks_lora(base)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(lora_params, "adamw8bit", lr=1e-3, min_8bit_size=0)
    forecast_loss(model, data["recent_train"][:4]).backward()
    optimizer.step()
    for p in lora_params:
        state = optimizer.state[p]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        assert state["state1"].shape == p.shape

    # bitsandbytes' default threshold leaves every small LoRA tensor in fp32: why min_8bit_size is lowered.
    assert max(p.numel() for p in lora_params) < 4096
    default = make_optimizer(lora_params, "adamw8bit", lr=1e-3, min_8bit_size=4096)
    forecast_loss(model, data["recent_train"][:4]).backward()
    default.step()
    assert all(default.state[p]["state1"].dtype == torch.float32 for p in lora_params)


def test_update_with_8bit_plan_reports_uint8_state(base: Forecaster, data: dict) -> None:
    # Asked for outright in the config: 8-bit state whatever it saves.
    result = update(base, **data, lora_cfg=lora(), train_cfg=train_cfg(steps=2, optimizer="adamw8bit"), plan=plan(4, 2, optimizer="adamw8bit"))
    assert result.optimizer_state["uint8"] == 2 * result.trainable_params  # two moments, one byte each
    assert result.optimizer_state.get("float32", 0) < result.optimizer_state["uint8"]  # only quantisation maps and scales


def test_8bit_state_only_where_it_saves_more_than_importing_bitsandbytes_costs(base: Forecaster, data: dict) -> None:
    payoff = EightBitPayoff(saving_mb=0.05, import_mb=BITSANDBYTES_IMPORT_MB)
    assert not payoff.pays and EightBitPayoff(saving_mb=60.0, import_mb=BITSANDBYTES_IMPORT_MB).pays
    assert not EightBitPayoff(saving_mb=0.05, import_mb=0.0).pays  # loaded already: still too small to be worth it
    # A LoRA of a few thousand parameters under the default ("auto"): a plan with 8-bit state, or a
    # tightening to one, runs fp32 state, and the update says why.
    tighter = plan(2, 4, checkpointing=True, optimizer="adamw8bit")
    result = update(base, **data, lora_cfg=lora(), train_cfg=train_cfg(steps=2), plan=plan(4, 2, optimizer="adamw8bit"),
                    plan_source=lambda current: tighter)  # fmt: skip
    assert result.eight_bit is not None and result.eight_bit.pays is False and result.eight_bit.saving_mb < 1
    assert "uint8" not in result.optimizer_state
    assert [change.plan.optimizer for change in result.plan_history] == ["adamw", "adamw"]
    assert result.plan_history[-1].plan.micro_batch == 2  # the rest of the tightening stands


# --- replay mixing ------------------------------------------------------------


def marked_replay(windows: torch.Tensor) -> torch.Tensor:
    marked = windows.clone()
    marked[..., 2] = REPLAY_MARK
    return marked


def is_marked(windows: torch.Tensor) -> torch.Tensor:
    return (windows[..., 2] == REPLAY_MARK).all(dim=1)


def test_batch_mixer_draws_the_configured_share_without_repeats(data: dict) -> None:
    recent, replay = data["recent_train"][:40], marked_replay(data["replay_train"][:24])
    mixer = BatchMixer(recent, replay, effective_batch=8, replay_fraction=0.25, generator=torch.Generator().manual_seed(0))
    seen_recent = []
    for _ in range(5):  # 5 x 6 recent windows < 40: no recent window may repeat
        windows, flagged = mixer.next_batch()
        assert windows.shape == (8, 33, 3)
        assert torch.equal(is_marked(windows), flagged)  # the mask tells the truth about the windows
        assert int(flagged.sum()) == 2
        seen_recent.extend(windows[~flagged])
    assert len({tuple(w.flatten().tolist()) for w in seen_recent}) == 30
    assert BatchMixer(recent, replay[:0], 8, 0.25, torch.Generator()).n_replay == 0  # no replay data: all recent


def test_update_trains_on_replay_windows_in_the_configured_share(base: Forecaster, data: dict) -> None:
    seen: list[torch.Tensor] = []
    probe_base = copy.deepcopy(base)
    # The update trains a deep copy, which inherits this hook: it sees every training forward.
    # The linear path's input starts with the raw inputs (the embedding sees them relative to the first step).
    channels = probe_base.cfg.n_channels
    probe_base.linear.register_forward_pre_hook(lambda m, args: seen.append(args[0][..., :channels].detach().clone()) if m.training else None)
    data = dict(data, replay_train=marked_replay(data["replay_train"]))
    cfg = train_cfg(steps=4, replay_fraction=0.25, gate_retry="off")  # one attempt: its batches alone
    result = update(probe_base, **data, lora_cfg=lora(probe_windows=4), train_cfg=cfg, plan=plan(4, 2), keep_rejected=True)
    inputs = torch.cat(seen)
    # 4 probe windows (recent only), then 4 steps x 8 windows of which 2 replayed.
    assert len(inputs) == 4 + 4 * 8
    assert int(is_marked(inputs).sum()) == 4 * 2
    assert result.replay_share == pytest.approx(0.25)


# --- the validation gate --------------------------------------------------------


def test_update_that_learns_the_new_regime_is_accepted(base: Forecaster, data: dict) -> None:
    before = state_of(base)
    # The base forecasts regime A near its noise floor, so keeping within 2x of that needs a large replay share.
    cfg = train_cfg(steps=30, replay_fraction=0.75, gate_tolerance=1.0)
    result = update(base, **data, lora_cfg=lora(), train_cfg=cfg, plan=plan(8, 1))
    assert result.accepted, result.reason
    assert result.metrics_after["recent_val_loss"] < 0.8 * result.metrics_before["recent_val_loss"]
    assert result.adapted is not None
    # Two blocks x (qkv 4x32 + 96x4, proj 4x32 + 32x4, fc1 4x32 + 64x4, fc2 4x64 + 32x4), head 4x32 + 3x4,
    # linear path 4x48 + 3x4.
    assert result.trainable_params == 2 * (512 + 256 + 384 + 384) + 140 + 204
    assert 0 < result.trainable_fraction < 0.2
    assert result.peak_rss_bytes >= result.start_rss_bytes > 0
    meta = json.loads(json.dumps(result.to_json()))  # the report, JSON-ready
    assert meta["accepted"] and meta["chosen_blocks"] == result.chosen_blocks and len(meta["train_losses"]) == 30
    for name, tensor in state_of(base).items():  # the base was never touched
        assert torch.equal(tensor, before[name]), name


def test_update_without_replay_data_trains_on_recent_windows_only(base: Forecaster, data: dict) -> None:
    empty = torch.empty(0)
    cfg = train_cfg(steps=30, replay_fraction=0.5)
    result = update(base, data["recent_train"], data["recent_val"], empty, empty, lora_cfg=lora(), train_cfg=cfg, plan=plan(8, 1))
    assert result.replay_share == 0 and result.windows_seen == 30 * 8
    assert result.metrics_before["replay_val_loss"] is None
    assert result.accepted and "no older data to check forgetting" in result.reason


def test_update_that_forgets_the_old_regime_is_rejected(base: Forecaster, data: dict) -> None:
    # Same data and tolerance, but no replay in the batches (and no retry with it): the old regime is forgotten.
    cfg = train_cfg(steps=30, replay_fraction=0.0, gate_tolerance=1.0, gate_retry="off")
    result = update(base, **data, lora_cfg=lora(), train_cfg=cfg, plan=plan(8, 1))
    assert not result.accepted
    assert "rejected: it forgets the old regime by" in result.reason
    assert result.metrics_after["recent_val_loss"] < result.metrics_before["recent_val_loss"]
    assert result.metrics_after["replay_val_loss"] > 2 * result.metrics_before["replay_val_loss"]
    assert result.adapted is None


def training_copy_tracker(model: Forecaster) -> tuple[Forecaster, list[weakref.ref]]:
    """A copy of `model` whose training copies report themselves through a weak reference."""
    refs: list[weakref.ref] = []
    tracked = copy.deepcopy(model)

    def remember(module: nn.Module, args: tuple) -> None:
        if module.training and not refs:
            refs.append(weakref.ref(module))

    tracked.embed.register_forward_pre_hook(remember)
    return tracked, refs


def test_non_finite_loss_aborts_and_drops_the_training_copy(base: Forecaster, data: dict) -> None:
    tracked, refs = training_copy_tracker(base)
    poisoned = data["replay_train"].clone()
    poisoned[:, 5, 0] = float("nan")  # the probe uses recent windows; the first mixed batch hits these
    with pytest.raises(TrainingError, match="non-finite loss"):
        update(tracked, **dict(data, replay_train=poisoned), lora_cfg=lora(), train_cfg=train_cfg(), plan=plan(4, 2))
    gc.collect()
    assert refs and refs[0]() is None


def test_should_stop_aborts_at_a_boundary_without_an_adapter(base: Forecaster, data: dict, tmp_path: Path) -> None:
    tracked, refs = training_copy_tracker(base)
    calls = []

    def stop_on_third_boundary() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(TrainingAborted, match="step 1/4, window 0/8"):
        update(tracked, **data, lora_cfg=lora(), train_cfg=train_cfg(), plan=plan(4, 2), should_stop=stop_on_third_boundary)
    assert len(calls) == 3  # asked at every micro-batch boundary, stopped at the first True
    gc.collect()
    assert refs and refs[0]() is None  # the model copy, its adapter and optimizer are gone


def test_plan_source_tightens_at_a_boundary_and_is_recorded(base: Forecaster, data: dict) -> None:
    boundaries = []
    tight = plan(2, 4, checkpointing=True, optimizer="adamw8bit")

    def watchdog(current: TrainingPlan) -> TrainingPlan | None:
        boundaries.append(current)
        return tight if len(boundaries) == 4 else None  # pressure rises at step 1, second micro-batch

    last_block_calls: list[int] = []
    sizes: list[int] = []
    tracked = copy.deepcopy(base)
    tracked.blocks[-1].register_forward_pre_hook(lambda m, a: last_block_calls.append(len(a[0])) if m.training else None)
    tracked.embed.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])) if m.training else None)
    # 8-bit state allowed outright (under "auto" a LoRA this small keeps fp32 state: see below).
    cfg = train_cfg(steps=3, optimizer="adamw8bit")
    result = update(tracked, **data, lora_cfg=lora(probe_windows=4), train_cfg=cfg, plan=plan(4, 2), plan_source=watchdog, keep_rejected=True)

    assert [c.to_dict() for c in result.plan_history] == [
        {"step": 0, "window": 0, "plan": plan(4, 2).to_dict()},
        {"step": 1, "window": 4, "plan": tight.to_dict()},
    ]
    # Micro-batches: probe, step 0 (4+4), step 1 (4 then re-split into 2+2), step 2 (2+2+2+2).
    assert sizes == [4, 4, 4, 4, 2, 2, 2, 2, 2, 2]
    # Checkpointing on: the last block runs twice per micro-batch (forward, then recompute in backward).
    assert last_block_calls == [4, 4, 4, 4] + [2, 2] * 6
    assert "uint8" in result.optimizer_state  # the optimizer was swapped for the 8-bit one
    assert result.windows_seen == 3 * 8  # the effective batch never changed


# --- saved adapters -------------------------------------------------------------


def test_saved_adapter_loads_with_peft_and_gives_the_same_outputs(base: Forecaster, data: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    from edge_daemon.artifacts.adapters import load_lora_state
    from edge_daemon.artifacts.merge import merge_lora

    result = update(base, **data, lora_cfg=lora(), train_cfg=train_cfg(steps=5), plan=plan(8, 1), keep_rejected=True)
    assert result.adapted is not None
    directory = save_adapter(result.adapted, tmp_path / "v1")
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (directory / "adapter_model.safetensors").stat().st_size < 100_000

    with without_bitsandbytes():
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    assert sorted(loaded.peft_config["default"].target_modules) == sorted(result.target_modules)
    windows = data["recent_val"][:, :-1]
    with torch.inference_mode():
        expected = result.adapted(windows)
        assert torch.equal(loaded(windows), expected)
        merged = merge_lora(base, *load_lora_state(directory))  # what serving runs
        torch.testing.assert_close(merged(windows), expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(base(windows), expected)  # the adapter really changes the forecast


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_update_with_peft_lora_gives_the_same_weights(base: Forecaster, data: dict, dropout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft is the reference: the same update from the same seed, once with its LoRA layers and once
    with the trainer's own, ends with the same adapter (initialisation, dropout draws and steps)."""
    from peft import get_peft_model_state_dict

    import edge_daemon.training.loop as trainer

    cfg, steps = lora(dropout=dropout), train_cfg(steps=6, lr=1e-2)
    own = update(base, **data, lora_cfg=cfg, train_cfg=steps, plan=plan(4, 2), seed=3, keep_rejected=True)
    monkeypatch.setattr(trainer, "build_lora_model", peft_lora_model)
    reference = update(base, **data, lora_cfg=cfg, train_cfg=steps, plan=plan(4, 2), seed=3, keep_rejected=True)
    assert own.adapted is not None and reference.adapted is not None
    assert type(reference.adapted).__name__ == "PeftModel" and type(own.adapted).__name__ == "Forecaster"
    ours, theirs = lora_state_dict(own.adapted), get_peft_model_state_dict(reference.adapted)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * len(own.target_modules)
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert any(t.abs().max() > 0 for k, t in ours.items() if "lora_B" in k)  # it trained
    torch.testing.assert_close(torch.tensor(own.train_losses), torch.tensor(reference.train_losses), rtol=1e-5, atol=0)


# --- selective freezing ---------------------------------------------------------


def test_blocks_are_chosen_by_gradient_norm(base: Forecaster, data: dict) -> None:
    model = copy.deepcopy(base)
    # Shrink blocks 0 and 2 to near-identity residual steps: their weights hardly act, so
    # their gradients are tiny and block 1, which carries the model, must be chosen.
    with torch.no_grad():
        for block in (0, 2):
            for name in ("attn.qkv", "attn.proj", "fc1", "fc2"):
                model.blocks[block].get_submodule(name).weight.mul_(0.01)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    choice = choose_blocks(model, data["recent_train"][:8], lora(max_blocks=1))
    assert choice.blocks == [1]
    assert choice.grad_norms[1] > 10 * max(choice.grad_norms[0], choice.grad_norms[2])
    assert choice.target_modules == ["blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.fc1", "blocks.1.fc2", "head", "linear"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # probe left no trace
    assert all(p.grad is None for p in model.parameters())

    result = update(model, **data, lora_cfg=lora(max_blocks=1), train_cfg=train_cfg(steps=1), plan=plan(8, 1), keep_rejected=True)
    assert result.chosen_blocks == [1]
    assert result.adapted is not None
    trained = {n for n, p in result.adapted.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("blocks.1.", "head.", "linear.")) for n in trained)
    assert any(n.startswith("head.") for n in trained)  # extra_modules are adapted whatever the ranking


def test_rss_sampler_sees_an_allocation() -> None:
    with RssSampler(0.002) as sampler:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    peak = sampler.result()
    assert peak.increase_bytes > 48 * 2**20
    assert peak.samples > 0


def test_an_update_imports_no_peft_and_bitsandbytes_only_for_8bit_state() -> None:
    # In a fresh interpreter: a whole update loads neither peft nor transformers (~160 MB), nor
    # bitsandbytes (~44 MB), nor torch._dynamo (~70 MB); an 8-bit optimizer still works afterwards
    # and is what loads bitsandbytes.
    import subprocess
    import sys

    code = """
import sys, torch
from edge_daemon.config import LoraConfigSection, TrainConfig
from edge_daemon.model import Forecaster, ForecasterConfig
from edge_daemon.training.plan import TrainingPlan
from edge_daemon.training.loop import update
from edge_daemon.training.optimizer import make_optimizer
model = Forecaster(ForecasterConfig(n_channels=3, window=8, d_model=16, n_layers=1, d_ff=16))
w = torch.randn(32, 9, 3)
for checkpointing in (False, True):
    result = update(model, w, w[:8], w[:0], w[:0], LoraConfigSection(), TrainConfig(batch_size=8, micro_batch=4, steps=2),
                    TrainingPlan(micro_batch=4, accumulation=2, checkpointing=checkpointing, optimizer="adamw"), keep_rejected=True)
# torch._dynamo (~70 MB) comes with torch.optim and torch.utils.checkpoint, sympy (~33 MB) with
# torch.autograd.backward given gradients: none of them is used.
from edge_daemon.training.trace import HEAVY_MODULES, heavy_modules_loaded
assert {"peft", "transformers", "accelerate", "bitsandbytes", "torch._dynamo", "sympy"} <= set(HEAVY_MODULES)
assert not heavy_modules_loaded(), heavy_modules_loaded()
params = [p for p in result.adapted.parameters() if p.requires_grad]
opt = make_optimizer(params, "adamw8bit", lr=1e-3)
result.adapted(w[:2, :-1]).pow(2).mean().backward()
opt.step()
assert "bitsandbytes" in sys.modules and "peft" not in sys.modules
assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_an_update_adapts_the_further_horizons_heads_too(data: dict, tmp_path: Path) -> None:
    """With a further horizon the adapter covers its head and linear path (extra_modules expands
    the lists), and peft loads it back with the same outputs at every horizon."""
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=3, window=32, d_model=32, n_heads=4, n_layers=2, d_ff=64, horizons=(1, 8)))
    result = update(model, **data, lora_cfg=lora(max_blocks=1), train_cfg=train_cfg(steps=2), plan=plan(8, 1), keep_rejected=True)
    assert result.target_modules[-4:] == ["head", "linear", "far_head.0", "far_linear.0"]
    trained = {n for n, p in result.adapted.named_parameters() if p.requires_grad}
    assert "far_head.0.lora_B.weight" in trained and "far_linear.0.lora_B.weight" in trained
    from peft import PeftModel

    save_adapter(result.adapted, tmp_path / "v1")
    with without_bitsandbytes():
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "v1")).eval()
    windows = data["recent_val"][:, :-1]
    with torch.inference_mode():
        expected = result.adapted.eval().forward_horizons(windows)
        assert expected.shape[-2] == 2  # one forecast per horizon
        assert torch.equal(loaded.get_base_model().forward_horizons(windows), expected)


def test_grid_windows_read_as_the_windows_they_stand_for() -> None:
    """Windows cut from the grid when read are the windows `make_windows` copies out, at a fraction
    of the memory."""
    from edge_daemon.frames import Grid, make_windows, valid_window_starts
    from edge_daemon.training.batches import GridWindows

    values = np.random.default_rng(0).normal(size=(400, 3)).astype(np.float32)
    values[57] = np.nan  # a gap: no window spans it
    made = make_windows(Grid(0.0, 1.0, values), 33, stride=2)
    windows = GridWindows(torch.from_numpy(values), torch.from_numpy(valid_window_starts(values, 33, 2)), 33)
    expected = torch.from_numpy(made.windows)
    assert len(windows) == len(expected) and windows.shape == expected.shape and windows.dim() == 3
    picks = torch.tensor([5, 0, len(expected) - 1, 5])
    assert torch.equal(windows[picks], expected[picks])
    assert torch.equal(windows[2:9], expected[2:9]) and torch.equal(windows[4], expected[4])
    assert torch.equal(torch.cat(list(windows.split(16))), expected) and torch.isfinite(expected).all()
    assert np.array_equal(windows.tails(5), made.windows[:, -5:]) and np.array_equal(windows.numpy(), made.windows)
    held = windows.rows.numel() * 4 + windows.starts.numel() * 8
    assert held * 8 < expected.numel() * 4
    with pytest.raises(ValueError, match="past the grid"):
        GridWindows(torch.from_numpy(values), torch.tensor([390]), 33)


def test_an_update_started_from_an_adapter_starts_where_that_adapter_is(base: Forecaster, data: dict) -> None:
    """A fleet's adapter is where an update may start: on its modules (no probe), from its factors.
    One step of a vanishing learning rate leaves the model where the adapter had it; the same step
    from a fresh adapter leaves it where the base is."""
    from edge_daemon.errors import TrainingError
    from edge_daemon.training.lora import lora_layers

    first = update(base, **data, lora_cfg=lora(), train_cfg=train_cfg(steps=30, replay_fraction=0.75, gate_tolerance=1.0), plan=plan(8, 1))
    assert first.accepted and first.adapted is not None, first.reason
    factors = {name: (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()) for name, layer in lora_layers(first.adapted).items()}
    still = train_cfg(steps=1, lr=1e-12, replay_fraction=0.75, gate_tolerance=1.0, gate_retry="off")
    started = update(base, **data, lora_cfg=lora(), train_cfg=still, plan=plan(8, 1), keep_rejected=True, start_from=factors)
    fresh = update(base, **data, lora_cfg=lora(), train_cfg=still, plan=plan(8, 1), keep_rejected=True)
    adapted_loss = first.metrics_after["recent_val_loss"]
    assert started.metrics_after["recent_val_loss"] == pytest.approx(adapted_loss, rel=1e-4)
    assert fresh.metrics_after["recent_val_loss"] == pytest.approx(fresh.metrics_before["recent_val_loss"], rel=1e-4)
    assert fresh.metrics_after["recent_val_loss"] > 1.2 * adapted_loss
    assert started.target_modules == sorted(factors) and started.chosen_blocks == sorted({int(n.split(".")[1]) for n in factors if n.startswith("blocks.")})

    with pytest.raises(TrainingError, match="the adapter to start from has lora_A"):
        update(base, **data, lora_cfg=lora(r=2), train_cfg=still, plan=plan(8, 1), start_from=factors)
    with pytest.raises(TrainingError, match="has no modules"):
        update(base, **data, lora_cfg=lora(), train_cfg=still, plan=plan(8, 1), start_from={})
