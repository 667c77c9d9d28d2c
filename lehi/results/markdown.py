"""Markdown building blocks every results renderer shares: number formats, tables, headings.

Kept apart from :mod:`lehi.results.report` so that the renderers built on them (the summary,
the ablation table, the README findings) import these and not each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lehi import roster

__all__ = ["experiment_heading", "fmt", "label_of", "pm", "scale_label", "table"]


def scale_label(scale: str) -> str:
    """How a scale is shown in headings and titles; small runs say they are the CPU variant."""
    return "small (CPU variant)" if scale == "small" else str(scale)


def budget_label(steps: float | None, epochs: float | None) -> str:
    """``20 epochs (9,380 steps)`` for whole epochs, else ``664 steps (0.5 epoch)``."""
    if steps is None or not math.isfinite(steps):
        return ""
    steps = int(steps)
    if epochs is None or not math.isfinite(epochs):
        return f"{steps:,} steps"
    if epochs >= 1 and abs(epochs - round(epochs)) < 1e-9:
        return f"{round(epochs)} epoch{'s' if round(epochs) != 1 else ''} ({steps:,} steps)"
    return f"{steps:,} steps ({epochs:.2g} epoch)"


def experiment_heading(
    experiment: str,
    scale: str,
    dataset: str,
    metric_name: str,
    steps: float | None = None,
    epochs: float | None = None,
) -> str:
    """Heading/title text of an experiment; names the scale so small runs are labelled, and
    the budget when it is given."""
    metric = f" · metric: {metric_name}" if metric_name else ""
    budget = budget_label(steps, epochs)
    budget = f" · {budget}" if budget else ""
    return f"{experiment} — scale: {scale_label(scale)} · dataset: {dataset}{budget}{metric}"


def label_of(row: Mapping[str, Any], key: str = "optimizer") -> str:
    """Display label of a table row's optimizer (its roster label unless relabelled)."""
    return roster.display_label(row[key], row.get("optimizer_name"))


def fmt(value: float, spec: str = ".4g") -> str:
    """``value`` formatted, or an em dash for missing/non-finite values."""
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def pm(mean: float, std: float, spec: str = ".4g") -> str:
    """``mean ± std``; the std with 2 significant digits (it is only known that well)."""
    if not math.isfinite(mean):
        return "—"
    return f"{mean:{spec}} ± {std:.2g}" if math.isfinite(std) else f"{mean:{spec}}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
