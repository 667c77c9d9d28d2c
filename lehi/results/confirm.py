"""Tuning and measuring kept apart: ``python -m lehi.results tune EXP``.

The tuning sweep of a workload (``experiments/<exp>.yaml``, seeds 0, 1 or 0–2) chooses each
optimizer's learning rate: the best LR of :func:`lehi.results.stats.best_lrs` (lowest mean final
validation loss among the LRs where no tuning seed diverged). LEHI's stable reading
``lehi_update_clip`` is tuned on the workload's ablation sweep (``ablation_<exp>``, the same
workload under the ablation's LR grid) when there is one.

This module writes the confirmation preset ``experiments/confirm_<exp>.yaml``: the workload's
own preset (same data, model, budget, data order per seed) with the tuned LR of each reading
(``experiment.tuned_lr``), where and how it was chosen (``experiment.tuned_from``), and a sweep over the readings ×
:data:`CONFIRM_SEEDS` fresh seeds, none of them a tuning seed. Its runs are ordinary run folders
of experiment ``confirm_<exp>``; only they enter the verdicts (lehi.results.verdicts).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import yaml

from lehi.results.ablation import ABLATION_PREFIX
from lehi.results.tables import Results, collect

__all__ = [
    "CONFIRM_READINGS",
    "CONFIRM_SEEDS",
    "confirm_name",
    "confirmed_workload",
    "optimizer_name",
    "preset",
    "tuned_lrs",
    "tuning_experiment",
]

#: The readings confirmed (conf/reading/): the five optimizers and the ablation's stable one.
CONFIRM_READINGS = ("adam", "adamw", "lehi", "lehibrid", "sophia", "lehi_update_clip")
#: Fresh seeds per reading.
CONFIRM_SEEDS = 8
#: Readings tuned on the workload's ablation sweep instead of its main sweep.
ABLATION_ONLY = ("lehi_update_clip",)
#: The tuning rule in words (stats.best_lrs is the rule itself). ``tune`` writes it into the
#: preset as ``experiment.tuned_from.rule``, which is part of a confirmation run's identity:
#: rewording it and tuning again gives every later confirmation run a new identity.
RULE = (
    "lowest mean final val loss (mean of the last 3 evaluations) over the tuning seeds, "
    "among the LRs where no tuning seed diverged"
)


class TuneError(ValueError):
    """A workload that cannot be tuned; the message is one line."""


def optimizer_name(reading: str) -> str:
    """The optimizer a reading runs (its conf/reading/ preset's ``optimizer.name``): the
    ``lehi_*`` readings are LEHI under one of its options."""
    return "lehi" if reading.startswith("lehi_") else reading


CONFIRM_PREFIX = "confirm_"


def confirm_name(experiment: str) -> str:
    return f"{CONFIRM_PREFIX}{experiment}"


def confirmed_workload(experiment: str) -> str | None:
    """The workload a confirmation experiment confirms (``confirm_digits`` → ``digits``), or
    None for any other experiment."""
    experiment = str(experiment)
    return (
        experiment.removeprefix(CONFIRM_PREFIX) if experiment.startswith(CONFIRM_PREFIX) else None
    )


def tuning_experiment(workload: str, reading: str) -> str:
    """The sweep that tunes ``reading`` on ``workload``: its ablation for :data:`ABLATION_ONLY`
    readings, else the workload's own."""
    return f"{ABLATION_PREFIX}{workload}" if reading in ABLATION_ONLY else workload


def tuned_lrs(results: Results, experiment: str) -> dict[str, dict[str, Any]]:
    """Per reading: its tuned LR, the tuning experiment, seeds and runs it came from."""
    tuned: dict[str, dict[str, Any]] = {}
    for reading in CONFIRM_READINGS:
        source = tuning_experiment(experiment, reading)
        best = results.best
        row = best[(best["experiment"] == source) & (best["optimizer"] == reading)]
        if row.empty or not math.isfinite(float(row["lr"].iloc[0])):
            continue
        lr = float(row["lr"].iloc[0])
        runs = results.runs
        used = runs[
            (runs["experiment"] == source) & (runs["optimizer"] == reading) & (runs["lr"] == lr)
        ]
        tuned[reading] = {
            "lr": lr,
            "experiment": source,
            "seeds": sorted(int(s) for s in used["seed"]),
            "val_loss": float(row["val_loss_mean"].iloc[0]),
        }
    return tuned


def preset(repo: Path, results_root: Path, experiment: str) -> tuple[Path, str]:
    """The confirmation preset of ``experiment``: its path and YAML text."""
    base = repo / "experiments" / f"{experiment}.yaml"
    if not base.is_file():
        raise TuneError(f"no preset {base}: tune one of the experiments in experiments/")
    spec = yaml.safe_load(base.read_text())
    results = collect(results_root)
    tuned = tuned_lrs(results, experiment)
    if "adam" not in tuned:
        raise TuneError(f"{results_root}/{experiment} has no tuned Adam: run its sweep first")
    tuning_seeds = sorted({s for t in tuned.values() for s in t["seeds"]})
    first = max(tuning_seeds) + 1
    seeds = list(range(first, first + CONFIRM_SEEDS))
    name = confirm_name(experiment)
    spec["experiment"] = {
        **spec["experiment"],
        "name": name,
        "tuned_from": {
            "experiment": experiment,
            "rule": RULE,
            "sources": {r: f"{t['experiment']} seeds {t['seeds']}" for r, t in tuned.items()},
        },
        "tuned_lr": {r: t["lr"] for r, t in tuned.items()},
    }
    lr = "${experiment.tuned_lr.${optimizer.label}}"
    spec["optimizer"] = {**spec.get("optimizer", {}), "lr": lr}
    spec["hydra"] = {
        "sweeper": {
            "params": {
                "reading": ",".join(tuned),
                "seed": ",".join(str(s) for s in seeds),
            }
        }
    }
    missing = [r for r in CONFIRM_READINGS if r not in tuned]
    about = (
        f"Confirmation of {experiment}: each reading at its tuned LR on {CONFIRM_SEEDS} fresh "
        f"seeds ({seeds[0]}…{seeds[-1]}; tuning used {tuning_seeds}). Written by `python -m "
        f"lehi.results tune {experiment}` from results/; tuned LR = {RULE}. Everything else is "
        f"experiments/{experiment}.yaml's, so budget and data order per seed are the tuning "
        "sweep's."
    )
    if missing:
        about += f" Not confirmed here (no tuning runs): {', '.join(missing)}."
    header = ["# @package _global_", *(f"# {line}" for line in textwrap.wrap(about, 96))]
    body = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)
    return repo / "experiments" / f"{name}.yaml", "\n".join(header) + "\n" + body
