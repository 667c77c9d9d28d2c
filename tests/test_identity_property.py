"""The identity is exactly the keys that can change a run's numbers (lehi.record.NON_IDENTITY).

Two halves, both generic over whatever NON_IDENTITY holds:

- every leaf key of every composed preset (each experiment × each optimizer) outside
  NON_IDENTITY changes ``identity_hash`` when its value changes, and every leaf inside it
  does not;
- every NON_IDENTITY entry, changed in a tiny real run (digits, 6 steps), leaves the metric
  rows equal to the unchanged run's, every column but the two clocks. A training option put
  into NON_IDENTITY (e.g. ``optimizer.update_clip``) fails here: its run trains differently.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from lehi.record import NON_IDENTITY, find_runs, identity_hash
from lehi.runner import FINAL_STATUSES, run

PRESETS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))

#: The tiny real run: digits, 6 steps, an evaluation every 3, a train row every 2.
TINY = ["logger=files", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=2"]
#: Changes for NON_IDENTITY entries whose value has no generic alternative (text, a group).
#: paths.results_dir needs none: every run of the second half has a folder of its own.
ALTERNATIVES: dict[str, list[str]] = {
    "paths": [
        "paths.data_dir={tmp}/data",
        "paths.cache_dir={tmp}/cache",
        "paths.run_dir={tmp}/pinned",
    ],
    "logger": ["logger=wandb"],
    "experiment.reuse_from": ["experiment.reuse_from=[elsewhere]"],
    "optimizer.label": ["optimizer.label=renamed"],
    "trainer.device": ["trainer.device=cpu"],
    "trainer.resume": ["trainer.resume=false"],
    "trainer.progress": ["trainer.progress=true"],
}
#: NON_IDENTITY entries the tiny digits run does not have, each with the reason why its
#: real-run check is not needed (the hash half still covers it in the presets that have it).
ELSEWHERE = {
    "dataset.data_dir": "the folder of the data files: digits is bundled, it reads none",
}
#: The clocks: the only columns that differ between two runs of the same identity.
CLOCKS = ("wall_time", "train_time")


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf; a list or an empty mapping is one leaf."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def non_identity(key: str) -> bool:
    return any(key == entry or key.startswith(f"{entry}.") for entry in NON_IDENTITY)


def changed(value: Any) -> Any:
    """A value that differs from ``value`` (only the JSON the identity hashes must differ)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, str):
        return f"{value}~"
    if isinstance(value, list):
        return [*value, 0]
    return {"~": 0} if isinstance(value, dict) else 0


def with_leaf(config: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``config`` with the leaf at ``key`` set to ``value``."""
    copy = json.loads(json.dumps(config))
    node = copy
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return copy


#: Every preset with the default optimizer, and every other optimizer in the default preset:
#: together every key of every preset × optimizer (an optimizer's keys come from its own
#: config whatever the preset), at a fifth of the composes.
COMBINATIONS = [(p, "adam") for p in PRESETS] + [("digits", o) for o in OPTIMIZERS if o != "adam"]


def _choice(preset: str, optimizer: str) -> str:
    """``optimizer=<optimizer>``, or the preset's own reading where it tunes no LR for that
    optimizer (an ablation nominee's confirmation runs one LEHI reading)."""
    spec = yaml.safe_load((REPO / "experiments" / f"{preset}.yaml").read_text())
    tuned = (spec.get("experiment") or {}).get("tuned_lr")
    if tuned is None or optimizer in tuned:
        return f"optimizer={optimizer}"
    return f"reading={next(iter(tuned))}"


@functools.cache
def composed(preset: str, optimizer: str) -> dict[str, Any]:
    cfg = compose_config([f"experiment={preset}", _choice(preset, optimizer), "logger=files"])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(("preset", "optimizer"), COMBINATIONS)
def test_every_key_outside_non_identity_changes_the_hash_and_no_other_does(preset, optimizer):
    config = composed(preset, optimizer)
    base = identity_hash(config)
    for key, value in leaves(config):
        other = identity_hash(with_leaf(config, key, changed(value)))
        if non_identity(key):
            assert other == base, f"{preset}/{optimizer}: {key} is not part of the identity"
        else:
            assert other != base, f"{preset}/{optimizer}: {key} must change the identity"


def test_every_non_identity_entry_names_a_key_of_some_preset():
    """A misspelt entry would leave the key it meant inside the identity, silently."""
    keys = {key for p, o in COMBINATIONS for key, _ in leaves(composed(p, o))}
    prefixes = {".".join(key.split(".")[:n]) for key in keys for n in range(1, key.count(".") + 2)}
    assert [entry for entry in NON_IDENTITY if entry not in prefixes] == []


def tiny_config(optimizer: str, root: Path, *extra: str) -> dict[str, Any]:
    cfg = compose_config([*TINY, f"optimizer={optimizer}", f"paths.results_dir={root}", *extra])
    return OmegaConf.to_container(cfg, resolve=True)


def metric_rows(optimizer: str, root: Path, *extra: str) -> list[dict[str, Any]]:
    """The metrics rows of the tiny run under ``root``, run to its end, without the clocks.

    A run that stops before its end without a final status (a key that bounds one
    invocation's work) is started again, with the same config, until it ends.
    """
    cfg = compose_config([*TINY, f"optimizer={optimizer}", f"paths.results_dir={root}", *extra])
    for _ in range(10):
        if run(cfg)["status"] in FINAL_STATUSES:
            break
    (record,) = find_runs(root)
    assert record.read_summary()["status"] == "completed"
    return [{k: v for k, v in row.items() if k not in CLOCKS} for row in record.read_metrics()]


def entry_changes(entry: str, tmp: Path) -> tuple[str, list[str]]:
    """(optimizer, overrides) that change ``entry`` in the tiny run."""
    if entry in ALTERNATIVES:
        return "lehi", [o.format(tmp=tmp) for o in ALTERNATIVES[entry]]
    # LEHI first (the method under test), then any optimizer whose config has the key.
    for optimizer in ["lehi", *OPTIMIZERS]:
        config = tiny_config(optimizer, tmp)
        found = [(k, v) for k, v in leaves(config) if k == entry or k.startswith(f"{entry}.")]
        if found:
            for key, value in found:
                assert not isinstance(value, str), f"add a value for {key} to ALTERNATIVES"
            return optimizer, [f"{key}={1 if v is None else changed(v)}" for key, v in found]
    pytest.fail(f"{entry} is not in the tiny run's config: add it to ALTERNATIVES or ELSEWHERE")


def test_changing_a_non_identity_key_leaves_the_metric_rows_equal(tmp_path, one_thread):
    base: dict[str, list[dict[str, Any]]] = {}
    for number, entry in enumerate(e for e in NON_IDENTITY if e not in ELSEWHERE):
        optimizer, overrides = entry_changes(entry, tmp_path / f"{number}")
        if optimizer not in base:
            base[optimizer] = metric_rows(optimizer, tmp_path / f"base-{optimizer}")
            assert [r["step"] for r in base[optimizer] if r["split"] == "val"] == [0, 3, 6]
        rows = metric_rows(optimizer, tmp_path / f"{number}", *overrides)
        assert rows == base[optimizer], f"{entry} ({overrides}) changed the run's numbers"
