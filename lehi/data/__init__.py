"""Datasets of the lehi suite, built the way models are: from a config's ``_target_``.

Every dataset is one YAML file, conf/dataset/<name>.yaml, holding ``_target_`` (the module's
``build`` function, e.g. ``lehi.data.ptb.build``), every option of that function with its
default, and two metadata keys the builder does not take: ``name`` and ``recipe`` (what the
dataset asks of the trainer). The YAML is the only copy of the defaults: the builders take
keyword-only arguments without defaults. ``build(cfg.dataset)`` builds from the composed
config; ``build("ptb", batch_size=8)`` reads conf/dataset/ptb.yaml itself (for tests, scripts
and the diagnostics study). Builders live in their own modules and are imported on first use,
so that building digits does not import torchvision. Tensors are returned on the CPU; move the
bundle with ``.to(device)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lehi.config import resolve_target
from lehi.data.bundle import TASKS, Batches, BPTTBatches, DataBundle, TensorBatches, TokenWindows
from lehi.data.files import DataFileError, DataUnavailableError

__all__ = [
    "TASKS",
    "Batches",
    "BPTTBatches",
    "DataBundle",
    "DataFileError",
    "DataUnavailableError",
    "TensorBatches",
    "TokenWindows",
    "build",
    "dataset_config",
    "known_datasets",
    "options",
]

#: The repository's Hydra configs (run.py's config_path).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: Keys of a dataset config that describe it to the runner and are not builder options.
METADATA_KEYS = ("name", "recipe")


def known_datasets() -> list[str]:
    """Names of the dataset configs in conf/dataset."""
    return sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))


def dataset_config(name: str) -> dict[str, Any]:
    """conf/dataset/<name>.yaml resolved as Hydra would (paths.data_dir from conf/config.yaml)."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "dataset" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known_datasets())}")
    dataset = OmegaConf.load(path)
    dataset.pop("defaults", None)  # the model this dataset brings: Hydra's business, not ours
    root = OmegaConf.create({"paths": OmegaConf.load(CONF_DIR / "config.yaml").paths})
    root.dataset = dataset
    return OmegaConf.to_container(root.dataset, resolve=True)


def options(name: str) -> dict[str, Any]:
    """The options of dataset `name` with their defaults (its YAML without the metadata)."""
    config = dataset_config(name)
    for key in (*METADATA_KEYS, "_target_"):
        config.pop(key, None)
    return config


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of a mapping; an OmegaConf DictConfig is resolved into containers."""
    if type(options).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(options, resolve=True)
    return dict(options)


def _binding_error(builder: Any, target: str, given: Mapping[str, Any]) -> ValueError:
    """The one-line error for options the builder does not take or lacks.

    Only reached when the call itself failed, so inspecting the signature here costs nothing
    on the normal path and states exactly what the builder accepts.
    """
    parameters = inspect.signature(builder).parameters
    allowed = ", ".join(parameters)
    unknown = [k for k in given if k not in parameters]
    if unknown:
        return ValueError(f"unknown option dataset.{unknown[0]} for {target}; allowed: {allowed}")
    missing = [
        k for k, p in parameters.items() if k not in given and p.default is inspect.Parameter.empty
    ]
    return ValueError(f"dataset.{missing[0]} is required by {target}; options: {allowed}")


def build(options: Mapping[str, Any] | str, /, **overrides: Any) -> DataBundle:
    """Build a dataset from its config and return its DataBundle (on the CPU).

    Args:
        options: the resolved dataset config (``cfg.dataset``, a dict or DictConfig):
            ``_target_`` names the builder, ``name`` and ``recipe`` are dropped, every other
            key is passed to the builder. A dataset name instead reads conf/dataset/<name>.yaml.
        overrides: keys replacing (or adding to) those of the config.

    Raises:
        ValueError: one line naming ``dataset.<key>`` for an option the builder does not take
            (with the allowed ones) or one it needs that is absent.
        DataFileError: a data file is malformed (one line naming it).
        DataUnavailableError: data is missing and cannot be downloaded.
    """
    config = dataset_config(options) if isinstance(options, str) else _plain(options)
    config.update(overrides)
    for key in METADATA_KEYS:
        config.pop(key, None)
    if "_target_" not in config:
        raise ValueError("dataset._target_ is missing; a dataset config names its builder there")
    target = config.pop("_target_")
    builder = resolve_target(target, "dataset._target_")
    try:
        return builder(**config)
    except TypeError as exc:
        # A traceback without a frame inside the builder means the call's arguments did not
        # bind; a TypeError raised inside the builder is a bug and keeps its traceback.
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
            raise _binding_error(builder, target, config) from None
        raise
