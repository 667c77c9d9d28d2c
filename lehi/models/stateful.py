"""Models that carry state from one batch to the next (truncated BPTT)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

__all__ = ["StatefulModel"]


class StatefulModel(nn.Module, ABC):
    """A model whose forward continues from the previous call; the trainer resets it at the
    start of every epoch (and evaluation keeps a state of its own)."""

    @abstractmethod
    def reset_state(self, training: bool | None = None) -> None:
        """Forget the carried state: of training mode, of evaluation mode, or (None) both."""
