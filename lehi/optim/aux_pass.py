"""The auxiliary backward pass of a curvature optimizer, as functions of explicit arguments.

:class:`lehi.optim.CurvatureOptimizer` decides when a pass runs, with which v and in which
order next to the ordinary backward; the functions here run it and hand its gradients on:
streamed into a fold one parameter at a time, returned as a full set, averaged across the
ranks of a data-parallel run, or computed exactly per example.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lehi.curvature import per_example_curvature

__all__ = ["aux_grads", "per_example_roots", "reduce_across_ranks", "streaming_fold"]


def aux_grads(
    outputs: Tensor, v: Tensor, params: list[Tensor], *, retain_graph: bool
) -> list[Tensor | None]:
    """∇L_aux for each parameter (None without a path to ``outputs``); ``v`` = ∂L_aux/∂outputs."""
    return list(
        torch.autograd.grad(
            outputs, params, grad_outputs=v, allow_unused=True, retain_graph=retain_graph
        )
    )


def streaming_fold(
    outputs: Tensor,
    v: Tensor,
    params: list[Tensor],
    fold_one: Callable[[Tensor, Tensor], None],
    *,
    retain_graph: bool,
) -> None:
    """∇L_aux, each parameter's gradient passed to ``fold_one(p, a)`` as autograd produces it.

    The hooks hand autograd a zero-strided zero in place of each a, so ``autograd.grad``
    never holds a second set of gradient-sized buffers.
    """

    def hook(p: Tensor, aux_grad: Tensor) -> Tensor:
        with torch.no_grad():
            fold_one(p, aux_grad)
        return aux_grad.new_zeros(()).expand_as(aux_grad)

    handles = [p.register_hook(lambda a, p=p: hook(p, a)) for p in params]
    try:
        aux_grads(outputs, v, params, retain_graph=retain_graph)
    finally:
        for handle in handles:
            handle.remove()


def reduce_across_ranks(
    reduce_mean: Callable[[list[Tensor]], None] | None,
    params: list[Tensor],
    grads: list[Tensor | None],
    n: int,
) -> tuple[list[Tensor | None], int]:
    """The auxiliary gradients averaged across ranks, and the global N.

    Which parameters the auxiliary pass reaches can differ between ranks (a routed model
    whose expert saw none of this rank's tokens), so every rank reduces one tensor per
    parameter (zeros where it has no gradient) and a 0/1 mark per parameter: the ranks'
    all-reduces always match. A parameter that no rank reached stays without one (None).
    """
    if reduce_mean is None:
        return grads, n
    filled = [torch.zeros_like(p) if a is None else a for p, a in zip(params, grads)]
    reached = torch.tensor(
        [a is not None for a in grads], dtype=torch.float32, device=params[0].device
    )
    reduce_mean([*filled, reached])
    grads = [a if r > 0 else None for a, r in zip(filled, reached.tolist())]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total = torch.tensor([n], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return grads, int(total.item())
    return grads, n


def per_example_roots(
    params: list[Tensor],
    model: torch.nn.Module | None,
    inputs: Tensor | None,
    targets: Tensor,
    *,
    loss: str,
    generator: torch.Generator,
    ignore_index: int,
    sampler: str,
) -> list[Tensor | None]:
    """The exact per-example h = Σ_n (J_nᵀ v_n)² / N² of each parameter, as its square root
    (the form a fold receives: its square is h); None for a parameter ``model`` lacks."""
    if model is None or inputs is None:
        raise ValueError("estimator='per_example' needs backward(..., model=, inputs=)")
    h = per_example_curvature(
        model, inputs, targets, loss, generator, ignore_index=ignore_index, sampler=sampler
    )
    name_of = {p: name for name, p in model.named_parameters()}
    return [h[name_of[p]].sqrt() if p in name_of else None for p in params]
