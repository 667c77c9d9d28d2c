"""One run from a resolved Hydra config: validate, build, train, write the results.

run.py is a thin Hydra entry point around :func:`run`; tests call :func:`run` with configs
composed through Hydra's compose API.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

import lehi.data
from lehi.checkpoint import CheckpointError
from lehi.distributed import from_environment
from lehi.logging import RunFiles, WandbLogger, environment
from lehi.optim import CurvatureOptimizer, build_optimizer
from lehi.train import Trainer, TrainerConfig, pick_device

__all__ = ["RunError", "build_model", "run", "run_dir_for"]

log = logging.getLogger("lehi")

#: Statuses that are results: a rerun of the sweep skips them unless trainer.force=true.
FINAL_STATUSES = ("completed", "diverged")


class RunError(ValueError):
    """Bad input found before anything was written: one line naming the key or file."""


def run_dir_for(cfg: DictConfig) -> Path:
    """results/<experiment>/<optimizer label>/lr=<lr>/seed=<seed> unless paths.run_dir is set."""
    if cfg.paths.get("run_dir"):
        return Path(cfg.paths.run_dir)
    lr = float(cfg.optimizer.lr)
    return (
        Path(cfg.paths.results_dir)
        / str(cfg.experiment.name)
        / str(cfg.optimizer.label)
        / f"lr={lr:g}"
        / f"seed={cfg.seed}"
    )


def _trainer_config(cfg: DictConfig) -> TrainerConfig:
    t = cfg.trainer
    progress = t.progress
    if progress == "auto":
        progress = sys.stderr.isatty() and not os.environ.get("CI")
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if pick_device(t.device).type == "cuda" else "fp32"
    return TrainerConfig(
        epochs=t.epochs,
        max_steps=t.max_steps,
        grad_accum=t.grad_accum,
        eval_every=t.eval_every,
        log_every=t.log_every,
        grad_clip=t.grad_clip,
        schedule=t.schedule,
        warmup_fraction=t.warmup_fraction,
        min_lr_ratio=t.min_lr_ratio,
        divergence_factor=t.divergence_factor,
        checkpoint=t.checkpoint,
        precision=precision,
        progress=bool(progress),
    )


def _check_inputs(cfg: DictConfig) -> TrainerConfig:
    """The checks that need no data: they fail before any download or file write."""
    lr = cfg.optimizer.lr
    if not isinstance(lr, int | float) or not lr > 0:
        raise RunError(f"optimizer.lr must be > 0, got {lr!r}")
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.dataset.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise RunError(f"dataset.{key} must be a positive integer, got {value!r}")
    if cfg.logger.mode not in ("online", "offline", "disabled"):
        raise RunError(f"logger.mode must be online, offline or disabled, got {cfg.logger.mode!r}")
    if cfg.trainer.resume not in (True, False, "auto"):
        raise RunError(f"trainer.resume must be true, false or auto, got {cfg.trainer.resume!r}")
    try:
        return _trainer_config(cfg)
    except ValueError as exc:
        raise RunError(str(exc)) from None


#: Keys that may change between an interrupted run and its continuation.
_RESUMABLE_CHANGES = ("resume", "force", "keep_checkpoint", "progress")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    config.pop("logger", None)
    config["trainer"] = {
        k: v for k, v in config.get("trainer", {}).items() if k not in _RESUMABLE_CHANGES
    }
    return config


def _same_run(files: RunFiles, cfg: DictConfig) -> bool:
    """Whether the folder's config.yaml describes this run (so its checkpoint may continue it)."""
    try:
        previous = OmegaConf.to_container(OmegaConf.load(files.config), resolve=False)
    except (OSError, ValueError):
        return False
    current = OmegaConf.to_container(cfg, resolve=True)
    if _comparable(previous) == _comparable(current):
        return True
    log.warning("%s: config differs from the checkpointed run's; starting afresh", files.dir)
    return False


def _dataset_options(cfg: DictConfig) -> dict[str, Any]:
    options = OmegaConf.to_container(cfg.dataset, resolve=True)
    options.pop("recipe", None)
    options.pop("name", None)
    return options


def build_model(model_cfg: DictConfig, bundle: lehi.data.DataBundle) -> torch.nn.Module:
    """Call the model config's ``_target_`` with the bundle (errors stay one-line ValueErrors)."""
    options = OmegaConf.to_container(model_cfg, resolve=True)
    return get_method(options.pop("_target_"))(bundle=bundle, **options)


def _optimizer_options(cfg: DictConfig) -> dict[str, Any]:
    options = OmegaConf.to_container(cfg.optimizer, resolve=True)
    options.pop("label", None)
    options.pop("name", None)
    return options


class PreemptionSignals:
    """SIGTERM, SIGUSR1, SIGUSR2 (preemption, time limits) → checkpoint at the next step.

    After the trainer has checkpointed, :meth:`hand_over` passes the signal on to the handler
    that was installed before (Submitit's, which requeues the job; a requeued job resumes from
    the checkpoint because the sweep presets use ``trainer.resume: auto``).
    """

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
    )

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self.trainer.request_stop()

    def __enter__(self) -> PreemptionSignals:
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals stay with the host process
            self.previous = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def hand_over(self) -> None:
        """Call the earlier handler of the signal received (after the checkpoint is written)."""
        handler = self.previous.get(self.received) if self.received is not None else None
        if callable(handler):
            handler(self.received, None)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns its summary (also written to summary.json).

    Raises RunError (or the data layer's FileNotFoundError) for bad input, before any file
    of the run is written.
    """
    trainer_config = _check_inputs(cfg)
    files = RunFiles(run_dir_for(cfg))
    previous = files.read_summary()
    if previous and previous.get("status") in FINAL_STATUSES and not cfg.trainer.force:
        log.info(
            "skip %s: already %s (trainer.force=true reruns it)", files.dir, previous["status"]
        )
        return previous
    resume = cfg.trainer.resume
    if resume == "auto":
        resume = files.checkpoint.exists() and _same_run(files, cfg)
    if resume and not files.checkpoint.exists():
        raise RunError(f"trainer.resume=true but {files.checkpoint} does not exist")

    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    device = pick_device(cfg.trainer.device)
    dist = from_environment(device)
    if dist is not None:
        device = dist.device(device)
    main = dist is None or dist.is_main
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    random.seed(seed)

    try:
        bundle = lehi.data.build(cfg.dataset.name, **_dataset_options(cfg)).to(device)
        model = build_model(cfg.model, bundle).to(device)
        optimizer = build_optimizer(
            cfg.optimizer.name,
            model.parameters(),
            **_optimizer_options(cfg),
            # The loss whose Hessian is imitated and the sampling seed (adam/adamw ignore them).
            loss=bundle.loss,
            ignore_index=bundle.ignore_index,
            seed=seed,
        )
    except ValueError as exc:
        raise RunError(str(exc)) from None
    trained = model
    if cfg.trainer.compile:
        if isinstance(optimizer, CurvatureOptimizer):
            # The auxiliary backward reuses the graph (retain_graph=True), which AOTAutograd's
            # donated buffers forbid.
            torch._functorch.config.donated_buffer = False
        trained = torch.compile(model)
    if dist is not None:
        trained = DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None
        )
        if isinstance(optimizer, CurvatureOptimizer):
            optimizer.reduce_curvature_grads = dist.mean_
            if optimizer.sampler == "inverse_cdf":
                # Every rank draws the global batch's v and keeps its slice: exactly the
                # draws of a one-process run with the same global batch.
                optimizer.shard = (dist.rank, dist.world_size)
            else:
                # multinomial draws cannot be sliced that way: independent streams per rank.
                optimizer.seed = seed * 1_000_003 + dist.rank
    trainer = Trainer(
        trained,
        optimizer,
        bundle,
        trainer_config,
        device=device,
        seed=seed,
        files=files if main else None,
        state_model=model,
        dist=dist,
    )
    rows: list[dict[str, Any]] = []
    if resume:
        try:
            trainer.resume_from(files.checkpoint, files.read_metrics())
        except CheckpointError as exc:
            raise RunError(str(exc)) from None
        rows = trainer.rows
    elif main:
        files.clear()

    wandb_logger = None
    if main:
        files.write_config(OmegaConf.to_yaml(cfg, resolve=True))
        files.write_env(environment(device))
        resolved = OmegaConf.to_container(cfg, resolve=True)
        wandb_logger = _wandb_logger(cfg, files.dir, resolved)
    if wandb_logger is not None:
        trainer.on_row = wandb_logger.log
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "%s: %s on %s, %s (%d params) on %s%s",
        files.dir,
        cfg.optimizer.name,
        cfg.dataset.name,
        cfg.model.name,
        n_params,
        device,
        f", resuming at step {trainer.step}" if rows else "",
    )

    identity = {
        "experiment": cfg.experiment.name,
        "scale": cfg.experiment.scale,
        "dataset": cfg.dataset.name,
        "optimizer": cfg.optimizer.label,
        "lr": float(cfg.optimizer.lr),
        "seed": seed,
    }
    try:
        with PreemptionSignals(trainer) as signals:
            summary = {**identity, **trainer.fit()}
    except Exception as exc:
        summary = {**identity, **trainer.summary("failed", None)}
        summary["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if main:
            files.write_metrics(trainer.rows)
            files.write_summary(summary)
        if wandb_logger is not None:
            wandb_logger.finish(summary)
        raise
    finally:
        if dist is not None:
            dist.close()
    if summary["status"] == "interrupted":
        log.info(
            "%s: interrupted at step %d; trainer.resume=true continues it", files.dir, trainer.step
        )
        signals.hand_over()
        return summary
    if not main:
        return summary
    files.write_summary(summary)
    if not cfg.trainer.keep_checkpoint:
        files.checkpoint.unlink(missing_ok=True)
    if wandb_logger is not None:
        wandb_logger.finish(summary)
    final = summary["final"]
    log.info(
        "%s: %s after %d steps; val loss %.4f, val %s %.4f, %.1f steps/s",
        files.dir,
        summary["status"],
        summary["steps"],
        final["val_loss"] if final["val_loss"] is not None else math.nan,
        summary["metric"],
        final["val_metric"] if final["val_metric"] is not None else math.nan,
        summary["steps_per_s"],
    )
    return summary


def _wandb_logger(cfg: DictConfig, run_dir: Path, resolved: dict[str, Any]) -> WandbLogger | None:
    if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled":
        return None
    return WandbLogger(
        mode=cfg.logger.mode,
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        tags=list(cfg.logger.tags),
        name=f"{cfg.experiment.name}/{cfg.optimizer.label}/lr={float(cfg.optimizer.lr):g}/seed={cfg.seed}",
        run_dir=run_dir,
        config=resolved,
    )
