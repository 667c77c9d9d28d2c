"""Significance of each candidate against each baseline, both at their best learning rates.

Roles come from the roster (:mod:`lehi.roster`) through each run's ``optimizer.name``, so a
relabelled run is compared under its label like any other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from lehi import roster
from lehi.results.stats import cell_runs
from lehi.results.store import EXP_KEYS

SIGNIFICANCE_COLUMNS = (
    *EXP_KEYS,
    "optimizer",
    "baseline",
    "lr",
    "baseline_lr",
    "n",
    "n_baseline",
    "mean_diff",
    "cohen_d",
    "hedges_g",
    "welch_t",
    "welch_p",
    "mwu_u",
    "mwu_p",
)


def pooled_std(a: np.ndarray, b: np.ndarray) -> float:
    """The pooled sample standard deviation of two samples of ≥ 2 values each (ddof 1 each)."""
    dof = len(a) + len(b) - 2
    return math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / dof)


def compare(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Welch t, Mann-Whitney U (two-sided) and effect sizes of samples ``x`` vs ``y``.

    Returns n, n_baseline, mean_diff (mean x − mean y), cohen_d (pooled sd), hedges_g,
    welch_t, welch_p, mwu_u, mwu_p; everything but the counts (and mean_diff when both
    samples are non-empty) is NaN when either sample has fewer than 2 values.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = dict.fromkeys(SIGNIFICANCE_COLUMNS[9:], math.nan)
    out = {"n": len(a), "n_baseline": len(b), **out}
    if len(a) and len(b):
        out["mean_diff"] = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return out
    dof = len(a) + len(b) - 2
    pooled = pooled_std(a, b)
    if pooled > 0:
        out["cohen_d"] = out["mean_diff"] / pooled
        out["hedges_g"] = out["cohen_d"] * (1 - 3 / (4 * dof - 1))
    with warnings.catch_warnings():
        # Identical samples give NaN statistics with a warning; NaN is the answer we report.
        warnings.simplefilter("ignore")
        welch = scipy_stats.ttest_ind(a, b, equal_var=False)
        mwu = scipy_stats.mannwhitneyu(a, b, alternative="two-sided")
    out.update(
        welch_t=float(welch.statistic),
        welch_p=float(welch.pvalue),
        mwu_u=float(mwu.statistic),
        mwu_p=float(mwu.pvalue),
    )
    return out


def significance(runs: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """Each candidate vs each baseline (roster roles), both at their best LR, per experiment.

    Rows follow ``best``'s order (:func:`lehi.results.stats.best_lrs`: by experiment, then
    roster order), candidates outer, baselines inner.
    """
    rows = []
    for key, group in best.groupby(list(EXP_KEYS), sort=False):
        usable = [r for r in group.to_dict("records") if math.isfinite(r["lr"])]
        cands = [r for r in usable if roster.role(r["optimizer_name"]) == "candidate"]
        bases = [r for r in usable if roster.role(r["optimizer_name"]) == "baseline"]
        for c in cands:
            for b in bases:
                result = compare(
                    list(cell_runs(runs, c)["val_loss"]), list(cell_runs(runs, b)["val_loss"])
                )
                rows.append(
                    [
                        *key,
                        c["optimizer"],
                        b["optimizer"],
                        c["lr"],
                        b["lr"],
                        *(result[k] for k in SIGNIFICANCE_COLUMNS[7:]),
                    ]
                )
    return pd.DataFrame(rows, columns=list(SIGNIFICANCE_COLUMNS))
