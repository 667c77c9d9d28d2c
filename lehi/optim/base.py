"""The part every curvature-aware optimizer shares: one backward call for g and h.

A curvature-aware optimizer (LEHI, LEHIBrid, SophiaG) replaces ``loss.backward()`` in a training
loop by ``optimizer.backward(loss, outputs, targets)``. On steps that refresh the curvature it
runs two backward passes through the same graph: the ordinary one and one of the auxiliary
loss (1/N) Σ_n v_n · z_n (lehi.curvature), whose gradient is folded into the optimizer state
parameter by parameter as autograd produces it. The model is never run twice. The auxiliary
pass goes first (graph retained) unless the fold reads the ordinary gradient (LEHIBrid) or a
distributed trainer averages gradients; the first pass keeps the graph alive, so whichever
pass comes second is the one that frees it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lehi.curvature import (
    aux_loss,
    check_sampler,
    get_loss_rule,
    num_loss_terms,
    per_example_curvature,
)

__all__ = ["CurvatureOptimizer", "check_hyperparameters"]


def check_hyperparameters(
    *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, hessian_every: int
) -> None:
    """Raise a ValueError naming the first hyper-parameter outside its allowed range."""
    if not (isinstance(lr, Tensor) or lr > 0.0):
        raise ValueError(f"lr must be > 0, got {lr}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not (isinstance(hessian_every, int) and hessian_every >= 1):
        raise ValueError(f"hessian_every must be an integer >= 1, got {hessian_every!r}")


class CurvatureOptimizer(Optimizer):
    """Base class: the curvature pass, its random generator and its bookkeeping.

    Subclasses implement ``_fold(p, group, h, n)``, which adds one parameter's
    Hessian-imitation vector h (the squared auxiliary gradient, before any N-scaling) to the
    state. They may override ``_fold_aux_grad(p, group, a, n)``, which receives the auxiliary
    gradient a itself (default: ``_fold(p, group, a.square(), n)``), to fold a⊙a without
    materialising it; set ``_streams_curvature = False`` when the fold needs every
    parameter's auxiliary gradient at once (e.g. to clip their joint norm); and set
    ``_fold_reads_gradient = True`` when the fold reads ``p.grad`` (the ordinary gradient).

    Attributes:
        curvature_passes: auxiliary backward passes run so far (saved in the state dict).
        num_loss_terms: N of the last curvature pass (the global N after a cross-rank mean).
        reduce_curvature_grads: set by a distributed trainer to average the auxiliary gradients
            across ranks exactly like the ordinary gradients (an in-place all-reduce mean).
    """

    #: Fold each parameter's auxiliary gradient as soon as backward produces it, so no second
    #: full set of gradient buffers is ever alive.
    _streams_curvature = True
    #: Whether the fold reads p.grad. When it does not (and no distributed trainer averages
    #: the gradients), the auxiliary pass runs first and the ordinary backward second: the
    #: auxiliary pass then never coexists with a full set of ordinary gradients, and the
    #: ordinary backward frees the graph as it goes, as it would without curvature.
    _fold_reads_gradient = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        loss: str,
        ignore_index: int,
        seed: int | None,
        estimator: str,
        estimators: Sequence[str],
        sampler: str = "multinomial",
    ) -> None:
        get_loss_rule(loss)
        if estimator not in estimators:
            raise ValueError(f"estimator={estimator!r} is not one of {', '.join(estimators)}")
        check_sampler(sampler)
        super().__init__(params, defaults)
        self.loss = loss
        self.ignore_index = ignore_index
        self.estimator = estimator
        self.sampler = sampler
        # Drawn from torch's global RNG when not given, so torch.manual_seed fixes it too.
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.curvature_passes = 0
        self.num_loss_terms: int | None = None
        self.reduce_curvature_grads: Callable[[list[Tensor]], None] | None = None
        #: (rank, ranks) of a data-parallel run: v is drawn for the global batch and sliced.
        self.shard: tuple[int, int] = (0, 1)
        # Auxiliary gradients of the micro-batches of the current step (gradient accumulation).
        self._accumulated: list[Tensor] | None = None
        self._accumulated_terms = 0
        self._generator: torch.Generator | None = None
        self._pending_generator_state: tuple[str, Tensor] | None = None
        self._curvature_ready_at: int | None = None

    # ----------------------------------------------------------------- schedule and generator
    def steps_taken(self) -> int:
        """Optimizer steps completed so far (from the saved per-parameter step counters)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    return int(state["step"])
        return 0

    def wants_curvature(self) -> bool:
        """Whether the coming step refreshes the curvature: steps 1, 1 + k, 1 + 2k, …"""
        return self.steps_taken() % self.param_groups[0]["hessian_every"] == 0

    def needs_aux_pass(self) -> bool:
        """Whether the coming step needs the auxiliary backward pass (not for g⊙g)."""
        return self.estimator != "squared_gradient" and self.wants_curvature()

    def curvature_generator(self, device: torch.device) -> torch.Generator:
        """The generator every draw of v comes from, on ``device`` (created on first use)."""
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            pending = self._pending_generator_state
            if pending is not None and pending[0] == device.type:
                self._generator.set_state(pending[1])
                self._pending_generator_state = None
        return self._generator

    # ------------------------------------------------------------------------ the one call
    def backward(
        self,
        loss: Tensor,
        outputs: Tensor,
        targets: Tensor,
        *,
        model: torch.nn.Module | None = None,
        inputs: Tensor | None = None,
        micro_batch: tuple[int, int] = (0, 1),
    ) -> None:
        """Fill ``.grad`` with ∇loss and, on refresh steps, fold h into the state.

        Args:
            loss: the training loss computed from ``outputs`` (mean over N loss terms), already
                divided by the number of micro-batches when gradients are accumulated.
            outputs: the tensor the loss consumed (logits or predictions), still on the graph.
            targets: the loss's targets; ignored targets contribute nothing to h.
            model, inputs: needed only by ``estimator="per_example"``.
            micro_batch: (i, k) for the i-th of k micro-batches of one step. The auxiliary
                gradients of the k micro-batches are summed (each divided by k, like the loss)
                and h is their square, folded after the last: the h of the whole step's batch.
        """
        if not self.needs_aux_pass():
            loss.backward()
            return
        generator = self.curvature_generator(outputs.device)
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if micro_batch[1] > 1:
            self._accumulate(loss, outputs, targets, generator, params, micro_batch)
            return
        if self.estimator == "per_example":
            loss.backward()
            self._per_example_pass(params, model, inputs, outputs, targets, generator)
        elif self._fold_reads_gradient or self.reduce_curvature_grads is not None:
            # DistributedDataParallel ties its gradient averaging to the first backward after
            # the forward, so under a distributed trainer the ordinary backward comes first.
            loss.backward(retain_graph=True)
            aux, n = self._aux_loss(outputs, targets, generator)
            self._auxiliary_pass(aux, params, n, retain_graph=False)
        else:
            aux, n = self._aux_loss(outputs, targets, generator)
            self._auxiliary_pass(aux, params, n, retain_graph=True)
            del aux  # the ordinary backward below frees the graph; nothing else may hold it
            loss.backward()
        self.curvature_passes += 1
        self._curvature_ready_at = self.steps_taken()

    def _accumulate(
        self,
        loss: Tensor,
        outputs: Tensor,
        targets: Tensor,
        generator: torch.Generator,
        params: list[Tensor],
        micro_batch: tuple[int, int],
    ) -> None:
        """One micro-batch of an accumulated step; folds h after the last one."""
        if self.estimator == "per_example":
            raise ValueError("estimator='per_example' does not support gradient accumulation")
        i, k = micro_batch
        loss.backward(retain_graph=True)
        aux, n = self._aux_loss(outputs, targets, generator)
        grads = torch.autograd.grad(aux / k, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if i == 0 or self._accumulated is None:
            self._accumulated, self._accumulated_terms = grads, n
        else:
            torch._foreach_add_(self._accumulated, grads)
            self._accumulated_terms += n
        if i < k - 1:
            return
        grads, n = self._accumulated, self._accumulated_terms
        self._accumulated, self._accumulated_terms = None, 0
        self._fold_materialised(params, grads, n)
        self.curvature_passes += 1
        self._curvature_ready_at = self.steps_taken()

    def _aux_loss(
        self, outputs: Tensor, targets: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, int]:
        return aux_loss(
            self.loss,
            outputs,
            targets,
            generator,
            ignore_index=self.ignore_index,
            sampler=self.sampler,
            shard=self.shard,
        )

    def _auxiliary_pass(
        self, aux: Tensor, params: list[Tensor], n: int, *, retain_graph: bool
    ) -> None:
        group_of = self._group_of()
        if self._streams_curvature and self.reduce_curvature_grads is None:
            self.num_loss_terms = n
            handles = [p.register_hook(partial(self._fold_hook, p, group_of[p], n)) for p in params]
            try:
                torch.autograd.grad(aux, params, allow_unused=True, retain_graph=retain_graph)
            finally:
                for handle in handles:
                    handle.remove()
            return
        grads = list(torch.autograd.grad(aux, params, allow_unused=True, retain_graph=retain_graph))
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        self._fold_materialised(params, grads, n)

    def _fold_materialised(self, params: list[Tensor], grads: list[Tensor], n: int) -> None:
        """Fold a full set of auxiliary gradients: averaged across ranks, prepared, squared."""
        if self.reduce_curvature_grads is not None:
            self.reduce_curvature_grads(grads)
            n = self._global_loss_terms(n)
        self.num_loss_terms = n
        self._prepare_aux_grads(grads)
        group_of = self._group_of()
        with torch.no_grad():
            self._fold_aux_grads(params, grads, [group_of[p] for p in params], n)

    def _fold_hook(self, p: Tensor, group: dict[str, Any], n: int, aux_grad: Tensor) -> Tensor:
        with torch.no_grad():
            self._fold_aux_grad(p, group, aux_grad, n)
        # A zero-strided zero keeps autograd.grad from holding a second set of gradients.
        return aux_grad.new_zeros(()).expand_as(aux_grad)

    def _fold_aux_grad(self, p: Tensor, group: dict[str, Any], a: Tensor, n: int) -> None:
        """Fold one parameter's auxiliary gradient a, i.e. h = a⊙a (no N-scaling yet)."""
        self._fold(p, group, a.square(), n)

    def _fold_aux_grads(
        self, params: list[Tensor], grads: list[Tensor], groups: list[dict[str, Any]], n: int
    ) -> None:
        """Fold a full set of auxiliary gradients (the non-streaming path)."""
        for p, a, group in zip(params, grads, groups):
            self._fold_aux_grad(p, group, a, n)

    def _per_example_pass(
        self,
        params: list[Tensor],
        model: torch.nn.Module | None,
        inputs: Tensor | None,
        outputs: Tensor,
        targets: Tensor,
        generator: torch.Generator,
    ) -> None:
        if model is None or inputs is None:
            raise ValueError("estimator='per_example' needs backward(..., model=, inputs=)")
        h = per_example_curvature(
            model,
            inputs,
            targets,
            self.loss,
            generator,
            ignore_index=self.ignore_index,
            sampler=self.sampler,
        )
        n = max(num_loss_terms(self.loss, outputs, targets, self.ignore_index), 1)
        self.num_loss_terms = n
        name_of = {p: name for name, p in model.named_parameters()}
        group_of = self._group_of()
        with torch.no_grad():
            for p in params:
                if p in name_of:
                    # h is already Σ_n (J_nᵀ v_n)² / N²; _fold squares nothing more.
                    self._fold(p, group_of[p], h[name_of[p]], n)

    def _global_loss_terms(self, n: int) -> int:
        """N summed over ranks when the auxiliary gradients are averaged across them."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = torch.tensor([n], dtype=torch.float64)
            torch.distributed.all_reduce(total)
            return int(total.item())
        return n

    def _prepare_aux_grads(self, grads: list[Tensor]) -> None:
        """Hook for subclasses that transform the full set of auxiliary gradients."""

    def _group_of(self) -> dict[Tensor, dict[str, Any]]:
        return {p: g for g in self.param_groups for p in g["params"]}

    def _check_curvature_arrived(self) -> None:
        if self.needs_aux_pass() and self._curvature_ready_at != self.steps_taken():
            raise RuntimeError(
                f"{type(self).__name__} refreshes its curvature at step {self.steps_taken() + 1}: "
                "call optimizer.backward(loss, outputs, targets) instead of loss.backward()"
            )

    # ------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        generator = None
        if self._generator is not None:
            generator = (self._generator.device.type, self._generator.get_state())
        elif self._pending_generator_state is not None:
            generator = self._pending_generator_state
        state["curvature"] = {
            "seed": self.seed,
            "generator": generator,
            "passes": self.curvature_passes,
            "num_loss_terms": self.num_loss_terms,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        curvature = state_dict.pop("curvature", None)
        super().load_state_dict(state_dict)
        if curvature is None:
            return
        self.seed = int(curvature["seed"])
        self.curvature_passes = int(curvature["passes"])
        self.num_loss_terms = curvature["num_loss_terms"]
        self._generator = None
        generator = curvature["generator"]
        self._pending_generator_state = (
            None if generator is None else (generator[0], generator[1].to("cpu", torch.uint8))
        )


def bias_corrections(beta: float, steps: Sequence[Tensor], enabled: bool = True) -> list[float]:
    """1 − β^t for each step counter (1.0 everywhere when bias correction is off)."""
    if not enabled:
        return [1.0] * len(steps)
    return [1.0 - beta ** float(s) for s in steps]


def sqrt_all(values: Sequence[float]) -> list[float]:
    return [math.sqrt(v) for v in values]
