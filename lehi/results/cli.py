"""Command line of lehi.results.

    python -m lehi.results [--root results] [--target EXP=LOSS ...] [--target-factor F]
    python -m lehi.results check [--root results]
    python -m lehi.results verify [EXP ...] [--root results] [--data-dir DIR] [--jobs N]
    python -m lehi.results tune EXP [...] [--root results]

The first writes results/summary.{md,csv} and significance.csv; ``check`` lists runs that are
not current at HEAD (exit 1 when it lists any); ``verify`` replays a sample of each
experiment's runs at HEAD and compares their rows (exit 1 when one differs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lehi.io import atomic_write_text
from lehi.record import REPO
from lehi.results import confirm, provenance, verify
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
        description="List the runs that are not current at HEAD: from dirty trees or unknown "
        "commits, or with changed training code and no passing verification (or a stale "
        "summary); exit 1 when any is listed.",
    )
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    args = parser.parse_args(argv)
    findings, n_runs = provenance.check(args.root)
    for line in provenance.report(findings, n_runs, args.root):
        print(line)
    return 1 if findings else 0


def _verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lehi.results verify",
        description="Replay a sample of each experiment's runs at HEAD (scratch folder) and "
        "compare their metrics rows with the committed ones; writes <root>/<exp>/verified.json.",
    )
    parser.add_argument("experiments", nargs="*", help="experiments to verify (default: all)")
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    parser.add_argument(
        "--data-dir", default=None, help="data folder (default: the one each run recorded)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="replays in parallel (default 1)")
    parser.add_argument(
        "--prefix-every",
        type=int,
        default=verify.PREFIX_EVERY,
        help="replay the prefix of every N-th run outside the full sample "
        f"(default {verify.PREFIX_EVERY})",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write verified.json")
    parser.add_argument(
        "--labels",
        nargs="+",
        default=(),
        help="re-verify only these optimizer labels; the others' replays are kept from "
        "verified.json (same training code, machine and mode)",
    )
    args = parser.parse_args(argv)
    start = last = time.perf_counter()

    def done(v: verify.Verification) -> None:
        nonlocal last
        now = time.perf_counter()
        print(f"{v.line()} [{now - last:.0f} s]", flush=True)
        last = now

    try:
        results = verify.verify(
            args.root,
            args.experiments,
            data_dir=args.data_dir,
            jobs=max(1, args.jobs),
            prefix_every=max(1, args.prefix_every),
            write=not args.no_write,
            on_done=done,
            labels=args.labels,
        )
    except verify.VerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"verify: {len(results)} experiment(s) in {time.perf_counter() - start:.0f} s "
        f"(load average now {load})"
    )
    return 0 if all(v.ok and not v.stale_summaries for v in results) else 1


def _tune(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lehi.results tune",
        description="Write experiments/confirm_<EXP>.yaml: each reading at the LR its tuning "
        "sweep chose, on fresh seeds; for an ablation, its nominated reading on the workload's "
        "confirmation seeds (lehi.results.confirm).",
    )
    parser.add_argument(
        "experiments", nargs="+", help="workloads or ablations to tune, e.g. digits ablation_digits"
    )
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    args = parser.parse_args(argv)
    for experiment in args.experiments:
        try:
            path, text = confirm.preset(REPO, Path(args.root), experiment)
        except confirm.TuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        atomic_write_text(path, text)
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lehi.results``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        return _check(argv[1:])
    if argv[:1] == ["verify"]:
        return _verify(argv[1:])
    if argv[:1] == ["tune"]:
        return _tune(argv[1:])
    if argv[:1] == ["summary"]:
        argv = argv[1:]
    return _summary(argv)
