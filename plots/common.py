"""Command line shared by the figure scripts: --root/--out, no-results guidance, exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lehi.results import NO_RESULTS_HINT, Results, collect, write_summary
from lehi.results.stepcost import StepCostError

FigureFn = Callable[[Results, Path], list[Path]]
"""A figure producer: reads the computed tables, writes its files under the folder, returns them."""


def no_results_message(root: Path | str) -> str:
    """The one-line guidance printed when a results tree holds no finished run."""
    return f"no results under {root}: {NO_RESULTS_HINT}"


def main(
    figures: Sequence[FigureFn],
    argv: Sequence[str] | None = None,
    *,
    description: str = "",
    summary: bool = False,
) -> int:
    """Parse ``--root``/``--out``, compute the tables once, run ``figures``; return the exit code.

    With ``summary`` the Markdown/CSV summary is written too. Exit code 1, with one line on
    stderr, when ``--root`` has no finished run or a malformed step_cost.json.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    parser.add_argument(
        "--out", default="plots/figures", help="folder for PNG/PDF files (default: plots/figures)"
    )
    args = parser.parse_args(argv)
    try:
        results = collect(args.root)
    except StepCostError as exc:
        print(exc, file=sys.stderr)
        return 1
    if results.empty:
        print(no_results_message(args.root), file=sys.stderr)
        return 1
    written: list[Path] = []
    for figure in figures:
        written += figure(results, Path(args.out))
    if summary:
        written += write_summary(args.root, results)
    for path in written:
        print(f"wrote {path}")
    return 0
