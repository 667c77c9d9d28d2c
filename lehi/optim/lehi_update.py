"""The LEHI step's update, three ways: single-tensor, multi-tensor (foreach), torch.compile.

Each takes the parameters of one group with their gradients and state and applies

    t ← t + 1;  w ← w (1 − α λ);  m ← β1 m + (1 − β1) g
    u = m / (1 − β1^t) / (sqrt(v / (1 − β2^r)) + ε)   (or sqrt(v / (1 − β2^r) + ε))
    w ← w − α clip(u, −c, c)

with the v and r the curvature folds left (lehi.optim.LEHI's docstring). The three agree to
rounding; the tests hold them to it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from lehi._torch_compat import group_tensors_by_device_and_dtype
from lehi.optim.common import bias_corrections, increment

__all__ = ["compiled_lehi", "multi_tensor_lehi", "single_tensor_lehi"]


def single_tensor_lehi(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_curvatures: list[Tensor],
    steps: list[Tensor],
    curvature_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    eps_inside_sqrt: bool,
    bias_correction: bool,
    update_clip: float | None,
) -> None:
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_curvature = grads[i], exp_avgs[i], exp_avg_curvatures[i]
        steps[i] += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        (bc1,) = bias_corrections(beta1, [steps[i]])
        (bc2,) = bias_corrections(beta2, [curvature_steps[i]], bias_correction)
        if eps_inside_sqrt:
            denom = (exp_avg_curvature / bc2).add_(eps).sqrt_()
        else:
            denom = (exp_avg_curvature.sqrt() / math.sqrt(bc2)).add_(eps)
        if update_clip is None:
            param.addcdiv_(exp_avg, denom, value=-lr / bc1)
        else:
            # The same operations as the multi-tensor path, so both round alike.
            update = denom.mul_(bc1).reciprocal_().mul_(exp_avg)
            param.add_(update.clamp_(-update_clip, update_clip), alpha=-lr)


def multi_tensor_lehi(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_curvatures: list[Tensor],
    steps: list[Tensor],
    curvature_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    eps_inside_sqrt: bool,
    bias_correction: bool,
    update_clip: float | None,
) -> None:
    grouped = group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_curvatures, steps, curvature_steps]
    )
    for (dev_params, dev_grads, dev_m, dev_v, dev_steps, dev_curv_steps), _ in grouped.values():
        increment(dev_steps)
        if weight_decay != 0:
            torch._foreach_mul_(dev_params, 1 - lr * weight_decay)
        torch._foreach_lerp_(dev_m, dev_grads, 1 - beta1)
        bc1 = bias_corrections(beta1, dev_steps)
        bc2 = bias_corrections(beta2, dev_curv_steps, bias_correction)
        if eps_inside_sqrt:
            denom = torch._foreach_div(dev_v, bc2)
            torch._foreach_add_(denom, eps)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(dev_v)
            torch._foreach_div_(denom, [math.sqrt(b) for b in bc2])
            torch._foreach_add_(denom, eps)
        if update_clip is None:
            torch._foreach_addcdiv_(dev_params, dev_m, denom, [-lr / b for b in bc1])
            continue
        torch._foreach_mul_(denom, bc1)
        torch._foreach_reciprocal_(denom)
        torch._foreach_mul_(denom, dev_m)
        torch._foreach_clamp_min_(denom, -update_clip)
        torch._foreach_clamp_max_(denom, update_clip)
        torch._foreach_add_(dev_params, denom, alpha=-lr)


def _graph_lehi(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_curvatures: list[Tensor],
    scalars: Tensor,
    *,
    beta1: float,
    eps: float,
    eps_inside_sqrt: bool,
    decay: bool,
    update_clip: float | None,
) -> None:
    """The single-tensor update in a form torch.compile captures as one graph.

    ``scalars[i]`` holds parameter i's step size lr / (1 − β1^t), its v correction (√(1 − β2^r),
    or 1 − β2^r under eps_inside_sqrt), its decay factor 1 − lr·λ, 1 / (1 − β1^t) and lr,
    computed outside: as data, a new step or learning rate changes no graph, and the
    per-element loop inductor generates only loads them (powers inside the graph would be
    re-evaluated per vector).
    """
    for i, (param, grad, exp_avg, exp_avg_curvature) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_curvatures)
    ):
        step_size, correction, decay_factor = scalars[i, 0], scalars[i, 1], scalars[i, 2]
        if decay:
            param.mul_(decay_factor)
        exp_avg.lerp_(grad, 1 - beta1)
        if eps_inside_sqrt:
            denom = (exp_avg_curvature / correction).add_(eps).sqrt_()
        else:
            denom = (exp_avg_curvature.sqrt() / correction).add_(eps)
        if update_clip is None:
            param.sub_(exp_avg / denom * step_size)
        else:
            update = (exp_avg / denom * scalars[i, 3]).clamp(-update_clip, update_clip)
            param.sub_(update * scalars[i, 4])


def compiled_lehi(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_curvatures: list[Tensor],
    steps: list[Tensor],
    curvature_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    eps_inside_sqrt: bool,
    bias_correction: bool,
    update_clip: float | None,
) -> None:
    """The step through :func:`_graph_lehi`: counters and scalars here, tensors there."""
    lr = float(lr)
    increment(steps)
    bc1 = bias_corrections(beta1, steps)
    bc2 = bias_corrections(beta2, curvature_steps, bias_correction)
    corrections = bc2 if eps_inside_sqrt else [math.sqrt(b) for b in bc2]
    scalars = torch.tensor(
        [[lr / b1, b2, 1 - lr * weight_decay, 1 / b1, lr] for b1, b2 in zip(bc1, corrections)],
        dtype=torch.float64,
        device=params[0].device,
    )
    _compiled_graph()(
        params,
        grads,
        exp_avgs,
        exp_avg_curvatures,
        scalars,
        beta1=beta1,
        eps=eps,
        eps_inside_sqrt=eps_inside_sqrt,
        decay=weight_decay != 0,
        update_clip=update_clip,
    )


@functools.cache
def _compiled_graph() -> Callable[..., None]:
    """:func:`_graph_lehi` through torch.compile, created on first use (importing the
    compiler stack costs about a second, which plain eager users should not pay)."""
    return torch.compile(_graph_lehi, fullgraph=True, dynamic=False)
