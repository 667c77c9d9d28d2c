"""LSTM language model of Zaremba, Sutskever & Vinyals (2014), "Recurrent Neural Network
Regularization", trained with truncated backpropagation through time.

    tokens (B, T) → embedding → dropout → n-layer LSTM (dropout between layers) → dropout
                  → linear → logits (B, T, V)

Dropout sits only on non-recurrent connections, as in the paper. With ``tied=True`` the
output layer reuses the embedding matrix (Press & Wolf 2017), which needs embed_dim == hidden.
All weights start uniform(-init_range, init_range).

Truncated BPTT: with ``stateful=True`` the model carries its (h, c) from one forward call to
the next, detached so gradients stop at the window boundary. The trainer calls
``reset_state()`` at each epoch start and before evaluation. Training and evaluation keep
separate states (keyed by ``self.training``) so an evaluation never leaks validation context
into training; a change of batch size or device starts from zeros.

Presets: small = 2×200, no dropout, untied (Zaremba "small", our CPU preset);
medium = 2×650, dropout 0.5, tied (Zaremba "medium" plus tying).
"""

from __future__ import annotations

import torch
from torch import nn

from lehi.models.stateful import StatefulModel

PRESETS: dict[str, dict] = {
    "small": {"hidden": 200, "num_layers": 2, "dropout": 0.0, "tied": False},
    "medium": {"hidden": 650, "num_layers": 2, "dropout": 0.5, "tied": True},
}

State = tuple[torch.Tensor, torch.Tensor]


class LSTMLM(StatefulModel):
    """Word-level LSTM language model; forward maps (B, T) token ids to (B, T, V) logits."""

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 200,
        num_layers: int = 2,
        dropout: float = 0.0,
        tied: bool = False,
        embed_dim: int | None = None,
        stateful: bool = True,
        init_range: float = 0.1,
    ) -> None:
        super().__init__()
        embed_dim = hidden if embed_dim is None else embed_dim
        if tied and embed_dim != hidden:
            raise ValueError(
                f"lstm tied=True needs embed_dim == hidden, got {embed_dim} != {hidden}"
            )
        self.stateful = stateful
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        # nn.LSTM's own dropout acts between stacked layers only.
        self.rnn = nn.LSTM(
            embed_dim,
            hidden,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden, vocab_size)
        if tied:
            self.head.weight = self.embed.weight
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)
        self._state: dict[bool, State | None] = {True: None, False: None}

    def reset_state(self, training: bool | None = None) -> None:
        """Forget the carried (h, c) of training mode, evaluation mode, or (None) both."""
        for mode in (True, False) if training is None else (training,):
            self._state[mode] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 → (B, T, V) logits, continuing from the carried state when stateful."""
        state = self._state[self.training] if self.stateful else None
        if state is not None and (state[0].shape[1] != x.shape[0] or state[0].device != x.device):
            state = None  # batch size or device changed: the old state does not fit
        out, (h, c) = self.rnn(self.drop(self.embed(x)), state)
        if self.stateful:
            self._state[self.training] = (h.detach(), c.detach())
        return self.head(self.drop(out))


def build(
    input_shape: tuple[int, ...],
    num_outputs: int,
    size: str = "small",
    hidden: int | None = None,
    num_layers: int | None = None,
    dropout: float | None = None,
    tied: bool | None = None,
    embed_dim: int | None = None,
    stateful: bool = True,
    init_range: float = 0.1,
) -> LSTMLM:
    """LSTMLM from a preset (``size``); any of hidden/num_layers/dropout/tied overrides it."""
    if tuple(input_shape) != ():
        raise ValueError(
            f"model 'lstm' does not fit input_shape {tuple(input_shape)}: it needs a token "
            "dataset (input_shape ())"
        )
    if size not in PRESETS:
        raise ValueError(f"lstm size {size!r} is unknown; allowed: {sorted(PRESETS)}")
    overrides = {"hidden": hidden, "num_layers": num_layers, "dropout": dropout, "tied": tied}
    cfg = {**PRESETS[size], **{k: v for k, v in overrides.items() if v is not None}}
    return LSTMLM(num_outputs, **cfg, embed_dim=embed_dim, stateful=stateful, init_range=init_range)
