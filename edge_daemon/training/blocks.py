"""Selective freezing: which blocks of the forecaster get adapters, ranked by the gradient
norm of a probe batch, and the exact Linear layers that stand for them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from edge_daemon.errors import TrainingError
from edge_daemon.model import Forecaster, forecast_loss
from edge_daemon.training.forward_only import Direction

if TYPE_CHECKING:
    from edge_daemon.config import LoraConfigSection


@dataclass(frozen=True)
class BlockChoice:
    blocks: list[int]  # chosen block indices, highest gradient norm first
    grad_norms: list[float]  # per block (index = block), norm of d loss / d target weights
    target_modules: list[str]  # exact module names that get adapters, e.g. "blocks.2.attn.qkv"


def block_target_modules(model: Forecaster, block: int, targets: Sequence[str]) -> list[str]:
    """Exact names of the Linear layers of `block` matching `targets` ("qkv" or "attn.qkv")."""
    prefix = f"blocks.{block}."
    names = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not isinstance(module, nn.Linear):
            continue
        inner = name[len(prefix) :]
        if any(inner == t or inner.endswith("." + t) for t in targets):
            names.append(name)
    return names


def measure_block_grad_norms(model: Forecaster, probe: torch.Tensor, targets: Sequence[str], checkpointing: bool = False) -> list[float]:
    """Gradient norm of the probe loss w.r.t. each block's target weights.

    One forward/backward on `probe` (B, T+1, C). Each gradient is reduced to its
    norm and dropped the moment it is accumulated, so the probe never holds a
    full set of weight gradients. The model's requires_grad flags, mode and
    checkpointing switch are restored afterwards.
    """
    n_blocks = len(model.blocks)
    owners: dict[nn.Parameter, int] = {}
    for block in range(n_blocks):
        for name in block_target_modules(model, block, targets):
            owners[model.get_submodule(name).weight] = block
    if not owners:
        raise TrainingError(f"no Linear layers match target_modules {list(targets)}")

    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_mode, saved_ckpt = model.training, model.gradient_checkpointing
    squares = [0.0] * n_blocks
    handles = []

    def reduce_and_drop(param: torch.Tensor) -> None:
        assert param.grad is not None
        squares[owners[param]] += float(param.grad.detach().pow(2).sum())
        param.grad = None

    try:
        for p in model.parameters():
            p.requires_grad_(p in owners)
        for p in owners:
            handles.append(p.register_post_accumulate_grad_hook(reduce_and_drop))
        model.train()
        model.gradient_checkpointing = checkpointing
        loss = forecast_loss(model, probe)
        if not torch.isfinite(loss):
            raise TrainingError(f"probe loss is {float(loss)}")
        loss.backward()
        del loss
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(saved_mode)
        model.gradient_checkpointing = saved_ckpt
    return [math.sqrt(s) for s in squares]


# Random directions per block whose slopes estimate its gradient's norm without a backward.
FORWARD_PROBE_DIRECTIONS = 16
FORWARD_PROBE_EPS = 1e-3


@torch.no_grad()
def estimate_block_grad_norms(model: Forecaster, probe: torch.Tensor, targets: Sequence[str], seed: int = 0) -> list[float]:
    """The gradient norm of the probe loss w.r.t. each block's target weights, estimated by forward
    passes alone: for a direction z of independent standard normals, the slope of the loss along
    z, (L(W + eps z) - L(W - eps z)) / 2 eps, has E[slope^2] = |grad|^2. FORWARD_PROBE_DIRECTIONS
    of them per block (2 forwards each): a forward-only update must not pay for a first backward
    (~13 MB of autograd set-up) to rank its blocks. Weights are restored exactly after each direction.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = []
    mode = model.training
    model.eval()
    try:
        for block in range(len(model.blocks)):
            weights = [model.get_submodule(name).weight for name in block_target_modules(model, block, targets)]
            if not weights:
                norms.append(0.0)
                continue
            squares = 0.0
            for _ in range(FORWARD_PROBE_DIRECTIONS):
                saved = [w.clone() for w in weights]
                direction = Direction(weights, int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                direction.move(FORWARD_PROBE_EPS)
                plus = float(forecast_loss(model, probe))
                direction.move(-2 * FORWARD_PROBE_EPS)
                minus = float(forecast_loss(model, probe))
                for w, original in zip(weights, saved, strict=True):
                    w.copy_(original)
                squares += ((plus - minus) / (2 * FORWARD_PROBE_EPS)) ** 2
            norms.append(math.sqrt(squares / FORWARD_PROBE_DIRECTIONS))
    finally:
        model.train(mode)
    if not all(math.isfinite(n) for n in norms):
        raise TrainingError(f"probe loss is not finite (slopes {norms})")
    return norms


def choose_blocks(
    model: Forecaster, probe: torch.Tensor, lora_cfg: LoraConfigSection, checkpointing: bool = False, forward_only: bool = False
) -> BlockChoice:
    """Pick the `lora_cfg.max_blocks` blocks whose target weights get the largest gradients
    (`forward_only`: estimated without a backward)."""
    if forward_only:
        norms = estimate_block_grad_norms(model, probe, lora_cfg.target_modules)
    else:
        norms = measure_block_grad_norms(model, probe, lora_cfg.target_modules, checkpointing)
    ranked = sorted(range(len(norms)), key=lambda b: norms[b], reverse=True)
    chosen = ranked[: lora_cfg.max_blocks]
    modules = [name for b in sorted(chosen) for name in block_target_modules(model, b, lora_cfg.target_modules)]
    modules += expand_modules(model, lora_cfg.extra_modules)
    return BlockChoice(blocks=chosen, grad_norms=norms, target_modules=modules)


def expand_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The Linear layers `names` stand for: a Linear itself, or every Linear of a ModuleList (a
    further horizon's head each; none when the model forecasts the next step only)."""
    expanded: list[str] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.ModuleList):
            expanded += [f"{name}.{i}" for i, child in enumerate(module) if isinstance(child, nn.Linear)]
        elif isinstance(module, nn.Linear):
            expanded.append(name)
        else:
            raise TrainingError(f"extra module {name!r} is not a Linear layer or a list of them")
    return expanded


__all__ = ["BlockChoice", "block_target_modules", "choose_blocks", "estimate_block_grad_norms", "expand_modules", "measure_block_grad_norms"]
