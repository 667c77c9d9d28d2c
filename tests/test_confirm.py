"""Confirmation presets: the tuning sweep's workload at each reading's tuned LR, fresh seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from lehi.record import identity
from lehi.results import confirm

PRESETS = sorted((REPO / "experiments").glob("confirm_*.yaml"))


def resolved(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(overrides), resolve=True)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_a_confirmation_run_is_its_tuning_run_but_for_name_seed_and_provenance(path: Path):
    spec = yaml.safe_load(path.read_text())
    base = spec["experiment"]["tuned_from"]["experiment"]
    params = spec["hydra"]["sweeper"]["params"]
    seeds = [int(s) for s in str(params["seed"]).split(",")]
    assert len(seeds) == confirm.CONFIRM_SEEDS
    tuning = yaml.safe_load((REPO / "experiments" / f"{base}.yaml").read_text())
    tuning_seeds = [int(s) for s in str(tuning["hydra"]["sweeper"]["params"]["seed"]).split(",")]
    assert not set(seeds) & set(tuning_seeds)
    for reading in str(params["reading"]).split(","):
        lr = spec["experiment"]["tuned_lr"][reading]
        config = resolved([f"experiment={path.stem}", f"reading={reading}", "seed=3"])
        assert config["optimizer"]["label"] == reading
        ours = identity(config)
        theirs = identity(
            resolved([f"experiment={base}", f"reading={reading}", f"optimizer.lr={lr}", "seed=3"])
        )
        assert ours["optimizer"]["lr"] == lr
        assert ours.pop("experiment")["name"] == path.stem
        theirs.pop("experiment")
        assert ours == theirs, reading


def test_tuned_lrs_take_the_best_lr_without_divergence_from_the_tuning_seeds(tmp_path: Path):
    from helpers.results import write_run

    from lehi.results import collect

    root = tmp_path / "results"
    for seed in (0, 1):
        write_run(root, "adam", 1e-3, seed, 0.5, experiment="toy")
        write_run(root, "adam", 1e-2, seed, 0.3, experiment="toy")  # best
        write_run(root, "lehi", 1e-2, seed, 0.2 if seed else None, experiment="toy")  # diverged
        write_run(root, "lehi", 1e-3, seed, 0.4, experiment="toy")
    tuned = confirm.tuned_lrs(collect(root), "toy")
    assert tuned["adam"]["lr"] == 1e-2 and tuned["adam"]["seeds"] == [0, 1]
    assert tuned["lehi"]["lr"] == 1e-3  # the lower loss at 1e-2 had a diverged seed
    assert "sophia" not in tuned
