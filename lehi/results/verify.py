"""Replay committed runs at HEAD and compare their rows: ``python -m lehi.results verify``.

A committed run is *current* when today's code, replaying it, produces its metrics rows. For
each experiment under the results root this module replays a deterministic sample of its
runs through the real runner (:func:`lehi.runner.run`) into a scratch folder, never into the
results, and compares every column of metrics.csv except the timing ones:

- per optimizer label, the run at its best LR (lowest seed; the trained path) and the run at
  its highest LR that ran (where divergence and clipping live), both to the end, statuses
  included;
- of the remaining runs, every ``prefix_every``-th (sorted by folder) up to its first
  evaluation after step 0 (``trainer.stop_after_evaluations=1``, not part of the identity).

Each replayed config is composed afresh at HEAD from the experiment's preset
(``experiments/<exp>.yaml``) with the run's sweep-axis values, so a changed default in conf/
is seen: a composed identity that differs from the recorded one fails, naming the key, and the
replay of HEAD's config then names the first differing row.

Rows are compared exactly when this machine can compute as the recorded one did: the same CPU
model, torch version and GPU, and torch's CPU capability (AVX2, AVX512…) the recorded one or
above it, in which case the replay runs pinned to the recorded capability
(``ATEN_CPU_CAPABILITY``, :func:`replay_capability`). Otherwise rows are compared within
:data:`REL_TOLERANCE` (see its comment for how it was measured) inside each run's chaos
horizon. Statuses must agree in both modes, and a verification whose every replayed row equals
the recorded one is ``identical`` whichever mode allowed it. The result, per label, goes to
``<root>/<exp>/verified.json``; ``python -m lehi.results check`` carries runs forward with it.

Replays test the rows; the summary's validation figures (initial, final, best, last-3) are
derived from the rows by :func:`lehi.summary.validation_summary`, so a change there leaves
every row equal and every summary stale. Verification therefore also derives them afresh from
each run's metrics.csv, for every run of the experiment (it costs a CSV read), and records the
runs whose summary.json differs (``stale_summaries``); ``check`` lists them.

``labels`` re-verifies some optimizer labels of an experiment and keeps the other labels'
replays from its verified.json, which must be of the same training code, machine and mode
(:func:`merge_labels`): after a run of one label is regenerated, its label is verified again
without replaying the others.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lehi import record
from lehi.io import atomic_write_text
from lehi.summary import validation_summary

__all__ = [
    "REL_TOLERANCE",
    "Replay",
    "Verification",
    "compare_rows",
    "merge_labels",
    "plan_replays",
    "replay_capability",
    "summary_difference",
    "verify",
]

REPO = record.REPO
VERIFIED = "verified.json"

#: Columns of metrics.csv a replay must reproduce (the timing columns measure the machine).
COMPARED = tuple(c for c in record.METRIC_COLUMNS if c not in ("wall_time", "train_time"))
#: Columns compared within the tolerance on another machine; the rest are always exact.
TOLERANT = ("loss", "metric")
#: Relative tolerance for loss and metric cells replayed on another machine, inside the run's
#: chaos horizon (:func:`chaos_horizon`). Measured on the committed digits runs replayed on an
#: AMD EPYC (AVX2) against the CPU that made them: inside the horizon they differ by at most
#: 6e-6 relative; past it, trajectories part (pure LEHI by 5 % in its first logging window,
#: Adam at lr 1e-2 by 1.6e-4 at step 280, LEHIBrid at lr 3e-2 ends at another loss).
REL_TOLERANCE = 1e-4
#: On another machine, loss and metric are compared only in the rows where two replays here
#: that differ only in their kernels' rounding (:data:`ROUNDING_ENV`) agree to this fraction
#: of :data:`REL_TOLERANCE` (:func:`chaos_horizon`): rounding starts near 1e-8 relative;
#: once it has grown 100-fold the run amplifies it, and a discrete event (another sampled
#: label, a ReLU that flips) moves another CPU's trajectory by orders of magnitude more
#: (measured on digits: 3e-6 → 2e-3 in one logging window of AdamW at lr 0.1).
HORIZON_FRACTION = 0.01
#: An accuracy may differ by this many examples on another machine: a logit that ties to
#: within the noise above flips one prediction.
METRIC_SLACK = 2e-3

#: Outside the full replays, the prefix of every this-many-th run is replayed.
PREFIX_EVERY = 2

#: Sweep axes that choose a config group, and the recorded key that names the choice.
GROUP_CHOICE = {"optimizer": ("optimizer", "name"), "reading": ("optimizer", "label")}


class VerifyError(ValueError):
    """An experiment that cannot be verified; the message is one line."""


@dataclass(frozen=True)
class Replay:
    """One run to replay: its folder (relative to the results root), label, mode."""

    run: str
    label: str
    mode: str  # "full" | "prefix"


@dataclass
class Outcome:
    run: str
    label: str
    mode: str
    ok: bool
    rows: int = 0
    max_rel_diff: float = 0.0
    status_recorded: str | None = None
    status_replayed: str | None = None
    difference: str | None = None
    seconds: float = 0.0
    replayed_dir: str | None = None
    row_difference: bool = False  # rows differ (not a config, status or failure)
    horizon: int | None = None  # rows compared on another machine (None: all)


@dataclass
class Verification:
    experiment: str
    comparison: str  # "exact" | "tolerance"
    outcomes: list[Outcome] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)  # the pins of an exact comparison
    #: run → its first difference, where summary.json is not what HEAD derives from its rows
    stale_summaries: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def identical(self) -> bool:
        """Every replayed row equals the recorded one, cell for cell (timing aside)."""
        return self.ok and all(
            o.max_rel_diff == 0.0 and not o.row_difference for o in self.outcomes
        )

    @property
    def result(self) -> str:
        """identical | within tolerance | failed: what verified.json and check report."""
        if not self.ok:
            return "failed"
        return "identical" if self.identical else "within tolerance"

    def labels(self) -> dict[str, bool]:
        """Per optimizer label: whether all its replays reproduced."""
        result: dict[str, bool] = {}
        for o in self.outcomes:
            result[o.label] = result.get(o.label, True) and o.ok
        return result

    def line(self) -> str:
        """The verdict on the replays, then the stale summaries, if any."""
        stale = self.stale_summaries
        if not stale:
            return self._replays_line()
        run, difference = next(iter(sorted(stale.items())))
        return (
            f"{self._replays_line()}; {len(stale)} summary.json(s) not what HEAD derives from "
            f"their rows (e.g. {run}: {difference})"
        )

    def _replays_line(self) -> str:
        full = sum(o.mode == "full" for o in self.outcomes)
        prefix = len(self.outcomes) - full
        head = f"{self.experiment}: verified: {full} full, {prefix} prefix"
        if self.ok:
            worst = max((o.max_rel_diff for o in self.outcomes), default=0.0)
            if self.comparison == "exact":
                pins = "/".join(self.capabilities) or "this machine's"
                return f"{head}, identical (exact: replayed under the recorded CPU kernels, {pins})"
            if self.identical:
                return f"{head}, identical (every row equal, though the machine is not known)"
            bounded = [o for o in self.outcomes if o.horizon is not None]
            note = ""
            if bounded:
                shares = sorted(o.horizon / max(o.rows, 1) for o in bounded)
                note = (
                    f"; {len(bounded)} compared up to their chaos horizon, median "
                    f"{shares[len(shares) // 2]:.0%} of their rows"
                )
            return (
                f"{head}, within tolerance {REL_TOLERANCE:g} (other machine; largest relative "
                f"difference {worst:.2g}{note})"
            )
        bad = next(o for o in self.outcomes if not o.ok)
        failed = sum(not o.ok for o in self.outcomes)
        return (
            f"{self.experiment}: FAILED ({failed} of {len(self.outcomes)} replays, "
            f"{self.comparison}): {bad.run}: {bad.difference}"
        )


# ------------------------------------------------------------------------------ sample
def plan_replays(
    runs: Sequence[Mapping[str, Any]], prefix_every: int = PREFIX_EVERY
) -> list[Replay]:
    """The deterministic sample of one experiment's runs (rows of ``store.load_runs``)."""
    full: dict[str, Replay] = {}
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: r["run"]):
        by_label.setdefault(run["label"], []).append(run)
    for label, group in by_label.items():
        ran = [r for r in group if r["status"] in ("completed", "diverged")]
        if not ran:
            continue
        trained = [r for r in ran if r["status"] == "completed" and _finite(r["val_loss"])]
        best_lr = min(trained, key=lambda r: r["val_loss"])["lr"] if trained else ran[0]["lr"]
        best = min((r for r in ran if r["lr"] == best_lr), key=lambda r: r["seed"])
        top_lr = max(r["lr"] for r in ran)
        highest = min((r for r in ran if r["lr"] == top_lr), key=lambda r: r["seed"])
        for r in (best, highest):
            full.setdefault(r["run"], Replay(r["run"], label, "full"))
    rest = [r for r in sorted(runs, key=lambda r: r["run"]) if r["run"] not in full]
    rest = [r for r in rest if r["status"] in ("completed", "diverged")]
    prefix = [Replay(r["run"], r["label"], "prefix") for r in rest[::prefix_every]]
    return sorted([*full.values(), *prefix], key=lambda r: r.run)


def summary_difference(run_dir: str | Path) -> str | None:
    """Where the run's summary.json differs from the validation figures HEAD's
    :func:`~lehi.summary.validation_summary` derives from its metrics.csv (the first dotted key,
    both values), or None. ``initial.train_loss`` is the trainer's own figure, not the rows'."""
    run = record.RunRecord(run_dir)
    summary = run.read_summary() or {}
    derived = record.json_safe(validation_summary(run.read_metrics()))
    recorded = {key: summary.get(key) for key in derived}
    if isinstance(recorded["initial"], dict):
        recorded["initial"] = {k: v for k, v in recorded["initial"].items() if k != "train_loss"}
    return first_difference(recorded, derived)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------ configs
def _dotted(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def sweep_overrides(experiment: str, recorded: Mapping[str, Any]) -> list[str] | None:
    """The command-line values of the run's sweep axes in ``experiments/<exp>.yaml`` at HEAD;
    None when HEAD has no such preset (the recorded config is replayed instead)."""
    preset = REPO / "experiments" / f"{experiment}.yaml"
    if not preset.is_file():
        return None
    spec = yaml.safe_load(preset.read_text()) or {}
    params = ((spec.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    overrides = [f"experiment={experiment}"]
    for key in params:
        path = GROUP_CHOICE.get(key)
        value = _dotted(recorded, ".".join(path) if path else key)
        if value is None:
            raise VerifyError(f"{experiment}: sweep axis {key!r} has no recorded value")
        overrides.append(f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}")
    return overrides


def compose_at_head(experiment: str, recorded: Mapping[str, Any], data_dir: str) -> dict:
    """The run's config as HEAD composes it from its preset (or the recorded one)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = sweep_overrides(experiment, recorded)
    if overrides is None:
        from lehi.rerun import rerun_config

        return rerun_config(dict(recorded), "scratch", data_dir)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.data_dir={data_dir}"])
    return OmegaConf.to_container(cfg, resolve=True)


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key where two identities differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            where = f"{prefix}{key}"
            if key not in a:
                return f"{where}: only at HEAD ({b[key]!r})"
            if key not in b:
                return f"{where}: only in the recorded config ({a[key]!r})"
            found = first_difference(a[key], b[key], f"{where}.")
            if found:
                return found
        return None
    if a != b:
        return f"{prefix.rstrip('.')}: recorded {a!r}, HEAD {b!r}"
    return None


# ----------------------------------------------------------------------------- compare
#: torch's x86 CPU kernel levels, lowest first. A CPU runs every level up to its own, and
#: ``ATEN_CPU_CAPABILITY=<level>`` makes torch dispatch that level's kernels. Measured: an
#: AVX512 AMD EPYC pinned to avx2 replays runs made on an AVX2 AMD EPYC bit for bit (all 157
#: rows of a confirm_mnist_small LEHIBrid run, the 20-row prefix of an AdamW one), where
#: unpinned the first validation loss already differs (2.3168596982955934 recorded,
#: 2.316859769821167 replayed).
CAPABILITY_LEVELS = ("DEFAULT", "AVX2", "AVX512")


def replay_capability(env: Mapping[str, Any] | None, here: Mapping[str, Any]) -> str | None:
    """The CPU capability under which this machine computes as the run's machine did, or None.

    That needs the same CPU model, torch version and GPU, and a recorded capability that this
    machine has (its own, or a level below it that torch can be pinned to). None means the
    machine is unknown (an env.json from before the capability was recorded) or cannot be
    matched, and only the tolerance applies."""
    if not env or not env.get("cpu") or not env.get("cpu_capability"):
        return None
    if any(env.get(k) != here[k] for k in ("cpu", "torch", "gpu")):
        return None
    recorded, own = env["cpu_capability"], here["cpu_capability"]
    if recorded == own:
        return recorded
    levels = CAPABILITY_LEVELS
    if recorded in levels and own in levels and levels.index(recorded) < levels.index(own):
        return recorded
    return None


def _cell_equal(a: Any, b: Any, column: str, exact: bool, metric_name: str) -> tuple[bool, float]:
    """Whether two cells agree, and their relative difference (0 when equal)."""
    if a == b or (
        isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    ):
        return True, 0.0
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return False, math.inf
    if not (math.isfinite(a) and math.isfinite(b)):
        return False, math.inf
    rel = abs(a - b) / max(abs(a), abs(b), 1e-300)
    if exact or column not in TOLERANT:
        return False, rel
    if column == "metric" and metric_name == "accuracy":
        return abs(a - b) <= METRIC_SLACK, rel
    return rel <= REL_TOLERANCE, rel


def compare_rows(
    recorded: Sequence[Mapping[str, Any]],
    replayed: Sequence[Mapping[str, Any]],
    *,
    exact: bool,
    metric_name: str = "",
    prefix: bool = False,
    horizon: int | None = None,
) -> tuple[str | None, float]:
    """The first difference (one line: row, step, column, both values) or None, and the
    largest relative difference of any compared cell. With a ``horizon`` (tolerance mode),
    loss and metric are compared in the first ``horizon`` rows only, the row count not at all."""
    if prefix:
        recorded = recorded[: len(replayed)]
    worst, first = 0.0, None
    for i, (a, b) in enumerate(zip(recorded, replayed, strict=False)):
        for column in COMPARED:
            if horizon is not None and i >= horizon and column in TOLERANT:
                continue
            ok, rel = _cell_equal(a[column], b[column], column, exact, metric_name)
            worst = max(worst, rel if math.isfinite(rel) else worst)
            if not ok and first is None:
                first = (
                    f"row {i + 1} (step {a['step']} {a['split']}) {column}: recorded "
                    f"{a[column]!r}, replayed {b[column]!r}"
                )
    if first is None and horizon is None and len(recorded) != len(replayed):
        first = f"{len(recorded)} rows recorded, {len(replayed)} replayed"
    return first, worst


def trainer_status(summary: Mapping[str, Any] | None) -> str | None:
    """The status the trainer itself decides: ``no_progress`` is judged by lehi.results now,
    so an older summary that recorded it as ``diverged`` ran to its budget (``completed``)."""
    if summary is None:
        return None
    if summary.get("status") == "diverged" and summary.get("divergence") == "no_progress":
        return "completed"
    return summary.get("status")


# ------------------------------------------------------------------------------ replay
def _replay_task(task: dict[str, Any]) -> dict[str, Any]:
    """:func:`replay` in a worker process; the :class:`Outcome` as a dict."""
    import logging
    import warnings

    import torch

    logging.getLogger("lehi").setLevel(logging.WARNING)
    pinned, running = task.get("capability"), torch.backends.cpu.get_cpu_capability()
    if pinned is not None and running != pinned:
        raise VerifyError(f"{task['run']}: replay needs CPU capability {pinned}, got {running}")
    keys = ("run", "label", "mode", "experiment", "data_dir", "scratch", "exact")
    with warnings.catch_warnings():
        # LEHI's one-time large-step warning is expected of the readings being replayed.
        warnings.filterwarnings("ignore", message=r"\w+: the step-\d+ update of")
        return asdict(replay(task["path"], **{k: task[k] for k in keys}))


def _replay_config(
    path: str | Path, experiment: str, data_dir: str, scratch: str, mode: str
) -> tuple[dict[str, Any], str | None]:
    """HEAD's config for the run in ``path``, pointed at ``scratch``, and the first identity
    key where it differs from the recorded config (None when it does not)."""
    rec = record.RunRecord(path)
    recorded = rec.read_config() or {}
    config = compose_at_head(experiment, recorded, data_dir)
    changed = first_difference(record.identity(recorded), record.identity(config))
    # The thread count the run used (env.json), whatever its config left to torch: matrix
    # products split their sums by thread, so a run made in a 1-thread sweep worker replays
    # bit for bit only on one thread (measured on mnist: row 3 differs in the 8th digit on 2).
    threads = (rec.read_env() or {}).get("num_threads")
    if isinstance(threads, int) and threads > 0:
        config["trainer"]["threads"] = threads  # not part of the identity
    config["paths"].update(results_dir=scratch, run_dir=None)
    config["logger"] = {**config["logger"], "name": "files", "mode": "disabled"}
    config["trainer"].update(progress=False, force=True, resume=False)
    if mode == "prefix":
        config["trainer"]["stop_after_evaluations"] = 1
    return config, changed


def replay(
    path: str | Path,
    *,
    run: str,
    label: str,
    mode: str,
    experiment: str,
    data_dir: str,
    scratch: str,
    exact: bool,
) -> Outcome:
    """Replay the run in folder ``path`` at HEAD into ``scratch`` and compare its rows
    (``mode`` "full" or "prefix"; ``exact`` or within the tolerance)."""
    from lehi.runner import BAD_INPUT, RunFailed
    from lehi.runner import run as train

    start = time.perf_counter()
    rec = record.RunRecord(path)
    summary = rec.read_summary() or {}
    out = Outcome(run, label, mode, ok=False)
    out.status_recorded = trainer_status(summary)
    try:
        config, changed = _replay_config(path, experiment, data_dir, scratch, mode)
    except Exception as exc:  # a preset HEAD can no longer compose is a failed verification
        out.difference = f"HEAD cannot compose its config: {str(exc).splitlines()[0]}"
        return out
    try:
        new_summary = train(config)
    except (*BAD_INPUT, RunFailed) as exc:
        out.difference = f"the replay failed: {str(exc).splitlines()[0]}"
        return out
    out.replayed_dir = str(record.run_dir(scratch, config))
    replayed = record.RunRecord(out.replayed_dir).read_metrics()
    diff, worst = compare_rows(
        rec.read_metrics(),
        replayed,
        exact=exact,
        metric_name=str(summary.get("metric") or ""),
        prefix=mode == "prefix",
    )
    out.rows, out.max_rel_diff, out.seconds = len(replayed), worst, time.perf_counter() - start
    out.row_difference = diff is not None
    if mode == "full":
        out.status_replayed = trainer_status(new_summary)
        if diff is None and out.status_replayed != out.status_recorded:
            diff = f"status: recorded {out.status_recorded}, replayed {out.status_replayed}"
    if changed:
        out.row_difference = False  # a changed config is never machine noise
        diff = f"config at HEAD differs ({changed}); " + (diff or "rows equal")
    out.ok, out.difference = diff is None, diff
    return out


# ----------------------------------------------------------------- the chaos horizon
#: The other kernels of the rounding replay: torch's baseline CPU code instead of its
#: AVX2/AVX512 kernels, MKL's compatible code path, and :data:`ROUNDING_THREADS` threads (which
#: split the matrix products' sums differently); its rows differ from the plain replay's only
#: by the rounding of the same float operations, as another CPU's would.
CAPABILITY_VARIABLE = "ATEN_CPU_CAPABILITY"
ROUNDING_ENV = {CAPABILITY_VARIABLE: "default", "MKL_CBWR": "COMPATIBLE"}
ROUNDING_THREADS = 2


def _rounding_task(task: dict[str, Any]) -> str | None:
    """Train the run again under :data:`ROUNDING_ENV`; its folder, or None if it failed."""
    import logging
    import warnings

    from lehi.runner import BAD_INPUT, RunFailed
    from lehi.runner import run as train

    logging.getLogger("lehi").setLevel(logging.WARNING)
    try:
        config, _ = _replay_config(
            task["path"], task["experiment"], task["data_dir"], task["scratch"], task["mode"]
        )
        config["trainer"]["threads"] = ROUNDING_THREADS  # not part of the identity
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"\w+: the step-\d+ update of")
            train(config)
    except (*BAD_INPUT, RunFailed):
        return None
    return str(record.run_dir(task["scratch"], config))


def chaos_horizon(
    replayed: Sequence[Mapping[str, Any]], rounding: Sequence[Mapping[str, Any]]
) -> int:
    """How many leading rows two replays that differ only in rounding agree on to within
    :data:`HORIZON_FRACTION` × :data:`REL_TOLERANCE`: the rows another machine can check.

    Past it the run amplifies rounding (pure LEHI's first steps, high LRs, blow-ups) until
    another CPU's numbers are another trajectory, so no tolerance could tell a changed method
    from a changed machine there.
    """
    limit = HORIZON_FRACTION * REL_TOLERANCE
    for i, (a, b) in enumerate(zip(replayed, rounding, strict=False)):
        for column in TOLERANT:
            x, y = a[column], b[column]
            if x == y:
                continue
            if not (math.isfinite(x) and math.isfinite(y)):
                return i
            if abs(x - y) > limit * max(abs(x), abs(y)):
                return i
    return min(len(replayed), len(rounding))


def _within_horizon(outcome: Outcome, task: dict[str, Any], rounding_dir: str | None) -> None:
    """Judge a tolerance-mode row difference inside the run's chaos horizon only."""
    if rounding_dir is None or outcome.replayed_dir is None:
        return
    rec = record.RunRecord(task["path"])
    replayed = record.RunRecord(outcome.replayed_dir).read_metrics()
    outcome.horizon = chaos_horizon(replayed, record.RunRecord(rounding_dir).read_metrics())
    diff, _ = compare_rows(
        rec.read_metrics(),
        replayed,
        exact=False,
        metric_name=str((rec.read_summary() or {}).get("metric") or ""),
        prefix=outcome.mode == "prefix",
        horizon=outcome.horizon,
    )
    same_status = outcome.mode == "prefix" or outcome.status_replayed == outcome.status_recorded
    if diff is None and same_status:
        outcome.ok, outcome.difference = True, None
    elif diff is not None:
        outcome.difference = f"{diff} (inside the chaos horizon of {outcome.horizon} rows)"


def verify(
    root: str | Path,
    experiments: Sequence[str] = (),
    *,
    data_dir: str | None = None,
    jobs: int = 1,
    prefix_every: int = PREFIX_EVERY,
    scratch: str | Path | None = None,
    write: bool = True,
    on_done: Callable[[Verification], None] | None = None,
    labels: Sequence[str] = (),
) -> list[Verification]:
    """Verify each experiment under ``root`` (all when ``experiments`` is empty); with
    ``labels``, only those optimizer labels, the others kept from verified.json."""
    from lehi.results import store

    root = Path(root)
    runs = store.load_runs(root)
    known = sorted(set(runs["experiment"])) if not runs.empty else []
    unknown = [e for e in experiments if e not in known]
    if unknown:
        raise VerifyError(
            f"no runs of {', '.join(unknown)} under {root}; experiments here: "
            f"{', '.join(known) or 'none'}"
        )
    here = record.machine()
    commit = record.git("rev-parse", "HEAD")
    scratch_root = Path(scratch or tempfile.mkdtemp(prefix="lehi-verify-"))
    results: list[Verification] = []
    try:
        for exp in experiments or known:
            group = runs[runs["experiment"] == exp]
            rows = [
                {
                    "run": r["run"],
                    "label": r["optimizer"],
                    "status": r["status"],
                    "lr": r["lr"],
                    "seed": r["seed"],
                    "val_loss": r["val_loss"],
                    "path": r["path"],
                }
                for r in group.to_dict("records")
            ]
            results.append(
                _verify_experiment(
                    root,
                    exp,
                    rows,
                    here,
                    commit,
                    data_dir,
                    jobs,
                    prefix_every,
                    scratch_root,
                    write,
                    labels,
                )
            )
            if on_done is not None:
                on_done(results[-1])
    finally:
        if scratch is None:
            shutil.rmtree(scratch_root, ignore_errors=True)
    return results


def _training_code_dirty(experiment: str) -> bool | None:
    status = record.git("status", "--porcelain", "--", *record.training_code(experiment))
    return None if status is None else bool(status.strip())


def _verify_experiment(
    root: Path,
    exp: str,
    rows: list[dict[str, Any]],
    here: dict[str, Any],
    commit: str | None,
    data_dir: str | None,
    jobs: int,
    prefix_every: int,
    scratch: Path,
    write: bool,
    labels: Sequence[str] = (),
) -> Verification:
    replays = plan_replays(rows, prefix_every)
    paths = {r["run"]: r["path"] for r in rows}
    head = {
        "commit": commit,
        "training_code": record.training_code_digest(experiment=exp),
        "dirty": _training_code_dirty(exp),
    }
    previous = None
    if labels:
        present = {r.label for r in replays}
        unknown = [label for label in labels if label not in present]
        if unknown:
            raise VerifyError(
                f"{exp}: no runs labelled {', '.join(unknown)}; labels: {', '.join(sorted(present))}"
            )
        previous = read_verification(root / exp)
        _check_kept(exp, previous, here, head)  # before replaying anything
        replays = [r for r in replays if r.label in labels]
    verification, seconds = replay_all(exp, replays, paths, here, data_dir, jobs, scratch)
    if labels:
        verification, seconds = merge_labels(previous, verification, here, head, seconds)
    stale = {r["run"]: summary_difference(r["path"]) for r in rows}
    verification.stale_summaries = {run: diff for run, diff in stale.items() if diff is not None}
    if write:
        _write(root / exp / VERIFIED, verification, here, head, seconds)
    return verification


def _check_kept(
    exp: str,
    previous: Mapping[str, Any] | None,
    here: Mapping[str, Any],
    head: Mapping[str, Any],
    comparison: str | None = None,
) -> None:
    """Raise VerifyError unless ``previous`` (a verified.json) verified HEAD's training code,
    committed, on this machine (and, given ``comparison``, in that mode): only then are its
    replays still evidence at HEAD."""
    if previous is None:
        raise VerifyError(f"{exp}: no verified.json to keep the other labels from; verify it all")
    same = {
        "training code": (previous.get("training_code"), head["training_code"]),
        "machine": (previous.get("machine"), dict(here)),
    }
    if comparison is not None:
        same["comparison"] = (previous.get("comparison"), comparison)
    for what, (was, now) in same.items():
        if was != now:
            raise VerifyError(
                f"{exp}: its verified.json has another {what} ({was} against {now}); verify it all"
            )
    if previous.get("training_code_dirty") or head["dirty"]:
        raise VerifyError(f"{exp}: uncommitted training code; commit it and verify it all")


def merge_labels(
    previous: Mapping[str, Any] | None,
    fresh: Verification,
    here: Mapping[str, Any],
    head: Mapping[str, Any],
    seconds: float,
) -> tuple[Verification, float]:
    """``fresh`` (the replays of some labels) with the other labels' replays of ``previous``
    (a verified.json, checked by :func:`_check_kept`), and the seconds of both."""
    _check_kept(fresh.experiment, previous, here, head, fresh.comparison)
    assert previous is not None  # _check_kept raised otherwise
    relabelled = {o.label for o in fresh.outcomes}
    kept = [Outcome(**o) for o in previous.get("replays", []) if o.get("label") not in relabelled]
    merged = Verification(fresh.experiment, fresh.comparison)
    merged.outcomes = sorted([*kept, *fresh.outcomes], key=lambda o: o.run)
    merged.capabilities = sorted({*previous.get("replayed_capabilities", []), *fresh.capabilities})
    return merged, float(previous.get("seconds") or 0.0) + seconds


def replay_all(
    exp: str,
    replays: Sequence[Replay],
    paths: Mapping[str, str],
    here: Mapping[str, Any],
    data_dir: str | None,
    jobs: int,
    scratch: Path,
) -> tuple[Verification, float]:
    """Replay ``replays`` (folders in ``paths``) and judge them: exactly when this machine
    can compute as each run's machine did (pinned to its CPU capability), else within the
    tolerance inside each run's chaos horizon."""
    pins = {
        r.run: replay_capability(record.RunRecord(paths[r.run]).read_env(), here) for r in replays
    }
    exact = all(pin is not None for pin in pins.values())
    tasks = []
    for r in replays:
        recorded = record.RunRecord(paths[r.run]).read_config() or {}
        tasks.append(
            {
                **asdict(r),
                "experiment": exp,
                "path": paths[r.run],
                "data_dir": data_dir or _dotted(recorded, "paths.data_dir") or "data",
                "scratch": str(scratch / exp),
                "exact": exact,
                "capability": pins[r.run] if exact else None,
            }
        )
    start = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    for capability in sorted({t["capability"] or "" for t in tasks}):
        group = [t for t in tasks if (t["capability"] or "") == capability]
        if capability in ("", here["cpu_capability"]) and (jobs == 1 or len(group) == 1):
            done = [_replay_task(t) for t in group]
        else:
            pinned = {CAPABILITY_VARIABLE: capability.lower()} if capability else {}
            with _spawn_pool(min(jobs, len(group)), pinned) as pool:
                done = pool.map(_replay_task, group, chunksize=1)
        outcomes.update((o["run"], Outcome(**o)) for o in done)
    ordered = [outcomes[t["run"]] for t in tasks]
    if not exact:
        _horizon_pass(ordered, tasks, scratch / "rounding", jobs)
    verification = Verification(exp, "exact" if exact else "tolerance")
    verification.outcomes = ordered
    verification.capabilities = sorted({t["capability"] for t in tasks if t["capability"]})
    return verification, time.perf_counter() - start


@contextlib.contextmanager
def _spawn_pool(processes: int, environment: Mapping[str, str]) -> Iterator[Any]:
    """A pool of fresh (spawned) workers that start with ``environment`` added to this
    process's: the kernels a worker's torch uses are fixed by variables it reads before its
    first import of torch, so they are set here, in the parent, while the workers start."""
    before = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            yield pool
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _horizon_pass(
    outcomes: list[Outcome], tasks: list[dict[str, Any]], scratch: Path, jobs: int
) -> None:
    """Replays whose rows differ beyond the tolerance on another machine are trained once
    more under :data:`ROUNDING_ENV` and judged inside their chaos horizon."""
    pending = [(o, t) for o, t in zip(outcomes, tasks, strict=True) if o.row_difference]
    if not pending:
        return
    work = [{**t, "scratch": str(scratch / t["experiment"])} for _, t in pending]
    with _spawn_pool(max(1, min(jobs, len(work))), ROUNDING_ENV) as pool:
        dirs = pool.map(_rounding_task, work, chunksize=1)
    for (outcome, task), rounding_dir in zip(pending, dirs, strict=True):
        _within_horizon(outcome, task, rounding_dir)


def _write(
    path: Path, v: Verification, here: dict[str, Any], head: dict[str, Any], seconds: float
) -> None:
    document = {
        "experiment": v.experiment,
        "result": v.result,
        "comparison": v.comparison,
        "replayed_capabilities": v.capabilities,
        "rel_tolerance": None if v.comparison == "exact" else REL_TOLERANCE,
        "head_commit": head["commit"],
        "training_code": head["training_code"],
        "training_code_dirty": head["dirty"],
        "machine": here,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 1),
        "labels": v.labels(),
        "stale_summaries": v.stale_summaries,
        "replays": [asdict(o) for o in v.outcomes],
    }
    atomic_write_text(path, json.dumps(record.json_safe(document), indent=2) + "\n")


def read_verification(exp_dir: Path) -> dict[str, Any] | None:
    """``<exp>/verified.json``, or None when absent or unreadable."""
    try:
        value = json.loads((exp_dir / VERIFIED).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
