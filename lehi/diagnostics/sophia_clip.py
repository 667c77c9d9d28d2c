"""How often SophiaG's update is clipped: the share of its steps that are lr·sign(m).

    python -m lehi.diagnostics.sophia_clip --out results/diagnostics/sophia_clip.csv
        --experiments ptb_small --lrs 1e-4 3e-2 [--steps 200] [--seeds 0] [--data-dir DIR]

SophiaG moves a coordinate by lr·clamp(m / (ρ·N·h + 1e-15), −1, 1): where |m| ≥ ρ·N·h the
step is lr·sign(m), the curvature plays no part and the optimizer is sign descent with momentum.
Its authors tune ρ so that only part of the coordinates are clipped. Here each run is built as
``run.py experiment=<e> optimizer=sophia optimizer.lr=<lr> seed=<s>`` builds it
(:func:`lehi.runner.plan`, :func:`lehi.runner.build`; nothing is written) and trained with the
trainer's own step (clipping, schedule, curvature refreshes) on its own batches. After each
checkpoint step t the optimizer state holds the m_t and h that step t used, so the clipped share
of step t is the share of coordinates with m ≠ 0 (a coordinate with m = 0 does not move) where
|m| ≥ ρ·N·h. Writes the CSV and a Markdown table next to it (same name, ``.md``), each atomically.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from lehi.config import compose
from lehi.diagnostics.report import table_parser, write_table
from lehi.optim import SophiaG
from lehi.results.markdown import table as markdown_table
from lehi.runner import build, plan

__all__ = ["COLUMNS", "clipped_share", "main", "measure", "render_markdown"]

COLUMNS = ("experiment", "lr", "seed", "step", "coordinates_moving", "clipped_share")
#: Steps after which the share is read (those within the run's --steps).
CHECKPOINTS = (1, 2, 10, 11, 50, 100, 200, 500, 1000)


def clipped_share(opt: SophiaG) -> tuple[int, float]:
    """(coordinates with m ≠ 0, the share of them where |m| ≥ ρ·N·h) in ``opt``'s state now."""
    n = opt.num_loss_terms
    if n is None:
        raise ValueError("SophiaG has taken no step with a curvature pass yet")
    moving = clipped = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            m, h = state["exp_avg"], state["hessian"]
            nonzero = m != 0
            moving += int(nonzero.sum())
            clipped += int((nonzero & (m.abs() >= group["rho"] * n * h + 1e-15)).sum())
    return moving, clipped / moving if moving else float("nan")


def measure(
    experiment: str,
    lr: float,
    seed: int,
    steps: int,
    data_dir: str | Path | None = None,
) -> list[dict[str, object]]:
    """Train ``experiment``'s Sophia run at ``lr`` for ``steps`` steps; one row per checkpoint."""
    overrides = [
        f"experiment={experiment}",
        "optimizer=sophia",
        f"optimizer.lr={lr}",
        f"seed={seed}",
        "logger=files",
    ]
    if data_dir is not None:
        overrides.append(f"paths.data_dir={data_dir}")
    p = plan(compose(overrides))
    trainer = build(p).trainer
    opt = trainer.optimizer
    if not isinstance(opt, SophiaG):
        raise ValueError(f"{experiment}: optimizer=sophia did not build a SophiaG")
    accum = p.trainer.grad_accum
    batches = itertools.chain.from_iterable(
        trainer.bundle.train.iter_epoch(epoch, p.seed) for epoch in itertools.count()
    )
    rows = []
    for step in range(1, steps + 1):
        trainer.train_step(list(itertools.islice(batches, accum)))
        if step in CHECKPOINTS or step == steps:
            moving, share = clipped_share(opt)
            rows.append(
                dict(
                    experiment=experiment,
                    lr=lr,
                    seed=seed,
                    step=step,
                    coordinates_moving=moving,
                    clipped_share=share,
                )
            )
    return rows


def render_markdown(table: pd.DataFrame) -> str:
    """The Markdown table of :func:`measure`'s rows."""
    lines = [
        "# How often SophiaG's update is clipped",
        "",
        "`python -m lehi.diagnostics.sophia_clip`: share of the moving coordinates (m ≠ 0) whose "
        "step at that step was lr·sign(m) (|m| ≥ ρ·N·h), in a run built as run.py builds it.",
        "",
    ]
    header = ["experiment", "lr", "seed", "step", "coordinates moving", "clipped"]
    rows = [
        [
            r["experiment"],
            f"{r['lr']:g}",
            str(r["seed"]),
            str(r["step"]),
            f"{r['coordinates_moving']:,}",
            f"{r['clipped_share']:.1%}",
        ]
        for r in table.to_dict("records")
    ]
    return "\n".join(lines + markdown_table(header, rows)) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = table_parser(__doc__, "presets, e.g. ptb_small")
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    torch.set_num_threads(1)  # as the sweeps run
    rows = [
        row
        for e in args.experiments
        for lr in args.lrs
        for seed in args.seeds
        for row in measure(e, lr, seed, args.steps, args.data_dir)
    ]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    write_table(args.out, table, render_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
