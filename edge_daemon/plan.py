"""The training plan: how one update spends memory.

A plan is the knob set the memory watchdog turns (micro-batch size, gradient
accumulation, gradient checkpointing, optimizer state precision); the trainer
runs whatever plan it is handed at each micro-batch boundary. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from edge_daemon.config import TrainConfig

OptimizerKind = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class TrainingPlan:
    micro_batch: int  # windows per forward/backward pass
    accumulation: int  # micro-batches summed per optimizer step
    checkpointing: bool  # recompute block activations in backward instead of keeping them
    optimizer: OptimizerKind  # adamw8bit keeps Adam moments in 8 bits

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.accumulation < 1:
            raise ValueError(f"micro_batch and accumulation must be >= 1, got {self.micro_batch}, {self.accumulation}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingPlan:
        return cls(
            micro_batch=int(data["micro_batch"]),
            accumulation=int(data["accumulation"]),
            checkpointing=bool(data["checkpointing"]),
            optimizer=data["optimizer"],
        )

    def describe(self) -> str:
        """Short human form for logs: `8x4 ckpt adamw8bit`."""
        return f"{self.micro_batch}x{self.accumulation} {'ckpt' if self.checkpointing else 'no-ckpt'} {self.optimizer}"


def plan_from_config(train: TrainConfig) -> TrainingPlan:
    """The loosest plan the config allows; the watchdog may start tighter.

    The micro-batch is the largest divisor of `batch_size` not above
    `micro_batch`, so micro-batches always add up to exactly the effective
    batch. 'auto' settings start loose (no checkpointing, fp32 state).
    """
    limit = min(train.micro_batch, train.batch_size)
    micro = max(d for d in range(1, limit + 1) if train.batch_size % d == 0)
    return TrainingPlan(
        micro_batch=micro,
        accumulation=train.batch_size // micro,
        checkpointing=train.gradient_checkpointing == "on",
        optimizer="adamw8bit" if train.optimizer == "adamw8bit" else "adamw",
    )
