"""Steps/s of each dataset's default model on this machine, Adam and LEHI side by side.

Synthetic inputs of each dataset's shape and batch (the step's cost does not depend on the
values); the step is the trainer's: one forward, the loss, lehi.optim.backward, optimizer step.

    python benchmarks/steps_per_second.py [--threads 2] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

import lehi.models
from lehi.curvature import get_loss_rule
from lehi.optim import backward, build_optimizer

# name: (model, model options, input shape, outputs, batch, loss, token sequence length)
WORKLOADS = {
    "digits (mlp_small)": ("mlp", {"hidden": (128, 128)}, (64,), 10, 64, "cross_entropy", 0),
    "mnist (mlp)": ("mlp", {"hidden": (256, 256)}, (784,), 10, 128, "cross_entropy", 0),
    "protein (mlp)": ("mlp", {"hidden": (256, 256)}, (9,), 1, 128, "mse", 0),
    "cifar10_small (cnn)": ("cnn", {}, (3, 32, 32), 10, 128, "cross_entropy", 0),
    "cifar10 (resnet18)": ("resnet18", {}, (3, 32, 32), 10, 128, "cross_entropy", 0),
    "ptb_small (lstm_small)": ("lstm", {"size": "small"}, (), 10000, 20, "cross_entropy", 35),
    "ptb (lstm_medium)": ("lstm", {"size": "medium"}, (), 10000, 20, "cross_entropy", 35),
    "fineweb_small (llama small)": (
        "llama",
        {"size": "small"},
        (),
        50257,
        16,
        "cross_entropy",
        128,
    ),
}


def batch(shape, outputs, size, loss, seq):
    g = torch.Generator().manual_seed(0)
    if seq:
        x = torch.randint(0, outputs, (size, seq), generator=g)
        return x, torch.randint(0, outputs, (size, seq), generator=g)
    x = torch.randn(size, *shape, generator=g)
    if loss == "mse":
        return x, torch.randn(size, outputs, generator=g)
    return x, torch.randint(0, outputs, (size,), generator=g)


def steps_per_second(name: str, optimizer: str, seconds: float) -> float:
    model_name, options, shape, outputs, size, loss, seq = WORKLOADS[name]
    torch.manual_seed(0)
    bundle = SimpleNamespace(input_shape=shape, num_outputs=outputs)
    model = lehi.models.build(model_name, bundle, **options)
    opt = build_optimizer(optimizer, model.parameters(), lr=1e-4, loss=loss, seed=0)
    rule = get_loss_rule(loss)
    x, y = batch(shape, outputs, size, loss, seq)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        backward(opt, rule.loss(out, y, -100), out, y)
        opt.step()

    step()
    done, start = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - start < seconds:
        step()
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", nargs="*", default=list(WORKLOADS), help="workload names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu, {args.threads} threads, ≥{args.seconds:g} s per cell")
    print("| dataset (model) | Adam steps/s | LEHI steps/s | LEHI / Adam time per step |")
    print("|---|---:|---:|---:|")
    for name in args.only:
        adam = steps_per_second(name, "adam", args.seconds)
        lehi = steps_per_second(name, "lehi", args.seconds)
        print(f"| {name} | {adam:.1f} | {lehi:.1f} | {adam / lehi:.2f} |", flush=True)


if __name__ == "__main__":
    main()
