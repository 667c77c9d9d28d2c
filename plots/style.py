"""One look for every figure: roster colours and labels, units, hollow markers, atomic saving."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

# Figures are files, never windows: headless machines and CI must not need a display.
matplotlib.use("Agg")

from matplotlib.axes import Axes  # noqa: E402 - after the backend is chosen
from matplotlib.figure import Figure  # noqa: E402

from lehi import roster  # noqa: E402
from lehi.io import atomic_write_bytes  # noqa: E402
from lehi.results import experiment_heading  # noqa: E402

FORMATS = ("png", "pdf")
DPI = 150
UNSTABLE_LABEL = "hollow: unstable, recovered (train loss once > divergence factor × initial)"

__all__ = [
    "DPI",
    "FORMATS",
    "UNSTABLE_LABEL",
    "color",
    "experiment_heading",
    "figure_stem",
    "label",
    "loss_label",
    "note",
    "rank",
    "reading_styles",
    "save",
]

#: Qualitative colours for the readings that share the LEHI roster entry (tab10 without the
#: blue, orange and pink that sit close to Adam's, LEHI's and LEHIBrid's roster colours).
PALETTE = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf")
LINESTYLES = ("-", "--", ":")  # once the palette is used up, colours repeat with a new dash


def reading_styles(labels: list[str], names: dict[str, str]) -> dict[str, tuple[str, str]]:
    """(colour, linestyle) per reading: the roster's for an unrelabelled roster optimizer
    (Adam, LEHI, LEHIBrid, …), the palette in alphabetical order for the other readings (LEHI
    under an option), so two readings of one optimizer never share a line."""
    known = set(roster.names())
    out: dict[str, tuple[str, str]] = {}
    others = sorted(lb for lb in labels if not (names[lb] == lb and lb in known))
    for lb in labels:
        if lb not in others:
            out[lb] = (roster.color(lb), "-")
    for i, lb in enumerate(others):
        out[lb] = (PALETTE[i % len(PALETTE)], LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)])
    return out


def color(name: str) -> str:
    """The colour of optimizer ``name`` (its roster entry; neutral grey when unknown)."""
    return roster.color(name)


def label(optimizer: str, name: str | None = None) -> str:
    """Display label of a run's optimizer label (``name``: its optimizer.name, if relabelled)."""
    return roster.display_label(optimizer, name)


def rank(optimizer: str, name: str | None = None) -> tuple[int, int, str]:
    """Legend order: the roster's."""
    return roster.rank(optimizer, name)


def note(ax: Axes, text: str, width: int = 44) -> None:
    """A panel that shows a wrapped explanation instead of data (ticks removed)."""
    ax.text(0.5, 0.5, textwrap.fill(text, width), transform=ax.transAxes, ha="center",
            va="center", fontsize="small")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


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
        # Tight: a title with the whole experiment heading is wider than the axes it sits on.
        fig.savefig(
            buffer := io.BytesIO(), format=fmt, dpi=DPI, metadata=metadata, bbox_inches="tight"
        )
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
