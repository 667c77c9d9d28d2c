"""Optimizers of the suite and the registry the trainer builds them from.

``lehi``, ``lehibrid`` and ``sophia`` are this package's curvature-aware optimizers; ``adam``
and ``adamw`` are torch.optim's own classes, not re-implementations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lehi.optim.base import CurvatureOptimizer
from lehi.optim.lehi import LEHI, LEHIBrid
from lehi.optim.sophia import SophiaG

__all__ = [
    "LEHI",
    "OPTIMIZERS",
    "CurvatureOptimizer",
    "LEHIBrid",
    "SophiaG",
    "backward",
    "build_optimizer",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "lehi": LEHI,
    "lehibrid": LEHIBrid,
    "sophia": SophiaG,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(
    name: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **cfg: Any
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` with hyper-parameters ``cfg``.

    ``loss`` (the loss whose Hessian is imitated), ``ignore_index``, ``sampler`` and ``seed``
    are accepted for every optimizer and passed on only to the curvature-aware ones, so one
    config drives all five.
    """
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        known = ", ".join(OPTIMIZERS)
        raise ValueError(f"optimizer={name!r} is not one of {known}") from None
    if not issubclass(cls, CurvatureOptimizer):
        for key in ("loss", "ignore_index", "sampler", "seed"):
            cfg.pop(key, None)
        lr = cfg.get("lr", 1e-3)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return cls(params, **cfg)


def backward(
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    outputs: Tensor,
    targets: Tensor,
    **kwargs: Any,
) -> None:
    """The trainer's one call: ∇loss into ``.grad``, plus curvature when the optimizer wants it."""
    if isinstance(optimizer, CurvatureOptimizer):
        optimizer.backward(loss, outputs, targets, **kwargs)
    else:
        loss.backward()
