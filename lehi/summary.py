"""What a run's validation rows say: initial, final, best and the last-3 window."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["LAST_WINDOW", "validation_summary"]

#: The evaluations the figures average: the paper's "last-3 average validation loss".
LAST_WINDOW = 3


def validation_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``initial``, ``final``, ``best`` and ``last3`` of the validation rows (metrics.csv rows).

    The final validation loss of the paper's figures is ``last3.val_loss_mean``: the mean over
    the last 3 evaluations, with their sample std; ``final`` is the last evaluation itself.
    Only full-split rows ("val") count; "val_subset" rows are the curve's intermediate points.
    """
    val = [r for r in rows if r["split"] == "val"]
    train = [r for r in rows if r["split"] == "train"]
    final = val[-1] if val else None
    finite = [r for r in val if math.isfinite(r["loss"])]
    best = min(finite, key=lambda r: r["loss"]) if finite else None
    last3 = [r["loss"] for r in val[-LAST_WINDOW:]]
    mean3 = sum(last3) / len(last3) if last3 else math.nan
    std3 = (
        math.sqrt(sum((v - mean3) ** 2 for v in last3) / (len(last3) - 1))
        if len(last3) > 1
        else math.nan
    )
    return {
        "initial": {"val_loss": val[0]["loss"] if val and val[0]["step"] == 0 else None},
        "final": {
            "val_loss": final["loss"] if final else None,
            "val_metric": final["metric"] if final else None,
            "train_loss": train[-1]["loss"] if train else None,
            "step": final["step"] if final else None,
        },
        "best": {
            "val_loss": best["loss"] if best else None,
            "val_metric": best["metric"] if best else None,
            "step": best["step"] if best else None,
        },
        "last3": {"val_loss_mean": mean3, "val_loss_std": std3, "n": len(last3)},
    }
