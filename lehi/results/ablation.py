"""The ablation of LEHI's open choices: per reading, how good and how LR-robust it is.

An ablation experiment is one whose name starts with ``ablation_`` (experiments/ablation_*.yaml):
each *reading* (conf/reading/, the run's ``optimizer.label``) is LEHI under one option or a
pair, plus ``adam`` and ``lehibrid`` for reference, over one LR grid. Per reading, from the
tables of :func:`lehi.results.collect` (definitions in :mod:`lehi.results`):

- **best final val loss**: the reading's best-LR row of :func:`lehi.results.stats.best_lrs`
  (mean over counted seeds of the final validation loss, at the eligible LR where it is lowest).
- **stable LRs**: the eligible cells, i.e. LRs where no seed diverged and at least one seed
  counts (a LR whose seeds all failed proves nothing either way).
- **LRs within 10 % of Adam**: the stable LRs whose mean final validation loss is
  ≤ :data:`WITHIN` × the ``adam`` reading's best; their **width** is
  log10(max lr / min lr) in decades (0 for a single LR, NaN for none or without an Adam best).
  The width spans the extreme LRs, so a gap inside the range is not subtracted; the LRs
  themselves are listed alongside.
- **LRs with a recovered spike**: stable LRs where a counted seed's ``max_spike`` exceeded its
  ``trainer.divergence_factor`` (:func:`lehi.results.stats.unstable`, the rule every table
  and figure uses).

Readings are sorted Adam first, then plain LEHI, then the others by best loss (none last).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lehi import roster
from lehi.io import atomic_write_text
from lehi.results.markdown import experiment_heading, fmt
from lehi.results.markdown import table as markdown_table
from lehi.results.stats import select_experiment, unstable
from lehi.results.store import CELL_KEYS, EXP_KEYS, TRAINED_FRACTION
from lehi.results.tables import Results

__all__ = [
    "ABLATION_PREFIX",
    "COLUMNS",
    "WITHIN",
    "ablation_cells",
    "ablation_table",
    "experiments",
    "is_ablation",
    "render_markdown",
    "write_ablation",
]

ABLATION_PREFIX = "ablation_"
WITHIN = 1.1
_FIRST = (roster.REFERENCE, "lehi")  # the reference, then the literal method

COLUMNS = (
    *EXP_KEYS,
    "metric_name",
    "optimizer",
    "optimizer_name",
    "best_lr",
    "best_val_loss",
    "best_val_loss_std",
    "best_n_seeds",
    "n_lrs",
    "n_stable_lrs",
    "stable_lrs",
    "n_trained_lrs",
    "adam_best_val_loss",
    "n_within_lrs",
    "within_lrs",
    "within_width_decades",
    "n_spike_lrs",
    "spike_lrs",
    "n_runs",
    "n_diverged",
    "n_failed",
)


def is_ablation(experiment: str) -> bool:
    """Whether ``experiment`` is one of the ablation sweeps (its name starts ``ablation_``)."""
    return str(experiment).startswith(ABLATION_PREFIX)


def experiments(results: Results) -> list[dict[str, str]]:
    """The ablation experiments of ``results``, in ``results.experiments()`` order."""
    return [e for e in results.experiments() if is_ablation(e["experiment"])]


def ablation_cells(results: Results, exp: dict[str, str]) -> pd.DataFrame:
    """The cells of one ablation experiment (``results.cells`` rows) plus ``recovered_spike``:
    a counted seed of the cell spiked above its divergence factor and recovered."""
    cells = select_experiment(results.cells, exp)
    runs = select_experiment(results.runs, exp)
    spiked = runs[unstable(runs)]
    keys = set(zip(*(spiked[k] for k in CELL_KEYS), strict=True))
    flags = [tuple(r) in keys for r in cells[list(CELL_KEYS)].itertuples(index=False)]
    return cells.assign(recovered_spike=np.asarray(flags, dtype=bool))


def _width(lrs: np.ndarray) -> float:
    return float(np.log10(lrs.max() / lrs.min())) if len(lrs) else math.nan


def _reading_row(
    exp: dict[str, str], label: str, cells: pd.DataFrame, best: pd.Series, adam_best: float
) -> dict[str, Any]:
    stable = cells[cells["eligible"]].sort_values("lr")
    loss = stable["val_loss_mean"].to_numpy(float)
    within = stable["lr"].to_numpy(float)[loss <= WITHIN * adam_best]  # False for a NaN best
    spikes = stable.loc[stable["recovered_spike"], "lr"].to_numpy(float)
    return {
        **{k: exp[k] for k in (*EXP_KEYS, "metric_name")},
        "optimizer": label,
        "optimizer_name": str(cells["optimizer_name"].iloc[0]),
        "best_lr": float(best["lr"]),
        "best_val_loss": float(best["val_loss_mean"]),
        "best_val_loss_std": float(best["val_loss_std"]),
        "best_n_seeds": int(best["n_seeds"]),
        "n_lrs": len(cells),
        "n_stable_lrs": len(stable),
        "stable_lrs": " ".join(f"{lr:g}" for lr in stable["lr"]),
        "n_trained_lrs": int((stable["n_trained"] == stable["n_runs"]).sum()),
        "adam_best_val_loss": adam_best,
        "n_within_lrs": len(within),
        "within_lrs": " ".join(f"{lr:g}" for lr in within),
        "within_width_decades": _width(within),
        "n_spike_lrs": len(spikes),
        "spike_lrs": " ".join(f"{lr:g}" for lr in spikes),
        "n_runs": int(cells["n_runs"].sum()),
        "n_diverged": int(cells["n_diverged"].sum()),
        "n_failed": int(cells["n_failed"].sum()),
    }


def _order(table: pd.DataFrame) -> pd.DataFrame:
    first = {label: i for i, label in enumerate(_FIRST)}
    rank = [first.get(label, len(first)) for label in table["optimizer"]]
    loss = table["best_val_loss"].to_numpy(float)
    return (
        table.assign(_rank=rank, _loss=np.where(np.isfinite(loss), loss, np.inf))
        .sort_values([*EXP_KEYS, "_rank", "_loss", "optimizer"], kind="stable")
        .drop(columns=["_rank", "_loss"])
        .reset_index(drop=True)
    )


def ablation_table(results: Results) -> pd.DataFrame:
    """One row per (ablation experiment, reading); columns :data:`COLUMNS` (module docstring).

    ``*_lrs`` columns are space-separated LRs in ascending order; without an eligible ``adam``
    LR, ``adam_best_val_loss`` and the within-10 % columns are NaN / empty.
    """
    rows = []
    for exp in experiments(results):
        cells = ablation_cells(results, exp)
        best = select_experiment(results.best, exp).set_index("optimizer")
        adam = best["val_loss_mean"].get(roster.REFERENCE, math.nan)
        for label, group in cells.groupby("optimizer", sort=False):
            rows.append(_reading_row(exp, str(label), group, best.loc[label], float(adam)))
    if not rows:
        return pd.DataFrame(columns=list(COLUMNS))
    return _order(pd.DataFrame(rows, columns=list(COLUMNS)))


def _md_row(r: dict[str, Any]) -> list[str]:
    loss = fmt(r["best_val_loss"])
    if math.isfinite(r["best_val_loss_std"]):
        loss += f" ± {r['best_val_loss_std']:.2g}"
    within = f"{fmt(r['within_width_decades'], '.2f')} ({r['within_lrs'] or 'none'})"
    diverged = f"{r['n_diverged']}/{r['n_runs']}"
    if r["n_failed"]:
        diverged += f" ({r['n_failed']} failed)"
    return [
        roster.display_label(r["optimizer"], r["optimizer_name"]),
        fmt(r["best_lr"], "g"),
        loss,
        f"{r['n_stable_lrs']}/{r['n_lrs']}",
        f"{r['n_trained_lrs']}/{r['n_lrs']}",
        within,
        f"{r['n_spike_lrs']}" + (f" ({r['spike_lrs']})" if r["spike_lrs"] else ""),
        diverged,
    ]


def render_markdown(table: pd.DataFrame) -> str:
    """results/ablation.md: one table per ablation experiment (rows of :func:`ablation_table`)."""
    header = [
        "reading",
        "best lr",
        "best final val loss (mean ± std over seeds)",
        "LRs without divergence",
        "LRs where every seed trained",
        f"LR range within {WITHIN - 1:.0%} of Adam's best (decades; LRs)",
        "LRs with a recovered spike",
        "diverged / runs",
    ]
    lines = [
        "# Ablation of LEHI's open choices",
        "",
        "Each reading is LEHI under one option or a pair (conf/reading/), with Adam and "
        "LEHIBrid for reference, over one LR grid (experiments/ablation_*.yaml). Best final "
        "val loss = mean over seeds of the mean of the last 3 evaluations, at the LR where it "
        "is lowest among the LRs where no seed diverged. LRs without divergence = LRs where "
        "no seed diverged (and one counted). LRs where every seed trained = every seed ended "
        f"at least {(1 - TRAINED_FRACTION) * 100:.0f} % below its initial val loss "
        f"(lehi.results.store.TRAINED_FRACTION). LR range within {(WITHIN - 1) * 100:.0f} % of Adam = "
        "log10(max/min) "
        f"over those LRs whose mean final val loss is ≤ {WITHIN:g} × Adam's best. Recovered "
        "spike = a counted seed's training loss once exceeded its divergence factor × its "
        "initial loss.",
    ]
    for key, group in table.groupby(list(EXP_KEYS), sort=False):
        first = group.iloc[0]
        heading = experiment_heading(*key, str(first["metric_name"]))
        adam = fmt(float(first["adam_best_val_loss"]))
        lines += [
            "",
            f"## {heading}",
            "",
            f"Adam's best final val loss: {adam}.",
            "",
            *markdown_table(header, [_md_row(r) for r in group.to_dict("records")]),
        ]
    return "\n".join(lines) + "\n"


def write_ablation(root: str | Path, results: Results) -> list[Path]:
    """Write ``<root>/ablation.csv`` and ``<root>/ablation.md`` atomically when ``results``
    holds an ablation experiment; returns the paths written (none otherwise)."""
    table = ablation_table(results)
    if table.empty:
        return []
    root = Path(root)
    paths = [root / "ablation.csv", root / "ablation.md"]
    atomic_write_text(paths[0], table.to_csv(index=False))
    atomic_write_text(paths[1], render_markdown(table))
    return paths
