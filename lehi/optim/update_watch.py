"""LEHI's one-time warning: an early update far larger than any Adam would take.

Adam's update u = m̂/(√v̂+ε) is at most 1 in magnitude at its first step (v̂ = g⊙g there) and
rarely more than a few later. LEHI's v̂ comes from h, which a single draw can make tiny in
some coordinates, and its first steps can then be 10⁴–10⁶ × lr (README: the ablation). The
watch compares each tensor's max |u| over the first :data:`WATCHED_STEPS` steps with a
threshold and warns once, naming the tensor and ``update_clip``, the option that bounds the
step. It reads the optimizer state only: no draws, no change to any step.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from lehi.optim.common import bias_corrections

__all__ = ["WATCHED_STEPS", "UpdateWatch", "check_warn_update_above", "largest_updates"]

#: The first steps the watch checks (where single-draw h is tiny and LEHI's early blow-ups
#: happen); after them it costs one attribute test per step.
WATCHED_STEPS = 10


def check_warn_update_above(value: float | None) -> None:
    """A ValueError unless ``value`` is None (no warning) or a finite number > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if value is not None and not (ok and math.isfinite(value)):
        raise ValueError(f"warn_update_above must be a finite number > 0 or None, got {value!r}")


def largest_updates(
    exp_avgs: list[Tensor],
    exp_avg_curvatures: list[Tensor],
    steps: list[Tensor],
    curvature_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    eps_inside_sqrt: bool,
    bias_correction: bool,
) -> Tensor:
    """max |u| per tensor, u = m̂/(√v̂+ε) from the state a step just left (before any clip):
    that step's size in units of lr, as lehi.optim.lehi_update computes it."""
    bc1 = bias_corrections(beta1, steps)
    bc2 = bias_corrections(beta2, curvature_steps, bias_correction)
    sizes = []
    for exp_avg, exp_avg_curvature, b1, b2 in zip(exp_avgs, exp_avg_curvatures, bc1, bc2):
        if exp_avg.numel() == 0:
            sizes.append(torch.zeros((), device=exp_avg.device))
            continue
        if eps_inside_sqrt:
            denom = (exp_avg_curvature / b2).add_(eps).sqrt_()
        else:
            denom = (exp_avg_curvature.sqrt() / math.sqrt(b2)).add_(eps)
        sizes.append(exp_avg.abs().div_(denom).amax().float() / b1)
    return torch.stack(sizes)


class UpdateWatch:
    """The largest early update of one optimizer against ``threshold`` (None: never)."""

    def __init__(self, threshold: float | None) -> None:
        check_warn_update_above(threshold)
        self.threshold = threshold
        # Off for good once the watched steps have passed or the warning was given.
        self.active = threshold is not None
        self._largest: tuple[float, Tensor, int] | None = None

    def begin_step(self, steps_taken: int) -> None:
        if steps_taken >= WATCHED_STEPS:
            self.active = False
        self._largest = None

    def observe(
        self, group_index: int, group: dict[str, Any], params: list[Tensor], state: dict
    ) -> None:
        """Measure the step just applied to ``params`` (one group, LEHI's state keys)."""
        clip = group["update_clip"]
        if clip is not None and clip <= self.threshold:
            return  # the clip already bounds every step below the threshold
        entries = [state[p] for p in params]
        sizes = largest_updates(
            [s["exp_avg"] for s in entries],
            [s["exp_avg_curvature"] for s in entries],
            [s["step"] for s in entries],
            [s["curvature_step"] for s in entries],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            eps=group["eps"],
            eps_inside_sqrt=group["eps_inside_sqrt"],
            bias_correction=group["bias_correction"],
        )
        size, index = sizes.max(0)
        size = float(size) if clip is None else min(float(size), clip)
        if size > self.threshold and (self._largest is None or size > self._largest[0]):
            self._largest = (size, params[int(index)], group_index)

    def end_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Warn once about the largest update of the step, if one exceeded the threshold."""
        if self._largest is None:
            return
        size, p, group_index = self._largest
        self.active, self._largest = False, None
        group = optimizer.param_groups[group_index]
        position = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")  # present when given model.named_parameters()
        name = repr(names[position]) if names else f"param_groups[{group_index}][{position}]"
        warnings.warn(
            f"{type(optimizer).__name__}: the step-{step} update of {name} (shape "
            f"{tuple(p.shape)}) reaches {size:.3g} × lr in max |m̂/(√v̂+ε)| (Adam's stays near "
            "1): set update_clip (e.g. update_clip=1.0) to bound each coordinate of the step "
            "(README: the ablation), or warn_update_above=None to silence this",
            # The caller of opt.step(), past LEHI.step and torch's no_grad and profiling wrappers.
            stacklevel=5,
        )
