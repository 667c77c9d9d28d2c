"""Weights & Biases logging of a run (the plain files are lehi.record's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lehi.record import json_safe

__all__ = ["WandbLogger"]


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
