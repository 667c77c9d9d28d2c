"""Every figure and the results summary from an existing results tree; never trains.

    python plots/make_figures.py --root results --out plots/figures

Writes the figures (PNG + PDF) into --out, results/summary.{md,csv} (+ significance.csv)
into --root, and for the committed results/ README.md's findings block (lehi.results.findings;
--readme names another file). With no finished run under --root it prints one guidance line and exits 1.
To add a figure producer, append its ``make(results, out) -> list[Path]`` to FIGURES.
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python plots/make_figures.py`: repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence

from plots import ablation, common, cost, diagnostics, loss_curves, lr_sensitivity, verdicts

FIGURES: list[common.FigureFn] = [
    lr_sensitivity.make,
    loss_curves.make,
    cost.make,
    diagnostics.make,
    ablation.make,
    verdicts.make,
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run every producer in FIGURES and write the summary; return the exit code."""
    return common.main(FIGURES, argv, description=__doc__.split("\n")[0], summary=True, readme=True)


if __name__ == "__main__":
    sys.exit(main())
