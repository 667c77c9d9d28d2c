"""One look for every figure: fixed optimizer colours, labels, units, and atomic saving."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

# Figures are files, never windows: headless machines and CI must not need a display.
matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402 - after the backend is chosen

from lehi.io import atomic_write_bytes  # noqa: E402
from lehi.results import experiment_heading, optimizer_label, optimizer_rank  # noqa: E402

# Okabe-Ito colours (colour-blind safe); the same optimizer has the same colour everywhere.
PALETTE: dict[str, str] = {
    "adam": "#0072B2",
    "adamw": "#56B4E9",
    "sophia": "#009E73",
    "lehi": "#D55E00",
    "lehibrid": "#CC79A7",
}
FALLBACK_COLOR = "#7F7F7F"
FORMATS = ("png", "pdf")
DPI = 150

__all__ = [
    "DPI",
    "FALLBACK_COLOR",
    "FORMATS",
    "PALETTE",
    "color",
    "experiment_heading",
    "figure_stem",
    "label",
    "loss_label",
    "optimizer_rank",
    "save",
]


def color(optimizer: str) -> str:
    """The optimizer's fixed colour (grey for optimizers outside the palette)."""
    return PALETTE.get(optimizer, FALLBACK_COLOR)


def label(optimizer: str) -> str:
    """Display name of an optimizer in legends."""
    return optimizer_label(optimizer)


def loss_label(metric_name: str) -> str:
    """The training loss and its unit, known from the dataset's metric."""
    if metric_name == "rmse":
        # Regression trains on standardised targets (DataBundle.target_std converts back).
        return "MSE (standardised target units²)"
    return "cross-entropy (nats)"


def figure_stem(kind: str, experiment: str, scale: str) -> str:
    """File stem of a per-experiment figure; the scale is added unless the name has it."""
    suffix = "" if not scale or scale in experiment.split("_") else f"_{scale}"
    return f"{kind}_{experiment}{suffix}"


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``<out>/<stem>.png`` and ``.pdf`` atomically; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out / f"{stem}.{fmt}"
        # No creation dates or software versions: the same results give the same bytes.
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        fig.savefig(buffer := io.BytesIO(), format=fmt, dpi=DPI, metadata=metadata)
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
