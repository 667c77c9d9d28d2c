"""Shared test helpers: composing the real Hydra configs, and CPU threading."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from helpers.threads import single_thread
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED_DATA = Path(os.environ.get("LEHI_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml composed with ``overrides`` through Hydra's compose API."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


#: Tiny models on a 2-core machine run fastest (and steadiest) on one thread.
one_thread = pytest.fixture(single_thread, name="one_thread")


#: ``make mutate``: the tests written for each mutated module; [tool.mutmut] in pyproject.toml
#: selects their union. A mutant runs those of its module's tests that call its function
#: (mutmut's mapping): the end-to-end runs call nearly every module, but only judge the run
#: record, the summary and the divergence rule, and cost seconds each.
OPTIMIZER_TESTS = ("test_optim.py", "test_optim_paths.py", "test_reference.py", "test_samplers.py")
MUTATION_TESTS = {
    # The checks that guard other people's training loops, before the optimizers' prefix.
    "lehi.optim.misuse.": (*OPTIMIZER_TESTS, "test_misuse.py"),
    "lehi.optim.update_watch.": (*OPTIMIZER_TESTS, "test_own_loop.py"),
    "lehi.optim.": OPTIMIZER_TESTS,
    "lehi.curvature.": OPTIMIZER_TESTS,
    "lehi.record.": ("test_identity_property.py", "test_run_identity.py", "test_record.py"),
    "lehi.divergence.": ("test_divergence.py",),
    "lehi.summary.": ("test_divergence.py", "test_run_identity.py"),
    "lehi.results.": ("test_results.py", "test_verdicts.py", "test_stats.py"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``make mutate``, a mutant's own tests only, fastest first.

    mutmut runs a mutant's tests with ``-x`` in no particular order (a set), so a killed
    mutant costs the tests before the first one that fails it. Its stats run recorded each
    test's duration (mutants/mutmut-stats.json, in the working directory of its workers); the
    quickest killing test then comes early. Outside a mutant's run nothing changes.
    """
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    stats = Path("mutmut-stats.json")
    if "__mutmut_" not in mutant or not stats.exists():
        return
    # Two mutants run at once on the two cores: two torch threads each would oversubscribe them
    # (and mutmut's CPU-time limit counts every thread).
    torch.set_num_threads(1)
    files = next((f for prefix, f in MUTATION_TESTS.items() if mutant.startswith(prefix)), None)
    if files is not None:
        kept, dropped = [], []
        for item in items:
            (kept if item.path.name in files else dropped).append(item)
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    durations = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
