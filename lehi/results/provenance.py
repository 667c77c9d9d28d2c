"""Which runs are current at HEAD: ``python -m lehi.results check``.

A run is current when it was made from a clean tree and either its experiment's training code
(``lehi.record.training_code``: the code that can change its rows, with its own preset and no
other) at its commit equals HEAD's, or its experiment holds a passing verification
(``<exp>/verified.json``, written by ``python -m lehi.results verify``) made at a clean tree
whose training code for that experiment equals HEAD's, in which every replay of the run's
optimizer label reproduced its rows, and which did not find the run's summary.json stale (not
what HEAD derives from its rows). A run adopted from another experiment (``reused_from``, the
same computation, lehi.reuse) is also current when the run it adopted is current and holds the
same metrics.csv. Everything else is listed: a run from a dirty tree (or without a dirty
flag), a run whose commit is unknown here, and a run whose training code changed with no such
verification. Analysis code (lehi/results, the diagnostics, plots) never makes a run stale,
and judgements made from the rows (``no_progress``, trained) are lehi.results' own.
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
from lehi.reuse import computation

REPO = record.REPO


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
def code_state(commit: str, experiment: str | None = None) -> str:
    """``same`` (``experiment``'s training code equals HEAD's), ``changed`` or ``unknown``."""
    if not commit or _git_rc("cat-file", "-e", f"{commit}^{{commit}}") != 0:
        return "unknown"
    rc = _git_rc("diff", "--quiet", commit, "HEAD", "--", *record.training_code(experiment))
    return {0: "same", 1: "changed"}.get(rc, "unknown")


def verified_labels(exp_dir: Path) -> tuple[dict[str, bool], str]:
    """The labels a verification carries forward to HEAD, and why none when it is empty."""
    from lehi.results.verify import read_verification

    found = read_verification(exp_dir)
    if found is None:
        return {}, "no verification (python -m lehi.results verify)"
    if found.get("training_code_dirty") is not False:
        return {}, "its verification was made with uncommitted training code"
    if found.get("training_code") != _head_training_code(exp_dir.name):
        return {}, "its verification was made at other training code than HEAD's"
    labels = found.get("labels")
    return (labels if isinstance(labels, dict) else {}), "its verification failed"


def stale_summary(exp_dir: Path, run: str) -> str | None:
    """The difference the experiment's verification found in ``run``'s summary.json, if any."""
    from lehi.results.verify import read_verification

    stale = (read_verification(exp_dir) or {}).get("stale_summaries")
    return stale.get(run) if isinstance(stale, dict) else None


@cache
def _head_training_code(experiment: str) -> str | None:
    return record.training_code_digest(experiment=experiment)


def _reasons(run: dict, root: Path) -> list[tuple[str, str]]:
    commit = run["git_commit"]
    short = commit[:7] or "?"
    reasons = []
    if run["git_dirty"] is None or bool(run["git_dirty"]):
        what = "made from a dirty tree" if run["git_dirty"] else "no dirty flag in env.json"
        reasons.append(("dirty", f"{what} at {short}"))
    state = code_state(commit, run["experiment"])
    if state == "same":
        return reasons
    labels, why = verified_labels(root / run["experiment"])
    if labels.get(run["optimizer"]) is True:
        difference = stale_summary(root / run["experiment"], run["run"])
        if difference is not None:
            detail = (
                f"summary.json is not what HEAD derives from its metrics.csv ({difference}; "
                f"{run['experiment']}/verified.json): make the run again"
            )
            reasons.append(("stale summary", detail))
        return reasons
    if run["optimizer"] in labels:
        why = f"its verification failed for {run['optimizer']}"
    if state == "unknown":
        reasons.append(("unknown commit", f"commit {short} unknown here, and {why}"))
    else:
        reasons.append(("stale code", f"training code changed between {short} and HEAD; {why}"))
    return reasons


def _current_source(run: dict, by_folder: dict[str, dict], root: Path) -> bool:
    """Whether ``run`` adopted (lehi.reuse) a run that is current, with the same metrics.csv:
    the same computation, so what reproduces the source reproduces it."""
    reused_from = (record.RunRecord(run["path"]).read_summary() or {}).get("reused_from")
    source = by_folder.get(reused_from) if isinstance(reused_from, str) else None
    if source is None or _reasons(source, root):
        return False
    own, theirs = (record.RunRecord(r["path"]) for r in (run, source))
    same_computation = computation(own.read_config() or {}) == computation(
        theirs.read_config() or {}
    )
    return same_computation and own.metrics.read_bytes() == theirs.metrics.read_bytes()


def check(root: str | Path = "results") -> tuple[list[Finding], int]:
    """The listed runs under ``root`` and how many runs were checked."""
    runs = store.load_runs(root)
    if runs.empty:
        return [], 0
    runs = runs.astype({"git_dirty": object}).where(pd.notna(runs), None)
    findings = []
    by_folder = {run["run"]: run for run in runs.to_dict("records")}
    for run in by_folder.values():
        reasons = _reasons(run, Path(root))
        if reasons and _current_source(run, by_folder, Path(root)):
            reasons = []
        if reasons:
            kinds = tuple(k for k, _ in reasons)
            findings.append(Finding(run["run"], kinds, "; ".join(d for _, d in reasons)))
    return findings, len(runs)


def report(findings: list[Finding], n_runs: int, root: str | Path) -> list[str]:
    """The lines ``check`` prints: one per listed run, then a count by kind."""
    lines = [f"{Path(root) / f.run}: {f.detail}" for f in findings]
    if not findings:
        return [*lines, f"{n_runs} run(s) under {root}: all current at HEAD"]
    kinds = Counter(k for f in findings for k in f.kinds)
    counted = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return [*lines, f"{len(findings)} of {n_runs} run(s) under {root} listed ({counted})"]
