"""One run from a resolved config, in four steps that read top to bottom:

1. :func:`plan` — check the config, find the run's folder from its identity, decide whether
   it is already done (skip), half done (resume) or new. Nothing is built or written. A new
   run that another experiment of ``experiment.reuse_from`` already computed adopts that
   run's result instead (lehi.reuse).
2. :func:`build` — data, model, optimizer, data-parallel wiring, trainer. Still nothing written.
3. train — under the folder's lock, with signals that checkpoint and stop.
4. :func:`record_result` — the one place that writes a summary.

run.py is the Hydra entry point around :func:`run`; tests call :func:`run` with configs
composed through Hydra's compose API. Bad input raises one of :data:`BAD_INPUT` (one line
naming the key or file) before any file is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

import lehi.data
from lehi._torch_compat import defer_dynamo_imports, donated_buffers_off
from lehi.checkpoint import CheckpointError
from lehi.config import ConfigError, check_call, check_run, pick_device, resolve_target
from lehi.data import DataFileError, DataUnavailableError
from lehi.distributed import Distributed, from_environment
from lehi.optim import (
    BUILDER_KEYS,
    CURVATURE_INPUTS,
    CurvatureOptimizer,
    build_optimizer,
    check_options,
)
from lehi.preemption import Interrupted, StopSignals
from lehi.record import RunBusyError, RunRecord, environment, git, identity_hash, run_dir
from lehi.reuse import adopt, reusable_source
from lehi.train import Trainer
from lehi.trainer_config import TrainerConfig

__all__ = ["BAD_INPUT", "RunFailed", "build", "plan", "run"]

log = logging.getLogger("lehi")

# torch.optim imports torch._dynamo (~2.5 s) in eager mode; only compiled runs need it. Done
# for the suite's own runs only: importing lehi.optim into another program patches nothing.
defer_dynamo_imports()

#: Statuses that are results: the same config is then skipped unless trainer.force=true.
FINAL_STATUSES = ("completed", "diverged")

#: Bad input: a one-line message naming the key or file, nothing written.
BAD_INPUT = (ConfigError, CheckpointError, DataFileError, DataUnavailableError, RunBusyError)


#: Config-group sections built through their ``_target_``: (keys that describe the entry and
#: are not arguments, arguments the runner supplies itself).
MODEL_METADATA = ("name",)
SECTION_CALLS = {
    "dataset": (("name", "recipe"), ()),
    "model": (MODEL_METADATA, ("input_shape", "num_outputs")),
    "optimizer": (BUILDER_KEYS, ("params", *CURVATURE_INPUTS)),
}


class RunFailed(RuntimeError):
    """The run crashed; its folder holds a failed summary and the traceback in run.log."""


@dataclass
class Plan:
    config: dict[str, Any]  # the resolved config, as config.yaml records it
    trainer: TrainerConfig
    record: RunRecord
    device: torch.device
    seed: int
    previous: dict[str, Any] | None  # the summary of a finished run with this identity


def plan(cfg: DictConfig | dict[str, Any]) -> Plan:
    """Check ``cfg`` and locate its run; raises ConfigError (one line) on bad input."""
    config = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    check_run(config)
    for section, (metadata, supplied) in SECTION_CALLS.items():
        _check_section(config[section], section, metadata, supplied)
    trainer = TrainerConfig.from_config(config["trainer"])
    device = pick_device(trainer.device)
    _check_logger(config["logger"])
    pinned = config["paths"].get("run_dir")
    record = RunRecord(pinned or run_dir(config["paths"]["results_dir"], config))
    recorded = record.read_config()
    if recorded is not None and identity_hash(recorded) != identity_hash(config):
        raise ConfigError(
            f"paths.run_dir={record.dir} holds another run (a different config); "
            "choose another folder"
        )
    previous = record.read_summary()
    if previous is not None and previous.get("status") not in FINAL_STATUSES:
        previous = None  # a failed run is tried again
    if previous is not None and trainer.force and _committed(record):
        raise ConfigError(
            f"trainer.force=true would overwrite the committed result {record.dir}; "
            "rerun it elsewhere: python -m lehi.rerun " + str(record.dir)
        )
    if previous is not None and trainer.force:
        previous = None
    return Plan(config, trainer, record, device, config["seed"], previous)


def _check_section(
    options: dict[str, Any], section: str, metadata: tuple[str, ...], supplied: tuple[str, ...]
) -> None:
    """Keys and types of a group's options against its ``_target_``'s signature; for the
    optimizer also the ranges of its hyper-parameters (lehi.optim's, before data is read)."""
    target = resolve_target(options["_target_"], f"{section}._target_")
    arguments = {k: v for k, v in options.items() if k not in (*metadata, "_target_")}
    check_call(target, arguments, section, supplied=supplied)
    if section == "optimizer":
        try:
            check_options(arguments)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


@dataclass
class Built:
    trainer: Trainer
    model: torch.nn.Module
    dist: Distributed | None


def build(p: Plan) -> Built:
    """Data, model, optimizer and trainer for the plan (nothing is written)."""
    config, device = p.config, p.device
    if p.trainer.threads:
        torch.set_num_threads(p.trainer.threads)
    dist = from_environment(device)
    if dist is not None:
        device = dist.device(device)
    torch.manual_seed(p.seed)
    random.seed(p.seed)
    with _options_checked():
        bundle = lehi.data.build(config["dataset"]).to(device)
        model = build_model(config["model"], bundle).to(device)
        optimizer = build_optimizer(
            config["optimizer"],
            model,
            loss=bundle.loss,
            ignore_index=bundle.ignore_index,
            seed=p.seed,
        )
    trained = torch.compile(model) if p.trainer.compile else model
    if dist is not None:
        trained = DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None
        )
        if isinstance(optimizer, CurvatureOptimizer):
            optimizer.configure_data_parallel(dist.mean_, dist.rank, dist.world_size)
    main = dist is None or dist.is_main
    trainer = Trainer(
        trained,
        optimizer,
        bundle,
        p.trainer,
        device=device,
        seed=p.seed,
        record=p.record if main else None,
        state_model=model,
        dist=dist,
    )
    return Built(trainer, model, dist)


@contextlib.contextmanager
def _options_checked() -> Iterator[None]:
    """Builders check their options as torch.optim does, with ValueError naming the key;
    those are config errors (the cause, with its traceback, stays chained to it)."""
    try:
        yield
    except (ConfigError, DataFileError):
        raise
    except ValueError as exc:
        raise ConfigError(str(exc).strip().splitlines()[0]) from exc


def build_model(options: dict[str, Any], bundle: lehi.data.DataBundle) -> torch.nn.Module:
    """Call the model config's ``_target_`` with the data's input shape and output count."""
    options = {k: v for k, v in options.items() if k not in MODEL_METADATA}
    target = resolve_target(options.pop("_target_"), "model._target_")
    return target(
        input_shape=tuple(bundle.input_shape), num_outputs=int(bundle.num_outputs), **options
    )


def run(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Train one configuration; returns its summary (also written to summary.json).

    Raises one of :data:`BAD_INPUT` before anything is written, :class:`Interrupted` after
    a stop signal has been checkpointed, :class:`RunFailed` after a crash was recorded.
    """
    p = plan(cfg)
    if p.previous is not None:
        log.info("skip %s: already %s (same config)", p.record.dir, p.previous["status"])
        return p.previous
    results_dir = p.config["paths"]["results_dir"]
    source = None if p.trainer.force else reusable_source(p.config, results_dir)
    if source is not None:
        with _lock(p):
            return adopt(source, p.record, p.config, results_dir)
    built = build(p)
    main = built.trainer.record is not None
    try:
        with _lock(p) if main else contextlib.nullcontext():
            previous = p.record.read_summary()
            if previous and previous.get("status") in FINAL_STATUSES and not p.trainer.force:
                return previous  # finished by another process while this one was building
            _start_or_resume(p, built.trainer, main)
            with _run_log(p.record if main else None):
                return _train(p, built.trainer, main)
    finally:
        if built.dist is not None:
            built.dist.close()


def _train(p: Plan, trainer: Trainer, main: bool) -> dict[str, Any]:
    """Fit under stop signals; record the result, a crash, or stop after a signal."""
    wandb_logger = _wandb_logger(p, trainer) if main else None
    try:
        with StopSignals(trainer.request_stop) as signals, _compile_context(p):
            summary = trainer.fit()
    except Exception as exc:
        if main:  # written directly: a host's logging set-up may have silenced our logger
            with p.record.log.open("a") as f:
                f.write(f"the run crashed at step {trainer.step}:\n{traceback.format_exc()}")
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        summary = trainer.summary(None, error=error.splitlines()[-1])
        if main:
            record_result(p, trainer, summary, wandb_logger)
        raise RunFailed(f"{p.record.dir}: {summary['error']} (traceback in run.log)") from exc
    if summary["status"] == "interrupted":
        if not signals.hand_over() and signals.received is not None:
            raise Interrupted(signals.received, f"at step {summary['steps']} in {p.record.dir}")
        return summary
    return record_result(p, trainer, summary, wandb_logger) if main else summary


@contextlib.contextmanager
def _lock(p: Plan) -> Iterator[None]:
    """The folder's lock; a folder that cannot be created is bad input naming its key."""
    key = "paths.run_dir" if p.config["paths"].get("run_dir") else "paths.results_dir"
    try:
        p.record.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot create the run folder {p.record.dir} ({exc.strerror or exc})"
        ) from None
    with p.record.lock():
        yield


def _start_or_resume(p: Plan, trainer: Trainer, main: bool) -> None:
    """Continue from the folder's checkpoint (same identity: same run) or start afresh;
    only the main process touches the folder's files."""
    resume = p.trainer.resume
    if resume == "auto":
        resume = p.record.checkpoint.exists()
    if resume:
        if not p.record.checkpoint.exists():
            raise CheckpointError(f"trainer.resume=true but {p.record.checkpoint} does not exist")
        trainer.resume_from(p.record.checkpoint)
        log.info("%s: resuming at step %d", p.record.dir, trainer.step)
    if not main:
        return
    p.record.remove_stale_temp_files()
    if not resume:
        p.record.clear()
    p.record.write_config(p.config)
    p.record.write_env(environment(trainer.device))


def record_result(
    p: Plan, trainer: Trainer, summary: dict[str, Any], wandb_logger: Any = None
) -> dict[str, Any]:
    """Write the final metrics and the summary (with the run's identity); drop the checkpoint."""
    config = p.config
    summary = {
        "experiment": config["experiment"]["name"],
        "scale": config["experiment"]["scale"],
        "dataset": config["dataset"]["name"],
        "model": config["model"].get("name"),
        "optimizer": config["optimizer"]["label"],
        "optimizer_name": config["optimizer"]["name"],
        "lr": float(config["optimizer"]["lr"]),
        "seed": p.seed,
        "identity": identity_hash(config),
        **summary,
    }
    p.record.write_metrics(trainer.rows)
    p.record.write_summary(summary)
    if summary["status"] != "failed" and not p.trainer.keep_checkpoint:
        p.record.checkpoint.unlink(missing_ok=True)
    if wandb_logger is not None:
        wandb_logger.finish(summary)
    final = summary["final"]
    log.info(
        "%s: %s after %d steps; final val loss %s, %s %s",
        p.record.dir,
        summary["status"] + (f" ({summary['divergence']})" if summary.get("divergence") else ""),
        summary["steps"],
        _fmt(final["val_loss"]),
        summary["metric"],
        _fmt(final["val_metric"]),
    )
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _committed(record: RunRecord) -> bool:
    """Whether the folder's summary.json is tracked by git (a committed result)."""
    return git("ls-files", "--error-unmatch", str(record.summary.resolve())) is not None


def _check_logger(logger: dict[str, Any]) -> None:
    if logger["name"] != "wandb" or logger["mode"] != "online":
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_netrc = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    if not os.environ.get("WANDB_API_KEY") and not has_netrc:
        raise ConfigError(
            "logger.mode=online needs W&B credentials: run `wandb login` "
            "(or set WANDB_API_KEY), or use logger.mode=offline"
        )


@contextlib.contextmanager
def _compile_context(p: Plan) -> Iterator[None]:
    """Curvature optimizers reuse the graph (retain_graph=True), which AOTAutograd's donated
    buffers forbid; the setting is patched for this run only."""
    if not p.trainer.compile:
        yield
        return
    with donated_buffers_off():
        yield


@contextlib.contextmanager
def _run_log(record: RunRecord | None) -> Iterator[None]:
    """The run's log, tracebacks included, to <run>/run.log."""
    if record is None:
        yield
        return
    record.dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(record.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def _wandb_logger(p: Plan, trainer: Trainer) -> Any:
    logger = p.config["logger"]
    if logger["name"] != "wandb" or logger["mode"] == "disabled":
        return None
    from lehi.logging import WandbLogger

    config = p.config
    wandb_logger = WandbLogger(
        mode=logger["mode"],
        project=logger["project"],
        entity=logger["entity"],
        group=logger["group"],
        tags=list(logger["tags"]),
        name="{}/{}/lr={:g}/seed={}-{}".format(
            config["experiment"]["name"],
            config["optimizer"]["label"],
            float(config["optimizer"]["lr"]),
            p.seed,
            identity_hash(config),
        ),
        run_dir=p.record.dir,
        config=config,
    )
    trainer.on_row = wandb_logger.log
    return wandb_logger
