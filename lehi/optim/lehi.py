"""LEHI and LEHIBrid: Adam with its second-moment input replaced by Hessian imitation."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach

from lehi.optim.base import CurvatureOptimizer, bias_corrections, check_hyperparameters

__all__ = ["LEHI", "LEHIBrid"]

ESTIMATORS = ("sampled", "per_example", "squared_gradient")
HYBRIDS = ("max", "sum", "mix")


class LEHI(CurvatureOptimizer):
    r"""Low-order Explicit Hessian Imitation (arXiv 2605.06945), as read in METHOD.md.

    .. math::
        \begin{aligned}
        &g_t = \nabla f(w_{t-1}) \text{ on the batch}\\
        &\textbf{if } (t-1) \bmod k = 0:\ r \leftarrow r + 1,\quad
            v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)\, h_t,\quad
            h_t = s\,(\nabla L_{aux})^2,\
            L_{aux} = \tfrac1N \textstyle\sum_n v_n\!\cdot\! z_n \\
        &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        &w_t \leftarrow w_{t-1}(1 - \alpha\lambda) \\
        &w_t \leftarrow w_t - \alpha\, \frac{m_t / (1-\beta_1^t)}
            {\sqrt{v_t / (1-\beta_2^r)} + \epsilon}
        \end{aligned}

    with s = 1 (``scale_by_batch=False``: h is on the scale of Adam's g⊙g) or s = N
    (``scale_by_batch=True``: h estimates the per-example Gauss–Newton diagonal). The only
    difference from AdamW is the source of v, which makes LEHI vs Adam a clean ablation.

    Use it in a plain loop by replacing ``loss.backward()`` with
    ``optimizer.backward(loss, outputs, targets)``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate α (> 0).
        betas: (β1, β2), each in [0, 1).
        eps: ε ≥ 0, added to sqrt(v̂) (or to v̂ under the square root, see eps_inside_sqrt).
        weight_decay: decoupled weight decay λ (as AdamW); default 0.
        loss: the loss whose Hessian is imitated: ``"cross_entropy"`` or ``"mse"``.
        hessian_every: refresh the curvature every k steps (steps 1, 1 + k, …); default 1.
        estimator: ``"sampled"`` (METHOD.md's v for the loss; default), ``"per_example"``
            (exact per-example mode, Σ_n (J_nᵀ v_n)² / N² via torch.func; small models only,
            needs ``backward(..., model=, inputs=)``), or ``"squared_gradient"`` (h = g⊙g,
            which makes LEHI exactly AdamW: the ablation's control).
        scale_by_batch: multiply h by N, the number of loss terms; default False.
        eps_inside_sqrt: use sqrt(v̂ + ε), the form of the paper's analysis; default False.
        bias_correction: divide v by 1 − β2^r (r = curvature refreshes); default True.
        ignore_index: targets with this value contribute nothing to h (cross-entropy).
        sampler: how cross-entropy's labels are drawn: ``"multinomial"`` (torch.multinomial;
            default) or ``"inverse_cdf"`` (same distribution, one uniform per loss term: far
            cheaper for large vocabularies); see lehi.curvature.
        seed: seed of the generator the auxiliary draws come from (saved in the state dict);
            by default drawn from torch's global generator.
        foreach: use the multi-tensor path; None chooses like torch.optim (CUDA → foreach).
        compile: run the step as one graph through ``torch.compile`` (inductor fuses each
            parameter's update into a single pass over p, g, m and v); built on the first
            step, which takes seconds, and rebuilt when the parameter shapes or the static
            options change. Overrides ``foreach``. Needs a working torch.compile (a C++
            compiler on CPU); tested on CPU against the eager path. Default False.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        loss: str = "cross_entropy",
        hessian_every: int = 1,
        estimator: str = "sampled",
        scale_by_batch: bool = False,
        eps_inside_sqrt: bool = False,
        bias_correction: bool = True,
        ignore_index: int = -100,
        sampler: str = "multinomial",
        seed: int | None = None,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        check_hyperparameters(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_every=hessian_every
        )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_every=hessian_every,
            scale_by_batch=scale_by_batch,
            eps_inside_sqrt=eps_inside_sqrt,
            bias_correction=bias_correction,
            foreach=foreach,
            compile=compile,
        )
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        super().__init__(
            params,
            defaults,
            loss=loss,
            ignore_index=ignore_index,
            seed=seed,
            estimator=estimator,
            estimators=ESTIMATORS,
            sampler=sampler,
        )

    # ------------------------------------------------------------------------ curvature
    def _state_for(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["curvature_step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_curvature"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _combine(self, h: Tensor, grad: Tensor | None, group: dict[str, Any]) -> Tensor:
        """What v accumulates from h (and, for LEHIBrid, from g): here h itself."""
        return h

    def _fold(self, p: Tensor, group: dict[str, Any], h: Tensor, n: int) -> None:
        state = self._state_for(p)
        if group["scale_by_batch"]:
            h = h * n
        h = self._combine(h, p.grad, group)
        beta2 = group["betas"][1]
        state["exp_avg_curvature"].mul_(beta2).add_(h, alpha=1 - beta2)
        state["curvature_step"] += 1

    def _fold_aux_grad(self, p: Tensor, group: dict[str, Any], a: Tensor, n: int) -> None:
        """v ← β2 v + (1 − β2)·s·a⊙a in one pass: h = a⊙a is never materialised."""
        state = self._state_for(p)
        beta2 = group["betas"][1]
        scale = n if group["scale_by_batch"] else 1
        state["exp_avg_curvature"].mul_(beta2).addcmul_(a, a, value=(1 - beta2) * scale)
        state["curvature_step"] += 1

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        """Perform one optimisation step (the curvature was folded in by ``backward``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_curvature_arrived()
        fold_squared_gradient = self.estimator == "squared_gradient" and self.wants_curvature()

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_curvatures, steps, curvature_steps = (
                [] for _ in range(6)
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LEHI does not support sparse gradients")
                state = self._state_for(p)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_curvatures.append(state["exp_avg_curvature"])
                steps.append(state["step"])
                curvature_steps.append(state["curvature_step"])
            if not params:
                continue
            if group.get("compile", False):
                update = _compiled_lehi_update
            else:
                foreach = group["foreach"]
                if foreach is None:
                    _, foreach = _default_to_fused_or_foreach(params, False, False)
                update = _multi_tensor_lehi if foreach else _single_tensor_lehi
            update(
                params,
                grads,
                exp_avgs,
                exp_avg_curvatures,
                steps,
                curvature_steps,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                eps_inside_sqrt=group["eps_inside_sqrt"],
                bias_correction=group["bias_correction"],
                fold_squared_gradient=fold_squared_gradient,
            )
        return loss


def _single_tensor_lehi(
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
    fold_squared_gradient: bool,
) -> None:
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_curvature = grads[i], exp_avgs[i], exp_avg_curvatures[i]
        steps[i] += 1
        if fold_squared_gradient:
            exp_avg_curvature.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            curvature_steps[i] += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        (bc1,) = bias_corrections(beta1, [steps[i]])
        (bc2,) = bias_corrections(beta2, [curvature_steps[i]], bias_correction)
        if eps_inside_sqrt:
            denom = (exp_avg_curvature / bc2).add_(eps).sqrt_()
        else:
            denom = (exp_avg_curvature.sqrt() / math.sqrt(bc2)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bc1)


def _multi_tensor_lehi(
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
    fold_squared_gradient: bool,
) -> None:
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_curvatures, steps, curvature_steps]
    )
    for (dev_params, dev_grads, dev_m, dev_v, dev_steps, dev_curv_steps), _ in grouped.values():
        _increment(dev_steps)
        if fold_squared_gradient:
            torch._foreach_mul_(dev_v, beta2)
            torch._foreach_addcmul_(dev_v, dev_grads, dev_grads, 1 - beta2)
            _increment(dev_curv_steps)
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
        torch._foreach_addcdiv_(dev_params, dev_m, denom, [-lr / b for b in bc1])


def _increment(counters: list[Tensor]) -> None:
    """counters += 1. For CPU counters one wrapped 1.0 for all, as torch.optim.Adam does:
    ``_foreach_add_(counters, 1)`` would wrap the scalar again for every tensor."""
    if counters[0].is_cpu:
        torch._foreach_add_(counters, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(counters, 1)


def _graph_lehi(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_curvatures: list[Tensor],
    scalars: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    eps_inside_sqrt: bool,
    decay: bool,
    fold_squared_gradient: bool,
) -> None:
    """The single-tensor update in a form torch.compile captures as one graph.

    ``scalars[i]`` holds parameter i's step size lr / (1 − β1^t), its v correction (√(1 − β2^r),
    or 1 − β2^r under eps_inside_sqrt) and its decay factor 1 − lr·λ, computed outside: as
    data, a new step or learning rate changes no graph, and the per-element loop inductor
    generates only loads them (powers inside the graph would be re-evaluated per vector).
    """
    for i, (param, grad, exp_avg, exp_avg_curvature) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_curvatures)
    ):
        step_size, correction, decay_factor = scalars[i, 0], scalars[i, 1], scalars[i, 2]
        if fold_squared_gradient:
            exp_avg_curvature.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if decay:
            param.mul_(decay_factor)
        exp_avg.lerp_(grad, 1 - beta1)
        if eps_inside_sqrt:
            denom = (exp_avg_curvature / correction).add_(eps).sqrt_()
        else:
            denom = (exp_avg_curvature.sqrt() / correction).add_(eps)
        param.sub_(exp_avg / denom * step_size)


def _compiled_lehi_update(
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
    fold_squared_gradient: bool,
) -> None:
    """The step through :func:`_graph_lehi`: counters and scalars here, tensors there."""
    lr = float(lr)
    _increment(steps)
    if fold_squared_gradient:
        _increment(curvature_steps)
    bc1 = bias_corrections(beta1, steps)
    bc2 = bias_corrections(beta2, curvature_steps, bias_correction)
    corrections = bc2 if eps_inside_sqrt else [math.sqrt(b) for b in bc2]
    scalars = torch.tensor(
        [[lr / b1, b2, 1 - lr * weight_decay] for b1, b2 in zip(bc1, corrections)],
        dtype=torch.float64,
        device=params[0].device,
    )
    _compiled_lehi()(
        params,
        grads,
        exp_avgs,
        exp_avg_curvatures,
        scalars,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        eps_inside_sqrt=eps_inside_sqrt,
        decay=weight_decay != 0,
        fold_squared_gradient=fold_squared_gradient,
    )


@functools.cache
def _compiled_lehi() -> Callable[..., None]:
    """:func:`_graph_lehi` through torch.compile, created on first use (importing the
    compiler stack costs about a second, which plain eager users should not pay)."""
    return torch.compile(_graph_lehi, fullgraph=True, dynamic=False)


class LEHIBrid(LEHI):
    r"""LEHI whose curvature input never falls below Adam's: v accumulates hybrid(g⊙g, h).

    ``hybrid="max"`` (default): max(g⊙g, h), so every denominator is at least Adam's and the
    step never exceeds Adam's (the Défossez-style analysis carries over); where curvature
    dominates the gradient noise the step shortens. ``"sum"``: g⊙g + h. ``"mix"``:
    (1 − γ)·g⊙g + γ·h with γ = ``mix_weight``. g is the ordinary gradient of the same batch,
    before any gradient clipping. Other arguments as :class:`LEHI`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        hybrid: str = "max",
        mix_weight: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if hybrid not in HYBRIDS:
            raise ValueError(f"hybrid={hybrid!r} is not one of {', '.join(HYBRIDS)}")
        if not 0.0 <= mix_weight <= 1.0:
            raise ValueError(f"mix_weight must be in [0, 1], got {mix_weight}")
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
        self.defaults.update(hybrid=hybrid, mix_weight=mix_weight)
        for group in self.param_groups:
            group.setdefault("hybrid", hybrid)
            group.setdefault("mix_weight", mix_weight)

    #: max/sum/mix read g, so the ordinary backward must run before the auxiliary one.
    _fold_reads_gradient = True

    def _fold_aux_grad(self, p: Tensor, group: dict[str, Any], a: Tensor, n: int) -> None:
        """The hybrid needs h itself next to g⊙g: square a, then fold as :meth:`LEHI._fold`."""
        self._fold(p, group, a.square(), n)

    def _combine(self, h: Tensor, grad: Tensor | None, group: dict[str, Any]) -> Tensor:
        if grad is None:
            grad = torch.zeros_like(h)
        mode = group["hybrid"]
        if mode == "max":
            return torch.maximum(h, grad * grad)
        if mode == "sum":
            return torch.addcmul(h, grad, grad)
        gamma = group["mix_weight"]
        return torch.addcmul(h * gamma, grad, grad, value=1 - gamma)
