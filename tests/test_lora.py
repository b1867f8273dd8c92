"""The trainer's own LoRA layers: peft's arithmetic and peft's files, without peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edge_daemon.training.lora import LoraLinear, adapter_config, attach_lora, lora_layers, save_adapter
from edge_daemon.model import Forecaster, ForecasterConfig

CFG = ForecasterConfig(n_channels=3, window=8, d_model=16, n_heads=2, n_layers=2, d_ff=32)


def trained_lora(layer: LoraLinear, seed: int = 0) -> LoraLinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
    return layer


def test_a_new_adapter_changes_nothing_and_only_it_trains() -> None:
    torch.manual_seed(0)
    model = Forecaster(CFG)
    x = torch.randn(4, 8, 3)
    before = model(x).detach()
    attach_lora(model, ["blocks.0.attn.qkv", "blocks.1.fc2", "head"], r=4, alpha=8)
    assert sorted(lora_layers(model)) == ["blocks.0.attn.qkv", "blocks.1.fc2", "head"]
    assert torch.equal(model(x), before)  # B starts at zero
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{m}.lora_{ab}.weight" for m in ("blocks.0.attn.qkv", "blocks.1.fc2", "head") for ab in "AB")


def test_merge_and_unmerge_give_the_same_outputs() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = trained_lora(LoraLinear(base, r=2, alpha=4.0))
    original = base.weight.detach().clone()
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = base(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
        torch.testing.assert_close(layer(x), expected)
        layer.merge()
        assert layer.merged and not torch.equal(base.weight, original)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), expected)


def test_dropout_acts_only_in_training() -> None:
    layer = trained_lora(LoraLinear(nn.Linear(8, 8), r=2, alpha=2.0, dropout=0.5))
    x = torch.ones(64, 8)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # fresh dropout draws
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="not in the model"):
        attach_lora(Forecaster(CFG), ["blocks.0.attn.nope"], r=4, alpha=8)
    with pytest.raises(ValueError, match="not a Linear"):
        attach_lora(Forecaster(CFG), ["blocks.0.ln1"], r=4, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        LoraLinear(nn.Linear(2, 2), r=0, alpha=1.0)


def test_saved_files_are_what_peft_reads(tmp_path: Path) -> None:
    from peft import LoraConfig

    model = attach_lora(Forecaster(CFG), ["blocks.1.attn.proj", "blocks.0.fc1"], r=4, alpha=8, dropout=0.1)
    for layer in lora_layers(model).values():
        trained_lora(layer)
    save_adapter(model, tmp_path)
    config = LoraConfig.from_pretrained(str(tmp_path))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert sorted(config.target_modules) == ["blocks.0.fc1", "blocks.1.attn.proj"]
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == adapter_config(model)
