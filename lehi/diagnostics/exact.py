"""Exact diagonals of the Hessian and of the Gauss–Newton matrix of the *original* loss.

Both are diagonals for the loss the trainer minimises on a batch: f(w) = (1/N) Σ_n ℓ_n(z_n(w)),
the loss rule's own reduction (lehi.curvature), with z_n the model output of example n.

- ``hessian_diagonal``: diag ∇²f. By definition one second directional derivative per
  parameter, d²f/dw_i² = eᵢᵀ ∇²f eᵢ, by forward-over-forward mode (torch.func.jvp of jvp),
  vmapped over chunks of one-hot tangents; the tangent of a parameter tensor enters only that
  tensor, so the layers before it run without tangents. For nn.Linear and nn.Conv2d layers the
  same numbers come far cheaper from the Hessian in the layer's output (the layer is linear in
  its own weights): one Hessian-vector product per output unit (per output channel and
  position for convolutions) instead of one per weight. Meant for models up to ~20k parameters.
- ``gauss_newton_diagonal``: (1/N) Σ_n diag(J_nᵀ H_z,n J_n) from per-example Jacobians
  (torch.func.vmap of jacrev) and the per-example output Hessians H_z,n = ∇²_z ℓ_n, obtained by
  torch.func.hessian of the loss itself (not from the v-rules of lehi.curvature, so the two
  are independent checks of each other).

The two differ by the residual term (1/N) Σ_n Σ_k (∂ℓ_n/∂z_nk) diag(∇²_w z_nk). For networks
that are piecewise linear in each single weight (ReLU, max-pool, linear layers) that diagonal
vanishes almost everywhere, so diag H = diag GN exactly; smooth activations (tanh, GELU) make
them differ.

Per-example quantities need examples that do not interact: one loss term per example (outputs
of shape (N, q)), and no BatchNorm in training mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

from lehi.curvature import get_loss_rule, num_loss_terms

__all__ = [
    "check_per_example_model",
    "gauss_newton_diagonal",
    "hessian_diagonal",
    "layer_of",
    "trainable_parameters",
]


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Detached trainable parameters by name, in the model's order."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def layer_of(name: str) -> str:
    """The layer (owning module) of a parameter: ``net.0.weight`` → ``net.0``."""
    return name.rsplit(".", 1)[0] if "." in name else name


def check_per_example_model(model: nn.Module) -> None:
    """ValueError when examples interact in the forward pass (BatchNorm in training mode)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"module {name!r} is BatchNorm in training mode: examples interact, so the "
                "per-example diagonals are undefined; use model.eval() or a model without it"
            )


def _frozen(model: nn.Module) -> dict[str, Tensor]:
    """Everything functional_call needs besides the trainable parameters (buffers, frozen)."""
    state = {n: b.detach() for n, b in model.named_buffers()}
    state.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    return state


def _batch_loss(
    model: nn.Module, loss: str, inputs: Tensor, targets: Tensor, ignore_index: int
) -> Callable[[dict[str, Tensor]], Tensor]:
    rule = get_loss_rule(loss)
    frozen = _frozen(model)

    def f(params: dict[str, Tensor]) -> Tensor:
        outputs = functional_call(model, {**frozen, **params}, (inputs,))
        return rule.loss(outputs, targets, ignore_index)

    return f


def _one_hot_rows(count: int, start: int, stop: int, like: Tensor) -> Tensor:
    """Rows start..stop-1 of the identity of size ``count`` (dtype/device of ``like``)."""
    rows = torch.zeros(stop - start, count, dtype=like.dtype, device=like.device)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    return rows


def _per_parameter_diagonal(
    f: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    name: str,
    chunk_size: int,
) -> Tensor:
    """diag ∇²f for one parameter tensor: one second directional derivative per entry."""
    theta = params[name]
    others = {n: p for n, p in params.items() if n != name}

    def f_of(t: Tensor) -> Tensor:
        return f({**others, name: t})

    def second_derivative(e: Tensor) -> Tensor:
        # d²/dt² f(θ + t e) at t = 0, i.e. eᵀ ∇²f e, by forward mode twice.
        return jvp(lambda t: jvp(f_of, (t,), (e,))[1], (theta,), (e,))[1]

    k = theta.numel()
    values = []
    for start in range(0, k, chunk_size):
        stop = min(start + chunk_size, k)
        tangents = _one_hot_rows(k, start, stop, theta).view(stop - start, *theta.shape)
        values.append(vmap(second_derivative)(tangents))
    return torch.cat(values).view_as(theta)


def _patches(module: nn.Module, a: Tensor) -> Tensor | None:
    """The layer's input as (N, K, P): s[n, c, p] = Σ_k W[c, k] · patches[n, k, p] + b[c].

    None when the layer is not one this unfolding covers (then the caller falls back).
    """
    if type(module) is nn.Linear:
        return a.unsqueeze(2) if a.dim() == 2 else None
    if type(module) is nn.Conv2d:
        if module.groups != 1 or isinstance(module.padding, str) or a.dim() != 4:
            return None
        if module.padding_mode != "zeros":
            return None
        return F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    return None


def _output_space_diagonal(
    f: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    module: nn.Module,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None] | None:
    """diag ∇²f for a Linear or Conv2d layer's weight and bias through the Hessian in its output.

    The output s[n, c, p] = Σ_k W[c, k] U[n, k, p] + b[c] (p: positions; one for Linear) is
    linear in (W, b), so, with examples that do not interact (H_s block-diagonal over n),

        d²f/dW[c, k]² = Σ_n Σ_{p,p'} U[n, k, p] · ∂²f/∂s[n,c,p]∂s[n,c,p'] · U[n, k, p'],
        d²f/db[c]²    = Σ_n Σ_{p,p'} ∂²f/∂s[n,c,p]∂s[n,c,p'].

    One Hessian-vector product in s per output coordinate (c, p), with the tangent set in every
    example at once, gives those blocks for all n: C·P products instead of one per weight.
    Returns None when the layer is not used exactly once on inputs ``_patches`` covers, or when
    C·P is not below the number of weights; the caller then uses the per-entry method.
    """
    captured: list[tuple[Tensor, Tensor]] = []

    def capture(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        captured.append((args[0].detach(), out.detach()))

    handle = module.register_forward_hook(capture)
    try:
        with torch.no_grad():
            f(params)
    finally:
        handle.remove()
    if len(captured) != 1:
        return None
    a, s = captured[0]
    patches = _patches(module, a)
    if patches is None:
        return None
    n, channels = s.shape[0], s.shape[1]
    positions = s[0, 0].numel()
    weight = module.weight
    if channels * positions >= weight.numel():
        return None
    shift: dict[str, Tensor] = {}

    def add_shift(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return out + shift["delta"]

    def f_of_shift(delta: Tensor) -> Tensor:
        shift["delta"] = delta
        return f(params)

    width = channels * positions
    blocks = []  # per output coordinate (c, p): ∂²f/∂s[n,c,p]∂s[n,c,·], shape (N, P)
    handle = module.register_forward_hook(add_shift)
    try:
        # Reverse over reverse: H_s is symmetric, so the vjp of ∇_s f is H_s t. (Forward over
        # reverse trips on MSE's backward formula under torch.func.)
        _, hessian_product = vjp(grad(f_of_shift), torch.zeros_like(s))
        for start in range(0, width, chunk_size):
            stop = min(start + chunk_size, width)
            rows = _one_hot_rows(width, start, stop, s)
            tangents = rows[:, None, :].expand(-1, n, -1).reshape(stop - start, *s.shape)
            (columns,) = vmap(hessian_product)(tangents.contiguous())
            columns = columns.reshape(stop - start, n, channels, positions)
            own_channel = torch.arange(start, stop) // positions
            blocks.append(columns[torch.arange(stop - start), :, own_channel])
    finally:
        handle.remove()
    # (C·P, N, P) → B[n, c, p, p'].
    b = torch.cat(blocks).reshape(channels, positions, n, positions).permute(2, 0, 1, 3)
    diag_weight = torch.einsum("nkp,ncpq,nkq->ck", patches, b, patches).reshape(weight.shape)
    diag_bias = b.sum(dim=(0, 2, 3)) if module.bias is not None else None
    return diag_weight, diag_bias


def hessian_diagonal(
    model: nn.Module,
    loss: str,
    inputs: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    structured: bool = True,
) -> dict[str, Tensor]:
    """Exact diag ∇²f of the batch loss f = loss(model(inputs), targets), by parameter name.

    With ``structured`` (default), the weight and bias of nn.Linear and nn.Conv2d layers go
    through the Hessian in the layer's output (exact as well, and far cheaper; see
    ``_output_space_diagonal``); every other parameter gets one forward-over-forward second
    derivative per entry, ``chunk_size`` one-hot tangents at a time (memory grows as
    chunk_size × batch × activations). ``structured=False`` uses the per-entry method for all,
    the plain definition, kept as the reference the structured path is tested against.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    params = trainable_parameters(model)
    f = _batch_loss(model, loss, inputs, targets, ignore_index)
    diagonal: dict[str, Tensor] = {}
    if structured:
        check_per_example_model(model)
        for prefix, module in model.named_modules():
            if type(module) not in (nn.Linear, nn.Conv2d):
                continue
            names = [f"{prefix}.{k}" if prefix else k for k, _ in module.named_parameters()]
            if not names or not all(n in params for n in names):
                continue
            result = _output_space_diagonal(f, params, module, chunk_size)
            if result is not None:
                weight, bias = result
                diagonal[names[0]] = weight
                if bias is not None:
                    diagonal[names[1]] = bias
    for name in params:
        if name not in diagonal:
            diagonal[name] = _per_parameter_diagonal(f, params, name, chunk_size)
    return {name: diagonal[name] for name in params}


def gauss_newton_diagonal(
    model: nn.Module,
    loss: str,
    inputs: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """Exact (1/N) Σ_n diag(J_nᵀ H_z,n J_n) by parameter name (N = the loss's term count).

    J_n = ∂z_n/∂w per example (``chunk_size`` examples at a time), H_z,n = ∇²_z ℓ_n with ℓ_n
    the loss of example n alone; examples whose target is ``ignore_index`` contribute nothing.
    """
    check_per_example_model(model)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rule = get_loss_rule(loss)
    params = trainable_parameters(model)
    frozen = _frozen(model)
    with torch.no_grad():
        outputs = functional_call(model, {**frozen, **params}, (inputs,))
    if outputs.dim() != 2:
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)}: the per-example diagonals need one loss "
            "term per example, i.e. outputs (N, q)"
        )
    n_terms = max(num_loss_terms(loss, outputs, targets, ignore_index), 1)

    def example_output(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**frozen, **p}, (x.unsqueeze(0),)).squeeze(0)

    def example_loss(z: Tensor, y: Tensor) -> Tensor:
        return rule.loss(z.unsqueeze(0), y.unsqueeze(0), ignore_index)

    output_hessians = vmap(hessian(example_loss))(outputs, targets)  # (N, q, q)
    keep = torch.tensor(
        [
            rule.num_terms(outputs[i : i + 1], targets[i : i + 1], ignore_index) > 0
            for i in range(len(targets))
        ],
        device=outputs.device,
    )
    # A lone ignored target makes ℓ_n 0/0; torch.where drops that NaN instead of spreading it.
    output_hessians = torch.where(keep[:, None, None], output_hessians, 0.0)

    diagonal = {n: torch.zeros_like(p) for n, p in params.items()}
    jacobian = vmap(jacrev(example_output), in_dims=(None, 0))
    for start in range(0, len(inputs), chunk_size):
        stop = min(start + chunk_size, len(inputs))
        jac = jacobian(params, inputs[start:stop])
        h_z = output_hessians[start:stop]
        for name, j in jac.items():
            j = j.reshape(stop - start, outputs.shape[1], -1)
            diagonal[name] += torch.einsum("nqa,nqr,nra->a", j, h_z, j).view_as(params[name])
    return {n: d / n_terms for n, d in diagonal.items()}
