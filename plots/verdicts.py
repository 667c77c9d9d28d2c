"""The verdicts' figures: expected best loss against the tuning budget, performance profiles.

``tuning_budget_<exp>``: per workload with confirmation runs, the expected best final
validation loss after k LR trials of each reading's tuning grid (lehi.results.verdicts:
unbiased without-replacement estimator, 95 % bootstrap band over tuning seeds).
``performance_profile``: over the confirmed workloads, the fraction of workloads where a
reading's time (left) or steps (right) to the confirmed target is within τ × the best
reading's, with each reading's area-under-profile score in the legend. Every number comes
from lehi.results.verdicts.

    python plots/verdicts.py --root results --out plots/figures
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/verdicts.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from matplotlib.figure import Figure

from lehi.results import Results
from lehi.results import verdicts as V
from lehi.results.confirm import optimizer_name
from plots import common
from plots.style import label, reading_styles, save


def tuning_budget_figure(budget, workload: str) -> Figure:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    rows = budget[budget["workload"] == workload]
    readings = list(dict.fromkeys(rows["reading"]))
    styles = reading_styles(readings, {r: optimizer_name(r) for r in readings})
    for reading, g in rows.groupby("reading", sort=False):
        c, style = styles[reading]
        ax.plot(g["k"], g["expected_best"], style, marker="o", ms=3, color=c,
                label=f"{label(reading, optimizer_name(reading))} ({g['tuning_experiment'].iloc[0]})")  # fmt: skip
        ax.fill_between(g["k"], g["low"], g["high"], color=c, alpha=0.15, lw=0)
    ax.set_xlabel("LR trials drawn from the tuning grid (k)")
    ax.set_ylabel("expected best final val loss")
    ax.set_yscale("log")
    ax.set_title(f"Tuning budget: {workload} (tuning seeds; a diverged trial scores its "
                 "initial loss;\nband: 95 % bootstrap over seeds)", fontsize="small")  # fmt: skip
    ax.legend(fontsize="x-small")
    return fig


def profile_figure(times) -> Figure:
    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    scores = V.profiles(times)
    taus = np.linspace(1.0, V.R_MAX, 400)
    readings = list(dict.fromkeys(scores["reading"]))
    styles = reading_styles(readings, {r: optimizer_name(r) for r in readings})
    for ax, measure in zip(axes, ("time", "steps"), strict=True):
        for r in scores[scores["measure"] == measure].to_dict("records"):
            ratios = np.array(list(r["ratios"].values()), dtype=float)
            rho = [(ratios <= t).mean() for t in taus]
            c, style = styles[r["reading"]]
            ax.step(taus, rho, style, where="post", color=c,
                    label=f"{label(r['reading'], optimizer_name(r['reading']))}: {r['score']:.2f}")  # fmt: skip
        ax.set_xlabel("τ (ratio to the best reading on a workload)")
        ax.set_title(f"{measure} to target (score = area / {V.R_MAX - 1:g})", fontsize="small")
        ax.legend(fontsize="x-small", loc="lower right")
        ax.set_xlim(1.0, V.R_MAX)
    axes[0].set_ylabel("fraction of workloads within τ of the best")
    n = times["workload"].nunique()
    fig.suptitle(f"Performance profiles over {n} confirmed workloads (target = "
                 f"{V.TARGET_FACTOR} × confirmed Adam median)", fontsize="medium")  # fmt: skip
    return fig


def make(results: Results, out: Path) -> list[Path]:
    """Write tuning_budget_<workload> and performance_profile (PNG + PDF) into ``out``."""
    paths: list[Path] = []
    budget = V.tuning_budget(results)
    for workload in sorted(set(budget["workload"])) if not budget.empty else []:
        paths += save(tuning_budget_figure(budget, workload), out, f"tuning_budget_{workload}")
    times = V.time_to_target(results)
    if not times.empty:
        paths += save(profile_figure(times), out, "performance_profile")
    return paths


if __name__ == "__main__":
    sys.exit(common.main([make], description=__doc__.split("\n")[0]))
