"""The diagonal estimates under test, every one on the scale of the exact diagonals.

The exact diagonals (lehi.diagnostics.exact) are those of the mean loss f = (1/N) Σ_n ℓ_n:
(1/N) Σ_n diag(H_n) and (1/N) Σ_n diag(J_nᵀ H_z J_n). LEHI's h = (∇L_aux)² (scale_by_batch
False, the default) has E[h] = GN/N, so every LEHI-family estimate here is multiplied by N
(documented rescaling: N·h is an unbiased estimate of the Gauss–Newton diagonal). Adam's g⊙g has
no fixed relation to either diagonal; it gets the same factor N, the analogous "per-example"
scaling (N·g⊙g → the diagonal of the empirical Fisher (1/N) Σ_n g_n⊙g_n when gradient noise
dominates the mean gradient, and grows without bound, as N·(∇f)², when the mean dominates).
The metrics report the best-fitting scale beside the errors at this one, so the choice is
visible rather than hidden.

Instantaneous estimates on one batch (``instantaneous_estimates``):
    lehi              N·h, one draw of v (what LEHI folds in per step)
    lehi_avg          N·mean of h over ``draws`` independent draws
    lehi_per_example  N·Σ_n (J_nᵀ v_n)² / N², the exact per-example mode (no cross terms)
    lehibrid          N·max(g⊙g, h) with the same draw as ``lehi`` (LEHIBrid's default input)
    sophia            N·(c·ĝ)⊙(c·ĝ), ĝ the same draw's auxiliary gradient (for cross-entropy the
                      gradient against labels sampled from the model: exactly Sophia's ĝ), c =
                      min(1, 1/‖ĝ‖) Sophia's clip to norm 1. Sophia divides by ρ·N·h_ema; ρ is
                      its step-size constant and is left out (it changes no cosine or rank).
    adam              N·g⊙g, g the ordinary mini-batch gradient
What each optimizer really divides by (``optimizer_curvature``), read from its state:
    LEHI / LEHIBrid   exp_avg_curvature / (1 − β2^r) · N   (r = curvature refreshes)
    Adam / AdamW      exp_avg_sq / (1 − β2^t) · N
    SophiaG           hessian · N  (its EMA of ĝ⊙ĝ; no bias correction, as in Sophia)
with N the number of loss terms in one training batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lehi.curvature import aux_loss, get_loss_rule, num_loss_terms, per_example_curvature
from lehi.diagnostics.exact import trainable_parameters
from lehi.optim import LEHI, SophiaG

__all__ = [
    "INSTANT_ESTIMATES",
    "auxiliary_gradients",
    "instantaneous_estimates",
    "mean_lehi_estimate",
    "optimizer_curvature",
]

INSTANT_ESTIMATES = ("lehi", "lehi_avg", "lehi_per_example", "lehibrid", "sophia", "adam")


def auxiliary_gradients(
    model: nn.Module,
    loss: str,
    inputs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    draws: int,
    *,
    ignore_index: int = -100,
) -> tuple[list[dict[str, Tensor]], int]:
    """``draws`` independent ∇L_aux by parameter name (one forward pass), and N.

    Each draw goes through lehi.curvature.aux_loss, the code path the optimizers use.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    names = list(trainable_parameters(model))
    params = [dict(model.named_parameters())[n] for n in names]
    outputs = model(inputs)
    result, n = [], 1
    for i in range(draws):
        aux, n = aux_loss(loss, outputs, targets, generator, ignore_index=ignore_index)
        grads = torch.autograd.grad(aux, params, retain_graph=i < draws - 1, allow_unused=True)
        result.append(
            {k: torch.zeros_like(p) if g is None else g for k, p, g in zip(names, params, grads)}
        )
    return result, n


def mean_lehi_estimate(
    model: nn.Module,
    loss: str,
    inputs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    draws: int,
    *,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """N · (1/draws) Σ_draws (∇L_aux)²: LEHI's h averaged over draws, on the GN scale."""
    grads, n = auxiliary_gradients(
        model, loss, inputs, targets, generator, draws, ignore_index=ignore_index
    )
    return {k: sum(g[k].square() for g in grads) * (n / draws) for k in grads[0]}


def instantaneous_estimates(
    model: nn.Module,
    loss: str,
    inputs: Tensor,
    targets: Tensor,
    *,
    draws: int,
    seed: int,
    ignore_index: int = -100,
    sophia_clip: float | None = 1.0,
) -> dict[str, dict[str, Tensor]]:
    """Every estimate of INSTANT_ESTIMATES on one batch, by estimate then parameter name.

    The draws of v come from a generator seeded with ``seed``; the per-example mode uses one
    seeded with ``seed + 1``, so it is independent of them.
    """
    names = list(trainable_parameters(model))
    params = [dict(model.named_parameters())[n] for n in names]
    outputs = model(inputs)
    batch_loss = get_loss_rule(loss).loss(outputs, targets, ignore_index)
    g = dict(zip(names, torch.autograd.grad(batch_loss, params)))
    n = max(num_loss_terms(loss, outputs, targets, ignore_index), 1)

    aux, _ = auxiliary_gradients(
        model,
        loss,
        inputs,
        targets,
        torch.Generator().manual_seed(seed),
        draws,
        ignore_index=ignore_index,
    )
    first = aux[0]
    coef = 1.0
    if sophia_clip is not None:
        norm = torch.linalg.vector_norm(torch.stack([a.norm() for a in first.values()]))
        coef = min(1.0, sophia_clip / (float(norm) + 1e-6))  # SophiaG's clip rule
    per_example = per_example_curvature(
        model,
        inputs,
        targets,
        loss,
        torch.Generator().manual_seed(seed + 1),
        params=names,
        ignore_index=ignore_index,
    )
    with torch.no_grad():
        return {
            "lehi": {k: first[k].square() * n for k in names},
            "lehi_avg": {k: sum(a[k].square() for a in aux) * (n / draws) for k in names},
            "lehi_per_example": {k: per_example[k] * n for k in names},
            "lehibrid": {k: torch.maximum(g[k].square(), first[k].square()) * n for k in names},
            "sophia": {k: (first[k] * coef).square() * n for k in names},
            "adam": {k: g[k].square() * n for k in names},
        }


def optimizer_curvature(
    optimizer: torch.optim.Optimizer, model: nn.Module, num_terms: int
) -> dict[str, Tensor]:
    """The second-moment/curvature state ``optimizer`` divides by, on the GN scale.

    ``num_terms`` is N of one training batch. Parameters without state yet (no step taken)
    raise a ValueError, as do optimizers other than LEHI, LEHIBrid, SophiaG, Adam and AdamW.
    """
    name_of = {p: n for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                raise ValueError(f"parameter {name_of.get(p, '?')!r} has no optimizer state yet")
            if isinstance(optimizer, LEHI):  # LEHIBrid included
                bc = 1.0 - beta2 ** float(state["curvature_step"])
                bc = bc if group["bias_correction"] else 1.0
                scale = 1.0 if group["scale_by_batch"] else float(num_terms)
                value = state["exp_avg_curvature"] / bc * scale
            elif isinstance(optimizer, SophiaG):
                value = state["hessian"] * float(num_terms)
            elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
                bc = 1.0 - beta2 ** float(state["step"])
                value = state[key] / bc * float(num_terms)
            else:
                raise ValueError(
                    f"optimizer {type(optimizer).__name__} is not one of LEHI, LEHIBrid, "
                    "SophiaG, Adam, AdamW"
                )
            out[name_of[p]] = value.detach().clone()
    return out
