"""int8 adapters: fake-quantised LoRA training, the int8 file, and the store serving it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from edge_daemon.artifacts.adapters import AdapterDamagedError, AdapterStore, check_adapter, load_int8_lora, load_lora_state
from edge_daemon.artifacts.base import load_base, save_base
from edge_daemon.artifacts.merge import merge_lora, serving_model
from edge_daemon.artifacts.peft_format import ADAPTER_CONFIG_FILE, ADAPTER_INT8_WEIGHTS_FILE, ADAPTER_WEIGHTS_FILE
from edge_daemon.config import LoraConfigSection, TrainConfig
from edge_daemon.errors import AdapterError
from edge_daemon.frames import NormStats
from edge_daemon.model import Forecaster, ForecasterConfig
from edge_daemon.training.blocks import block_target_modules, expand_modules
from edge_daemon.training.gate import evaluate_loss
from edge_daemon.training.loop import update
from edge_daemon.training.lora import LoraLinear, attach_lora, build_lora_model, lora_layers, lora_state_dict, save_adapter
from edge_daemon.training.plan import TrainingPlan
from edge_daemon.training.records import AdapterMeta
from tests.test_trainer import base, data  # noqa: F401  (fixtures)

torch.set_num_threads(1)

CFG = ForecasterConfig(n_channels=3, window=16, d_model=16, n_heads=2, n_layers=2, d_ff=32, horizons=(1, 4))
TARGETS = ["blocks.0.attn.qkv", "blocks.1.fc2", "head", "far_linear.0"]
CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]


def _base(cfg: ForecasterConfig = CFG, seed: int = 0) -> Forecaster:
    torch.manual_seed(seed)
    model = Forecaster(cfg)
    with torch.no_grad():  # off their init (the heads start at zero), so merges act on real weights
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _adapted(base: Forecaster, fake_quant: bool, targets: list[str] = TARGETS, seed: int = 1) -> nn.Module:
    """A copy of `base` with LoRA whose B is off zero, as after training."""
    model = attach_lora(copy.deepcopy(base), targets, r=4, alpha=8.0, fake_quant=fake_quant)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
    return model.eval()


# --- the file and the fake-quantised forward ----------------------------------------


def test_int8_file_holds_exactly_what_the_forward_used(tmp_path: Path) -> None:
    model = _adapted(_base(), fake_quant=True)
    used = lora_state_dict(model)  # the weights the forward multiplies by
    latent = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert not all(torch.equal(used[f"base_model.model.{k}"], v) for k, v in latent.items())  # they are rounded

    save_adapter(model, tmp_path / "int8", "int8")
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_INT8_WEIGHTS_FILE]
    loaded, _ = load_lora_state(tmp_path / "int8")
    assert loaded.keys() == used.keys()
    for key, tensor in used.items():
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], tensor), key
    # Bit for bit what each layer's forward computed with: the saved model is the trained one.
    x = torch.randn(5, 16)
    layer = lora_layers(model)["blocks.0.attn.qkv"]
    a, b = loaded["base_model.model.blocks.0.attn.qkv.lora_A.weight"], loaded["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x) + F.linear(F.linear(x, a), b) * layer.scaling)

    save_adapter(model, tmp_path / "both", "both")
    fp32 = load_file(str(tmp_path / "both" / ADAPTER_WEIGHTS_FILE))
    dequantised = load_int8_lora(tmp_path / "both" / ADAPTER_INT8_WEIGHTS_FILE)
    assert fp32.keys() == dequantised.keys() == used.keys()
    for key, tensor in dequantised.items():
        assert torch.equal(fp32[key], tensor), key


def test_both_from_a_float_model_holds_the_dequantised_values(tmp_path: Path) -> None:
    # A model trained without fake quantisation, saved "both": the fp32 file is the int8 one
    # dequantised (not the float weights), so peft and serving see one model.
    model = _adapted(_base(), fake_quant=False)
    save_adapter(model, tmp_path, "both")
    fp32 = load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))
    dequantised = load_int8_lora(tmp_path / ADAPTER_INT8_WEIGHTS_FILE)
    floats = lora_state_dict(model)
    for key, tensor in dequantised.items():
        assert torch.equal(fp32[key], tensor), key
        assert not torch.equal(tensor, floats[key]) and torch.allclose(tensor, floats[key], rtol=0, atol=float(floats[key].abs().max()) / 254 * 1.0001)


def test_fp32_save_is_the_float_weights(tmp_path: Path) -> None:
    model = _adapted(_base(), fake_quant=False)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE))
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            assert torch.equal(saved[f"base_model.model.{name}"], tensor), name
    with pytest.raises(ValueError, match="save"):
        save_adapter(model, tmp_path, "int4")  # type: ignore[arg-type]


def test_config_switches_fake_quantisation_on() -> None:
    assert LoraConfigSection().save == "fp32"
    for save, expected in (("fp32", False), ("int8", True), ("both", True)):
        model = build_lora_model(copy.deepcopy(_base()), TARGETS, LoraConfigSection(save=save))  # type: ignore[arg-type]
        assert {layer.fake_quant for layer in lora_layers(model).values()} == {expected}, save


def test_merge_of_a_fake_quantised_layer_uses_its_int8_weights() -> None:
    layer = LoraLinear(nn.Linear(12, 6), r=2, alpha=4.0, fake_quant=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = layer(x)
        a, b = layer.lora_weights()
        assert not torch.equal(a, layer.lora_A.weight)
        torch.testing.assert_close(layer.delta_weight(), (b @ a) * 2.0, rtol=0, atol=0)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_reads_the_fp32_file_of_both_as_serving_merges_the_int8_file(tmp_path: Path) -> None:
    from peft import PeftModel

    base = _base()
    model = _adapted(base, fake_quant=True)
    save_adapter(model, tmp_path / "both", "both")
    save_adapter(model, tmp_path / "int8", "int8")
    x = torch.randn(4, 16, 3)
    served = merge_lora(base, *load_lora_state(tmp_path / "int8"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "both")).eval()
    with torch.no_grad():
        expected = peft_model(x)
        assert (expected - base(x)).abs().max() > 1e-2  # the adapter changes the output
        torch.testing.assert_close(served(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)  # and both are the trained model


# --- the straight-through estimator ------------------------------------------------


def test_gradients_pass_straight_through_to_the_float_weights() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 6), r=2, alpha=4.0, fake_quant=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x, target = torch.randn(8, 12), torch.randn(8, 6)
    F.mse_loss(layer(x), target).backward()
    grad_a, grad_b = layer.lora_A.weight.grad, layer.lora_B.weight.grad
    assert grad_a is not None and grad_b is not None
    assert grad_a.abs().min() > 0 and grad_b.abs().min() > 0
    # The STE: d loss / d W is d loss / d q(W), the rounding itself passes the gradient unchanged.
    a, b = (w.detach().clone().requires_grad_(True) for w in layer.lora_weights())
    F.mse_loss(layer.base_layer(x) + F.linear(F.linear(x, a), b) * layer.scaling, target).backward()
    assert torch.equal(grad_a, a.grad) and torch.equal(grad_b, b.grad)


# --- accuracy after training ---------------------------------------------------------


@pytest.fixture(scope="module")
def regime_change(base: Forecaster, data: dict[str, torch.Tensor]) -> tuple[Forecaster, dict[str, torch.Tensor]]:
    """A small base that learned regime A (period 16), and the windows of regime B (period 12)."""
    return base, data


def _served_loss(base: Forecaster, directory: Path, windows: torch.Tensor) -> float:
    loss = evaluate_loss(merge_lora(base, *load_lora_state(directory)), windows)
    assert loss is not None
    return loss


def test_int8_adapter_is_within_1_percent_of_fp32(regime_change: tuple[Forecaster, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    base, data = regime_change
    train_cfg = TrainConfig(batch_size=16, micro_batch=16, steps=30, lr=3e-3)
    plan = TrainingPlan(micro_batch=16, accumulation=1, checkpointing=False, optimizer="adamw")
    losses: dict[str, float] = {}
    results: dict[str, Any] = {}
    for save in ("fp32", "int8"):
        result = update(base, **data, lora_cfg=LoraConfigSection(save=save), train_cfg=train_cfg, plan=plan, seed=3, keep_rejected=True)  # type: ignore[arg-type]
        assert result.adapted is not None
        save_adapter(result.adapted, tmp_path / save, save)  # type: ignore[arg-type]
        losses[save] = _served_loss(base, tmp_path / save, data["recent_val"])
        results[save] = result
    save_adapter(results["fp32"].adapted, tmp_path / "ptq", "int8")  # naive: the float adapter quantised at save
    losses["ptq"] = _served_loss(base, tmp_path / "ptq", data["recent_val"])
    before = results["fp32"].metrics_before["recent_val_loss"]
    assert losses["fp32"] < 0.9 * before  # the update learned something for int8 to keep
    # Not worse by more than 1% (it may come out better: the rounding changes the path training takes).
    assert losses["int8"] <= 1.01 * losses["fp32"], losses
    # What is served is what the gate judged: the fake-quantised model's own held-out loss.
    assert losses["int8"] == pytest.approx(results["int8"].metrics_after["recent_val_loss"], rel=1e-6)
    assert abs(losses["ptq"] / losses["fp32"] - 1) < 0.05, losses  # the comparison, loosely


# --- size -----------------------------------------------------------------------------


def test_int8_file_of_a_default_adapter_is_over_3_5x_smaller(tmp_path: Path) -> None:
    # The daemon's default model (3 channels, horizons 1 and 32, calendar inputs) and a default
    # update's modules: every target of two blocks plus the heads and linear paths.
    base = Forecaster(ForecasterConfig(n_channels=3, horizons=(1, 32), calendar_s=(86400.0, 604800.0)))
    lora_cfg = LoraConfigSection()
    targets = [n for b in range(lora_cfg.max_blocks) for n in block_target_modules(base, b, lora_cfg.target_modules)]
    targets += expand_modules(base, lora_cfg.extra_modules)
    assert len(targets) == 12
    save_adapter(_adapted(base, fake_quant=True, targets=targets), tmp_path, "both")
    fp32, int8 = ((tmp_path / name).stat().st_size for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_INT8_WEIGHTS_FILE))
    assert fp32 / int8 >= 3.5, (fp32, int8)


# --- the store ------------------------------------------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_store_commits_serves_and_checks_an_int8_only_version(tmp_path: Path) -> None:
    model = _base()
    save_base(tmp_path / "base", model, NormStats(np.zeros(3), np.ones(3)), CHANNELS, 1.0, np.ones(3), {})
    base = load_base(tmp_path / "base")
    store = AdapterStore(tmp_path / "adapters", keep=3)
    adapted = _adapted(base.model, fake_quant=True)

    staging = store.staging_dir()
    save_adapter(adapted, staging, "int8")
    version = store.commit(staging, AdapterMeta())
    assert set(version.meta.sha256 or {}) == {ADAPTER_CONFIG_FILE, ADAPTER_INT8_WEIGHTS_FILE}
    assert version.size_bytes == sum((version.path / n).stat().st_size for n in (ADAPTER_CONFIG_FILE, ADAPTER_INT8_WEIGHTS_FILE))
    x = torch.randn(2, 16, 3)
    with torch.no_grad():
        served = serving_model(base, store.current())
        assert (served(x) - base.model(x)).abs().max() > 1e-2
        torch.testing.assert_close(served(x), adapted(x), rtol=1e-4, atol=1e-5)

    staging = store.staging_dir()
    save_adapter(adapted, staging, "both")
    both = store.commit(staging, AdapterMeta())
    assert set(both.meta.sha256 or {}) == {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_INT8_WEIGHTS_FILE}
    assert both.size_bytes == sum((both.path / n).stat().st_size for n in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_INT8_WEIGHTS_FILE))
    # Damage to the int8 file is found whether or not it is the file serving reads.
    for damaged in (version, both):
        flip_byte(damaged.path / ADAPTER_INT8_WEIGHTS_FILE)
        with pytest.raises(AdapterDamagedError, match=ADAPTER_INT8_WEIGHTS_FILE):
            check_adapter(damaged)
    with pytest.raises(AdapterDamagedError):
        serving_model(base, store.get(version.version))
    with pytest.raises(AdapterError):
        store.rollback(version.version)
    # With both files, serving reads the float one: the damaged int8 file is not what it loads.
    loaded, fp32 = load_lora_state(both.path)[0], load_file(str(both.path / ADAPTER_WEIGHTS_FILE))
    assert loaded.keys() == fp32.keys() and all(torch.equal(loaded[k], fp32[k]) for k in fp32)
