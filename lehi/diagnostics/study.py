"""The Hessian-imitation study: how close is each curvature estimate to the exact diagonals?

    python -m lehi.diagnostics.study --out results/diagnostics [--small] [--data-dir DIR]

For every setup of lehi.diagnostics.setups, the model is trained from one initialisation by
each of Adam, LEHI, LEHIBrid and Sophia: the real optimizers (lehi.optim.build_optimizer),
driven by the real training loop (lehi.train.Trainer, no run folder), in its data order.

Settings come from the YAML: each optimizer from conf/optimizer/<name>.yaml with the study's
learning rate (setups.OPTIMIZER_SETTINGS), the trainer from conf/trainer/default.yaml with the
dataset's recipe. The study's own protocol, set over the YAML (:func:`trainer_config`): a step
budget (the setup's ``steps``; ``small_steps`` with --small) evaluated at its middle and end
(``evaluations=2``, besides step 0), constant learning rate without warm-up, no gradient
clipping, one micro-batch per step, fp32 on the CPU with ``--threads`` threads, no compile, no
checkpoint file, and a training-loss row every step (so a non-finite loss ends the trajectory
at the step it appears). Validation loss and metric are the trainer's evaluation rows, and a
diverged trajectory is the trainer's verdict (lehi.divergence).

At the three evaluations of each trajectory (initialisation, mid-training, end), the trainer's
``on_row`` hook sees the model and optimizer as they are at that step and, on one fixed
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
  trajectory and checkpoint, and, for a diverged trajectory, a row with the step and reason
  (checkpoints from that step on are dropped);
- diagnostics.md: the Markdown tables (lehi.diagnostics.report);
- meta.json: the settings (each model's trainer and optimizer configs), sizes and timings.

--small trains 20 steps per trajectory with 8 draws (a smoke test, labelled "small").
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lehi.diagnostics.report import write_report
from lehi.diagnostics.setups import OPTIMIZER_SETTINGS, SETUPS, Setup, get_setup
from lehi.diagnostics.trajectory import (
    CHECKPOINTS,
    Context,
    Timer,
    optimizer_options,
    train,
    trainer_config,
)
from lehi.io import atomic_write_text

__all__ = [
    "COLUMNS",
    "CHECKPOINTS",
    "StudyConfig",
    "main",
    "run_study",
]

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


def _run_setup(
    setup: Setup, config: StudyConfig, timer: Timer
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
    trainer = trainer_config(setup.dataset, steps, config.threads)
    optimizers = {o: optimizer_options(o, setup.dataset) for o in config.optimizers}
    ctx = Context(
        bundle,
        setup.dataset,
        trainer,
        optimizers,
        diag,
        other,
        base,
        config.draws,
        config.seed,
        timer,
    )
    rows: list[dict[str, Any]] = []
    trajectories: list[dict[str, Any]] = []
    for opt_name in config.optimizers:
        model.load_state_dict(init_state)  # every optimizer starts from the same weights
        new_rows, new_trajectory = train(ctx, model, opt_name)
        rows += new_rows
        trajectories += new_trajectory
    info = dict(
        dataset=bundle.name,
        loss=bundle.loss,
        params=n_params,
        steps=steps,
        batch_size=setup.batch_size,
        description=setup.description,
        trainer=asdict(trainer),
        optimizers=optimizers,
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
    timer = Timer()
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
        optimizers={o: OPTIMIZER_SETTINGS[o] for o in config.optimizers},  # over the YAML
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
