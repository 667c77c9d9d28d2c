"""Train and validation loss vs step and vs training time at each optimizer's best LR.

One figure per experiment, 2 × 2 panels: rows train / validation loss, columns step /
training time. Curves are the mean over seeds, shaded ±1 std over seeds, aligned on the
step (only steps every seed logged; the time axis is the mean train_time of those seeds at
that step). On the log axis a band that would reach zero is cut at half the mean. Training
time counts training steps with their curvature passes and excludes
evaluation. Train rows are running means over the logging interval.

    python plots/loss_curves.py --root results --out plots/figures
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/loss_curves.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lehi.results import Results, select_experiment
from plots import common
from plots.style import (
    color,
    experiment_heading,
    figure_stem,
    label,
    loss_label,
    optimizer_rank,
    save,
)

SPLITS = (("train", "training loss"), ("val", "validation loss"))


def seed_curve(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean/std over seeds per step of one optimizer's rows for one split.

    Returns columns step, loss_mean, loss_std (NaN for one seed), train_time (mean), n_seeds;
    only steps present in every seed, so a curve never mixes different seed sets.
    """
    loss = rows.pivot_table(index="step", columns="seed", values="loss", aggfunc="last")
    time = rows.pivot_table(index="step", columns="seed", values="train_time", aggfunc="last")
    complete = loss.notna().all(axis=1) & time.notna().all(axis=1)
    loss, time = loss[complete], time[complete]
    std = loss.std(axis=1, ddof=1) if loss.shape[1] > 1 else pd.Series(np.nan, index=loss.index)
    return pd.DataFrame(
        {
            "step": loss.index.to_numpy(float),
            "loss_mean": loss.mean(axis=1).to_numpy(float),
            "loss_std": std.to_numpy(float),
            "train_time": time.mean(axis=1).to_numpy(float),
            "n_seeds": loss.shape[1],
        }
    )


def figure(results: Results, exp: dict[str, str]) -> Figure:
    """The loss-curve figure of one experiment (``exp`` from ``results.experiments()``)."""
    best = select_experiment(results.best, exp)
    best = best[np.isfinite(best["lr"].to_numpy(float))]
    runs = select_experiment(results.runs, exp)
    metrics = select_experiment(results.metrics, exp)
    fig = Figure(figsize=(10.0, 7.0), layout="constrained")
    axes = fig.subplots(2, 2, sharey="row")
    drawn = [False] * len(
        SPLITS
    )  # an empty log axis cannot be drawn: rows without curves stay linear
    for row in sorted(best.to_dict("records"), key=lambda r: optimizer_rank(r["optimizer"])):
        opt = row["optimizer"]
        ids = runs.loc[
            (runs["optimizer"] == opt)
            & (runs["lr"] == row["lr"])
            & ~runs["diverged"]
            & (runs["status"] != "failed"),
            "run",
        ]
        mine = metrics[metrics["run"].isin(ids)]
        for i, (split, _) in enumerate(SPLITS):
            curve = seed_curve(mine[mine["split"] == split])
            curve = curve[curve["loss_mean"] > 0]  # log axis
            drawn[i] = drawn[i] or not curve.empty
            std = np.nan_to_num(curve["loss_std"].to_numpy(float), nan=0.0)
            mean = curve["loss_mean"].to_numpy(float)
            lower = np.where(mean - std > 0, mean - std, mean / 2)
            for j, x in enumerate(("step", "train_time")):
                ax = axes[i, j]
                ax.plot(curve[x], mean, color=color(opt), label=f"{label(opt)} (lr={row['lr']:g})")
                ax.fill_between(
                    curve[x], lower, mean + std, color=color(opt), alpha=0.18, linewidth=0
                )
    loss_unit = loss_label(exp["metric_name"])
    for i, (_, name) in enumerate(SPLITS):
        for j, xlabel in enumerate(
            ("step (optimizer updates)", "training time (s, curvature passes incl., eval excl.)")
        ):
            ax = axes[i, j]
            if drawn[i]:
                ax.set_yscale("log")
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no curves (no eligible LR or no readable metrics.csv)",
                    transform=ax.transAxes,
                    ha="center",
                    fontsize="small",
                )
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{name}, {loss_unit}")
            ax.grid(True, alpha=0.3)
    if drawn[0] or drawn[1]:
        axes[0, 0].legend(
            title="best LR; mean ± std over seeds", fontsize="small", title_fontsize="small"
        )
    fig.suptitle(
        f"Loss curves at each optimizer's best LR: {experiment_heading(**exp)}", fontsize="medium"
    )
    return fig


def figures(results: Results) -> dict[str, Figure]:
    """All loss-curve figures, keyed by file stem."""
    return {
        figure_stem("loss_curves", e["experiment"], e["scale"]): figure(results, e)
        for e in results.experiments()
    }


def make(results: Results, out: Path) -> list[Path]:
    """Write every experiment's loss-curve figure (PNG + PDF) into ``out``."""
    return [p for stem, fig in figures(results).items() for p in save(fig, out, stem)]


if __name__ == "__main__":
    sys.exit(common.main([make], description=__doc__.split("\n")[0]))
