"""Hessian imitation: the auxiliary loss of LEHI and the rules that draw its vector v.

For a batch of N loss terms with outputs z_n = p(w, x_n) (logits, predictions), the auxiliary
loss is

    L_aux(w) = (1/N) Σ_n v_n · z_n(w),      v_n detached,

with E[v_n] = 0 and E[v_n v_nᵀ] = H_z(z_n, y_n), the Hessian of the per-term loss with respect
to the output. Its gradient (1/N) Σ_n J_nᵀ v_n costs one extra backward pass through the
training graph, and h = (∇L_aux)² satisfies E[h] = (1/N²) Σ_n diag(J_nᵀ H_z J_n): the diagonal
of the mini-batch Gauss–Newton matrix divided by N (see docs/method.md).

This module is the only place that knows how v is drawn for each loss. A loss rule bundles the
loss itself (as the trainer computes it), the draw of v and the count N of loss terms.

Cross-entropy draws a label per loss term from softmax(z) with one of two samplers (SAMPLERS),
the same distribution by two algorithms:
    "inverse_cdf"   (the default) one uniform variate per term, located in the row's
                    cumulative sum in two levels (blocks of classes, then the class in its
                    block), so that no second vocabulary-sized buffer exists. Exactly
                    Categorical(softmax(z)) up to float32 rounding of the sums; an order of
                    magnitude cheaper than multinomial for large vocabularies, and the only
                    sampler whose draws a data-parallel run can slice by rank (shard_of).
    "multinomial"   torch.multinomial: the draws torch's own call makes from the same
                    generator state, as the official SophiaG code samples; kept to reproduce
                    that code's random stream draw for draw. It draws one exponential variate
                    per class per term, sequentially on CPU: for a language model's
                    vocabulary this costs more than the backward pass.

The optimizers never build L_aux itself: its gradient with respect to the outputs is v/N
(:func:`aux_grad_outputs`), which they hand to autograd as the outputs' gradient. When the
training loss is exactly the mean cross-entropy of the outputs, v/N is built in place from
that loss's own gradient, which already holds the softmax
(:func:`aux_grad_outputs_from_loss_gradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lehi._torch_compat import saved_attribute

__all__ = [
    "LOSS_RULES",
    "SAMPLERS",
    "LossRule",
    "aux_grad_outputs",
    "aux_grad_outputs_from_loss_gradient",
    "aux_loss",
    "aux_vector",
    "get_loss_rule",
    "is_mean_cross_entropy",
    "num_loss_terms",
    "per_example_curvature",
]


@dataclass(frozen=True)
class LossRule:
    """How one loss is computed, how many terms it averages, and how its v is drawn."""

    loss: Callable[[Tensor, Tensor, int], Tensor]
    num_terms: Callable[[Tensor, Tensor, int], int]
    #: draw_v(outputs, targets, generator, ignore_index, sampler, shard, scale) → scale·v
    draw_v: Callable[[Tensor, Tensor, torch.Generator, int, str, tuple[int, int], float], Tensor]


SAMPLERS = ("multinomial", "inverse_cdf")
#: Classes per block of the inverse-CDF sampler's first level (see _inverse_cdf).
_BLOCK = 64


def check_sampler(sampler: str) -> None:
    """A ValueError naming the allowed samplers when ``sampler`` is not one of them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")


def shard_of(
    shape: tuple[int, ...], shard: tuple[int, int], draw: Callable[[tuple[int, ...]], Tensor]
) -> Tensor:
    """``draw`` for the global batch (rows × ranks), then this rank's contiguous rows.

    With ``shard=(rank, ranks)`` every rank makes the draws a single process would make for the
    whole global batch and keeps its own slice, so a data-parallel run draws exactly the v of
    a one-process run with the same global batch.
    """
    rank, ranks = shard
    if ranks == 1:
        return draw(shape)
    rows = shape[0]
    return draw((rows * ranks, *shape[1:]))[rank * rows : (rank + 1) * rows]


def sample_categorical(
    probs: Tensor, generator: torch.Generator, sampler: str, shard: tuple[int, int] = (0, 1)
) -> Tensor:
    """One class index per row of ``probs`` (non-negative rows, any total), shape (rows, 1).

    ``shard`` (rank, ranks) draws the global batch's uniforms and keeps this rank's rows; only
    the inverse-CDF sampler can do that (multinomial's draws depend on the other rows' data).
    """
    if sampler == "multinomial":
        return torch.multinomial(probs, 1, generator=generator)
    check_sampler(sampler)
    u = shard_of(
        (probs.shape[0], 1),
        shard,
        lambda shape: torch.rand(
            shape, generator=generator, device=probs.device, dtype=probs.dtype
        ),
    )
    return _inverse_cdf(probs, u)


def _below(total: Tensor) -> Tensor:
    """The largest float below each entry (0 stays 0): a target that stays inside its row."""
    return torch.nextafter(total, torch.zeros_like(total))


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """The first class whose cumulative probability exceeds u·total, in two levels.

    A row's cumulative sum is a sequential scan, as slow as the backward of a language model's
    head on a CPU; block sums are one vectorised pass. The block holding u·total is found in
    the cumulative sum of the block sums, the class in that block's own cumulative sum. The
    targets are kept strictly below each level's total, so a class of probability 0 is never
    chosen, whatever the rounding of either sum.
    """
    rows, classes = probs.shape
    width = _BLOCK
    blocks = -(-classes // width)
    whole = classes // width
    sums = probs.new_empty((rows, blocks))
    if whole:
        sums[:, :whole] = probs[:, : whole * width].unflatten(1, (whole, width)).sum(-1)
    if whole < blocks:
        sums[:, whole] = probs[:, whole * width :].sum(-1)
    cdf = sums.cumsum_(-1)
    target = torch.minimum(u * cdf[:, -1:], _below(cdf[:, -1:]))
    block = torch.searchsorted(cdf, target, right=True).clamp_(max=blocks - 1)
    before = cdf.gather(1, (block - 1).clamp_(min=0)).mul_(block > 0)
    columns = block * width + torch.arange(width, device=probs.device)
    inside = probs.gather(1, columns.clamp(max=classes - 1)).mul_(columns < classes)
    inner = inside.cumsum_(-1)
    rest = torch.minimum(target.sub_(before).clamp_(min=0), _below(inner[:, -1:]))
    sampled = torch.searchsorted(inner, rest, right=True).clamp_(max=width - 1)
    return sampled.add_(block * width).clamp_(max=classes - 1)


def _cross_entropy_loss(outputs: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    return F.cross_entropy(
        outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def _cross_entropy_terms(outputs: Tensor, targets: Tensor, ignore_index: int) -> int:
    return int((targets != ignore_index).sum().item())


def _cross_entropy_v(
    outputs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    ignore_index: int,
    sampler: str,
    shard: tuple[int, int],
    scale: float,
) -> Tensor:
    """scale·v, v = softmax(z) − onehot(ĉ), ĉ ~ Categorical(softmax(z)); 0 for ignored targets.

    Cov(onehot(ĉ)) = diag(p) − p pᵀ, the Hessian of softmax cross-entropy in z, so
    E[v vᵀ] = H_z exactly.
    """
    num_classes = outputs.shape[-1]
    # The softmax buffer becomes v in place: for a language model's logits every extra
    # buffer of this size is a large share of the step's time and peak memory.
    probs = torch.softmax(outputs.reshape(-1, num_classes), dim=-1, dtype=torch.float32)
    v = _v_from_probs(probs, targets, generator, ignore_index, sampler, shard, scale)
    return v.reshape(outputs.shape).to(outputs.dtype)


def _v_from_probs(
    probs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    ignore_index: int,
    sampler: str,
    shard: tuple[int, int],
    scale: float,
) -> Tensor:
    """scale·(probs − onehot(ĉ)), ĉ drawn from each row, 0 on ignored rows; in place."""
    sampled = sample_categorical(probs, generator, sampler, shard)
    probs.scatter_add_(1, sampled, torch.full_like(sampled, -1.0, dtype=probs.dtype))
    # The ignore mask and the scale in one pass over v.
    return probs.mul_((targets.reshape(-1, 1) != ignore_index).to(probs.dtype).mul_(scale))


def _mse_loss(outputs: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    return F.mse_loss(outputs, targets.reshape(outputs.shape))


def _mse_terms(outputs: Tensor, targets: Tensor, ignore_index: int) -> int:
    return outputs.shape[0]


def _mse_v(
    outputs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    ignore_index: int,
    sampler: str,
    shard: tuple[int, int],
    scale: float,
) -> Tensor:
    """scale·v, v = sqrt(c)·ξ, ξ Rademacher, c = 2/q: the Hessian diagonal of MSELoss(mean).

    ``sampler`` concerns categorical draws only and is ignored here.

    F.mse_loss averages over N examples × q outputs, so each example's term is
    (1/q)‖z − y‖², whose Hessian in z is (2/q)·I.
    """
    per_example = outputs[0].numel() if outputs.dim() > 1 else 1
    signs = shard_of(
        tuple(outputs.shape),
        shard,
        lambda shape: torch.randint(
            0, 2, shape, generator=generator, device=outputs.device, dtype=torch.int8
        ),
    )
    magnitude = math.sqrt(2.0 / per_example) * scale
    return signs.to(outputs.dtype).mul_(2 * magnitude).sub_(magnitude)


LOSS_RULES: dict[str, LossRule] = {
    "cross_entropy": LossRule(_cross_entropy_loss, _cross_entropy_terms, _cross_entropy_v),
    "mse": LossRule(_mse_loss, _mse_terms, _mse_v),
}


def get_loss_rule(loss: str) -> LossRule:
    """The rule registered for ``loss``; a ValueError lists the supported losses otherwise."""
    try:
        return LOSS_RULES[loss]
    except KeyError:
        known = ", ".join(sorted(LOSS_RULES))
        raise ValueError(
            f"loss={loss!r} has no Hessian-imitation rule; supported losses: {known}"
        ) from None


def aux_vector(
    loss: str,
    outputs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    *,
    ignore_index: int = -100,
    sampler: str = "inverse_cdf",
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """Draw v (detached, shaped like ``outputs``) with E[v] = 0 and E[v vᵀ] = H_z per term.

    ``sampler``: how cross-entropy draws its labels (SAMPLERS; the module docstring).
    ``shard``: (rank, ranks) of a data-parallel run whose ranks hold equal, contiguous slices
    of the global batch (see :func:`shard_of`).
    """
    check_sampler(sampler)
    rule = get_loss_rule(loss)
    return rule.draw_v(outputs.detach(), targets, generator, ignore_index, sampler, shard, 1.0)


def num_loss_terms(loss: str, outputs: Tensor, targets: Tensor, ignore_index: int = -100) -> int:
    """N: the number of terms the loss averages (tokens for LMs, examples otherwise)."""
    return get_loss_rule(loss).num_terms(outputs, targets, ignore_index)


def aux_grad_outputs(
    loss: str,
    outputs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    *,
    ignore_index: int = -100,
    sampler: str = "inverse_cdf",
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, int]:
    """∂L_aux/∂outputs = v/N (detached) and N: the same draws as :func:`aux_loss`.

    ``torch.autograd.grad(outputs, params, grad_outputs=v/N)`` is ∇L_aux without forming
    L_aux: no dot product over the outputs and no outputs-sized buffer in its backward.
    """
    check_sampler(sampler)
    rule = get_loss_rule(loss)
    n = max(rule.num_terms(outputs, targets, ignore_index), 1)
    v = rule.draw_v(outputs.detach(), targets, generator, ignore_index, sampler, shard, 1.0 / n)
    return v, n


_VIEWS = ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0")


def _saved_int(node: Any, name: str) -> int:
    """An integer the graph saved; torch stores some (ignore_index, dim) as unsigned 64-bit."""
    value = int(saved_attribute(node, name))
    return value - 2**64 if value >= 2**63 else value


def is_mean_cross_entropy(loss: Tensor, outputs: Tensor, ignore_index: int) -> bool:
    """Whether ``loss``'s graph is exactly the mean cross-entropy of ``outputs``.

    That is F.cross_entropy(outputs viewed as (rows, classes), targets, ignore_index) with no
    class weights, label smoothing or other term: nll(log_softmax(view(outputs))), mean.
    Its gradient with respect to ``outputs`` is then mask·(p − onehot(y))/N, from which
    :func:`aux_grad_outputs_from_loss_gradient` recovers p without a softmax.
    """
    node = loss.grad_fn
    if type(node).__name__ != "NllLossBackward0" or outputs.grad_fn is None:
        return False
    reduction, weight = saved_attribute(node, "reduction"), saved_attribute(node, "weight")
    if reduction != 1 or weight is not None or _saved_int(node, "ignore_index") != ignore_index:
        return False
    node = node.next_functions[0][0]
    if type(node).__name__ != "LogSoftmaxBackward0":
        return False
    if _saved_int(node, "dim") not in (-1, saved_attribute(node, "result").dim() - 1):
        return False
    node = node.next_functions[0][0]
    while type(node).__name__ in _VIEWS and node is not outputs.grad_fn:
        node = node.next_functions[0][0]
    return node is outputs.grad_fn


def aux_grad_outputs_from_loss_gradient(
    loss_grad: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    *,
    ignore_index: int = -100,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, int]:
    """v/N and N from G = ∂loss/∂outputs of the mean cross-entropy, overwriting G.

    G = mask·(p − onehot(y))/N, so p = N·G + onehot(y) on kept rows: the softmax the loss's
    backward already computed, recovered in one pass instead of recomputed. The labels are
    drawn by the inverse-CDF sampler, the same uniforms as :func:`aux_grad_outputs` (the
    draws agree up to the rounding of p). Only valid when :func:`is_mean_cross_entropy`
    holds for the loss that produced G.
    """
    num_classes = loss_grad.shape[-1]
    loss_grad = loss_grad.contiguous()
    probs = loss_grad.view(-1, num_classes)
    labels = targets.reshape(-1, 1)
    keep = labels != ignore_index
    n = max(int(keep.sum().item()), 1)
    probs.mul_(n).scatter_add_(1, labels.where(keep, 0), keep.to(probs.dtype))
    _v_from_probs(probs, targets, generator, ignore_index, "inverse_cdf", shard, 1.0 / n)
    return loss_grad, n


def aux_loss(
    loss: str,
    outputs: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    *,
    ignore_index: int = -100,
    sampler: str = "inverse_cdf",
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, int]:
    """The auxiliary loss (1/N) Σ_n v_n · z_n on the training graph, and N.

    N is at least 1 so a batch whose targets are all ignored gives a zero auxiliary loss.
    """
    v = aux_vector(
        loss, outputs, targets, generator, ignore_index=ignore_index, sampler=sampler, shard=shard
    )
    n = max(num_loss_terms(loss, outputs, targets, ignore_index), 1)
    # Σ v·z as a dot product: no outputs-sized product buffer; its gradient is still v / N.
    return torch.dot(v.reshape(-1), outputs.reshape(-1)) / n, n


def per_example_curvature(
    model: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: str,
    generator: torch.Generator,
    *,
    params: Sequence[str] | None = None,
    ignore_index: int = -100,
    sampler: str = "inverse_cdf",
) -> dict[str, Tensor]:
    """Exact per-example mode: Σ_n (J_nᵀ v_n)² / N², without cross-sample noise.

    Where h = ((1/N) Σ_n J_nᵀ v_n)² mixes the examples (cross terms with zero mean), this sums
    the squares of the per-example terms, which has the same expectation,
    (1/N²) Σ_n diag(J_nᵀ H_z J_n), and far less variance. Costs one per-example gradient for
    every example (torch.func.vmap): meant for checking the estimator on small models.

    Returns a dict name → tensor for the named parameters (all trainable ones by default).
    Each example must be its own batch element: ``inputs[n]`` → one row of outputs (for
    sequence outputs the tokens of row n form that example's terms).
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        names = [n for n in names if n in set(params)]
    detached = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        outputs = model(inputs)
    v = aux_vector(loss, outputs, targets, generator, ignore_index=ignore_index, sampler=sampler)
    n_terms = max(num_loss_terms(loss, outputs, targets, ignore_index), 1)

    def example_aux(trainable: dict[str, Tensor], x: Tensor, v_n: Tensor) -> Tensor:
        out = functional_call(model, {**detached, **trainable}, (x.unsqueeze(0),))
        return (out.squeeze(0) * v_n).sum()

    trainable = {n: detached[n] for n in names}
    per_example = vmap(grad(example_aux), in_dims=(None, 0, 0), randomness="same")(
        trainable, inputs, v
    )
    return {n: g.pow(2).sum(0) / n_terms**2 for n, g in per_example.items()}
