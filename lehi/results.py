"""Read a results tree into pandas tables and write the summary (CSV + Markdown).

Layout read (written by the trainer, see the spec's "Results on disk"):
``<root>/<experiment>/<optimizer>/lr=<lr>/seed=<seed>/{config.yaml, metrics.csv, summary.json}``.
Folders without ``summary.json`` are runs in progress and are skipped. A malformed file is
reported with a one-line warning naming it (logger ``lehi.results``) and that run, or that
run's curves, is left out; the rest of the aggregation goes on.

Definitions used by every table and figure:

- **Final validation loss** of a run: ``summary.last3.val_loss_mean``, the mean validation loss
  over its last 3 evaluations (docs/EXPERIMENTS.md, "Sweeps"). **Final metric**: the metric of
  its last evaluation (``summary.final.val_metric``).
- **Diverged run**: status ``"diverged"``, or a ``"completed"`` run whose final validation loss
  is not finite. **Failed runs** (status ``"failed"``: crashes, not the optimizer's doing) are
  left out of every statistic and only counted (``n_failed``).
- **Cell** = (experiment, scale, dataset, optimizer, lr). Across seeds: mean and sample std
  (ddof=1) of the per-run values; ``val_loss_spread`` = 2 × that std, or, for a single-seed
  cell, 2 × the run's own std over its last 3 evaluations (the paper's error bars).
- **Eligible cell**: no seed diverged and at least one seed has a finite final validation
  loss. A learning rate that diverged for any seed is not a usable setting, however good its
  other seeds were.
- **Best LR** of an optimizer: the eligible cell with the lowest mean final validation loss
  (ties go to the smaller LR). An optimizer without an eligible cell has no best LR (NaN).
- **Target loss** of an experiment (for time-to-target): by default the best Adam final
  validation loss × 1.05 (Adam is the reference every paper compares to; the 5 % slack means
  the reference itself reaches the target before its last evaluations, so the time is a
  real "time to get there", not its end time). Without Adam runs: the worst of the
  optimizers' best final losses × 1.05. Overridable per experiment.
- **Time to target** of a run: the first validation row (by step) whose loss ≤ target; its
  ``step`` and ``train_time`` (training steps incl. curvature passes, evaluation excluded).
  At the best LR: mean ± std over the seeds that reached it, and how many did.
- **Significance**: LEHI and LEHIBrid, each at its best LR, against Adam, AdamW and Sophia at
  theirs, on the per-seed final validation losses: Welch's t-test and two-sided Mann-Whitney
  U; mean difference (candidate − baseline, negative = candidate better), Cohen's d (pooled
  sd) and Hedges' g. With fewer than 2 seeds on either side all test values are NaN.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from lehi.io import atomic_write_text
from lehi.logging import METRIC_COLUMNS

log = logging.getLogger(__name__)

RUN_GLOB = "*/*/lr=*/seed=*/summary.json"
STATUSES = ("completed", "diverged", "failed")
RUN_KEYS = ("experiment", "scale", "dataset", "optimizer", "lr", "seed")
EXP_KEYS = ("experiment", "scale", "dataset")
CELL_KEYS = (*EXP_KEYS, "optimizer", "lr")
BASELINES = ("adam", "adamw", "sophia")
CANDIDATES = ("lehi", "lehibrid")
OPTIMIZER_ORDER = (*BASELINES, *CANDIDATES)
OPTIMIZER_LABELS = {
    "adam": "Adam",
    "adamw": "AdamW",
    "sophia": "Sophia",
    "lehi": "LEHI",
    "lehibrid": "LEHIBrid",
}
METRIC_LABELS = {"accuracy": "accuracy", "rmse": "RMSE (Å)", "perplexity": "perplexity"}
REFERENCE_OPTIMIZER = "adam"
TARGET_FACTOR = 1.05
NO_RESULTS_HINT = "run `make sweep EXP=digits` first (any experiment works), then `make figures`"

RUN_COLUMNS = (
    "experiment",
    "scale",
    "dataset",
    "optimizer",
    "lr",
    "seed",
    "status",
    "diverged",
    "metric_name",
    "val_loss",
    "val_loss_last3_std",
    "last3_n",
    "final_val_loss",
    "final_val_metric",
    "final_train_loss",
    "best_val_loss",
    "best_val_metric",
    "best_step",
    "steps",
    "epochs",
    "wall_time",
    "train_time",
    "steps_per_s",
    "curvature_passes",
    "diverged_at_step",
    "error",
    "run",
    "path",
)


class _Malformed(Exception):
    """A run file that cannot be used; the message is the one-line reason."""


def _warn(path: Path, reason: object, action: str = "skipping") -> None:
    # Parser messages (YAML especially) span lines; the report must stay one line.
    log.warning("lehi.results: %s %s: %s", action, path, " ".join(str(reason).split()))


def optimizer_label(name: str) -> str:
    """Display name of an optimizer (``lehibrid`` -> ``LEHIBrid``); unknown names unchanged."""
    return OPTIMIZER_LABELS.get(name, name)


def optimizer_rank(name: str) -> tuple[int, str]:
    """Sort key: baselines, then the LEHI variants, then anything else alphabetically."""
    if name in OPTIMIZER_ORDER:
        return (OPTIMIZER_ORDER.index(name), name)
    return (len(OPTIMIZER_ORDER), name)


def scale_label(scale: str) -> str:
    """How a scale is shown in headings and titles; small runs say they are the CPU variant."""
    return "small (CPU variant)" if scale == "small" else str(scale)


# --------------------------------------------------------------------------- reading


def _number(value: Any, where: str) -> float:
    """JSON number -> float; null (the trainer's encoding of non-finite values) -> NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Malformed(f"{where} is {value!r}, expected a number or null")
    return float(value)


def _section(summary: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = summary.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Malformed(f"{key!r} is {type(value).__name__}, expected an object or null")
    return value


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Malformed(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _Malformed(f"top level is {type(data).__name__}, expected an object")
    return data


def _config_keys(path: Path) -> dict[str, Any]:
    """The reader's keys from config.yaml (None where absent); {} when there is no file."""
    if not path.exists():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _Malformed(f"not valid YAML ({exc})") from exc
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise _Malformed(f"top level is {type(cfg).__name__}, expected a mapping")

    def get(*keys: str) -> Any:
        node: Any = cfg
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return node

    return {
        "experiment": get("experiment", "name"),
        "scale": get("experiment", "scale"),
        "dataset": get("dataset", "name"),
        "optimizer": get("optimizer", "name"),
        "lr": get("optimizer", "lr"),
        "seed": get("seed"),
    }


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "lr":
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return str(a) == str(b)


def _run_keys(summary: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Run keys from summary.json, filled in (and cross-checked) from config.yaml."""
    cfg_path = run_dir / "config.yaml"
    try:
        cfg = _config_keys(cfg_path)
    except _Malformed as exc:
        _warn(cfg_path, f"{exc}; using the keys of summary.json", action="ignoring")
        cfg = {}
    keys: dict[str, Any] = {}
    for key in RUN_KEYS:
        value, from_cfg = summary.get(key), cfg.get(key)
        if value is None:
            value = from_cfg
        elif from_cfg is not None and not _same(key, value, from_cfg):
            log.warning(
                "lehi.results: %s: %s is %r there but %r in summary.json; using summary.json",
                cfg_path,
                key,
                from_cfg,
                value,
            )
        if value is None:
            raise _Malformed(f"key {key!r} is in neither summary.json nor config.yaml")
        keys[key] = value
    try:
        keys["lr"] = float(keys["lr"])
        if isinstance(keys["seed"], bool):
            raise ValueError
        keys["seed"] = int(keys["seed"])
    except (TypeError, ValueError) as exc:
        raise _Malformed(f"lr {keys['lr']!r} / seed {keys['seed']!r} are not numbers") from exc
    for key in ("experiment", "scale", "dataset", "optimizer"):
        keys[key] = str(keys[key])
    return keys


def _run_row(summary_path: Path, root: Path) -> dict[str, Any]:
    run_dir = summary_path.parent
    summary = _read_summary(summary_path)
    status = summary.get("status")
    if status not in STATUSES:
        raise _Malformed(f"status {status!r} is not one of {', '.join(STATUSES)}")
    row = _run_keys(summary, run_dir)
    final, best, last3 = (_section(summary, k) for k in ("final", "best", "last3"))
    row.update(
        status=status,
        metric_name=str(summary.get("metric") or ""),
        val_loss=_number(last3.get("val_loss_mean"), "last3.val_loss_mean"),
        val_loss_last3_std=_number(last3.get("val_loss_std"), "last3.val_loss_std"),
        last3_n=_number(last3.get("n"), "last3.n"),
        final_val_loss=_number(final.get("val_loss"), "final.val_loss"),
        final_val_metric=_number(final.get("val_metric"), "final.val_metric"),
        final_train_loss=_number(final.get("train_loss"), "final.train_loss"),
        best_val_loss=_number(best.get("val_loss"), "best.val_loss"),
        best_val_metric=_number(best.get("val_metric"), "best.val_metric"),
        best_step=_number(best.get("step"), "best.step"),
        error=str(summary.get("error") or ""),
        run=run_dir.relative_to(root).as_posix(),
        path=str(run_dir),
    )
    for key in (
        "steps",
        "epochs",
        "wall_time",
        "train_time",
        "steps_per_s",
        "curvature_passes",
        "diverged_at_step",
    ):
        row[key] = _number(summary.get(key), key)
    row["diverged"] = status == "diverged" or (
        status == "completed" and not math.isfinite(row["val_loss"])
    )
    return row


def _sort(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    if frame.empty:
        return frame.reset_index(drop=True)
    rank = frame["optimizer"].map(optimizer_rank)
    order = frame.assign(_rank=rank).sort_values(
        [k if k != "optimizer" else "_rank" for k in keys], kind="stable"
    )
    return order.drop(columns="_rank").reset_index(drop=True)


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per finished run under ``root`` (columns: ``RUN_COLUMNS``).

    Values come from summary.json (nulls -> NaN); run keys missing there are taken from
    config.yaml. ``val_loss`` is the run's final validation loss (last-3 mean), ``diverged``
    follows the module's definition, ``run`` is the folder relative to ``root``.
    """
    root = Path(root)
    rows: list[dict[str, Any]] = []
    for summary_path in sorted(root.glob(RUN_GLOB)):
        try:
            rows.append(_run_row(summary_path, root))
        except _Malformed as exc:
            _warn(summary_path, exc)
    in_progress = [
        d for d in root.glob("*/*/lr=*/seed=*") if d.is_dir() and not (d / "summary.json").exists()
    ]
    if in_progress:
        log.info(
            "lehi.results: %d run folder(s) without summary.json (in progress) skipped",
            len(in_progress),
        )
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    dup = runs.duplicated(list(RUN_KEYS), keep="first")
    for path in runs.loc[dup, "path"]:
        _warn(Path(path), "another folder holds the same experiment/optimizer/lr/seed")
    runs = runs.loc[~dup]
    runs = runs.astype({"lr": float, "seed": int, "diverged": bool}) if not runs.empty else runs
    return _sort(runs, ("experiment", "scale", "dataset", "optimizer", "lr", "seed"))


def _read_metrics(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise _Malformed("file missing (the run has a summary.json)")
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise _Malformed(f"not a readable CSV ({exc})") from exc
    missing = [c for c in METRIC_COLUMNS if c not in frame.columns]
    if missing:
        raise _Malformed(
            f"missing column(s) {', '.join(missing)}; expected {', '.join(METRIC_COLUMNS)}"
        )
    columns = {}
    for column in METRIC_COLUMNS:
        values = frame[column]
        if column == "split":
            columns[column] = values.astype(str)
        elif pd.api.types.is_numeric_dtype(values):  # the usual case: parsed as numbers already
            columns[column] = values.astype(float)
        else:
            numbers = pd.to_numeric(values, errors="coerce")
            bad = numbers.isna() & values.notna()
            if bad.any():
                raise _Malformed(f"column {column!r} has non-numeric value {values[bad].iloc[0]!r}")
            columns[column] = numbers.astype(float)
    frame = pd.DataFrame(columns)
    # A resumed run may log a step again; its last row for a step is the one that counts.
    if frame.duplicated(["split", "step"], keep="last").any():
        frame = frame.drop_duplicates(["split", "step"], keep="last")
    return frame


def load_metrics(root: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """All metrics.csv rows of the finished runs, tidy, with the run keys in front.

    Columns: experiment, scale, dataset, optimizer, lr (the run's configured LR), seed, run,
    then the CSV's columns, its per-row ``lr`` renamed ``step_lr`` (the schedule's value).
    Pass ``runs`` (from :func:`load_runs`) to avoid reading the summaries again.
    """
    if runs is None:
        runs = load_runs(root)
    columns = [*RUN_KEYS, "run", *("step_lr" if c == "lr" else c for c in METRIC_COLUMNS)]
    frames: list[pd.DataFrame] = []
    keys: list[list[Any]] = []
    for run in runs[[*RUN_KEYS, "run", "path"]].to_dict("records"):
        path = Path(run["path"]) / "metrics.csv"
        try:
            frame = _read_metrics(path).rename(columns={"lr": "step_lr"})
        except _Malformed as exc:
            _warn(path, exc)
            continue
        frames.append(frame)
        keys.append([run[k] for k in (*RUN_KEYS, "run")])
    if not frames:
        return pd.DataFrame(columns=columns)
    # Keys are repeated once for the whole table: far faster than per-frame assignment.
    lengths = [len(f) for f in frames]
    metrics = pd.concat(frames, ignore_index=True)
    for i, key in enumerate((*RUN_KEYS, "run")):
        metrics[key] = np.repeat(np.array([k[i] for k in keys], dtype=object), lengths)
    metrics = metrics.astype({"lr": float, "seed": int})
    return metrics[columns]


# ----------------------------------------------------------------------- aggregation


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (experiment, scale, dataset, optimizer, lr) with seed statistics.

    Columns: the cell keys, metric_name, n_runs, n_seeds (runs with a finite final loss that
    enter the statistics), n_diverged, n_failed, val_loss_mean, val_loss_std,
    val_loss_spread, metric_mean, metric_std, eligible.
    """
    columns = [
        *CELL_KEYS,
        "metric_name",
        "n_runs",
        "n_seeds",
        "n_diverged",
        "n_failed",
        "val_loss_mean",
        "val_loss_std",
        "val_loss_spread",
        "metric_mean",
        "metric_std",
        "eligible",
    ]
    rows = []
    for key, group in runs.groupby(list(CELL_KEYS), sort=False):
        used = group[(group["status"] != "failed") & ~group["diverged"]]
        used = used[np.isfinite(used["val_loss"].to_numpy(float))]
        loss = used["val_loss"].to_numpy(float)
        metric = used["final_val_metric"].to_numpy(float)
        loss_mean, loss_std = _mean_std(loss)
        metric_mean, metric_std = _mean_std(metric[np.isfinite(metric)])
        if len(loss) > 1:
            spread = 2 * loss_std
        elif len(loss) == 1:
            spread = 2 * float(used["val_loss_last3_std"].iloc[0])
        else:
            spread = math.nan
        n_diverged = int(group["diverged"].sum())
        rows.append(
            [
                *key,
                next((m for m in group["metric_name"] if m), ""),
                len(group),
                len(loss),
                n_diverged,
                int((group["status"] == "failed").sum()),
                loss_mean,
                loss_std,
                spread,
                metric_mean,
                metric_std,
                n_diverged == 0 and len(loss) > 0,
            ]
        )
    cells = pd.DataFrame(rows, columns=columns)
    return _sort(cells, CELL_KEYS)


def best_lrs(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, scale, dataset, optimizer): its best eligible LR cell.

    Adds the optimizer's totals over its whole grid: n_lrs, n_runs_total, n_diverged_total,
    n_failed_total. ``lr`` and the statistics are NaN when no cell is eligible.
    """
    rows = []
    for _, group in cells.groupby([*EXP_KEYS, "optimizer"], sort=False):
        eligible = group[group["eligible"]].sort_values("lr", kind="stable")
        if eligible.empty:
            row = group.iloc[0].copy()
            for col in (
                "lr",
                "val_loss_mean",
                "val_loss_std",
                "val_loss_spread",
                "metric_mean",
                "metric_std",
            ):
                row[col] = math.nan
            row["n_runs"] = row["n_seeds"] = row["n_diverged"] = row["n_failed"] = 0
            row["eligible"] = False
        else:
            row = eligible.loc[eligible["val_loss_mean"].idxmin()].copy()
        row["n_lrs"] = len(group)
        row["n_runs_total"] = int(group["n_runs"].sum())
        row["n_diverged_total"] = int(group["n_diverged"].sum())
        row["n_failed_total"] = int(group["n_failed"].sum())
        rows.append(row)
    if not rows:
        return pd.DataFrame(
            columns=[
                *(c for c in cells.columns if c != "eligible"),
                "n_lrs",
                "n_runs_total",
                "n_diverged_total",
                "n_failed_total",
            ]
        )
    best = pd.DataFrame(rows).drop(columns="eligible")
    return _sort(best, (*EXP_KEYS, "optimizer"))


def resolve_targets(
    best: pd.DataFrame, targets: Mapping[str, float] | None = None, factor: float = TARGET_FACTOR
) -> pd.DataFrame:
    """Target validation loss per experiment (columns: EXP_KEYS, target, target_rule).

    ``targets`` maps experiment names to explicit target losses; the others get the default
    rule of the module docstring with ``factor``.
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"target factor {factor!r} must be a finite number > 0")
    targets = dict(targets or {})
    known = sorted(set(best["experiment"]))
    for name, value in targets.items():
        if name not in known:
            raise ValueError(
                f"target given for unknown experiment {name!r}; "
                f"experiments here: {', '.join(known) or 'none'}"
            )
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"target for {name!r} is {value!r}; expected a finite number")
    rows = []
    for key, group in best.groupby(list(EXP_KEYS), sort=False):
        name = key[0]
        ref = group.loc[group["optimizer"] == REFERENCE_OPTIMIZER, "val_loss_mean"]
        ref = ref[np.isfinite(ref.to_numpy(float))]
        finite = group["val_loss_mean"][np.isfinite(group["val_loss_mean"].to_numpy(float))]
        if name in targets:
            target, rule = float(targets[name]), "set explicitly"
        elif len(ref):
            target = float(ref.iloc[0]) * factor
            rule = f"best {optimizer_label(REFERENCE_OPTIMIZER)} final val loss × {factor:g}"
        elif len(finite):
            target = float(finite.max()) * factor
            rule = (
                f"worst best-LR final val loss × {factor:g} "
                f"(no eligible {optimizer_label(REFERENCE_OPTIMIZER)} LR)"
            )
        else:
            target, rule = math.nan, "no optimizer has an eligible learning rate"
        rows.append([*key, target, rule])
    return pd.DataFrame(rows, columns=[*EXP_KEYS, "target", "target_rule"])


def time_to_target(metrics: pd.DataFrame, targets: pd.DataFrame) -> pd.DataFrame:
    """Per run: the first validation row with loss ≤ its experiment's target.

    Columns: run, steps_to_target, time_to_target (the row's train_time). Runs that never
    reach the target are absent.
    """
    val = metrics[metrics["split"] == "val"].merge(
        targets[[*EXP_KEYS, "target"]], on=list(EXP_KEYS)
    )
    hit = val[val["loss"] <= val["target"]].sort_values(["run", "step"], kind="stable")
    first = hit.groupby("run", sort=False).head(1)
    return (
        first[["run", "step", "train_time"]]
        .rename(columns={"step": "steps_to_target", "train_time": "time_to_target"})
        .reset_index(drop=True)
    )


def _cell_runs(runs: pd.DataFrame, row: Mapping[str, Any]) -> pd.DataFrame:
    """The runs of ``row``'s cell that enter its statistics, ordered by seed."""
    mask = np.ones(len(runs), dtype=bool)
    for key in CELL_KEYS:
        mask &= (runs[key] == row[key]).to_numpy()
    cell = runs[mask & (runs["status"] != "failed").to_numpy() & ~runs["diverged"].to_numpy()]
    return cell[np.isfinite(cell["val_loss"].to_numpy(float))].sort_values("seed")


def _add_time_to_target(
    best: pd.DataFrame, runs: pd.DataFrame, targets: pd.DataFrame
) -> pd.DataFrame:
    best = best.merge(targets, on=list(EXP_KEYS), how="left")
    extra = []
    for row in best.to_dict("records"):
        cell = _cell_runs(runs, row) if math.isfinite(row["lr"]) else runs.iloc[:0]
        reached = cell[np.isfinite(cell["steps_to_target"].to_numpy(float))]
        steps = _mean_std(reached["steps_to_target"].to_numpy(float))
        times = _mean_std(reached["time_to_target"].to_numpy(float))
        extra.append([*steps, *times, len(reached)])
    cols = [
        "steps_to_target_mean",
        "steps_to_target_std",
        "time_to_target_mean",
        "time_to_target_std",
        "n_reached",
    ]
    return pd.concat([best.reset_index(drop=True), pd.DataFrame(extra, columns=cols)], axis=1)


def compare(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Welch t, Mann-Whitney U (two-sided) and effect sizes of samples ``x`` vs ``y``.

    Returns n, n_baseline, mean_diff (mean x − mean y), cohen_d (pooled sd), hedges_g,
    welch_t, welch_p, mwu_u, mwu_p; everything but the counts (and mean_diff when both
    samples are non-empty) is NaN when either sample has fewer than 2 values.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = dict(
        n=len(a),
        n_baseline=len(b),
        mean_diff=math.nan,
        cohen_d=math.nan,
        hedges_g=math.nan,
        welch_t=math.nan,
        welch_p=math.nan,
        mwu_u=math.nan,
        mwu_p=math.nan,
    )
    if len(a) and len(b):
        out["mean_diff"] = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return out
    dof = len(a) + len(b) - 2
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / dof)
    if pooled > 0:
        out["cohen_d"] = out["mean_diff"] / pooled
        out["hedges_g"] = out["cohen_d"] * (1 - 3 / (4 * dof - 1))
    with warnings.catch_warnings():
        # Identical samples give NaN statistics with a warning; NaN is the answer we report.
        warnings.simplefilter("ignore")
        welch = stats.ttest_ind(a, b, equal_var=False)
        mwu = stats.mannwhitneyu(a, b, alternative="two-sided")
    out.update(
        welch_t=float(welch.statistic),
        welch_p=float(welch.pvalue),
        mwu_u=float(mwu.statistic),
        mwu_p=float(mwu.pvalue),
    )
    return out


def significance(runs: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """Each LEHI variant vs each baseline, both at their best LR, per experiment."""
    columns = [
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
    ]
    rows = []
    for key, group in best.groupby(list(EXP_KEYS), sort=False):
        by_opt = {r["optimizer"]: r for r in group.to_dict("records")}
        for cand in CANDIDATES:
            for base in BASELINES:
                if cand not in by_opt or base not in by_opt:
                    continue
                c, b = by_opt[cand], by_opt[base]
                if not (math.isfinite(c["lr"]) and math.isfinite(b["lr"])):
                    continue  # a side without an eligible LR has nothing to compare
                result = compare(
                    list(_cell_runs(runs, c)["val_loss"]), list(_cell_runs(runs, b)["val_loss"])
                )
                rows.append([*key, cand, base, c["lr"], b["lr"], *(result[k] for k in columns[7:])])
    return pd.DataFrame(rows, columns=columns)


def select_experiment(frame: pd.DataFrame, exp: Mapping[str, Any]) -> pd.DataFrame:
    """Rows of ``frame`` that belong to experiment ``exp`` (a mapping with the EXP_KEYS)."""
    mask = np.ones(len(frame), dtype=bool)
    for key in EXP_KEYS:
        mask &= (frame[key] == exp[key]).to_numpy()
    return frame[mask]


@dataclass(frozen=True)
class Results:
    """Every table the summary and the figures need, computed once from a results tree."""

    root: Path
    runs: pd.DataFrame  # one row per run, plus steps_to_target / time_to_target
    metrics: pd.DataFrame  # tidy metrics.csv rows with run keys
    cells: pd.DataFrame  # one row per (experiment, scale, dataset, optimizer, lr)
    best: pd.DataFrame  # best LR per (experiment, scale, dataset, optimizer) + time to target
    targets: pd.DataFrame  # target loss per experiment and the rule that set it
    significance: pd.DataFrame  # LEHI variants vs baselines at their best LRs

    @property
    def empty(self) -> bool:
        """True when no finished run was found."""
        return self.runs.empty

    def experiments(self) -> list[dict[str, str]]:
        """Experiments in display order: dicts with experiment, scale, dataset, metric_name."""
        if self.cells.empty:
            return []
        first = self.cells.groupby(list(EXP_KEYS), sort=True)["metric_name"].first()
        return [
            dict(zip((*EXP_KEYS, "metric_name"), (*k, m), strict=True)) for k, m in first.items()
        ]


def collect(
    root: str | Path,
    targets: Mapping[str, float] | None = None,
    target_factor: float = TARGET_FACTOR,
) -> Results:
    """Load the tree under ``root`` and compute every table (see the module docstring)."""
    root = Path(root)
    runs = load_runs(root)
    metrics = load_metrics(root, runs)
    cells = aggregate(runs)
    best = best_lrs(cells)
    target_table = resolve_targets(best, targets, target_factor)
    ttt = time_to_target(metrics, target_table)
    runs = runs.merge(ttt, on="run", how="left")
    best = _add_time_to_target(best, runs, target_table)
    return Results(
        root=root,
        runs=runs,
        metrics=metrics,
        cells=cells,
        best=best,
        targets=target_table,
        significance=significance(runs, best),
    )


# -------------------------------------------------------------------------- summary


def _fmt(value: float, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def _pm(mean: float, std: float, spec: str = ".4g") -> str:
    """``mean ± std``; the std with 2 significant digits (it is only known that well)."""
    if not math.isfinite(mean):
        return "—"
    return f"{mean:{spec}} ± {std:.2g}" if math.isfinite(std) else f"{mean:{spec}}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def experiment_heading(experiment: str, scale: str, dataset: str, metric_name: str) -> str:
    """Heading/title text of an experiment; names the scale so small runs are labelled."""
    metric = f" · metric: {metric_name}" if metric_name else ""
    return f"{experiment} — scale: {scale_label(scale)} · dataset: {dataset}{metric}"


def render_markdown(results: Results) -> str:
    """The Markdown summary: one table per experiment, then its significance table."""
    n_runs = len(results.runs)
    lines = [
        "# Results summary",
        "",
        f"{n_runs} finished run(s) under `{results.root}`. Final validation loss = mean "
        "over a run's last 3 evaluations; mean ± sample std over seeds at each optimizer's "
        "best learning rate (lowest mean among LRs where no seed diverged). Metric = last "
        "evaluation. Time to target = first evaluation with validation loss ≤ target: its "
        "step and training time (curvature passes included, evaluation excluded), mean ± std "
        "over the seeds that reached it (reached/seeds). Diverged = runs that diverged over "
        "the optimizer's whole LR grid.",
        "",
    ]
    for exp in results.experiments():
        best = select_experiment(results.best, exp)
        target = select_experiment(results.targets, exp).iloc[0]
        metric = METRIC_LABELS.get(exp["metric_name"], exp["metric_name"] or "metric")
        lines += [
            f"## {experiment_heading(**exp)}",
            "",
            f"Target validation loss: {_fmt(target['target'])} ({target['target_rule']}).",
            "",
        ]
        rows = []
        for r in best.to_dict("records"):
            reached = f" ({r['n_reached']}/{r['n_seeds']})" if r["n_seeds"] else ""
            diverged = f"{r['n_diverged_total']}/{r['n_runs_total']}"
            if r["n_failed_total"]:
                diverged += f" ({r['n_failed_total']} failed)"
            rows.append(
                [
                    optimizer_label(r["optimizer"]),
                    _fmt(r["lr"], "g"),
                    _pm(r["val_loss_mean"], r["val_loss_std"]),
                    _pm(r["metric_mean"], r["metric_std"]),
                    str(r["n_seeds"]),
                    _pm(r["steps_to_target_mean"], r["steps_to_target_std"], ".4g") + reached,
                    _pm(r["time_to_target_mean"], r["time_to_target_std"], ".3g") + reached,
                    diverged,
                ]
            )
        lines += _table(
            [
                "optimizer",
                "best lr",
                "final val loss (mean ± std)",
                f"val {metric} (mean ± std)",
                "seeds",
                "steps to target",
                "train time to target (s)",
                "diverged / runs",
            ],
            rows,
        )
        sig = select_experiment(results.significance, exp)
        if not sig.empty:
            lines += [
                "",
                f"Significance ({exp['experiment']}, scale: {scale_label(exp['scale'])})"
                ": per-seed final val losses at each optimizer's best LR; mean diff < 0 "
                "means the LEHI variant is lower; p-values two-sided; — where a side has "
                "fewer than 2 seeds.",
                "",
            ]
            srows = [
                [
                    f"{optimizer_label(s['optimizer'])} vs {optimizer_label(s['baseline'])}",
                    f"{_fmt(s['lr'], 'g')} / {_fmt(s['baseline_lr'], 'g')}",
                    f"{s['n']} / {s['n_baseline']}",
                    _fmt(s["mean_diff"], ".3g"),
                    _fmt(s["hedges_g"], ".3g"),
                    _fmt(s["cohen_d"], ".3g"),
                    _fmt(s["welch_p"], ".3g"),
                    _fmt(s["mwu_p"], ".3g"),
                ]
                for s in sig.to_dict("records")
            ]
            lines += _table(
                [
                    "comparison",
                    "lr (variant / baseline)",
                    "seeds",
                    "mean diff (val loss)",
                    "Hedges g",
                    "Cohen d",
                    "Welch t-test p",
                    "Mann–Whitney U p",
                ],
                srows,
            )
        lines.append("")
    return "\n".join(lines)


def write_summary(
    root: str | Path = "results",
    results: Results | None = None,
    *,
    targets: Mapping[str, float] | None = None,
    target_factor: float = TARGET_FACTOR,
) -> list[Path]:
    """Write ``<root>/summary.csv`` (best-LR rows), ``<root>/significance.csv`` and
    ``<root>/summary.md``, each atomically; returns their paths.

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
    return paths


def parse_target(text: str) -> tuple[str, float]:
    """``EXP=VALUE`` -> (EXP, VALUE); ValueError with one line otherwise."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise ValueError(f"--target {text!r}: expected EXPERIMENT=LOSS, e.g. digits=0.12") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lehi.results [--root results] [--target EXP=LOSS ...] [--target-factor F]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lehi.results", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="EXP=LOSS",
        help="explicit target validation loss for an experiment (repeatable)",
    )
    parser.add_argument(
        "--target-factor",
        type=float,
        default=TARGET_FACTOR,
        help=f"default target = best Adam final val loss × this (default {TARGET_FACTOR})",
    )
    args = parser.parse_args(argv)
    try:
        targets = dict(parse_target(t) for t in args.target)
        paths = write_summary(args.root, targets=targets, target_factor=args.target_factor)
    except (ValueError, FileNotFoundError) as exc:
        print(exc, file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
