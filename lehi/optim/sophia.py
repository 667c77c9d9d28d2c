"""SophiaG (Liu et al., 2024) as published, on this suite's curvature pass."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lehi._torch_compat import default_to_foreach, group_tensors_by_device_and_dtype
from lehi.optim.base import CurvatureOptimizer
from lehi.optim.common import check_hyperparameters, increment

__all__ = ["SophiaG"]


class SophiaG(CurvatureOptimizer):
    r"""SophiaG: clipped, curvature-preconditioned momentum (the official algorithm).

    .. math::
        \begin{aligned}
        &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        &\textbf{every } k \textbf{ steps: } h \leftarrow \beta_2 h + (1-\beta_2)\,\hat g\odot\hat g \\
        &w_t \leftarrow w_{t-1}(1 - \alpha\lambda) \\
        &w_t \leftarrow w_t - \alpha\,\mathrm{sign}(m_t)\,
            \min\!\Big(\frac{|m_t|}{\rho N h + 10^{-15}},\, 1\Big)
        \end{aligned}

    ĝ is the gradient of the loss against labels sampled from the model (for cross-entropy;
    Gaussian-like Rademacher targets for MSE, the author's advice): exactly the unscaled
    auxiliary gradient of lehi.curvature. N is the number of loss terms of the batch (the
    official ``bs``). No bias correction. As in the official training loop, ĝ is clipped to
    norm ``curvature_grad_clip`` (default 1.0; None disables) before it enters the EMA.
    A parameter without a path to the outputs keeps h = 0, so its update is lr·sign(m), as
    in the official code.

    One deliberate difference from the official loop, which refreshes h after steps k, 2k, …
    with a separate forward pass: here h is refreshed on steps 1, 1 + k, … from the training
    forward pass (one forward per step for every optimizer in the suite).

    Args:
        params: parameters or parameter groups.
        lr: learning rate α; default 1e-4.
        betas: (β1, β2); default (0.965, 0.99).
        rho: ρ; default 0.04.
        weight_decay: decoupled weight decay λ; default 0.1.
        loss, ignore_index, sampler, seed, foreach: as for :class:`lehi.optim.LEHI`
            (sampler ``"multinomial"`` reproduces the official code's draws exactly).
        hessian_every: k; default 10.
        curvature_grad_clip: max norm of ĝ over all parameters; default 1.0.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        loss: str = "cross_entropy",
        hessian_every: int = 10,
        curvature_grad_clip: float | None = 1.0,
        ignore_index: int = -100,
        sampler: str = "inverse_cdf",
        seed: int | None = None,
        foreach: bool | None = None,
    ) -> None:
        check_hyperparameters(
            lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay, hessian_every=hessian_every
        )
        if not rho > 0.0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if curvature_grad_clip is not None and not curvature_grad_clip > 0.0:
            raise ValueError(f"curvature_grad_clip must be > 0 or None, got {curvature_grad_clip}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            rho=rho,
            weight_decay=weight_decay,
            hessian_every=hessian_every,
            foreach=foreach,
        )
        super().__init__(
            params,
            defaults,
            loss=loss,
            ignore_index=ignore_index,
            seed=seed,
            estimator="sampled",
            estimators=("sampled",),
            sampler=sampler,
        )
        self.curvature_grad_clip = curvature_grad_clip

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _fold_needs_every_grad(self) -> bool:
        # Clipping needs the joint norm of every auxiliary gradient before any is folded.
        return self.curvature_grad_clip is not None

    def _fold(
        self, params: list[Tensor], groups: list[dict[str, Any]], aux_grads: list[Tensor], n: int
    ) -> None:
        if not params:
            return
        if self.curvature_grad_clip is not None:
            # The same rule as torch.nn.utils.clip_grad_norm_, applied to ĝ.
            norms = torch.stack([torch.linalg.vector_norm(a) for a in aux_grads])
            coef = torch.clamp(self.curvature_grad_clip / (norms.norm() + 1e-6), max=1.0)
            torch._foreach_mul_(aux_grads, coef)
        # One multi-tensor update per group instead of a Python loop over parameters.
        for group in self.param_groups:
            pairs = [(p, a) for p, a, g in zip(params, aux_grads, groups) if g is group]
            if not pairs:
                continue
            beta2 = group["betas"][1]
            hessians = [self._state_for(p)["hessian"] for p, _ in pairs]
            aux = [a for _, a in pairs]
            torch._foreach_mul_(hessians, beta2)
            torch._foreach_addcmul_(hessians, aux, aux, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure=None, bs: int | None = None):  # noqa: ANN001 - torch.optim's signature
        """One step; ``bs`` (N, loss terms per step) defaults to the last curvature pass's N."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_curvature_arrived()
        bs = self.num_loss_terms if bs is None else bs
        if bs is None:
            raise RuntimeError("SophiaG needs N: call optimizer.backward(...) or step(bs=N)")
        for group in self.param_groups:
            params, grads, (exp_avgs, hessians, steps) = self._collect(
                group, ("exp_avg", "hessian", "step")
            )
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = default_to_foreach(params)
            update = _multi_tensor_sophiag if foreach else _single_tensor_sophiag
            update(
                params,
                grads,
                exp_avgs,
                hessians,
                steps,
                bs=bs,
                beta1=group["betas"][0],
                rho=group["rho"],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
            )
        return loss


def _single_tensor_sophiag(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    steps: list[Tensor],
    *,
    bs: int,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
) -> None:
    for param, grad, exp_avg, hess, step in zip(params, grads, exp_avgs, hessians, steps):
        step += 1
        param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        # sign(m)·min(|m| / d, 1) = clamp(m / d, −1, 1) for d > 0, in one buffer.
        update = (rho * bs * hess).add_(1e-15).reciprocal_().mul_(exp_avg).clamp_(-1, 1)
        param.add_(update, alpha=-lr)


def _multi_tensor_sophiag(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    steps: list[Tensor],
    *,
    bs: int,
    beta1: float,
    rho: float,
    lr: float,
    weight_decay: float,
) -> None:
    grouped = group_tensors_by_device_and_dtype([params, grads, exp_avgs, hessians, steps])
    for (dev_params, dev_grads, dev_m, dev_h, dev_steps), _ in grouped.values():
        increment(dev_steps)
        torch._foreach_mul_(dev_params, 1 - lr * weight_decay)
        torch._foreach_lerp_(dev_m, dev_grads, 1 - beta1)
        # As the single-tensor path: clamp(m / d, −1, 1) built in one set of buffers, so the
        # step holds one temporary per parameter (AdamW's step holds one too).
        update = torch._foreach_mul(dev_h, rho * bs)
        torch._foreach_add_(update, 1e-15)
        torch._foreach_reciprocal_(update)
        torch._foreach_mul_(update, dev_m)
        torch._foreach_clamp_min_(update, -1)
        torch._foreach_clamp_max_(update, 1)
        torch._foreach_add_(dev_params, update, alpha=-lr)
