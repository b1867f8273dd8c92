"""Base model files, the versioned adapter store, and the peft-free serving merge."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_daemon.artifacts.adapters import AdapterStore, load_lora_state
from edge_daemon.artifacts.base import load_base, save_base
from edge_daemon.artifacts.merge import merge_lora, serving_model
from edge_daemon.training.records import AdapterMeta
from edge_daemon.errors import AdapterError, ModelError
from edge_daemon.frames import NormStats
from edge_daemon.model import Forecaster, ForecasterConfig
from tests.conftest import save_random_peft_adapter

torch.set_num_threads(1)

CHANNELS = ["m1/temperature", "m1/vibration", "m1/current"]


def _base_model(seed: int = 0, **overrides: Any) -> Forecaster:
    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(n_channels=3, **overrides))
    # Move every weight off its init so merges act on non-trivial weights.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _norm() -> NormStats:
    return NormStats(np.array([20.0, 0.5, 3.0]), np.array([2.0, 0.1, 0.4]))


def _save_peft_adapter(model: Forecaster, directory: Path, seed: int = 1, **lora_kwargs: Any) -> None:
    targets = lora_kwargs.pop("target_modules", ["blocks.0.attn.qkv", "blocks.0.fc2", "blocks.2.attn.proj"])
    save_random_peft_adapter(model, directory, targets, seed=seed, **lora_kwargs)


def _commit_adapter(store: AdapterStore, model: Forecaster, seed: int = 1, **meta: Any) -> Any:
    staging = store.staging_dir()
    _save_peft_adapter(model, staging, seed=seed)
    return store.commit(staging, AdapterMeta.from_json({"val_loss": 0.1 * seed, **meta}))


# ---------------------------------------------------------------- base model


def test_base_roundtrip(tmp_path: Path) -> None:
    model = _base_model(window=16)
    scale = np.array([0.5, 1.0, 2.0], dtype=np.float32)
    save_base(tmp_path / "base", model, _norm(), CHANNELS, 1.0, scale, {"steps": 123, "epochs": 1.5})
    assert sorted(os.listdir(tmp_path / "base")) == ["config.json", "model.safetensors", "norm.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no temp dir left behind
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["forecaster"]["window"] == 16 and config["meta"]["steps"] == 123

    base = load_base(tmp_path / "base", channels=CHANNELS, period_s=1.0)
    assert not base.model.training
    assert base.cfg == model.cfg and base.channels == CHANNELS and base.period_s == 1.0
    np.testing.assert_array_equal(base.residual_scale, scale)
    np.testing.assert_array_equal(base.norm.std, _norm().std)
    assert base.meta["epochs"] == 1.5 and "created" in base.meta
    x = torch.randn(2, 16, 3)
    with torch.no_grad():
        torch.testing.assert_close(base.model(x), model(x), rtol=0, atol=0)


def test_base_replaced_whole_and_interrupted_save_recovered(tmp_path: Path) -> None:
    scale = np.ones(3, dtype=np.float32)
    save_base(tmp_path / "base", _base_model(0), _norm(), CHANNELS, 1.0, scale, {"steps": 1})
    first = load_base(tmp_path / "base").fingerprint
    save_base(tmp_path / "base", _base_model(1), _norm(), CHANNELS, 1.0, scale, {"steps": 2})
    second = load_base(tmp_path / "base")
    assert second.meta["steps"] == 2 and second.fingerprint != first
    assert [p.name for p in tmp_path.iterdir()] == ["base"]
    # A crash after the old base was moved aside and before the new one arrived.
    os.rename(tmp_path / "base", tmp_path / ".base.old-1-1")
    assert load_base(tmp_path / "base").fingerprint == second.fingerprint


def test_base_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no base model"):
        load_base(tmp_path / "base")
    save_base(tmp_path / "base", _base_model(), _norm(), CHANNELS, 1.0, np.ones(3), {})
    with pytest.raises(ModelError, match="channels"):
        load_base(tmp_path / "base", channels=["m1/temperature", "m1/vibration", "m2/current"])
    with pytest.raises(ModelError, match="period"):
        load_base(tmp_path / "base", period_s=5.0)
    with pytest.raises(ModelError, match="inconsistent"):
        save_base(tmp_path / "other", _base_model(), _norm(), CHANNELS[:2], 1.0, np.ones(3), {})

    weights = tmp_path / "base" / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ModelError, match="damaged"):  # its sha256 no longer matches
        load_base(tmp_path / "base")
    # A base saved before checksums were recorded: the readers' own checks still refuse it.
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    del config["sha256"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="corrupt"):
        load_base(tmp_path / "base")
    weights.write_bytes(intact)
    (tmp_path / "base" / "norm.json").write_text('{"mean": [0, 0, 0], "std": [1, 1, 0], "residual_scale": [1, 1, 1]}')
    with pytest.raises(ModelError, match="corrupt"):
        load_base(tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        load_base(tmp_path / "base")


# ---------------------------------------------------------------- adapter store


def test_commit_list_current_and_sizes(tmp_path: Path) -> None:
    model = _base_model()
    store = AdapterStore(tmp_path / "adapters", keep=5)
    assert store.current() is None and store.list() == []
    first = _commit_adapter(store, model, seed=1, data_range=[0.0, 10.0])
    assert first.version == 1 and first.path == tmp_path / "adapters" / "v1"
    assert {"adapter_config.json", "adapter_model.safetensors", "meta.json"} <= set(os.listdir(first.path))
    assert first.meta.data_range == [0.0, 10.0] and first.meta.version == 1
    expected_size = sum((first.path / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors"))
    assert first.size_bytes == expected_size
    assert first.created.endswith("+00:00")
    assert (tmp_path / "adapters" / "current").read_text().strip() == "v1"

    second = _commit_adapter(store, model, seed=2)
    assert store.current() == second
    assert [v.version for v in store.list()] == [1, 2]
    assert not list((tmp_path / "adapters").glob(".staging-*"))
    # A version that is not made current leaves the pointer alone.
    third = store.commit(_staged(store, model), AdapterMeta.from_json({"rejected": False}), make_current=False)
    assert third.version == 3 and store.current().version == 2


def _staged(store: AdapterStore, model: Forecaster) -> Path:
    staging = store.staging_dir()
    _save_peft_adapter(model, staging)
    return staging


def test_default_model_adapter_is_small(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters", keep=2)
    staging = store.staging_dir()
    # Every default target module in two blocks, rank 4: the shape the trainer produces by default.
    targets = [f"blocks.{b}.{m}" for b in (0, 1) for m in ("attn.qkv", "attn.proj", "fc1", "fc2")]
    _save_peft_adapter(Forecaster(ForecasterConfig(n_channels=3)), staging, target_modules=targets)
    assert store.commit(staging, AdapterMeta()).size_bytes < 100_000


def test_prune_keeps_last_k_and_current(tmp_path: Path) -> None:
    model = _base_model()
    store = AdapterStore(tmp_path / "adapters", keep=2)
    for seed in (1, 2, 3):
        _commit_adapter(store, model, seed=seed)
    assert [v.version for v in store.list()] == [2, 3]
    with pytest.raises(AdapterError, match="no adapter version 1"):
        store.rollback(1)
    assert store.rollback(2).version == 2 and store.current().version == 2
    # v2 is current: a new version that is not made current must not prune it.
    store.commit(_staged(store, model), AdapterMeta(), make_current=False)
    store.commit(_staged(store, model), AdapterMeta(), make_current=False)
    assert [v.version for v in store.list()] == [2, 4, 5]
    assert store.current().version == 2


def test_pointer_none_and_corruption(tmp_path: Path) -> None:
    model = _base_model()
    store = AdapterStore(tmp_path / "adapters", keep=3)
    _commit_adapter(store, model)
    store.use_base()
    assert store.current() is None and store.current_version() is None
    assert (tmp_path / "adapters" / "current").read_text().strip() == "none"
    assert store.rollback(1).version == 1
    (tmp_path / "adapters" / "current").write_text("garbage")
    with pytest.raises(AdapterError, match="corrupt"):
        store.current()
    (tmp_path / "adapters" / "current").write_text("v9\n")
    with pytest.raises(AdapterError, match="no adapter version 9"):
        store.current()
    # A staging dir without peft's files cannot be committed.
    empty = store.staging_dir()
    with pytest.raises(AdapterError, match="save_pretrained"):
        store.commit(empty, AdapterMeta())
    # A version whose weights are damaged cannot be rolled back to.
    (tmp_path / "adapters" / "v1" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError):
        store.rollback(1)


# ---------------------------------------------------------------- serving merge


LORA_VARIANTS = {
    "plain": {},
    "patterns": {"rank_pattern": {"fc2": 2}, "alpha_pattern": {"qkv": 3.0}},
    "rslora_bias": {"use_rslora": True, "lora_bias": True},
}


# peft mistakes lora_B's 1-D bias for an unsharded ZeRO-3 tensor and warns about it.
@pytest.mark.filterwarnings("ignore:.*invalid shape")
@pytest.mark.parametrize("variant", sorted(LORA_VARIANTS))
def test_merge_matches_peft(tmp_path: Path, variant: str) -> None:
    from peft import PeftModel

    model = _base_model(window=32)
    _save_peft_adapter(model, tmp_path / "adapter", **LORA_VARIANTS[variant])
    tensors, lora_cfg = load_lora_state(tmp_path / "adapter")
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in tensors
    before = copy.deepcopy(model.state_dict())

    merged = merge_lora(model, tensors, lora_cfg)
    x = torch.randn(4, 32, 3)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = peft_model(x)
        assert (expected - model(x)).abs().max() > 1e-2  # the adapter really changes the output
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)
    unloaded = peft_model.merge_and_unload()
    for name, tensor in unloaded.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    # The base is untouched: merge works on a copy.
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not merged.training and not any(p.requires_grad for p in merged.parameters())


def test_serving_model_from_store(tmp_path: Path) -> None:
    model = _base_model()
    save_base(tmp_path / "base", model, _norm(), CHANNELS, 1.0, np.ones(3), {})
    base = load_base(tmp_path / "base")
    store = AdapterStore(tmp_path / "adapters", keep=3)
    x = torch.randn(1, 64, 3)
    with torch.no_grad():
        plain = serving_model(base, store.current())
        torch.testing.assert_close(plain(x), base.model(x))
        version = _commit_adapter(store, model)
        adapted = serving_model(base, store.current())
        assert (adapted(x) - plain(x)).abs().max() > 1e-2
        assert version == store.current()


def test_merge_rejects_mismatched_adapter(tmp_path: Path) -> None:
    _save_peft_adapter(_base_model(d_model=32, n_heads=4), tmp_path / "adapter")
    tensors, lora_cfg = load_lora_state(tmp_path / "adapter")
    with pytest.raises(AdapterError, match="shape"):
        merge_lora(_base_model(), tensors, lora_cfg)
    tensors["base_model.model.blocks.0.nonexistent.lora_A.weight"] = torch.zeros(4, 4)
    tensors["base_model.model.blocks.0.nonexistent.lora_B.weight"] = torch.zeros(4, 4)
    with pytest.raises(AdapterError):
        merge_lora(_base_model(d_model=32, n_heads=4), tensors, lora_cfg)
    with pytest.raises(AdapterError, match="cannot read"):
        load_lora_state(tmp_path / "missing")


def test_serving_path_does_not_import_peft() -> None:
    code = (
        "import sys\n"
        "import edge_daemon.artifacts.adapters, edge_daemon.artifacts.base, edge_daemon.artifacts.merge\n"
        "import edge_daemon.scoring.serving, edge_daemon.frames\n"
        "heavy = sorted(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules)\n"
        "print(','.join(heavy) or 'clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "clean", out.stdout + out.stderr
