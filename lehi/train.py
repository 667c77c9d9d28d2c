"""The one training loop for every dataset and optimizer.

Each step computes ``outputs = model(x)`` once, the loss from them, and hands
(loss, outputs, targets) to ``lehi.optim.backward``, which fills ``.grad`` and, when a
curvature-aware optimizer refreshes its curvature this step, its Hessian-imitation estimate
from the same graph. Nothing else here knows which optimizer runs.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lehi.checkpoint import load_checkpoint, save_checkpoint
from lehi.curvature import get_loss_rule
from lehi.data import DataBundle
from lehi.distributed import Distributed
from lehi.logging import RunFiles
from lehi.models.flops import device_peak_flops, flops_per_token, mfu
from lehi.optim import backward

__all__ = ["Trainer", "TrainerConfig", "lr_lambda", "pick_device"]


@dataclass
class TrainerConfig:
    """The trainer's knobs (conf/trainer/default.yaml documents each)."""

    epochs: int | None = None
    max_steps: int | None = None
    grad_accum: int = 1
    eval_every: int | None = None
    log_every: int = 10
    grad_clip: float | None = None
    schedule: str = "constant"
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.1
    divergence_factor: float = 10.0
    checkpoint: bool = True
    precision: str = "fp32"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("trainer.epochs or trainer.max_steps must be set (a budget > 0)")
        for key in ("epochs", "max_steps", "eval_every", "log_every", "grad_accum"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"trainer.{key} must be a positive integer, got {value!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"trainer.schedule={self.schedule!r} is not one of constant, cosine")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(
                f"trainer.warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"trainer.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"trainer.precision={self.precision!r} is not one of fp32, bf16")


def pick_device(name: str) -> torch.device:
    """``auto`` → cuda > mps > cpu; otherwise the named device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_lambda(
    schedule: str, total_steps: int, warmup_fraction: float, min_lr_ratio: float
) -> Callable[[int], float]:
    """The LR multiplier after ``step`` steps: constant, or linear warm-up then cosine."""
    warmup = int(round(warmup_fraction * total_steps))

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


class Trainer:
    """Trains ``model`` on ``bundle`` with ``optimizer``, evaluating, logging, checkpointing.

    Args:
        model: the network (possibly wrapped by torch.compile or DDP).
        optimizer: any torch.optim.Optimizer; curvature-aware ones get their pass.
        bundle: the data, already on ``device``.
        config: the trainer's knobs.
        device: where the model and data live.
        seed: the run seed (data order, augmentation, dropout).
        files: the run folder, or None to write nothing (non-zero DDP ranks).
        on_row: called with every metrics row (W&B).
        state_model: the module whose state_dict is checkpointed (the unwrapped model).
        dist: this process's place in a torchrun job: it trains on its shard of each global
            batch and logs cross-rank means; None for a single process.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        bundle: DataBundle,
        config: TrainerConfig,
        *,
        device: torch.device,
        seed: int,
        files: RunFiles | None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        state_model: nn.Module | None = None,
        dist: Distributed | None = None,
    ) -> None:
        self.model = model
        self.dist = dist
        self.state_model = state_model if state_model is not None else model
        self.optimizer = optimizer
        self.bundle = bundle
        self.config = config
        self.device = device
        self.seed = seed
        self.files = files
        self.on_row = on_row
        self.rule = get_loss_rule(bundle.loss)
        self.accum = config.grad_accum
        self.steps_per_epoch = bundle.train.steps_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"trainer.grad_accum={self.accum} exceeds the {bundle.train.steps_per_epoch} "
                "batches of an epoch"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.eval_every = config.eval_every or self.steps_per_epoch
        # Always a LambdaLR (its state is checkpointed); stepped only when the LR can change.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda(
                config.schedule, self.total_steps, config.warmup_fraction, config.min_lr_ratio
            ),
        )
        self._lr_changes = config.schedule != "constant" or config.warmup_fraction > 0
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if config.precision == "bf16"
            else contextlib.nullcontext()
        )
        self.stop_requested = False
        self.rows: list[dict[str, Any]] = []
        self.step = 0
        self.first_loss: float | None = None
        self.train_time = 0.0
        self.wall_offset = 0.0
        self._wall_start = time.perf_counter()
        self._has_state = callable(getattr(self.state_model, "reset_state", None))

    # ---------------------------------------------------------------------------- state
    def request_stop(self) -> None:
        """Checkpoint at the next step boundary and return (preemption, SIGTERM)."""
        self.stop_requested = True

    def wall_time(self) -> float:
        return self.wall_offset + time.perf_counter() - self._wall_start

    def curvature_passes(self) -> int:
        return int(getattr(self.optimizer, "curvature_passes", 0))

    def _checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.state_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "first_loss": self.first_loss,
            "train_time": self.train_time,
            "wall_time": self.wall_time(),
            "rng": rng,
        }

    def save(self) -> None:
        if self.files is None or not self.config.checkpoint:
            return
        save_checkpoint(self.files.checkpoint, self._checkpoint_state())
        self.files.write_metrics(self.rows)

    def resume(self, state: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint and the metrics rows written up to it."""
        self.state_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.first_loss = state["first_loss"]
        self.train_time = float(state["train_time"])
        self.wall_offset = float(state["wall_time"])
        self._wall_start = time.perf_counter()
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.rows = [r for r in rows if r["step"] <= self.step]

    def resume_from(self, path: Path, rows: list[dict[str, Any]]) -> None:
        self.resume(load_checkpoint(path, self.device), rows)

    # ---------------------------------------------------------------------------- steps
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor | None]:
        """One optimisation step over ``grad_accum`` micro-batches.

        Returns the mean loss and, for accuracy, the correct count.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total, correct = None, None
        for i, (x, y) in enumerate(batches):
            with self.autocast:
                outputs = self.model(x)
            loss = self.rule.loss(outputs.float(), y, self.bundle.ignore_index)
            if self.accum == 1:
                backward(self.optimizer, loss, outputs, y, model=self.model, inputs=x)
            else:
                backward(
                    self.optimizer,
                    loss / self.accum,
                    outputs,
                    y,
                    model=self.model,
                    inputs=x,
                    micro_batch=(i, self.accum),
                )
            total = loss.detach() if total is None else total + loss.detach()
            if self.bundle.metric == "accuracy":
                hits = (outputs.detach().argmax(-1) == y).sum()
                correct = hits if correct is None else correct + hits
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self._lr_changes:
            self.scheduler.step()
        return (total if self.accum == 1 else total / self.accum), correct

    def metric_from(self, mean_loss: float, correct: float | None, terms: int) -> float:
        """The dataset's metric from a mean loss (and a correct count for accuracy)."""
        metric = self.bundle.metric
        if metric == "accuracy":
            return float(correct) / max(terms, 1)
        if metric == "perplexity":
            return math.exp(min(mean_loss, 700.0))
        if metric == "rmse":
            return math.sqrt(max(mean_loss, 0.0)) * self.bundle.target_std
        raise ValueError(f"unknown metric {metric!r}; known: accuracy, perplexity, rmse")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Mean validation loss over all loss terms, and the metric."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        terms = 0
        for x, y in self.bundle.val.iter_epoch(0, self.seed):
            with self.autocast:
                outputs = self.model(x)
            n = self.rule.num_terms(outputs, y, self.bundle.ignore_index)
            total += self.rule.loss(outputs.float(), y, self.bundle.ignore_index).double() * n
            if self.bundle.metric == "accuracy":
                correct += (outputs.argmax(-1) == y).sum()
            terms += n
        self.model.train(was_training)
        mean = (total / max(terms, 1)).item()
        return mean, self.metric_from(mean, correct.item(), terms)

    def _steps(self, epoch: int, position: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """The micro-batches of each step of ``epoch`` from step ``position`` (this rank's shards)."""
        batches = self.bundle.train.iter_epoch(epoch, self.seed, start_step=position * self.accum)
        for _ in range(position, self.steps_per_epoch):
            step = list(itertools.islice(batches, self.accum))
            if self.dist is not None:
                step = [self.dist.shard(x, y) for x, y in step]
            yield step

    def _global_mean(self, t: Tensor) -> Tensor:
        """``t`` averaged in place across ranks (itself for a single process)."""
        if self.dist is not None:
            self.dist.sum_(t).div_(self.dist.world_size)
        return t

    @torch.no_grad()
    def _finite(self, x: Tensor) -> bool:
        """Whether the weights, and the outputs they give on ``x``, are all finite."""
        if not all(bool(torch.isfinite(p).all()) for p in self.state_model.parameters()):
            return False
        with self.autocast:
            return bool(torch.isfinite(self.model(x)).all())

    def _row(self, split: str, loss: float, metric: float) -> dict[str, Any]:
        row = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "split": split,
            "loss": loss,
            "metric": metric,
            "lr": self.optimizer.param_groups[0]["lr"],
            "wall_time": self.wall_time(),
            "train_time": self.train_time,
            "curvature_passes": self.curvature_passes(),
        }
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)
        return row

    def _validate(self) -> None:
        loss, metric = self.evaluate()
        self._row("val", loss, metric)

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, Any]:
        """Train to the budget; returns {"status": completed|diverged|interrupted, ...}."""
        self.model.train()
        if self.step == 0 and not self.rows:
            self._validate()
        status, diverged_at = "completed", None
        log_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        log_correct = torch.zeros((), dtype=torch.float64, device=self.device)
        log_steps, log_terms = 0, 0
        progress = _progress_bar(self.total_steps, self.step, self.config.progress)
        segment_start = time.perf_counter()
        while self.step < self.total_steps and status == "completed":
            epoch, position = divmod(self.step, self.steps_per_epoch)
            if position == 0 and self._has_state:
                self.state_model.reset_state()
            for batches in self._steps(epoch, position):
                x, y = batches[-1]
                try:
                    loss, correct = self.train_step(batches)
                except RuntimeError:
                    # Non-finite weights or outputs make later ops fail (e.g. sampling from
                    # NaN probabilities): that is divergence, a result, not a crash.
                    if self._finite(x):
                        raise
                    self.train_time += time.perf_counter() - segment_start
                    status, diverged_at = "diverged", self.step
                    break
                self.step += 1
                log_loss += loss
                log_steps += 1
                if correct is not None:
                    log_correct += correct
                    log_terms += sum(b[1].numel() for b in batches)
                if self.first_loss is None:
                    self.first_loss = self._global_mean(loss.clone()).item()
                at_eval = self.step % self.eval_every == 0 or self.step == self.total_steps
                if self.step % self.config.log_every == 0 or at_eval or self.stop_requested:
                    self._sync()
                    self.train_time += time.perf_counter() - segment_start
                    if self.dist is not None:
                        self._global_mean(log_loss)
                        self.dist.sum_(log_correct)
                        log_terms *= self.dist.world_size
                    mean = log_loss.item() / log_steps
                    self._row("train", mean, self.metric_from(mean, log_correct.item(), log_terms))
                    progress(self.step, mean)
                    log_loss.zero_()
                    log_correct.zero_()
                    log_steps, log_terms = 0, 0
                    if not math.isfinite(mean) or mean > self.config.divergence_factor * max(
                        self.first_loss, 1e-12
                    ):
                        status, diverged_at = "diverged", self.step
                        break
                    if at_eval:
                        self._validate()
                        self.save()
                    if self.stop_requested:
                        self.save()
                        status = "interrupted"
                        break
                    segment_start = time.perf_counter()
                if self.step >= self.total_steps:
                    break
        progress(None, None)
        if self.files is not None and status != "interrupted":
            self.files.write_metrics(self.rows)
        return self.summary(status, diverged_at)

    def summary(self, status: str, diverged_at: int | None) -> dict[str, Any]:
        val = [r for r in self.rows if r["split"] == "val"]
        train = [r for r in self.rows if r["split"] == "train"]
        last3 = [r["loss"] for r in val[-3:]]
        best = min(val, key=lambda r: r["loss"] if math.isfinite(r["loss"]) else math.inf)
        mean3 = sum(last3) / len(last3) if last3 else math.nan
        std3 = (
            math.sqrt(sum((v - mean3) ** 2 for v in last3) / (len(last3) - 1))
            if len(last3) > 1
            else math.nan
        )
        train_time = max(self.train_time, 1e-12)
        summary = {
            "status": status,
            "metric": self.bundle.metric,
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "final": {
                "val_loss": val[-1]["loss"] if val else None,
                "val_metric": val[-1]["metric"] if val else None,
                "train_loss": train[-1]["loss"] if train else None,
            },
            "best": {"val_loss": best["loss"], "val_metric": best["metric"], "step": best["step"]},
            "last3": {"val_loss_mean": mean3, "val_loss_std": std3, "n": len(last3)},
            "wall_time": self.wall_time(),
            "train_time": self.train_time,
            "steps_per_s": self.step / train_time,
            "curvature_passes": self.curvature_passes(),
            "diverged_at_step": diverged_at,
            "error": None,
        }
        if self.bundle.input_shape == ():
            summary.update(self._throughput(train_time))
        return summary

    def _throughput(self, train_time: float) -> dict[str, float]:
        """Tokens/s for language models and, on CUDA for the decoder, MFU.

        MFU counts the model's own training FLOPs (6N + attention, lehi.models.flops); the
        auxiliary backward of a curvature-aware optimizer is overhead on top, not model FLOPs.
        """
        x, _ = next(iter(self.bundle.train.iter_epoch(0, 0)))
        tokens_per_s = x.numel() * self.accum * self.step / train_time
        out = {"tokens_per_s": tokens_per_s}
        if self.device.type == "cuda" and hasattr(self.state_model, "config"):
            try:
                peak = device_peak_flops(torch.cuda.get_device_name(self.device))
            except ValueError:
                return out
            out["mfu"] = mfu(tokens_per_s, flops_per_token(self.state_model, x.shape[-1]), peak)
        return out


def _progress_bar(
    total: int, start: int, enabled: bool
) -> Callable[[int | None, float | None], None]:
    """A tqdm bar (loss, steps/s) when enabled; a no-op otherwise."""
    if not enabled:
        return lambda step, loss: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, dynamic_ncols=True, file=sys.stderr, unit="step")
    last = [start]

    def update(step: int | None, loss: float | None) -> None:
        if step is None:
            bar.close()
            return
        bar.update(step - last[0])
        last[0] = step
        bar.set_postfix(loss=f"{loss:.4f}")

    return update
