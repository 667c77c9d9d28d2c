"""The one training loop for every dataset and optimizer.

Each step computes ``outputs = model(x)`` once, the loss from them, and hands
(loss, outputs, targets) to ``lehi.optim.backward``, which fills ``.grad`` and, when a
curvature-aware optimizer refreshes its curvature this step, its Hessian-imitation estimate
from the same graph. Nothing else here knows which optimizer runs.

(Slightly over 400 lines on purpose: the loop, its evaluation and its checkpoint state stay in
one class, because a checkpoint must capture exactly what the loop keeps between steps.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lehi.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lehi.config import ConfigError
from lehi.curvature import get_loss_rule
from lehi.data import DataBundle
from lehi.distributed import Distributed
from lehi.divergence import DivergenceMonitor
from lehi.metrics import metric_value
from lehi.models.flops import device_peak_flops, flops_per_token, mfu
from lehi.models.llama import Llama
from lehi.models.stateful import StatefulModel
from lehi.optim import backward
from lehi.progress import LossWindow, progress_bar
from lehi.record import RunRecord
from lehi.summary import LAST_WINDOW, validation_summary
from lehi.trainer_config import TrainerConfig, evaluation_steps, lr_lambda

__all__ = ["Trainer", "TrainerConfig", "lr_lambda"]


class Trainer:
    """Trains ``model`` on ``bundle`` with ``optimizer``, evaluating, logging, checkpointing.

    Args:
        model: the network (possibly wrapped by torch.compile or DDP).
        optimizer: any torch.optim.Optimizer; curvature-aware ones get their pass.
        bundle: the data, already on ``device``.
        config: the trainer section of the config.
        device: where the model and data live.
        seed: the run seed (data order, augmentation, dropout).
        record: the run folder, or None to write nothing (non-zero DDP ranks, diagnostics).
        on_row: called with every metrics row (W&B).
        state_model: the module whose state_dict is checkpointed (the unwrapped model).
        dist: this process's place in a torchrun job: it trains on its shard of each global
            batch and logs cross-rank means; None for a single process.

    The checkpoint is the commit point of a run: it holds the metrics rows up to its step,
    and metrics.csv is rewritten from it right after, so a kill at any instant leaves a
    checkpoint from which the resumed run writes exactly the uninterrupted run's rows.
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
        record: RunRecord | None,
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
        self.record = record
        self.on_row = on_row
        self.rule = get_loss_rule(bundle.loss)
        self.accum = config.grad_accum
        self.steps_per_epoch = bundle.train.steps_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"trainer.grad_accum={self.accum} exceeds the {bundle.train.steps_per_epoch} "
                "batches of an epoch"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.eval_steps = evaluation_steps(self.total_steps, self.steps_per_epoch, config)
        # The evaluations on the whole validation split: all of them, or, with a subset for
        # the intermediate points, step 0 (the initial loss) and the figures' last window.
        self.full_eval_steps = (
            frozenset([0, *self.eval_steps])
            if config.eval_subset_batches is None
            else frozenset([0, *sorted(self.eval_steps)[-LAST_WINDOW:]])
        )
        # Always a LambdaLR (its state is checkpointed); stepped only when the LR can change.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lr_lambda(
                config.schedule, self.total_steps, config.warmup_fraction, config.min_lr_ratio
            ),
        )
        self._lr_changes = config.schedule != "constant" or config.warmup_fraction > 0
        bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
        self.precision = "bf16" if bf16 else "fp32"
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        progress = config.progress
        if progress == "auto":
            progress = sys.stderr.isatty() and not os.environ.get("CI")
        self.progress = bool(progress)
        self.monitor = DivergenceMonitor(config.divergence_factor)
        self.stop_requested = False
        self.rows: list[dict[str, Any]] = []
        self.step = 0
        self.train_time = 0.0
        self.wall_offset = 0.0
        self._wall_start = time.perf_counter()
        self._window = LossWindow(device)

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
            "total_steps": self.total_steps,
            "rows": self.rows,
            "monitor": self.monitor.state_dict(),
            "window": self._window.state_dict(),
            "train_time": self.train_time,
            "wall_time": self.wall_time(),
            "rng": rng,
        }

    def save(self) -> None:
        """Commit: checkpoint (with the rows) first, then metrics.csv from the same rows."""
        if self.record is None:
            return
        if self.config.checkpoint:
            save_checkpoint(self.record.checkpoint, self._checkpoint_state())
        self.record.write_metrics(self.rows)

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`save` (CheckpointError if it does not fit)."""
        step, rows = state.get("step"), state.get("rows")
        if not isinstance(step, int) or not 0 <= step <= self.total_steps:
            raise CheckpointError(
                f"checkpoint step {step!r} is outside this run's 0..{self.total_steps}"
            )
        if state.get("total_steps") != self.total_steps or not isinstance(rows, list):
            raise CheckpointError("checkpoint comes from a run with another budget or layout")
        if rows and rows[-1].get("step", -1) > step:
            raise CheckpointError("checkpoint rows run past its step")
        try:
            self.state_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.monitor.load_state_dict(state["monitor"])
            self._window.load_state_dict(state["window"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            reason = (
                str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            )
            raise CheckpointError(
                f"checkpoint does not fit this run's model or optimizer ({reason})"
            ) from None
        self.step = step
        self.rows = list(rows)
        self.train_time = float(state["train_time"])
        self.wall_offset = float(state["wall_time"])
        self._wall_start = time.perf_counter()

    def resume_from(self, path: Path) -> None:
        try:
            self.resume(load_checkpoint(path, self.device))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

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
        return metric_value(self.bundle.metric, mean_loss, correct, terms, self.bundle.target_std)

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> tuple[float, float]:
        """Mean validation loss over all loss terms, and the metric: over the whole split, or
        over its first ``batches`` batches (the same ones at every evaluation)."""
        was_training = self.model.training
        self.model.eval()
        if isinstance(self.state_model, StatefulModel):
            # Every evaluation reads the split from its start, not from where the last one ended.
            self.state_model.reset_state(training=False)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        terms = 0
        for x, y in itertools.islice(self.bundle.val.iter_epoch(0, self.seed), batches):
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

    def _validate(self) -> str | None:
        """Evaluate (the whole split or the subset), log the row; the divergence reason if the
        interval diverged."""
        if self.step in self.full_eval_steps:
            loss, metric = self.evaluate()
            self._row("val", loss, metric)
        else:
            loss, metric = self.evaluate(self.config.eval_subset_batches)
            self._row("val_subset", loss, metric)
        return self.monitor.evaluation(loss)

    def _log_window(self) -> str | None:
        """Log the training-loss window; the divergence reason if it is not finite."""
        window = self._window
        if self.dist is not None:
            self._global_mean(window.loss)
            self.dist.sum_(window.correct)
            window.terms *= self.dist.world_size
        mean = window.loss.item() / window.steps
        self._row("train", mean, self.metric_from(mean, window.correct.item(), window.terms))
        window.reset()
        return self.monitor.train_window(mean)

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, Any]:
        """Train to the budget; returns {"status": completed|diverged|interrupted, ...}."""
        self.model.train()
        divergence = self._validate() if self.step == 0 and not self.rows else None
        progress = progress_bar(self.total_steps, self.step, self.progress)
        self._segment_start = time.perf_counter()
        while divergence is None and not self._done():
            divergence = self._epoch(progress)
        self._end_segment()
        progress(None, None)
        if self.stop_requested and divergence is None and self.step < self.total_steps:
            self.save()
            return {"status": "interrupted", "steps": self.step}
        return self.summary(divergence)

    def _done(self) -> bool:
        return self.step >= self.total_steps or self.stop_requested

    def _epoch(self, progress: Callable[[int | None, float | None], None]) -> str | None:
        """The rest of the current epoch; the divergence reason if it diverged."""
        epoch, position = divmod(self.step, self.steps_per_epoch)
        if position == 0 and isinstance(self.state_model, StatefulModel):
            self.state_model.reset_state()
        for batches in self._steps(epoch, position):
            divergence = self._step_and_log(batches, progress)
            if divergence is not None or self._done():
                return divergence
        return None

    def _step_and_log(
        self, batches: list[tuple[Tensor, Tensor]], progress: Callable[..., None]
    ) -> str | None:
        """One step, then its train row, evaluation and checkpoint when they are due."""
        try:
            loss, correct = self.train_step(batches)
        except RuntimeError:
            # Non-finite weights or outputs make later ops fail (e.g. sampling from NaN
            # probabilities): that is divergence, a result, not a crash.
            if self._finite(batches[-1][0]):
                raise
            return "non_finite"
        self.step += 1
        self._window.add(loss, correct, batches)
        if self.monitor.initial_loss is None:
            self.monitor.first_loss(self._global_mean(loss.clone()).item())
        at_eval = self.step in self.eval_steps
        if self.step % self.config.log_every and not at_eval:
            return None
        self._end_segment()  # evaluation and checkpoints are not training time
        divergence = self._log_window()
        progress(self.step, self.rows[-1]["loss"])
        if divergence is None and at_eval:
            divergence = self._validate()
            if divergence is None:
                self.save()
                self._stop_after_prefix()
        self._segment_start = time.perf_counter()
        return divergence

    def _stop_after_prefix(self) -> None:
        """Stop once ``stop_after_evaluations`` evaluations past step 0 are logged (a replay of
        the run's prefix); the rows so far are those of the whole run."""
        wanted = self.config.stop_after_evaluations
        done = sum(1 for r in self.rows if r["split"] in ("val", "val_subset") and r["step"] > 0)
        if wanted is not None and done >= wanted and self.step < self.total_steps:
            self.stop_requested = True

    def _end_segment(self) -> None:
        self._sync()
        now = time.perf_counter()
        self.train_time += now - self._segment_start
        self._segment_start = now

    def summary(self, divergence: str | None, error: str | None = None) -> dict[str, Any]:
        """The run's summary: status, the validation figures, timing and throughput.

        ``divergence`` is the early stop that ended training, if one did (non-finite, held
        above the factor). Judgements that the rows alone decide, such as ending above the
        initial loss, are made by lehi.results from metrics.csv, not here. ``error`` makes it
        a failed run's summary.
        """
        val = validation_summary(self.rows)
        status = "failed" if error is not None else ("diverged" if divergence else "completed")
        val["initial"]["train_loss"] = self.monitor.initial_loss
        train_time = max(self.train_time, 1e-12)
        summary = {
            "status": status,
            "divergence": divergence if status == "diverged" else None,
            "metric": self.bundle.metric,
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": self.step / self.steps_per_epoch,
            **val,
            "max_spike": self.monitor.max_spike,
            "wall_time": self.wall_time(),
            "train_time": self.train_time,
            "steps_per_s": self.step / train_time,
            "curvature_passes": self.curvature_passes(),
            "diverged_at_step": self.step if status == "diverged" else None,
            "precision": self.precision,
            "error": error,
        }
        if self.bundle.task == "language_model" and self.step:
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
        if self.device.type == "cuda" and isinstance(self.state_model, Llama):
            try:
                peak = device_peak_flops(torch.cuda.get_device_name(self.device))
            except ValueError:
                return out
            out["mfu"] = mfu(tokens_per_s, flops_per_token(self.state_model, x.shape[-1]), peak)
        return out
