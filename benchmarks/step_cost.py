"""Per-step cost of every optimizer of an experiment preset, measured side by side.

Writes ``<root>/<experiment>/step_cost.json`` (format: lehi/results/stepcost.py), which
lehi.results turns into the time-per-step and time-to-target numbers of the summary and the
cost figures. Sweep runs cannot give those numbers: they ran two at a time on shared cores,
so their wall times measure the machine's load as much as the optimizer.

Each optimizer is planned and built exactly as ``run.py experiment=<preset> optimizer=<name>``
would (lehi.runner.plan/build: same data, model, batch, precision, gradient clipping and
schedule; nothing is written), then all are stepped in one process, round-robin: a repeat
times ``--steps`` trainer steps (Trainer.train_step on the preset's own training batches) of
each optimizer in turn, the starting optimizer rotating from one repeat to the next so that
drift in the machine's speed hits all alike. Every optimizer is first warmed up the same way.

    python benchmarks/step_cost.py --experiment mnist_small            # ~1 min on 1 thread
    python benchmarks/step_cost.py --experiment ptb_small --repeats 5 --steps 10
"""

# ruff: noqa: E402 - the path fix below must run before the package imports
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/step_cost.py`
    sys.path.insert(0, str(REPO))

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lehi import roster
from lehi.record import dirty_files, git
from lehi.results import stepcost
from lehi.runner import build, plan

CONF = REPO / "conf"


def preset_optimizers(experiment: str) -> list[str]:
    """The optimizers the preset sweeps (``glob(*)``: every conf/optimizer/*.yaml)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", [f"experiment={experiment}"], return_hydra_config=True)
    spec = str(OmegaConf.select(cfg, "hydra.sweeper.params.optimizer", default="") or "")
    if not spec or spec.startswith("glob("):
        names = [p.stem for p in (CONF / "optimizer").glob("*.yaml")]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    return sorted(names, key=roster.rank)


class Contender:
    """One optimizer of the preset, built as a run would be, with its own batch stream."""

    def __init__(self, experiment: str, optimizer: str, overrides: Sequence[str], tmp: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                "config",
                [
                    f"experiment={experiment}",
                    f"optimizer={optimizer}",
                    f"paths.results_dir={tmp}",
                    "logger.mode=disabled",
                    *overrides,
                ],
            )
        self.plan = plan(cfg)
        self.label = str(self.plan.config["optimizer"]["label"])
        self.name = str(self.plan.config["optimizer"]["name"])
        self.trainer = build(self.plan).trainer
        self.accum = self.plan.trainer.grad_accum
        self.batches = self._batches()

    def _batches(self) -> Iterator[tuple[Any, Any]]:
        for epoch in itertools.count():
            yield from self.trainer.bundle.train.iter_epoch(epoch, self.plan.seed)

    def steps(self, n: int) -> float:
        """Run ``n`` trainer steps; return the seconds they took (device synchronised)."""
        device = self.trainer.device
        start = time.perf_counter()
        for _ in range(n):
            self.trainer.train_step(list(itertools.islice(self.batches, self.accum)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def _passes(c: Contender) -> int:
    # Curvature optimizers count their auxiliary backward passes; Adam has none.
    return int(getattr(c.trainer.optimizer, "curvature_passes", 0))


def measure(contenders: list[Contender], repeats: int, steps: int, warmup: int) -> dict:
    """Round-robin timing; per label the ms per step of each repeat (same repeat order)."""
    for c in contenders:
        c.steps(warmup)
    passes = {c.label: _passes(c) for c in contenders}
    ms: dict[str, list[float]] = {c.label: [] for c in contenders}
    for r in range(repeats):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            ms[c.label].append(1000 * c.steps(steps) / steps)
    done = repeats * steps
    return {
        c.label: {
            "name": c.name,
            "ms_per_step": ms[c.label],
            "curvature_passes_per_step": (_passes(c) - passes[c.label]) / done,
        }
        for c in contenders
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", required=True, help="preset name (experiments/*.yaml)")
    parser.add_argument("--root", default="results", help="results tree (default: results)")
    parser.add_argument("--optimizers", nargs="*", help="default: the preset's sweep list")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps per optimizer per repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (sweeps use 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="default: <root>/<experiment>/step_cost.json")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every optimizer")
    args = parser.parse_args(argv)
    if min(args.repeats, args.steps) < 1 or args.warmup < 0:
        parser.error("--repeats and --steps must be ≥ 1, --warmup ≥ 0")
    os.environ.setdefault("WANDB_MODE", "disabled")
    names = args.optimizers or preset_optimizers(args.experiment)
    overrides = [f"trainer.threads={args.threads}", f"trainer.device={args.device}"]
    with tempfile.TemporaryDirectory() as tmp:
        contenders = [
            Contender(args.experiment, n, [*overrides, *args.overrides], tmp) for n in names
        ]
        optimizers = measure(contenders, args.repeats, args.steps, args.warmup)
        device = contenders[0].trainer.device
    dirty = dirty_files()
    data = {
        "format": stepcost.FORMAT,
        "experiment": args.experiment,
        "method": stepcost.METHOD,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),  # None: git cannot tell
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps_per_repeat": args.steps,
        "warmup_steps": args.warmup,
        "overrides": list(args.overrides),
        "optimizers": optimizers,
    }
    path = stepcost.write(args.out or stepcost.path_for(args.root, args.experiment), data)
    ref = optimizers.get(roster.REFERENCE)
    for label, entry in optimizers.items():
        values = sorted(entry["ms_per_step"])
        median = values[len(values) // 2]
        ratio = ""
        if ref is not None:
            ratios = sorted(a / b for a, b in zip(entry["ms_per_step"], ref["ms_per_step"]))
            ratio = f"  ×{ratios[len(ratios) // 2]:.2f} vs {roster.REFERENCE}"
        print(f"{label:>10}: {median:8.3f} ms/step{ratio}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
