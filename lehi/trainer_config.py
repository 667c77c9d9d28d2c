"""The trainer's settings: budget, evaluation schedule, learning-rate schedule, checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lehi.config import ConfigError, check_call

__all__ = ["TrainerConfig", "evaluation_steps", "lr_lambda"]


@dataclass(frozen=True)
class TrainerConfig:
    """The ``trainer`` section of the config; conf/trainer/default.yaml holds every default
    and documents each key. The field types are the section's schema (lehi.config)."""

    device: str
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool
    threads: int | None
    epochs: int | None
    max_steps: int | None
    grad_accum: int
    eval_every: int | None
    evaluations: int | None
    log_every: int
    grad_clip: float | None
    schedule: Literal["constant", "cosine"]
    warmup_fraction: float
    min_lr_ratio: float
    divergence_factor: float
    checkpoint: bool
    resume: bool | Literal["auto"]
    force: bool
    progress: bool | Literal["auto"]
    keep_checkpoint: bool
    # Defaults only for keys that a config recorded before they existed may lack (lehi.rerun).
    eval_subset_batches: int | None = None
    stop_after_evaluations: int | None = None

    @classmethod
    def from_config(cls, section: Mapping[str, Any], **overrides: Any) -> TrainerConfig:
        """Check the section (types, ranges, unknown keys) and build it; ConfigError if bad."""
        values = {**section, **overrides}
        check_call(cls, values, "trainer")
        if values["epochs"] is None and values["max_steps"] is None:
            raise ConfigError("trainer.epochs or trainer.max_steps must be set (a budget > 0)")
        return cls(**values)


def lr_lambda(
    schedule: str, total_steps: int, warmup_fraction: float, min_lr_ratio: float
) -> Callable[[int], float]:
    """The LR multiplier after ``step`` steps: constant, or linear warm-up then cosine."""
    warmup = int(round(warmup_fraction * total_steps))

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def evaluation_steps(total: int, steps_per_epoch: int, config: TrainerConfig) -> frozenset[int]:
    """The steps after which the trainer evaluates; the last step always evaluates.

    ``evaluations`` spreads that many evenly over the budget; otherwise every ``eval_every``
    steps, by default once per epoch.
    """
    if config.evaluations is not None:
        n = min(config.evaluations, total)
        return frozenset(round(k * total / n) for k in range(1, n + 1))
    every = config.eval_every or steps_per_epoch
    return frozenset([*range(every, total + 1, every), total])
