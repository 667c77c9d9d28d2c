"""Helpers every optimizer module of the package shares: argument checks, step counters.

The ranges of the hyper-parameters every optimizer of the suite has (:data:`RANGES`) are
stated here and nowhere else: the optimizer classes check their own arguments with
:func:`check_hyperparameters`, and lehi.optim's config builder holds torch's own classes to
the same ranges (theirs admit lr = 0 or inf) through the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "COUNTERS",
    "RANGES",
    "HyperparameterError",
    "add_optional",
    "bias_corrections",
    "check_hyperparameters",
    "increment",
]

#: Per-parameter state entries that count steps. They stay float32 on the CPU whatever the
#: parameter dtype (torch.optim casts every other entry to it on load, and a bf16 counter
#: stalls at 256: 256 + 1 rounds back to 256).
COUNTERS = ("step", "curvature_step")


class HyperparameterError(ValueError):
    """A hyper-parameter outside its range: torch.optim's ValueError naming the argument,
    which keeps the argument, value and allowed range so a config layer can say its key."""

    def __init__(self, argument: str, value: Any, allowed: str) -> None:
        super().__init__(f"{argument} must be {allowed}, got {value!r}")
        self.argument, self.value, self.allowed = argument, value, allowed


def _finite_at_least(bound: float) -> Callable[[Any], bool]:
    return lambda v: math.isfinite(v) and v >= bound


#: Hyper-parameter → (whether a value is allowed, what is allowed). A tensor lr is torch's
#: (capturable CUDA steps); its value is not checked, as torch.optim does not.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (
        lambda v: isinstance(v, Tensor) or (math.isfinite(v) and v > 0.0),
        "a finite number > 0",
    ),
    "betas": (
        lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v),
        "two numbers in [0, 1) (β1, β2)",
    ),
    "eps": (_finite_at_least(0.0), "a finite number >= 0"),
    "weight_decay": (_finite_at_least(0.0), "a finite number >= 0"),
    "hessian_every": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "an integer >= 1",
    ),
}


def check_hyperparameters(**values: Any) -> None:
    """Raise a :class:`HyperparameterError` for the first of ``values`` (names of
    :data:`RANGES`) outside its range."""
    for argument, value in values.items():
        allowed, allowed_text = RANGES[argument]
        if not allowed(value):
            raise HyperparameterError(argument, value, allowed_text)


def increment(counters: list[Tensor]) -> None:
    """counters += 1 (they live on the CPU: :data:`COUNTERS`), with one wrapped 1.0 for all,
    as torch.optim.Adam does: ``_foreach_add_(counters, 1)`` would wrap it for every tensor."""
    torch._foreach_add_(counters, torch.tensor(1.0), alpha=1.0)


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
