"""Final validation loss vs learning rate, one line per optimizer, per experiment.

Each point is a cell's mean over seeds of the per-run final validation loss (mean of its last
3 evaluations). Shading: ±2 std over seeds; a single-seed cell uses ±2 × the std over its own
last 3 evaluations (the paper's error bars). LRs where any seed diverged (non-finite, held
above the divergence factor, or ending above its initial validation loss) are drawn as an "x"
at the top of the axes (one row per optimizer) instead of on the line (they are not eligible
as best LR). A hollow point is a cell with a seed that was unstable but recovered (its
training loss once exceeded the divergence factor × its initial loss). The dashed line is the
best Adam final validation loss. Axes are log-log. Every number comes from lehi.results.

    python plots/lr_sensitivity.py --root results --out plots/figures
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/lr_sensitivity.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lehi.results import REFERENCE_OPTIMIZER, Results, select_experiment
from plots import common
from plots.style import (
    UNSTABLE_LABEL,
    color,
    experiment_heading,
    figure_stem,
    label,
    loss_label,
    rank,
    save,
)

DIVERGED_Y = 0.96  # axes fraction where diverged LRs are marked (first optimizer)
DIVERGED_STEP = 0.035  # each optimizer its own row, so markers at one LR do not hide each other
DIVERGED_LABEL = "x at top: LR diverged (≥ 1 seed)"


@dataclass(frozen=True)
class Series:
    """One optimizer's line: eligible cells, their bands, and the LRs marked diverged."""

    optimizer: str
    name: str  # optimizer.name: colour and order from the roster
    lr: np.ndarray
    mean: np.ndarray
    spread: np.ndarray
    diverged: np.ndarray  # LRs where a seed diverged (drawn as "x" at the top)
    unstable: np.ndarray  # per eligible LR: a seed was unstable but recovered (hollow)


def _series(cells: pd.DataFrame) -> list[Series]:
    names = dict(zip(cells["optimizer"], cells["optimizer_name"], strict=True))
    out = []
    for opt in sorted(names, key=lambda o: rank(o, names[o])):
        c = cells[cells["optimizer"] == opt].sort_values("lr")
        good = c[c["eligible"]]
        out.append(
            Series(
                opt,
                names[opt],
                good["lr"].to_numpy(float),
                good["val_loss_mean"].to_numpy(float),
                np.nan_to_num(good["val_loss_spread"].to_numpy(float), nan=0.0),
                c.loc[c["n_diverged"] > 0, "lr"].to_numpy(float),
                (good["n_unstable"] > 0).to_numpy(bool),
            )
        )
    return out


def _limits(series: list[Series], ref_value: float | None) -> tuple[float, float]:
    """Log y: limits from the positive values; a band reaching ≤ 0 runs off the bottom."""
    positive = [
        v for s in series for v in (*s.mean, *(s.mean - s.spread), *(s.mean + s.spread)) if v > 0
    ]
    if ref_value is not None and ref_value > 0:
        positive.append(ref_value)
    bottom, top = (min(positive) / 1.25, max(positive) * 1.25) if positive else (0.1, 10.0)
    n_marked = sum(1 for s in series if len(s.diverged))
    if n_marked:  # keep the marker rows above the data: stretch the top in log space
        free = 1 - DIVERGED_Y + n_marked * DIVERGED_STEP
        top = bottom * (top / bottom) ** (1 / (1 - free))
    return bottom, top


def _draw(ax, s: Series, bottom: float, row: int) -> None:
    ax.plot(s.lr, s.mean, marker="o", color=color(s.name), label=label(s.optimizer, s.name))
    lower = np.where(s.mean - s.spread > 0, s.mean - s.spread, bottom / 10)
    ax.fill_between(s.lr, lower, s.mean + s.spread, color=color(s.name), alpha=0.18, linewidth=0)
    if s.unstable.any():
        ax.plot(s.lr[s.unstable], s.mean[s.unstable], linestyle="none", marker="o",
                markersize=9, markerfacecolor="white", color=color(s.name),
                label=f"_{s.optimizer} unstable")  # fmt: skip
    if len(s.diverged):
        ax.plot(s.diverged, np.full(len(s.diverged), DIVERGED_Y - row * DIVERGED_STEP),
                linestyle="none", marker="x", markersize=9, markeredgewidth=2,
                color=color(s.name), clip_on=False, transform=ax.get_xaxis_transform(),
                label=f"_{s.optimizer} diverged")  # fmt: skip


def _legend(ax, series: list[Series], single_seed: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if any(len(s.diverged) for s in series):
        handles.append(
            Line2D([], [], linestyle="none", marker="x", markeredgewidth=2, color="black")
        )
        labels.append(DIVERGED_LABEL)
    if any(s.unstable.any() for s in series):
        handles.append(
            Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", color="black")
        )
        labels.append(UNSTABLE_LABEL)
    band = "shaded: ±2 std over seeds"
    if single_seed:
        band += "\n(1 seed: ±2 std of its last 3 evals)"
    ax.legend(handles, labels, title=band, fontsize="small", title_fontsize="small",
              loc="upper left", bbox_to_anchor=(1.02, 1.0))  # fmt: skip


def figure(results: Results, exp: dict[str, str]) -> Figure:
    """The LR-sensitivity figure of one experiment (``exp`` from ``results.experiments()``)."""
    cells = select_experiment(results.cells, exp)
    best = select_experiment(results.best, exp)
    fig = Figure(figsize=(9.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    series = _series(cells)
    ref = best[(best["optimizer"] == REFERENCE_OPTIMIZER) & np.isfinite(best["lr"])]
    ref_value = float(ref["val_loss_mean"].iloc[0]) if len(ref) else None
    bottom, top = _limits(series, ref_value)
    row = 0
    for s in series:
        _draw(ax, s, bottom, row)
        row += bool(len(s.diverged))
    if ref_value is not None:
        ax.axhline(
            ref_value,
            color=color(REFERENCE_OPTIMIZER),
            linestyle="--",
            linewidth=1,
            label=f"best Adam final val loss ({ref_value:.4g} at lr={ref['lr'].iloc[0]:g})",
        )
    ax.set_ylim(bottom, top)
    _legend(ax, series, bool((cells.loc[cells["eligible"], "n_seeds"] == 1).any()))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(
        f"final validation loss, {loss_label(exp['metric_name'])}\n"
        "(mean of last 3 evals, mean over seeds)"
    )
    ax.set_title(f"LR sensitivity: {experiment_heading(**exp)}", fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def figures(results: Results) -> dict[str, Figure]:
    """All LR-sensitivity figures, keyed by file stem."""
    return {
        figure_stem("lr_sensitivity", e["experiment"], e["scale"]): figure(results, e)
        for e in common.drawn_alone(results)
    }


def make(results: Results, out: Path) -> list[Path]:
    """Write every experiment's LR-sensitivity figure (PNG + PDF) into ``out``."""
    return [p for stem, fig in figures(results).items() for p in save(fig, out, stem)]


if __name__ == "__main__":
    sys.exit(common.main([make], description=__doc__.split("\n")[0]))
