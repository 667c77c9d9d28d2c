"""Markdown tables of the Hessian-imitation study, from the files it wrote.

Which rows a table shows: instantaneous estimates and exact baselines on the reference
trajectory (Adam's, the trajectory every paper compares to; the first trajectory if Adam was
not run), each optimizer's EMA state on its own trajectory.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from lehi.io import atomic_write_text
from lehi.results.markdown import table as markdown_table

__all__ = [
    "ESTIMATE_LABELS",
    "ESTIMATE_ORDER",
    "REFERENCE_TRAJECTORY",
    "load",
    "render_markdown",
    "select_lines",
    "table_parser",
    "write_report",
    "write_table",
]

REFERENCE_TRAJECTORY = "adam"
ESTIMATE_ORDER = (
    "lehi",
    "lehi_avg",
    "lehi_per_example",
    "lehibrid",
    "sophia",
    "adam",
    "ema_lehi",
    "ema_lehibrid",
    "ema_sophia",
    "ema_adam",
    "gn_other_batch",
    "gauss_newton",
)
ESTIMATE_LABELS = {
    "lehi": "LEHI h, 1 draw",
    "lehi_avg": "LEHI h, mean of {draws} draws",
    "lehi_per_example": "LEHI per-example mode",
    "lehibrid": "LEHIBrid max(g⊙g, h)",
    "sophia": "Sophia clipped ĝ⊙ĝ",
    "adam": "Adam g⊙g",
    "ema_lehi": "LEHI EMA (divides by)",
    "ema_lehibrid": "LEHIBrid EMA (divides by)",
    "ema_sophia": "Sophia EMA (divides by)",
    "ema_adam": "Adam EMA (divides by)",
    "gn_other_batch": "exact GN of another batch",
    "gauss_newton": "exact GN (vs Hessian only)",
}
REFERENCE_LABELS = {"gauss_newton": "GN", "hessian": "Hessian"}


def load(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(diagnostics.csv, trajectories.csv, meta.json) of a study folder.

    Raises FileNotFoundError naming the missing file.
    """
    folder = Path(folder)
    paths = [folder / "diagnostics.csv", folder / "trajectories.csv", folder / "meta.json"]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run `python -m lehi.diagnostics.study --out {folder}`"
            )
    meta = json.loads(paths[2].read_text(encoding="utf-8"))
    return pd.read_csv(paths[0]), pd.read_csv(paths[1]), meta


def estimate_label(estimate: str, draws: int | None = None) -> str:
    """Display name of an estimate."""
    return ESTIMATE_LABELS.get(estimate, estimate).format(draws=draws if draws else "K")


def select_lines(frame: pd.DataFrame) -> pd.DataFrame:
    """One trajectory per estimate: the reference one, or the optimizer's own for EMA rows."""
    trajectories = list(dict.fromkeys(frame["trajectory"]))
    reference = REFERENCE_TRAJECTORY if REFERENCE_TRAJECTORY in trajectories else trajectories[0]
    own = frame["kind"] == "ema"
    return frame[
        (own & (frame["estimate"] == "ema_" + frame["trajectory"]))
        | (~own & (frame["trajectory"] == reference))
    ]


def _fmt(value: float, metric: str) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if metric == "ls_scale":
        return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.3g}"


def _ordered(estimates: list[str]) -> list[str]:
    rank = {e: i for i, e in enumerate(ESTIMATE_ORDER)}
    return sorted(estimates, key=lambda e: (rank.get(e, len(rank)), e))


def render_markdown(frame: pd.DataFrame, trajectories: pd.DataFrame, meta: dict) -> str:
    """The study's tables as one Markdown document."""
    draws = meta.get("draws")
    lines = [
        "# How well do the curvature estimates imitate the exact diagonals?",
        "",
        f"Scale: {meta.get('scale', '?')}; seed {meta.get('seed', '?')}; "
        f"LEHI averaged over {draws} draws; written by `python -m lehi.diagnostics.study`.",
        "Every estimate is on the scale of the exact diagonals of the mean batch loss "
        "(LEHI-family and Adam: × N; see lehi/diagnostics/estimates.py). Metrics over all "
        "parameters; per-layer values are in diagnostics.csv. Instantaneous estimates and exact "
        "baselines on the Adam trajectory, EMA states on their optimizer's own trajectory.",
        "cos = cosine, ρ = Spearman, relL2 = ‖e − r‖/‖r‖, ×2 = fraction of coordinates within "
        "a factor 2, ×2 fit = the same after the best log-scale, c* = least-squares scale.",
        "",
    ]
    lines_frame = select_lines(frame[frame["layer"] == "all"])
    for model in dict.fromkeys(frame["model"]):
        info = meta.get("models", {}).get(model, {})
        sub = lines_frame[lines_frame["model"] == model]
        lines += [
            f"## {model}: {info.get('description', '')}",
            "",
            f"{info.get('params', '?')} parameters, batch {info.get('batch_size', '?')}, "
            f"{info.get('steps', '?')} training steps.",
            "",
        ]
        end = sub[sub["checkpoint"] == "end"]
        value = end.set_index(["estimate", "reference", "metric"])["value"]
        columns = [
            ("gauss_newton", m)
            for m in ("cosine", "spearman", "rel_l2", "within2", "within2_fit", "ls_scale")
        ]
        columns += [("hessian", m) for m in ("cosine", "spearman", "rel_l2", "within2")]
        short = {
            "cosine": "cos",
            "spearman": "ρ",
            "rel_l2": "relL2",
            "within2": "×2",
            "within2_fit": "×2 fit",
            "ls_scale": "c*",
        }
        header = ["estimate (end of training)"] + [
            f"{short[m]} {REFERENCE_LABELS[r]}" for r, m in columns
        ]
        body = []
        for est in _ordered(list(dict.fromkeys(end["estimate"]))):
            body.append(
                [estimate_label(est, draws)]
                + [_fmt(float(value.get((est, r, m), math.nan)), m) for r, m in columns]
            )
        lines += markdown_table(header, body) + [""]

        gn = sub[sub["reference"] == "gauss_newton"]
        pivot = gn.pivot_table(
            index="estimate", columns=["metric", "checkpoint"], values="value", aggfunc="first"
        )
        checkpoints = [c for c in ("init", "mid", "end") if c in set(gn["checkpoint"])]
        header = ["estimate vs GN"] + [f"cos {c}" for c in checkpoints]
        header += [f"ρ {c}" for c in checkpoints] + [f"×2 fit {c}" for c in checkpoints]
        body = []
        for est in _ordered(list(pivot.index)):
            row = [estimate_label(est, draws)]
            for metric in ("cosine", "spearman", "within2_fit"):
                row += [
                    _fmt(float(pivot.get((metric, c), {}).get(est, math.nan)), metric)
                    for c in checkpoints
                ]
            body.append(row)
        lines += markdown_table(header, body) + [""]

        traj = trajectories[trajectories["model"] == model]
        if len(traj):
            header = [
                "trajectory",
                "checkpoint",
                "status",
                "loss (diag. batch)",
                "val loss",
                f"val {traj['metric_name'].iloc[0]}",
            ]
            body = [
                [
                    str(r.trajectory),
                    str(r.checkpoint),
                    str(r.status),
                    _fmt(float(r.diag_batch_loss), ""),
                    _fmt(float(r.val_loss), ""),
                    _fmt(float(r.val_metric), ""),
                ]
                for r in traj.itertuples()
            ]
            lines += markdown_table(header, body) + [""]
    return "\n".join(lines)


def write_report(folder: str | Path) -> Path:
    """Write ``<folder>/diagnostics.md`` from the study's files there; return its path."""
    folder = Path(folder)
    frame, trajectories, meta = load(folder)
    path = folder / "diagnostics.md"
    atomic_write_text(path, render_markdown(frame, trajectories, meta))
    return path


def table_parser(doc: str, experiments_help: str) -> argparse.ArgumentParser:
    """The command line every per-preset diagnostic table shares: ``--out`` (the CSV; the
    Markdown goes next to it), ``--experiments`` and ``--data-dir``; the caller adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", required=True, help="CSV path (the .md goes next to it)")
    parser.add_argument("--experiments", nargs="+", required=True, help=experiments_help)
    parser.add_argument("--data-dir", default=None, help="paths.data_dir (default: the config's)")
    return parser


def write_table(out: str | Path, table: pd.DataFrame, markdown: str) -> Path:
    """A diagnostic's table as ``out`` (CSV) and its Markdown next to it (same name, ``.md``),
    each written atomically; says so on stdout and returns the CSV's path."""
    out = Path(out)
    atomic_write_text(out, table.to_csv(index=False))
    atomic_write_text(out.with_suffix(".md"), markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return out
