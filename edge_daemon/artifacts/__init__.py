"""The daemon's files on disk, and how they are written and read back.

Modules:
- `files`: durable, atomic writes (JSON and text) and the fsyncs they rest on.
- `base`: the base model in `base/` (weights, config, normalisation) and its fingerprint.
- `adapters`: versioned LoRA adapters in `adapters/v<N>/`, the `current` pointer and its history.
- `peft_format`: peft's LoRA file format (file names, tensor keys, adapter_config.json), without peft.
- `merge`: the serving model, an adapter merged into a copy of the base in plain torch (no peft).
- `traces`: each update's memory and plan trace, under `updates/` and in an accepted adapter's directory.
"""
