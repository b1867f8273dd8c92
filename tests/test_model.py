"""The forecaster: persistence plus a linear and a transformer path; attention causal and
memory-efficient (no T x T matrix kept for backward)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_daemon.baselines import fit_ridge
from edge_daemon.model import CausalSelfAttention, Forecaster, ForecasterConfig, forecast_loss

WINDOW = 256


def _saved_shapes(module: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd keeps for backward during one training forward."""
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return shapes


def test_training_keeps_no_t_by_t_attention_matrix() -> None:
    """Fused attention keeps O(T) per head for backward; an explicit softmax keeps T x T."""
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=3, window=WINDOW))
    shapes = _saved_shapes(model, torch.randn(2, WINDOW, 3))
    assert shapes, "the hook saw nothing: the check would prove nothing"
    square = [s for s in shapes if len(s) >= 2 and s[-1] == WINDOW and s[-2] == WINDOW]
    assert not square, f"T x T tensors saved for backward: {square}"
    # What the model does keep grows linearly with the window.
    largest = max(math.prod(s) for s in shapes)
    assert largest <= 2 * WINDOW * model.cfg.d_ff, largest


def test_attention_is_causal_and_matches_the_textbook_formula() -> None:
    torch.manual_seed(0)
    cfg = ForecasterConfig(n_channels=3, window=32, d_model=32, n_heads=4)
    attn = CausalSelfAttention(cfg).eval()
    x = torch.randn(2, 32, cfg.d_model)
    with torch.no_grad():
        y = attn(x)
        # Reference: softmax(q k^T / sqrt(d) + causal mask) v, then the output projection.
        q, k, v = attn.qkv(x).split(cfg.d_model, dim=2)
        heads = lambda t: t.view(2, 32, cfg.n_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf"))
        expected = attn.proj((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(2, 32, cfg.d_model))
        assert torch.allclose(y, expected, atol=1e-5)
        # A change at step 20 changes nothing before it.
        changed = x.clone()
        changed[:, 20] += 1.0
        z = attn(changed)
        assert torch.allclose(z[:, :20], y[:, :20], atol=1e-6) and not torch.allclose(z[:, 20:], y[:, 20:])


def _ar_series(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) coupled autoregressive channels: a ridge fit has something to find."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 2))
    for t in range(2, n):
        x[t, 0] = 1.6 * x[t - 1, 0] - 0.8 * x[t - 2, 0] + rng.normal(0, 0.1)
        x[t, 1] = 0.5 * x[t - 1, 1] + 0.4 * x[t - 1, 0] + rng.normal(0, 0.1)
    return x


def test_an_untrained_model_forecasts_persistence() -> None:
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=3, window=32)).eval()
    x = torch.randn(4, 32, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x, rtol=0, atol=0)


def test_a_ridge_fit_loaded_into_the_linear_path_forecasts_like_the_ridge_baseline() -> None:
    cfg = ForecasterConfig(n_channels=2, window=24, d_model=16, n_heads=2, n_layers=1, d_ff=32, lags=8)
    series = _ar_series(3000)
    windows = np.lib.stride_tricks.sliding_window_view(series, 25, axis=0).transpose(0, 2, 1).copy()  # (N, 25, 2)
    ridge = fit_ridge(windows, cfg.lags)
    assert ridge is not None and np.abs(ridge.coef).max() > 0.1  # a fit with content, not persistence
    model = Forecaster(cfg).eval()
    model.set_linear(torch.as_tensor(ridge.coef, dtype=torch.float32))
    history = windows[-50:, :-1]  # (50, 24, 2)
    with torch.no_grad():
        forecast = model(torch.as_tensor(history, dtype=torch.float32))[:, -1].numpy()
    expected = np.stack([ridge.predict(h) for h in history])
    np.testing.assert_allclose(forecast, expected, atol=1e-4)


def test_the_transformer_path_sees_the_window_relative_to_its_first_step() -> None:
    """A level shift of the whole window shifts the forecast by the same amount when the
    linear path is silent: the transformer sees nothing of it."""
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=3, window=16, d_model=16, n_heads=2, n_layers=2, d_ff=32)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a transformer path that does something
    x = torch.randn(2, 16, 3)
    with torch.no_grad():
        y = model(x)
        assert not torch.allclose(y, x, atol=1e-3)
        torch.testing.assert_close(model(x + 5.0), y + 5.0, rtol=0, atol=1e-5)


def test_the_loss_counts_only_positions_with_half_a_window_of_context() -> None:
    model = Forecaster(ForecasterConfig(n_channels=3, window=16)).eval()  # untrained: persistence
    windows = torch.randn(2, 17, 3)
    with torch.no_grad():
        # Positions 0..7 have less than half a window behind them; only 8..15 count.
        torch.testing.assert_close(forecast_loss(model, windows), F.l1_loss(windows[:, 8:-1], windows[:, 9:]))
        torch.testing.assert_close(forecast_loss(model, windows, context=0), F.l1_loss(windows[:, :-1], windows[:, 1:]))


def test_further_horizons_start_as_persistence_and_load_direct_ridge_fits() -> None:
    cfg = ForecasterConfig(n_channels=2, window=24, d_model=16, n_heads=2, n_layers=1, d_ff=32, lags=8, horizons=(1, 4))
    model = Forecaster(cfg).eval()
    x = torch.randn(3, 24, 2)
    with torch.no_grad():
        every = model.forward_horizons(x)
        assert every.shape == (3, 24, 2, 2)
        torch.testing.assert_close(every[:, :, 1], x, rtol=0, atol=0)  # persistence at every horizon
        torch.testing.assert_close(every[:, :, 0], model(x))
    series = _ar_series(3000)
    windows = np.lib.stride_tricks.sliding_window_view(series, 25, axis=0).transpose(0, 2, 1).copy()  # (N, 25, 2)
    ridge = fit_ridge(windows, cfg.lags, horizons=cfg.horizons)
    assert ridge is not None and set(ridge.ahead) == {4}
    model.set_linear(torch.as_tensor(ridge.ahead[4], dtype=torch.float32), horizon=4)
    history = windows[-50:, :-1]
    with torch.no_grad():
        forecast = model.forward_horizons(torch.as_tensor(history, dtype=torch.float32))[:, -1, 1].numpy()
    np.testing.assert_allclose(forecast, np.stack([ridge.predict_ahead(h, 4) for h in history]), atol=1e-4)


def test_the_loss_weighs_every_horizon_on_the_positions_whose_target_is_in_the_window() -> None:
    model = Forecaster(ForecasterConfig(n_channels=3, window=16, horizons=(1, 8))).eval()  # untrained: persistence
    windows = torch.randn(2, 17, 3)
    with torch.no_grad():
        one = F.l1_loss(windows[:, 8:-1], windows[:, 9:])
        eight = F.l1_loss(windows[:, 8:9], windows[:, 16:17])  # position 8 predicts 16, the last step
        torch.testing.assert_close(forecast_loss(model, windows), (one + eight) / 2)


def test_further_horizons_do_not_train_the_shared_blocks() -> None:
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=2, window=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, horizons=(1, 4)))
    for layer in (model.head, model.far_head[0]):
        torch.nn.init.normal_(layer.weight, std=0.1)  # heads that pass a gradient back
    model.forward_horizons(torch.randn(2, 16, 2))[:, :, 1].pow(2).sum().backward()
    assert model.far_head[0].weight.grad is not None and model.far_head[0].weight.grad.abs().sum() > 0
    # (The next step's slice of the stack passes back zeros: no gradient, or a zero one.)
    assert all(p.grad is None or not p.grad.any() for p in [*model.blocks.parameters(), model.embed.weight])
    model.zero_grad(set_to_none=True)
    model.forward_horizons(torch.randn(2, 16, 2))[:, :, 0].pow(2).sum().backward()  # the next step does
    assert model.blocks[0].fc1.weight.grad is not None and model.blocks[0].fc1.weight.grad.any()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recomputed_blocks_give_the_same_loss_and_gradients(dropout: float) -> None:
    """Checkpointing replays each block in backward: same loss and gradients as keeping its
    activations (dropout masks drawn again from the same random state), also for a block whose
    input comes from frozen layers only."""

    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(n_channels=3, window=16, d_model=16, n_heads=2, n_layers=3, d_ff=32, dropout=dropout))
    model.train()
    model.requires_grad_(False)
    for p in model.blocks[2].parameters():  # only the last block trains: its input needs no grad
        p.requires_grad_(True)
    x = torch.randn(4, 17, 3)
    results = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        loss = forecast_loss(model, x)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (plain_loss, plain), (ckpt_loss, ckpt) = results
    assert ckpt_loss == plain_loss
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.blocks[2].parameters()))
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
