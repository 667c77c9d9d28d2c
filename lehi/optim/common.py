"""Helpers every optimizer module of the package shares: argument checks, step counters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "COUNTERS",
    "add_optional",
    "bias_corrections",
    "check_hyperparameters",
    "increment",
]

#: Per-parameter state entries that count steps. They stay float32 on the CPU whatever the
#: parameter dtype (torch.optim casts every other entry to it on load, and a bf16 counter
#: stalls at 256: 256 + 1 rounds back to 256).
COUNTERS = ("step", "curvature_step")


def check_hyperparameters(
    *, lr: float, betas: Sequence[float], eps: float, weight_decay: float, hessian_every: int
) -> None:
    """Raise a ValueError naming the first hyper-parameter outside its allowed range."""
    if not (isinstance(lr, Tensor) or (math.isfinite(lr) and lr > 0.0)):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if len(betas) != 2:
        raise ValueError(f"betas must have exactly two entries (β1, β2), got {list(betas)}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(hessian_every, int) and hessian_every >= 1):
        raise ValueError(f"hessian_every must be an integer >= 1, got {hessian_every!r}")


def increment(counters: list[Tensor]) -> None:
    """counters += 1. For CPU counters one wrapped 1.0 for all, as torch.optim.Adam does:
    ``_foreach_add_(counters, 1)`` would wrap the scalar again for every tensor."""
    if counters[0].is_cpu:
        torch._foreach_add_(counters, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(counters, 1)


def bias_corrections(beta: float, steps: Sequence[Tensor], enabled: bool = True) -> list[float]:
    """1 − β^t for each step counter (1.0 everywhere when bias correction is off)."""
    if not enabled:
        return [1.0] * len(steps)
    return [1.0 - beta ** float(s) for s in steps]


def add_optional(total: Tensor | None, a: Tensor | None) -> Tensor | None:
    """total + a where either may be None (a parameter without an auxiliary gradient)."""
    if total is None:
        return a
    return total if a is None else total.add_(a)
