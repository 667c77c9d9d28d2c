"""Trainer overhead: lehi.train.Trainer against a bare hand-written PyTorch loop.

Both train the same MLP (784-256-256-10) with torch's Adam on the same on-device tensors
(MNIST-shaped random data, batch 128) for the same steps; the trainer's evaluation is
excluded (its train_time clock stops during evaluation). Runs alternate, medians are
reported:

    python benchmarks/trainer_overhead.py [--threads 1] [--steps 400] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lehi.models
from lehi.config import compose
from lehi.data import DataBundle, TensorBatches
from lehi.train import Trainer
from lehi.trainer_config import TrainerConfig


def make_bundle(n: int, batch_size: int) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    val = TensorBatches(x[:512], y[:512], 512, shuffle=False, drop_last=False)
    return DataBundle(
        name="synthetic-mnist",
        loss="cross_entropy",
        metric="accuracy",
        task="classification",
        input_shape=(784,),
        num_outputs=10,
        train=TensorBatches(x, y, batch_size),
        val=val,
    )


def new_model_and_optimizer(bundle: DataBundle):
    torch.manual_seed(0)
    model = lehi.models.build("mlp", bundle, hidden=(256, 256))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def bare_loop(bundle: DataBundle, steps: int) -> float:
    model, opt = new_model_and_optimizer(bundle)
    model.train()
    done, start = 0, time.perf_counter()
    epoch = 0
    while done < steps:
        for x, y in bundle.train.iter_epoch(epoch, 0):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    return time.perf_counter() - start


def trainer_loop(bundle: DataBundle, steps: int) -> float:
    model, opt = new_model_and_optimizer(bundle)
    trainer_section = compose(["trainer.device=cpu", "trainer.progress=false"])["trainer"]
    config = TrainerConfig.from_config(
        trainer_section, epochs=None, max_steps=steps, eval_every=steps, log_every=10
    )
    trainer = Trainer(model, opt, bundle, config, device=torch.device("cpu"), seed=0, record=None)
    trainer.fit()
    return trainer.train_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = make_bundle(n=128 * 100, batch_size=128)
    bare_loop(bundle, 50)
    trainer_loop(bundle, 50)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(bundle, args.steps))
        ours.append(trainer_loop(bundle, args.steps))
    b, t = statistics.median(bare), statistics.median(ours)
    print(f"threads={args.threads} steps={args.steps} repeats={args.repeats}")
    print("| loop | ms/step (median) |")
    print("|---|---|")
    print(f"| bare PyTorch loop | {1e3 * b / args.steps:.3f} |")
    print(f"| lehi Trainer | {1e3 * t / args.steps:.3f} |")
    print(f"trainer / bare = {t / b:.3f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
