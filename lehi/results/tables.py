"""Every table the summary and the figures need, computed once from a results tree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lehi.results import significance as sig
from lehi.results import stats, store
from lehi.results.store import EXP_KEYS


@dataclass(frozen=True)
class Results:
    """The tables of one results tree (see :func:`collect`)."""

    root: Path
    runs: pd.DataFrame  # one row per run, plus counted, unstable, steps_to_target
    metrics: pd.DataFrame  # tidy metrics.csv rows with run keys
    cells: pd.DataFrame  # one row per (experiment, scale, dataset, optimizer, lr)
    best: pd.DataFrame  # best LR per (experiment, scale, dataset, optimizer) + cost to target
    targets: pd.DataFrame  # target loss per experiment and the rule that set it
    significance: pd.DataFrame  # candidates vs baselines at their best LRs
    step_cost: pd.DataFrame  # side-by-side step cost per (experiment, optimizer), if measured
    commits: pd.DataFrame  # the commits the runs were made at

    @property
    def empty(self) -> bool:
        """True when no finished run was found."""
        return self.runs.empty

    def experiments(self) -> list[dict[str, str]]:
        """Experiments in display order: dicts with experiment, scale, dataset, metric_name,
        and the budget (the most steps, and epochs, a run of the experiment trained)."""
        if self.cells.empty:
            return []
        first = self.cells.groupby(list(EXP_KEYS), sort=True)["metric_name"].first()
        budget = self.runs.groupby(list(EXP_KEYS))[["steps", "epochs"]].max()
        return [
            {
                **dict(zip((*EXP_KEYS, "metric_name"), (*k, m), strict=True)),
                "steps": budget.loc[k, "steps"] if k in budget.index else None,
                "epochs": budget.loc[k, "epochs"] if k in budget.index else None,
            }
            for k, m in first.items()
        ]

    def measured_on(self, experiment: str) -> str | None:
        """Where the side-by-side step cost of ``experiment`` was measured; None if never."""
        rows = self.step_cost[self.step_cost["experiment"] == experiment]
        return str(rows["measured_on"].iloc[0]) if len(rows) else None


def collect(
    root: str | Path,
    targets: Mapping[str, float] | None = None,
    target_factor: float = stats.TARGET_FACTOR,
) -> Results:
    """Load the tree under ``root`` and compute every table (see :mod:`lehi.results`)."""
    root = Path(root)
    runs = store.load_runs(root)
    metrics = store.load_metrics(root, runs)
    runs = store.add_initial_val_loss(runs, metrics)
    runs = runs.assign(counted=stats.counts(runs), unstable=stats.unstable(runs))
    cells = stats.aggregate(runs)
    best = stats.best_lrs(cells)
    target_table = stats.resolve_targets(best, targets, target_factor)
    runs = runs.merge(stats.steps_to_target(metrics, target_table), on="run", how="left")
    costs = stats.step_costs(root, sorted(set(runs["experiment"])))
    best = stats.add_cost(best, runs, target_table, costs)
    return Results(
        root=root,
        runs=runs,
        metrics=metrics,
        cells=cells,
        best=best,
        targets=target_table,
        significance=sig.significance(runs, best),
        step_cost=costs,
        commits=stats.commits(runs),
    )
