"""Every config composes: each dataset × optimizer, and each experiment preset."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import CONF, REPO, compose_config
from omegaconf import OmegaConf

from lehi import roster
from lehi.config import ConfigError, resolve_target, signatures
from lehi.optim import (
    BUILDER_KEYS,
    CURVATURE_INPUTS,
    LEHI,
    LEHIBrid,
    build_optimizer,
    param_groups,
)
from lehi.record import RunRecord, identity, identity_hash, run_dir
from lehi.runner import plan

DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEFAULT_MODEL = {
    "digits": "mlp",
    "mnist": "mlp",
    "cifar10": "resnet18",
    "protein": "mlp",
    "ptb": "lstm",
    "fineweb": "llama",
}


def test_config_groups_are_complete():
    assert DATASETS == sorted(DEFAULT_MODEL)
    assert OPTIMIZERS == sorted(roster.names())  # a config file for each roster entry
    assert {"digits", "mnist_small", "protein_small", "ptb_small", "cifar10_small"} <= set(
        EXPERIMENTS
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_and_optimizer_compose(dataset, optimizer):
    cfg = compose_config([f"dataset={dataset}", f"optimizer={optimizer}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["dataset"]["name"] == dataset
    assert resolved["model"]["name"] == DEFAULT_MODEL[dataset]
    assert resolved["optimizer"]["name"] == optimizer == resolved["optimizer"]["label"]
    assert resolved["optimizer"]["lr"] > 0
    budget = resolved["trainer"]["epochs"] or resolved["trainer"]["max_steps"]
    assert budget > 0
    assert resolved["experiment"]["name"] == dataset
    lr = float(resolved["optimizer"]["lr"])
    folder = run_dir("runs", resolved)
    assert folder.parts[-4:] == (
        dataset,
        optimizer,
        f"lr={lr:g}",
        f"seed=0-{identity_hash(resolved)}",
    )
    assert plan(cfg).record.dir == folder  # and the config passes every check of lehi.config


def test_dataset_brings_its_model_but_the_command_line_wins():
    assert compose_config(["dataset=cifar10"]).model.name == "resnet18"
    assert compose_config(["dataset=cifar10", "model=cnn"]).model.name == "cnn"


def test_adamw_takes_the_recipe_weight_decay():
    assert compose_config(["optimizer=adamw"]).optimizer.weight_decay == 0.01
    cfg = compose_config(["optimizer=adamw", "dataset=fineweb"])
    assert cfg.optimizer.weight_decay == 0.1


#: Ablations that sweep some readings only, adopting their references from the main sweep.
PARTIAL_ABLATIONS = {
    # 6 min a run: the readings that bound the step
    "ablation_ptb_small": {"adam", "lehi", "lehi_eps_inside", "lehi_floor_clip",
                           "lehi_update_clip", "lehibrid"},
    # the stable reading, tuned for the confirmation (full scale, CNN and the decoder)
    "ablation_mnist": {"adam", "lehi", "lehibrid", "lehi_update_clip"},
    "ablation_protein": {"adam", "lehi", "lehibrid", "lehi_update_clip"},
    "ablation_cifar10_small": {"adam", "lehi", "lehibrid", "lehi_update_clip"},
    "ablation_fineweb_small": {"adam", "lehi", "lehibrid", "lehi_update_clip"},
}  # fmt: skip


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_with_its_sweep(experiment):
    with_hydra = _compose_with_hydra([f"experiment={experiment}"])
    cfg = OmegaConf.to_container(with_hydra, resolve=False)
    assert cfg["experiment"]["name"] == experiment
    assert cfg["experiment"]["scale"] == ("small" if experiment.endswith("small") else "full")
    params = with_hydra.hydra.sweeper.params
    if experiment.startswith("confirm_"):  # tests/test_confirm.py checks these in full
        assert set(params) == {"reading", "seed"}
        return
    if experiment.startswith("ablation_"):
        # every reading of conf/reading/ but the confirmations' references to other optimizers
        readings = {p.stem for p in (CONF / "reading").glob("*.yaml")} - {"adamw", "sophia"}
        swept = set(params["reading"].split(","))
        assert swept == PARTIAL_ABLATIONS.get(experiment, readings)
    else:  # every optimizer of conf/optimizer/
        assert params["optimizer"] == "glob(*)"
    lrs = [float(v) for v in params["optimizer.lr"].split(",")]
    assert lrs == sorted(lrs) and len(lrs) >= 7 and max(lrs) == pytest.approx(0.1)
    assert len(str(params["seed"]).split(",")) >= 2


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


# ---------------------------------------------------------------- each check in one place
BAD_OPTIONS = [
    # a range of lehi.optim.common, held for torch's own class too (Adam admits lr = inf)
    ("adam", {"lr": float("inf")}, "optimizer.lr=inf is out of range: expected a finite"),
    ("lehi", {"hessian_every": 0}, "optimizer.hessian_every=0 is out of range"),
    # a class's own torch-style check, given the config's key
    ("sophia", {"rho": -1.0}, "optimizer.rho must be > 0, got -1.0"),
    ("lehibrid", {"hybrid": "min"}, "optimizer.hybrid='min' is not one of max, sum, mix"),
    # keys and types from the signatures, LEHI's included where LEHIBrid passes **kwargs on
    ("lehibrid", {"momentum": 0.9}, "optimizer.momentum is not an option"),
    ("lehibrid", {"scale_by_batch": "maybe"}, "optimizer.scale_by_batch='maybe' is not allowed"),
    ("lehi", {"seed": 3}, "optimizer.seed is not an option"),
]


@pytest.mark.parametrize(("name", "overrides", "message"), BAD_OPTIONS, ids=str)
def test_build_optimizer_names_the_key(name, overrides, message):
    options = compose_config([f"optimizer={name}"]).optimizer
    options = {**OmegaConf.to_container(options, resolve=True), **overrides}
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError) as err:
        build_optimizer(options, model, loss="cross_entropy", ignore_index=-100, seed=0)
    assert str(err.value).startswith(message), err.value


def test_the_class_message_is_torchs_style_without_the_config_key():
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got inf$"):
        LEHI(torch.nn.Linear(3, 2).parameters(), lr=float("inf"))


def test_a_target_that_cannot_be_imported_keeps_its_cause():
    options = {"_target_": "torch.optim.NoSuch", "lr": 1e-3}
    with pytest.raises(ValueError) as err:
        build_optimizer(options, torch.nn.Linear(3, 2), loss="mse", ignore_index=-100, seed=0)
    assert str(err.value) == (
        "optimizer._target_='torch.optim.NoSuch' cannot be imported: "
        "module 'torch.optim' has no attribute 'NoSuch'"
    )
    assert isinstance(err.value.__cause__, AttributeError)
    cfg = compose_config(["model._target_=lehi.models.nope.build"])
    with pytest.raises(ConfigError, match="No module named 'lehi.models.nope'") as err:
        plan(cfg)
    assert isinstance(err.value.__cause__, ModuleNotFoundError)


# ------------------------------------------------------------------ each default once
#: Per group: keys that describe the entry or steer the runner/builder (never a _target_
#: argument), and the arguments the runner supplies itself.
GROUP_KEYS = {
    "dataset": (("_target_", "name", "recipe"), ()),
    "model": (("_target_", "name"), ("input_shape", "num_outputs")),
    "optimizer": (("_target_", *BUILDER_KEYS), ("params", *CURVATURE_INPUTS)),
}
GROUP_FILES = [
    (group, path.stem) for group in GROUP_KEYS for path in sorted((CONF / group).glob("*.yaml"))
]


def plain(value):
    """A config or signature value as YAML holds it (tuples are lists)."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


def signature_defaults(target) -> dict:
    """Every keyword parameter of ``target`` → its default (``inspect.Parameter.empty`` if
    none), following **kwargs to the base class as lehi.config's checks do."""
    defaults: dict = {}
    for fn in signatures(target):
        for p in inspect.signature(fn).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                defaults.setdefault(p.name, p.default)
    return defaults


def default_mismatches(node, target, metadata, supplied, overrides=()) -> list[str]:
    """Where a composed group node and its target's signature disagree on a default.

    Skipped: interpolations (wired from another section, not defaults of this file) and a
    variant's ``overrides`` of its base. For the suite's own targets every signature default
    must also be in the YAML (the YAML holds every default of a run).
    """
    defaults = signature_defaults(target)
    found = []
    for key in node:
        if key in metadata or key in overrides or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        default = defaults.get(key, inspect.Parameter.empty)
        if default is not inspect.Parameter.empty and plain(default) != plain(value):
            found.append(f"{key}: YAML {value!r}, signature {default!r}")
    if target.__module__.startswith("lehi."):
        for key, default in defaults.items():
            if default is not inspect.Parameter.empty and key not in (*supplied, *node):
                found.append(f"{key}: signature default {default!r} missing from the YAML")
    return found


def own_keys_and_base(group: str, name: str) -> tuple[list[str], str | None]:
    raw = OmegaConf.load(CONF / group / f"{name}.yaml")
    bases = [d for d in raw.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return [k for k in raw if k != "defaults"], (bases[0] if bases else None)


@pytest.mark.parametrize(("group", "name"), GROUP_FILES, ids=str)
def test_yaml_defaults_equal_the_signature_defaults(group, name):
    node = compose_config([f"{group}={name}"])[group]
    metadata, supplied = GROUP_KEYS[group]
    own, base = own_keys_and_base(group, name)
    overrides: list[str] = []
    if base is not None:  # a variant: it sets only what differs from its base
        base_node = compose_config([f"{group}={base}"])[group]
        same = [k for k in own if k in base_node and k != "name" and base_node[k] == node[k]]
        assert not same, f"{group}/{name}.yaml repeats its base {base}.yaml: {same}"
        overrides = [k for k in own if k in base_node]
    target = resolve_target(node["_target_"], f"{group}._target_")
    if group == "optimizer":  # the builder's own option
        default = inspect.signature(param_groups).parameters["exclude_from_decay"].default
        assert node["exclude_from_decay"] == default
    assert default_mismatches(node, target, metadata, supplied, overrides) == []


def test_a_changed_default_is_a_mismatch():
    node = OmegaConf.to_container(compose_config(["optimizer=lehibrid"]).optimizer)
    node = OmegaConf.create(node)
    metadata, supplied = GROUP_KEYS["optimizer"]
    node.warmup_length = 5  # LEHI's, inherited by LEHIBrid through **kwargs
    del node["h_floor"]
    assert default_mismatches(node, LEHIBrid, metadata, supplied) == [
        "warmup_length: YAML 5, signature 10",
        "h_floor: signature default 0.0 missing from the YAML",
    ]


#: Committed runs whose configs come from a variant file (lehibrid.yaml, mlp_small.yaml):
#: composing their command line must still give the recorded identity.
COMMITTED = [
    ("experiment=digits", "optimizer=lehibrid", "digits/lehibrid"),
    ("experiment=digits", "optimizer=adam", "digits/adam"),
    ("experiment=mnist_small", "optimizer=lehibrid", "mnist_small/lehibrid"),
    ("experiment=ablation_protein_small", "reading=lehibrid", "ablation_protein_small/lehibrid"),
]


@pytest.mark.parametrize(("experiment", "choice", "where"), COMMITTED, ids=str)
def test_committed_runs_keep_their_identity(experiment, choice, where):
    folders = sorted((REPO / "results" / where).glob("lr=*/seed=*-*"))
    if not folders:
        pytest.skip(f"no committed runs under results/{where}")
    for folder in folders[:3]:
        recorded = RunRecord(folder).read_config()
        lr, seed = recorded["optimizer"]["lr"], recorded["seed"]
        cfg = compose_config([experiment, choice, f"optimizer.lr={lr}", f"seed={seed}"])
        composed = OmegaConf.to_container(cfg, resolve=True)
        assert identity(composed) == identity(recorded)
        assert folder.name == f"seed={seed}-{identity_hash(composed)}"
