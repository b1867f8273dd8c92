"""Peft's on-disk LoRA format, as the adapter store writes and serving reads it.

What `peft`'s `save_pretrained` writes for a plain LoRA: the file names, the prefix it gives
every tensor key (PeftModel -> LoraModel -> the wrapped model) and `adapter_config.json`'s
fields. The trainer (`training.lora`) writes adapters with these; the adapter store
(`artifacts.adapters`) and the merge (`artifacts.merge`) read them back, neither importing
peft. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
PEFT_PREFIX = "base_model.model."


def lora_key(module_name: str, part: str) -> str:
    """The key peft saves `part` ("lora_A.weight", "lora_B.weight") of `module_name`'s adapter under."""
    return f"{PEFT_PREFIX}{module_name}.{part}"


def lora_config(target_modules: Iterable[str], r: int, alpha: float, dropout: float) -> dict[str, Any]:
    """The adapter_config.json peft writes for a plain LoRA (no DoRA, rsLoRA, bias or modules_to_save).

    Fields peft has added for other methods are left out: its config fills them with defaults.
    """
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_FILES", "ADAPTER_WEIGHTS_FILE", "PEFT_PREFIX", "lora_config", "lora_key"]
