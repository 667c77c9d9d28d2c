"""A dataset's metric from its mean loss: the one definition the trainer and diagnostics use."""

from __future__ import annotations

import math

__all__ = ["METRICS", "metric_value"]

METRICS = ("accuracy", "perplexity", "rmse")


def metric_value(
    metric: str, mean_loss: float, correct: float | None, terms: int, target_std: float = 1.0
) -> float:
    """accuracy = correct / terms; perplexity = exp(loss); RMSE = sqrt(MSE) in target units."""
    if metric == "accuracy":
        return float(correct or 0.0) / max(terms, 1)
    if metric == "perplexity":
        return math.exp(min(mean_loss, 700.0))
    if metric == "rmse":
        return math.sqrt(max(mean_loss, 0.0)) * target_std
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
