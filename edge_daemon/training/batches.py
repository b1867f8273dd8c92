"""What an update trains on: windows cut from the grid when read (`GridWindows`) and the
draw of each optimizer step's batch, recent and replay windows in a fixed share (`BatchMixer`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from edge_daemon.errors import TrainingError


class GridWindows:
    """(N, length, C) windows of consecutive grid rows, cut when read.

    Held as copies, overlapping windows repeat every row once per window that
    covers it: 4096 windows of 257 steps and 3 channels are ~13 MB, cut from
    a grid of a few thousand rows. Held here as start rows over the grid, a
    window costs 8 bytes. Indexing (a LongTensor, a slice, an int) returns a
    float32 tensor, as indexing the (N, length, C) tensor would; so does
    `split`, as a tensor's does. What the trainer reads of windows is that.
    """

    def __init__(self, rows: torch.Tensor, starts: torch.Tensor, length: int) -> None:
        if rows.dim() != 2:
            raise ValueError(f"rows must be (R, C), got {tuple(rows.shape)}")
        self.rows = rows
        self.starts = starts.to(torch.long)
        self.length = int(length)
        self._offsets = torch.arange(self.length)
        if len(self.starts) and (int(self.starts.min()) < 0 or int(self.starts.max()) + self.length > len(rows)):
            raise ValueError("a window runs past the grid's rows")

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.starts), self.length, self.rows.shape[1]))

    def dim(self) -> int:
        return 3

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.rows[self.starts[index].unsqueeze(-1) + self._offsets]

    def split(self, size: int) -> Iterator[torch.Tensor]:
        return (self[i : i + size] for i in range(0, len(self), size))

    def tails(self, steps: int) -> np.ndarray:
        """(N, steps, C) the last `steps` rows of every window, as a numpy array (a copy)."""
        steps = min(steps, self.length)
        offsets = torch.arange(self.length - steps, self.length)
        return self.rows[self.starts.unsqueeze(-1) + offsets].numpy()

    def numpy(self) -> np.ndarray:
        return self[:].numpy()


class _Cycle:
    """Indices 0..n-1 in seeded random order, reshuffled each time they run out."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        taken = []
        while k > 0:
            if self.pos >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            chunk = self.order[self.pos : self.pos + k]
            self.pos += len(chunk)
            k -= len(chunk)
            taken.append(chunk)
        return torch.cat(taken) if taken else torch.empty(0, dtype=torch.long)


class BatchMixer:
    """Draws the windows of each optimizer step: recent and replay in a fixed share.

    Each source is visited in a seeded random order without repeats until it is
    exhausted. The batch is shuffled so every micro-batch mixes both sources.
    """

    def __init__(
        self, recent: torch.Tensor, replay: torch.Tensor, effective_batch: int, replay_fraction: float, generator: torch.Generator
    ) -> None:
        if len(recent) == 0:
            raise TrainingError("no recent training windows")
        if not 0 <= replay_fraction < 1:
            raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
        self.recent = recent
        self.replay = replay
        self.effective_batch = effective_batch
        self.n_replay = round(effective_batch * replay_fraction) if len(replay) else 0
        self.n_recent = effective_batch - self.n_replay
        self.generator = generator
        self._recent_order = _Cycle(len(recent), generator)
        self._replay_order = _Cycle(len(replay), generator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(effective_batch, T+1, C) windows and a (effective_batch,) bool mask of replay ones."""
        parts = [self.recent[self._recent_order.take(self.n_recent)]]
        if self.n_replay:
            parts.append(self.replay[self._replay_order.take(self.n_replay)])
        windows = torch.cat(parts)
        is_replay = torch.arange(self.effective_batch) >= self.n_recent
        order = torch.randperm(self.effective_batch, generator=self.generator)
        return windows[order], is_replay[order]


__all__ = ["BatchMixer", "GridWindows"]
