"""Command line shared by the figure scripts: --root/--out, no-results guidance, exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lehi.results import NO_RESULTS_HINT, Results, collect, write_summary
from lehi.results.ablation import is_ablation
from lehi.results.confirm import is_nominee_confirmation
from lehi.results.findings import BEGIN, END, FindingsMarkersError, update_readme
from lehi.results.stepcost import StepCostError

REPO = Path(__file__).resolve().parents[1]

FigureFn = Callable[[Results, Path], list[Path]]
"""A figure producer: reads the computed tables, writes its files under the folder, returns them."""


def drawn_alone(results: Results) -> list[dict]:
    """The experiments with LR-sensitivity, loss-curve and cost figures of their own: not the
    ablations (plots/ablation.py draws them) nor a nominee's confirmation (one reading at one
    LR, judged beside its workload's readings in the verdicts and tuning-budget figures)."""
    return [
        e
        for e in results.experiments()
        if not is_ablation(e["experiment"]) and not is_nominee_confirmation(e["experiment"])
    ]


def no_results_message(root: Path | str) -> str:
    """The one-line guidance printed when a results tree holds no finished run."""
    return f"no results under {root}: {NO_RESULTS_HINT}"


def main(
    figures: Sequence[FigureFn],
    argv: Sequence[str] | None = None,
    *,
    description: str = "",
    summary: bool = False,
    readme: bool = False,
) -> int:
    """Parse ``--root``/``--out``, compute the tables once, run ``figures``; return the exit code.

    With ``summary`` the Markdown/CSV summary is written too; with ``readme`` also README's
    findings block (``--readme``; by default the repository's README.md when ``--root`` is
    its committed results/, so figures of your own runs never rewrite it). Exit code 1, with
    one line on stderr, when ``--root`` has no finished run, a malformed step_cost.json, or
    README's findings markers are malformed.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    parser.add_argument(
        "--out", default="plots/figures", help="folder for PNG/PDF files (default: plots/figures)"
    )
    if readme:
        parser.add_argument(
            "--readme",
            default=None,
            help="README whose findings block to rewrite (default: README.md for results/)",
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
    if readme:
        return _findings(results, args.readme, Path(args.root))
    return 0


def _findings(results: Results, readme: str | None, root: Path) -> int:
    """Rewrite the README's findings block; a README without the markers is left alone."""
    if readme is None and root.resolve() != (REPO / "results").resolve():
        return 0
    path = Path(readme) if readme is not None else REPO / "README.md"
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text and END not in text:
        print(f"{path}: no {BEGIN} … {END} block; findings not written", file=sys.stderr)
        return 0
    try:
        changed = update_readme(path, results)
    except FindingsMarkersError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(f"{'wrote' if changed else 'unchanged'} {path} (findings)")
    return 0
