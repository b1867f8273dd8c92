"""The update's optimizer: AdamW for the adapter's few thousand weights, without
`torch.optim`, or bitsandbytes' 8-bit AdamW where its state saves more than its import costs
(`plan.EightBitPayoff`).

The first `torch.optim` optimizer a process builds loads `torch._dynamo`
(~70 MB of memory of its own and ~2 s here), which a LoRA update of a small
forecaster has no use for. `AdamW` here is torch's single-tensor AdamW step (the path
it takes on the CPU), operation for operation, so the same gradients give the
same weights; `tests/test_optim.py` holds it to `torch.optim.AdamW`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

# Whether 8-bit state pays is the planner's rule (`plan.EightBitPayoff`); named here too, beside the optimizers it chooses between.
from edge_daemon.training.plan import BITSANDBYTES_IMPORT_MB, MIN_8BIT_SAVING_MB, TORCH_DYNAMO_IMPORT_MB, EightBitPayoff


class AdamW:
    """Decoupled weight decay Adam (Loshchilov & Hutter), amsgrad off, as `torch.optim.AdamW`.

    Holds per-parameter `state` ({"step", "exp_avg", "exp_avg_sq"}) made at a
    parameter's first step, like torch's; `step()` skips parameters without a
    gradient.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0; got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1); got {betas}")
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor | int]] = {}

    @torch.no_grad()
    def step(self) -> None:
        for param in self.params:
            self.step_param(param)

    @torch.no_grad()
    def step_param(self, param: torch.nn.Parameter) -> None:
        """Step one parameter with its gradient (none: nothing), as `step` does each: the optimizer
        step in backward (`training.loop`) calls it as each gradient is ready."""
        grad = param.grad
        if grad is None:
            return
        beta1, beta2 = self.betas
        state = self.state.get(param)
        if state is None:
            state = self.state[param] = {
                "step": 0,
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        assert isinstance(exp_avg, torch.Tensor) and isinstance(exp_avg_sq, torch.Tensor)
        state["step"] = step = int(state["step"]) + 1
        if self.weight_decay != 0:
            param.mul_(1 - self.lr * self.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # as torch has it (not math.sqrt: the last bit may differ)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-self.lr / bias_correction1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()


Optimizer = Any  # AdamW (above) or a bitsandbytes (torch.optim) optimizer: step(), zero_grad(), state


def make_optimizer(
    params: Sequence[nn.Parameter], kind: str, lr: float, weight_decay: float = 0.0, min_8bit_size: int = 0
) -> Optimizer:
    """AdamW (our own, above: torch.optim would load torch._dynamo), or bitsandbytes
    AdamW8bit (CPU kernels since 0.50).

    bitsandbytes keeps tensors under `min_8bit_size` elements in fp32 and its
    default (4096) is larger than most LoRA tensors, so it is passed through.
    """
    if kind == "adamw":
        return AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    raise ValueError(f"optimizer must be one of adamw, adamw8bit; got {kind!r}")


def optimizer_state_bytes(optimizer: Optimizer) -> dict[str, int]:
    """Bytes of optimizer state per dtype, e.g. {"uint8": 12288, "float32": 2176}.

    Tensors shared between parameters (bitsandbytes' quantisation maps) count once.
    """
    totals: dict[str, int] = {}
    seen: set[int] = set()
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                key = str(value.dtype).removeprefix("torch.")
                totals[key] = totals.get(key, 0) + value.numel() * value.element_size()
    return totals


__all__ = [
    "BITSANDBYTES_IMPORT_MB",
    "MIN_8BIT_SAVING_MB",
    "TORCH_DYNAMO_IMPORT_MB",
    "AdamW",
    "EightBitPayoff",
    "Optimizer",
    "make_optimizer",
    "optimizer_state_bytes",
]
