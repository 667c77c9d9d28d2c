"""On-device augmentation of whole image batches (used for CIFAR-10 training)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class RandomCropFlip:
    """Random crop after `padding` px of padding on each side, then a horizontal flip with p=1/2.

    The same transform as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, done
    for a whole (B, C, H, W) batch at once on its device. The padding takes the per-channel
    value `fill`: for normalised images pass (0 - mean) / std so the pad is black, exactly as
    when the crop is applied to the raw image before normalisation. Offsets and flips are drawn
    on the CPU from `generator`, so the result does not depend on the device.
    """

    def __init__(self, padding: int = 4, fill: Sequence[float] | float = 0.0) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding
        self.fill = tuple(fill) if isinstance(fill, Sequence) else (float(fill),)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        p = self.padding
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        dev = x.device
        fill = torch.tensor(self.fill, dtype=x.dtype, device=dev)
        if fill.numel() not in (1, c):
            raise ValueError(f"fill has {fill.numel()} values for {c} channels")
        padded = fill.view(1, -1, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        rows = offsets[0].to(dev)[:, None] + torch.arange(h, device=dev)
        cols = offsets[1].to(dev)[:, None] + torch.arange(w, device=dev)
        # a horizontal flip of the crop is the crop's columns in reverse order
        cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
