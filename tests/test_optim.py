"""The trainer's own AdamW, held to torch.optim.AdamW step for step."""

from __future__ import annotations

import pytest
import torch

from edge_daemon.training.optimizer import AdamW


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_same_weights_as_torch_adamw(weight_decay: float) -> None:
    torch.manual_seed(0)
    start = [torch.randn(4, 8), torch.randn(8), torch.randn(3, 4)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    opt_ours = AdamW(ours, lr=3e-3, weight_decay=weight_decay)
    opt_theirs = torch.optim.AdamW(theirs, lr=3e-3, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        grads = [torch.randn(t.shape, generator=g) for t in start]
        for params in (ours, theirs):
            for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
                # One parameter sits a step out now and then: both skip what has no gradient.
                p.grad = None if (i == 2 and step % 5 == 0) else grad.clone()
        opt_ours.step()
        opt_theirs.step()
        opt_ours.zero_grad()
        opt_theirs.zero_grad(set_to_none=True)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        assert a.grad is None
    assert int(opt_ours.state[ours[2]]["step"]) == 20 and float(opt_theirs.state[theirs[2]]["step"]) == 20


def test_bad_settings_are_refused() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=-1.0)
