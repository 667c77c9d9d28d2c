"""results/verdicts.{csv,md}: the verdict table, the tuning budget at k = 1 and 3 and the
profile scores of :mod:`lehi.results.verdicts`, rendered."""

from __future__ import annotations

import math
from pathlib import Path

from lehi import roster
from lehi.io import atomic_write_text
from lehi.results.confirm import optimizer_name
from lehi.results.markdown import fmt
from lehi.results.markdown import table as markdown_table
from lehi.results.tables import Results
from lehi.results.verdicts import (
    R_MAX,
    TARGET_FACTOR,
    profiles,
    time_to_target,
    tuning_budget,
    verdict_table,
)

__all__ = ["render_markdown", "write_verdicts"]


def render_markdown(results: Results) -> str:
    """results/verdicts.md: the verdict table, the tuning budget at k = 1 and 3, profiles."""
    verdicts = verdict_table(results)
    lines = [
        "# Verdicts on confirmation seeds",
        "",
        "Each reading ran at the LR its tuning seeds chose (experiments/confirm_*.yaml), on "
        "fresh seeds that chose nothing; a reading an ablation nominated "
        "(experiments/confirm_ablation_*.yaml: its best other LEHI reading, where its tuning "
        "seeds put it below Adam) ran on the workload's seeds. Final val loss = mean of the last 3 evaluations. Δ = "
        "candidate − baseline (negative: the candidate is lower), 95 % BCa bootstrap CI; "
        "P(better) = P(candidate's loss < baseline's) = U/(n·m); p-values Holm-corrected over "
        "all rows of this table (statsmodels); detectable = smallest |Δ| these seeds detect "
        "with 80 % power at α = 0.05. Verdict from the Holm-corrected Mann–Whitney p, the test "
        "that counts a diverged confirmation run as worse than every finite loss (the means and "
        "Welch's test leave such runs out).",
        "",
    ]
    header = [
        "workload",
        "candidate",
        "baseline",
        "n (diverged)",
        "candidate mean",
        "baseline mean",
        "Δ [95 % CI]",
        "P(better)",
        "Welch p (Holm)",
        "MW p (Holm)",
        "detectable |Δ|",
        "verdict",
    ]
    body = []
    for r in verdicts.to_dict("records"):
        body.append(
            [
                r["workload"],
                roster.display_label(r["candidate"], optimizer_name(r["candidate"])),
                roster.display_label(r["baseline"], r["baseline"]),
                f"{r['n']} ({r['n_diverged']}) vs {r['n_baseline']} ({r['n_diverged_baseline']})",
                fmt(r["candidate_mean"], ".4g"),
                fmt(r["baseline_mean"], ".4g"),
                f"{fmt(r['mean_diff'], '+.3g')} [{fmt(r['ci_low'], '+.3g')}, "
                f"{fmt(r['ci_high'], '+.3g')}]",
                fmt(r["p_improvement"], ".2f"),
                fmt(r["welch_p_holm"], ".2g"),
                fmt(r["mwu_p_holm"], ".2g"),
                fmt(r["detectable"], ".2g"),
                r["verdict"],
            ]
        )
    lines += markdown_table(header, body) if body else ["No confirmation runs yet."]
    budget = tuning_budget(results)
    if not budget.empty:
        lines += [
            "",
            "## Expected best final val loss after k LR trials (tuning seeds)",
            "",
            "Unbiased without-replacement estimator over the tuning grid (Dodge et al. 2019); "
            "a diverged trial scores its initial val loss; [95 % band: one tuning seed "
            "resampled per LR].",
            "",
        ]
        rows = []
        for (workload, reading), g in budget.groupby(["workload", "reading"], sort=False):
            at = g.set_index("k")
            cells = [
                f"{fmt(at.loc[k, 'expected_best'], '.4g')} [{fmt(at.loc[k, 'low'], '.3g')}, "
                f"{fmt(at.loc[k, 'high'], '.3g')}]"
                if k in at.index
                else "—"
                for k in (1, 3)
            ]
            rows.append([workload, reading, str(int(g["n_lrs"].iloc[0])), *cells])
        lines += markdown_table(["workload", "reading", "LRs", "k = 1", "k = 3"], rows)
    times = time_to_target(results)
    if not times.empty:
        scores = profiles(times)
        lines += [
            "",
            "## Performance profiles over the confirmed workloads",
            "",
            f"Target = {TARGET_FACTOR} × the confirmed Adam median final val loss; time = median "
            "steps to target over confirmation seeds × the optimizer's per-step cost measured "
            "side by side (step_cost.json; lehi_update_clip uses LEHI's: the same passes plus "
            "a clamp); a reading whose median run never reaches the target is infinite. Score "
            f"= area under the profile over τ ∈ [1, {R_MAX:g}] / {R_MAX - 1:g}.",
            "",
        ]
        score_rows = []
        for reading, g in scores.groupby("reading", sort=False):
            by = g.set_index("measure")["score"]
            score_rows.append(
                [
                    reading,
                    fmt(by.get("time", math.nan), ".2f"),
                    fmt(by.get("steps", math.nan), ".2f"),
                ]
            )
        lines += markdown_table(["reading", "score (time)", "score (steps)"], score_rows)
    return "\n".join(lines) + "\n"


def write_verdicts(root: str | Path, results: Results) -> list[Path]:
    """results/verdicts.{csv,md} when confirmation runs exist; the paths written."""
    table = verdict_table(results)
    if table.empty:
        return []
    root = Path(root)
    csv_path, md_path = root / "verdicts.csv", root / "verdicts.md"
    atomic_write_text(csv_path, table.to_csv(index=False))
    atomic_write_text(md_path, render_markdown(results))
    return [csv_path, md_path]
