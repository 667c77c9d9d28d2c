"""Markdown (and CSV) renderings of the tables: results/summary.md and the step-cost table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lehi import roster
from lehi.io import atomic_write_text
from lehi.results import stats, stepcost
from lehi.results.ablation import write_ablation
from lehi.results.markdown import experiment_heading, fmt, label_of, pm, scale_label, table
from lehi.results.stats import select_experiment
from lehi.results.tables import Results, collect
from lehi.results.verdict_report import write_verdicts

METRIC_LABELS = {"accuracy": "accuracy", "rmse": "RMSE (Å)", "perplexity": "perplexity"}
NO_RESULTS_HINT = "run `make sweep EXP=digits` first (any experiment works), then `make figures`"
STEP_COST_HINT = "python benchmarks/step_cost.py --experiment {experiment}"
NO_STEP_COST = (
    "no per-step cost measured side by side for this experiment (`{hint}` writes it): "
    "steps only, since sweep runs shared the cores and their wall times measure load"
)


def no_step_cost(experiment: str) -> str:
    """The note shown instead of times when an experiment has no step_cost.json."""
    return NO_STEP_COST.format(hint=STEP_COST_HINT.format(experiment=experiment))


def _intro(results: Results) -> list[str]:
    return [
        "# Results summary",
        "",
        f"{len(results.runs)} finished run(s) under `{Path(results.root).name}/`. Final validation loss = "
        "mean over a run's last 3 evaluations; mean ± sample std over seeds at each "
        "optimizer's best learning rate (lowest mean among LRs where no seed diverged); last "
        "eval = the validation loss of its last evaluation. Metric = last evaluation. Steps to "
        "target = first evaluation with validation loss ≤ target, mean ± std over the seeds "
        "that reached it (reached/seeds). Time to target = steps to target × per-step cost "
        "measured side by side (step_cost.json); without it, steps only, because sweep runs "
        "shared the cores and their wall times measure load. Diverged = runs that diverged "
        "(non-finite loss, loss held above the divergence factor, last validation loss "
        "above the initial one, or a spike above the factor after which it never trained) "
        "over the optimizer's whole LR grid.",
        "",
        _provenance_line(results),
        "",
    ]


def _provenance_line(results: Results) -> str:
    parts = []
    for c in results.commits.to_dict("records"):
        name = f"`{c['git_commit'][:7]}`" if c["git_commit"] else "unknown commit"
        notes = [f"{c['n_runs']} run{'s' if c['n_runs'] != 1 else ''}"]
        if c["n_dirty"]:
            notes.append(f"{c['n_dirty']} from a dirty tree")
        if c["n_unknown"]:
            notes.append(f"{c['n_unknown']} without a dirty flag")
        parts.append(f"{name} ({', '.join(notes)})")
    return (
        f"Made at commit(s): {'; '.join(parts)}. `python -m lehi.results check` lists the "
        "runs that are not current at HEAD (training code changed and no passing `make "
        "verify`)."
    )


def _best_row(r: Mapping[str, Any], with_time: bool) -> list[str]:
    reached = f" ({r['n_reached']}/{r['n_seeds']})" if r["n_seeds"] else ""
    diverged = f"{r['n_diverged_total']}/{r['n_runs_total']}"
    if r["n_failed_total"]:
        diverged += f" ({r['n_failed_total']} failed)"
    seeds = str(r["n_seeds"])
    if r["n_unstable"]:
        seeds += f" ({r['n_unstable']} unstable, recovered)"
    row = [
        label_of(r),
        fmt(r["lr"], "g"),
        pm(r["val_loss_mean"], r["val_loss_std"]),
        pm(r["last_val_loss_mean"], r["last_val_loss_std"]),
        pm(r["metric_mean"], r["metric_std"]),
        seeds,
        pm(r["steps_to_target_mean"], r["steps_to_target_std"], ".4g") + reached,
    ]
    if with_time:
        row.append(pm(r["time_to_target_mean"], r["time_to_target_std"], ".3g") + reached)
    lrs = f"{r['n_trained_lrs']} / {r['n_stable_lrs']} / {r['n_lrs']}"
    return [*row, lrs, diverged]


def _best_table(results: Results, exp: Mapping[str, str]) -> list[str]:
    best = select_experiment(results.best, exp)
    metric = METRIC_LABELS.get(exp["metric_name"], exp["metric_name"] or "metric")
    where = results.measured_on(exp["experiment"])
    header = [
        "optimizer",
        "best lr",
        "final val loss (mean ± std)",
        "last eval val loss (mean ± std)",
        f"val {metric} (mean ± std)",
        "seeds",
        "steps to target",
    ]
    if where:
        header.append(f"time to target (s; steps × step cost measured side by side, {where})")
    header += ["LRs trained / without divergence / all", "diverged / runs"]
    lines = table(header, [_best_row(r, bool(where)) for r in best.to_dict("records")])
    if not where:
        lines += ["", f"Time to target: {no_step_cost(exp['experiment'])}."]
    return lines


def _significance_table(results: Results, exp: Mapping[str, str]) -> list[str]:
    sig = select_experiment(results.significance, exp)
    if sig.empty:
        return []
    names = dict(zip(results.best["optimizer"], results.best["optimizer_name"], strict=True))
    show = lambda label: roster.display_label(label, names.get(label))  # noqa: E731
    rows = [
        [
            f"{show(s['optimizer'])} vs {show(s['baseline'])}",
            f"{fmt(s['lr'], 'g')} / {fmt(s['baseline_lr'], 'g')}",
            f"{s['n']} / {s['n_baseline']}",
            fmt(s["mean_diff"], ".3g"),
            fmt(s["hedges_g"], ".3g"),
            fmt(s["cohen_d"], ".3g"),
            fmt(s["welch_p"], ".3g"),
            fmt(s["mwu_p"], ".3g"),
        ]
        for s in sig.to_dict("records")
    ]
    header = [
        "comparison",
        "lr (variant / baseline)",
        "seeds",
        "mean diff (val loss)",
        "Hedges g",
        "Cohen d",
        "Welch t-test p",
        "Mann–Whitney U p",
    ]
    return [
        "",
        f"Significance ({exp['experiment']}, scale: {scale_label(exp['scale'])})"
        ": candidates vs baselines (lehi/roster.py), per-seed final val losses at each "
        "optimizer's best LR; mean diff < 0 "
        "means the candidate is lower; p-values two-sided; — where a side has "
        "fewer than 2 seeds.",
        "",
        *table(header, rows),
    ]


def render_markdown(results: Results) -> str:
    """The Markdown summary: one table per experiment, then its significance table."""
    lines = _intro(results)
    for exp in results.experiments():
        target = select_experiment(results.targets, exp).iloc[0]
        lines += [
            f"## {experiment_heading(**exp)}",
            "",
            f"Target validation loss: {fmt(target['target'])} ({target['target_rule']}).",
            "",
            *_best_table(results, exp),
            *_significance_table(results, exp),
            "",
        ]
    return "\n".join(lines)


def render_cost_markdown(results: Results) -> str:
    """The step-cost tables (one per experiment), from the best-LR rows."""
    lines = [
        "# Step cost",
        "",
        "Cost per step measured side by side (benchmarks/step_cost.py: "
        f"{stepcost.METHOD}); overhead = relative to Adam, median of per-repeat ratios. "
        "Steps to target at each optimizer's best LR from the runs; time to target = steps × "
        "that cost. Sweep wall times are not used: runs shared the cores.",
        "",
    ]
    for exp in results.experiments():
        rows = select_experiment(results.best, exp).to_dict("records")
        lines += [f"## {experiment_heading(**exp)}", ""]
        if not results.measured_on(exp["experiment"]):
            lines.append(f"{no_step_cost(exp['experiment'])}.")
            lines.append("")
        lines += table(
            [
                "optimizer",
                "best lr",
                "steps to target",
                "curvature passes per step",
                "ms per step (median [q1, q3])",
                "overhead vs Adam",
                "time to target (s)",
            ],
            [_cost_row(r) for r in rows],
        )
        lines.append("")
    return "\n".join(lines)


def _cost_row(r: Mapping[str, Any]) -> list[str]:
    ms = "—"
    if math.isfinite(r["ms_per_step"]):
        ms = f"{r['ms_per_step']:.3g} [{r['ms_per_step_q1']:.3g}, {r['ms_per_step_q3']:.3g}]"
    over = f"{r['overhead_pct']:+.1f} %" if math.isfinite(r["overhead_pct"]) else "—"
    reached = f" ({r['n_reached']}/{r['n_seeds']})" if r["n_seeds"] else ""
    return [
        label_of(r),
        fmt(r["lr"], "g"),
        pm(r["steps_to_target_mean"], r["steps_to_target_std"]) + reached,
        fmt(r["curvature_passes_per_step"], ".3g"),
        ms,
        over,
        pm(r["time_to_target_mean"], r["time_to_target_std"], ".3g"),
    ]


def write_summary(
    root: str | Path = "results",
    results: Results | None = None,
    *,
    targets: Mapping[str, float] | None = None,
    target_factor: float = stats.TARGET_FACTOR,
) -> list[Path]:
    """Write ``<root>/summary.csv`` (best-LR rows), ``<root>/significance.csv`` and
    ``<root>/summary.md``, each atomically, and with ablation experiments
    ``<root>/ablation.{csv,md}`` (:mod:`lehi.results.ablation`), with confirmation runs
    ``<root>/verdicts.{csv,md}`` (:mod:`lehi.results.verdict_report`); returns their paths.

    Pass ``results`` (from :func:`collect`) to reuse tables already computed. Raises
    FileNotFoundError when there is no finished run under ``root``.
    """
    root = Path(root)
    if results is None:
        results = collect(root, targets, target_factor)
    if results.empty:
        raise FileNotFoundError(f"no results under {root}: {NO_RESULTS_HINT}")
    paths = [root / "summary.csv", root / "significance.csv", root / "summary.md"]
    atomic_write_text(paths[0], results.best.to_csv(index=False))
    atomic_write_text(paths[1], results.significance.to_csv(index=False))
    atomic_write_text(paths[2], render_markdown(results))
    return paths + write_ablation(root, results) + write_verdicts(root, results)
