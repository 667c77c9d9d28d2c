"""Hessian imitation: agreement of each curvature estimate with the exact diagonals vs training.

Reads the study's files in ``<root>/diagnostics/`` (``python -m lehi.diagnostics.study``) and
writes, per exact diagonal (Gauss–Newton, Hessian), one figure: rows cosine similarity,
Spearman rank correlation, relative L2 error (log axis) and fraction within a factor 2; columns
the study's models; x the checkpoint (initialisation, mid-training, end); one line per estimate
(instantaneous estimates and exact baselines on the Adam trajectory, solid/dotted; the EMA each
optimizer divides by on its own trajectory, dashed, in the optimizer's colour). It only plots:
the study's files, its Markdown tables included, are written by ``lehi.diagnostics.study``.

    python plots/diagnostics.py --root results --out plots/figures
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/diagnostics.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
from matplotlib.figure import Figure

from lehi import roster
from lehi.diagnostics.report import ESTIMATE_ORDER, estimate_label, load, select_lines
from lehi.results import Results
from plots.style import save

__all__ = ["FOLDER", "figure", "make", "plot_diagnostics"]

FOLDER = "diagnostics"
PANEL_METRICS = (
    ("cosine", "cosine similarity"),
    ("spearman", "Spearman rank corr."),
    ("rel_l2", "relative L2 error"),
    ("within2", "fraction within ×2"),
)
REFERENCE_TITLES = {
    "gauss_newton": "exact Gauss–Newton diagonal",
    "hessian": "exact Hessian diagonal",
}
# Estimates that are not optimizers get their own colours (Okabe-Ito orange, Tol wine, greys).
OWN_COLORS = {
    "lehi_avg": "#E69F00",
    "lehi_per_example": "#882255",
    "gn_other_batch": "#000000",
    "gauss_newton": "#7F7F7F",
}
CHECKPOINT_TICKS = ((0.0, "init"), (0.5, "mid"), (1.0, "end"))


def _style(estimate: str) -> dict[str, object]:
    """Colour, line style and marker (and marker size, where not the default) of a line."""
    if estimate.startswith("ema_"):
        return {"color": roster.color(estimate[4:]), "linestyle": "--", "marker": "s"}
    if estimate in OWN_COLORS:
        dotted = estimate in ("gn_other_batch", "gauss_newton")
        return {
            "color": OWN_COLORS[estimate],
            "linestyle": ":" if dotted else "-",
            "marker": "^" if dotted else "o",
        }
    if estimate == "sophia":
        # The same draw as LEHI's, clipped: equal cosine and ranks, so hollow to show both.
        return {"color": roster.color("sophia"), "linestyle": "-", "marker": "D",
                "markerfacecolor": "none", "markersize": 7}  # fmt: skip
    return {"color": roster.color(estimate), "linestyle": "-", "marker": "o"}


def figure(frame: pd.DataFrame, reference: str, meta: dict) -> Figure:
    """The figure of one exact diagonal (``reference``) from the study's tidy table."""
    rows = select_lines(frame[(frame["layer"] == "all") & (frame["reference"] == reference)])
    models = list(dict.fromkeys(frame["model"]))
    fig = Figure(figsize=(3.6 * len(models) + 2.6, 9.0), layout="constrained")
    axes = fig.subplots(len(PANEL_METRICS), len(models), squeeze=False, sharex=True)
    rank = {e: i for i, e in enumerate(ESTIMATE_ORDER)}
    estimates = sorted(set(rows["estimate"]), key=lambda e: (rank.get(e, len(rank)), e))
    handles: dict[str, object] = {}
    for col, model in enumerate(models):
        info = meta.get("models", {}).get(model, {})
        axes[0][col].set_title(f"{model}\n{info.get('params', '?')} parameters", fontsize=10)
        for row, (metric, ylabel) in enumerate(PANEL_METRICS):
            ax = axes[row][col]
            sub = rows[(rows["model"] == model) & (rows["metric"] == metric)]
            for est in estimates:
                line = sub[sub["estimate"] == est].sort_values("progress")
                if line.empty:
                    continue
                (handle,) = ax.plot(
                    line["progress"],
                    line["value"],
                    label=estimate_label(est, meta.get("draws")),
                    **{"linewidth": 1.4, "markersize": 4, **_style(est)},
                )
                handles.setdefault(est, handle)
            if metric == "rel_l2":
                ax.set_yscale("log")
            elif metric == "within2":
                ax.set_ylim(-0.02, 1.02)
            else:
                ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.02)
            ax.grid(True, alpha=0.3)
            ax.set_xticks([t for t, _ in CHECKPOINT_TICKS], [n for _, n in CHECKPOINT_TICKS])
            if col == 0:
                ax.set_ylabel(ylabel)
        axes[-1][col].set_xlabel("training checkpoint")
    fig.suptitle(
        f"Agreement with the {REFERENCE_TITLES.get(reference, reference)} (all parameters; "
        "estimates on the Adam trajectory, EMA states on their own)",
        fontsize=11,
    )
    fig.legend(
        list(handles.values()),
        [h.get_label() for h in handles.values()],
        loc="outside right center",
        fontsize=8,
        frameon=False,
    )
    return fig


def plot_diagnostics(results_root: str | Path, out_dir: str | Path) -> list[Path]:
    """Figures of ``<results_root>/diagnostics`` into ``out_dir``.

    Returns the written paths; an empty list when the study has not been run there.
    """
    folder = Path(results_root) / FOLDER
    if not (folder / "diagnostics.csv").is_file():
        return []
    frame, _, meta = load(folder)
    suffix = "_small" if meta.get("scale") == "small" else ""
    written: list[Path] = []
    for reference in REFERENCE_TITLES:
        if reference in set(frame["reference"]):
            written += save(
                figure(frame, reference, meta), Path(out_dir), f"diagnostics_{reference}{suffix}"
            )
    return written


def make(results: Results, out: Path) -> list[Path]:
    """The figure producer for plots/make_figures.py (reads ``results.root``)."""
    return plot_diagnostics(results.root, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--root`` (default results), ``--out`` (default plots/figures)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    parser.add_argument("--out", default="plots/figures", help="figure folder")
    args = parser.parse_args(argv)
    written = plot_diagnostics(args.root, args.out)
    if not written:
        print(
            f"no study under {Path(args.root) / FOLDER}: run `python -m "
            f"lehi.diagnostics.study --out {Path(args.root) / FOLDER}` first",
            file=sys.stderr,
        )
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
