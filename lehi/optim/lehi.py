"""LEHI and LEHIBrid: Adam with its second-moment input replaced by Hessian imitation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lehi._torch_compat import default_to_foreach
from lehi.optim.base import CurvatureOptimizer
from lehi.optim.common import check_hyperparameters, increment
from lehi.optim.lehi_update import compiled_lehi, multi_tensor_lehi, single_tensor_lehi
from lehi.optim.update_watch import UpdateWatch, check_warn_update_above

__all__ = ["LEHI", "LEHIBrid"]

ESTIMATORS = ("sampled", "per_example", "squared_gradient")
HYBRIDS = ("max", "sum", "mix")
WARMUPS = ("none", "draws", "max_grad", "grad")
_STATE_KEYS = ("exp_avg", "exp_avg_curvature", "step", "curvature_step")


def check_readings(
    *, curvature_warmup: str, warmup_length: int, h_floor: float, update_clip: float | None
) -> None:
    """Raise a ValueError naming the first reading option outside its allowed values."""
    if curvature_warmup not in WARMUPS:
        raise ValueError(
            f"curvature_warmup={curvature_warmup!r} is not one of {', '.join(WARMUPS)}"
        )
    if not (isinstance(warmup_length, int) and warmup_length >= 1):
        raise ValueError(f"warmup_length must be an integer >= 1, got {warmup_length!r}")
    if not (math.isfinite(h_floor) and h_floor >= 0.0):
        raise ValueError(f"h_floor must be a finite number >= 0 (0 = off), got {h_floor}")
    if update_clip is not None and not (math.isfinite(update_clip) and update_clip > 0.0):
        raise ValueError(f"update_clip must be > 0 or None (off), got {update_clip}")


class LEHI(CurvatureOptimizer):
    r"""Low-order Explicit Hessian Imitation (arXiv 2605.06945), as read in docs/method.md.

    .. math::
        \begin{aligned}
        &g_t = \nabla f(w_{t-1}) \text{ on the batch}\\
        &\textbf{if } (t-1) \bmod k = 0:\ r \leftarrow r + 1,\quad
            v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)\, s\, h_t,\quad
            h_t = (\nabla L_{aux})^2,\
            L_{aux} = \tfrac1N \textstyle\sum_n v_n\!\cdot\! z_n \\
        &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        &w_t \leftarrow w_{t-1}(1 - \alpha\lambda) \\
        &u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^r)} + \epsilon},\qquad
            w_t \leftarrow w_t - \alpha\, \mathrm{clip}(u_t, -c, c)
        \end{aligned}

    with s = 1 (``scale_by_batch=False``: h is on the scale of Adam's g⊙g) or s = N
    (``scale_by_batch=True``: s·h estimates the per-example Gauss–Newton diagonal), and c = ∞
    unless ``update_clip`` is set. With the default options the only difference from AdamW is
    the source of v, which makes LEHI vs Adam a clean ablation.

    Use it in a plain loop by replacing ``loss.backward()`` with
    ``optimizer.backward(loss, outputs, targets)``.

    The readings of the paper's open choices (all off by default, so the defaults are the
    literal method; each is tested for its defining property):

    - ``curvature_warmup`` (optimizer-wide), for the first refreshes, where the EMA holds one
      or two noisy draws: ``"draws"`` — the first refresh's h is the mean of
      ``warmup_length`` independent draws of v on the first batch (as many extra auxiliary
      passes, once); ``"max_grad"`` — refreshes 1 … ``warmup_length`` fold max(g⊙g, h);
      ``"grad"`` — refreshes 1 … ``warmup_length`` fold Adam's g⊙g (no auxiliary pass).
    - ``h_floor`` f (per group): h ← max(h, f·mean(h)) over each tensor before it enters
      the EMA, so an exactly-zero draw cannot make a coordinate's denominator ε; 0 = off.
    - ``update_clip`` c (per group): Sophia's elementwise clip of the update u to [−c, c].

    Where a refresh has no h — ``estimator="squared_gradient"``, the ``"grad"`` warm-up, and
    a parameter without curvature (below) — h = g⊙g, an h like any other: LEHIBrid's hybrid
    and the N-scaling s apply to it (the floor, meant for zero draws, does not). With the
    defaults LEHI(estimator="squared_gradient") is then exactly AdamW.

    A one-time warning (``warn_update_above``, lehi.optim.update_watch): Adam's update
    u = m̂/(√v̂+ε) stays near 1 in magnitude, so each of the first 10 steps compares every
    tensor's max |u| (after the clip) with the threshold and, the first time one exceeds it,
    warns once, naming the tensor (by name when given ``model.named_parameters()``) and
    ``update_clip``, the option that bounds the step. It reads the state only (no draws, no
    change to the step); after those steps, or with ``update_clip`` at most the threshold,
    it costs nothing.

    Parameters without curvature: on a refresh, a parameter that has an ordinary gradient
    but no auxiliary one (no path from it to the outputs, e.g. a penalty term) takes
    h = g⊙g, i.e. it is updated by Adam's rule, and its own refresh count r keeps its bias
    correction well defined (never 1 − β2⁰ = 0).

    Args:
        params: parameters or parameter groups.
        lr: learning rate α (> 0).
        betas: (β1, β2), each in [0, 1).
        eps: ε ≥ 0, added to sqrt(v̂) (or to v̂ under the square root, see eps_inside_sqrt).
        weight_decay: decoupled weight decay λ (as AdamW); default 0.
        loss: the loss whose Hessian is imitated: ``"cross_entropy"`` or ``"mse"``.
        hessian_every: refresh the curvature every k steps (steps 1, 1 + k, …); default 1;
            the same in every parameter group.
        estimator: ``"sampled"`` (docs/method.md's v for the loss; default), ``"per_example"``
            (exact per-example mode, Σ_n (J_nᵀ v_n)² / N² via torch.func; small models only,
            needs ``backward(..., model=, inputs=)``), or ``"squared_gradient"`` (h = g⊙g,
            which makes LEHI exactly AdamW: the ablation's control; with scale_by_batch the
            optimizer needs ``optimizer.backward`` to know N).
        scale_by_batch: multiply h by N, the number of loss terms; default False.
        eps_inside_sqrt: use sqrt(v̂ + ε), the form of the paper's analysis; default False.
        bias_correction: divide v by 1 − β2^r (r = curvature refreshes); default True.
        curvature_warmup: ``"none"`` (default), ``"draws"``, ``"max_grad"`` or ``"grad"``.
        warmup_length: draws averaged (``"draws"``) or refreshes covered (``"max_grad"``,
            ``"grad"``) by the warm-up; default 10.
        h_floor: f ≥ 0, the floor on h relative to its tensor's mean; default 0 (off).
        update_clip: c > 0 or None (default, off).
        warn_update_above: the max |u| per tensor, in units of lr, above which one of the
            first steps warns (above); None: never. Default 100 (LEHI's early steps that
            diverge reach 10⁴–10⁶; Adam's stay near 1). Not a reading: it changes no number.
        ignore_index: targets with this value contribute nothing to h (cross-entropy).
        sampler: how cross-entropy's labels are drawn: ``"inverse_cdf"`` (default; one
            uniform per loss term, cheap for large vocabularies) or ``"multinomial"``
            (torch.multinomial, the official SophiaG code's random stream); the same
            distribution, see lehi.curvature.
        seed: seed of the generator the auxiliary draws come from (saved in the state dict);
            None (default): ``torch.initial_seed()``, read without drawing, so the global
            generator's stream (the caller's data order, dropout) is left as it was.
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
        curvature_warmup: str = "none",
        warmup_length: int = 10,
        h_floor: float = 0.0,
        update_clip: float | None = None,
        warn_update_above: float | None = 100.0,
        ignore_index: int = -100,
        sampler: str = "inverse_cdf",
        seed: int | None = None,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        check_hyperparameters(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_every=hessian_every
        )
        check_readings(
            curvature_warmup=curvature_warmup,
            warmup_length=warmup_length,
            h_floor=h_floor,
            update_clip=update_clip,
        )
        check_warn_update_above(warn_update_above)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_every=hessian_every,
            scale_by_batch=scale_by_batch,
            eps_inside_sqrt=eps_inside_sqrt,
            bias_correction=bias_correction,
            h_floor=h_floor,
            update_clip=update_clip,
            foreach=foreach,
            compile=compile,
        )
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
        self.curvature_warmup = curvature_warmup
        self.warmup_length = warmup_length
        self._update_watch = UpdateWatch(warn_update_above)
        if curvature_warmup == "draws":
            self.first_refresh_draws = warmup_length

    # ------------------------------------------------------------------------ curvature
    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0)
        state["curvature_step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_curvature"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _in_warmup(self, rule: str) -> bool:
        """Whether the coming refresh is one of the first ``warmup_length`` under ``rule``."""
        return self.curvature_warmup == rule and self.refreshes_taken() < self.warmup_length

    def needs_aux_pass(self) -> bool:
        return super().needs_aux_pass() and not self._in_warmup("grad")

    def _fold_reads_gradient(self) -> bool:
        return self._in_warmup("max_grad")

    def _fold(
        self, params: list[Tensor], groups: list[dict[str, Any]], aux_grads: list[Tensor], n: int
    ) -> None:
        """v ← β2 v + (1 − β2)·s·h; h = a⊙a is never materialised when no reading needs it."""
        max_grad = self._in_warmup("max_grad")
        for p, group, a in zip(params, groups, aux_grads):
            state = self._state_for(p)
            beta2 = group["betas"][1]
            weight = (1 - beta2) * (n if group["scale_by_batch"] else 1)
            h = self._curvature_input(p, group, a, max_grad)
            exp_avg_curvature = state["exp_avg_curvature"].mul_(beta2)
            if h is None:
                exp_avg_curvature.addcmul_(a, a, value=weight)
            else:
                exp_avg_curvature.add_(h, alpha=weight)
            state["curvature_step"] += 1

    def _curvature_input(
        self, p: Tensor, group: dict[str, Any], a: Tensor, max_grad: bool
    ) -> Tensor | None:
        """What v averages (before s), or None when that is a⊙a itself."""
        floor = group["h_floor"]
        if not (floor or max_grad):
            return None
        h = a.square()
        if floor:
            h.clamp_min_(h.mean() * floor)
        if max_grad and p.grad is not None:
            torch.maximum(h, p.grad.square(), out=h)
        return h

    def _gradient_square_factor(self, group: dict[str, Any]) -> float:
        """What v averages, as a multiple of g⊙g, when h itself is g⊙g: 1 (h = g⊙g)."""
        return 1.0

    def _fold_gradient_squares(
        self,
        group: dict[str, Any],
        grads: list[Tensor],
        exp_avg_curvatures: list[Tensor],
        curvature_steps: list[Tensor],
    ) -> None:
        """v ← β2 v + (1 − β2)·s·c·g⊙g: refreshes whose h is g⊙g (see the class docstring)."""
        scale = 1
        if group["scale_by_batch"]:
            if self.num_loss_terms is None:
                raise RuntimeError(
                    f"{type(self).__name__} with scale_by_batch needs N: call "
                    "optimizer.backward(loss, outputs, targets) instead of loss.backward()"
                )
            scale = self.num_loss_terms
        beta2 = group["betas"][1]
        weight = (1 - beta2) * scale * self._gradient_square_factor(group)
        torch._foreach_mul_(exp_avg_curvatures, beta2)
        torch._foreach_addcmul_(exp_avg_curvatures, grads, grads, value=weight)
        increment(curvature_steps)

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        """Perform one optimisation step (the curvature was folded in by ``backward``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_curvature_arrived()
        # estimator="squared_gradient" and the grad warm-up: h = g⊙g for every parameter.
        from_gradient = self.wants_curvature() and not self.needs_aux_pass()
        without_curvature = self._without_curvature()
        watch = self._update_watch
        if watch.active:
            watch.begin_step(self.steps_taken())

        for index, group in enumerate(self.param_groups):
            params, grads, (exp_avgs, exp_avg_curvatures, steps, curvature_steps) = self._collect(
                group, _STATE_KEYS
            )
            if not params:
                continue
            missing = [from_gradient or without_curvature(p) for p in params]
            if any(missing):
                pick = [i for i, m in enumerate(missing) if m]
                self._fold_gradient_squares(
                    group,
                    [grads[i] for i in pick],
                    [exp_avg_curvatures[i] for i in pick],
                    [curvature_steps[i] for i in pick],
                )
            self._update_rule(group, params)(
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
                update_clip=group["update_clip"],
            )
            if watch.active:
                watch.observe(index, group, params, self.state)
        if watch.active:
            watch.end_step(self, self.steps_taken())
        return loss

    @staticmethod
    def _update_rule(group: dict[str, Any], params: list[Tensor]) -> Callable[..., None]:
        """The group's step: compiled, multi-tensor or single-tensor (as torch.optim picks)."""
        if group.get("compile", False):
            return compiled_lehi
        foreach = group["foreach"]
        if foreach is None:
            foreach = default_to_foreach(params)
        return multi_tensor_lehi if foreach else single_tensor_lehi


class LEHIBrid(LEHI):
    r"""LEHI whose curvature input never falls below Adam's: v accumulates s·hybrid(g⊙g, h).

    ``hybrid="max"`` (default): max(g⊙g, h), so every denominator is at least Adam's and the
    step never exceeds Adam's (the Défossez-style analysis carries over); where curvature
    dominates the gradient noise the step shortens. ``"sum"``: g⊙g + h. ``"mix"``:
    (1 − γ)·g⊙g + γ·h with γ = ``mix_weight``. g is the ordinary gradient of the same batch,
    before any gradient clipping.

    ``scale_by_batch=True`` compares like with like: the hybrid of g⊙g and h (both on the
    batch-gradient scale) is taken first and then multiplied by s = N, i.e. N·h is compared
    with N·g⊙g; the option then only rescales v by N, as it does for LEHI. h_floor applies to
    h before the hybrid. Other arguments as :class:`LEHI`.
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

    def _fold_reads_gradient(self) -> bool:
        return True

    def _gradient_square_factor(self, group: dict[str, Any]) -> float:
        # hybrid(g⊙g, g⊙g): max and mix give g⊙g, sum 2·g⊙g.
        return 2.0 if group["hybrid"] == "sum" else 1.0

    def _curvature_input(
        self, p: Tensor, group: dict[str, Any], a: Tensor, max_grad: bool
    ) -> Tensor:
        h = super()._curvature_input(p, group, a, max_grad)
        if h is None:
            h = a.square()
        grad = p.grad if p.grad is not None else torch.zeros_like(h)
        mode = group["hybrid"]
        if mode == "max":
            return torch.maximum(h, grad.square(), out=h)
        if mode == "sum":
            return h.addcmul_(grad, grad)
        gamma = group["mix_weight"]
        return h.mul_(gamma).addcmul_(grad, grad, value=1 - gamma)
