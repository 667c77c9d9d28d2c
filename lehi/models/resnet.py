"""ResNet-18 with the CIFAR stem (He et al. 2016; the common CIFAR variant).

The ImageNet stem (7×7 stride-2 conv + max-pool) would shrink a 32×32 image to 8×8 before
the first block; the CIFAR stem is a single 3×3 stride-1 conv and no pool. Stages of
BasicBlocks [2, 2, 2, 2] with widths 64-128-256-512 (``width`` scales them, for tests);
global average pool, linear classifier. 11,173,962 parameters for CIFAR-10.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # shapes differ: project the shortcut
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR stem."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        c_in = width
        for i in range(4):
            c_out = width * 2**i
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, num_classes)."""
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def build(input_shape: tuple[int, ...], num_outputs: int, width: int = 64) -> ResNet18:
    """ResNet-18 for image inputs (C, H, W)."""
    if len(input_shape) != 3:
        raise ValueError(
            f"model 'resnet18' does not fit input_shape {tuple(input_shape)}: it needs images (C, H, W)"
        )
    return ResNet18(input_shape[0], num_outputs, width)
