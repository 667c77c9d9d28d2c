"""One-line errors for calls that a curvature optimizer would otherwise read wrongly.

Each of these mistakes trains without failing: h from the wrong number of loss terms, a
sampled class where a padding token was meant, a time axis taken for the classes. The checks
read the targets once and walk a few nodes of the loss's graph, and the optimizers run them
on refresh steps only (the steps whose h they would spoil).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_outputs_and_targets"]

_VIEWS = ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0")
_NLL = ("NllLossBackward0", "NllLoss2DBackward0")


def check_outputs_and_targets(
    loss_name: str, loss: Tensor, outputs: Tensor, targets: Tensor, ignore_index: int
) -> None:
    """A one-line ValueError for outputs and targets that loss ``loss_name`` cannot pair.

    cross_entropy: integer class indices of shape (…) (or flattened) for outputs (…, C),
    each in [0, C) or ``ignore_index``; probability or one-hot targets are refused. When
    ``loss``'s graph is F.cross_entropy of ``outputs`` itself, its softmax must run over the
    outputs' last dimension: F.cross_entropy also takes (B, C, T) logits with (B, T) targets,
    and when T == C only the graph shows that the classes are in dimension 1 (a loss built
    otherwise, e.g. with label smoothing, is not inspected). mse: one target per output.
    """
    if loss_name == "mse":
        if targets.numel() != outputs.numel():
            raise ValueError(
                f"mse: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                f"{tuple(outputs.shape)} (one target per output expected)"
            )
        return
    _check_class_targets(outputs, targets, ignore_index)
    _check_class_dimension(loss, outputs)


def _check_class_targets(outputs: Tensor, targets: Tensor, ignore_index: int) -> None:
    rows, classes = tuple(outputs.shape[:-1]), outputs.shape[-1]
    shape = tuple(targets.shape)
    if targets.is_floating_point():
        if shape == tuple(outputs.shape):
            raise ValueError(
                f"targets of dtype {targets.dtype} shaped like the outputs {shape} look like "
                f"class probabilities or one-hot rows: cross_entropy takes class indices of "
                f"shape {rows} (one-hot: pass targets.argmax(-1); soft labels are not supported)"
            )
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if shape != rows and shape != (math.prod(rows),):
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)} and targets of shape {shape} do not pair "
            f"as (…, C) with (…): the classes must be the outputs' last dimension (for "
            f"F.cross_entropy's (B, C, T) layout pass outputs.transpose(1, -1))"
        )
    if targets.numel() == 0:
        return
    # Both bounds in one pass and one device sync; ignored entries count as class 0.
    low, high = targets.where(targets != ignore_index, 0).aminmax()
    low, high = torch.stack([low, high]).tolist()
    if low < 0:
        raise ValueError(
            f"targets hold {low}, neither a class index nor ignore_index={ignore_index}: pass "
            f"the optimizer the value your loss ignores (ignore_index={low})"
        )
    if high >= classes:
        raise ValueError(
            f"targets hold {high}, outside the {classes} classes of the outputs' last "
            f"dimension (outputs of shape {tuple(outputs.shape)})"
        )


def _check_class_dimension(loss: Tensor, outputs: Tensor) -> None:
    if outputs.dim() < 3 or outputs.grad_fn is None or type(loss.grad_fn).__name__ not in _NLL:
        return
    node = loss.grad_fn.next_functions[0][0]
    while type(node).__name__ in _VIEWS:
        node = node.next_functions[0][0]
    if type(node).__name__ != "LogSoftmaxBackward0":
        return
    if node.next_functions[0][0] is not outputs.grad_fn:
        return
    dim = node._saved_dim % outputs.dim()
    if dim != outputs.dim() - 1:
        raise ValueError(
            f"the loss takes its classes from dimension {dim} of outputs of shape "
            f"{tuple(outputs.shape)}, the optimizer from the last: pass "
            f"outputs.transpose({dim}, -1) as outputs (targets then pair as (…, C) with (…))"
        )
