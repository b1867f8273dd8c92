"""The start plan's dry runs: what one micro-batch of a candidate plan adds to the worker's memory,
and the room the plan leaves for what the worker allocates after training.
"""

from __future__ import annotations

import os
from typing import Any

from edge_daemon.training.plan import TrainingPlan

# What a worker's own memory grows by after training, on top of what it held when it planned:
# the metrics after, the saved adapter, the baselines refitted (measured on the default model:
# 4-5 MB, the update's peak when the plan's activations are small). The plan leaves room for it.
AFTER_TRAINING_MB = 6.0
# What a process's first backward adds, once, to set torch's autograd up (measured on the default
# model: ~13 MB); a forward-only update never pays it.
AUTOGRAD_SETUP_MB = 13.0


def measure_micro_batch_mb(base_model: Any, windows: Any, plan: TrainingPlan, targets: list[str]) -> float:
    """Peak MB one forward/backward of `plan.micro_batch` windows adds (kernel high-water mark);
    of a forward-only plan, one forward without gradients, as its steps run.

    Every target Linear of every block gets gradients: an upper bound on what
    LoRA on a subset of blocks keeps, cheap to set up, no peft needed. Runs on
    `base_model` itself (no copy: on the large model a copy is ~19 MB) and
    leaves its flags, mode and gradients as they were.
    """
    import torch

    from edge_daemon.model import forecast_loss
    from edge_daemon.memory.usage import peak_rss_mb, process_tree_rss_mb, release_memory, reset_peak_rss

    model = base_model
    flags = {p: p.requires_grad for p in model.parameters()}
    mode, checkpointing = model.training, model.gradient_checkpointing
    try:
        model.train()
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                module.weight.requires_grad_(True)
        model.gradient_checkpointing = plan.checkpointing
        batch = windows[: plan.micro_batch]
        release_memory()
        before = process_tree_rss_mb(os.getpid())
        reset_peak_rss()
        if plan.forward_only:
            with torch.no_grad():
                forecast_loss(model, batch)
        else:
            loss = forecast_loss(model, batch)
            loss.backward()
            del loss
        peak = peak_rss_mb()
        del batch
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(mode)
        model.gradient_checkpointing = checkpointing
    release_memory()
    return max(0.0, peak - before)


__all__ = ["AFTER_TRAINING_MB", "AUTOGRAD_SETUP_MB", "measure_micro_batch_mb"]
