"""Writing a run's results: plain files under results/ (the data plots read) and W&B.

A run folder holds config.yaml (resolved), metrics.csv, summary.json and env.json, each
written atomically, plus checkpoint.pt while the run can still be resumed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lehi.io import atomic_write_text

__all__ = [
    "METRIC_COLUMNS",
    "RunFiles",
    "WandbLogger",
    "environment",
    "json_safe",
]

METRIC_COLUMNS = (
    "step",
    "epoch",
    "split",
    "loss",
    "metric",
    "lr",
    "wall_time",
    "train_time",
    "curvature_passes",
)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class RunFiles:
    """The files of one run folder."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(run_dir)
        self.config = self.dir / "config.yaml"
        self.metrics = self.dir / "metrics.csv"
        self.summary = self.dir / "summary.json"
        self.env = self.dir / "env.json"
        self.checkpoint = self.dir / "checkpoint.pt"

    def read_summary(self) -> dict[str, Any] | None:
        """The summary if the run has finished (completed, diverged or failed), else None."""
        try:
            return json.loads(self.summary.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config, yaml_text)

    def write_env(self, env: Mapping[str, Any]) -> None:
        atomic_write_text(self.env, json.dumps(json_safe(dict(env)), indent=2) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.summary, json.dumps(json_safe(dict(summary)), indent=2) + "\n")

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS})
        atomic_write_text(self.metrics, buffer.getvalue())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.csv with numbers parsed back (for resuming)."""
        if not self.metrics.exists():
            return []
        with self.metrics.open(newline="") as f:
            rows = list(csv.DictReader(f))
        parsed = []
        for row in rows:
            parsed.append(
                {k: (row[k] if k == "split" else _parse_number(row[k], k)) for k in METRIC_COLUMNS}
            )
        return parsed

    def clear(self) -> None:
        """Remove a previous attempt's files before a fresh start in the same folder."""
        for path in (self.metrics, self.summary, self.checkpoint):
            path.unlink(missing_ok=True)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return "" if value is None else value


def _parse_number(text: str, key: str) -> float | int | None:
    if text == "":
        return None
    if key in ("step", "curvature_passes"):
        return int(text)
    return float(text)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a run ran: git commit, library versions, device, host."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": device_name,
        "num_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class WandbLogger:
    """Metrics, config and summary to Weights & Biases (online, offline or disabled).

    The W&B run id is derived from the run folder, so a resumed run continues the same
    W&B run, and its files live in <run folder>/wandb.
    """

    def __init__(
        self,
        *,
        mode: str,
        project: str,
        entity: str | None,
        group: str | None,
        tags: Sequence[str],
        name: str,
        run_dir: Path,
        config: Mapping[str, Any],
    ) -> None:
        import hashlib

        import wandb

        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode={mode!r} is not one of online, offline, disabled")
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            tags=list(tags),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=dict(config),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, row: Mapping[str, Any]) -> None:
        split = row["split"]
        values = {
            f"{split}/loss": row["loss"],
            f"{split}/metric": row["metric"],
            "lr": row["lr"],
            "epoch": row["epoch"],
            "train_time": row["train_time"],
            "curvature_passes": row["curvature_passes"],
        }
        self._run.log(json_safe(values), step=int(row["step"]))

    def finish(self, summary: Mapping[str, Any]) -> None:
        for key, value in json_safe(dict(summary)).items():
            self._run.summary[key] = value
        self._run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
