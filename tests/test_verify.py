"""A run is current while HEAD replays it to the same rows (python -m lehi.results verify).

The end-to-end case works in a scratch clone of this repository: a tiny preset is published
there from a clean commit, then a comment in the optimizer (a change that cannot move a
number), an eps default (one that must) and a tampered metrics.csv are each verified, and
``check`` is asked which runs are current.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lehi.record import machine
from lehi.results import verify as V

ROW = {
    "step": 10,
    "epoch": 0.5,
    "split": "train",
    "loss": 0.5,
    "metric": 0.8,
    "lr": 1e-3,
    "wall_time": 1.0,
    "train_time": 1.0,
    "curvature_passes": 10,
}


def rows(*losses: float) -> list[dict]:
    return [{**ROW, "step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]


def test_exact_comparison_sees_the_last_bit_and_names_the_row():
    a = rows(0.5, 0.25)
    b = rows(0.5, math.nextafter(0.25, 1.0))
    diff, worst = V.compare_rows(a, b, exact=True)
    assert diff is not None and diff.startswith("row 2 (step 20 train) loss: recorded 0.25")
    assert 0 < worst < 1e-15
    assert V.compare_rows(a, [dict(r) for r in a], exact=True) == (None, 0.0)


def test_tolerant_comparison_allows_machine_noise_but_not_a_changed_method():
    a = rows(0.5, 0.25)
    noise = rows(0.5, 0.25 * (1 + 5e-7))
    assert V.compare_rows(a, noise, exact=False)[0] is None
    assert V.compare_rows(a, noise, exact=True)[0] is not None
    changed = rows(0.5, 0.25 * (1 + 10 * V.REL_TOLERANCE))
    assert "loss" in V.compare_rows(a, changed, exact=False)[0]
    # Timing columns never count; the schedule's lr and the step are exact in both modes.
    assert V.compare_rows(a, [{**r, "wall_time": 9.0} for r in a], exact=True)[0] is None
    assert "lr" in V.compare_rows(a, [{**r, "lr": 1.0000001e-3} for r in a], exact=False)[0]
    # A non-finite cell only matches a non-finite cell of the same kind.
    assert V.compare_rows(rows(math.nan), rows(math.nan), exact=True)[0] is None
    assert V.compare_rows(rows(math.inf), rows(1e30), exact=False)[0] is not None


def test_prefix_comparison_stops_where_the_replay_stopped():
    recorded = rows(0.5, 0.4, 0.3)
    assert V.compare_rows(recorded, rows(0.5, 0.4), exact=True, prefix=True)[0] is None
    assert "3 rows recorded" in V.compare_rows(recorded, rows(0.5, 0.4), exact=True)[0]


def test_the_sample_covers_each_label_at_its_best_and_highest_lr():
    runs = []
    for label in ("adam", "lehi"):
        for lr, loss in ((1e-3, 0.3), (1e-2, 0.2), (1e-1, math.nan)):
            for seed in (0, 1):
                status = "diverged" if math.isnan(loss) else "completed"
                run = f"x/{label}/lr={lr:g}/seed={seed}"
                runs.append(
                    {"run": run, "label": label, "status": status, "lr": lr, "seed": seed}
                    | {"val_loss": loss + seed / 100}
                )
    plan = V.plan_replays(runs, prefix_every=2)
    full = {(r.label, r.run) for r in plan if r.mode == "full"}
    assert full == {
        (label, f"x/{label}/lr={lr:g}/seed=0") for label in ("adam", "lehi") for lr in (0.01, 0.1)
    }
    prefix = [r.run for r in plan if r.mode == "prefix"]
    rest = sorted(r["run"] for r in runs if (r["label"], r["run"]) not in full)
    assert prefix == rest[::2]


def test_replay_capability_needs_the_recorded_kernels_within_reach():
    here = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "torch": "2.14.1", "gpu": None}
    assert V.replay_capability(here, here) == "AVX512"
    assert V.replay_capability({**here, "cpu_capability": "AVX2"}, here) == "AVX2"  # pinned down
    assert V.replay_capability({**here, "cpu_capability": "DEFAULT"}, here) == "DEFAULT"
    assert V.replay_capability(here, {**here, "cpu_capability": "AVX2"}) is None  # never up
    assert V.replay_capability({"device_name": "x86_64"}, here) is None  # older env.json
    assert V.replay_capability({**here, "torch": "0.0"}, here) is None
    assert V.replay_capability({**here, "cpu": "Intel Xeon"}, here) is None
    assert V.replay_capability({**here, "gpu": "NVIDIA H100"}, here) is None
    assert V.replay_capability({**here, "cpu_capability": "VSX"}, here) is None


def _worker_kernels() -> tuple[str, str | None]:
    import torch

    return torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR")


@pytest.mark.skipif(
    machine()["cpu_capability"] not in V.CAPABILITY_LEVELS[1:],
    reason="needs a CPU with vectorised kernels above torch's baseline",
)
def test_replay_workers_start_under_the_kernels_they_are_given_and_the_parent_keeps_its_own():
    before = {name: os.environ.get(name) for name in V.ROUNDING_ENV}
    with V._spawn_pool(1, V.ROUNDING_ENV) as pool:
        assert pool.apply(_worker_kernels) == ("DEFAULT", "COMPATIBLE")
    with V._spawn_pool(1, {}) as pool:
        assert pool.apply(_worker_kernels) == (machine()["cpu_capability"], before["MKL_CBWR"])
    assert {name: os.environ.get(name) for name in V.ROUNDING_ENV} == before


@pytest.mark.skipif(
    machine()["cpu_capability"] not in V.CAPABILITY_LEVELS[1:],
    reason="needs a CPU with vectorised kernels above torch's baseline",
)
def test_a_run_made_under_lower_cpu_kernels_replays_exactly_when_pinned_to_them(tmp_path: Path):
    # Made as on a CPU without AVX2: torch's baseline kernels, recorded in env.json; and, as
    # in a sweep worker, on the one thread its process allowed while its config left the
    # count to torch.
    results = tmp_path / "results"
    command = [
        sys.executable,
        "run.py",
        "experiment.name=pinned",
        "model=mlp_small",
        "trainer.epochs=2",
        "trainer.threads=null",
        "logger=files",
        f"paths.results_dir={results}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        V.CAPABILITY_VARIABLE: "default",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = next(results.rglob("summary.json")).parent
    recorded = json.loads((folder / "env.json").read_text())
    assert recorded["cpu_capability"] == "DEFAULT" and recorded["num_threads"] == 1
    run = str(folder.relative_to(results))
    config, changed = V._replay_config(folder, "pinned", "data", str(tmp_path / "x"), "full")
    assert changed is None and config["trainer"]["threads"] == 1  # the count the run used

    replays = [V.Replay(run, "adam", "full")]
    verification, _ = V.replay_all(
        "pinned", replays, {run: str(folder)}, machine(), "data", 1, tmp_path / "pinned"
    )
    assert verification.comparison == "exact" and verification.capabilities == ["DEFAULT"]
    assert verification.identical and verification.result == "identical", verification.outcomes
    assert "identical (exact: replayed under the recorded CPU kernels, DEFAULT)" in (
        verification.line()
    )
    # The control: under this machine's own kernels the same run parts in its last bits, so
    # the pin is what makes the exact comparison possible.
    native = V.replay(
        folder,
        run=run,
        label="adam",
        mode="full",
        experiment="pinned",
        data_dir="data",
        scratch=str(tmp_path / "native"),
        exact=True,
    )
    assert native.row_difference and 0 < native.max_rel_diff < 1e-4, native


def test_a_no_progress_summary_of_the_old_trainer_ran_to_its_budget():
    old = {"status": "diverged", "divergence": "no_progress"}
    assert V.trainer_status(old) == "completed"
    assert V.trainer_status({"status": "diverged", "divergence": "non_finite"}) == "diverged"


# ------------------------------------------------------------------------ scratch clone
TINY = """# @package _global_
# A two-epoch digits sweep for tests/test_verify.py.
defaults:
  - override /dataset: digits
  - override /model: mlp_small
experiment:
  name: tiny
  scale: small
trainer:
  threads: 1
  epochs: 2
hydra:
  sweeper:
    params:
      optimizer: adam,lehi
      optimizer.lr: 1e-3,1e-1
      seed: 0
"""


def sh(clone: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PYTHONPATH": str(clone),
    }
    proc = subprocess.run(args, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def results_cli(clone: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(clone, sys.executable, "-m", "lehi.results", *args, check=False)


def commit(clone: Path, message: str) -> None:
    sh(clone, "git", "add", "-A")
    sh(clone, "git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and this repository's history")
    clone = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True, timeout=120
    )
    # The checkout under test (possibly uncommitted) is the clone's starting code.
    for part in ("lehi", "conf", "experiments", "run.py", "plots"):
        src, dst = REPO / part, clone / part
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, symlinks=True) if src.is_dir() else shutil.copy(src, dst)
    shutil.rmtree(clone / "results", ignore_errors=True)
    (clone / "experiments" / "tiny.yaml").write_text(TINY)
    commit(clone, "tiny preset")
    sh(
        clone,
        sys.executable,
        "run.py",
        "-m",
        "experiment=tiny",
        "paths.results_dir=results",
        "logger=files",
        "hydra.sweep.dir=multirun",
    )
    commit(clone, "tiny results")
    return clone


def summaries(clone: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(clone / "results")): json.loads(p.read_text())
        for p in (clone / "results").rglob("summary.json")
    }


def test_scratch_clone_comment_passes_eps_change_fails_and_tampering_is_named(clone: Path):
    assert len(summaries(clone)) == 4
    assert results_cli(clone, "check").returncode == 0

    # A comment in the optimizer: training code changed, numbers did not.
    lehi_py = clone / "lehi" / "optim" / "lehi.py"
    lehi_py.write_text(lehi_py.read_text() + "\n# a comment that changes no number\n")
    commit(clone, "a comment")
    assert results_cli(clone, "check").returncode == 1  # stale until verified
    out = results_cli(clone, "verify", "tiny")
    assert out.returncode == 0, out.stdout + out.stderr
    found = re.search(r"tiny: verified: (\d) full, (\d) prefix, identical \(exact", out.stdout)
    assert found and int(found[1]) >= 2 and int(found[1]) + int(found[2]) == 4, out.stdout
    check = results_cli(clone, "check")
    assert check.returncode == 0 and "all current at HEAD" in check.stdout, check.stdout
    verified = json.loads((clone / "results" / "tiny" / "verified.json").read_text())
    assert verified["result"] == "identical" and verified["training_code_dirty"] is False
    assert verified["labels"] == {"adam": True, "lehi": True}

    # Another experiment's preset is not tiny's training code: tiny's runs stay current.
    other = (clone / "experiments" / "tiny.yaml").read_text().replace("name: tiny", "name: other")
    (clone / "experiments" / "other.yaml").write_text(other.replace("epochs: 2", "epochs: 3"))
    commit(clone, "another experiment")
    check = results_cli(clone, "check")
    assert check.returncode == 0 and "all current at HEAD" in check.stdout, check.stdout
    # ... while a change to tiny's own preset expires its runs (the one carried forward is
    # tiny's verification at the training code before it).
    preset = clone / "experiments" / "tiny.yaml"
    preset.write_text(preset.read_text() + "# a comment in tiny's own preset\n")
    commit(clone, "tiny's preset touched")
    check = results_cli(clone, "check")
    assert check.returncode == 1 and check.stdout.count("other training code than HEAD's") == 4
    assert results_cli(clone, "verify", "tiny").returncode == 0

    # LEHI's eps default: HEAD now composes another config for the LEHI runs.
    conf = clone / "conf" / "optimizer" / "lehi.yaml"
    conf.write_text(conf.read_text().replace("eps: 1.0e-8", "eps: 1.0e-6"))
    commit(clone, "another eps")
    out = results_cli(clone, "verify", "tiny")
    assert out.returncode == 1
    line = next(x for x in out.stdout.splitlines() if x.startswith("tiny: FAILED"))
    assert "tiny/lehi/lr=0.001/seed=0-" in line
    assert "optimizer.eps: recorded 1e-08, HEAD 1e-06" in line and "row " in line, line
    listed = results_cli(clone, "check").stdout.splitlines()
    stale = [x for x in listed if "training code changed" in x]
    assert len(stale) == 2 and all("/tiny/lehi/" in x for x in stale), listed
    assert all("verification failed for lehi" in x for x in stale)


def tamper_adam_loss(source: Path, root: Path) -> tuple[Path, str]:
    """Copy ``source`` (results) to ``root`` and raise one Adam run's 4th loss by 0.1 %:
    its metrics.csv and the file's original text."""
    shutil.copytree(source, root)
    metrics = next((root / "tiny" / "adam").glob("lr=0.001/seed=0-*/metrics.csv"))
    original = metrics.read_text()
    table = list(csv.DictReader(metrics.open()))
    table[3]["loss"] = repr(float(table[3]["loss"]) * 1.001)
    with metrics.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    return metrics, original


def test_a_tampered_loss_fails_naming_the_run(clone: Path, tmp_path: Path):
    tampered = tmp_path / "results"
    metrics, _ = tamper_adam_loss(clone / "results", tampered)
    out = results_cli(clone, "verify", "tiny", "--root", str(tampered), "--no-write")
    assert out.returncode == 1
    assert f"tiny/adam/lr=0.001/{metrics.parent.name}: row 4" in out.stdout, out.stdout


def test_labels_reverify_one_label_and_keep_the_others_replays(clone: Path, tmp_path: Path):
    root = tmp_path / "results"
    metrics, original = tamper_adam_loss(clone / "results", root)
    assert results_cli(clone, "verify", "tiny", "--root", str(root)).returncode == 1
    verified = root / "tiny" / "verified.json"
    before = json.loads(verified.read_text())
    assert before["labels"]["adam"] is False

    metrics.write_text(original)  # the run made again as it was
    out = results_cli(clone, "verify", "tiny", "--root", str(root), "--labels", "adam")
    after = json.loads(verified.read_text())
    assert after["labels"]["adam"] is True, out.stdout + out.stderr
    # lehi's replays are the earlier ones, kept as they were, whatever they said
    assert after["labels"]["lehi"] == before["labels"]["lehi"]
    kept = [o for o in after["replays"] if o["label"] == "lehi"]
    assert kept == [o for o in before["replays"] if o["label"] == "lehi"] and kept
    assert len(after["replays"]) == len(before["replays"])
    assert after["seconds"] > before["seconds"]
    assert out.returncode == (0 if after["labels"]["lehi"] else 1)

    unknown = results_cli(clone, "verify", "tiny", "--root", str(root), "--labels", "sophia")
    assert (
        unknown.returncode == 2 and "no runs labelled sophia; labels: adam, lehi" in unknown.stderr
    )
    verified.write_text(json.dumps({**after, "training_code": "0" * 16}))
    other = results_cli(clone, "verify", "tiny", "--root", str(root), "--labels", "adam")
    assert other.returncode == 2 and "another training code" in other.stderr, other.stderr


def test_a_changed_summary_rule_leaves_rows_equal_and_lists_every_stale_summary(clone: Path):
    """A last-1 window instead of last-3 in lehi/summary.py: every replay is identical, yet
    each summary.json whose window held more than one evaluation now says something HEAD would
    not write;
    verify fails naming them and check lists each of them (the replays alone would have
    carried them all forward)."""
    conf = clone / "conf" / "optimizer" / "lehi.yaml"
    conf.write_text(conf.read_text().replace("eps: 1.0e-6", "eps: 1.0e-8"))  # as published
    rule = clone / "lehi" / "summary.py"
    rule.write_text(rule.read_text().replace("LAST_WINDOW = 3", "LAST_WINDOW = 1"))
    commit(clone, "a last-1 window")
    out = results_cli(clone, "verify", "tiny")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "identical (exact" in out.stdout
    windowed = {run for run, s in summaries(clone).items() if s["last3"]["n"] > 1}
    n = len(windowed)
    assert n >= 2, windowed
    assert f"{n} summary.json(s) not what HEAD derives from their rows" in out.stdout, out.stdout
    verified = json.loads((clone / "results" / "tiny" / "verified.json").read_text())
    assert verified["labels"] == {"adam": True, "lehi": True}
    differences = verified["stale_summaries"]
    assert set(differences) == windowed
    assert all(d.startswith("last3.") and "HEAD" in d for d in differences.values()), differences
    check = results_cli(clone, "check")
    assert check.returncode == 1 and check.stdout.count("summary.json is not what HEAD") == n
    assert f"{n} of 4 run(s)" in check.stdout and f"({n} stale summary)" in check.stdout
