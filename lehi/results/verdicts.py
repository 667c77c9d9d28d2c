"""Verdicts with power, the tuning budget and performance profiles: the statistics
(:mod:`lehi.results.verdict_report` writes them to results/verdicts.*).

Tuning and measuring are separate here. A workload's tuning sweep (``<exp>``, seeds 0, 1 or
0–2) chose each reading's LR; its confirmation runs (``confirm_<exp>``, lehi.results.confirm)
repeat that LR on fresh seeds, and only they are judged:

- **Verdict table**: per workload, each candidate (LEHI, LEHIBrid, ``lehi_update_clip``, and
  the reading its ablation nominated, ``confirm_ablation_<exp>``) against each baseline (Adam,
  AdamW, Sophia) on the final validation loss (mean of the last
  3 evaluations): the mean difference (candidate − baseline) with a 95 % bootstrap CI
  (``scipy.stats.bootstrap``, BCa, 9,999 resamples, fixed seed); the probability of
  improvement P(candidate < baseline) = U / (n·m) (``scipy.stats.mannwhitneyu``); Welch and
  Mann–Whitney p-values, each Holm-corrected over every comparison of the table
  (``statsmodels.stats.multitest.multipletests(method="holm")``); the smallest difference
  the seeds could detect, 80 % power at α = 0.05 two-sided from the observed spread
  (``statsmodels.stats.power.TTestIndPower``, effect size × pooled std); and one word: a
  Holm-corrected Mann–Whitney p < 0.05 makes it *better* or *worse* by which side
  P(improvement) falls, otherwise *no detectable difference*. The rank test decides because
  it is the one that sees divergence: a run that diverged enters it as worse than every finite
  loss, while Welch's test and the means can only leave it out (its count is shown); Welch's
  p is reported beside it.
- **Expected best loss against the tuning budget** (Dodge et al. 2019): the expected best
  final validation loss after k LR trials drawn without replacement from the tuning grid,
  with the unbiased estimator Σ_i v_(i)·C(N−i, k−1)/C(N, k) over the N per-LR losses sorted
  ascending; an LR where a seed diverged scores that seed's initial validation loss (a failed
  trial leaves you where you began). The point estimate uses the mean over tuning seeds per
  LR; the 95 % band resamples one tuning seed per LR (bootstrap, 2,000 draws, seeded per
  workload and reading, so adding a workload or reading moves no other band).
- **Performance profiles** (AlgoPerf): per workload the time to target of each reading's
  confirmation runs (median over seeds; a run that never reaches it counts as infinite) =
  steps to target × its optimizer's per-step cost measured side by side (step_cost.json);
  target = :data:`TARGET_FACTOR` × the confirmed Adam median final loss. Only the readings
  every workload confirms (:data:`~lehi.results.confirm.CONFIRM_READINGS`) are profiled: a
  reading confirmed on one workload would count as failing on the others. The profile of a
  reading is the fraction of workloads where its time is within τ × the best reading's; the
  score is the area under it over τ ∈ [1, :data:`R_MAX`] divided by R_MAX − 1 (1 = best
  everywhere). A steps-only profile is drawn beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from lehi import roster
from lehi.results.confirm import (
    CONFIRM_READINGS,
    confirmation_experiments,
    confirmed_workload,
    optimizer_name,
    tuning_experiment,
)
from lehi.results.significance import pooled_std
from lehi.results.stats import TARGET_FACTOR, first_reached
from lehi.results.tables import Results

__all__ = [
    "R_MAX",
    "TARGET_FACTOR",
    "expected_best",
    "holm",
    "profile_area",
    "tuning_budget",
    "verdict_table",
]

ALPHA = 0.05
POWER = 0.8
R_MAX = 4.0
#: The confirmed baselines in the roster's roles; every other confirmed reading is a
#: candidate (a LEHI reading is one as LEHI is).
BASELINES = tuple(r for r in CONFIRM_READINGS if roster.role(optimizer_name(r)) == "baseline")
BOOTSTRAP_SEED = 0


# --------------------------------------------------------------------------- statistics
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-corrected p-values (statsmodels; NaN stays NaN and is not counted)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = multipletests(p[finite], alpha=ALPHA, method="holm")[1]
    return out


def detectable_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest |mean difference| a two-sided Welch-type test of these sample sizes
    detects with 80 % power at α = 0.05, from their pooled standard deviation."""
    from statsmodels.stats.power import TTestIndPower

    if len(a) < 2 or len(b) < 2:
        return math.nan
    pooled = pooled_std(a, b)
    effect = TTestIndPower().solve_power(
        nobs1=len(a), ratio=len(b) / len(a), alpha=ALPHA, power=POWER, alternative="two-sided"
    )
    return float(effect * pooled)


def _bootstrap_ci(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return math.nan, math.nan
    result = scipy_stats.bootstrap(
        (a, b),
        lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        n_resamples=9999,
        confidence_level=0.95,
        method="BCa",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(candidate: np.ndarray, baseline: np.ndarray) -> dict[str, Any]:
    """One verdict row's statistics; inf in either sample marks a diverged run."""
    fin_c, fin_b = candidate[np.isfinite(candidate)], baseline[np.isfinite(baseline)]
    low, high = _bootstrap_ci(fin_c, fin_b)
    both = len(candidate) and len(baseline)
    mwu = scipy_stats.mannwhitneyu(baseline, candidate, alternative="two-sided") if both else None
    welch = (
        scipy_stats.ttest_ind(fin_c, fin_b, equal_var=False)
        if len(fin_c) > 1 and len(fin_b) > 1
        else None
    )
    return {
        "n": len(candidate),
        "n_baseline": len(baseline),
        "n_diverged": int((~np.isfinite(candidate)).sum()),
        "n_diverged_baseline": int((~np.isfinite(baseline)).sum()),
        "candidate_mean": float(fin_c.mean()) if len(fin_c) else math.nan,
        "baseline_mean": float(fin_b.mean()) if len(fin_b) else math.nan,
        "mean_diff": float(fin_c.mean() - fin_b.mean()) if len(fin_c) and len(fin_b) else math.nan,
        "ci_low": low,
        "ci_high": high,
        # U of the baseline sample counts the pairs where the baseline's loss is higher.
        "p_improvement": float(mwu.statistic) / (len(candidate) * len(baseline))
        if mwu
        else math.nan,
        "welch_p": float(welch.pvalue) if welch is not None else math.nan,
        "mwu_p": float(mwu.pvalue) if mwu else math.nan,
        "detectable": detectable_difference(fin_c, fin_b),
    }


def confirmed_runs(runs: pd.DataFrame, workload: str) -> pd.DataFrame:
    """The runs of ``workload``'s confirmation experiments (its own and its ablation's)."""
    return runs[runs["experiment"].isin(confirmation_experiments(workload))]


def _losses(runs: pd.DataFrame, workload: str, label: str) -> np.ndarray:
    rows = confirmed_runs(runs, workload)
    rows = rows[(rows["optimizer"] == label) & (rows["status"] != "failed")]
    loss = rows["val_loss"].to_numpy(float)
    return np.where(rows["diverged"].to_numpy(bool) | ~np.isfinite(loss), np.inf, loss)


def workloads(results: Results) -> list[str]:
    """Workloads with confirmation runs, in name order."""
    names = set(results.runs["experiment"]) if not results.runs.empty else set()
    return sorted({w for w in map(confirmed_workload, names) if w is not None})


def workload_readings(runs: pd.DataFrame, workload: str) -> list[str]:
    """The readings confirmed on ``workload``: :data:`CONFIRM_READINGS`, then any reading its
    ablation's confirmation nominated (``confirm_ablation_<workload>``)."""
    present = set(confirmed_runs(runs, workload)["optimizer"])
    return [*CONFIRM_READINGS, *sorted(present - set(CONFIRM_READINGS))]


def verdict_table(results: Results) -> pd.DataFrame:
    """One row per (workload, candidate, baseline) on the confirmation seeds."""
    rows = []
    for workload in workloads(results):
        readings = workload_readings(results.runs, workload)
        for cand in (r for r in readings if r not in BASELINES):
            c = _losses(results.runs, workload, cand)
            if not len(c):
                continue
            for base in BASELINES:
                b = _losses(results.runs, workload, base)
                if len(b):
                    rows.append(
                        {"workload": workload, "candidate": cand, "baseline": base, **compare(c, b)}
                    )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["welch_p_holm"] = holm(table["welch_p"])
    table["mwu_p_holm"] = holm(table["mwu_p"])
    table["verdict"] = [
        _word(p, q) for p, q in zip(table["mwu_p_holm"], table["p_improvement"], strict=True)
    ]
    return table


def _word(p_holm: float, p_improvement: float) -> str:
    if math.isfinite(p_holm) and p_holm < ALPHA and p_improvement != 0.5:
        return "better" if p_improvement > 0.5 else "worse"
    return "no detectable difference"


# ------------------------------------------------------------------------ tuning budget
def expected_best(values: Sequence[float], k: int) -> float:
    """E[min of k values drawn without replacement from ``values``] (unbiased, exact)."""
    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of values ({n})")
    weights = np.array([math.comb(n - i, k - 1) for i in range(1, n + 1)], dtype=float)
    return float(np.dot(v, weights) / math.comb(n, k))


def _trial_losses(runs: pd.DataFrame, experiment: str, label: str) -> pd.DataFrame:
    """Per run of a tuning sweep: its LR and the loss it yields (initial loss if diverged)."""
    rows = runs[(runs["experiment"] == experiment) & (runs["optimizer"] == label)]
    rows = rows[rows["status"] != "failed"]
    bad = rows["diverged"].to_numpy(bool) | ~np.isfinite(rows["val_loss"].to_numpy(float))
    loss = np.where(bad, rows["initial_val_loss"].to_numpy(float), rows["val_loss"].to_numpy(float))
    return pd.DataFrame({"lr": rows["lr"].to_numpy(float), "loss": loss})


def tuning_budget(results: Results, draws: int = 2000) -> pd.DataFrame:
    """Expected best final loss after k LR trials, per tuning workload and reading.

    Columns: workload, reading, k, expected_best, low, high (95 % bootstrap band).
    """
    rows = []
    for workload in workloads(results):
        for reading in workload_readings(results.runs, workload):
            rng = np.random.default_rng([BOOTSTRAP_SEED, *f"{workload}/{reading}".encode()])
            source = tuning_experiment(workload, reading)
            trials = _trial_losses(results.runs, source, reading)
            if trials.empty:
                continue
            by_lr = [g["loss"].to_numpy(float) for _, g in trials.groupby("lr", sort=True)]
            means = [float(x.mean()) for x in by_lr]
            n = len(by_lr)
            samples = np.array([[x[rng.integers(len(x))] for x in by_lr] for _ in range(draws)])
            for k in range(1, n + 1):
                boot = [expected_best(s, k) for s in samples]
                rows.append(
                    {
                        "workload": workload,
                        "reading": reading,
                        "tuning_experiment": source,
                        "k": k,
                        "n_lrs": n,
                        "expected_best": expected_best(means, k),
                        "low": float(np.percentile(boot, 2.5)),
                        "high": float(np.percentile(boot, 97.5)),
                    }
                )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ performance profiles
def profile_area(ratios: Sequence[float], r_max: float = R_MAX) -> float:
    """Area under a performance profile over τ ∈ [1, r_max], divided by r_max − 1.

    ``ratios``: one optimizer's time / the best optimizer's time per workload (inf: failed).
    ρ(τ) = fraction of workloads with ratio ≤ τ; exact for a step function.
    """
    r = np.asarray(ratios, dtype=float)
    if not len(r):
        return math.nan
    clipped = np.clip(r, 1.0, r_max)  # ratios ≥ r_max (and failures) add nothing
    return float(np.mean((r_max - clipped) / (r_max - 1.0)))


def time_to_target(results: Results) -> pd.DataFrame:
    """Per workload and reading: median steps and seconds to the confirmed target."""
    runs, metrics = results.runs, results.metrics
    rows = []
    for workload in workloads(results):
        adam = _losses(runs, workload, roster.REFERENCE)
        if not len(adam) or not np.isfinite(np.median(adam)):
            continue
        target = TARGET_FACTOR * float(np.median(adam))
        cost = _step_seconds(results, workload)
        confirmed = confirmed_runs(runs, workload)
        reached = first_reached(
            metrics[metrics["run"].isin(confirmed["run"])].assign(target=target)
        )
        at = dict(zip(reached["run"], reached["steps_to_target"], strict=True))
        for reading in CONFIRM_READINGS:
            mine = confirmed[confirmed["optimizer"] == reading]
            if mine.empty:
                continue
            steps = [
                math.inf if diverged else float(at.get(run, math.inf))
                for run, diverged in zip(mine["run"], mine["diverged"], strict=True)
            ]
            median_steps = float(np.median(steps))
            name = str(mine["optimizer_name"].iloc[0])
            seconds = median_steps * cost.get(name, math.nan)
            rows.append(
                {
                    "workload": workload,
                    "reading": reading,
                    "target": target,
                    "n_seeds": len(steps),
                    "n_reached": int(np.isfinite(steps).sum()),
                    "steps_to_target": median_steps,
                    "seconds_to_target": seconds,
                }
            )
    return pd.DataFrame(rows)


def _step_seconds(results: Results, workload: str) -> dict[str, float]:
    """Median seconds per step of each optimizer name, measured side by side (step_cost)."""
    cost = results.step_cost
    rows = cost[cost["experiment"] == workload]
    return {str(r["optimizer"]): float(r["ms_per_step"]) / 1000 for r in rows.to_dict("records")}


def profiles(times: pd.DataFrame) -> pd.DataFrame:
    """Per reading: its ratio to the best per workload (time and steps) and the scores."""
    rows = []
    for column in ("seconds_to_target", "steps_to_target"):
        table = times.pivot(index="workload", columns="reading", values=column)
        best = table.min(axis=1)
        ratios = table.div(best, axis=0).where(np.isfinite(table), np.inf)
        for reading in ratios.columns:
            r = ratios[reading].to_numpy(float)
            rows.append(
                {
                    "measure": "time" if column.startswith("seconds") else "steps",
                    "reading": reading,
                    "score": profile_area(r),
                    "ratios": dict(zip(ratios.index, r, strict=True)),
                }
            )
    return pd.DataFrame(rows)
