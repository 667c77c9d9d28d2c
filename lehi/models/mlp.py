"""Multi-layer perceptron for flat-feature datasets (digits, MNIST, protein).

Paper configurations: digits 64-128-128-10, MNIST 784-256-256-10, protein 9-256-256-1,
all with ReLU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Linear → activation → … → Linear. Inputs of any trailing shape are flattened."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {activation!r} is unknown; allowed: {sorted(ACTIVATIONS)}"
            )
        widths = [in_features, *[int(h) for h in hidden], out_features]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:  # no activation after the output layer
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *input_shape) → (N, out_features)."""
        return self.net(x.flatten(1))


def build(
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    flatten: bool = True,
) -> MLP:
    """MLP sized for a dataset. ``flatten=False`` insists on 1-D feature inputs."""
    if len(input_shape) == 0:
        raise ValueError(
            f"model 'mlp' does not fit input_shape {input_shape}: it needs feature inputs, "
            "not token ids (use 'lstm' or 'llama')"
        )
    if not flatten and len(input_shape) != 1:
        raise ValueError(
            f"model 'mlp' does not fit input_shape {input_shape}: with flatten=False it needs "
            "1-D features; pass flatten=True or use 'cnn'/'resnet18'"
        )
    return MLP(math.prod(input_shape), hidden, num_outputs, activation)
