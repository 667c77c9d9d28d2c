"""Which runs can be trusted to come from today's code: ``python -m lehi.results check``.

A run is listed when its env.json says it was made from a dirty tree (or does not say), when
its commit is unknown here, when the result-affecting code (``lehi.record.
RESULT_AFFECTING_PATHS``) differs between its commit and HEAD, or when it is ``completed`` yet
its last validation loss is above its initial one (older summaries: the step-0 validation row
of metrics.csv).
"""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pandas as pd

from lehi import record
from lehi.results import store

REPO = Path(record.__file__).resolve().parents[1]


@dataclass(frozen=True)
class Finding:
    """One listed run and why (short kinds for counting, one line of detail)."""

    run: str
    kinds: tuple[str, ...]
    detail: str


def _git_rc(*args: str) -> int | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, timeout=30
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None


@cache
def code_state(commit: str) -> str:
    """``same`` (result-affecting code equals HEAD's), ``changed`` or ``unknown``."""
    if not commit or _git_rc("cat-file", "-e", f"{commit}^{{commit}}") != 0:
        return "unknown"
    rc = _git_rc("diff", "--quiet", commit, "HEAD", "--", *record.RESULT_AFFECTING_PATHS)
    return {0: "same", 1: "changed"}.get(rc, "unknown")


def _reasons(run: dict) -> list[tuple[str, str]]:
    commit = run["git_commit"]
    short = commit[:7] or "?"
    reasons = []
    if run["git_dirty"] is None or bool(run["git_dirty"]):
        what = "made from a dirty tree" if run["git_dirty"] else "no dirty flag in env.json"
        reasons.append(("dirty", f"{what} at {short}"))
    state = code_state(commit)
    if state == "unknown":
        reasons.append(("unknown commit", f"commit {short} unknown here (stale)"))
    elif state == "changed":
        paths = " ".join(record.RESULT_AFFECTING_PATHS)
        reasons.append(("stale code", f"{paths} changed between {short} and HEAD"))
    if run["status"] == "completed" and run["divergence"] == "no_progress":
        reasons.append(
            (
                "no progress",
                f"completed but last val loss {run['final_val_loss']:.4g} > initial "
                f"{run['initial_val_loss']:.4g}",
            )
        )
    return reasons


def check(root: str | Path = "results") -> tuple[list[Finding], int]:
    """The listed runs under ``root`` and how many runs were checked."""
    runs = store.load_runs(root)
    if runs.empty:
        return [], 0
    runs = store.add_initial_val_loss(runs, store.load_metrics(root, runs))
    runs = runs.astype({"git_dirty": object}).where(pd.notna(runs), None)
    findings = []
    for run in runs.to_dict("records"):
        reasons = _reasons(run)
        if reasons:
            kinds = tuple(k for k, _ in reasons)
            findings.append(Finding(run["run"], kinds, "; ".join(d for _, d in reasons)))
    return findings, len(runs)


def report(findings: list[Finding], n_runs: int, root: str | Path) -> list[str]:
    """The lines ``check`` prints: one per listed run, then a count by kind."""
    lines = [f"{Path(root) / f.run}: {f.detail}" for f in findings]
    if not findings:
        return [*lines, f"{n_runs} run(s) under {root}: all from clean trees at HEAD's code"]
    kinds = Counter(k for f in findings for k in f.kinds)
    counted = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return [*lines, f"{len(findings)} of {n_runs} run(s) under {root} listed ({counted})"]
