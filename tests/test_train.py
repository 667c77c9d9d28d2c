"""The trainer end to end on the offline default (scikit-learn digits): real training runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, compose_config
from omegaconf import OmegaConf

import lehi.data
from lehi import roster
from lehi.checkpoint import CheckpointError
from lehi.optim import build_optimizer
from lehi.record import METRIC_COLUMNS, RunRecord, find_runs
from lehi.record import run_dir as record_dir
from lehi.runner import build_model, run
from lehi.train import Trainer
from lehi.trainer_config import TrainerConfig

OPTIMIZERS = roster.names()


def digits_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"paths.results_dir={tmp_path / 'results'}",
        "logger=files",
        "trainer.epochs=3",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return RunRecord(run_dir).read_metrics()


def only_run(root: Path) -> Path:
    (record,) = find_runs(root)
    return record.dir


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains_on_digits_and_writes_results(tmp_path, optimizer, one_thread):
    lr = {"sophia": "1e-3"}.get(optimizer, "1e-3")
    cfg = compose_config(digits_overrides(tmp_path, f"optimizer={optimizer}", f"optimizer.lr={lr}"))
    summary = run(cfg)
    run_dir = only_run(tmp_path / "results")
    assert run_dir.parent.relative_to(tmp_path / "results").parts == (
        "digits",
        optimizer,
        "lr=0.001",
    )
    assert summary["status"] == "completed"

    rows = read_metrics(run_dir)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 22, 44, 66]
    assert val[-1]["loss"] < 0.6 * val[0]["loss"]
    assert val[-1]["metric"] > 0.8
    with open(run_dir / "metrics.csv") as f:
        assert f.readline().strip().split(",") == list(METRIC_COLUMNS)

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["optimizer"] == optimizer and on_disk["lr"] == 1e-3
    assert on_disk["final"]["val_loss"] == pytest.approx(val[-1]["loss"])
    last3 = torch.tensor([r["loss"] for r in val[-3:]], dtype=torch.float64)
    assert on_disk["last3"]["val_loss_mean"] == pytest.approx(last3.mean().item())
    assert on_disk["last3"]["val_loss_std"] == pytest.approx(last3.std().item())
    curvature = {"adam": 0, "adamw": 0, "lehi": 66, "lehibrid": 66, "sophia": 7}[optimizer]
    assert on_disk["curvature_passes"] == curvature
    assert rows[-1]["curvature_passes"] == curvature

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optimizer"]["name"] == optimizer and config["dataset"]["name"] == "digits"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert not (run_dir / "checkpoint.pt").exists()


def test_wandb_offline_run_folder_is_created(tmp_path, one_thread):
    cfg = compose_config(
        digits_overrides(tmp_path, "logger=wandb", "logger.mode=offline", "trainer.epochs=1")
    )
    assert run(cfg)["status"] == "completed"
    wandb_dir = only_run(tmp_path / "results") / "wandb"
    assert list(wandb_dir.glob("offline-run-*")), "no W&B offline run folder"


def test_completed_run_is_skipped_and_force_reruns(tmp_path, one_thread):
    cfg = compose_config(digits_overrides(tmp_path, "trainer.epochs=1"))
    first = run(cfg)
    metrics = only_run(tmp_path / "results") / "metrics.csv"
    stamp = metrics.stat().st_mtime_ns
    assert run(cfg) == first
    assert metrics.stat().st_mtime_ns == stamp
    forced = run(
        compose_config(digits_overrides(tmp_path, "trainer.epochs=1", "trainer.force=true"))
    )
    assert forced["final"] == first["final"]
    assert metrics.stat().st_mtime_ns != stamp


# ------------------------------------------------------------------------------ resume
def build_trainer(optimizer: str, run_dir: Path, on_row=None) -> Trainer:
    torch.manual_seed(0)
    cfg = OmegaConf.to_container(compose_config([f"optimizer={optimizer}"]), resolve=True)
    bundle = lehi.data.build(cfg["dataset"])
    model = build_model(cfg["model"], bundle)
    opt = build_optimizer(cfg["optimizer"], model, loss="cross_entropy", ignore_index=-100, seed=0)
    config = TrainerConfig.from_config(
        cfg["trainer"], epochs=4, log_every=5, schedule="cosine", warmup_fraction=0.1
    )
    trainer = Trainer(
        model, opt, bundle, config, device=torch.device("cpu"), seed=0, record=RunRecord(run_dir)
    )
    trainer.on_row = on_row
    return trainer


@pytest.mark.parametrize("optimizer", ["adam", "lehi"])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(
    tmp_path, optimizer, one_thread
):
    reference = build_trainer(optimizer, tmp_path / "reference")
    assert reference.fit()["status"] == "completed"

    interrupted = build_trainer(optimizer, tmp_path / "resumed")
    # Stop mid-epoch (step 35 of 22-step epochs), after the first checkpoint at step 22.
    interrupted.on_row = lambda row: row["step"] >= 33 and interrupted.request_stop()
    assert interrupted.fit()["status"] == "interrupted"
    assert interrupted.step == 35

    record = RunRecord(tmp_path / "resumed")
    resumed = build_trainer(optimizer, tmp_path / "resumed")
    resumed.resume_from(record.checkpoint)
    assert resumed.step == 35
    assert resumed.fit()["status"] == "completed"

    def losses(trainer):
        return [(r["step"], r["split"], r["loss"], r["metric"]) for r in trainer.rows]

    assert losses(resumed) == losses(reference)
    for a, b in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def run_cli(*args: str, cwd: Path = REPO, **popen) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_sigterm_checkpoints_and_a_rerun_finishes_identically(tmp_path):
    common = [
        "logger=files",
        "optimizer=lehi",
        "trainer.epochs=30",
        "hydra.run.dir=" + str(tmp_path / "h"),
    ]
    reference = run_cli(*common, f"paths.run_dir={tmp_path / 'ref'}")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    run_dir = tmp_path / "run"
    proc = run_cli(*common, f"paths.run_dir={run_dir}")
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    if (run_dir / "summary.json").exists():
        pytest.skip("the run finished before SIGTERM arrived; nothing was interrupted")
    assert (run_dir / "checkpoint.pt").exists()

    # The default trainer.resume=auto continues the run: its config.yaml matches.
    resumed = run_cli(*common, f"paths.run_dir={run_dir}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    def rows(path):
        return [(r["step"], r["split"], r["loss"], r["metric"]) for r in read_metrics(path)]

    assert rows(run_dir) == rows(tmp_path / "ref")  # every row, train windows included
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ divergence, bad input
def test_diverging_lr_is_recorded_as_diverged_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "logger=files",
        "optimizer=adam",
        "optimizer.lr=50",
        "trainer.epochs=3",
        f"paths.run_dir={run_dir}",
        f"hydra.run.dir={tmp_path / 'h'}",
    )
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged_at_step"] is not None


def test_loss_without_hessian_rule_is_rejected():
    with pytest.raises(ValueError, match="supported losses: cross_entropy, mse"):
        options = {"_target_": "lehi.optim.LEHI", "name": "lehi", "label": "lehi", "lr": 1e-3}
        build_optimizer(options, torch.nn.Linear(2, 1), loss="huber", ignore_index=-100, seed=0)


def test_cli_bad_input_prints_one_line_and_exits_2(tmp_path):
    proc = run_cli(
        "optimizer.lr=0", f"paths.results_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'h'}"
    )
    assert proc.wait(timeout=120) == 2
    err = proc.stderr.read().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: optimizer.lr=0 is out of range")
    proc = run_cli("optimizer=sgd", f"hydra.run.dir={tmp_path / 'h'}")
    assert proc.wait(timeout=120) == 1
    message = proc.stderr.read()
    assert "Available options" in message and "lehibrid" in message


def test_broken_checkpoint_is_a_clear_error_and_leaves_the_folder(tmp_path):
    cfg = compose_config(digits_overrides(tmp_path, "trainer.resume=true"))
    run_dir = record_dir(tmp_path / "results", OmegaConf.to_container(cfg, resolve=True))
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    (run_dir / "metrics.csv").write_text("step,epoch\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        run(cfg)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_two_job_multirun_through_submitit_local(tmp_path):
    proc = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "optimizer=adam,lehi",
        "trainer.epochs=1",
        "logger=files",
        f"paths.results_dir={tmp_path / 'results'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    runs = find_runs(tmp_path / "results")
    assert sorted(r.read_summary()["optimizer"] for r in runs) == ["adam", "lehi"]
    assert {r.read_summary()["status"] for r in runs} == {"completed"}
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))


def test_overflowing_logits_are_divergence_not_a_crash(tmp_path, one_thread):
    # LEHI at lr 1e-2 on digits blows the logits up within a few steps: sampling labels from
    # non-finite probabilities fails inside the curvature pass, which must read as diverged.
    cfg = compose_config(digits_overrides(tmp_path, "optimizer=lehi", "optimizer.lr=1e-2"))
    summary = run(cfg)
    assert summary["status"] == "diverged"
    assert summary["error"] is None


@pytest.mark.parametrize("optimizer", ["adam", "lehi", "sophia"])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, optimizer, one_thread):
    # Two micro-batches of 32 give the same step as one batch of 64 (same examples, same
    # order): the loss, and for LEHI/Sophia h = (mean auxiliary gradient)², with the same draws.
    common = [f"optimizer={optimizer}", "trainer.epochs=2"]
    if optimizer != "adam":
        common.append("optimizer.sampler=inverse_cdf")
    if optimizer == "lehi":
        # LEHI divides by sqrt(h) + ε, and h can be ~0 where the auxiliary gradient's
        # random-sign terms cancel: with ε = 1e-8 the last-bit differences of another
        # summation order are amplified up to 1/ε. A larger ε bounds that amplification.
        common.append("optimizer.eps=1e-4")
    full = run(compose_config(digits_overrides(tmp_path / "full", *common)))
    accumulated = run(
        compose_config(
            digits_overrides(
                tmp_path / "acc", *common, "dataset.batch_size=32", "trainer.grad_accum=2"
            )
        )
    )
    assert accumulated["steps"] == full["steps"] == 44
    assert accumulated["curvature_passes"] == full["curvature_passes"]
    assert accumulated["final"]["val_loss"] == pytest.approx(full["final"]["val_loss"], rel=1e-5)


def test_step_budget_ends_mid_epoch_at_its_step(tmp_path, one_thread):
    # digits has 22 steps per epoch: a 30-step budget stops inside the second epoch.
    cfg = compose_config(digits_overrides(tmp_path, "trainer.epochs=null", "trainer.max_steps=30"))
    summary = run(cfg)
    assert summary["steps"] == summary["total_steps"] == 30
    assert summary["final"]["step"] == 30
    rows = read_metrics(only_run(tmp_path / "results"))
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 22, 30]


# ------------------------------------------------------------------ subset evaluations
TIMING = ("wall_time", "train_time")


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_subset_evaluations_leave_training_and_the_last_window_unchanged(tmp_path, one_thread):
    budget = ["trainer.epochs=null", "trainer.max_steps=30", "trainer.evaluations=6"]
    full = run(compose_config(digits_overrides(tmp_path / "full", *budget)))
    cfg = compose_config(
        digits_overrides(tmp_path / "sub", *budget, "trainer.eval_subset_batches=2")
    )
    subset = run(cfg)
    full_rows = untimed(read_metrics(only_run(tmp_path / "full" / "results")))
    sub_rows = untimed(read_metrics(only_run(tmp_path / "sub" / "results")))

    def split(rows, name):
        return [r for r in rows if r["split"] == name]

    # Evaluating on fewer batches changes no training step and no full-split evaluation.
    assert split(sub_rows, "train") == split(full_rows, "train")
    eval_steps = [r["step"] for r in split(full_rows, "val")]
    assert eval_steps == [0, 5, 10, 15, 20, 25, 30]
    full_kept = [r for r in split(full_rows, "val") if r["step"] in (0, 20, 25, 30)]
    assert split(sub_rows, "val") == full_kept
    assert [r["step"] for r in split(sub_rows, "val_subset")] == [5, 10, 15]
    assert subset["last3"] == full["last3"] and subset["initial"] == full["initial"]
    # The subset is 2 of the split's batches: its loss is not the full split's.
    by_step = {r["step"]: r["loss"] for r in split(full_rows, "val")}
    assert all(r["loss"] != by_step[r["step"]] for r in split(sub_rows, "val_subset"))
    # The option at its neutral value (null) is not part of the identity: old runs keep theirs.
    assert (
        only_run(tmp_path / "full" / "results").name != only_run(tmp_path / "sub" / "results").name
    )
    neutral = compose_config(digits_overrides(tmp_path / "full", *budget))
    resolved = OmegaConf.to_container(neutral, resolve=True)
    assert resolved["trainer"]["eval_subset_batches"] is None
    del resolved["trainer"]["eval_subset_batches"]
    assert record_dir(tmp_path / "full" / "results", resolved) == only_run(
        tmp_path / "full" / "results"
    )


def test_a_prefix_replay_counts_subset_evaluations(tmp_path, one_thread):
    cfg = compose_config(
        digits_overrides(
            tmp_path,
            "trainer.epochs=null",
            "trainer.max_steps=30",
            "trainer.evaluations=6",
            "trainer.eval_subset_batches=2",
            "trainer.stop_after_evaluations=1",
        )
    )
    assert run(cfg)["status"] == "interrupted"
    rows = read_metrics(record_dir(tmp_path / "results", OmegaConf.to_container(cfg, resolve=True)))
    assert [(r["step"], r["split"]) for r in rows if r["split"] != "train"] == [
        (0, "val"),
        (5, "val_subset"),
    ]
