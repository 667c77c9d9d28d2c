"""Tiny problems for the optimizer tests, and the trainer's step in a plain loop."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lehi.optim import backward

Batch = tuple[Tensor, Tensor]


def tiny_mlp(
    seed: int = 0,
    *,
    d_in: int = 6,
    hidden: int = 12,
    d_out: int = 4,
    activation: type[nn.Module] = nn.Tanh,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """An MLP d_in-hidden-d_out (tanh by default), initialised on the CPU from ``seed`` (so
    every device and every optimizer under comparison starts from the same weights)."""
    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(d_in, hidden), activation(), nn.Linear(hidden, d_out))
    return layers.to(dtype)


def batches(
    n_steps: int, n: int = 16, *, d_in: int = 6, classes: int = 4, seed: int = 1
) -> list[Batch]:
    """``n_steps`` classification batches of ``n`` Gaussian inputs with uniform labels."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g))
        for _ in range(n_steps)
    ]


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> list[float]:
    """The trainer's step (one forward, lehi.optim.backward, step) on the model's device;
    returns the training losses."""
    device = next(model.parameters()).device
    losses = []
    for x, y in data:
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        backward(opt, loss, out, y)
        opt.step()
        losses.append(loss.item())
    return losses


@functools.cache
def compile_works() -> bool:
    """Whether torch.compile can build a kernel here (on CPU it needs a C++ compiler)."""
    try:
        fn = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
        return bool(torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0)))
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False
