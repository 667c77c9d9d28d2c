"""What the trainer keeps while it runs between rows: the logging window and the progress bar."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LossWindow", "progress_bar"]


class LossWindow:
    """The running sums of the current training-loss logging window (checkpointed)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.terms = 0

    def add(
        self, loss: Tensor, correct: Tensor | None, batches: list[tuple[Tensor, Tensor]]
    ) -> None:
        self.loss += loss
        self.steps += 1
        if correct is not None:
            self.correct += correct
            self.terms += sum(b[1].numel() for b in batches)

    def reset(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.steps = self.terms = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.item(),
            "correct": self.correct.item(),
            "steps": self.steps,
            "terms": self.terms,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.fill_(float(state["loss"]))
        self.correct.fill_(float(state["correct"]))
        self.steps = int(state["steps"])
        self.terms = int(state["terms"])


def progress_bar(
    total: int, start: int, enabled: bool
) -> Callable[[int | None, float | None], None]:
    """A tqdm bar (loss, steps/s) when enabled; a no-op otherwise."""
    if not enabled:
        return lambda step, loss: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, dynamic_ncols=True, file=sys.stderr, unit="step")
    last = [start]

    def update(step: int | None, loss: float | None) -> None:
        if step is None:
            bar.close()
            return
        bar.update(step - last[0])
        last[0] = step
        bar.set_postfix(loss=f"{loss:.4f}")

    return update
