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

An ablation's tuning seeds can put one of LEHI's other readings below Adam; that is a
description until fresh seeds say so. ``tune ablation_<exp>`` writes
``experiments/confirm_ablation_<exp>.yaml`` for it: the ablation's best LEHI reading among
those the confirmation does not run anyway (:func:`nominated`), when its tuning loss is below
the ablation's Adam, at its tuned LR on the seeds of ``confirm_<exp>`` (the same data order
as the baselines it is judged against). Its runs join ``confirm_<exp>``'s in the verdicts of
workload ``<exp>``.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import yaml

from lehi.results.ablation import ABLATION_PREFIX, is_ablation
from lehi.results.tables import Results, collect

__all__ = [
    "CONFIRM_READINGS",
    "CONFIRM_SEEDS",
    "confirm_name",
    "confirmation_experiments",
    "confirmed_workload",
    "is_nominee_confirmation",
    "nominated",
    "optimizer_name",
    "preset",
    "tuned_lrs",
    "tuning_experiment",
]

#: The readings confirmed (conf/reading/): the five optimizers and the ablation's stable one.
CONFIRM_READINGS = ("adam", "adamw", "lehi", "lehibrid", "sophia", "lehi_update_clip")
#: Fresh seeds per reading.
CONFIRM_SEEDS = 8
#: The tuning rule in words (stats.best_lrs is the rule itself). ``tune`` writes it into the
#: preset as ``experiment.tuned_from.rule``, which is part of a confirmation run's identity:
#: rewording it and tuning again gives every later confirmation run a new identity.
RULE = (
    "lowest mean final val loss (mean of the last 3 evaluations) over the tuning seeds, "
    "among the LRs where no tuning seed diverged"
)
#: Which of an ablation's readings its confirmation runs (:func:`nominated` is the rule).
NOMINATION = (
    "the ablation's LEHI reading with the lowest tuned loss among those the workload's "
    "confirmation does not run, if that loss is below the ablation's Adam's"
)


class TuneError(ValueError):
    """A workload that cannot be tuned; the message is one line."""


def optimizer_name(reading: str) -> str:
    """The optimizer a reading runs (its conf/reading/ preset's ``optimizer.name``): the
    ``lehi_*`` readings are LEHI under one of its options."""
    return "lehi" if reading.startswith("lehi_") else reading


CONFIRM_PREFIX = "confirm_"


def confirm_name(experiment: str) -> str:
    """``digits`` → ``confirm_digits``; ``ablation_digits`` → ``confirm_ablation_digits``."""
    return f"{CONFIRM_PREFIX}{experiment}"


def confirmed_workload(experiment: str) -> str | None:
    """The workload a confirmation experiment confirms (``confirm_digits`` and
    ``confirm_ablation_digits`` → ``digits``), or None for any other experiment."""
    experiment = str(experiment)
    if not experiment.startswith(CONFIRM_PREFIX):
        return None
    return experiment.removeprefix(CONFIRM_PREFIX).removeprefix(ABLATION_PREFIX)


def is_nominee_confirmation(experiment: str) -> bool:
    """Whether ``experiment`` confirms an ablation's nominee (``confirm_ablation_<exp>``): one
    reading, judged with its workload's confirmation, never on its own."""
    return str(experiment).startswith(confirm_name(ABLATION_PREFIX))


def confirmation_experiments(workload: str) -> tuple[str, str]:
    """The experiments whose runs confirm ``workload``: its own and its ablation's."""
    return confirm_name(workload), confirm_name(f"{ABLATION_PREFIX}{workload}")


def tuning_experiment(workload: str, reading: str) -> str:
    """The sweep that tunes ``reading`` on ``workload``: the workload's own for the optimizers
    of its sweep, its ablation for LEHI's other readings (``lehi_update_clip``, …)."""
    return workload if reading == optimizer_name(reading) else f"{ABLATION_PREFIX}{workload}"


def _tuned(results: Results, source: str, reading: str) -> dict[str, Any] | None:
    """``reading``'s tuned LR in sweep ``source``, the seeds and loss it came from."""
    best = results.best
    row = best[(best["experiment"] == source) & (best["optimizer"] == reading)]
    if row.empty or not math.isfinite(float(row["lr"].iloc[0])):
        return None
    lr = float(row["lr"].iloc[0])
    runs = results.runs
    used = runs[
        (runs["experiment"] == source) & (runs["optimizer"] == reading) & (runs["lr"] == lr)
    ]
    return {
        "lr": lr,
        "experiment": source,
        "seeds": sorted(int(s) for s in used["seed"]),
        "val_loss": float(row["val_loss_mean"].iloc[0]),
    }


def tuned_lrs(results: Results, experiment: str) -> dict[str, dict[str, Any]]:
    """Per reading: its tuned LR, the tuning experiment, seeds and runs it came from."""
    tuned = {r: _tuned(results, tuning_experiment(experiment, r), r) for r in CONFIRM_READINGS}
    return {r: t for r, t in tuned.items() if t is not None}


def nominated(results: Results, ablation: str) -> dict[str, dict[str, Any]]:
    """The reading of :data:`NOMINATION` in sweep ``ablation`` (empty when none qualifies),
    as :func:`tuned_lrs` gives it."""
    best = results.best
    adam = _tuned(results, ablation, "adam")
    others = [
        r
        for r in best.loc[best["experiment"] == ablation, "optimizer"]
        if r not in CONFIRM_READINGS and optimizer_name(r) == "lehi"
    ]
    tuned = {r: t for r in others if (t := _tuned(results, ablation, r)) is not None}
    if adam is None or not tuned:
        return {}
    reading = min(tuned, key=lambda r: tuned[r]["val_loss"])
    return {reading: tuned[reading]} if tuned[reading]["val_loss"] < adam["val_loss"] else {}


def _seeds(repo: Path, experiment: str) -> list[int]:
    spec = yaml.safe_load((repo / "experiments" / f"{experiment}.yaml").read_text())
    return [int(s) for s in str(spec["hydra"]["sweeper"]["params"]["seed"]).split(",")]


def preset(repo: Path, results_root: Path, experiment: str) -> tuple[Path, str]:
    """The confirmation preset of ``experiment`` (a workload, or its ablation): its path and
    YAML text."""
    base = repo / "experiments" / f"{experiment}.yaml"
    if not base.is_file():
        raise TuneError(f"no preset {base}: tune one of the experiments in experiments/")
    spec = yaml.safe_load(base.read_text())
    results = collect(results_root)
    name = confirm_name(experiment)
    if is_ablation(experiment):
        workload = experiment.removeprefix(ABLATION_PREFIX)
        if not (repo / "experiments" / f"{confirm_name(workload)}.yaml").is_file():
            raise TuneError(
                f"no experiments/{confirm_name(workload)}.yaml: tune {workload} first (its "
                "seeds are the ones the ablation's reading is confirmed on)"
            )
        tuned = nominated(results, experiment)
        if not tuned:
            raise TuneError(
                f"{results_root}/{experiment} nominates no reading ({NOMINATION}): nothing "
                "to confirm"
            )
        seeds = _seeds(repo, confirm_name(workload))
        rule = f"{RULE}; reading: {NOMINATION}"
        what = f"{experiment}'s nominated reading ({NOMINATION})"
        spec["experiment"].pop("reuse_from", None)  # fresh seeds: no run to adopt
    else:
        tuned = tuned_lrs(results, experiment)
        if "adam" not in tuned:
            raise TuneError(f"{results_root}/{experiment} has no tuned Adam: run its sweep first")
        first = max(s for t in tuned.values() for s in t["seeds"]) + 1
        seeds = list(range(first, first + CONFIRM_SEEDS))
        rule = RULE
        what = f"{experiment}: each reading"
    tuning_seeds = sorted({s for t in tuned.values() for s in t["seeds"]})
    spec["experiment"] = {
        **spec["experiment"],
        "name": name,
        "tuned_from": {
            "experiment": experiment,
            "rule": rule,
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
    about = (
        f"Confirmation of {what} at its tuned LR on {len(seeds)} fresh seeds ({seeds[0]}…"
        f"{seeds[-1]}; tuning used {tuning_seeds}). Written by `python -m lehi.results tune "
        f"{experiment}` from results/; tuned LR = {RULE}. Everything else is "
        f"experiments/{experiment}.yaml's, so budget and data order per seed are the tuning "
        "sweep's."
    )
    missing = [r for r in CONFIRM_READINGS if r not in tuned]
    if missing and not is_ablation(experiment):
        about += f" Not confirmed here (no tuning runs): {', '.join(missing)}."
    header = ["# @package _global_", *(f"# {line}" for line in textwrap.wrap(about, 96))]
    body = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)
    return repo / "experiments" / f"{name}.yaml", "\n".join(header) + "\n" + body
