"""Command line of lehi.results.

    python -m lehi.results [--root results] [--target EXP=LOSS ...] [--target-factor F]
    python -m lehi.results check [--root results]

The first writes results/summary.{md,csv} and significance.csv; ``check`` lists runs whose
provenance is not today's clean code (exit 1 when it lists any).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lehi.results import provenance
from lehi.results.report import write_summary
from lehi.results.stats import TARGET_FACTOR
from lehi.results.stepcost import StepCostError


def parse_target(text: str) -> tuple[str, float]:
    """``EXP=VALUE`` -> (EXP, VALUE); ValueError with one line otherwise."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise ValueError(f"--target {text!r}: expected EXPERIMENT=LOSS, e.g. digits=0.12") from None


def _summary(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lehi.results",
        description="Write the results summary (CSV + Markdown).",
        epilog="Provenance: python -m lehi.results check [--root results]",
    )
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="EXP=LOSS",
        help="explicit target validation loss for an experiment (repeatable)",
    )
    parser.add_argument(
        "--target-factor",
        type=float,
        default=TARGET_FACTOR,
        help=f"default target = best Adam final val loss × this (default {TARGET_FACTOR})",
    )
    args = parser.parse_args(argv)
    try:
        targets = dict(parse_target(t) for t in args.target)
        paths = write_summary(args.root, targets=targets, target_factor=args.target_factor)
    except (ValueError, FileNotFoundError, StepCostError) as exc:
        print(exc, file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


def _check(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lehi.results check",
        description="List runs from dirty trees, from code that differs from HEAD, or that "
        "completed above their initial validation loss; exit 1 when any is listed.",
    )
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    args = parser.parse_args(argv)
    findings, n_runs = provenance.check(args.root)
    for line in provenance.report(findings, n_runs, args.root):
        print(line)
    return 1 if findings else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lehi.results``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return _check(argv[1:])
    if argv[:1] == ["summary"]:
        argv = argv[1:]
    return _summary(argv)
