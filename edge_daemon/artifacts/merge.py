"""The serving model: an adapter's LoRA deltas merged into a copy of the base weights, in plain
torch (what peft's `merge_and_unload()` does, without importing peft).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch
from torch import nn

from edge_daemon.artifacts.adapters import AdapterVersion, check_adapter, load_lora_state
from edge_daemon.artifacts.base import BaseModel
from edge_daemon.artifacts.peft_format import PEFT_PREFIX
from edge_daemon.errors import AdapterError
from edge_daemon.model import Forecaster


def _alpha_for(module_name: str, lora_cfg: dict[str, Any]) -> float:
    # Same matching rule as peft.utils.other.get_pattern_key.
    for pattern, alpha in (lora_cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return float(alpha)
    return float(lora_cfg["lora_alpha"])


def merge_lora(model: Forecaster, tensors: dict[str, torch.Tensor], lora_cfg: dict[str, Any]) -> Forecaster:
    """A copy of `model` with W += scale * B @ A merged into every adapted Linear (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).

    Equivalent to peft's `merge_and_unload()`; the input model is untouched.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", key)
        if not match:
            raise AdapterError(f"unexpected tensor {key!r} in adapter")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    merged = copy.deepcopy(model)
    fan_in_fan_out = bool(lora_cfg.get("fan_in_fan_out", False))
    for name, parts in sorted(pairs.items()):
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise AdapterError(f"adapter for {name} lacks lora_A or lora_B")
        try:
            layer = merged.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"adapter targets {name}, which the base model does not have") from None
        if not isinstance(layer, nn.Linear):
            raise AdapterError(f"adapter targets {name}, which is not a Linear layer")
        lora_a = parts["lora_A.weight"].to(torch.float32)  # (r, in)
        lora_b = parts["lora_B.weight"].to(torch.float32)  # (out, r)
        r = lora_a.shape[0]  # per-module rank (rank_pattern) is in the shape itself
        alpha = _alpha_for(name, lora_cfg)
        scale = alpha / math.sqrt(r) if lora_cfg.get("use_rslora") else alpha / r
        delta = lora_b @ lora_a  # (out, in)
        if fan_in_fan_out:
            delta = delta.T
        if delta.shape != layer.weight.shape:
            raise AdapterError(f"adapter for {name} has shape {tuple(delta.shape)}, layer has {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight += (delta * scale).to(layer.weight.dtype)
            if "lora_B.bias" in parts:
                if layer.bias is None:
                    raise AdapterError(f"adapter for {name} has a bias but the layer has none")
                layer.bias += (parts["lora_B.bias"].to(torch.float32) * scale).to(layer.bias.dtype)
    if not all(torch.isfinite(p).all() for p in merged.parameters()):
        raise AdapterError("merged weights are not finite")
    merged.eval()
    merged.requires_grad_(False)
    return merged


def serving_model(base: BaseModel, version: AdapterVersion | None) -> Forecaster:
    """The model the daemon scores with: base + `version` merged, or a frozen copy of the base when None.

    AdapterError when `version` was trained on another base (its LoRA deltas fit only that one's
    weights); adapters from before the base was recorded are taken as they are."""
    if version is None:
        model = copy.deepcopy(base.model)
        model.eval()
        model.requires_grad_(False)
        return model
    trained_on = version.meta.base_fingerprint
    if trained_on is not None and trained_on != base.fingerprint:
        raise AdapterError(
            f"adapter v{version.version} was trained on base {trained_on}, the base now is {base.fingerprint}: "
            "it fits only the base it was trained on"
        )
    check_adapter(version)  # a damaged file is never merged
    tensors, lora_cfg = load_lora_state(version.path)
    return merge_lora(base.model, tensors, lora_cfg)
