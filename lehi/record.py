"""The run record: a run's identity, its folder and every file in it.

This module is the one owner of the results layout. The runner and the trainer write through
it, ``lehi.results`` reads through it; nothing else knows a file name.

A run folder is ``<results>/<experiment>/<optimizer label>/lr=<lr>/seed=<seed>-<id>`` where
``<id>`` is a short digest of the run's *identity*: its resolved config minus the keys that
cannot change its numbers (:data:`NON_IDENTITY`). Two configs that could train differently
never share a folder, so a skip or a resume only ever continues the very same run.

Files (each written atomically): ``config.yaml`` (the resolved config), ``metrics.csv`` (one
row per logging window and per evaluation), ``summary.json`` (written once, when the run ends:
completed, diverged or failed), ``env.json`` (git commit and dirty flag, library versions,
device), ``run.log`` (the run's log, tracebacks included), and while the run can be resumed
``checkpoint.pt``. A lock on the folder keeps a second process off a run that is in use.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lehi.io import atomic_write_text

__all__ = [
    "METRIC_COLUMNS",
    "NON_IDENTITY",
    "RunBusyError",
    "RunRecord",
    "environment",
    "find_runs",
    "identity",
    "identity_hash",
    "json_safe",
    "run_dir",
]

METRIC_COLUMNS = (
    "step",
    "epoch",
    "split",
    "loss",
    "metric",
    "lr",
    "wall_time",
    "train_time",
    "curvature_passes",
)

#: Config keys that say where or how a run is stored, shown or scheduled, not what it
#: computes. Everything else is the run's identity. The thread count is left out: it is
#: recorded in env.json, and on CPU it can change float summation order in the last bits
#: only (reruns agree to far better than the 1 % the reproducibility checks allow).
#: ``trainer.device`` is where the run happened (env.json), the precision it used is part
#: of the identity. ``optimizer.label`` is a display name (it is in the folder path);
#: ``optimizer.warn_update_above`` only decides whether LEHI warns about a large first step;
#: ``experiment.reuse_from`` only says where an identical finished run may be found.
NON_IDENTITY = (
    "paths",
    "logger",
    "dataset.data_dir",
    "experiment.reuse_from",
    "optimizer.label",
    "optimizer.warn_update_above",
    "trainer.device",
    "trainer.threads",
    "trainer.resume",
    "trainer.force",
    "trainer.progress",
    "trainer.checkpoint",
    "trainer.keep_checkpoint",
    "trainer.stop_after_evaluations",
)

#: Keys added after runs were committed, each with the value at which the run computes what
#: the code computed before the key existed. At that value the key is left out of the
#: identity, so adding an option re-keys (and expires) no committed run; any other value is
#: part of the identity like every other key.
NEUTRAL_VALUES: dict[str, Any] = {
    "trainer.eval_subset_batches": None,
}


class RunBusyError(RuntimeError):
    """Another process holds the run folder's lock."""


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _parent(tree: dict[str, Any], dotted: str) -> tuple[dict[str, Any] | None, str]:
    """The dict holding the dotted key's leaf in ``tree`` (None when there is none), and the leaf."""
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config minus :data:`NON_IDENTITY` and the keys at their
    :data:`NEUTRAL_VALUES`: what decides the run's numbers."""
    kept: dict[str, Any] = json.loads(json.dumps(dict(config), default=str))
    for dotted in NON_IDENTITY:
        node, leaf = _parent(kept, dotted)
        if node is not None:
            node.pop(leaf, None)
    for dotted, neutral in NEUTRAL_VALUES.items():
        node, leaf = _parent(kept, dotted)
        if node is not None and leaf in node and node[leaf] == neutral:
            del node[leaf]
    return kept


def identity_hash(config: Mapping[str, Any]) -> str:
    """Eight hex digits of SHA-256 over the canonical JSON of :func:`identity`."""
    canonical = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def run_dir(results_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> Path:
    """``<results>/<experiment>/<label>/lr=<lr>/seed=<seed>-<identity hash>``."""
    lr = float(config["optimizer"]["lr"])
    return (
        Path(results_dir)
        / str(config["experiment"]["name"])
        / str(config["optimizer"]["label"])
        / f"lr={lr:g}"
        / f"seed={config['seed']}-{identity_hash(config)}"
    )


class RunRecord:
    """The files of one run folder."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(run_dir)
        self.config = self.dir / "config.yaml"
        self.metrics = self.dir / "metrics.csv"
        self.summary = self.dir / "summary.json"
        self.env = self.dir / "env.json"
        self.log = self.dir / "run.log"
        self.checkpoint = self.dir / "checkpoint.pt"

    def __repr__(self) -> str:
        return f"RunRecord({str(self.dir)!r})"

    # ------------------------------------------------------------------------- reading
    def read_config(self) -> dict[str, Any] | None:
        """The resolved config the run was made with, or None when absent or unreadable."""
        try:
            config = yaml.safe_load(self.config.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return config if isinstance(config, dict) else None

    def read_summary(self) -> dict[str, Any] | None:
        """The summary if the run has ended (completed, diverged or failed), else None."""
        return _read_json(self.summary)

    def read_env(self) -> dict[str, Any] | None:
        return _read_json(self.env)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.csv with numbers parsed back; [] when there is no file."""
        if not self.metrics.exists():
            return []
        with self.metrics.open(newline="") as f:
            rows = list(csv.DictReader(f))
        return [
            {k: (row[k] if k == "split" else _parse_number(row[k], k)) for k in METRIC_COLUMNS}
            for row in rows
        ]

    # ------------------------------------------------------------------------- writing
    def write_config(self, config: Mapping[str, Any]) -> None:
        text = yaml.safe_dump(json_safe(dict(config)), sort_keys=False, allow_unicode=True)
        atomic_write_text(self.config, text)

    def write_env(self, env: Mapping[str, Any]) -> None:
        atomic_write_text(self.env, json.dumps(json_safe(dict(env)), indent=2) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.summary, json.dumps(json_safe(dict(summary)), indent=2) + "\n")

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in METRIC_COLUMNS})
        atomic_write_text(self.metrics, buffer.getvalue())

    def clear(self) -> None:
        """Remove a previous attempt's results before a fresh start (its log stays, appended to)."""
        for path in (self.metrics, self.summary, self.checkpoint):
            path.unlink(missing_ok=True)
        self.remove_stale_temp_files()

    def remove_stale_temp_files(self) -> None:
        """Temp files a killed writer left behind (``.<name>.*.tmp``); call under the lock."""
        for path in self.dir.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; RunBusyError if another process holds it.

        The lock is an flock on the folder itself: no lock file to clean up, and it dies
        with its process, so a killed run never leaves the folder locked.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusyError(
                    f"{self.dir} is in use by another process (the same run started twice?)"
                ) from None
            yield
        finally:
            os.close(fd)


def find_runs(root: str | os.PathLike[str]) -> list[RunRecord]:
    """Every run folder under ``root`` that holds a summary.json, sorted by path."""
    return [RunRecord(p.parent) for p in sorted(Path(root).rglob("summary.json"))]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return "" if value is None else value


def _parse_number(text: str | None, key: str) -> float | int | None:
    if text is None or text == "":
        return None
    if key in ("step", "curvature_passes"):
        return int(text)
    return float(text)


# ----------------------------------------------------------------------------- env.json
#: The checkout this code runs from (a worktree's own folder when run from one).
REPO = Path(__file__).resolve().parents[1]

#: Training code: everything that can change a run's metrics rows (data, models, optimizers,
#: curvature, trainer, runner, this record, configs, presets, run.py), as git pathspecs.
#: Analysis code (:data:`ANALYSIS_CODE`: lehi.results, the diagnostics studies, plots) reads
#: finished runs and never expires them. A run is current while its experiment's training code
#: (:func:`training_code`) at its commit equals HEAD's, or while a verification at HEAD's
#: replays it to the same rows (``python -m lehi.results verify``).
ANALYSIS_CODE = ("lehi/results", "lehi/diagnostics", "plots")
TRAINING_CODE = ("lehi", "conf", "experiments", "run.py", *(f":!{p}" for p in ANALYSIS_CODE))
PRESETS = "experiments"


def training_code(experiment: str | None = None) -> tuple[str, ...]:
    """The pathspecs of :data:`TRAINING_CODE`; for one ``experiment``, with its own preset
    (``experiments/<experiment>.yaml``) in place of the whole folder: a run reads no other
    preset (presets include conf/ groups, never each other), so adding or changing another
    experiment expires none of its runs."""
    if experiment is None:
        return TRAINING_CODE
    own = f"{PRESETS}/{experiment}.yaml"
    return tuple(own if p == PRESETS else p for p in TRAINING_CODE)


def git(*args: str) -> str | None:
    """``git <args>`` in this checkout; None when git or the repository is unavailable."""
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=REPO,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None


def dirty_files() -> list[str] | None:
    """Files that make this checkout dirty for a run; None when git cannot tell.

    A tracked file outside results/ and plots/figures/ (which sweeps and figures write) that
    differs from the commit, or an untracked file in the training code.
    """
    tracked = git("status", "--porcelain", "--untracked-files=no", "--", ".", *_NOT_CODE)
    untracked = git("status", "--porcelain", "--", *TRAINING_CODE)
    if tracked is None or untracked is None:
        return None
    return sorted({line[3:] for line in f"{tracked}\n{untracked}".splitlines() if line.strip()})


def training_code_digest(commit: str = "HEAD", experiment: str | None = None) -> str | None:
    """A digest of the training code at ``commit`` (its blobs; ``experiment``'s, see
    :func:`training_code`), None when git cannot tell.

    Two commits with the same digest train every run (of ``experiment``) identically, whatever
    else differs.
    """
    included = [p for p in training_code(experiment) if not p.startswith(":!")]
    listing = git("ls-tree", "-r", commit, "--", *included)
    if listing is None:
        return None
    kept = [
        line
        for line in listing.splitlines()
        if not any(line.split("\t", 1)[-1].startswith(f"{p}/") for p in ANALYSIS_CODE)
    ]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def machine() -> dict[str, Any]:
    """The machine's numerics: CPU model and torch's CPU kernel capability (AVX2, AVX512…, as
    torch runs it: ``ATEN_CPU_CAPABILITY`` can pin it lower), torch version, and the GPU when
    there is one. Runs replay bit for bit on an equal one, or on a CPU of the same model and a
    higher capability pinned to the recorded one (lehi.results.verify)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def environment(device: Any) -> dict[str, Any]:
    """Where and with what a run ran: git commit and dirty flag, library versions, machine.

    ``git_dirty`` follows :func:`dirty_files`, which ``dirty_files`` lists (up to 20).
    """
    import torch

    dirty = dirty_files()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    numerics = machine()
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "dirty_files": (dirty or [])[:20],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": device_name,
        "cpu": numerics["cpu"],
        "cpu_capability": numerics["cpu_capability"],
        "gpu": numerics["gpu"],
        "num_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


_NOT_CODE = (":!results", ":!plots/figures")
