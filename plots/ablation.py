"""LR sensitivity of every reading of LEHI in each ablation experiment (one figure per dataset).

    python plots/ablation.py --root results --out plots/figures

Writes ``<out>/<experiment>.{png,pdf}`` for each experiment named ``ablation_*``: final
validation loss against learning rate (log–log), one line per reading over the LRs where no
seed diverged; a strip above marks the LRs where a seed diverged (×); hollow markers show
LRs where a seed's loss spiked and recovered; the dashed line is Adam's best. Every number
comes from :mod:`lehi.results` (the cells and best LRs) and :mod:`lehi.results.ablation`.
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/ablation.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lehi import roster
from lehi.results import Results, select_experiment
from lehi.results.ablation import ablation_cells, ablation_table, experiments
from plots import common
from plots.style import (
    UNSTABLE_LABEL,
    experiment_heading,
    label,
    loss_label,
    reading_styles,
    save,
)


def _draw_reading(ax, strip, row: int, cells: pd.DataFrame, name: str, style) -> None:  # noqa: ANN001
    colour, dash = style
    lb = label(str(cells["optimizer"].iloc[0]), name)
    good = cells[cells["eligible"]].sort_values("lr")
    lr, loss = good["lr"].to_numpy(float), good["val_loss_mean"].to_numpy(float)
    ax.plot(lr, loss, marker="o", markersize=5, color=colour, linestyle=dash, label=lb)
    spike = good["recovered_spike"].to_numpy(bool)
    if spike.any():
        ax.plot(lr[spike], loss[spike], linestyle="none", marker="o", markersize=10,
                markerfacecolor="white", color=colour, zorder=3)  # fmt: skip
        ax.plot(lr[spike], loss[spike], linestyle="none", marker="o", markersize=4,
                color=colour, zorder=4)  # fmt: skip
    diverged = cells.loc[cells["n_diverged"] > 0, "lr"].to_numpy(float)
    strip.plot(diverged, np.full(len(diverged), row), linestyle="none", marker="x",
               markersize=7, markeredgewidth=2, color=colour)  # fmt: skip


def figure(results: Results, exp: dict[str, str], table: pd.DataFrame) -> Figure:
    """The LR-sensitivity figure of one ablation experiment (``table``: its ablation rows)."""
    cells = ablation_cells(results, exp)
    rows = select_experiment(table, exp)
    order = list(rows["optimizer"])
    names = dict(zip(rows["optimizer"], rows["optimizer_name"], strict=True))
    style = reading_styles(order, names)
    fig = Figure(figsize=(12, 7), layout="constrained")
    strip, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 3.2))
    ax.set_xscale("log")
    ax.set_yscale("log")
    for row, reading in enumerate(order):
        group = cells[cells["optimizer"] == reading]
        _draw_reading(ax, strip, row, group, names[reading], style[reading])
    adam = float(rows["adam_best_val_loss"].iloc[0])
    if np.isfinite(adam):
        adam_lr = float(rows.loc[rows["optimizer"] == roster.REFERENCE, "best_lr"].iloc[0])
        ax.axhline(adam, color=roster.color(roster.REFERENCE), linestyle="--", linewidth=1,
                   label=f"best Adam final val loss ({adam:.4g} at lr={adam_lr:g})")  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    if cells.loc[cells["eligible"], "recovered_spike"].any():
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=9,
                              markerfacecolor="white", color="black"))  # fmt: skip
        labels.append(UNSTABLE_LABEL.replace(" (", "\n("))
    ax.legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    strip.set_yticks(range(len(order)), [label(r, names[r]) for r in order], fontsize="x-small")
    strip.set_ylim(len(order) - 0.5, -0.5)
    strip.set_ylabel("× diverged\n(≥ 1 seed)", fontsize="small")
    strip.grid(True, axis="x", alpha=0.3)
    lrs = cells["lr"].to_numpy(float)
    if len(lrs):
        ax.set_xlim(lrs.min() / 1.6, lrs.max() * 1.6)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(
        f"final validation loss, {loss_label(exp['metric_name'])}\n"
        "(mean of last 3 evals, mean over seeds)"
    )
    ax.grid(True, which="major", alpha=0.3)
    strip.set_title(f"LEHI readings, LR sensitivity: {experiment_heading(**exp)}",
                    fontsize="medium")  # fmt: skip
    return fig


def figures(results: Results) -> dict[str, Figure]:
    """Every ablation experiment's figure, keyed by file stem (the experiment's name)."""
    table = ablation_table(results)
    return {e["experiment"]: figure(results, e, table) for e in experiments(results)}


def make(results: Results, out: Path) -> list[Path]:
    """Write each ablation experiment's figure (PNG + PDF) into ``out``."""
    return [p for stem, fig in figures(results).items() for p in save(fig, out, stem)]


if __name__ == "__main__":
    sys.exit(common.main([make], description=__doc__.split("\n")[0]))
