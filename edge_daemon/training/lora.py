"""LoRA for the trainer, in plain torch, saved in peft's on-disk format (`artifacts.peft_format`), and the
forecaster it wraps (`build_lora_model`, the checkpointing switch).

peft (with transformers and accelerate behind it) costs a training process
~160 MB and seconds of import for what is here a few lines: a low-rank pair
beside each adapted Linear. This module builds those layers the way peft's
`LoraModel` does (same initialisation, in the same order, so one seed gives
the same adapter) and writes `adapter_config.json` and
`adapter_model.safetensors` with peft's key names, so `PeftModel.from_pretrained`
loads every saved adapter unchanged. Serving reads them back in
`artifacts.merge.merge_lora`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from edge_daemon.artifacts.peft_format import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, lora_config, lora_key
from edge_daemon.model import Forecaster

if TYPE_CHECKING:
    from edge_daemon.config import LoraConfigSection


class LoraLinear(nn.Module):
    """`base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r`, with the base weights frozen.

    Attribute names follow peft's `lora.Linear` (`base_layer`, `lora_A`, `lora_B`,
    `lora_dropout`, `scaling`), so the adapted model's parameter names are peft's
    without its per-adapter-name level.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_dropout: nn.Module = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        # Created, then A re-initialised and B zeroed, in peft's order: the same RNG draws as
        # peft's update_layer + reset_lora_parameters, so a seed gives peft's initial adapter.
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base_layer.weight.dtype)
        self.lora_B.to(base_layer.weight.dtype)
        base_layer.requires_grad_(False)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, shaped like the base weight (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (one matmul per forward instead of three)."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


def attach_lora(model: nn.Module, target_modules: Sequence[str], r: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """Replace each Linear named in `target_modules` (exact names) with a LoraLinear, in place;
    every other parameter is frozen. Returns `model`.

    Layers are wrapped in the model's module order, as peft does, so the random
    initialisation matches peft's for the same seed.
    """
    wanted = set(target_modules)
    if not wanted:
        raise ValueError("no target modules for LoRA")
    model.requires_grad_(False)
    found = []
    for name, module in list(model.named_modules()):
        if name not in wanted:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not a Linear layer")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, r, alpha, dropout))
        found.append(name)
    missing = wanted.difference(found)
    if missing:
        raise ValueError(f"LoRA targets not in the model: {sorted(missing)}")
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the keys peft saves them with."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        state[lora_key(name, "lora_A.weight")] = layer.lora_A.weight.detach().contiguous()
        state[lora_key(name, "lora_B.weight")] = layer.lora_B.weight.detach().contiguous()
    return state


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """The model's adapter_config.json (`artifacts.peft_format.lora_config`): its LoRA layers share one rank, alpha and dropout."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    ranks = {layer.r for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    dropouts = {float(getattr(layer.lora_dropout, "p", 0.0)) for layer in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1 or len(dropouts) != 1:
        raise ValueError("LoRA layers with different rank, alpha or dropout are not supported")
    return lora_config(layers, ranks.pop(), alphas.pop(), dropouts.pop())


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's adapter in peft's format: adapter_config.json + adapter_model.safetensors.

    Durability (fsync, atomic rename, version pointer) is the adapter store's job.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model)
    save_file(lora_state_dict(model), str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def adapter_bytes(directory: str | Path) -> int:
    """Size of the adapter files in `directory`."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


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


__all__ = [
    "LoraLinear",
    "adapter_bytes",
    "adapter_config",
    "attach_lora",
    "build_lora_model",
    "forecaster_of",
    "lora_layers",
    "lora_state_dict",
    "save_adapter",
    "set_checkpointing",
]
