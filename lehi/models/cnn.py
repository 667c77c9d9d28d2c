"""Small CIFAR CNN: the CPU stand-in for ResNet-18 in the ``cifar10`` small preset.

    block 1: conv3x3(3→32)  BN GELU, conv3x3(32→32) BN GELU, max-pool 2   32×32 → 16×16
    block 2: conv3x3(32→64) BN GELU,                          max-pool 2   16×16 → 8×8
    block 3: conv3x3(64→128) BN GELU,                         max-pool 2    8×8 → 4×4
    global average pool → linear(128 → 10)

Convolutions carry no bias (the BatchNorm shift replaces it). The second convolution in
block 1 brings the count to the ~0.11M of docs/experiments.md; for 3 input channels and 10
classes the exact count is 104,042:
    convs 864 + 9,216 + 18,432 + 73,728 = 102,240; BN (γ, β) 64 + 64 + 128 + 256 = 512;
    linear 128·10 + 10 = 1,290.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn_gelu(c_in: int, c_out: int) -> list[nn.Module]:
    """3×3 same-padding convolution, BatchNorm, GELU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class SmallCNN(nn.Module):
    """Three conv blocks, each halving the resolution, then GAP and a linear classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: Sequence[int] = (32, 64, 128)
    ) -> None:
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.features = nn.Sequential(
            *conv_bn_gelu(in_channels, c1), *conv_bn_gelu(c1, c1), nn.MaxPool2d(2),
            *conv_bn_gelu(c1, c2), nn.MaxPool2d(2),
            *conv_bn_gelu(c2, c3), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, num_classes)."""
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(
    input_shape: tuple[int, ...], num_outputs: int, channels: Sequence[int] = (32, 64, 128)
) -> SmallCNN:
    """SmallCNN for image inputs (C, H, W) with H, W ≥ 8 (three 2× poolings)."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 8:
        raise ValueError(
            f"model 'cnn' does not fit input_shape {tuple(input_shape)}: it needs images "
            "(C, H, W) with H, W >= 8"
        )
    if len(channels) != 3:
        raise ValueError(f"cnn channels {list(channels)} must list 3 widths, e.g. [32, 64, 128]")
    return SmallCNN(input_shape[0], num_outputs, channels)
