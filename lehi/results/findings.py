"""The numbers README.md quotes, rendered from the results tables, between two markers.

``make figures`` (plots/make_figures.py) rewrites README's block between :data:`BEGIN` and
:data:`END` with :func:`render_findings`, so a regenerated results tree never leaves the
README's numbers behind. Every number comes from :func:`lehi.results.collect`'s tables (the
definitions are :mod:`lehi.results`'): per workload each optimizer's best learning rate, final
validation loss and metric, divergences and Welch's test against Adam; the same at the small
and the full budget side by side, where a preset has both; the ablation's
stable learning rates and best losses per reading; and the measured step cost and time to
target against Adam.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lehi import roster
from lehi.io import atomic_write_text
from lehi.results.ablation import ABLATION_PREFIX, ablation_table, is_ablation
from lehi.results.confirm import confirmed_workload, optimizer_name
from lehi.results.markdown import fmt, label_of, pm, table
from lehi.results.stats import TARGET_FACTOR, select_experiment
from lehi.results.store import TRAINED_FRACTION
from lehi.results.tables import Results

__all__ = [
    "BEGIN",
    "END",
    "FindingsMarkersError",
    "lr_text",
    "render_findings",
    "replace_block",
    "update_readme",
]

BEGIN = "<!-- findings:begin -->"
END = "<!-- findings:end -->"
_NOTE = (
    "<!-- written by `make figures` (lehi/results/findings.py) from results/; "
    "edits inside this block are overwritten -->"
)


class FindingsMarkersError(ValueError):
    """README's markers are missing, repeated or out of order."""


def lr_text(lr: float) -> str:
    """A grid learning rate as README writes it: 0.003 → ``3e-3``."""
    if not math.isfinite(lr):
        return "—"
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _metric(value: float, metric_name: str) -> str:
    if metric_name == "accuracy":
        return f"{100 * value:.1f} %" if math.isfinite(value) else "—"
    return fmt(value, ".3g") + (" Å" if metric_name == "rmse" and math.isfinite(value) else "")


def _welch_vs_reference(results: Results, exp: Mapping[str, str]) -> dict[str, float]:
    sig = select_experiment(results.significance, exp)
    sig = sig[sig["baseline"] == roster.REFERENCE]
    return dict(zip(sig["optimizer"], sig["welch_p"], strict=True))


def _workload_rows(results: Results, exp: Mapping[str, str]) -> list[list[str]]:
    best = select_experiment(results.best, exp)
    welch = _welch_vs_reference(results, exp)
    rows = []
    for r in best.to_dict("records"):
        rows.append(
            [
                exp["experiment"],
                label_of(r),
                lr_text(r["lr"]),
                pm(r["val_loss_mean"], r["val_loss_std"], ".3g"),
                _metric(r["metric_mean"], exp["metric_name"]),
                f"{r['n_diverged_total']}/{r['n_runs_total']}",
                fmt(welch.get(r["optimizer"], math.nan), ".2g"),
            ]
        )
    return rows


def _tuning(experiment: str) -> bool:
    """A tuning sweep (the ablation and the confirmations have blocks of their own)."""
    return not is_ablation(experiment) and confirmed_workload(experiment) is None


def _workloads(results: Results) -> list[str]:
    experiments = [e for e in results.experiments() if _tuning(e["experiment"])]
    if not experiments:
        return []
    header = [
        "workload",
        "optimizer",
        "best lr",
        "final val loss (mean ± std over seeds)",
        "val metric",
        "diverged / runs",
        "Welch p vs Adam",
    ]
    rows = [row for exp in experiments for row in _workload_rows(results, exp)]
    return [
        "Tuning sweeps: per workload, each optimizer at its best learning rate (the lowest "
        "mean final validation loss, the mean of the last 3 evaluations, among LRs where no "
        "seed diverged); diverged counts over its whole LR grid. These seeds chose the LRs, "
        "so their p-values are not verdicts (the confirmation block above is):",
        "",
        *table(header, rows),
    ]


def _ablation(results: Results) -> list[str]:
    ablation = ablation_table(results)
    if ablation.empty:
        return []
    experiments = list(dict.fromkeys(ablation["experiment"]))
    cells: dict[str, dict[str, str]] = {}
    for r in ablation.to_dict("records"):
        lrs = f"{r['n_stable_lrs']}/{r['n_trained_lrs']}/{r['n_lrs']}"
        cell = f"{lrs} · {fmt(r['best_val_loss'], '.4f')}"
        cells.setdefault(label_of(r), {})[r["experiment"]] = f"{cell} (lr {lr_text(r['best_lr'])})"
    rows = [[label, *(by_exp.get(e, "—") for e in experiments)] for label, by_exp in cells.items()]
    return [
        "The ablation: per reading, learning rates at which no seed diverged / at which every "
        f"seed also trained (ended ≥ {(1 - TRAINED_FRACTION) * 100:.0f} % below its initial val loss) / in "
        "the grid, and the "
        "best final validation loss (mean over seeds) at the best LR without divergence:",
        "",
        *table(["reading", *experiments], rows),
    ]


#: The suffix of a preset's CPU variant (experiments/<name>_small.yaml).
SMALL_SUFFIX = "_small"


def _scale_pairs(results: Results) -> list[tuple[dict[str, str], dict[str, str], bool]]:
    """(small, full, is_ablation) for each experiment present at both scales: the tuning
    sweeps, and the ablations (which add the readings a tuning sweep does not run)."""
    by_name = {e["experiment"]: e for e in results.experiments()}
    pairs = []
    for name, full in by_name.items():
        small = by_name.get(name + SMALL_SUFFIX)
        if small is not None and confirmed_workload(name) is None:
            pairs.append((small, full, is_ablation(name)))
    return sorted(pairs, key=lambda p: (p[1]["experiment"].removeprefix(ABLATION_PREFIX), p[2]))


def _scales(results: Results) -> list[str]:
    rows, shown = [], set()
    for small, full, ablation in _scale_pairs(results):
        workload = full["experiment"].removeprefix(ABLATION_PREFIX)
        at = {
            scale: {
                r["optimizer"]: r for r in select_experiment(results.best, e).to_dict("records")
            }
            for scale, e in (("small", small), ("full", full))
        }
        for label, f in at["full"].items():
            s = at["small"].get(label)
            if s is None or (workload, label) in shown:
                continue  # an ablation's references are the tuning sweep's rows already
            shown.add((workload, label))
            rows.append(
                [
                    workload + (" (ablation)" if ablation else ""),
                    label_of(f),
                    f"{lr_text(s['lr'])} → {lr_text(f['lr'])}",
                    f"{fmt(s['val_loss_mean'], '.3g')} → {fmt(f['val_loss_mean'], '.3g')}",
                    f"{_metric(s['metric_mean'], small['metric_name'])} → "
                    f"{_metric(f['metric_mean'], full['metric_name'])}",
                    f"{s['n_diverged_total']}/{s['n_runs_total']} → "
                    f"{f['n_diverged_total']}/{f['n_runs_total']}",
                ]
            )
    if not rows:
        return []
    header = ["workload", "optimizer", "best lr", "final val loss", "val metric", "diverged / runs"]
    return [
        "Small against full budget (small → full; tuning seeds, each optimizer at its own best "
        "LR; the full presets run 3 seeds over 9 LRs, the small ones 2 over 7):",
        "",
        *table(header, rows),
    ]


def _steps(value: float) -> str:
    """A mean step count to the nearest step (half up: 106.5 → 107)."""
    return f"{math.floor(value + 0.5):,}" if math.isfinite(value) else "—"


def _cost_row(exp: str, r: Mapping[str, Any], adam: Mapping[str, Any]) -> list[str]:
    step = 1 + r["overhead_pct"] / 100
    reached = f" ({r['n_reached']}/{r['n_seeds']})" if r["n_seeds"] else ""
    time_ratio = r["time_to_target_mean"] / adam["time_to_target_mean"]
    return [
        exp,
        label_of(r),
        f"{step:.2f}×" if math.isfinite(step) else "—",
        _steps(r["steps_to_target_mean"]) + reached,
        _steps(adam["steps_to_target_mean"]),
        f"{time_ratio:.2f}×" if math.isfinite(time_ratio) else "—",
    ]


def _cost(results: Results) -> list[str]:
    rows = []
    for exp in results.experiments():
        if not _tuning(exp["experiment"]) or not results.measured_on(exp["experiment"]):
            continue
        best = select_experiment(results.best, exp)
        by_label = {r["optimizer"]: r for r in best.to_dict("records")}
        adam = by_label.get(roster.REFERENCE)
        if adam is None:
            continue
        rows += [
            _cost_row(exp["experiment"], r, adam)
            for label, r in by_label.items()
            if label != roster.REFERENCE
        ]
    if not rows:
        return []
    header = [
        "workload",
        "optimizer",
        "step cost vs Adam",
        "steps to target (reached/seeds)",
        "Adam's steps to target",
        "time to target vs Adam",
    ]
    return [
        "Cost, measured side by side (step_cost.json): each optimizer's step against Adam's, "
        "and steps and time to the target loss (by default best Adam × "
        f"{TARGET_FACTOR:g}) at the best learning rates:",
        "",
        *table(header, rows),
    ]


def _verdicts(results: Results) -> list[str]:
    from lehi.results.verdicts import verdict_table

    verdicts = verdict_table(results)
    if verdicts.empty:
        return []
    rows = []
    for r in verdicts.to_dict("records"):
        ci = f"{fmt(r['ci_low'], '+.2g')}, {fmt(r['ci_high'], '+.2g')}"
        rows.append(
            [
                r["workload"],
                roster.display_label(r["candidate"], optimizer_name(r["candidate"])),
                roster.display_label(r["baseline"], r["baseline"]),
                f"{fmt(r['mean_diff'], '+.2g')} [{ci}]",
                fmt(r["p_improvement"], ".2f"),
                fmt(r["mwu_p_holm"], ".2g"),
                fmt(r["detectable"], ".2g"),
                f"{r['n_diverged']}/{r['n']}",
                f"**{r['verdict']}**",
            ]
        )
    header = [
        "workload",
        "candidate",
        "vs",
        "Δ final val loss [95 % CI]",
        "P(better)",
        "Mann–Whitney p (Holm)",
        "detectable |Δ|",
        "candidate diverged",
        "verdict",
    ]
    return [
        "Verdicts on the confirmation seeds (each reading at its tuned LR on fresh seeds; "
        "`results/verdicts.md` has every column): Δ = candidate − baseline, negative = lower "
        "loss; p Holm-corrected over the whole table; detectable = the smallest |Δ| these "
        "seeds detect with 80 % power at α = 0.05:",
        "",
        *table(header, rows),
    ]


def render_findings(results: Results) -> str:
    """The findings block (markers included) for ``results``."""
    parts = (
        _verdicts(results),
        _workloads(results),
        _scales(results),
        _ablation(results),
        _cost(results),
    )
    sections = [s for s in parts if s]
    body = [line for section in sections for line in (*section, "")]
    return "\n".join([BEGIN, _NOTE, "", *body, END])


def replace_block(text: str, block: str) -> str:
    """``text`` with everything from :data:`BEGIN` to :data:`END` replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise FindingsMarkersError(
            f"expected one {BEGIN} followed by one {END}, found {text.count(BEGIN)} and "
            f"{text.count(END)}"
        )
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + block + text[end:]


def update_readme(readme: str | Path, results: Results) -> bool:
    """Rewrite ``readme``'s findings block from ``results``; True when its text changed.

    Raises FindingsMarkersError when the markers are not there exactly once each, in order.
    """
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    new = replace_block(text, render_findings(results))
    if new == text:
        return False
    atomic_write_text(path, new)
    return True
