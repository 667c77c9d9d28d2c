"""The diagnostic-size models the Hessian-imitation study trains, and their optimizers.

These are deliberately small variants (a few thousand parameters), chosen so that the exact
Hessian diagonal, one forward-over-forward pass per parameter, stays within CPU seconds. They
are not the paper's or the sweeps' models (see docs/experiments.md for those):

    digits_mlp   digits (8×8, 10 classes)   MLP 64-64-64-10, ReLU          8,970 params, batch 64
    protein_mlp  protein (CASP regression)  MLP 9-64-64-1, tanh, MSE       4,865 params, batch 128
    digits_cnn   digits as 1×8×8 images     conv3×3(1→16) GELU maxpool2,   6,090 params, batch 64
                                            conv3×3(16→32) GELU maxpool2,
                                            linear(128→10)

The activations are chosen on purpose. With ReLU (digits_mlp, as in the suite's MLPs) each
weight enters the output linearly inside an activation region, so the exact Hessian diagonal
*equals* the Gauss–Newton diagonal; tanh and GELU make the Hessian's residual term visible, so
the comparison against the Hessian is not a copy of the one against Gauss–Newton. The CNN has
no BatchNorm because BatchNorm in training mode couples the examples of a batch, which leaves
per-example Jacobians (and the independence of LEHI's v_n across examples) undefined.

Learning rates: one per optimizer, in its stable range on these models, not tuned:
Adam 1e-3, LEHI 3e-4 (LEHI is unstable at Adam's 1e-3, see docs/method.md), LEHIBrid 1e-3,
Sophia 1e-3 with its published defaults otherwise (betas 0.965/0.99, ρ 0.04, weight decay 0.1,
curvature every 10 steps). OPTIMIZER_SETTINGS holds only these overrides; every other
hyper-parameter is the optimizer's YAML default (conf/optimizer/<name>.yaml).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lehi.data
import lehi.models
from lehi.data.bundle import DataBundle

__all__ = ["OPTIMIZER_SETTINGS", "SETUPS", "DiagnosticCNN", "Setup", "get_setup"]

#: The study's overrides of conf/optimizer/<name>.yaml, by optimizer; its roster too.
OPTIMIZER_SETTINGS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3},
    "lehi": {"lr": 3e-4},
    "lehibrid": {"lr": 1e-3},
    "sophia": {"lr": 1e-3},
}


class DiagnosticCNN(nn.Module):
    """Two 3×3 conv blocks (GELU, 2× max-pool) and a linear head, on flat square images."""

    def __init__(
        self,
        side: int,
        num_classes: int,
        channels: tuple[int, int] = (16, 32),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if side % 4:
            raise ValueError(f"image side {side} must be a multiple of 4 (two 2× poolings)")
        self.shape = (in_channels, side, side)
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Linear(c2 * (side // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C·side·side) or (N, C, side, side) → logits (N, num_classes)."""
        x = x.reshape(-1, *self.shape)
        x = F.max_pool2d(F.gelu(self.conv1(x)), 2)
        x = F.max_pool2d(F.gelu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def _digits_cnn(bundle: DataBundle) -> nn.Module:
    side = math.isqrt(math.prod(bundle.input_shape))
    return DiagnosticCNN(side, bundle.num_outputs)


@dataclass(frozen=True)
class Setup:
    """One model of the study: its data, its network, its batch size and training length."""

    name: str
    dataset: str
    batch_size: int
    steps: int
    small_steps: int
    build_model: Callable[[DataBundle], nn.Module]
    description: str
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    def bundle(self, data_dir: str | os.PathLike[str] | None) -> DataBundle:
        """The dataset with this setup's batch size (``data_dir`` as lehi.data.build takes)."""
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, **self.data_kwargs}
        if self.dataset != "digits":  # digits ships with scikit-learn and takes no folder
            kwargs["data_dir"] = data_dir
        return lehi.data.build(self.dataset, **kwargs)


SETUPS: dict[str, Setup] = {
    "digits_mlp": Setup(
        "digits_mlp",
        "digits",
        batch_size=64,
        steps=440,
        small_steps=20,
        build_model=lambda b: lehi.models.build("mlp", b, hidden=(64, 64)),
        description="digits, MLP 64-64-64-10, ReLU",
    ),
    "protein_mlp": Setup(
        "protein_mlp",
        "protein",
        batch_size=128,
        steps=640,
        small_steps=20,
        build_model=lambda b: lehi.models.build("mlp", b, hidden=(64, 64), activation="tanh"),
        description="protein (CASP), MLP 9-64-64-1, tanh, MSE",
    ),
    "digits_cnn": Setup(
        "digits_cnn",
        "digits",
        batch_size=64,
        steps=440,
        small_steps=20,
        build_model=_digits_cnn,
        description="digits as 1×8×8 images, CNN conv16-conv32-linear, GELU",
    ),
}


def get_setup(name: str) -> Setup:
    """The setup called ``name``; a ValueError lists the known ones otherwise."""
    try:
        return SETUPS[name]
    except KeyError:
        raise ValueError(f"model {name!r} is not one of {', '.join(SETUPS)}") from None
