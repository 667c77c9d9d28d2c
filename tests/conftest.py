"""Shared test helpers: composing the real Hydra configs, and CPU threading."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
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
