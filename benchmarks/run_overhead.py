"""The fixed cost of a run: everything but its training steps, per dataset with local data.

Each dataset's small preset (digits, mnist_small, cifar10_small, protein_small, ptb_small,
fineweb_small) is run as `python run.py experiment=<preset> trainer.max_steps=1` in a fresh
process, `--repeats` times into a scratch results folder. For each run it prints the wall
time of the process, the train_time its summary records, the time of its evaluations (from
metrics.csv: each validation row's wall_time minus the previous row's; the first one also
holds the trainer's start) and the fixed cost, wall minus train_time, with and without the
evaluations. The first repeat may build the data caches (<data_dir>/<dataset>/.lehi-cache);
later repeats show a warm run. A last line times the imports every run pays (lehi.runner and
the first torch optimizer, which imports torch._dynamo).

    python benchmarks/run_overhead.py --data-dir /work/shared/data [--mirror] [--repeats 2]

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
IMPORTS = (
    "import torch, lehi.runner; "
    "torch.optim.Adam(torch.nn.Linear(2, 2).parameters())"  # imports torch._dynamo
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
    """Seconds spent in evaluations, from the wall_time column of metrics.csv."""
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    total, previous = 0.0, 0.0
    for row in rows:
        wall = float(row["wall_time"])
        if row["split"] == "val":
            total += wall - previous
        previous = wall
    return total


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
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    summaries = sorted(results.glob(f"{preset}/**/summary.json"))
    if done.returncode != 0 or not summaries:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{preset} failed (exit {done.returncode}): {tail}")
    summary = json.loads(summaries[-1].read_text())
    evals = evaluation_time(summaries[-1].with_name("metrics.csv"))
    train = float(summary["train_time"])
    return {"wall": wall, "train": train, "evals": evals, "fixed": wall - train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("LEHI_DATA_DIR", "data"))
    parser.add_argument("--datasets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="trainer.threads of each run")
    parser.add_argument("--mirror", action="store_true", help="run on symbolic links to the data")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="lehi-overhead-"))
    data_dir = args.data_dir.resolve()
    if args.mirror:
        data_dir = mirror(data_dir, scratch / "data")
    print(f"data: {data_dir}; each run: 1 training step, its evaluations, a fresh process")
    header = f"{'dataset':<9} {'preset':<14} {'run':>3} {'wall s':>7} {'train s':>8} "
    header += f"{'evals s':>8} {'wall-train s':>13} {'wall-train-evals s':>19}"
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
                    f"{r['evals']:>8.2f} {r['fixed']:>13.2f} {r['fixed'] - r['evals']:>19.2f}"
                )
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], cwd=REPO, check=True)
        print(
            f"imports alone (python, torch, lehi.runner, torch._dynamo): "
            f"{time.perf_counter() - start:.2f} s"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
