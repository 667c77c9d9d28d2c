"""A run's identity is its config: skip and resume only the very same run; rerun from a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from lehi.config import ConfigError
from lehi.record import NON_IDENTITY, RunRecord, find_runs, identity, identity_hash, run_dir
from lehi.rerun import main as rerun_main
from lehi.runner import run


def overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"paths.results_dir={tmp_path / 'runs'}", "logger=files", *extra]


def resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def test_identity_ignores_only_keys_that_cannot_change_numbers(tmp_path):
    base = resolved(compose_config(overrides(tmp_path)))
    same = resolved(
        compose_config(
            [
                f"paths.results_dir={tmp_path / 'elsewhere'}",
                "logger=wandb",
                "trainer.progress=true",
                "trainer.force=true",
                "trainer.threads=2",
                "optimizer.label=adam_again",
            ]
        )
    )
    assert identity_hash(same) == identity_hash(base)
    for change in (
        "trainer.epochs=5",
        "optimizer.eps=1e-6",
        "seed=1",
        "model=mlp",
        "dataset.batch_size=32",
        "trainer.precision=bf16",
    ):
        other = resolved(compose_config(overrides(tmp_path, change)))
        assert identity_hash(other) != identity_hash(base), change
    kept = identity(base)
    assert "paths" not in kept and "logger" not in kept and "threads" not in kept["trainer"]
    assert all(key.split(".")[0] in base for key in NON_IDENTITY)


def test_folder_is_readable_and_carries_the_identity(tmp_path):
    config = resolved(compose_config(overrides(tmp_path, "optimizer=lehi", "optimizer.lr=3e-4")))
    folder = run_dir(tmp_path / "runs", config)
    assert folder.parts[-4:-1] == ("digits", "lehi", "lr=0.0003")
    assert folder.name == f"seed=0-{identity_hash(config)}"


def test_two_configs_train_twice_and_each_repeat_skips(tmp_path, one_thread):
    """The issue's scenario: hybrid=max then hybrid=sum into one results folder."""
    first = overrides(tmp_path, "optimizer=lehibrid", "trainer.epochs=1")
    second = [*first, "optimizer.hybrid=sum"]
    a = run(compose_config(first))
    b = run(compose_config(second))
    assert a["status"] == b["status"] == "completed"
    assert a["identity"] != b["identity"]
    assert a["final"]["val_loss"] != b["final"]["val_loss"]
    runs = find_runs(tmp_path / "runs")
    assert len(runs) == 2
    hybrids = sorted(r.read_config()["optimizer"]["hybrid"] for r in runs)
    assert hybrids == ["max", "sum"]

    stamps = {r.dir: r.summary.stat().st_mtime_ns for r in runs}
    assert run(compose_config(first)) == a  # skipped: the recorded summary comes back
    assert run(compose_config(second)) == b
    assert {r.dir: r.summary.stat().st_mtime_ns for r in find_runs(tmp_path / "runs")} == stamps


def test_pinned_folder_of_another_run_is_refused(tmp_path, one_thread):
    pinned = f"paths.run_dir={tmp_path / 'pinned'}"
    assert run(compose_config(overrides(tmp_path, pinned, "trainer.epochs=1")))["status"]
    before = (tmp_path / "pinned" / "summary.json").read_bytes()
    with pytest.raises(ConfigError, match="holds another run"):
        run(compose_config(overrides(tmp_path, pinned, "trainer.epochs=2")))
    assert (tmp_path / "pinned" / "summary.json").read_bytes() == before


def test_rerun_reproduces_a_recorded_run_exactly(tmp_path, one_thread, capsys):
    summary = run(compose_config(overrides(tmp_path, "trainer.epochs=2")))
    (folder,) = [r.dir for r in find_runs(tmp_path / "runs")]
    assert rerun_main([str(folder), "--results-dir", str(tmp_path / "rerun")]) == 0
    (again,) = find_runs(tmp_path / "rerun")
    assert again.dir.name == folder.name  # the same identity
    new = again.read_summary()
    assert new["final"]["val_loss"] == summary["final"]["val_loss"]
    assert new["last3"] == summary["last3"]
    out = capsys.readouterr().out
    assert "recorded" in out and "+0.000 %" in out


def test_summary_records_identity_and_the_divergence_fields(tmp_path, one_thread):
    summary = run(compose_config(overrides(tmp_path, "trainer.epochs=1")))
    on_disk = json.loads(RunRecord(find_runs(tmp_path / "runs")[0].dir).summary.read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["optimizer_name"] == "adam" and on_disk["identity"]
    assert on_disk["initial"]["val_loss"] > on_disk["final"]["val_loss"]
    assert on_disk["max_spike"] >= 1.0 and on_disk["divergence"] is None
