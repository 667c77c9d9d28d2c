"""The Hessian-imitation study: how close is each curvature estimate to the exact diagonals?

    python -m lehi.diagnostics.study --out results/diagnostics [--small] [--data-dir DIR]

For every setup of lehi.diagnostics.setups, the model is trained from one initialisation by
each of Adam, LEHI, LEHIBrid and Sophia (lehi.optim, the real optimizers, same data order).
At three checkpoints of each trajectory (initialisation, mid-training, end), on one fixed
diagnostic batch of the training split (the setup's batch size; drawn with seed + 1000, so it
is not a batch of the training order), the study computes

- the exact diagonals of the batch loss: Hessian and Gauss–Newton (lehi.diagnostics.exact);
- the instantaneous estimates on that batch (lehi.diagnostics.estimates: LEHI one draw, LEHI
  averaged over ``draws`` draws, the exact per-example mode, LEHIBrid's max, Sophia's clipped
  estimate, Adam's g⊙g), each on the scale of the exact diagonals;
- what each optimizer really divides by: its EMA state, read at the checkpoint (from mid on);
- two exact baselines: the Gauss–Newton diagonal of an *independent* batch of the same size
  (how far apart two batches' true diagonals are: the floor any one-batch estimate, and any
  EMA over batches, is measured against) and, against the Hessian only, the exact Gauss–Newton
  diagonal itself (the best a Gauss–Newton estimator can do);

and the agreement metrics of lehi.diagnostics.metrics overall and per layer. Written (each
atomically) into --out:

- diagnostics.csv: one tidy row per (model, trajectory, checkpoint, estimate, reference,
  layer | "all", metric) with the value;
- trajectories.csv: training loss on the diagnostic batch and validation loss/metric per
  trajectory and checkpoint, and whether it diverged;
- diagnostics.md: the Markdown tables (lehi.diagnostics.report);
- meta.json: the settings, sizes and timings of the run.

--small trains 20 steps per trajectory with 8 draws (a smoke test, labelled "small").
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lehi.curvature import get_loss_rule, num_loss_terms
from lehi.diagnostics.estimates import instantaneous_estimates, optimizer_curvature
from lehi.diagnostics.exact import gauss_newton_diagonal, hessian_diagonal
from lehi.diagnostics.metrics import agreement_by_layer
from lehi.diagnostics.report import write_report
from lehi.diagnostics.setups import OPTIMIZER_SETTINGS, SETUPS, Setup, get_setup
from lehi.io import atomic_write_text
from lehi.optim import backward, build_optimizer

__all__ = ["COLUMNS", "CHECKPOINTS", "StudyConfig", "main", "run_study"]

COLUMNS = (
    "scale",
    "model",
    "dataset",
    "params",
    "trajectory",
    "checkpoint",
    "progress",
    "step",
    "estimate",
    "kind",
    "reference",
    "layer",
    "metric",
    "value",
)
CHECKPOINTS = (("init", 0.0), ("mid", 0.5), ("end", 1.0))
DIAGNOSTIC_SEED_OFFSET = 1000


@dataclass(frozen=True)
class StudyConfig:
    """What one run of the study does."""

    models: tuple[str, ...] = tuple(SETUPS)
    optimizers: tuple[str, ...] = tuple(OPTIMIZER_SETTINGS)
    small: bool = False
    draws: int = 64
    seed: int = 0
    data_dir: str | None = None
    # One thread: the models are tiny, and two OpenMP threads on a CPU shared with other jobs
    # made the study 17× slower here (spin-waiting threads), while one costs nothing alone.
    threads: int = 1

    @property
    def scale(self) -> str:
        return "small" if self.small else "full"


def _draw_seed(seed: int, step: int) -> int:
    """Seed of the draws of v at a checkpoint: derived from (seed, step) only."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def _batches(bundle: Any, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of epochs 0, 1, … in the trainer's order, without end."""
    epoch = 0
    while True:
        yield from bundle.train.iter_epoch(epoch, seed)
        epoch += 1


def _validation(model: nn.Module, bundle: Any) -> tuple[float, float]:
    """(mean validation loss, validation metric) over the whole validation split."""
    rule = get_loss_rule(bundle.loss)
    total, correct, terms = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in bundle.val.iter_epoch(0, 0):
            out = model(x)
            n = num_loss_terms(bundle.loss, out, y, bundle.ignore_index)
            total += float(rule.loss(out, y, bundle.ignore_index)) * n
            terms += n
            if bundle.metric == "accuracy":
                correct += float((out.argmax(-1) == y).sum())
    loss = total / max(terms, 1)
    if bundle.metric == "accuracy":
        return loss, correct / max(terms, 1)
    return loss, math.sqrt(loss) * bundle.target_std  # RMSE in original units


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


class _Timer:
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
    timer: _Timer,
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
class _Context:
    """What every trajectory of one setup shares."""

    bundle: Any
    diag: tuple[Tensor, Tensor]
    other: tuple[Tensor, Tensor]
    base: dict[str, Any]
    config: StudyConfig
    timer: _Timer
    init_rows: list[dict[str, Any]] | None = None


def _evaluate(
    ctx: _Context,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    where: dict[str, Any],
    train_terms: int | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Metric rows and the trajectory row of one checkpoint (``where`` names it)."""
    step, bundle = where["step"], ctx.bundle
    # At initialisation every trajectory has the same weights: compute once.
    if step == 0 and ctx.init_rows is not None:
        new = ctx.init_rows
    else:
        new, refs = _checkpoint_rows(
            model,
            bundle,
            ctx.diag,
            ctx.other,
            draws=ctx.config.draws,
            draw_seed=_draw_seed(ctx.config.seed, step),
            timer=ctx.timer,
        )
        if step == 0:
            ctx.init_rows = new
        else:
            state = optimizer_curvature(optimizer, model, train_terms)
            new = new + _rows(f"ema_{where['trajectory']}", "ema", state, refs)
    rule = get_loss_rule(bundle.loss)
    with torch.no_grad():
        diag_loss = float(rule.loss(model(ctx.diag[0]), ctx.diag[1], bundle.ignore_index))
    val_loss, val_metric = _validation(model, bundle)
    trajectory = dict(
        where,
        status="completed",
        diag_batch_loss=diag_loss,
        val_loss=val_loss,
        val_metric=val_metric,
        metric_name=bundle.metric,
    )
    return [dict(where, **r) for r in new], trajectory


def _train(
    ctx: _Context, model: nn.Module, opt_name: str, steps: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One optimizer's trajectory from the current weights, evaluated at the checkpoints."""
    bundle, config = ctx.bundle, ctx.config
    optimizer = build_optimizer(
        opt_name,
        model.parameters(),
        loss=bundle.loss,
        ignore_index=bundle.ignore_index,
        seed=config.seed,
        **copy.deepcopy(OPTIMIZER_SETTINGS[opt_name]),
    )
    rule = get_loss_rule(bundle.loss)
    marks = {round(frac * steps): (name, frac) for name, frac in CHECKPOINTS}
    batches = _batches(bundle, config.seed)
    rows: list[dict[str, Any]] = []
    trajectory: list[dict[str, Any]] = []
    train_terms = None
    for step in range(steps + 1):
        if step in marks:
            name, frac = marks[step]
            where = dict(ctx.base, trajectory=opt_name, checkpoint=name, progress=frac, step=step)
            new_rows, row = _evaluate(ctx, model, optimizer, where, train_terms)
            rows += new_rows
            trajectory.append(row)
        if step == steps:
            break
        start = time.perf_counter()
        x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        batch_loss = rule.loss(out, y, bundle.ignore_index)
        # Checked before the backward pass: non-finite outputs would break the draw of v.
        if not (math.isfinite(batch_loss.item()) and bool(torch.isfinite(out).all())):
            # Later checkpoints of a diverged trajectory have no rows; this row says where.
            trajectory.append(
                dict(ctx.base, trajectory=opt_name, checkpoint="diverged",
                     progress=step / steps, step=step, status="diverged",
                     metric_name=bundle.metric)
            )  # fmt: skip
            break
        train_terms = num_loss_terms(bundle.loss, out, y, bundle.ignore_index)
        backward(optimizer, batch_loss, out, y)
        optimizer.step()
        ctx.timer.add("training", start)
    status = trajectory[-1]["status"]
    print(f"  {ctx.base['model']} / {opt_name}: {status} at step {step}", file=sys.stderr)
    return rows, trajectory


def _run_setup(
    setup: Setup, config: StudyConfig, timer: _Timer
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    bundle = setup.bundle(config.data_dir)
    torch.manual_seed(config.seed)
    model = setup.build_model(bundle)
    init_state = copy.deepcopy(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = setup.small_steps if config.small else setup.steps
    diag_iter = bundle.train.iter_epoch(0, config.seed + DIAGNOSTIC_SEED_OFFSET)
    diag, other = next(diag_iter), next(diag_iter)
    base = dict(scale=config.scale, model=setup.name, dataset=bundle.name, params=n_params)
    ctx = _Context(bundle, diag, other, base, config, timer)
    rows: list[dict[str, Any]] = []
    trajectories: list[dict[str, Any]] = []
    for opt_name in config.optimizers:
        model.load_state_dict(init_state)  # every optimizer starts from the same weights
        new_rows, new_trajectory = _train(ctx, model, opt_name, steps)
        rows += new_rows
        trajectories += new_trajectory
    info = dict(
        dataset=bundle.name,
        loss=bundle.loss,
        params=n_params,
        steps=steps,
        batch_size=setup.batch_size,
        description=setup.description,
    )
    return rows, trajectories, info


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.6g")
    atomic_write_text(path, buffer.getvalue())


def run_study(out: str | Path, config: StudyConfig) -> pd.DataFrame:
    """Run the study, write its files into ``out`` and return the tidy metric table."""
    for name in config.models:
        get_setup(name)
    unknown = [o for o in config.optimizers if o not in OPTIMIZER_SETTINGS]
    if unknown:
        raise ValueError(f"optimizers {unknown} are not among {', '.join(OPTIMIZER_SETTINGS)}")
    if config.draws < 1:
        raise ValueError(f"draws must be >= 1, got {config.draws}")
    if config.threads < 1:
        raise ValueError(f"threads must be >= 1, got {config.threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(Path(out), config)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: Path, config: StudyConfig) -> pd.DataFrame:
    timer = _Timer()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    trajectories: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    for name in config.models:
        t0 = time.perf_counter()
        new_rows, new_traj, info = _run_setup(get_setup(name), config, timer)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        print(
            f"{name}: {info['params']} parameters, {info['steps']} steps, {info['seconds']:.1f} s",
            file=sys.stderr,
        )
        rows += new_rows
        trajectories += new_traj
        infos[name] = info
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    _write_csv(out / "diagnostics.csv", frame)
    _write_csv(out / "trajectories.csv", pd.DataFrame(trajectories))
    meta = dict(
        scale=config.scale,
        seed=config.seed,
        draws=config.draws,
        optimizers={o: OPTIMIZER_SETTINGS[o] for o in config.optimizers},
        models=infos,
        diagnostic_batch=f"first two batches of train.iter_epoch(0, seed + {DIAGNOSTIC_SEED_OFFSET})",
        seconds=dict(
            {k: round(v, 2) for k, v in timer.seconds.items()},
            total=round(time.perf_counter() - started, 2),
        ),
        torch=torch.__version__,
        python=platform.python_version(),
        threads=config.threads,
    )
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    write_report(out)
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/diagnostics", help="output folder")
    parser.add_argument("--small", action="store_true", help="20 steps, 8 draws (smoke test)")
    parser.add_argument(
        "--models", default=",".join(SETUPS), help=f"comma-separated subset of {','.join(SETUPS)}"
    )
    parser.add_argument("--draws", type=int, default=None, help="draws for lehi_avg (64; small 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--data-dir", default=None, help="data folder (default: $LEHI_DATA_DIR or ./data)"
    )
    args = parser.parse_args(argv)
    draws = args.draws if args.draws is not None else (8 if args.small else 64)
    config = StudyConfig(
        models=tuple(m for m in args.models.split(",") if m),
        small=args.small,
        draws=draws,
        seed=args.seed,
        data_dir=args.data_dir,
        threads=args.threads,
    )
    try:
        run_study(args.out, config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {Path(args.out) / 'diagnostics.csv'} and diagnostics.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
