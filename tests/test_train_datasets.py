"""One real training run per dataset, on small files in each dataset's real format."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from test_data_fineweb import write_sources
from test_data_images import make_cifar, make_mnist
from test_data_protein import make_rows, write_csv
from test_data_ptb import write_ptb

import lehi.data
from lehi.optim import build_optimizer
from lehi.runner import build_model, run
from lehi.train import Trainer
from lehi.trainer_config import TrainerConfig


def prepare(dataset: str, data_dir) -> list[str]:
    """Write the fixture; return the overrides that make the run tiny."""
    if dataset == "mnist":
        make_mnist(data_dir, n_train=64, n_test=32)
        return ["model.hidden=[16]", "dataset.batch_size=16", "trainer.epochs=2"]
    if dataset == "cifar10":
        make_cifar(data_dir)
        return [
            "model=cnn",
            "model.channels=[4,4,4]",
            "dataset.train_subset=60",
            "dataset.val_subset=20",
            "dataset.batch_size=10",
            "trainer.epochs=2",
        ]
    if dataset == "protein":
        write_csv(data_dir / "casp" / "CASP.csv", make_rows(200), "RMSD,F1,F2,F3,F4,F5,F6,F7,F8,F9")
        return ["dataset.verify_checksums=false", "model.hidden=[16]", "trainer.epochs=2"]
    if dataset == "ptb":
        write_ptb(data_dir / "ptb")
        return [
            "model=lstm_small",
            "model.hidden=16",
            "dataset.verify_checksums=false",
            "dataset.batch_size=4",
            "dataset.bptt=5",
            "dataset.eval_batch_size=2",
            "trainer.epochs=2",
        ]
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(40)]
    files = write_sources(data_dir / "text", docs)
    return [
        "model.size=tiny",
        "model.context_length=16",
        "dataset.tokenizer=bytes",
        f"dataset.text_files=[{files['jsonl']}]",
        "dataset.context=16",
        "dataset.batch_size=4",
        "dataset.steps_per_epoch=6",
        "dataset.val_steps=2",
        "dataset.val_tokens=400",
        "dataset.shard_size=4000",
        "trainer.max_steps=12",
        "trainer.eval_every=6",
        "trainer.warmup_fraction=0.2",
    ]


@pytest.mark.parametrize("optimizer", ["adam", "lehibrid"])
@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "protein", "ptb", "fineweb"])
def test_run_on_real_format_fixture(tmp_path, dataset, optimizer, one_thread):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    overrides = prepare(dataset, data_dir)
    cfg = compose_config(
        [
            f"dataset={dataset}",
            f"optimizer={optimizer}",
            f"paths.data_dir={data_dir}",
            f"paths.results_dir={tmp_path / 'results'}",
            "logger=files",
            *overrides,
        ]
    )
    summary = run(cfg)
    # The fixtures' labels are random: a run may end no better than it started, which the
    # divergence rule records as no_progress. Anything else must have trained to its budget.
    assert summary["status"] in ("completed", "diverged"), summary.get("error")
    assert summary["divergence"] in (None, "no_progress")
    assert summary["steps"] == summary["total_steps"]
    run_dir = next((tmp_path / "results" / dataset / optimizer).glob("lr=*/seed=0-*"))
    assert json.loads((run_dir / "summary.json").read_text())["dataset"] == dataset
    metric = {"mnist": "accuracy", "cifar10": "accuracy", "protein": "rmse"}.get(
        dataset, "perplexity"
    )
    assert summary["metric"] == metric
    assert summary["final"]["val_loss"] is not None
    if dataset in ("ptb", "fineweb"):
        assert summary["tokens_per_s"] > 0
    if optimizer == "lehibrid":
        assert summary["curvature_passes"] == summary["steps"]


def test_every_ptb_evaluation_reads_the_split_from_its_start(tmp_path, one_thread):
    """Two evaluations of the same weights agree: the evaluation state does not carry over."""
    overrides = prepare("ptb", tmp_path)
    cfg = compose_config(["dataset=ptb", f"paths.data_dir={tmp_path}", *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    bundle = lehi.data.build(cfg["dataset"])
    model = build_model(cfg["model"], bundle)
    opt = build_optimizer(cfg["optimizer"], model, loss="cross_entropy", ignore_index=-100, seed=0)
    trainer = Trainer(
        model,
        opt,
        bundle,
        TrainerConfig.from_config(cfg["trainer"]),
        device=torch.device("cpu"),
        seed=0,
        record=None,
    )
    assert trainer.evaluate() == trainer.evaluate()
    assert trainer.evaluate(1) == trainer.evaluate(1) != trainer.evaluate()
