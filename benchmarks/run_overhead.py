"""The fixed cost of a run beyond `import torch`, per dataset with local data.

Each dataset's small preset (by default digits, mnist_small and protein_small; also
cifar10_small, ptb_small, fineweb_small with --datasets) is run as
`python run.py experiment=<preset> trainer.max_steps=1` in a fresh process, `--repeats`
times into a scratch results folder, each run right after a bare `python -c "import torch"`
process, so that both see the same load. For each run it prints the wall time of the
process, the train_time its summary records, the time of its evaluations (from metrics.csv:
each validation row's wall_time minus the previous row's; the first one also holds the
trainer's start), the fixed cost (wall minus train_time minus evaluations), the bare
`import torch` process beside it, and the difference: the fixed cost beyond `import torch`.
The first repeat may build the data caches (<data_dir>/<dataset>/.lehi-cache); later
repeats show a warm run. A last line times the imports every run pays (lehi.runner and a
first torch optimizer) and says whether they imported torch._dynamo. The 1-minute load
average is printed before and after: figures from a loaded machine are not comparable.

    python benchmarks/run_overhead.py --data-dir ../shared/data [--mirror] [--repeats 3]

--mirror runs on a temporary folder of symbolic links to the data files, so that caches can
be written when the data folder itself is read-only (they are removed afterwards).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# dataset: (preset, a file that must exist under the data folder; None = ships with a package)
PRESETS = {
    "digits": ("digits", None),
    "mnist": ("mnist_small", "mnist/MNIST/raw/train-labels-idx1-ubyte"),
    "cifar10": ("cifar10_small", "cifar10/cifar-10-batches-py/data_batch_1"),
    "protein": ("protein_small", "casp/CASP.csv"),
    "ptb": ("ptb_small", "ptb/ptb.train.txt"),
    "fineweb": ("fineweb_small", "fineweb/fineweb_first300docs.parquet"),
}
DEFAULT_DATASETS = ("digits", "mnist", "protein")
BARE = "import torch"
IMPORTS = (
    "import sys, torch, lehi.runner; "
    "torch.optim.Adam(torch.nn.Linear(2, 2).parameters()); "
    "print('torch._dynamo' in sys.modules)"
)


def mirror(data_dir: Path, target: Path) -> Path:
    """A copy of `data_dir`'s folder tree whose files are symbolic links to the originals."""
    for folder, _, files in os.walk(data_dir):
        relative = Path(folder).relative_to(data_dir)
        if ".lehi-cache" in relative.parts:
            continue
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / relative / name).symlink_to(Path(folder, name).resolve())
    return target


def evaluation_time(metrics: Path) -> float:
    """Seconds spent in evaluations (full and subset), from the wall_time column of
    metrics.csv."""
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    total, previous = 0.0, 0.0
    for row in rows:
        wall = float(row["wall_time"])
        if row["split"] in ("val", "val_subset"):
            total += wall - previous
        previous = wall
    return total


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds of a fresh process running ``command`` from the repository root."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, done


def one_run(preset: str, data_dir: Path, results: Path, threads: int | None) -> dict[str, float]:
    command = [
        sys.executable,
        "run.py",
        f"experiment={preset}",
        "trainer.max_steps=1",
        "trainer.epochs=null",
        "trainer.evaluations=null",
        "logger.mode=disabled",
        "trainer.progress=false",
        f"paths.data_dir={data_dir}",
        f"paths.results_dir={results}",
        "hydra.run.dir=" + str(results / "hydra"),
    ]
    if threads is not None:
        command.append(f"trainer.threads={threads}")
    bare, _ = timed([sys.executable, "-c", BARE])
    wall, done = timed(command)
    summaries = sorted(results.glob(f"{preset}/**/summary.json"))
    if done.returncode != 0 or not summaries:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{preset} failed (exit {done.returncode}): {tail}")
    summary = json.loads(summaries[-1].read_text())
    evals = evaluation_time(summaries[-1].with_name("metrics.csv"))
    train = float(summary["train_time"])
    fixed = wall - train - evals
    return {"wall": wall, "train": train, "evals": evals, "fixed": fixed, "bare": bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("LEHI_DATA_DIR", "data"))
    parser.add_argument(
        "--datasets", nargs="*", default=list(DEFAULT_DATASETS), choices=list(PRESETS)
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="trainer.threads of each run")
    parser.add_argument("--mirror", action="store_true", help="run on symbolic links to the data")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="lehi-overhead-"))
    data_dir = args.data_dir.resolve()
    if args.mirror:
        data_dir = mirror(data_dir, scratch / "data")
    print(f"data: {data_dir}; each run: 1 training step, its evaluations, a fresh process")
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
    header = f"{'dataset':<9} {'preset':<14} {'run':>3} {'wall s':>7} {'train s':>8} "
    header += f"{'evals s':>8} {'fixed s':>8} {'import torch s':>15} {'beyond torch s':>15}"
    print(header)
    try:
        for name in args.datasets:
            preset, needed = PRESETS[name]
            if needed is not None and not (data_dir / needed).exists():
                print(f"{name:<9} {preset:<14} skipped: no {data_dir / needed}")
                continue
            for repeat in range(args.repeats):
                results = scratch / f"results-{name}-{repeat}"
                try:
                    r = one_run(preset, data_dir, results, args.threads)
                except RuntimeError as exc:
                    print(f"{name:<9} {preset:<14} {exc}")
                    break
                print(
                    f"{name:<9} {preset:<14} {repeat + 1:>3} {r['wall']:>7.2f} {r['train']:>8.2f} "
                    f"{r['evals']:>8.2f} {r['fixed']:>8.2f} {r['bare']:>15.2f} "
                    f"{r['fixed'] - r['bare']:>15.2f}"
                )
        bare, _ = timed([sys.executable, "-c", BARE])
        wall, done = timed([sys.executable, "-c", IMPORTS])
        dynamo = done.stdout.strip() == "True"
        print(
            f"imports (torch, lehi.runner, a torch optimizer): {wall:.2f} s against "
            f"{bare:.2f} s for import torch alone; torch._dynamo imported: {dynamo}"
        )
        print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
