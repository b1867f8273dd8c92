"""Reversible blocks: the gradients of a model that keeps its activations, with the activations
kept for backward flat in depth, saved and loaded as what it is, and trained by pretraining and
by LoRA updates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edge_daemon.model as model_module
from edge_daemon.artifacts.base import CONFIG_FILE, load_base, save_base
from edge_daemon.config import LoraConfigSection, ModelConfig, TrainConfig
from edge_daemon.frames import Grid, NormStats, make_windows
from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss
from edge_daemon.training.loop import update
from edge_daemon.training.lora import attach_lora
from edge_daemon.training.plan import TrainingPlan
from edge_daemon.training.pretrain import pretrain
from tests.test_pretrain import _values

torch.set_num_threads(1)

# Adapted in the LoRA cases: no layer of block 0, so backward can stop above it.
LORA_TARGETS = ["blocks.1.attn.qkv", "blocks.1.fc2", "blocks.2.fc1", "blocks.3.attn.proj"]


def _model(n_layers: int, reversible: bool = True, dropout: float = 0.0, horizons: tuple[int, ...] = (1,), width: int = 16) -> Forecaster:
    cfg = ForecasterConfig(
        n_channels=3, window=16, d_model=width, n_heads=2, n_layers=n_layers, d_ff=2 * width, lags=4,
        dropout=dropout, horizons=horizons, reversible=reversible,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Forecaster(cfg)
    for head in (model.head, *model.far_head):
        nn.init.normal_(head.weight, std=0.1)  # a zero head would pass the blocks no gradient
    return model.train()


def _with_lora(model: Forecaster, targets: list[str], dropout: float = 0.0) -> Forecaster:
    torch.manual_seed(1)
    attach_lora(model, targets, r=2, alpha=4.0, dropout=dropout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a zero B would pass A no gradient
    return model


def _loss_and_grads(model: Forecaster, x: torch.Tensor, stored: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients (parameters, and the input's when it requires grad) from one training
    forward/backward; `stored`: the same coupled blocks as a plain loop that keeps its activations."""
    with monkeypatch.context() as patch:
        if stored:
            patch.setattr(model_module, "run_reversible", model_module.run_coupled)
        torch.manual_seed(2)  # the same dropout masks in both runs: both draw them in the same order
        loss = forecast_loss(model, x)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if x.grad is not None:
        grads["input"] = x.grad.clone()
        x.grad = None
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize(
    ("adapted", "dropout", "lora_dropout"),
    [
        ("full", 0.0, 0.0), ("full", 0.2, 0.0),
        ("lora", 0.0, 0.0), ("lora", 0.2, 0.0), ("lora", 0.0, 0.3),
        ("lora-input", 0.0, 0.0), ("lora-input", 0.2, 0.3),
    ],  # fmt: skip
)
def test_gradients_equal_those_of_the_blocks_keeping_their_activations(
    adapted: str, dropout: float, lora_dropout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilding each block's inputs from its outputs in backward gives the gradients of the input,
    of every trainable weight (all of them, or LoRA's beside frozen base weights) and, through
    `forward_horizons`, of the further horizons' heads; dropout (the blocks' or LoRA's) draws the
    same masks again, and backward leaves the random state as the forward left it."""
    model = _model(4, dropout=dropout, horizons=(1, 4))
    if adapted != "full":
        _with_lora(model, LORA_TARGETS, lora_dropout)
    x = torch.randn(4, 17, 3, requires_grad=adapted != "lora")  # "lora": nothing below the blocks needs a gradient
    stored_loss, stored = _loss_and_grads(model, x, True, monkeypatch)
    stored_rng = torch.get_rng_state()
    loss, grads = _loss_and_grads(model, x, False, monkeypatch)
    assert torch.equal(torch.get_rng_state(), stored_rng), "backward drew random numbers"
    assert loss == pytest.approx(stored_loss, rel=1e-6)
    assert grads.keys() == stored.keys()
    if adapted == "full":
        assert len(grads) == len(list(model.parameters())) + 1 and "far_head.0.weight" in grads
    else:  # the adapters' A and B, nothing frozen (block 0 has none: in "lora" backward stops above it)
        assert {n for n in grads if n != "input"} == {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 2 * len(LORA_TARGETS) + (adapted == "lora-input")
    for name, expected in stored.items():
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)


def test_dropout_acts_in_training_and_not_in_inference() -> None:
    """What the comparison above relies on: dropout changes the training loss with the seed (so equal
    losses mean equal masks); inference, the plain loop in eval mode, draws none."""
    model = _model(2, dropout=0.2)
    x = torch.randn(4, 17, 3)
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(forecast_loss(model, x).item())
    assert losses[0] != losses[1]
    model.eval()
    with torch.inference_mode():
        first, second = model(x[:, :-1]), model(x[:, :-1])
    assert torch.equal(first, second)


def _saved_activation_bytes(model: Forecaster, x: torch.Tensor) -> int:
    """Bytes autograd keeps between one training forward and its backward, each storage once, the
    weights themselves not counted. Only what the forward saves: a block's activations rebuilt
    and freed during backward, one block at a time, are transient and not counted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forecast_loss(model, x)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


@pytest.mark.parametrize("adapted", ["full", "lora"])
def test_saved_activations_do_not_grow_with_depth(adapted: str) -> None:
    """Reversible: 12 blocks keep what 3 do (their last outputs); standard: each block keeps its own.
    Checkpointing changes nothing in a reversible model: it has nothing left to save."""
    x = torch.randn(8, 33, 3)
    saved: dict[tuple[bool, int], int] = {}
    for reversible in (True, False):
        for depth in (3, 12):
            cfg = ForecasterConfig(n_channels=3, window=32, d_model=32, n_heads=4, n_layers=depth, d_ff=64, lags=4, reversible=reversible)
            torch.manual_seed(0)
            model = Forecaster(cfg).train()
            nn.init.normal_(model.head.weight, std=0.1)
            if adapted == "lora":
                _with_lora(model, ["blocks.0.attn.qkv", "blocks.1.fc1"])
            saved[reversible, depth] = _saved_activation_bytes(model, x)
            if reversible:
                model.gradient_checkpointing = True
                assert _saved_activation_bytes(model, x) == saved[reversible, depth]
    assert saved[True, 12] <= 1.2 * saved[True, 3], saved
    assert saved[False, 12] >= 3 * saved[False, 3], saved
    assert saved[True, 3] < saved[False, 3], saved


def test_backward_imports_neither_dynamo_nor_sympy() -> None:
    # In a fresh interpreter: torch._dynamo (~70 MB) and sympy (~33 MB) stay out, LoRA and dropout included.
    code = """
import sys, torch
from edge_daemon.model import Forecaster, ForecasterConfig, forecast_loss
from edge_daemon.training.lora import attach_lora
model = Forecaster(ForecasterConfig(n_channels=2, window=8, d_model=8, n_heads=2, n_layers=2, d_ff=8, dropout=0.1, reversible=True))
torch.nn.init.normal_(model.head.weight)
attach_lora(model, ["blocks.1.fc1"], r=2, alpha=2.0, dropout=0.1).train()
forecast_loss(model, torch.randn(2, 9, 2)).backward()
assert model.blocks[1].fc1.lora_B.weight.grad.abs().sum() > 0
loaded = [m for m in ("torch._dynamo", "sympy") if m in sys.modules]
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_the_config_records_reversibility_and_an_older_base_loads_as_standard(tmp_path: Path) -> None:
    model = _model(2).eval()
    assert ForecasterConfig.from_dict(json.loads(json.dumps(model.cfg.to_dict()))) == model.cfg
    older = {k: v for k, v in model.cfg.to_dict().items() if k != "reversible"}
    assert ForecasterConfig.from_dict(older).reversible is False

    norm = NormStats(np.zeros(3), np.ones(3))
    save_base(tmp_path / "base", model, norm, ["a", "b", "c"], 1.0, np.ones(3), {"source": "store"})
    base = load_base(tmp_path / "base")
    assert base.model is not None and base.cfg.reversible
    x = torch.randn(2, 16, 3)
    with torch.inference_mode():
        torch.testing.assert_close(base.model(x), model(x))
    # A base written before the field existed: the same file without the key.
    config = json.loads((tmp_path / "base" / CONFIG_FILE).read_text())
    del config["forecaster"]["reversible"]
    (tmp_path / "base" / CONFIG_FILE).write_text(json.dumps(config))
    assert load_base(tmp_path / "base").cfg.reversible is False


def test_pretraining_and_a_lora_update_train_a_reversible_base(tmp_path: Path) -> None:
    """`[model] reversible` reaches the base, whose training improves on its ridge start; an update
    then trains adapters on it (with checkpointing asked for, which it ignores)."""
    config = ModelConfig(window=16, d_model=16, n_heads=2, n_layers=2, d_ff=32, reversible=True)
    grid = Grid(1_700_000_000.0, 1.0, _values(2500))
    metrics = pretrain(grid, ["a", "b", "c"], 1.0, config, tmp_path / "base", steps=150, lr=1e-2)
    assert metrics["best_step"] > 0 and metrics["val_loss"] < 0.5 * metrics["persistence_val_loss"]
    base = load_base(tmp_path / "base")
    assert base.model is not None and base.cfg.reversible

    windows = torch.from_numpy(make_windows(base.inputs(Grid(grid.t0, 1.0, _values(400, seed=1))), 17).windows)
    result = update(
        base.model, windows[:256], windows[256:320], windows[:0], windows[:0], LoraConfigSection(max_blocks=1),
        TrainConfig(batch_size=8, micro_batch=4, steps=3, lr=3e-3),
        TrainingPlan(micro_batch=4, accumulation=2, checkpointing=True, optimizer="adamw"), keep_rejected=True,
    )  # fmt: skip
    assert result.adapted is not None and len(result.train_losses) == 3
    trained = {n: p for n, p in result.adapted.named_parameters() if p.requires_grad}
    block_b = [p for n, p in trained.items() if n.startswith("blocks.") and "lora_B" in n]
    assert block_b and all(p.abs().sum() > 0 for p in block_b)  # LoRA B starts at zero: it moved
