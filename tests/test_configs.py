"""Every config composes: each dataset × optimizer, and each experiment preset."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, compose_config
from omegaconf import OmegaConf

from lehi.config import ConfigError
from lehi.optim import LEHI, build_optimizer
from lehi.record import identity_hash, run_dir
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
    assert OPTIMIZERS == ["adam", "adamw", "lehi", "lehibrid", "sophia"]
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


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_with_its_sweep(experiment):
    with_hydra = _compose_with_hydra([f"experiment={experiment}"])
    cfg = OmegaConf.to_container(with_hydra, resolve=False)
    assert cfg["experiment"]["name"] == experiment
    assert cfg["experiment"]["scale"] == ("small" if experiment.endswith("small") else "full")
    params = with_hydra.hydra.sweeper.params
    # every optimizer of conf/optimizer/, or for an ablation every reading of conf/reading/
    axis = "reading" if experiment.startswith("ablation_") else "optimizer"
    assert params[axis] == "glob(*)"
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
