"""Fault injection: malformed command lines, kills at every point of the save sequence,
two processes on one run, signals to a sweep. Each fault ends in a clear outcome and loses
nothing that was already recorded."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compose_config

import lehi.train
from lehi.record import RunBusyError, RunRecord, find_runs
from lehi.runner import run

# ------------------------------------------------------------ malformed command lines
#: (command-line arguments, text the one-line error must contain, exit status)
MALFORMED = [
    (["optimizer.lr=inf"], "optimizer.lr", 2),
    (["optimizer.lr=nan"], "optimizer.lr", 2),
    (["optimizer.lr=0"], "optimizer.lr", 2),
    (["optimizer.lr=-1e-3"], "optimizer.lr", 2),
    (["optimizer.lr=abc"], "optimizer.lr", 2),
    (["optimizer.eps=abc"], "optimizer.eps", 2),
    (["optimizer.betas=[0.9]"], "optimizer.betas", 2),
    (["optimizer.betas=[0.9,1.5]"], "optimizer.betas", 2),
    (["optimizer.betas=[1.0,0.999]"], "optimizer.betas", 2),
    (["optimizer.betas=abc"], "optimizer.betas", 2),
    (["optimizer.weight_decay=heavy"], "optimizer.weight_decay", 2),
    (["optimizer.foreach=maybe"], "optimizer.foreach", 2),
    (["+optimizer.momentum=0.9"], "optimizer.momentum", 2),
    (["optimizer=lehi", "optimizer.scale_by_batch=maybe"], "optimizer.scale_by_batch", 2),
    (["optimizer=lehi", "optimizer.hessian_every=0"], "hessian_every", 2),
    (["optimizer=lehi", "optimizer.hessian_every=1.5"], "optimizer.hessian_every", 2),
    (["optimizer=lehi", "optimizer.estimator=bogus"], "estimator", 2),
    (["optimizer=lehi", "optimizer.sampler=bogus"], "sampler", 2),
    (["optimizer=lehi", "optimizer.eps_inside_sqrt=1"], "optimizer.eps_inside_sqrt", 2),
    (["optimizer=lehibrid", "optimizer.hybrid=median"], "hybrid", 2),
    # LEHIBrid passes **kwargs on to LEHI: its keys and types are LEHI's
    (["optimizer=lehibrid", "optimizer.scale_by_batch=maybe"], "optimizer.scale_by_batch", 2),
    (["optimizer=lehibrid", "+optimizer.momentum=0.9"], "optimizer.momentum", 2),
    (["optimizer=sophia", "optimizer.rho=-1"], "rho", 2),
    (["seed=1.5"], "seed", 2),
    (["seed=abc"], "seed", 2),
    (["seed=-1"], "seed", 2),
    (["+extra=1"], "extra", 2),
    (["dataset.batch_size=0"], "dataset.batch_size", 2),
    (["dataset.batch_size=1.5"], "dataset.batch_size", 2),
    (["dataset.batch_size=abc"], "dataset.batch_size", 2),
    (["+dataset.bogus=1"], "dataset.bogus", 2),
    (["+model.bogus=1"], "model.bogus", 2),
    (["model.hidden=abc"], "model.hidden", 2),
    (["model=cnn"], "cnn", 2),
    (["trainer.epochs=0"], "trainer.epochs", 2),
    (["trainer.epochs=1.5"], "trainer.epochs", 2),
    (["trainer.max_steps=-5"], "trainer.max_steps", 2),
    (["trainer.eval_every=0"], "trainer.eval_every", 2),
    (["trainer.evaluations=0"], "trainer.evaluations", 2),
    (["trainer.log_every=0"], "trainer.log_every", 2),
    (["trainer.grad_clip=-1"], "trainer.grad_clip", 2),
    (["trainer.grad_clip=abc"], "trainer.grad_clip", 2),
    (["trainer.schedule=linear"], "trainer.schedule", 2),
    (["trainer.warmup_fraction=1"], "trainer.warmup_fraction", 2),
    (["trainer.min_lr_ratio=-1"], "trainer.min_lr_ratio", 2),
    (["trainer.divergence_factor=-1"], "trainer.divergence_factor", 2),
    (["trainer.divergence_factor=nan"], "trainer.divergence_factor", 2),
    (["trainer.threads=0"], "trainer.threads", 2),
    (["trainer.threads=-2"], "trainer.threads", 2),
    (["trainer.precision=fp16"], "trainer.precision", 2),
    (["trainer.compile=maybe"], "trainer.compile", 2),
    (["trainer.resume=maybe"], "trainer.resume", 2),
    (["trainer.progress=maybe"], "trainer.progress", 2),
    (["trainer.grad_accum=1000"], "trainer.grad_accum", 2),
    (["trainer.device=bogus"], "trainer.device", 2),
    (["+trainer.bogus=1"], "trainer.bogus", 2),
    (["experiment.scale=huge"], "experiment.scale", 2),
    (["logger.mode=loud"], "logger.mode", 2),
    (["logger=wandb", "logger.mode=online"], "logger.mode=online", 2),
]

if not importlib.util.find_spec("torch") or not __import__("torch").cuda.is_available():
    MALFORMED.append((["trainer.device=cuda"], "trainer.device", 2))


def _cli(monkeypatch, capsys, tmp_path: Path, args: list[str]) -> tuple[int, str]:
    """run.py's main in this process (Hydra parses ``args`` as on the command line)."""
    spec = importlib.util.spec_from_file_location("lehi_run_script", REPO / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    hydra_args = [
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    config_path = ["--config-path", str(REPO / "conf")]
    monkeypatch.setattr(sys, "argv", ["run.py", *config_path, *args, *hydra_args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "named", "status"), MALFORMED, ids=lambda v: str(v))
def test_malformed_command_line_is_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys, args, named, status
):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    results = tmp_path / "results"
    code, err = _cli(monkeypatch, capsys, tmp_path, [*args, f"paths.results_dir={results}"])
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert not results.exists()


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_results_dir_that_cannot_hold_runs_is_one_line(tmp_path, monkeypatch, capsys, kind):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    results = blocker / "results" if kind == "file" else Path("/proc/lehi-results")
    code, err = _cli(monkeypatch, capsys, tmp_path, [f"paths.results_dir={results}"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "paths.results_dir" in err
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------------- kills and resume
class Killed(BaseException):
    """A kill: not an Exception, so nothing records a failure on the way out."""


TIMING = {"wall_time", "train_time", "steps_per_s", "tokens_per_s"}


def _comparable(folder: Path) -> tuple[list[dict], dict]:
    record = RunRecord(folder)
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in record.read_metrics()]
    summary = {k: v for k, v in record.read_summary().items() if k not in TIMING}
    return rows, summary


def _digits(tmp_path: Path, name: str) -> list[str]:
    return [
        f"paths.run_dir={tmp_path / name}",
        "logger=files",
        "optimizer=lehi",
        "optimizer.lr=3e-3",
        "trainer.epochs=3",
        "trainer.log_every=7",
    ]


def _kill_on_call(monkeypatch, owner, name: str, call: int) -> None:
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            if name == "save_checkpoint":  # killed mid-write: a partial temp file stays
                (Path(args[0]).parent / ".checkpoint.pt.partial.tmp").write_bytes(b"PK\x03")
            raise Killed(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize(
    ("owner", "name", "call"),
    [
        (lehi.train, "save_checkpoint", 2),  # the 2nd checkpoint write, before its rename
        (RunRecord, "write_metrics", 2),  # after the 2nd checkpoint, before its metrics
        (lehi.train.Trainer, "train_step", 30),  # mid-window, between checkpoints
        (RunRecord, "write_metrics", 4),  # the final step's metrics
        (RunRecord, "write_summary", 1),  # the final step: metrics written, summary not
    ],
    ids=[
        "checkpoint-rename",
        "checkpoint-then-metrics",
        "mid-window",
        "final-metrics",
        "final-summary",
    ],
)
def test_kill_anywhere_in_the_save_sequence_then_rerun_matches(
    tmp_path, monkeypatch, one_thread, owner, name, call
):
    run(compose_config(_digits(tmp_path, "reference")))
    with monkeypatch.context() as patch:
        _kill_on_call(patch, owner, name, call)
        with pytest.raises(Killed):
            run(compose_config(_digits(tmp_path, "killed")))
    folder = tmp_path / "killed"
    assert not (folder / "summary.json").exists()
    (folder / ".checkpoint.pt.stale.tmp").write_bytes(b"")  # what a SIGKILL mid-write leaves
    summary = run(compose_config(_digits(tmp_path, "killed")))
    assert summary["status"] == "completed"
    assert _comparable(folder) == _comparable(tmp_path / "reference")
    assert not list(folder.glob(".*.tmp"))


def _cli_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def test_sigkill_then_rerun_matches_the_uninterrupted_run(tmp_path):
    common = ["logger=files", "optimizer=lehi", "trainer.epochs=12", "trainer.threads=1"]
    hydra = [f"hydra.run.dir={tmp_path / 'h'}"]
    ref = _cli_process(*common, *hydra, f"paths.run_dir={tmp_path / 'ref'}")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    folder = tmp_path / "run"
    proc = _cli_process(*common, *hydra, f"paths.run_dir={folder}")
    # Killed as soon as the first checkpoint (epoch 1 of 12) is on disk: a pause here let a
    # fast run finish first on a loaded machine, and the test skipped instead of testing.
    _wait_for(folder / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (folder / "summary.json").exists(), "the run finished before SIGKILL arrived"
    again = _cli_process(*common, *hydra, f"paths.run_dir={folder}")
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert _comparable(folder) == _comparable(tmp_path / "ref")


def test_sigterm_stops_a_sweep_after_checkpointing_with_a_nonzero_exit(tmp_path):
    results = tmp_path / "runs"
    proc = _cli_process(
        "-m",
        "logger=files",
        "optimizer=lehi",
        "trainer.epochs=30",
        "trainer.threads=1",
        "seed=0,1",
        f"paths.results_dir={results}",
        f"hydra.sweep.dir={tmp_path / 'h'}",
    )
    deadline = time.time() + 120
    while not list(results.rglob("checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "error: interrupted by SIGTERM" in proc.stderr.read()
    folders = [p.parent for p in results.rglob("config.yaml")]
    assert len(folders) == 1, "the sweep went on to its next job"
    assert (folders[0] / "checkpoint.pt").exists() and not (folders[0] / "summary.json").exists()


# ------------------------------------------------------------------ one run, one process
def test_second_process_on_the_same_run_stops_with_one_line(tmp_path, one_thread):
    cfg = compose_config(_digits(tmp_path, "busy"))
    with RunRecord(tmp_path / "busy").lock():
        with pytest.raises(RunBusyError, match="in use by another process"):
            run(cfg)
    assert not list((tmp_path / "busy").iterdir())
    assert run(cfg)["status"] == "completed"


def test_crash_before_the_first_evaluation_records_a_failed_run(tmp_path, monkeypatch, one_thread):
    def broken(self):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(lehi.train.Trainer, "evaluate", broken)
    from lehi.runner import RunFailed

    with pytest.raises(RunFailed, match="evaluation exploded"):
        run(compose_config(_digits(tmp_path, "crash")))
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert summary["status"] == "failed" and "evaluation exploded" in summary["error"]
    assert "Traceback" in (tmp_path / "crash" / "run.log").read_text()
    assert find_runs(tmp_path)[0].dir == tmp_path / "crash"
