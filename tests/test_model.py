"""The forecaster's attention: causal, and memory-efficient (no T x T matrix kept for backward)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edge_daemon.model import CausalSelfAttention, Forecaster, ForecasterConfig

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
