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

With `[lora] save` "int8" or "both" the adapter is trained with fake quantisation (the forward
sees int8-rounded LoRA weights, gradients pass straight through to the float32 ones), so the
int8 file it is saved as holds exactly the model that was trained and gated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from edge_daemon.artifacts.adapters import QuantizedLora, dequantize_per_rank, quantize_per_rank, save_int8_lora
from edge_daemon.artifacts.peft_format import ADAPTER_CONFIG_FILE, ADAPTER_INT8_WEIGHTS_FILE, ADAPTER_WEIGHTS_FILE, lora_config, lora_key
from edge_daemon.model import Forecaster

if TYPE_CHECKING:
    from edge_daemon.config import LoraConfigSection

SaveFormat = Literal["fp32", "int8", "both"]


def _fake_quant(weight: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """`weight` int8-rounded in the forward (the codec the int8 file is written with), the
    identity in the backward: the straight-through estimator q(W) = W + (dq(W) - W).detach().

    Written as dq + (W - W.detach()): the same value and gradient, but the value is dq bit for
    bit (W - W.detach() is exactly zero), so the saved int8 file reproduces the forward exactly.
    """
    with torch.no_grad():
        dq = dequantize_per_rank(*quantize_per_rank(weight, rank_dim), rank_dim).to(weight.dtype)
    return dq + (weight - weight.detach())


class LoraLinear(nn.Module):
    """`base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r`, with the base weights frozen.

    Attribute names follow peft's `lora.Linear` (`base_layer`, `lora_A`, `lora_B`,
    `lora_dropout`, `scaling`), so the adapted model's parameter names are peft's
    without its per-adapter-name level. With `fake_quant` the forward, `delta_weight` and
    `merge` use lora_A and lora_B int8-rounded (`quantized`), while the optimizer updates
    their float32 values.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, fake_quant: bool = False) -> None:
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
        self.fake_quant = fake_quant

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A and lora_B as the forward uses them: int8-rounded with `fake_quant`
        (gradients flowing straight through to the float32 weights), else the weights themselves."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if not self.fake_quant:
            return a, b
        return _fake_quant(a, 0), _fake_quant(b, 1)

    def quantized(self) -> QuantizedLora:
        """The int8 lora_A and lora_B with their per-rank scales: what the int8 file holds, and,
        with `fake_quant`, what the forward uses (without it, a post-training quantisation)."""
        return quantize_per_rank(self.lora_A.weight, 0), quantize_per_rank(self.lora_B.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if not self.fake_quant:
            return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        a, b = self.lora_weights()
        return result + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, shaped like the base weight (out, in)."""
        a, b = self.lora_weights()
        return (b @ a) * self.scaling

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


def attach_lora(
    model: nn.Module, target_modules: Sequence[str], r: int, alpha: float, dropout: float = 0.0, fake_quant: bool = False
) -> nn.Module:
    """Replace each Linear named in `target_modules` (exact names) with a LoraLinear, in place;
    every other parameter is frozen. Returns `model`. `fake_quant`: the layers train int8-rounded
    LoRA weights (`LoraLinear.fake_quant`).

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
        setattr(parent, child, LoraLinear(module, r, alpha, dropout, fake_quant))
        found.append(name)
    missing = wanted.difference(found)
    if missing:
        raise ValueError(f"LoRA targets not in the model: {sorted(missing)}")
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the keys peft saves them with, as the layers use them (int8-rounded
    for fake-quantised layers)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_weights()
        state[lora_key(name, "lora_A.weight")] = a.detach().contiguous()
        state[lora_key(name, "lora_B.weight")] = b.detach().contiguous()
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


def save_adapter(model: nn.Module, directory: str | Path, save: SaveFormat = "fp32") -> Path:
    """Write the model's adapter: adapter_config.json (peft's) and its weights as `save` says:

    - "fp32": peft's adapter_model.safetensors, the weights as the layers use them;
    - "int8": the int8 file (`ADAPTER_INT8_WEIGHTS_FILE`) alone, which peft cannot read;
    - "both": both, the float32 file holding exactly the int8 values dequantised, so peft's
      loader and serving's merge of either file give the same model.

    The int8 weights are the layers' float32 ones quantised per rank component: for layers trained
    with `fake_quant`, exactly what their forward used; otherwise a post-training quantisation.
    Durability (fsync, atomic rename, version pointer) is the adapter store's job.
    """
    if save not in ("fp32", "int8", "both"):
        raise ValueError(f"save must be 'fp32', 'int8' or 'both', got {save!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model)
    if save == "fp32":
        save_file(lora_state_dict(model), str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        quantized = {name: layer.quantized() for name, layer in lora_layers(model).items()}
        save_int8_lora(directory / ADAPTER_INT8_WEIGHTS_FILE, quantized)
        if save == "both":
            state: dict[str, torch.Tensor] = {}
            for name, ((q_a, s_a), (q_b, s_b)) in quantized.items():
                state[lora_key(name, "lora_A.weight")] = dequantize_per_rank(q_a, s_a, 0).contiguous()
                state[lora_key(name, "lora_B.weight")] = dequantize_per_rank(q_b, s_b, 1).contiguous()
            save_file(state, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def adapter_bytes(directory: str | Path) -> int:
    """Size of the adapter files in `directory`."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


def build_lora_model(model: Forecaster, target_modules: list[str], lora_cfg: LoraConfigSection) -> nn.Module:
    """Add LoRA layers to `model` in place on `target_modules`; every base weight frozen. An adapter
    to be saved in int8 trains with fake quantisation, so the gate judges the model that is saved."""
    return attach_lora(model, target_modules, lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, fake_quant=lora_cfg.save != "fp32")


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
    "SaveFormat",
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
