"""Rerun a recorded run from its folder and compare: ``python -m lehi.rerun <run folder>``.

The folder's config.yaml is the run's whole identity; it is trained again, unchanged, into a
scratch results folder (runs/rerun by default, never the original), and the recorded and the
new final numbers are printed side by side.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lehi.record import RunRecord, identity_hash
from lehi.runner import BAD_INPUT, RunFailed, run

__all__ = ["main", "rerun_config"]

ROWS = (
    ("status", ("status",)),
    ("final val loss", ("final", "val_loss")),
    ("last-3 mean val loss", ("last3", "val_loss_mean")),
    ("final val metric", ("final", "val_metric")),
    ("steps", ("steps",)),
)


def rerun_config(
    config: dict[str, Any], results_dir: str, data_dir: str | None = None
) -> dict[str, Any]:
    """``config`` pointed at ``results_dir`` (and ``data_dir``), logging to files only."""
    config = {**config, "paths": dict(config["paths"]), "trainer": dict(config["trainer"])}
    config["paths"].update(results_dir=results_dir, run_dir=None)
    if data_dir is not None:
        old = str(config["paths"]["data_dir"])
        config["paths"]["data_dir"] = data_dir
        config["dataset"] = _replace_prefix(config["dataset"], old, data_dir)
    config["trainer"].update(force=True, resume=False, progress=False)
    config["logger"] = {**config["logger"], "name": "files", "mode": "disabled"}
    return config


def _replace_prefix(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _replace_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_prefix(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
        return new + value[len(old) :]
    return value


def _get(summary: dict[str, Any] | None, keys: Sequence[str]) -> Any:
    value: Any = summary
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _compare(recorded: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    lines = [f"{'':24}{'recorded':>16}{'rerun':>16}{'difference':>14}"]
    for label, keys in ROWS:
        a, b = _get(recorded, keys), _get(new, keys)
        diff = ""
        if isinstance(a, float) and isinstance(b, float) and a:
            diff = f"{100 * (b - a) / abs(a):+.3f} %"
        lines.append(f"{label:24}{_cell(a):>16}{_cell(b):>16}{diff:>14}")
    return lines


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lehi.rerun", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder holding config.yaml")
    parser.add_argument("--results-dir", default="runs/rerun", help="where the rerun goes")
    parser.add_argument("--data-dir", default=None, help="the data folder on this machine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record = RunRecord(args.run_dir)
    config = record.read_config()
    if config is None:
        print(f"error: {record.config} is missing or not a config", file=sys.stderr)
        return 2
    if Path(args.results_dir).resolve() in record.dir.resolve().parents:
        print("error: --results-dir must not hold the original run", file=sys.stderr)
        return 2
    fresh = rerun_config(config, args.results_dir, args.data_dir)
    try:
        summary = run(fresh)
    except BAD_INPUT as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{record.dir} (identity {identity_hash(config)})")
    print("\n".join(_compare(record.read_summary(), summary)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
