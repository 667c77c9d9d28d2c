"""The early stop: when a run has blown up and training stops, and how far it strayed when not.

Training stops as ``diverged`` when (README, "Divergence"):

- ``non_finite``: a training-loss window, a validation loss or the weights are not finite;
- ``held_above_factor``: every training-loss window of a whole evaluation interval stayed
  above ``factor`` × the initial training loss (the first step's loss).

These are the only judgements made while training, because they cut it short. Whatever the
finished rows decide (``no_progress``: ending above the initial validation loss; whether a
run trained) is judged by lehi.results from metrics.csv, so changing such a rule never
changes a run. A spike that recovers within the interval is not divergence; its size, the
largest ratio of a training-loss window to the initial loss, is recorded as ``max_spike``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DivergenceMonitor"]


class DivergenceMonitor:
    """Watches the training-loss windows and evaluations of one run."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.initial_loss: float | None = None
        self.max_spike = 1.0
        self._windows = 0  # training-loss windows since the last evaluation
        self._all_above = True

    def first_loss(self, loss: float) -> None:
        if self.initial_loss is None:
            self.initial_loss = loss

    def train_window(self, mean_loss: float) -> str | None:
        """A logged training-loss window; "non_finite" when it is not finite."""
        if not math.isfinite(mean_loss):
            return "non_finite"
        ratio = mean_loss / max(self.initial_loss or 0.0, 1e-12)
        self.max_spike = max(self.max_spike, ratio)
        self._windows += 1
        self._all_above = self._all_above and ratio > self.factor
        return None

    def evaluation(self, val_loss: float) -> str | None:
        """An evaluation closes an interval: the reason it diverged, or None."""
        held = self._windows > 0 and self._all_above
        self._windows, self._all_above = 0, True
        if not math.isfinite(val_loss):
            return "non_finite"
        return "held_above_factor" if held else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_loss": self.initial_loss,
            "max_spike": self.max_spike,
            "windows": self._windows,
            "all_above": self._all_above,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_loss = state["initial_loss"]
        self.max_spike = float(state["max_spike"])
        self._windows = int(state["windows"])
        self._all_above = bool(state["all_above"])
