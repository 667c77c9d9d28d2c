"""``<results>/<experiment>/step_cost.json``: each optimizer's step cost, measured side by side.

Sweep runs ran two at a time on shared cores, so their wall times measure the machine's load
as much as the optimizer. Cost in tables and figures therefore comes from this file, written
by ``benchmarks/step_cost.py``: every optimizer of the experiment built from the experiment's
preset (same model, data and batch), stepped in one process in round-robin order (the start
rotating each repeat) so that drift in the machine's speed hits all alike.

Format (JSON object)::

    {"format": "lehi.step_cost/1",
     "experiment": "mnist_small",
     "method": "<one line: how it was measured>",
     "device": "cpu", "device_name": "...", "threads": 1, "torch": "2.x",
     "git_commit": "...", "git_dirty": false, "time": "2026-11-29T20:00:00+0000",
     "steps_per_repeat": 20, "warmup_steps": 5,
     "optimizers": {"<label>": {"name": "<optimizer.name>",
                                "ms_per_step": [<ms per step of each repeat>, ...],
                                "curvature_passes_per_step": 1.0}, ...}}

Every optimizer's ``ms_per_step`` list has one value per repeat, in the same repeat order, so
per-repeat ratios compare measurements made moments apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lehi.io import atomic_write_text

FILE_NAME = "step_cost.json"
FORMAT = "lehi.step_cost/1"
METHOD = (
    "all optimizers of the experiment in one process, interleaved round-robin "
    "(start rotating each repeat); median over repeats"
)


class StepCostError(ValueError):
    """A step_cost.json that cannot be used; the message names the file and the key."""


def path_for(root: str | Path, experiment: str) -> Path:
    """Where the step cost of ``experiment`` lives under results tree ``root``."""
    return Path(root) / experiment / FILE_NAME


def _check(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StepCostError(f"{path}: 'format' must be {FORMAT!r}")
    optimizers = data.get("optimizers")
    if not isinstance(optimizers, dict) or not optimizers:
        raise StepCostError(f"{path}: 'optimizers' must be a non-empty object")
    lengths = set()
    for label, entry in optimizers.items():
        values = entry.get("ms_per_step") if isinstance(entry, Mapping) else None
        if not (
            isinstance(values, list)
            and values
            and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)
        ):
            raise StepCostError(
                f"{path}: optimizers.{label}.ms_per_step must be a non-empty list of numbers > 0"
            )
        lengths.add(len(values))
    if len(lengths) != 1:
        raise StepCostError(f"{path}: every optimizer needs the same number of repeats")
    return data


def read(root: str | Path, experiment: str) -> dict[str, Any] | None:
    """The step cost of ``experiment`` under ``root``; None when it was never measured.

    Raises StepCostError for a file that exists but does not follow the format.
    """
    path = path_for(root, experiment)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StepCostError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    return _check(data, path)


def write(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Check ``data`` against the format and write it atomically; returns the path."""
    path = Path(path)
    _check(dict(data), path)
    atomic_write_text(path, json.dumps(dict(data), indent=2) + "\n")
    return path


def describe(data: Mapping[str, Any]) -> str:
    """Where and how a step cost was measured, for captions and table headers."""
    threads = data.get("threads")
    where = str(data.get("device") or "?")
    if threads:
        where += f", {threads} thread{'s' if threads != 1 else ''}"
    commit = str(data.get("git_commit") or "")[:7]
    return f"{where}, torch {data.get('torch', '?')}" + (f", commit {commit}" if commit else "")
