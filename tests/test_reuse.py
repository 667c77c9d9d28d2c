"""experiment.reuse_from: a run adopts another experiment's finished run only when that run
computed exactly the same thing, and the adopted record says where it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from lehi.record import RunRecord, identity_hash
from lehi.record import run_dir as record_dir
from lehi.runner import run

TIMING = ("wall_time", "train_time")


def overrides(results: Path, experiment: str, *extra: str) -> list[str]:
    return [
        f"paths.results_dir={results}",
        "logger=files",
        "optimizer=lehi",
        "optimizer.lr=3e-3",
        "trainer.epochs=null",
        "trainer.max_steps=12",
        "trainer.evaluations=3",
        f"experiment.name={experiment}",
        *extra,
    ]


def config(results: Path, experiment: str, *extra: str) -> dict:
    return OmegaConf.to_container(
        compose_config(overrides(results, experiment, *extra)), resolve=True
    )


def train_source(results: Path, *extra: str, clean: bool = True) -> RunRecord:
    """A finished run of experiment "main", recorded as made from a clean (or dirty) tree."""
    cfg = config(results, "main", *extra)
    run(cfg)
    source = RunRecord(record_dir(results, cfg))
    env = source.read_env()
    source.write_env({**env, "git_dirty": not clean})
    return source


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_an_identical_run_is_adopted_and_says_where_it_came_from(tmp_path, one_thread):
    results = tmp_path / "results"
    source = train_source(results)
    cfg = config(results, "ablation", "experiment.reuse_from=[main]")
    summary = run(cfg)
    adopted = RunRecord(record_dir(results, cfg))
    assert summary["reused_from"] == str(source.dir.relative_to(results))
    assert summary["experiment"] == "ablation" and summary["identity"] == identity_hash(cfg)
    assert adopted.metrics.read_bytes() == source.metrics.read_bytes()
    assert adopted.read_env() == source.read_env()  # where and from which commit the numbers came
    assert adopted.read_config() == json.loads(json.dumps(cfg))
    assert not adopted.checkpoint.exists() and json.loads(adopted.summary.read_text()) == summary
    # Honest: training the ablation's config itself gives the adopted rows.
    fresh = tmp_path / "fresh"
    run(config(fresh, "ablation"))
    (trained,) = [r for r in fresh.rglob("summary.json")]
    assert untimed(RunRecord(trained.parent).read_metrics()) == untimed(adopted.read_metrics())
    # A second call is an ordinary skip of the finished run.
    assert run(cfg) == summary


@pytest.mark.parametrize(
    ("extra", "clean"),
    [(("optimizer.eps=1e-6",), True), ((), False)],
    ids=["another_computation", "dirty_source"],
)
def test_a_run_that_computed_something_else_or_came_from_a_dirty_tree_is_not_adopted(
    tmp_path, one_thread, extra, clean
):
    results = tmp_path / "results"
    train_source(results, *extra, clean=clean)
    summary = run(config(results, "ablation", "experiment.reuse_from=[main]"))
    assert "reused_from" not in summary and summary["status"] == "completed"


@pytest.mark.parametrize(
    "main", ["ptb_small", "mnist", "protein", "cifar10_small", "fineweb_small"]
)
@pytest.mark.parametrize("reading", ["adam", "lehi", "lehibrid"])
def test_an_ablations_reference_readings_compute_its_main_sweeps_runs(reading, main):
    from lehi.reuse import computation

    def composed(*extra: str) -> dict:
        return OmegaConf.to_container(compose_config([*extra, "optimizer.lr=1e-3"]), resolve=True)

    ablation = composed(f"experiment=ablation_{main}", f"reading={reading}")
    same = composed(f"experiment={main}", f"optimizer={reading}")
    assert ablation["experiment"]["reuse_from"] == [main]
    assert computation(ablation) == computation(same)
    clipped = composed(f"experiment=ablation_{main}", "reading=lehi_update_clip")
    assert computation(clipped) != computation(same)


def test_an_adopted_run_is_current_while_the_run_it_adopted_is(tmp_path, one_thread):
    """``check``: both runs carry the first commit's env (training code long changed); a
    passing verification of the source's experiment makes the source current, and with it the
    adopted run, which has none of its own, until its rows stop being the source's."""
    from lehi import record
    from lehi.results import provenance

    if record.git("rev-parse", "HEAD") is None:
        pytest.skip("not a git checkout")
    first = record.git("rev-list", "--max-parents=0", "HEAD").split()[0]
    results = tmp_path / "results"
    source = train_source(results)
    source.write_env({**source.read_env(), "git_commit": first})
    cfg = config(results, "ablation", "experiment.reuse_from=[main]")
    adopted = RunRecord(record_dir(results, cfg))
    assert run(cfg)["reused_from"]

    def listed() -> list[str]:
        provenance.code_state.cache_clear()
        findings, n_runs = provenance.check(results)
        assert n_runs == 2
        return sorted(f.run.split("/")[0] for f in findings)

    assert listed() == ["ablation", "main"]  # no verification anywhere
    verified = {
        "training_code": record.training_code_digest(experiment="main"),
        "training_code_dirty": False,
        "labels": {"lehi": True},
    }
    (results / "main" / "verified.json").write_text(json.dumps(verified))
    provenance._head_training_code.cache_clear()
    assert listed() == []
    rows = adopted.read_metrics()
    rows[-1]["loss"] += 1e-9
    adopted.write_metrics(rows)
    assert listed() == ["ablation"]
