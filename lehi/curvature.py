"""Hessian imitation: the auxiliary loss of LEHI and the rules that draw its vector v.

For a batch of N loss terms with outputs z_n = p(w, x_n) (logits, predictions), the auxiliary
loss is

    L_aux(w) = (1/N) Σ_n v_n · z_n(w),      v_n detached,

with E[v_n] = 0 and E[v_n v_nᵀ] = H_z(z_n, y_n), the Hessian of the per-term loss with respect
to the output. Its gradient (1/N) Σ_n J_nᵀ v_n costs one extra backward pass through the
training graph, and h = (∇L_aux)² satisfies E[h] = (1/N²) Σ_n diag(J_nᵀ H_z J_n): the diagonal
of the mini-batch Gauss–Newton matrix divided by N (see ../shared/docs/METHOD.md).

This module is the only place that knows how v is drawn for each loss. A loss rule bundles the
loss itself (as the trainer computes it), the draw of v and the count N of loss terms.

Cross-entropy draws a label per loss term from softmax(z) with one of two samplers (SAMPLERS),
the same distribution by two algorithms:
    "inverse_cdf"   (the default) one uniform variate per term, located in the row's
                    cumulative sum (searchsorted), a block of rows at a time so that no second
                    vocabulary-sized buffer exists. Exactly Categorical(softmax(z)) up to
                    float32 rounding of the cumulative sum; an order of magnitude cheaper than
                    multinomial for large vocabularies, and the only sampler whose draws a
                    data-parallel run can slice by rank (see shard_of).
    "multinomial"   torch.multinomial: the draws torch's own call makes from the same
                    generator state, as the official SophiaG code samples; kept to reproduce
                    that code's random stream draw for draw. It draws one exponential variate
                    per class per term, sequentially on CPU: for a language model's
                    vocabulary this costs more than the backward pass.

The optimizers never build L_aux itself: its gradient with respect to the outputs is v/N
(:func:`aux_grad_outputs`), which they hand to autograd as the outputs' gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSS_RULES",
    "SAMPLERS",
    "LossRule",
    "aux_grad_outputs",
    "aux_loss",
    "aux_vector",
    "get_loss_rule",
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
#: Elements of one block of cumulative sums in the inverse-CDF sampler (1 MiB of float32):
#: small enough to stay in cache, large enough that the Python loop over blocks costs nothing.
_CDF_BLOCK = 1 << 18


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
    """One class index per row of ``probs`` (rows summing to 1), shape (rows, 1).

    ``shard`` (rank, ranks) draws the global batch's uniforms and keeps this rank's rows; only
    the inverse-CDF sampler can do that (multinomial's draws depend on the other rows' data).
    """
    if sampler == "multinomial":
        return torch.multinomial(probs, 1, generator=generator)
    check_sampler(sampler)
    rows, classes = probs.shape
    u = shard_of(
        (rows, 1),
        shard,
        lambda shape: torch.rand(
            shape, generator=generator, device=probs.device, dtype=probs.dtype
        ),
    )
    sampled = torch.empty((rows, 1), dtype=torch.long, device=probs.device)
    # Rows are independent, so blocks of rows give the draws of one full cumulative sum
    # without its vocabulary-sized buffer.
    block = max(1, _CDF_BLOCK // max(classes, 1))
    for lo in range(0, rows, block):
        cdf = probs[lo : lo + block].cumsum(dim=-1)
        # The first class whose cumulative probability exceeds u·total: classes of
        # probability 0 are never chosen; the clamp only catches u·total rounding up.
        torch.searchsorted(
            cdf, u[lo : lo + block].mul_(cdf[:, -1:]), right=True, out=sampled[lo : lo + block]
        )
    return sampled.clamp_(max=classes - 1)


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
    v = torch.softmax(outputs.detach().reshape(-1, num_classes), dim=-1, dtype=torch.float32)
    sampled = sample_categorical(v, generator, sampler, shard)
    v.scatter_add_(1, sampled, torch.full_like(sampled, -1.0, dtype=v.dtype))
    # The ignore mask and the scale in one pass over v.
    v.mul_((targets.reshape(-1, 1) != ignore_index).to(v.dtype).mul_(scale))
    return v.reshape(outputs.shape).to(outputs.dtype)


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
