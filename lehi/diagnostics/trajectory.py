"""One trajectory of the Hessian-imitation study, trained by lehi.train.Trainer.

The trainer runs the optimizer over the data (its loop, its data order, its evaluation and
divergence rule); its ``on_row`` hook, called after each evaluation row with the model and
optimizer as they are at that step, does the study's checkpoint work there: exact diagonals,
instantaneous estimates and the optimizer's EMA state, compared by lehi.diagnostics.metrics.
The settings are the YAML's under the study's protocol (:func:`trainer_config`,
:func:`optimizer_options`; lehi.diagnostics.study's docstring lists the protocol).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lehi.config import compose
from lehi.curvature import get_loss_rule
from lehi.data import DataBundle
from lehi.diagnostics.estimates import instantaneous_estimates, optimizer_curvature
from lehi.diagnostics.exact import gauss_newton_diagonal, hessian_diagonal
from lehi.diagnostics.metrics import agreement_by_layer
from lehi.diagnostics.setups import OPTIMIZER_SETTINGS
from lehi.optim import build_optimizer
from lehi.train import Trainer
from lehi.trainer_config import TrainerConfig

__all__ = ["CHECKPOINTS", "Context", "Timer", "optimizer_options", "train", "trainer_config"]

#: The evaluations of a trajectory: step 0 and the trainer's evaluations, named in order.
CHECKPOINTS = (("init", 0.0), ("mid", 0.5), ("end", 1.0))


def _draw_seed(seed: int, step: int) -> int:
    """Seed of the draws of v at a checkpoint: derived from (seed, step) only."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def trainer_config(dataset: str, steps: int, threads: int) -> TrainerConfig:
    """The dataset's trainer section (conf/trainer/default.yaml with its recipe) under the
    study's protocol: see the module docstring."""
    section = compose([f"dataset={dataset}"])["trainer"]
    return TrainerConfig.from_config(
        section,
        epochs=None,
        max_steps=steps,
        evaluations=len(CHECKPOINTS) - 1,
        eval_every=None,
        log_every=1,
        grad_accum=1,
        grad_clip=None,
        schedule="constant",
        warmup_fraction=0.0,
        precision="fp32",
        compile=False,
        device="cpu",
        threads=threads,
        progress=False,
        checkpoint=False,
    )


def optimizer_options(name: str, dataset: str) -> dict[str, Any]:
    """conf/optimizer/<name>.yaml with the study's overrides (setups.OPTIMIZER_SETTINGS)."""
    options = compose([f"dataset={dataset}", f"optimizer={name}"])["optimizer"]
    return {**options, **copy.deepcopy(OPTIMIZER_SETTINGS[name])}


def _exact(
    model: nn.Module, loss: str, batch: tuple[Tensor, Tensor], ignore_index: int
) -> dict[str, dict[str, Tensor]]:
    x, y = batch
    return {
        "gauss_newton": gauss_newton_diagonal(model, loss, x, y, ignore_index=ignore_index),
        "hessian": hessian_diagonal(model, loss, x, y, ignore_index=ignore_index),
    }


def _rows(
    estimate: str, kind: str, values: dict[str, Tensor], references: dict[str, dict[str, Tensor]]
) -> list[dict[str, Any]]:
    rows = []
    for reference, exact in references.items():
        for layer, metrics in agreement_by_layer(values, exact).items():
            for metric, value in metrics.items():
                rows.append(
                    dict(
                        estimate=estimate,
                        kind=kind,
                        reference=reference,
                        layer=layer,
                        metric=metric,
                        value=value,
                    )
                )
    return rows


class Timer:
    """Seconds spent per kind of work, summed over the study."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, key: str, start: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


def _checkpoint_rows(
    model: nn.Module,
    bundle: Any,
    diag: tuple[Tensor, Tensor],
    other: tuple[Tensor, Tensor],
    *,
    draws: int,
    draw_seed: int,
    timer: Timer,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Tensor]]]:
    """Rows of the instantaneous estimates and exact baselines at the model's current weights,
    and the exact diagonals themselves (for the optimizer states)."""
    loss, ignore = bundle.loss, bundle.ignore_index
    start = time.perf_counter()
    refs = _exact(model, loss, diag, ignore)
    timer.add("exact_diagonals", start)
    start = time.perf_counter()
    estimates = instantaneous_estimates(
        model, loss, *diag, draws=draws, seed=draw_seed, ignore_index=ignore
    )
    other_gn = gauss_newton_diagonal(model, loss, *other, ignore_index=ignore)
    timer.add("estimates", start)
    rows = []
    for name, values in estimates.items():
        rows += _rows(name, "instant", values, refs)
    rows += _rows("gn_other_batch", "exact", other_gn, refs)
    rows += _rows("gauss_newton", "exact", refs["gauss_newton"], {"hessian": refs["hessian"]})
    return rows, refs


@dataclass
class Context:
    """What every trajectory of one setup shares."""

    bundle: DataBundle
    dataset: str
    trainer: TrainerConfig
    optimizers: dict[str, dict[str, Any]]  # name → optimizer config
    diag: tuple[Tensor, Tensor]
    other: tuple[Tensor, Tensor]
    base: dict[str, Any]
    draws: int  # draws of v averaged by lehi_avg
    seed: int
    timer: Timer
    init_rows: list[dict[str, Any]] | None = None


class _Checkpoints:
    """The Trainer's ``on_row`` hook: the checkpoint work of one trajectory.

    The trainer calls it right after each evaluation's row, with the model and optimizer as
    they are at that step, so the exact diagonals, the estimates and the EMA states are read
    there; the validation loss and metric are the row's own.
    """

    def __init__(
        self, ctx: Context, name: str, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        self.ctx, self.name, self.model, self.optimizer = ctx, name, model, optimizer
        self.trainer: Trainer | None = None
        self.marks: dict[int, tuple[str, float]] = {}
        self.rows: dict[int, list[dict[str, Any]]] = {}
        self.trajectory: dict[int, dict[str, Any]] = {}

    def attach(self, trainer: Trainer) -> None:
        """Name the trainer's evaluation steps after CHECKPOINTS, in order."""
        steps = sorted({0, *trainer.eval_steps})
        if len(steps) != len(CHECKPOINTS):
            raise ValueError(
                f"{trainer.total_steps} steps give evaluations at {steps}, "
                f"not the {len(CHECKPOINTS)} checkpoints {[n for n, _ in CHECKPOINTS]}"
            )
        self.trainer, self.marks = trainer, dict(zip(steps, CHECKPOINTS, strict=True))

    def _train_terms(self, step: int) -> int:
        """N of the batch of the step just taken (the scale of the optimizer's state)."""
        assert self.trainer is not None
        bundle, trainer = self.ctx.bundle, self.trainer
        epoch, position = divmod(step - 1, trainer.steps_per_epoch)
        x, y = next(bundle.train.iter_epoch(epoch, trainer.seed, start_step=position))
        with torch.no_grad():
            return trainer.rule.num_terms(self.model(x), y, bundle.ignore_index)

    def __call__(self, row: dict[str, Any]) -> None:
        # A non-finite evaluation ends the trajectory as diverged: nothing to measure.
        if row["split"] != "val" or not math.isfinite(row["loss"]):
            return
        ctx, step = self.ctx, row["step"]
        name, progress = self.marks[step]
        where = dict(ctx.base, trajectory=self.name, checkpoint=name, progress=progress, step=step)
        # At initialisation every trajectory has the same weights: compute once.
        if step == 0 and ctx.init_rows is not None:
            new = ctx.init_rows
        else:
            new, refs = _checkpoint_rows(
                self.model,
                ctx.bundle,
                ctx.diag,
                ctx.other,
                draws=ctx.draws,
                draw_seed=_draw_seed(ctx.seed, step),
                timer=ctx.timer,
            )
            if step == 0:
                ctx.init_rows = new
            else:
                state = optimizer_curvature(self.optimizer, self.model, self._train_terms(step))
                new = new + _rows(f"ema_{self.name}", "ema", state, refs)
        bundle = ctx.bundle
        rule = get_loss_rule(bundle.loss)
        with torch.no_grad():
            diag_loss = float(rule.loss(self.model(ctx.diag[0]), ctx.diag[1], bundle.ignore_index))
        self.rows[step] = [dict(where, **r) for r in new]
        self.trajectory[step] = dict(
            where,
            status="completed",
            diag_batch_loss=diag_loss,
            val_loss=row["loss"],
            val_metric=row["metric"],
            metric_name=bundle.metric,
        )


def train(
    ctx: Context, model: nn.Module, opt_name: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One optimizer's trajectory from the current weights through lehi.train.Trainer."""
    bundle = ctx.bundle
    optimizer = build_optimizer(
        ctx.optimizers[opt_name],
        model,
        loss=bundle.loss,
        ignore_index=bundle.ignore_index,
        seed=ctx.seed,
    )
    hook = _Checkpoints(ctx, opt_name, model, optimizer)
    trainer = Trainer(
        model,
        optimizer,
        bundle,
        ctx.trainer,
        device=torch.device("cpu"),
        seed=ctx.seed,
        record=None,
        on_row=hook,
    )
    hook.attach(trainer)
    summary = trainer.fit()
    ctx.timer.seconds["training"] = ctx.timer.seconds.get("training", 0.0) + summary["train_time"]
    steps = sorted(hook.trajectory)
    at = summary["diverged_at_step"]
    # Blown up: the checkpoints from the step the trainer stopped at on are not measurements
    # of a trained model.
    if summary["status"] == "diverged":
        steps = [s for s in steps if s < at]
    rows = [r for s in steps for r in hook.rows[s]]
    trajectory = [hook.trajectory[s] for s in steps]
    if summary["status"] == "diverged":
        # Later checkpoints of a diverged trajectory have no rows; this row says where and why.
        trajectory.append(
            dict(ctx.base, trajectory=opt_name, checkpoint="diverged",
                 progress=at / trainer.total_steps, step=at, status="diverged",
                 divergence=summary["divergence"], metric_name=bundle.metric)
        )  # fmt: skip
    print(
        f"  {ctx.base['model']} / {opt_name}: {summary['status']} at step {summary['steps']}",
        file=sys.stderr,
    )
    return rows, trajectory
