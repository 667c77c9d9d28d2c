"""How many learning rates of each ablation reading really trained, stricter than "no seed
diverged": every seed completed AND ended at least 10 % below its initial validation loss
(a run stuck at chance a hair below its initial loss does not count).

    python plots/trained_lrs.py [--root results] [--progress 0.9]

Prints a Markdown table: per ablation experiment and reading, LRs without divergence and LRs
where every seed trained. Reads only summary.json files (through lehi.record).
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python plots/trained_lrs.py`
    sys.path.insert(0, str(REPO))

import argparse
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lehi.record import find_runs


def trained_lrs(root: Path, progress: float) -> dict[str, dict[str, tuple[int, int, int]]]:
    """experiment → reading → (LRs without divergence, LRs where every seed trained, LRs)."""
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for record in find_runs(root):
        s = record.read_summary() or {}
        if str(s.get("experiment", "")).startswith("ablation_") and s.get("status") != "failed":
            cells[(s["experiment"], s["optimizer"], s["lr"])].append(s)
    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for (exp, reading, _), runs in cells.items():
        stable = all(r["status"] == "completed" for r in runs)
        trained = stable and all(
            r["final"]["val_loss"] <= progress * r["initial"]["val_loss"] for r in runs
        )
        counts = out[exp][reading]
        counts[0] += stable
        counts[1] += trained
        counts[2] += 1
    return {e: {r: tuple(c) for r, c in sorted(rs.items())} for e, rs in sorted(out.items())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "results")
    parser.add_argument("--progress", type=float, default=0.9)
    args = parser.parse_args(argv)
    table = trained_lrs(args.root, args.progress)
    if not table:
        print(f"no ablation runs under {args.root}", file=sys.stderr)
        return 1
    for exp, readings in table.items():
        print(f"\n## {exp}\n\n| reading | LRs without divergence | LRs where every seed trained |")
        print("|---|---|---|")
        for reading, (stable, trained, total) in readings.items():
            print(f"| {reading} | {stable}/{total} | {trained}/{total} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
