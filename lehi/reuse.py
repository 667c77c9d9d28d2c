"""Reusing another experiment's run that computed exactly this one.

An ablation's reference readings (Adam, LEHI, LEHIBrid) are often the main sweep's runs under
another experiment name: the same data, model, optimizer, budget and seed, so the same
numbers. ``experiment.reuse_from: [ptb_small]`` lets such a run adopt the finished run of the
named experiment instead of training it again. The rule is strict: the two configs must agree
on every identity key outside the ``experiment`` section (which names and documents a sweep
and computes nothing), and the source must be a finished result of a clean tree.

The adopted folder says so: its config.yaml is this run's own config; metrics.csv is the
source's; env.json is the source's (the commit and machine that made the numbers);
summary.json is the source's with this run's identity and ``reused_from`` (the source folder,
relative to the results root). ``make verify`` replays such a run from its own config like
any other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lehi.io import atomic_write_text
from lehi.record import RunRecord, identity, identity_hash

__all__ = ["adopt", "computation", "reusable_source"]

log = logging.getLogger("lehi")

#: Summary statuses a run may be reused with (the runner's final statuses).
REUSABLE_STATUSES = ("completed", "diverged")


def computation(config: Mapping[str, Any]) -> dict[str, Any]:
    """The identity minus the ``experiment`` section: what the run computes."""
    kept = identity(config)
    kept.pop("experiment", None)
    return kept


def reusable_source(config: Mapping[str, Any], results_dir: str | Path) -> RunRecord | None:
    """A finished, clean run of one of ``experiment.reuse_from`` that computed ``config``."""
    wanted = computation(config)
    lr, seed = float(config["optimizer"]["lr"]), config["seed"]
    for experiment in config["experiment"].get("reuse_from") or ():
        pattern = f"*/lr={lr:g}/seed={seed}-*/summary.json"
        for summary_path in sorted((Path(results_dir) / experiment).glob(pattern)):
            source = RunRecord(summary_path.parent)
            summary, env = source.read_summary() or {}, source.read_env() or {}
            recorded = source.read_config()
            if (
                recorded is not None
                and summary.get("status") in REUSABLE_STATUSES
                and env.get("git_dirty") is False
                and computation(recorded) == wanted
            ):
                return source
    return None


def adopt(
    source: RunRecord, record: RunRecord, config: Mapping[str, Any], results_dir: str | Path
) -> dict[str, Any]:
    """Write ``source``'s result into ``record`` as the run of ``config``; returns its summary.

    Call under ``record``'s lock. The summary is written last: until then the folder is not a
    finished run, so a kill mid-way leaves a run that is adopted again (or trained) next time.
    """
    summary = dict(source.read_summary() or {})
    env = source.read_env() or {}
    summary.update(
        experiment=config["experiment"]["name"],
        scale=config["experiment"]["scale"],
        optimizer=config["optimizer"]["label"],
        identity=identity_hash(config),
        reused_from=str(source.dir.relative_to(Path(results_dir))),
    )
    record.dir.mkdir(parents=True, exist_ok=True)
    record.remove_stale_temp_files()
    record.write_config(config)
    record.write_env(env)
    atomic_write_text(record.metrics, source.metrics.read_text())  # the bytes themselves
    record.write_summary(summary)
    log.info("%s: reused %s (the same computation)", record.dir, source.dir)
    return summary
