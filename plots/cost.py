"""Cost to reach the target: steps (from the runs) and time (× step cost measured side by side).

One figure per experiment, three bar charts over the optimizers at their best LR: steps to
the target validation loss (mean ± std over the seeds that reached it), time per step measured
side by side (benchmarks/step_cost.py → step_cost.json: median over repeats, bars q1–q3,
overhead vs Adam printed above each bar), and time to target = steps × that cost. Sweep wall
times are never used: runs shared the cores, so they measure load. Without step_cost.json the
two time panels say so. Also the Markdown table ``cost.md`` in the output folder. Every number
comes from lehi.results.

    python plots/cost.py --root results --out plots/figures
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/cost.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lehi.io import atomic_write_text
from lehi.results import Results, render_cost_markdown, select_experiment
from lehi.results.report import no_step_cost
from plots import common
from plots.style import color, experiment_heading, figure_stem, label, note, save

TABLE_NAME = "cost.md"


def _bars(ax, rows: pd.DataFrame, values: str, low: np.ndarray, high: np.ndarray) -> None:
    names = [label(o, n) for o, n in zip(rows["optimizer"], rows["optimizer_name"], strict=True)]
    ax.bar(
        names,
        np.nan_to_num(rows[values].to_numpy(float)),
        yerr=np.nan_to_num(np.vstack([low, high])),
        color=[color(n) for n in rows["optimizer_name"]],
        capsize=4,
    )
    ax.set_xlabel("optimizer")
    ax.tick_params(axis="x", labelrotation=30)


def _not_reached(ax, values: np.ndarray) -> None:
    for x, value in enumerate(values):
        if not np.isfinite(value):
            ax.annotate("not\nreached", (x, 0), xytext=(0, 3), ha="center",
                        textcoords="offset points", fontsize="x-small")  # fmt: skip


def figure(results: Results, exp: dict[str, str]) -> Figure:
    """Bar charts of one experiment: steps to target, ms per step, time to target."""
    rows = select_experiment(results.best, exp)
    measured_on = results.measured_on(exp["experiment"])
    fig = Figure(figsize=(13.0, 4.2), layout="constrained")
    steps_ax, ms_ax, time_ax = fig.subplots(1, 3)
    std = rows["steps_to_target_std"].to_numpy(float)
    _bars(steps_ax, rows, "steps_to_target_mean", std, std)
    _not_reached(steps_ax, rows["steps_to_target_mean"].to_numpy(float))
    steps_ax.set_ylabel("steps to target (optimizer updates)")
    steps_ax.set_title("steps to target at best LR\n(mean ± std over seeds, from the runs)",
                       fontsize="small")  # fmt: skip
    if measured_on is None:
        for ax in (ms_ax, time_ax):
            note(ax, no_step_cost(exp["experiment"]))
    else:
        ms = rows["ms_per_step"].to_numpy(float)
        _bars(ms_ax, rows, "ms_per_step", ms - rows["ms_per_step_q1"], rows["ms_per_step_q3"] - ms)
        tops = rows["ms_per_step_q3"].to_numpy(float)  # above the error bar
        for x, (top, over) in enumerate(zip(tops, rows["overhead_pct"], strict=True)):
            if np.isfinite(top) and np.isfinite(over):
                ms_ax.annotate(f"{over:+.0f} %", (x, top), xytext=(0, 3), ha="center",
                               textcoords="offset points", fontsize="small")  # fmt: skip
        ms_ax.set_ylabel("time per step (ms)")
        ms_ax.set_title(f"per-step cost measured side by side\n({measured_on}; "
                        "median, q1–q3; % vs Adam)", fontsize="small")  # fmt: skip
        std = rows["time_to_target_std"].to_numpy(float)
        _bars(time_ax, rows, "time_to_target_mean", std, std)
        _not_reached(time_ax, rows["time_to_target_mean"].to_numpy(float))
        time_ax.set_ylabel("time to target (s)")
        time_ax.set_title("time to target = steps × side-by-side step cost", fontsize="small")
    fig.suptitle(f"Cost to target: {experiment_heading(**exp)}", fontsize="medium")
    return fig


def figures(results: Results) -> dict[str, Figure]:
    """All cost figures, keyed by file stem."""
    return {
        figure_stem("cost", e["experiment"], e["scale"]): figure(results, e)
        for e in common.drawn_alone(results)
    }


def make(results: Results, out: Path) -> list[Path]:
    """Write the cost figures (PNG + PDF) and ``cost.md`` into ``out``."""
    paths = [p for stem, fig in figures(results).items() for p in save(fig, out, stem)]
    md = Path(out) / TABLE_NAME
    atomic_write_text(md, render_cost_markdown(results))
    return [*paths, md]


if __name__ == "__main__":
    sys.exit(common.main([make], description=__doc__.split("\n")[0]))
