"""Statistics over runs: which runs count, cells, best LRs, targets, steps and cost to target.

Every table and figure takes its numbers from here (definitions in :mod:`lehi.results`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lehi import roster
from lehi.results import stepcost
from lehi.results.store import CELL_KEYS, EXP_KEYS, sort_frame, spiked

log = logging.getLogger("lehi.results")

REFERENCE_OPTIMIZER = roster.REFERENCE
TARGET_FACTOR = 1.05

CELL_COLUMNS = (
    *CELL_KEYS,
    "optimizer_name",
    "metric_name",
    "n_runs",
    "n_seeds",
    "n_diverged",
    "n_trained",
    "n_failed",
    "n_unstable",
    "val_loss_mean",
    "val_loss_std",
    "val_loss_spread",
    "last_val_loss_mean",
    "last_val_loss_std",
    "metric_mean",
    "metric_std",
    "eligible",
)
_CELL_STATS = (
    "lr",
    "val_loss_mean",
    "val_loss_std",
    "val_loss_spread",
    "last_val_loss_mean",
    "last_val_loss_std",
    "metric_mean",
    "metric_std",
)


def counts(runs: pd.DataFrame) -> np.ndarray:
    """The one filter of runs that enter statistics: not failed, not diverged, finite loss."""
    return (
        (runs["status"] != "failed").to_numpy()
        & ~runs["diverged"].to_numpy(bool)
        & np.isfinite(runs["val_loss"].to_numpy(float))
    )


def unstable(runs: pd.DataFrame) -> np.ndarray:
    """Counted runs whose training loss once rose above divergence_factor × its initial value
    and recovered ("unstable, recovered"; one that never trained again is diverged,
    store.classify); unknown (older summaries) counts as stable."""
    return counts(runs) & spiked(runs)


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof=1; NaN for fewer than 2 values)."""
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _cell_row(key: tuple, group: pd.DataFrame) -> list[Any]:
    used = group[counts(group)]
    loss = used["val_loss"].to_numpy(float)
    last = used["final_val_loss"].to_numpy(float)
    metric = used["final_val_metric"].to_numpy(float)
    loss_mean, loss_std = mean_std(loss)
    if len(loss) > 1:
        spread = 2 * loss_std
    elif len(loss) == 1:
        spread = 2 * float(used["val_loss_last3_std"].iloc[0])
    else:
        spread = math.nan
    n_diverged = int(group["diverged"].sum())
    return [
        *key,
        str(group["optimizer_name"].iloc[0]),
        next((m for m in group["metric_name"] if m), ""),
        len(group),
        len(loss),
        n_diverged,
        int(group["trained"].sum()),
        int((group["status"] == "failed").sum()),
        int(unstable(group).sum()),
        loss_mean,
        loss_std,
        spread,
        *mean_std(last[np.isfinite(last)]),
        *mean_std(metric[np.isfinite(metric)]),
        n_diverged == 0 and len(loss) > 0,
    ]


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (experiment, scale, dataset, optimizer, lr) with seed statistics.

    Columns: ``CELL_COLUMNS``. n_seeds counts the runs that enter the statistics
    (:func:`counts`); ``last_val_loss_*`` are over their last evaluations.
    """
    rows = [_cell_row(k, g) for k, g in runs.groupby(list(CELL_KEYS), sort=False)]
    return sort_frame(pd.DataFrame(rows, columns=list(CELL_COLUMNS)), CELL_KEYS)


def best_lrs(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, scale, dataset, optimizer): its best eligible LR cell.

    Adds the optimizer's totals over its whole grid: n_lrs, n_stable_lrs (LRs where no seed
    diverged), n_trained_lrs (LRs where every seed trained, store.TRAINED_FRACTION),
    n_runs_total, n_diverged_total, n_failed_total. ``lr`` and the statistics are NaN when no
    cell is eligible.
    """
    totals = [
        "n_lrs",
        "n_stable_lrs",
        "n_trained_lrs",
        "n_runs_total",
        "n_diverged_total",
        "n_failed_total",
    ]
    rows = []
    for _, group in cells.groupby([*EXP_KEYS, "optimizer"], sort=False):
        eligible = group[group["eligible"]].sort_values("lr", kind="stable")
        if eligible.empty:
            row = group.iloc[0].copy()
            for col in _CELL_STATS:
                row[col] = math.nan
            for col in ("n_runs", "n_seeds", "n_diverged", "n_trained", "n_failed", "n_unstable"):
                row[col] = 0
        else:
            row = eligible.loc[eligible["val_loss_mean"].idxmin()].copy()
        row["n_lrs"] = len(group)
        row["n_stable_lrs"] = int(group["eligible"].sum())
        row["n_trained_lrs"] = int(
            ((group["n_trained"] == group["n_runs"]) & group["eligible"]).sum()
        )
        row["n_runs_total"] = int(group["n_runs"].sum())
        row["n_diverged_total"] = int(group["n_diverged"].sum())
        row["n_failed_total"] = int(group["n_failed"].sum())
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*(c for c in cells.columns if c != "eligible"), *totals])
    best = pd.DataFrame(rows).drop(columns="eligible")
    return sort_frame(best, (*EXP_KEYS, "optimizer"))


def _check_targets(targets: Mapping[str, float], known: list[str], factor: float) -> None:
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"target factor {factor!r} must be a finite number > 0")
    for name, value in targets.items():
        if name not in known:
            raise ValueError(
                f"target given for unknown experiment {name!r}; "
                f"experiments here: {', '.join(known) or 'none'}"
            )
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"target for {name!r} is {value!r}; expected a finite number")


def resolve_targets(
    best: pd.DataFrame, targets: Mapping[str, float] | None = None, factor: float = TARGET_FACTOR
) -> pd.DataFrame:
    """Target validation loss per experiment (columns: EXP_KEYS, target, target_rule).

    ``targets`` maps experiment names to explicit target losses; the others get the default
    rule (:mod:`lehi.results`) with ``factor``.
    """
    targets = dict(targets or {})
    _check_targets(targets, sorted(set(best["experiment"])), factor)
    ref_label = roster.display_label(REFERENCE_OPTIMIZER)
    rows = []
    for key, group in best.groupby(list(EXP_KEYS), sort=False):
        ref = group.loc[group["optimizer"] == REFERENCE_OPTIMIZER, "val_loss_mean"]
        ref = ref[np.isfinite(ref.to_numpy(float))]
        finite = group["val_loss_mean"][np.isfinite(group["val_loss_mean"].to_numpy(float))]
        if key[0] in targets:
            target, rule = float(targets[key[0]]), "set explicitly"
        elif len(ref):
            target = float(ref.iloc[0]) * factor
            rule = f"best {ref_label} final val loss × {factor:g}"
        elif len(finite):
            target = float(finite.max()) * factor
            rule = f"worst best-LR final val loss × {factor:g} (no eligible {ref_label} LR)"
        else:
            target, rule = math.nan, "no optimizer has an eligible learning rate"
        rows.append([*key, target, rule])
    return pd.DataFrame(rows, columns=[*EXP_KEYS, "target", "target_rule"])


def steps_to_target(metrics: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Per run: the step of its first validation row with loss ≤ its experiment's target.

    Columns: run, steps_to_target. Runs that never reach the target are absent.
    """
    return first_reached(metrics.merge(targets[[*EXP_KEYS, "target"]], on=list(EXP_KEYS)))


def first_reached(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run of ``metrics`` (rows with a ``target`` column): the step of its first full
    validation row whose loss is ≤ the target; subset evaluations do not count.

    Columns: run, steps_to_target. Runs that never reach the target are absent.
    """
    val = metrics[metrics["split"] == "val"]
    hit = val[val["loss"] <= val["target"]].sort_values(["run", "step"], kind="stable")
    first = hit.groupby("run", sort=False).head(1)
    return first[["run", "step"]].rename(columns={"step": "steps_to_target"}).reset_index(drop=True)


def cell_runs(runs: pd.DataFrame, row: Mapping[str, Any]) -> pd.DataFrame:
    """The runs of ``row``'s cell that enter its statistics, ordered by seed."""
    mask = counts(runs)
    for key in CELL_KEYS:
        mask &= (runs[key] == row[key]).to_numpy()
    return runs[mask].sort_values("seed")


def seed_curve(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean/std over seeds per step of metrics rows of one split (several seeds of one cell).

    Returns columns step, loss_mean, loss_std (NaN for one seed), n_seeds; only steps
    present in every seed, so a curve never mixes different seed sets.
    """
    loss = rows.pivot_table(index="step", columns="seed", values="loss", aggfunc="last")
    loss = loss[loss.notna().all(axis=1)]
    std = loss.std(axis=1, ddof=1) if loss.shape[1] > 1 else pd.Series(np.nan, index=loss.index)
    return pd.DataFrame(
        {
            "step": loss.index.to_numpy(float),
            "loss_mean": loss.mean(axis=1).to_numpy(float),
            "loss_std": std.to_numpy(float),
            "n_seeds": loss.shape[1],
        }
    )


def cell_curve(
    runs: pd.DataFrame, metrics: pd.DataFrame, row: Mapping[str, Any], split: str
) -> pd.DataFrame:
    """The seed curve (:func:`seed_curve`) of the counted runs of ``row``'s cell."""
    ids = cell_runs(runs, row)["run"]
    return seed_curve(metrics[metrics["run"].isin(ids) & (metrics["split"] == split)])


def select_experiment(frame: pd.DataFrame, exp: Mapping[str, Any]) -> pd.DataFrame:
    """Rows of ``frame`` that belong to experiment ``exp`` (a mapping with the EXP_KEYS)."""
    mask = np.ones(len(frame), dtype=bool)
    for key in EXP_KEYS:
        mask &= (frame[key] == exp[key]).to_numpy()
    return frame[mask]


STEP_COST_COLUMNS = (
    "experiment",
    "optimizer",
    "ms_per_step",
    "ms_per_step_q1",
    "ms_per_step_q3",
    "overhead_pct",
    "n_repeats",
    "measured_on",
)


def step_costs(root: str | Path, experiments: list[str]) -> pd.DataFrame:
    """Per (experiment, optimizer label) from step_cost.json: median ms per step, quartiles,
    and overhead vs the reference optimizer (median of per-repeat ratios − 1, in %)."""
    rows = []
    for name in experiments:
        data = stepcost.read(root, name)
        if data is None:
            continue
        ms = {k: np.asarray(v["ms_per_step"], dtype=float) for k, v in data["optimizers"].items()}
        ref = ms.get(REFERENCE_OPTIMIZER)
        for label, values in ms.items():
            over = math.nan if ref is None else 100 * (float(np.median(values / ref)) - 1)
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            rows.append([name, label, median, q1, q3, over, len(values), stepcost.describe(data)])
    frame = pd.DataFrame(rows, columns=list(STEP_COST_COLUMNS))
    numbers = ("ms_per_step", "ms_per_step_q1", "ms_per_step_q3", "overhead_pct")
    return frame.astype({c: float for c in numbers})


def add_cost(
    best: pd.DataFrame, runs: pd.DataFrame, targets: pd.DataFrame, costs: pd.DataFrame
) -> pd.DataFrame:
    """Best-LR rows plus steps to target (mean ± std over the seeds that reached it),
    curvature passes per step, and — where step_cost.json exists — the side-by-side step cost
    and time to target = steps to target × that cost."""
    best = best.merge(targets, on=list(EXP_KEYS), how="left")
    extra = []
    for row in best.to_dict("records"):
        cell = cell_runs(runs, row) if math.isfinite(row["lr"]) else runs.iloc[:0]
        reached = cell["steps_to_target"].to_numpy(float)
        reached = reached[np.isfinite(reached)]
        mine = runs[counts(runs) & (runs["optimizer"] == row["optimizer"]).to_numpy()]
        mine = select_experiment(mine, row)
        mine = mine[mine["steps"] > 0]
        passes = float((mine["curvature_passes"] / mine["steps"]).mean()) if len(mine) else math.nan
        extra.append([*mean_std(reached), len(reached), passes])
    cols = ["steps_to_target_mean", "steps_to_target_std", "n_reached", "curvature_passes_per_step"]
    best = pd.concat([best.reset_index(drop=True), pd.DataFrame(extra, columns=cols)], axis=1)
    best = best.merge(costs, on=["experiment", "optimizer"], how="left")
    seconds = best["ms_per_step"] / 1000
    return best.assign(
        time_to_target_mean=best["steps_to_target_mean"] * seconds,
        time_to_target_std=best["steps_to_target_std"] * seconds,
    )


def commits(runs: pd.DataFrame) -> pd.DataFrame:
    """The commits the runs were made at (env.json): git_commit, n_runs, n_dirty, n_unknown."""
    rows = []
    for commit, group in runs.groupby("git_commit", sort=True):
        dirty = group["git_dirty"]
        rows.append(
            [commit, len(group), int((dirty == True).sum()), int(dirty.isna().sum())]  # noqa: E712
        )
    return pd.DataFrame(rows, columns=["git_commit", "n_runs", "n_dirty", "n_unknown"])
