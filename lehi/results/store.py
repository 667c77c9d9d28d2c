"""Runs and their metrics as pandas tables, read through the run record (:mod:`lehi.record`).

Every folder under the root that holds a summary.json is a finished run. A run's keys come
from its record (summary.json, then config.yaml), never from its path. A malformed file is
reported with a one-line warning naming it (logger ``lehi.results``) and that run, or that
run's curves, is left out; the rest goes on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lehi import roster
from lehi.record import METRIC_COLUMNS, RunRecord, find_runs, identity_hash

log = logging.getLogger("lehi.results")

STATUSES = ("completed", "diverged", "failed")
RUN_KEYS = ("experiment", "scale", "dataset", "optimizer", "lr", "seed")
EXP_KEYS = ("experiment", "scale", "dataset")
CELL_KEYS = (*EXP_KEYS, "optimizer", "lr")

RUN_COLUMNS = (
    *RUN_KEYS,
    "optimizer_name",
    "identity",
    "variant",
    "status",
    "diverged",
    "trained",
    "divergence",
    "max_spike",
    "divergence_factor",
    "metric_name",
    "val_loss",
    "val_loss_last3_std",
    "last3_n",
    "initial_val_loss",
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
    "git_commit",
    "git_dirty",
    "run",
    "path",
)
_SUMMARY_NUMBERS = (
    "steps",
    "epochs",
    "wall_time",
    "train_time",
    "steps_per_s",
    "curvature_passes",
    "diverged_at_step",
    "max_spike",
)


class Malformed(Exception):
    """A run file that cannot be used; the message is the one-line reason."""


def warn(path: Path, reason: object, action: str = "skipping") -> None:
    """One-line warning naming the file (parser messages span lines; the report must not)."""
    log.warning("lehi.results: %s %s: %s", action, path, " ".join(str(reason).split()))


def _number(value: Any, where: str) -> float:
    """JSON number -> float; null (the trainer's encoding of non-finite values) -> NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Malformed(f"{where} is {value!r}, expected a number or null")
    return float(value)


def _section(summary: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = summary.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Malformed(f"{key!r} is {type(value).__name__}, expected an object or null")
    return value


def _get(cfg: Mapping[str, Any], *keys: str) -> Any:
    node: Any = cfg
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _config_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The reader's keys from a run's config (None where absent)."""
    return {
        "experiment": _get(cfg, "experiment", "name"),
        "scale": _get(cfg, "experiment", "scale"),
        "dataset": _get(cfg, "dataset", "name"),
        # summary.json's "optimizer" is the label (the folder's name); the roster's is the name
        "optimizer": _get(cfg, "optimizer", "label"),
        "lr": _get(cfg, "optimizer", "lr"),
        "seed": _get(cfg, "seed"),
    }


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "lr":
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return str(a) == str(b)


def _run_keys(summary: Mapping[str, Any], cfg: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """Run keys from summary.json, filled in (and cross-checked) from config.yaml."""
    from_config = _config_keys(cfg)
    keys: dict[str, Any] = {}
    for key in RUN_KEYS:
        value, other = summary.get(key), from_config.get(key)
        if value is None:
            value = other
        elif other is not None and not _same(key, value, other):
            log.warning(
                "lehi.results: %s: %s is %r there but %r in summary.json; using summary.json",
                where,
                key,
                other,
                value,
            )
        if value is None:
            raise Malformed(f"key {key!r} is in neither summary.json nor config.yaml")
        keys[key] = value
    try:
        keys["lr"] = float(keys["lr"])
        if isinstance(keys["seed"], bool):
            raise ValueError
        keys["seed"] = int(keys["seed"])
    except (TypeError, ValueError) as exc:
        raise Malformed(f"lr {keys['lr']!r} / seed {keys['seed']!r} are not numbers") from exc
    for key in ("experiment", "scale", "dataset", "optimizer"):
        keys[key] = str(keys[key])
    return keys


def _identity(summary: Mapping[str, Any], cfg: Mapping[str, Any]) -> tuple[str, str]:
    """(identity, variant): the run's identity hash and that of its config minus lr and seed.

    Runs of one optimizer label that differ in variant were made with different settings:
    pooling them over seeds or LRs would mix two optimizers.
    """
    if not cfg:
        return str(summary.get("identity") or ""), ""
    bare = {k: v for k, v in cfg.items() if k != "seed"}
    if isinstance(bare.get("optimizer"), Mapping):
        bare["optimizer"] = {k: v for k, v in bare["optimizer"].items() if k != "lr"}
    return str(summary.get("identity") or identity_hash(cfg)), identity_hash(bare)


def _run_row(record: RunRecord, root: Path) -> dict[str, Any]:
    summary = record.read_summary()
    if summary is None:
        raise Malformed("not a JSON object (unreadable or invalid JSON)")
    status = summary.get("status")
    if status not in STATUSES:
        raise Malformed(f"status {status!r} is not one of {', '.join(STATUSES)}")
    cfg = record.read_config() or {}
    if not cfg and record.config.exists():
        warn(record.config, "not a YAML mapping; using the keys of summary.json", "ignoring")
    row = _run_keys(summary, cfg, record.config)
    final, best, last3, initial = (
        _section(summary, k) for k in ("final", "best", "last3", "initial")
    )
    env = record.read_env() or {}
    row["identity"], row["variant"] = _identity(summary, cfg)
    row.update(
        optimizer_name=str(
            summary.get("optimizer_name") or _get(cfg, "optimizer", "name") or row["optimizer"]
        ),
        status=status,
        divergence=str(summary.get("divergence") or ""),
        divergence_factor=_number(_get(cfg, "trainer", "divergence_factor"), "divergence_factor"),
        metric_name=str(summary.get("metric") or ""),
        val_loss=_number(last3.get("val_loss_mean"), "last3.val_loss_mean"),
        val_loss_last3_std=_number(last3.get("val_loss_std"), "last3.val_loss_std"),
        last3_n=_number(last3.get("n"), "last3.n"),
        initial_val_loss=_number(initial.get("val_loss"), "initial.val_loss"),
        final_val_loss=_number(final.get("val_loss"), "final.val_loss"),
        final_val_metric=_number(final.get("val_metric"), "final.val_metric"),
        final_train_loss=_number(final.get("train_loss"), "final.train_loss"),
        best_val_loss=_number(best.get("val_loss"), "best.val_loss"),
        best_val_metric=_number(best.get("val_metric"), "best.val_metric"),
        best_step=_number(best.get("step"), "best.step"),
        error=str(summary.get("error") or ""),
        git_commit=str(env.get("git_commit") or ""),
        git_dirty=env.get("git_dirty") if isinstance(env.get("git_dirty"), bool) else None,
        run=record.dir.relative_to(root).as_posix(),
        path=str(record.dir),
    )
    for key in _SUMMARY_NUMBERS:
        row[key] = _number(summary.get(key), key)
    return row


#: A run *trained* when its last validation loss is at most this fraction of its initial one
#: (at least 10 % below where it started): stricter than not diverging, which a run stuck at
#: chance a hair below its start satisfies.
TRAINED_FRACTION = 0.9


def spiked(runs: pd.DataFrame) -> np.ndarray:
    """Runs whose training loss once rose above their divergence factor × its initial value
    (``max_spike``); an unknown spike or factor (older summaries) counts as no spike."""
    with np.errstate(invalid="ignore"):
        return runs["max_spike"].to_numpy(float) > runs["divergence_factor"].to_numpy(float)


def classify(runs: pd.DataFrame) -> pd.DataFrame:
    """Set ``diverged``, ``divergence`` and ``trained`` from the recorded facts: the rules that
    the finished rows decide, judged here so that changing one never changes a run.

    Diverged: the trainer stopped it early (status ``diverged``: non-finite, or held above the
    divergence factor); or it ran to its budget and its final validation loss is not finite
    (``non_finite``), or its last evaluation is above its initial one (``no_progress``; older
    summaries have no ``initial.val_loss``, see :func:`add_initial_val_loss`), or its training
    loss once rose above the divergence factor × its initial value (``max_spike``) and it never
    trained after (``blown_up``: a spike that left it at chance, a hair below where it began,
    is not a recovery). Trained: not diverged, and the last evaluation ≤
    :data:`TRAINED_FRACTION` × the initial one.
    """
    if runs.empty:
        return runs.assign(diverged=pd.Series(dtype=bool), trained=pd.Series(dtype=bool))
    completed = (runs["status"] == "completed").to_numpy()
    final = runs["final_val_loss"].to_numpy(float)
    initial = runs["initial_val_loss"].to_numpy(float)
    bar = TRAINED_FRACTION * initial
    non_finite = completed & ~np.isfinite(runs["val_loss"].to_numpy(float))
    no_progress = completed & ~non_finite & (final > initial)
    with np.errstate(invalid="ignore"):  # an unknown initial loss decides nothing
        blown_up = completed & ~non_finite & ~no_progress & spiked(runs) & (final > bar)
    divergence = runs["divergence"].where(~non_finite, "non_finite")
    divergence = divergence.where(~no_progress, "no_progress")
    divergence = divergence.where(~blown_up, "blown_up")
    diverged = (runs["status"] == "diverged").to_numpy() | non_finite | no_progress | blown_up
    trained = completed & ~diverged & (final <= bar)
    return runs.assign(diverged=diverged, divergence=divergence, trained=trained)


def sort_frame(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Sort by ``keys``, the optimizer in roster order (needs ``optimizer_name`` when present)."""
    if frame.empty:
        return frame.reset_index(drop=True)
    names = frame["optimizer_name"] if "optimizer_name" in frame else frame["optimizer"]
    rank = [roster.rank(a, b) for a, b in zip(frame["optimizer"], names, strict=True)]
    order = frame.assign(_rank=rank).sort_values(
        [k if k != "optimizer" else "_rank" for k in keys], kind="stable"
    )
    return order.drop(columns="_rank").reset_index(drop=True)


def _warn_mixed(runs: pd.DataFrame) -> None:
    for (exp, label), group in runs.groupby(["experiment", "optimizer"], sort=True):
        variants = sorted(v for v in set(group["variant"]) if v)
        if len(variants) > 1:
            log.warning(
                "lehi.results: %s/%s holds runs of %d different configs (%s); they are pooled. "
                "Give each its own optimizer.label to compare them",
                exp,
                label,
                len(variants),
                ", ".join(variants),
            )


def load_runs(root: str | Path) -> pd.DataFrame:
    """One row per finished run under ``root`` (columns: ``RUN_COLUMNS``).

    Values come from summary.json (nulls -> NaN); run keys missing there are taken from
    config.yaml. ``optimizer`` is the run's label, ``optimizer_name`` its roster name,
    ``val_loss`` its final validation loss (last-3 mean), ``diverged`` follows
    :func:`classify`, ``run`` is the folder relative to ``root``.
    """
    root = Path(root)
    rows: list[dict[str, Any]] = []
    for record in find_runs(root):
        try:
            rows.append(_run_row(record, root))
        except Malformed as exc:
            warn(record.summary, exc)
    in_progress = [
        p.parent for p in root.rglob("config.yaml") if not (p.parent / "summary.json").exists()
    ]
    if in_progress:
        log.info(
            "lehi.results: %d run folder(s) without summary.json (in progress) skipped",
            len(in_progress),
        )
    runs = pd.DataFrame(rows, columns=[c for c in RUN_COLUMNS if c not in ("diverged", "trained")])
    dup = runs.duplicated(list(RUN_KEYS), keep="first")
    for path in runs.loc[dup, "path"]:
        warn(
            Path(path),
            "another folder holds the same experiment/optimizer label/lr/seed with a "
            "different config; give one an optimizer.label of its own",
        )
    runs = classify(runs.loc[~dup])
    if not runs.empty:
        runs = runs.astype({"lr": float, "seed": int, "diverged": bool, "trained": bool})
        _warn_mixed(runs)
    return sort_frame(runs[list(RUN_COLUMNS)], RUN_KEYS)


def _read_metrics(record: RunRecord) -> pd.DataFrame:
    if not record.metrics.exists():
        raise Malformed("file missing (the run has a summary.json)")
    try:
        rows = record.read_metrics()
    except KeyError as exc:
        raise Malformed(f"missing column {exc}; expected {', '.join(METRIC_COLUMNS)}") from None
    except (ValueError, TypeError) as exc:
        raise Malformed(f"non-numeric value ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Malformed(f"not a readable CSV ({exc})") from None
    frame = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    frame = frame.astype({c: (str if c == "split" else float) for c in METRIC_COLUMNS})
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
    keys = (*RUN_KEYS, "run")
    columns = [*keys, *("step_lr" if c == "lr" else c for c in METRIC_COLUMNS)]
    frames: list[pd.DataFrame] = []
    values: list[list[Any]] = []
    for run in runs[[*keys, "path"]].to_dict("records"):
        record = RunRecord(run["path"])
        try:
            frame = _read_metrics(record).rename(columns={"lr": "step_lr"})
        except Malformed as exc:
            warn(record.metrics, exc)
            continue
        frames.append(frame)
        values.append([run[k] for k in keys])
    if not frames:
        return pd.DataFrame(columns=columns)
    # Keys are repeated once for the whole table: far faster than per-frame assignment.
    lengths = [len(f) for f in frames]
    metrics = pd.concat(frames, ignore_index=True)
    for i, key in enumerate(keys):
        metrics[key] = np.repeat(np.array([v[i] for v in values], dtype=object), lengths)
    metrics = metrics.astype({"lr": float, "seed": int})
    return metrics[columns]


def add_initial_val_loss(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Fill ``initial_val_loss`` of summaries that lack it from metrics.csv's step-0 val row,
    then classify again (older summaries record no initial loss)."""
    missing = ~np.isfinite(runs["initial_val_loss"].to_numpy(float))
    if not missing.any() or metrics.empty:
        return runs
    first = metrics[(metrics["split"] == "val") & (metrics["step"] == 0)]
    initial = first.groupby("run", sort=False)["loss"].first()
    filled = runs["run"].map(initial).astype(float)
    runs = runs.assign(initial_val_loss=runs["initial_val_loss"].where(~missing, filled))
    return classify(runs)
