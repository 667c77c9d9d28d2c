"""Cost per optimizer step and the curvature-pass overhead relative to Adam.

Time per step of a run = train_time / steps (training steps with their curvature passes,
evaluation excluded), over the completed runs of every LR and seed (the step cost does not
depend on the LR). Overhead vs Adam = mean time per step / Adam's − 1, in %: the price of the
curvature passes plus the optimizer's own arithmetic. One bar-chart figure per experiment and
one Markdown table for all of them (``cost.md`` in the output folder).

    python plots/cost.py --root results --out plots/figures
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/cost.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lehi.io import atomic_write_text
from lehi.results import (
    EXP_KEYS,
    REFERENCE_OPTIMIZER,
    Results,
    experiment_heading,
    optimizer_label,
    select_experiment,
)
from plots import common
from plots.style import color, figure_stem, optimizer_rank, save

TABLE_NAME = "cost.md"


def cost_table(results: Results) -> pd.DataFrame:
    """Per (experiment, scale, dataset, optimizer): time per step and overhead vs Adam.

    Columns: EXP_KEYS, optimizer, n_runs, ms_per_step_mean, ms_per_step_std (over runs),
    curvature_passes_per_step, overhead_pct (NaN without Adam runs).
    """
    runs = results.runs
    runs = runs[
        (runs["status"] == "completed")
        & (runs["steps"] > 0)
        & np.isfinite(runs["train_time"].to_numpy(float))
    ]
    runs = runs.assign(
        ms_per_step=1000 * runs["train_time"] / runs["steps"],
        passes_per_step=runs["curvature_passes"] / runs["steps"],
    )
    rows = []
    for key, group in runs.groupby([*EXP_KEYS, "optimizer"], sort=False):
        ms = group["ms_per_step"].to_numpy(float)
        rows.append(
            [
                *key,
                len(group),
                ms.mean(),
                ms.std(ddof=1) if len(ms) > 1 else math.nan,
                float(group["passes_per_step"].mean()),
            ]
        )
    table = pd.DataFrame(
        rows,
        columns=[
            *EXP_KEYS,
            "optimizer",
            "n_runs",
            "ms_per_step_mean",
            "ms_per_step_std",
            "curvature_passes_per_step",
        ],
    )
    ref = table.loc[
        table["optimizer"] == REFERENCE_OPTIMIZER, [*EXP_KEYS, "ms_per_step_mean"]
    ].rename(columns={"ms_per_step_mean": "_ref"})
    table = table.merge(ref, on=list(EXP_KEYS), how="left")
    table["overhead_pct"] = 100 * (table["ms_per_step_mean"] / table["_ref"] - 1)
    table = table.drop(columns="_ref")
    if table.empty:
        return table
    table = table.assign(_rank=table["optimizer"].map(optimizer_rank))
    return table.sort_values([*EXP_KEYS, "_rank"]).drop(columns="_rank").reset_index(drop=True)


def figure(table: pd.DataFrame, exp: dict[str, str]) -> Figure:
    """Bar charts of one experiment: ms per step, and overhead vs Adam in %."""
    rows = select_experiment(table, exp)
    names = [optimizer_label(o) for o in rows["optimizer"]]
    colours = [color(o) for o in rows["optimizer"]]
    fig = Figure(figsize=(9.0, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.bar(
        names,
        rows["ms_per_step_mean"],
        yerr=np.nan_to_num(rows["ms_per_step_std"]),
        color=colours,
        capsize=4,
    )
    left.set_ylabel("time per step (ms)")
    left.set_xlabel("optimizer")
    left.set_title("training time per step (mean ± std over runs)", fontsize="small")
    right.bar(names, np.nan_to_num(rows["overhead_pct"]), color=colours)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_ylabel("overhead vs Adam (%)")
    right.set_xlabel("optimizer")
    right.set_title("extra time per step relative to Adam", fontsize="small")
    if not (rows["optimizer"] == REFERENCE_OPTIMIZER).any():
        right.text(0.5, 0.5, "no Adam runs", transform=right.transAxes, ha="center")
    fig.suptitle(f"Step cost: {experiment_heading(**exp)}", fontsize="medium")
    return fig


def markdown(table: pd.DataFrame, results: Results) -> str:
    """One Markdown table per experiment: ms/step, curvature passes/step, overhead vs Adam."""
    lines = [
        "# Step cost",
        "",
        "Time per step = train_time / steps (curvature passes included, evaluation "
        "excluded), mean ± std over completed runs of all LRs and seeds; overhead = "
        "relative to Adam's mean.",
        "",
    ]
    for exp in results.experiments():
        lines += [
            f"## {experiment_heading(**exp)}",
            "",
            "| optimizer | runs | ms per step | curvature passes per step | overhead vs Adam |",
            "|---|---|---|---|---|",
        ]
        for r in select_experiment(table, exp).to_dict("records"):
            ms = f"{r['ms_per_step_mean']:.3g}"
            if math.isfinite(r["ms_per_step_std"]):
                ms += f" ± {r['ms_per_step_std']:.2g}"
            over = f"{r['overhead_pct']:+.1f} %" if math.isfinite(r["overhead_pct"]) else "—"
            lines.append(
                f"| {optimizer_label(r['optimizer'])} | {r['n_runs']} | {ms} | "
                f"{r['curvature_passes_per_step']:.3g} | {over} |"
            )
        lines.append("")
    return "\n".join(lines)


def figures(results: Results, table: pd.DataFrame | None = None) -> dict[str, Figure]:
    """All cost figures, keyed by file stem."""
    table = cost_table(results) if table is None else table
    return {
        figure_stem("cost", e["experiment"], e["scale"]): figure(table, e)
        for e in results.experiments()
    }


def make(results: Results, out: Path) -> list[Path]:
    """Write the cost figures (PNG + PDF) and ``cost.md`` into ``out``."""
    table = cost_table(results)
    paths = [p for stem, fig in figures(results, table).items() for p in save(fig, out, stem)]
    md = Path(out) / TABLE_NAME
    atomic_write_text(md, markdown(table, results))
    return [*paths, md]


if __name__ == "__main__":
    sys.exit(common.main([make], description=__doc__.split("\n")[0]))
