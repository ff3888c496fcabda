"""The gradient scale of a loss term over the global batch, where it is defined: on 2 ranks, a
term computed across the group and scaled by `global_term_scale(group)`, after the engines'
average of the gradients over ranks, has the gradient of the same term on the whole batch in one
process; a term over each rank's own batch (group None) is averaged unscaled."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from massl.loss import koleo_loss
from massl.objective import global_term_scale  # where the scale is defined
from tests.distributed import run_ranks

WORLD, ROWS, DIM = 2, 5, 6


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * ROWS, DIM, generator=g), torch.randn(DIM, DIM, generator=g)


def _rank_gradients(rank: int, world: int) -> dict:
    """This rank's averaged gradient of a shared weight, through a global and a local KoLeo term."""
    x, w0 = _inputs()
    out = {}
    for scope, group in (("global", dist.group.WORLD), ("local", None)):
        w = w0.clone().requires_grad_()
        term = koleo_loss(x[rank * ROWS:(rank + 1) * ROWS] @ w, group)
        (term * global_term_scale(group)).backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)  # what the engines do: the mean over ranks
        out[scope] = grad / world
    return out


@pytest.mark.slow  # two processes that import the training loop: ~25 s on 2 cores
def test_global_term_scale_gives_the_single_process_gradient():
    assert global_term_scale(None) == 1.0
    x, w0 = _inputs()
    w = w0.clone().requires_grad_()
    whole = torch.autograd.grad(koleo_loss(x @ w), w)[0]  # the global batch in one process
    w = w0.clone().requires_grad_()
    local = sum(torch.autograd.grad(koleo_loss(x[r * ROWS:(r + 1) * ROWS] @ w), w)[0] for r in range(WORLD)) / WORLD
    for result in run_ranks(_rank_gradients, WORLD, timeout=240):
        assert torch.allclose(result["global"], whole, rtol=1e-4, atol=1e-6)
        assert torch.allclose(result["local"], local, rtol=1e-4, atol=1e-6)
