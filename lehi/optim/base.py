"""The part every curvature-aware optimizer shares: one backward call for g and h.

A curvature-aware optimizer (LEHI, LEHIBrid, SophiaG) replaces ``loss.backward()`` in a training
loop by ``optimizer.backward(loss, outputs, targets)``. On steps that refresh the curvature it
runs two backward passes through the same graph: the ordinary one and one of the auxiliary
loss (1/N) Σ_n v_n · z_n (lehi.curvature), entered as the outputs' gradient v/N. The model is
never run twice. The first pass keeps the graph alive, so whichever pass comes second frees
it. The ordinary backward goes first when the loss is exactly the mean cross-entropy of the
outputs and labels are drawn by the inverse-CDF sampler (its gradient at the outputs then
holds the softmax, which v reuses instead of recomputing: lehi.curvature), when the fold
reads the ordinary gradient (LEHIBrid, LEHI's max_grad warm-up) and when a data-parallel
trainer averages gradients. Otherwise the auxiliary pass goes first, so that it never
coexists with a full set of ordinary gradients.

A subclass supplies one fold hook, :meth:`CurvatureOptimizer._fold`, which receives auxiliary
gradients a (h = a⊙a) and adds them to its state. The base calls it one parameter at a time
as autograd produces each a (so no second set of gradient buffers is ever alive) unless the
subclass needs every a at once (:meth:`_fold_needs_every_grad`, e.g. to clip their joint
norm), a data-parallel trainer averages them first, or several draws are averaged.

Parameters without curvature: a parameter that receives an ordinary gradient but no
auxiliary one (no path from it to the outputs, e.g. a penalty term) is never passed to
``_fold``; :meth:`_without_curvature` names them so the subclass's step can apply its rule.

The class keeps everything that reads and writes the per-optimizer state (the schedule, the
refresh bookkeeping, the generator, persistence); the pass itself, given its arguments, is
in lehi.optim.aux_pass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lehi.curvature import (
    aux_grad_outputs,
    aux_grad_outputs_from_loss_gradient,
    check_sampler,
    get_loss_rule,
    is_mean_cross_entropy,
    num_loss_terms,
)
from lehi.optim.aux_pass import aux_grads, per_example_roots, reduce_across_ranks, streaming_fold
from lehi.optim.common import COUNTERS, add_optional
from lehi.optim.misuse import check_outputs_and_targets

__all__ = ["CurvatureOptimizer"]


class CurvatureOptimizer(Optimizer, metaclass=abc.ABCMeta):
    """Base class: the curvature pass, its random generator and its bookkeeping.

    Subclasses implement the abstract ``_init_state(p, state)`` (fill a parameter's empty
    state) and ``_fold(params, groups, aux_grads, n)`` (the module docstring); a subclass
    missing either cannot be instantiated. They may override
    ``_fold_needs_every_grad()`` and ``_fold_reads_gradient()`` (both False by default).
    ``hessian_every`` must be the same in every parameter group: one auxiliary pass serves
    them all.

    Attributes:
        loss_name: the name of the loss whose Hessian is imitated (a lehi.curvature rule).
        curvature_passes: auxiliary backward passes run so far (saved in the state dict).
        num_loss_terms: N of the last curvature pass (the global N after a cross-rank mean).
    """

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
        sampler: str = "inverse_cdf",
    ) -> None:
        get_loss_rule(loss)
        if estimator not in estimators:
            raise ValueError(f"estimator={estimator!r} is not one of {', '.join(estimators)}")
        check_sampler(sampler)
        super().__init__(params, defaults)
        self.loss_name = loss
        self.ignore_index = ignore_index
        self.estimator = estimator
        self.sampler = sampler
        # Not given: the global generator's seed, read without drawing from it, so that
        # torch.manual_seed(s) fixes the draws too (as seed=s would) and the caller's own
        # random stream (data order, dropout) is the same as with any other optimizer.
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.curvature_passes = 0
        self.num_loss_terms: int | None = None
        #: How many independent draws of v the first refresh averages (a warm-up reading).
        self.first_refresh_draws = 1
        self._reduce_mean: Callable[[list[Tensor]], None] | None = None
        #: (rank, ranks) of a data-parallel run: v is drawn for the global batch and sliced.
        self._shard: tuple[int, int] = (0, 1)
        # Auxiliary gradients of the micro-batches of the current step (gradient accumulation).
        self._accumulated: list[Tensor | None] | None = None
        self._accumulated_terms = 0
        self._generator: torch.Generator | None = None
        self._pending_generator_state: tuple[str, Tensor] | None = None
        self._curvature_ready_at: int | None = None
        # The parameters whose auxiliary gradient was folded by the latest curvature pass.
        self._refreshed: set[Tensor] = set()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        every = sorted({g["hessian_every"] for g in self.param_groups})
        if len(every) > 1:
            self.param_groups.pop()
            raise ValueError(
                f"hessian_every must be the same in every parameter group (one curvature pass "
                f"serves them all), got {every}"
            )

    # ------------------------------------------------------------------ data-parallel runs
    def configure_data_parallel(
        self, reduce_mean: Callable[[list[Tensor]], None], rank: int, world_size: int
    ) -> None:
        """Take part in a data-parallel run of ``world_size`` ranks as rank ``rank``.

        ``reduce_mean`` averages a list of tensors in place across ranks (as the trainer
        averages the ordinary gradients); the auxiliary gradients go through it before they
        are squared, and N becomes the global number of loss terms. Draws of v: with the
        inverse-CDF sampler (and for MSE, whose signs need no class probabilities) every rank
        draws the global batch's v and keeps its slice, exactly the draws of a one-process run
        with the same global batch; multinomial draws cannot be sliced that way, so each rank
        draws its own stream from (seed·1,000,003 + rank) mod 2⁶³.
        """
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank={rank} and world_size={world_size}: need 0 <= rank < size")
        if world_size == 1:
            return
        if self.estimator == "per_example":
            # Its h sums squares over the rank's own examples; no rank would see the others'.
            raise ValueError(
                "estimator='per_example' does not support data-parallel runs "
                "(world_size > 1): use estimator='sampled'"
            )
        self._reduce_mean = reduce_mean
        if self.sampler == "inverse_cdf" or self.loss_name == "mse":
            self._shard = (rank, world_size)
        else:
            # Kept below 2^63: torch's own default seeds (seed=None) are up to 2^64 - 1.
            self.seed = (self.seed * 1_000_003 + rank) % 2**63
            self._generator = None

    # ----------------------------------------------------------------- schedule and generator
    def steps_taken(self) -> int:
        """Optimizer steps completed so far (from the saved per-parameter step counters)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    return int(state["step"])
        return 0

    def refreshes_taken(self) -> int:
        """Curvature refreshes completed so far (steps 1, 1 + k, … up to the last step)."""
        every = self.param_groups[0]["hessian_every"]
        return -(-self.steps_taken() // every)

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

    # ---------------------------------------------------------------- subclass interface
    @abc.abstractmethod
    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        """Fill the empty state of parameter ``p`` (its buffers and step counters)."""

    @abc.abstractmethod
    def _fold(
        self, params: list[Tensor], groups: list[dict[str, Any]], aux_grads: list[Tensor], n: int
    ) -> None:
        """Fold h = a⊙a of each parameter (no N-scaling yet) into its state."""

    def _fold_needs_every_grad(self) -> bool:
        """Whether ``_fold`` must see every parameter's a at once (streaming otherwise)."""
        return False

    def _fold_reads_gradient(self) -> bool:
        """Whether ``_fold`` reads p.grad, so the ordinary backward must come first."""
        return False

    def _state_for(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        return state

    def _collect(
        self, group: dict[str, Any], keys: Sequence[str]
    ) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]]]:
        """The group's parameters that have a gradient, their gradients and state entries."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        entries: list[list[Tensor]] = [[] for _ in keys]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self._state_for(p)
            params.append(p)
            grads.append(p.grad)
            for column, key in zip(entries, keys):
                column.append(state[key])
        return params, grads, entries

    def _without_curvature(self) -> Callable[[Tensor], bool]:
        """Whether a parameter's curvature was left out of this step's refresh (no path to the
        outputs); on a step without a refresh, none was. Ask before the step's first update:
        it moves the step counters that :meth:`steps_taken` reads, and later groups would then
        see a step without a refresh."""
        if not (self.needs_aux_pass() and self._curvature_ready_at == self.steps_taken()):
            return lambda p: False
        refreshed = self._refreshed
        return lambda p: p not in refreshed

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

        Raises:
            ValueError: on refresh steps (the checks read the targets), outputs and targets
                that the loss cannot pair (lehi.optim.misuse.check_outputs_and_targets).
            RuntimeError: a second call in one step without ``micro_batch``.
        """
        if self.wants_curvature():
            check_outputs_and_targets(self.loss_name, loss, outputs, targets, self.ignore_index)
        if not self.needs_aux_pass():
            if self.wants_curvature():
                # A refresh folded from g⊙g inside step() may scale it by N.
                n = num_loss_terms(self.loss_name, outputs, targets, self.ignore_index)
                self.num_loss_terms = max(n, 1)
            loss.backward()
            return
        if micro_batch[1] == 1 and self._curvature_ready_at == self.steps_taken():
            # The first call already folded this step's h; a second would fold another.
            raise RuntimeError(
                f"{type(self).__name__}.backward was called twice before step(): to accumulate "
                "k micro-batches call opt.backward(loss / k, outputs, targets, "
                "micro_batch=(i, k)) for i = 0, …, k − 1, then opt.step()"
            )
        generator = self.curvature_generator(outputs.device)
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if micro_batch[1] > 1:
            self._accumulate(loss, outputs, targets, generator, params, micro_batch)
            return
        self._refreshed = set()
        reuse = self._reuses_loss_gradient(loss, outputs)
        if self.estimator == "per_example":
            loss.backward()
            self._per_example_pass(params, model, inputs, outputs, targets, generator)
        elif reuse or self._fold_reads_gradient() or self._reduce_mean is not None:
            # DistributedDataParallel ties its gradient averaging to the first backward after
            # the forward, so under a data-parallel trainer the ordinary backward comes first.
            captured: list[Tensor] = []
            hook = outputs.register_hook(captured.append) if reuse else None
            try:
                loss.backward(retain_graph=True)
            finally:
                if hook is not None:
                    hook.remove()
            loss_grad = captured[0] if captured else None
            self._auxiliary_pass(
                outputs, targets, generator, params, retain_graph=False, loss_grad=loss_grad
            )
        else:
            self._auxiliary_pass(outputs, targets, generator, params, retain_graph=True)
            loss.backward()
        self._finish_refresh()

    def _reuses_loss_gradient(self, loss: Tensor, outputs: Tensor) -> bool:
        """Whether v can be built from the ordinary backward's gradient at the outputs.

        Only for float32 outputs: the recomputing path draws from float32 probabilities, and
        the same uniforms against float64 ones can pick another label at a boundary.
        """
        return (
            outputs.dtype == torch.float32
            and self.loss_name == "cross_entropy"
            and self.sampler == "inverse_cdf"
            and self.estimator == "sampled"
            and (self.first_refresh_draws == 1 or self.curvature_passes > 0)
            and is_mean_cross_entropy(loss, outputs, self.ignore_index)
        )

    def _finish_refresh(self) -> None:
        self.curvature_passes += 1
        self._curvature_ready_at = self.steps_taken()

    def _grad_outputs(
        self,
        outputs: Tensor,
        targets: Tensor,
        generator: torch.Generator,
        loss_grad: Tensor | None = None,
    ) -> tuple[Tensor, int]:
        if loss_grad is not None:
            return aux_grad_outputs_from_loss_gradient(
                loss_grad, targets, generator, ignore_index=self.ignore_index, shard=self._shard
            )
        return aux_grad_outputs(
            self.loss_name,
            outputs,
            targets,
            generator,
            ignore_index=self.ignore_index,
            sampler=self.sampler,
            shard=self._shard,
        )

    def _auxiliary_pass(
        self,
        outputs: Tensor,
        targets: Tensor,
        generator: torch.Generator,
        params: list[Tensor],
        *,
        retain_graph: bool,
        loss_grad: Tensor | None = None,
    ) -> None:
        """∇L_aux folded into the state; ``loss_grad``: ∂loss/∂outputs to build v from."""
        draws = self.first_refresh_draws if self.curvature_passes == 0 else 1
        if draws == 1 and self._reduce_mean is None and not self._fold_needs_every_grad():
            v, n = self._grad_outputs(outputs, targets, generator, loss_grad)
            self.num_loss_terms = n
            group_of = self._group_of()

            def fold_one(p: Tensor, a: Tensor) -> None:
                self._fold([p], [group_of[p]], [a], n)
                self._refreshed.add(p)

            streaming_fold(outputs, v, params, fold_one, retain_graph=retain_graph)
            return
        # Several draws: h is the mean of the draws' a⊙a, handed to the fold as its root.
        total: list[Tensor | None] | None = None
        for draw in range(draws):
            v, n = self._grad_outputs(outputs, targets, generator, loss_grad)
            loss_grad = None
            last = draw == draws - 1
            grads = aux_grads(outputs, v, params, retain_graph=retain_graph or not last)
            del v
            grads, n = reduce_across_ranks(self._reduce_mean, params, grads, n)
            if draws == 1:
                self._fold_set(params, grads, n)
                return
            squares = [None if a is None else a.square_() for a in grads]
            total = (
                squares if total is None else [add_optional(t, s) for t, s in zip(total, squares)]
            )
        assert total is not None
        roots = [None if t is None else t.div_(draws).sqrt_() for t in total]
        self._fold_set(params, roots, n)

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
        v, n = self._grad_outputs(outputs, targets, generator)
        grads = aux_grads(outputs, v.div_(k), params, retain_graph=False)
        if i == 0 or self._accumulated is None:
            self._accumulated, self._accumulated_terms = grads, n
        else:
            self._accumulated = [add_optional(t, a) for t, a in zip(self._accumulated, grads)]
            self._accumulated_terms += n
        if i < k - 1:
            return
        grads, n = self._accumulated, self._accumulated_terms
        self._accumulated, self._accumulated_terms = None, 0
        self._refreshed = set()
        self._fold_set(params, *reduce_across_ranks(self._reduce_mean, params, grads, n))
        self._finish_refresh()

    def _fold_set(self, params: list[Tensor], grads: list[Tensor | None], n: int) -> None:
        """Fold a full set of auxiliary gradients (parameters without one are skipped)."""
        self.num_loss_terms = n
        kept = [(p, a) for p, a in zip(params, grads) if a is not None]
        group_of = self._group_of()
        with torch.no_grad():
            self._fold(
                [p for p, _ in kept], [group_of[p] for p, _ in kept], [a for _, a in kept], n
            )
        self._refreshed.update(p for p, _ in kept)

    def _per_example_pass(
        self,
        params: list[Tensor],
        model: torch.nn.Module | None,
        inputs: Tensor | None,
        outputs: Tensor,
        targets: Tensor,
        generator: torch.Generator,
    ) -> None:
        roots = per_example_roots(
            params,
            model,
            inputs,
            targets,
            loss=self.loss_name,
            generator=generator,
            ignore_index=self.ignore_index,
            sampler=self.sampler,
        )
        n = max(num_loss_terms(self.loss_name, outputs, targets, self.ignore_index), 1)
        self._fold_set(params, roots, n)

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
        counters = {
            index: {key: float(value) for key, value in entry.items() if key in COUNTERS}
            for index, entry in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        # torch.optim casts every state entry but "step" to the parameter's dtype on load.
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved, params):
            for key, value in counters.get(index, {}).items():
                self.state[p][key] = torch.tensor(value, dtype=torch.float32)
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
