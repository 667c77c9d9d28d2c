"""Train and validation loss vs step and vs training time at each optimizer's best LR.

One figure per experiment, 2 × 2 panels: rows train / validation loss, columns step /
training time. Where the intermediate evaluations ran on a fixed validation subset
(trainer.eval_subset_batches), those points are dashed and the full-split ones dotted. Curves are the mean over the counted seeds (lehi.results.stats.counts),
shaded ±1 std over seeds, aligned on the step (only steps every seed logged). On the log axis
a band that would reach zero is cut at half the mean. Train rows are running means over the
logging interval. Training time = step × the optimizer's per-step cost measured side by side
(step_cost.json, benchmarks/step_cost.py); the sweep's own wall times are not used (runs
shared the cores, so they measure load). Without step_cost.json the time panels say so.
A legend entry notes seeds that were unstable but recovered.

    python plots/loss_curves.py --root results --out plots/figures
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/loss_curves.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from matplotlib.figure import Figure

from lehi.results import Results, select_experiment
from lehi.results.report import no_step_cost
from lehi.results.stats import cell_curve
from plots import common
from plots.style import (
    color,
    experiment_heading,
    figure_stem,
    label,
    loss_label,
    note,
    rank,
    save,
)

SPLITS = (("train", "training loss"), ("val", "validation loss"))
#: Intermediate evaluations on a fixed validation subset (trainer.eval_subset_batches): drawn
#: dashed on the validation panel, never averaged with the full-split points.
SUBSET = "val_subset"


def _curve_label(row: dict) -> str:
    text = f"{label(row['optimizer'], row['optimizer_name'])} (lr={row['lr']:g})"
    if row["n_unstable"]:
        text += f", {row['n_unstable']}/{row['n_seeds']} seeds unstable, recovered"
    return text


def _draw(axes, row: dict, results: Results, drawn: list[bool]) -> None:
    """One optimizer's curves on every panel; x of the time column = step × step cost."""
    seconds = row["ms_per_step"] / 1000
    for i, (split, _) in enumerate(SPLITS):
        curve = cell_curve(results.runs, results.metrics, row, split)
        curve = curve[curve["loss_mean"] > 0]  # log axis
        drawn[i] = drawn[i] or not curve.empty
        std = np.nan_to_num(curve["loss_std"].to_numpy(float), nan=0.0)
        mean = curve["loss_mean"].to_numpy(float)
        lower = np.where(mean - std > 0, mean - std, mean / 2)
        step = curve["step"].to_numpy(float)
        subset = cell_curve(results.runs, results.metrics, row, SUBSET) if split == "val" else None
        for j, x in enumerate((step, step * seconds)):
            if not np.isfinite(x).all():
                continue  # no side-by-side cost for this optimizer: no time curve
            ax = axes[i, j]
            ax.plot(x, mean, color=color(row["optimizer_name"]), label=_curve_label(row),
                    marker="o" if subset is not None and not subset.empty else None, ms=3)  # fmt: skip
            ax.fill_between(
                x, lower, mean + std, color=color(row["optimizer_name"]), alpha=0.18, linewidth=0
            )
            if subset is not None and not subset.empty:
                sx = subset["step"].to_numpy(float) * (1.0 if j == 0 else seconds)
                ax.plot(sx, subset["loss_mean"], color=color(row["optimizer_name"]), ls="--", lw=1)


def _dress(
    axes, exp: dict[str, str], drawn: list[bool], measured_on: str | None, subsets: bool
) -> None:
    time_label = "training time (s): step × step cost measured side by side"
    if measured_on:
        time_label += f"\n({measured_on})"
    for i, (_, name) in enumerate(SPLITS):
        for j, xlabel in enumerate(("step (optimizer updates)", time_label)):
            ax = axes[i, j]
            if not drawn[i]:
                ax.text(0.5, 0.5, "no curves (no eligible LR or no readable metrics.csv)",
                        transform=ax.transAxes, ha="center", fontsize="small")  # fmt: skip
            elif j == 1 and not measured_on:
                note(ax, no_step_cost(exp["experiment"]))
            else:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ylabel = f"{name}, {loss_label(exp['metric_name'])}"
            if i == 1 and subsets:
                ylabel += "\n(dots: full split; dashed: fixed subset)"
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)


def figure(results: Results, exp: dict[str, str]) -> Figure:
    """The loss-curve figure of one experiment (``exp`` from ``results.experiments()``)."""
    best = select_experiment(results.best, exp)
    best = best[np.isfinite(best["lr"].to_numpy(float))]
    fig = Figure(figsize=(10.0, 7.0), layout="constrained")
    measured_on = results.measured_on(exp["experiment"])
    # Without a step cost the time panels hold a note: sharing y would strip the step panels.
    axes = fig.subplots(2, 2, sharey="row" if measured_on else False)
    drawn = [False] * len(SPLITS)  # an empty log axis cannot be drawn: such rows stay linear
    rows = best.to_dict("records")
    for row in sorted(rows, key=lambda r: rank(r["optimizer"], r["optimizer_name"])):
        _draw(axes, row, results, drawn)
    subsets = bool((results.metrics["split"] == SUBSET).any()) and any(
        not cell_curve(results.runs, results.metrics, r, SUBSET).empty for r in rows
    )
    _dress(axes, exp, drawn, measured_on, subsets)
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
        for e in common.drawn_alone(results)
    }


def make(results: Results, out: Path) -> list[Path]:
    """Write every experiment's loss-curve figure (PNG + PDF) into ``out``."""
    return [p for stem, fig in figures(results).items() for p in save(fig, out, stem)]


if __name__ == "__main__":
    sys.exit(common.main([make], description=__doc__.split("\n")[0]))
