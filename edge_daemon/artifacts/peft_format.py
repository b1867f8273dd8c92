"""Peft's on-disk LoRA format, as the adapter store writes and serving reads it.

What `peft`'s `save_pretrained` writes for a plain LoRA: the file names, the prefix it gives
every tensor key (PeftModel -> LoraModel -> the wrapped model) and `adapter_config.json`'s
fields. The trainer (`training.lora`) writes adapters with these; the adapter store
(`artifacts.adapters`) and the merge (`artifacts.merge`) read them back, neither importing
peft. No torch here.

Beside peft's files an adapter may carry its LoRA weights in int8
(`ADAPTER_INT8_WEIGHTS_FILE`, the daemon's own format: peft does not read it). Its layout is
described here; the tensors are packed and unpacked in `artifacts.adapters`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)  # what peft itself writes and reads
PEFT_PREFIX = "base_model.model."

# The int8 weights: one int8 tensor with every lora_A then lora_B of every module, one float32
# tensor with their scales, and the layout in the safetensors metadata. Two tensors instead of
# two (values, scales) per LoRA weight: safetensors' JSON header costs ~100 bytes per tensor,
# as much as a small int8 weight itself (the default adapter: 12.4 kB that way, 8.0 kB packed,
# against 31 kB in float32).
ADAPTER_INT8_WEIGHTS_FILE = "adapter_model.int8.safetensors"
# A version holds either weight file or both; `adapter_config.json` is always there.
ADAPTER_WEIGHT_FILES = (ADAPTER_WEIGHTS_FILE, ADAPTER_INT8_WEIGHTS_FILE)
INT8_VALUES = "values"
INT8_SCALES = "scales"
INT8_LAYOUT_KEY = "lora_int8_layout"
INT8_FORMAT_KEY = "lora_int8_format"
# Symmetric int8 (-127..127, zero is exact), one scale per rank component: per row of lora_A
# (r, in), per column of lora_B (out, r).
INT8_FORMAT = "symmetric-per-rank-v1"


def lora_key(module_name: str, part: str) -> str:
    """The key peft saves `part` ("lora_A.weight", "lora_B.weight") of `module_name`'s adapter under."""
    return f"{PEFT_PREFIX}{module_name}.{part}"


def int8_layout(modules: Sequence[tuple[str, int, int, int]]) -> str:
    """The int8 file's layout metadata for `modules`, each (module name, r, in_features,
    out_features), in the order their values are packed.

    One short entry per module rather than (key, shape, offset) per tensor, since keys, shapes and
    offsets all follow from it (lora_A is (r, in) then lora_B (out, r); r scales each): the
    default adapter's file is 8.0 kB instead of 9.2 kB, 3.9x smaller than float32 instead of 3.4x.
    """
    return json.dumps([[name, r, n_in, n_out] for name, r, n_in, n_out in modules], separators=(",", ":"))


def parse_int8_layout(text: str) -> list[tuple[str, int, int, int]]:
    """The (module name, r, in_features, out_features) entries of an int8 file's layout; ValueError if malformed."""
    entries = json.loads(text)
    if not isinstance(entries, list):
        raise ValueError("int8 layout is not a list")
    modules = []
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not isinstance(entry[0], str)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in entry[1:])
        ):
            raise ValueError(f"bad int8 layout entry {entry!r}")
        modules.append((entry[0], entry[1], entry[2], entry[3]))
    return modules


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


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_FILES",
    "ADAPTER_INT8_WEIGHTS_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "ADAPTER_WEIGHT_FILES",
    "INT8_FORMAT",
    "INT8_FORMAT_KEY",
    "INT8_LAYOUT_KEY",
    "INT8_SCALES",
    "INT8_VALUES",
    "PEFT_PREFIX",
    "int8_layout",
    "lora_config",
    "lora_key",
    "parse_int8_layout",
]
