"""A results tree in the trainer's on-disk format, written by hand (tests of lehi.results).

Every run's validation losses are ``base + OFFSETS`` at EVAL_STEPS, so its final validation
loss (mean of the last 3 evaluations) is exactly ``base``; expected tables can be worked out
by hand from the bases, the offsets and the step times.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EVAL_STEPS = (10, 20, 30, 40, 50)
OFFSETS = (0.3, 0.15, 0.05, 0.0, -0.05)  # last 3 average to 0, so the final loss is the base
EVAL_SECONDS = 0.25  # evaluation time: in wall_time, never in train_time

SECONDS_PER_STEP = {
    "adam": 0.010,
    "adamw": 0.010,
    "lehi": 0.016,
    "lehibrid": 0.015,
    "sophia": 0.011,
}


def step_time(optimizer: str, seed: int) -> float:
    return SECONDS_PER_STEP.get(optimizer, 0.012) * (1 + 0.1 * seed)


def write_run(
    root: Path,
    optimizer: str,
    lr: float,
    seed: int,
    base: float | None,
    *,
    status: str | None = None,
    experiment: str = "toy",
    scale: str = "small",
    dataset: str = "digits",
    summary: bool = True,
) -> Path:
    """One run folder: config.yaml, metrics.csv, summary.json (spec format); base None = diverged."""
    run = root / experiment / optimizer / f"lr={lr:g}" / f"seed={seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"experiment:\n  name: {experiment}\n  scale: {scale}\n  epochs: 5\n"
        f"dataset:\n  name: {dataset}\n  batch_size: 64\n"
        f"optimizer:\n  name: {optimizer}\n  lr: {lr}\n  weight_decay: 0.0\n"
        f"seed: {seed}\nmodel:\n  name: mlp\n"
    )
    diverged = base is None and status is None
    status = status or ("diverged" if diverged else "completed")
    tps = step_time(optimizer, seed)
    passes = 1 if optimizer.startswith("lehi") else 0
    rows, vals = [], []
    for i, step in enumerate(EVAL_STEPS):
        t_train = (step - 5) * tps
        loss = 2.0 if base is None else base + OFFSETS[i] + 0.1
        rows.append(
            f"{step - 5},{i + 1},train,{loss},0.5,{lr},{t_train + EVAL_SECONDS * i},"
            f"{t_train},{(step - 5) * passes}"
        )
        if base is None and step == 20:  # the loss blew up at the second evaluation
            rows.append(
                f"{step},{i + 1},val,nan,nan,{lr},{step * tps + EVAL_SECONDS * (i + 1)},"
                f"{step * tps},{step * passes}"
            )
            break
        val = 3.0 if base is None else base + OFFSETS[i]
        vals.append(val)
        rows.append(
            f"{step},{i + 1},val,{val},{1 - val},{lr},"
            f"{step * tps + EVAL_SECONDS * (i + 1)},{step * tps},{step * passes}"
        )
    (run / "metrics.csv").write_text(
        "step,epoch,split,loss,metric,lr,wall_time,train_time,curvature_passes\n"
        + "\n".join(rows)
        + "\n"
    )
    if not summary:
        return run
    finished = status == "completed"
    last3 = vals[-3:]
    steps = EVAL_STEPS[-1] if finished else 20
    data = {
        "status": status,
        "experiment": experiment,
        "scale": scale,
        "dataset": dataset,
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        "metric": "accuracy",
        "steps": steps,
        "epochs": 5 if finished else 2,
        "final": {
            "val_loss": vals[-1] if finished else None,
            "val_metric": 1 - vals[-1] if finished else None,
            "train_loss": vals[-1] + 0.1 if finished else None,
        },
        "best": {"val_loss": min(vals) if vals else None, "val_metric": None, "step": 50},
        "last3": {
            "val_loss_mean": float(np.mean(last3)) if finished else None,
            "val_loss_std": float(np.std(last3, ddof=1)) if finished else None,
            "n": 3 if finished else 0,
        },
        "wall_time": steps * tps + 5 * EVAL_SECONDS,
        "train_time": steps * tps,
        "steps_per_s": 1 / tps,
        "curvature_passes": steps * passes,
        "diverged_at_step": 20 if status == "diverged" else None,
        "error": "RuntimeError: killed" if status == "failed" else None,
    }
    (run / "summary.json").write_text(json.dumps(data))
    return run
