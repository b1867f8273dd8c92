"""The forecaster: persistence, plus a linear autoregression, plus a small causal transformer.

No I/O here: loading and saving live in `artifacts` and `training.lora`. Inputs are
normalised channel values on a regular grid; at every position the model
predicts the change from the current value to the next step, as the sum of a
linear path over the last `lags` steps of every channel (the ridge baseline's
features, so pretraining starts it from the ridge fit) and a transformer path
over the window taken relative to its first step (a level shift changes
nothing it sees). Input-only channels (`n_covariates`: a set-point, a
working-day flag) follow the forecast channels and are read by both paths like
them; calendar inputs (sine and cosine of the time of day and of the week,
`calendar_s`) come last. Neither is forecast. The transformer's output head starts at zero,
so an untrained model is exactly its linear path, and training can only add
what the linear path misses. With `reversible`, the blocks are RevNet-style
couplings: training keeps the activations of none of them, whatever the depth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ForecasterConfig:
    n_channels: int  # channels forecast: the first input columns, and the output columns
    window: int = 64  # steps of history; positions beyond it are not embedded
    d_model: int = 64  # ~1e5 parameters at the defaults: fits a Pi-class device
    n_heads: int = 4
    n_layers: int = 3
    d_ff: int = 128
    dropout: float = 0.0  # sensor series are small and noisy; dropout rarely helps
    lags: int = 16  # steps of every channel the linear path regresses on (the ridge baseline's lags)
    calendar_s: tuple[float, ...] = ()  # periods (s) whose phase is an input: 86400.0 for the time of day
    horizons: tuple[int, ...] = (1,)  # steps ahead it forecasts: 1, then further ones (at most window // 2)
    n_covariates: int = 0  # channels read but not forecast: the input columns after the forecast ones
    # Reversible (RevNet) blocks: backward rebuilds each block's input from its output instead of
    # keeping it. Not in a base saved before it existed: from_dict gives False, the blocks it was trained as.
    reversible: bool = False

    def __post_init__(self) -> None:
        assert self.n_channels >= 1, "need at least one channel"
        assert self.d_model % self.n_heads == 0, "d_model must be a multiple of n_heads"
        assert self.lags >= 1, "lags must be >= 1"
        assert self.n_covariates >= 0, "n_covariates must be >= 0"
        # A window shorter than the lags holds them all: the linear path sees the whole window.
        object.__setattr__(self, "lags", min(self.lags, self.window))
        object.__setattr__(self, "calendar_s", tuple(float(p) for p in self.calendar_s))  # JSON gives a list
        object.__setattr__(self, "horizons", tuple(int(h) for h in self.horizons))
        assert self.horizons[0] == 1 and list(self.horizons) == sorted(set(self.horizons)), "horizons: 1, then increasing"
        # The loss sees a horizon h from positions with half a window of context: h <= window // 2.
        assert self.horizons[-1] <= max(1, self.window // 2), f"horizons must be at most {self.window // 2} steps"

    @property
    def n_sensors(self) -> int:
        """Input columns of sensor channels: the forecast ones, then the inputs only."""
        return self.n_channels + self.n_covariates

    @property
    def n_inputs(self) -> int:
        """Input columns: the sensor channels, then sine and cosine of each calendar period."""
        return self.n_sensors + 2 * len(self.calendar_s)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "calendar_s": list(self.calendar_s), "horizons": list(self.horizons)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForecasterConfig:
        return cls(**data)


# The ~5M-parameter configuration used by the benchmarks (window 256).
LARGE = {"window": 256, "d_model": 256, "n_heads": 8, "n_layers": 6, "d_ff": 1024}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, H, T, C/H)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        # Fused attention: no T x T matrix is materialised in Python.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    """Attention then feed-forward, each added to the residual stream.

    A reversible model couples the same two branches across a pair of streams
    (`coupled`) instead, so the modules and their names, which LoRA targets
    and the block probe go by, are the same in both kinds of model.
    """

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch (F of a reversible block)."""
        return self.drop(self.attn(self.ln1(x)))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward branch (G of a reversible block)."""
        return self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(x)
        x = x + self.feed_forward(x)
        return x  # (B, T, d_model)

    def coupled(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One reversible step: (x1, x2) -> (y1, y2), from which (x1, x2) can be computed back."""
        y1 = x1 + self.attend(x2)
        return y1, x2 + self.feed_forward(y1)


def lag_features(x: torch.Tensor, lags: int) -> torch.Tensor:
    """(B, T, C) -> (B, T, lags * C): at each t, x[t] and x[t - k] - x[t] for k = lags-1 .. 1.

    The same features, in the same order, as `baselines.RidgeAR` uses, so its
    coefficients load into the linear path unchanged. Positions with fewer than
    `lags` steps behind them repeat the first step.
    """
    B, T, C = x.shape
    padded = torch.cat([x[:, :1].expand(B, lags - 1, C), x], dim=1)  # (B, T + lags - 1, C)
    history = padded.unfold(1, lags, 1).transpose(2, 3)  # (B, T, lags, C), oldest first
    relative = history[:, :, :-1] - x.unsqueeze(2)  # (B, T, lags - 1, C)
    return torch.cat([x, relative.reshape(B, T, (lags - 1) * C)], dim=2)


class _Recompute(torch.autograd.Function):
    """`fn(x)` without keeping its activations: backward runs `fn` again and backpropagates through it.

    What torch.utils.checkpoint does, but that loads torch._dynamo on first use
    (~70 MB of its own, ~2 s), more than the activations it saves here. The
    random state is replayed, so dropout draws the same mask twice. `anchor`
    requires grad, so backward runs (and reaches the adapter weights inside
    `fn`) even when `x` comes from frozen layers.
    """

    @staticmethod
    def forward(ctx: Any, fn: nn.Module, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.fn = fn
        ctx.rng_state = torch.get_rng_state()
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.set_rng_state(ctx.rng_state)
            out = ctx.fn(x)
            if out.requires_grad:
                # d/d(out) of sum(out * grad_out) is grad_out, exactly. Not torch.autograd.backward(
                # out, grad_out): given gradients, it imports torch.fx's symbolic shapes and sympy (~33 MB).
                (out * grad_out).sum().backward()
        return None, x.grad if ctx.needs_input_grad[1] else None, None


def recompute(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gradient checkpointing of one block: its activations are recomputed in backward."""
    if not x.requires_grad and not any(p.requires_grad for p in fn.parameters()):
        return fn(x)  # a frozen block on frozen input keeps no activations anyway
    anchor = torch.empty(0, requires_grad=True)
    return _Recompute.apply(fn, x, anchor)


def run_coupled(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    """Reversible blocks as a plain loop, from both streams equal to `h` to their mean: what
    inference runs, and what keeps every block's activations if run with grad."""
    x1, x2 = h, h
    for block in blocks:
        x1, x2 = block.coupled(x1, x2)
    return (x1 + x2) / 2


def _draws_random(blocks: nn.ModuleList) -> bool:
    # Dropout of the blocks (SDPA's reads the same rate) or of their LoRA layers.
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in blocks.modules())


class _Reversible(torch.autograd.Function):
    """`run_coupled(blocks, h)` keeping only the last block's outputs for backward.

    Backward walks the blocks from the last, rebuilding each one's inputs from
    its outputs (x2 = y2 - G(y1), x1 = y1 - F(x2)) and running each branch
    again with grad on detached copies: the input gradients come out, and the
    parameter gradients accumulate as in an ordinary backward. So the
    activations kept grow with nothing but the batch and window; one block's
    are built and freed at a time during backward. The random state before
    each branch is kept when a dropout is active, so the recomputation draws
    the forward's masks. As in `_Recompute`: `(out * grad).sum().backward()`,
    not torch.autograd.backward, which would import sympy; `anchor` requires
    grad so backward runs when `h` comes from frozen layers.
    """

    @staticmethod
    def forward(ctx: Any, blocks: nn.ModuleList, h: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.blocks = blocks
        random = _draws_random(blocks)
        ctx.rng_states = []  # per block: the state before F, then before G
        x1, x2 = h, h
        for block in blocks:  # grad is off inside a Function's forward
            if random:
                ctx.rng_states.append(torch.get_rng_state())
            x1 = x1 + block.attend(x2)
            if random:
                ctx.rng_states.append(torch.get_rng_state())
            x2 = x2 + block.feed_forward(x1)
        ctx.save_for_backward(x1, x2)
        return (x1 + x2) / 2

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        y1, y2 = ctx.saved_tensors
        blocks: nn.ModuleList = ctx.blocks
        # Below the lowest block with trainable weights nothing is left to compute, unless h needs its gradient.
        trainable = [i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())]
        lowest = 0 if ctx.needs_input_grad[1] or not trainable else trainable[0]
        dy1 = dy2 = grad_out / 2
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            for i in range(len(blocks) - 1, lowest - 1, -1):
                block = blocks[i]
                # G(y1), to get x2 back, and the gradient through y2 = x2 + G(y1) into y1 and G's weights.
                y1 = y1.detach().requires_grad_(True)
                if ctx.rng_states:
                    torch.set_rng_state(ctx.rng_states[2 * i + 1])
                g = block.feed_forward(y1)
                (g * dy2).sum().backward()
                assert y1.grad is not None
                dy1 = dy1 + y1.grad
                x2 = (y2 - g.detach()).requires_grad_(True)
                del g
                # F(x2), to get x1 back, and the gradient through y1 = x1 + F(x2) into x2 and F's weights.
                if ctx.rng_states:
                    torch.set_rng_state(ctx.rng_states[2 * i])
                f = block.attend(x2)
                (f * dy1).sum().backward()
                assert x2.grad is not None
                dy2 = dy2 + x2.grad
                y1, y2 = y1.detach() - f.detach(), x2.detach()
                del f
        # Both streams start as h.
        return None, (dy1 + dy2 if ctx.needs_input_grad[1] else None), None


def run_reversible(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    """`run_coupled` for training: backward recomputes the blocks instead of reading kept activations."""
    if not h.requires_grad and not any(p.requires_grad for p in blocks.parameters()):
        return run_coupled(blocks, h)  # frozen blocks on frozen input keep no activations anyway
    anchor = torch.empty(0, requires_grad=True)
    return _Reversible.apply(blocks, h, anchor)


class Forecaster(nn.Module):
    """Next-step forecaster: (B, T, n_inputs) -> (B, T, n_channels), each position's next step;
    `forward_horizons` adds the further horizons: (B, T, H, n_channels)."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_features = cfg.lags * cfg.n_sensors + cfg.n_inputs - cfg.n_sensors
        # The linear path: the change to the next step from the last `lags` steps of every sensor
        # channel and the calendar now.
        self.linear = nn.Linear(n_features, cfg.n_channels)
        self.embed = nn.Linear(cfg.n_inputs, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(1, cfg.window, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_channels)
        # Each further horizon has a linear path and a head of its own on the same features and
        # blocks: a direct forecast, not the next-step one fed back h times.
        self.far_linear = nn.ModuleList(nn.Linear(n_features, cfg.n_channels) for _ in cfg.horizons[1:])
        self.far_head = nn.ModuleList(nn.Linear(cfg.d_model, cfg.n_channels) for _ in cfg.horizons[1:])
        # Recompute each block's activations in backward instead of keeping
        # them; switched by the training plan, ignored outside training. A
        # reversible model ignores it too: its blocks keep nothing to save.
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        nn.init.normal_(self.pos, std=0.02)
        # Both paths start silent: an untrained model is persistence until `set_linear` loads a fit.
        for layer in [self.head, self.linear, *self.far_head, *self.far_linear]:
            nn.init.zeros_(layer.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forecast channels (B, T, C), the linear path's features (B, T, F) and the blocks' output (B, T, d_model)."""
        B, T, width = x.shape
        assert width == self.cfg.n_inputs, f"expected {self.cfg.n_inputs} input columns, got {width}"
        assert T <= self.cfg.window, f"window {T} longer than {self.cfg.window}"
        values, calendar = x[..., : self.cfg.n_sensors], x[..., self.cfg.n_sensors :]  # (B, T, S), (B, T, K)
        features = torch.cat([lag_features(values, self.cfg.lags), calendar], dim=2)  # (B, T, F)
        # Channels relative to the window's first step (causal: every position knows it).
        h = self.embed(torch.cat([values - values[:, :1], calendar], dim=2)) + self.pos[:, :T]  # (B, T, d_model)
        training = self.training and torch.is_grad_enabled()
        if self.cfg.reversible:
            # Reversible blocks recompute everything in backward already: checkpointing has nothing left to save.
            h = run_reversible(self.blocks, h) if training else run_coupled(self.blocks, h)
        else:
            for block in self.blocks:
                h = recompute(block, h) if self.gradient_checkpointing and training else block(h)
        return values[..., : self.cfg.n_channels], features, self.ln_f(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, features, hidden = self._paths(x)
        return values + self.linear(features) + self.head(hidden)  # (B, T, n_channels): prediction of step t+1

    def forward_horizons(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, n_channels): at each position, the forecast of each of `cfg.horizons` steps ahead.

        The further horizons read the blocks but do not train them (their gradient stops at the
        blocks' output): the shared representation is the next step's, whose forecast must not pay
        for a horizon's (measured: equal weights cost the motor's one-step skill 0.40 -> 0.38).
        """
        values, features, hidden = self._paths(x)
        near = values + self.linear(features) + self.head(hidden)
        shared = hidden.detach()
        far = [values + linear(features) + head(shared) for linear, head in zip(self.far_linear, self.far_head, strict=True)]
        return torch.stack([near, *far], dim=2)

    @torch.no_grad()
    def set_linear(self, coef: torch.Tensor, horizon: int = 1) -> None:
        """Load a ridge fit ((lags * S + 1, C) over the S sensor channels: feature weights, then the
        constant) for `horizon` steps ahead into that horizon's linear path."""
        expected = (self.cfg.lags * self.cfg.n_sensors + 1, self.cfg.n_channels)
        assert tuple(coef.shape) == expected, f"ridge coefficients {tuple(coef.shape)}, expected {expected}"
        index = self.cfg.horizons.index(horizon)
        layer = self.linear if index == 0 else self.far_linear[index - 1]
        layer.weight.zero_()  # the calendar's weights start at zero: the ridge model exactly
        layer.weight[:, : expected[0] - 1].copy_(coef[:-1].T)
        layer.bias.copy_(coef[-1])

    def n_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def forecast_loss(model: nn.Module, windows: torch.Tensor, context: int | None = None) -> torch.Tensor:
    """Mean absolute next-step error over the positions of (B, T+1, n_inputs) windows that have
    `context` steps behind them (default: half the window), where the scorer works.

    Absolute, not squared: the daemon serves whichever forecaster has the lowest mean |error|, and
    sensor changes are heavy-tailed (a cloud, a gust, a load switched on), so a squared loss chases
    the rare jumps and pays for it on the many quiet steps (the PV series: skill -0.15 squared, +0.17
    absolute; benchmarks/forecast.py).
    """
    inputs = windows[:, :-1]  # (B, T, n_inputs)
    T = inputs.shape[1]
    first = min(T // 2 if context is None else context, T - 1)
    # A peft wrapper holds the Forecaster (its LoRA layers are inside it, so calling it directly is the same).
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    horizons = inner.cfg.horizons
    # Every horizon h from the positions whose target t + h lies in the window, equally weighted.
    predicted = inner.forward_horizons(inputs)  # (B, T, H, C)
    C = predicted.shape[-1]
    losses = [
        F.l1_loss(predicted[:, first : T - h + 1, i], windows[:, first + h : T + 1, :C])
        for i, h in enumerate(horizons)
        if first <= T - h
    ]
    return torch.stack(losses).mean()


def anomaly_score(residual: torch.Tensor, residual_scale: torch.Tensor) -> torch.Tensor:
    """RMS over channels of the residual divided by its typical size: ~1 normal, >>1 anomalous.

    residual: (..., C) forecast minus actual, normalised units; residual_scale: (C,).
    """
    z = residual / residual_scale.clamp_min(1e-6)
    return torch.sqrt((z * z).mean(dim=-1))


def lora_scale(alpha: float, r: int) -> float:
    return alpha / r if r else 0.0


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def warm_up() -> None:
    """Run once, on a tiny model, the kernels a forecast runs.

    torch sets much of itself up on first use (allocator, kernels, dispatch);
    measured on the default model, a fresh process's first forward makes ~20 MB
    of pages its own. Run before the training helper forks (daemon.py), that
    state lies in pages the daemon, the helper and every worker share, instead
    of one copy in the daemon and another in each worker.
    """
    cfg = ForecasterConfig(n_channels=2, window=8, d_model=8, n_heads=2, n_layers=1, d_ff=8, lags=2, calendar_s=(86400.0,), horizons=(1, 2), n_covariates=1)
    model = Forecaster(cfg).eval()
    with torch.inference_mode():
        model.forward_horizons(torch.zeros(2, cfg.window, cfg.n_inputs))


def _check() -> None:  # pragma: no cover - documentation of the default size
    m = Forecaster(ForecasterConfig(n_channels=3))
    assert 5e4 < m.n_params() < 2e5, m.n_params()
    assert math.isfinite(float(forecast_loss(m, torch.randn(2, 65, 3))))
