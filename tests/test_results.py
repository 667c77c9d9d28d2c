"""lehi.results on a small hand-made results tree written in the trainer's on-disk format.

Every run's validation losses are ``base + OFFSETS`` at EVAL_STEPS, so its final validation
loss (mean of the last 3 evaluations) is exactly ``base``; the expected tables below are
worked out by hand from the bases, the offsets and the step times.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.results import (
    EVAL_STEPS,
    OFFSETS,
    write_run,
)
from scipy import stats

from lehi import record, roster
from lehi import results as R
from lehi.results import provenance, stepcost
from lehi.results.significance import SIGNIFICANCE_COLUMNS

# (optimizer, lr) -> bases per seed; None = that seed diverged
GRID = {
    ("adam", 1e-3): [0.50, 0.52, 0.54],
    ("adam", 1e-2): [0.45, 0.47, 0.49],
    ("lehi", 1e-3): [0.40, 0.41, 0.45],
    ("lehi", 1e-2): [0.30, 0.31, None],  # best mean of its seeds, but one seed diverged
    ("lehibrid", 1e-3): [0.44, 0.46, 0.50],
    ("sophia", 1e-3): [0.60],  # a single seed (a second one failed, below)
}


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for (opt, lr), bases in GRID.items():
        for seed, base in enumerate(bases):
            write_run(root, opt, lr, seed, base)
    write_run(root, "sophia", 1e-3, 1, None, status="failed")
    write_run(root, "lehi", 1e-1, 0, 0.2, summary=False)  # still running: no summary.json
    broken = write_run(root, "adamw", 1e-3, 0, 0.3)
    (broken / "summary.json").write_text('{"status": "completed", "lr": ')
    # lehibrid seed 2 lost its train_time column: no curve, but its summary still counts
    csv = root / "toy" / "lehibrid" / "lr=0.001" / "seed=2" / "metrics.csv"
    frame = pd.read_csv(csv).drop(columns="train_time")
    frame.to_csv(csv, index=False)
    return root


def write_step_cost(root: Path, ms: dict[str, list[float]]) -> Path:
    """A step_cost.json as benchmarks/step_cost.py writes it, with given per-repeat ms/step."""
    return stepcost.write(
        stepcost.path_for(root, "toy"),
        {
            "format": stepcost.FORMAT,
            "experiment": "toy",
            "method": stepcost.METHOD,
            "device": "cpu",
            "threads": 1,
            "torch": "2.x",
            "git_commit": "abcdef0123",
            "optimizers": {
                k: {"name": k, "ms_per_step": v, "curvature_passes_per_step": 0.0}
                for k, v in ms.items()
            },
        },
    )


def first_reach(base: float, target: float) -> int:
    """Hand rule: the first evaluation whose loss base + offset is ≤ target."""
    return next(s for s, o in zip(EVAL_STEPS, OFFSETS, strict=True) if base + o <= target)


def test_load_runs_and_metrics(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lehi.results"):
        runs = R.load_runs(tree)
        metrics = R.load_metrics(tree, runs)
    n_expected = sum(len(b) for b in GRID.values()) + 1  # + the failed sophia run
    assert len(runs) == n_expected
    assert "adamw" not in set(runs["optimizer"])  # malformed summary skipped
    assert 0.1 not in set(runs["lr"])  # in-progress folder ignored
    messages = [r.getMessage() for r in caplog.records]
    assert any("adamw/lr=0.001/seed=0/summary.json" in m for m in messages)
    assert any("lehibrid/lr=0.001/seed=2/metrics.csv" in m and "train_time" in m for m in messages)
    assert all("\n" not in m for m in messages)
    lehi = runs[(runs["optimizer"] == "lehi") & (runs["lr"] == 1e-2)].set_index("seed")
    assert lehi["diverged"].tolist() == [False, False, True]
    assert lehi.loc[0, "val_loss"] == pytest.approx(0.30)
    assert math.isnan(lehi.loc[2, "val_loss"])
    assert set(runs["scale"]) == {"small"}
    # metrics: run keys in front, the schedule's LR renamed, every readable file loaded
    assert list(metrics.columns[:7]) == [*R.RUN_KEYS, "run"]
    assert "step_lr" in metrics.columns
    assert metrics["run"].nunique() == n_expected - 1  # lehibrid seed 2's file is malformed
    one = metrics[
        (metrics["optimizer"] == "adam")
        & (metrics["lr"] == 1e-2)
        & (metrics["seed"] == 1)
        & (metrics["split"] == "val")
    ]
    np.testing.assert_allclose(one["loss"], [0.47 + o for o in OFFSETS])


def test_cells_best_lr_and_divergence(tree: Path) -> None:
    res = R.collect(tree)
    cells = res.cells.set_index(["optimizer", "lr"])
    for (opt, lr), bases in GRID.items():
        vals = [b for b in bases if b is not None]
        row = cells.loc[(opt, lr)]
        assert row["val_loss_mean"] == pytest.approx(sum(vals) / len(vals))
        assert row["metric_mean"] == pytest.approx(1 - (sum(vals) / len(vals) - 0.05))
        if len(vals) > 1:
            sd = math.sqrt(sum((v - sum(vals) / len(vals)) ** 2 for v in vals) / (len(vals) - 1))
            assert row["val_loss_std"] == pytest.approx(sd)
            assert row["val_loss_spread"] == pytest.approx(2 * sd)
    # one seed: the spread is twice the run's own std over its last 3 evaluations (0.05)
    assert cells.loc[("sophia", 1e-3), "val_loss_spread"] == pytest.approx(2 * 0.05)
    assert cells.loc[("sophia", 1e-3), "n_failed"] == 1
    assert cells.loc[("sophia", 1e-3), "n_seeds"] == 1
    assert cells.loc[("lehi", 1e-2), "n_diverged"] == 1
    assert not cells.loc[("lehi", 1e-2), "eligible"]

    best = res.best.set_index("optimizer")
    assert best.loc["adam", "lr"] == 1e-2  # 0.47 < 0.52
    assert best.loc["lehi", "lr"] == 1e-3  # 1e-2 has the lower mean but a diverged seed
    assert best.loc["lehi", "val_loss_mean"] == pytest.approx(0.42)
    assert best.loc["lehi", "n_diverged_total"] == 1
    assert best.loc["lehi", "n_runs_total"] == 6
    assert best.loc["sophia", "n_failed_total"] == 1


def test_time_to_target(tree: Path) -> None:
    res = R.collect(tree)
    target = 0.47 * 1.05  # best Adam mean final val loss × 1.05
    assert res.targets["target"].iloc[0] == pytest.approx(target)
    best = res.best.set_index("optimizer")
    reached = {}
    for opt, lr, seeds in (
        ("adam", 1e-2, (0, 1, 2)),
        ("lehi", 1e-3, (0, 1, 2)),
        ("lehibrid", 1e-3, (0, 1)),
    ):  # lehibrid seed 2 has no curve
        bases = GRID[(opt, lr)]
        reached[opt] = [first_reach(bases[s], target) for s in seeds]
        assert best.loc[opt, "n_reached"] == len(seeds)
        assert best.loc[opt, "steps_to_target_mean"] == pytest.approx(np.mean(reached[opt]))
        assert best.loc[opt, "steps_to_target_std"] == pytest.approx(np.std(reached[opt], ddof=1))
        # no step_cost.json: the runs' own (load-dependent) times are never reported
        assert math.isnan(best.loc[opt, "time_to_target_mean"])
    assert best.loc["lehi", "steps_to_target_mean"] == pytest.approx((30 + 30 + 40) / 3)
    assert best.loc["sophia", "n_reached"] == 0  # 0.60 never gets to 0.4935
    assert math.isnan(best.loc["sophia", "steps_to_target_mean"])
    run = res.runs[
        (res.runs["optimizer"] == "adam") & (res.runs["lr"] == 1e-2) & (res.runs["seed"] == 2)
    ].iloc[0]
    assert run["steps_to_target"] == 40  # 0.49 + 0.0 ≤ 0.4935, 0.49 + 0.05 is not
    assert "time_to_target" not in res.runs.columns


def test_time_to_target_uses_side_by_side_step_cost(tree: Path) -> None:
    ms = {"adam": [10.0, 11.0, 12.0], "lehi": [16.0, 15.0, 18.0], "sophia": [9.0, 12.0, 12.0]}
    write_step_cost(tree, ms)
    res = R.collect(tree)
    assert res.measured_on("toy") == "cpu, 1 thread, torch 2.x, commit abcdef0"
    best = res.best.set_index("optimizer")
    target = 0.47 * 1.05
    lehi_steps = [first_reach(b, target) for b in GRID[("lehi", 1e-3)]]
    assert best.loc["lehi", "ms_per_step"] == 16.0  # median over repeats
    assert best.loc["lehi", "ms_per_step_q1"] == 15.5
    # overhead: median of the per-repeat ratios 1.6, 15/11, 1.5 (not a ratio of medians)
    assert best.loc["lehi", "overhead_pct"] == pytest.approx(50.0)
    assert best.loc["sophia", "overhead_pct"] == pytest.approx(100 * (12 / 12 - 1))
    assert best.loc["lehi", "time_to_target_mean"] == pytest.approx(np.mean(lehi_steps) * 0.016)
    assert best.loc["lehi", "time_to_target_std"] == pytest.approx(
        np.std(lehi_steps, ddof=1) * 0.016
    )
    assert math.isnan(best.loc["lehibrid", "time_to_target_mean"])  # not measured
    md = R.render_markdown(res)
    assert "time to target (s; steps × step cost measured side by side, cpu, 1 thread" in md
    lehi_row = next(line for line in md.splitlines() if line.startswith("| LEHI |"))
    assert f"| {np.mean(lehi_steps) * 0.016:.3g} ± " in lehi_row
    (tree / "toy" / "step_cost.json").write_text('{"format": "lehi.step_cost/1"}')
    with pytest.raises(ValueError, match="step_cost.json: 'optimizers'"):
        R.collect(tree)


def test_targets_override_and_bad_input(tree: Path) -> None:
    res = R.collect(tree, targets={"toy": 0.56})
    best = res.best.set_index("optimizer")
    assert res.targets["target_rule"].iloc[0] == "set explicitly"
    assert best.loc["sophia", "steps_to_target_mean"] == first_reach(0.60, 0.56) == 50
    with pytest.raises(ValueError, match="unknown experiment 'nope'.*toy"):
        R.collect(tree, targets={"nope": 1.0})
    with pytest.raises(ValueError, match="--target"):
        R.parse_target("toy:0.5")


def test_significance_matches_scipy(tree: Path) -> None:
    sig = R.collect(tree).significance.set_index(["optimizer", "baseline"])
    assert set(sig.index) == {
        ("lehi", "adam"),
        ("lehi", "sophia"),
        ("lehibrid", "adam"),
        ("lehibrid", "sophia"),
    }  # adamw's only run was malformed
    x, y = GRID[("lehi", 1e-3)], GRID[("adam", 1e-2)]
    row = sig.loc[("lehi", "adam")]
    assert row["welch_p"] == pytest.approx(stats.ttest_ind(x, y, equal_var=False).pvalue)
    assert row["mwu_p"] == pytest.approx(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)
    assert row["mean_diff"] == pytest.approx(np.mean(x) - np.mean(y))
    pooled = math.sqrt((2 * np.var(x, ddof=1) + 2 * np.var(y, ddof=1)) / 4)
    d = (np.mean(x) - np.mean(y)) / pooled
    assert row["cohen_d"] == pytest.approx(d)
    assert row["hedges_g"] == pytest.approx(d * (1 - 3 / (4 * 6 - 9)))
    one_seed = sig.loc[("lehi", "sophia")]  # Sophia has one usable seed
    assert one_seed["n_baseline"] == 1
    assert math.isnan(one_seed["welch_p"]) and math.isnan(one_seed["mwu_p"])
    assert one_seed["mean_diff"] == pytest.approx(0.42 - 0.60)


def test_compare_small_samples() -> None:
    out = R.compare([0.5], [0.4, 0.6])
    assert math.isnan(out["welch_p"]) and math.isnan(out["hedges_g"])
    same = R.compare([0.5, 0.5], [0.5, 0.5])  # zero variance: undefined, not a crash
    assert math.isnan(same["cohen_d"]) and same["mean_diff"] == 0


def welch_t_by_hand(x: list[float], y: list[float]) -> float:
    return (np.mean(x) - np.mean(y)) / math.sqrt(
        np.var(x, ddof=1) / len(x) + np.var(y, ddof=1) / len(y)
    )


def mann_whitney_u_by_hand(x: list[float], y: list[float]) -> float:
    """U of ``x``: the pairs (x_i, y_j) with x_i > y_j, ties counting one half."""
    return sum((a > b) + 0.5 * (a == b) for a in x for b in y)


@pytest.mark.parametrize(
    ("x", "y"),
    [([0.9, 1.3], [0.2, 0.5]), ([0.9, 1.3, 0.4], [0.2, 0.5]), ([0.2, 0.5], [0.9, 0.4, 1.3])],
)
def test_compare_gives_textbook_statistics_from_two_values_a_side(x, y) -> None:
    # two values a side is the smallest sample the tests are defined on, either side
    out = R.compare(x, y)
    assert (out["n"], out["n_baseline"]) == (len(x), len(y))
    assert out["welch_t"] == pytest.approx(welch_t_by_hand(x, y))
    assert out["mwu_u"] == mann_whitney_u_by_hand(x, y)
    assert 0 < out["welch_p"] <= 1 and 0 < out["mwu_p"] <= 1
    if (len(x), len(y)) == (2, 2):  # U = 4 of 4 pairs: the exact two-sided p is 2 / C(4, 2)
        assert out["mwu_p"] == pytest.approx(1 / 3)


def test_compare_with_an_empty_sample_is_all_nan_and_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mean of an empty array behind the NaN
        out = R.compare([], [0.4, 0.6])
    assert (out["n"], out["n_baseline"]) == (0, 2)
    assert all(math.isnan(v) for k, v in out.items() if k not in ("n", "n_baseline"))
    assert set(out) == set(SIGNIFICANCE_COLUMNS[7:])


def test_write_summary(tree: Path) -> None:
    paths = R.write_summary(tree)
    assert [p.name for p in paths] == ["summary.csv", "significance.csv", "summary.md"]
    table = pd.read_csv(tree / "summary.csv")
    assert table.set_index("optimizer").loc["adam", "lr"] == 1e-2
    md = (tree / "summary.md").read_text()
    assert "## toy — scale: small (CPU variant)" in md
    lehi = GRID[("lehi", 1e-3)]
    assert f"| LEHI | 0.001 | {np.mean(lehi):.4g} ± {np.std(lehi, ddof=1):.2g} |" in md
    lehi_row = next(line for line in md.splitlines() if line.startswith("| LEHI |"))
    assert lehi_row.endswith("| 1/6 |")  # diverged / runs over its grid
    assert "(3/3)" in lehi_row
    assert "| Sophia | 0.001 |" in md and "(1 failed)" in md
    assert f"{0.47 * 1.05:.4g} (best Adam final val loss × 1.05)" in md
    p = stats.ttest_ind(lehi, GRID[("adam", 1e-2)], equal_var=False).pvalue
    assert "| LEHI vs Adam | 0.001 / 0.01 | 3 / 3 |" in md
    assert f"| {p:.3g} |" in md
    assert not list(tree.glob("**/*.tmp"))


def test_cli(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert R.main(["--root", str(tree), "--target", "toy=0.5"]) == 0
    assert "0.5 (set explicitly)" in (tree / "summary.md").read_text()
    assert R.main(["--root", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("no results under") and "make sweep EXP=digits" in err
    assert "\n" not in err


def relabel(run: Path, label: str, name: str) -> None:
    """Make a written run one trained with optimizer.name=name optimizer.label=label."""
    cfg = run / "config.yaml"
    text = cfg.read_text().replace(f"optimizer:\n  name: {label}\n", "optimizer:\n")
    cfg.write_text(text.replace("optimizer:\n", f"optimizer:\n  name: {name}\n  label: {label}\n"))
    data = json.loads((run / "summary.json").read_text())
    data.update(optimizer=label, optimizer_name=name, identity="0123abcd")
    (run / "summary.json").write_text(json.dumps(data))


def test_relabelled_runs_aggregate_under_their_label(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # two relabelled variants: LEHIBrid tuned differently, and an optimizer the roster lacks
    for seed, base in enumerate((0.43, 0.44, 0.45)):
        relabel(write_run(tree, "hyb_sum", 1e-3, seed, base), "hyb_sum", "lehibrid")
        relabel(write_run(tree, "mystery", 1e-3, seed, base + 0.1), "mystery", "mystery")
    with caplog.at_level(logging.WARNING, logger="lehi.results"):
        res = R.collect(tree)
    relabel_warnings = [r for r in caplog.records if "hyb_sum" in r.getMessage()]
    assert relabel_warnings == []
    best = res.best.set_index("optimizer")
    assert best.loc["hyb_sum", "optimizer_name"] == "lehibrid"
    assert best.loc["hyb_sum", "val_loss_mean"] == pytest.approx(0.44)
    # roster order: Adam, Sophia, LEHI, LEHIBrid, its relabelled variant, then unknown names
    assert list(res.best["optimizer"]) == [
        "adam",
        "sophia",
        "lehi",
        "lehibrid",
        "hyb_sum",
        "mystery",
    ]
    pairs = set(map(tuple, res.significance[["optimizer", "baseline"]].to_numpy()))
    assert {("hyb_sum", "adam"), ("hyb_sum", "sophia"), ("mystery", "adam")} <= pairs
    assert not any(b in ("hyb_sum", "mystery") for _, b in pairs)  # candidates, not baselines
    md = R.render_markdown(res)
    assert "| hyb_sum | 0.001 |" in md and "| hyb_sum vs Adam |" in md
    assert "| LEHIBrid | 0.001 |" in md  # the unrelabelled run keeps its roster label


def test_roster_lookups() -> None:
    assert roster.names() == ["adam", "adamw", "sophia", "lehi", "lehibrid"]
    assert [roster.role(n) for n in roster.names()] == ["baseline"] * 3 + ["candidate"] * 2
    assert len({roster.color(n) for n in roster.names()}) == 5
    assert roster.color("toy_sgd") == roster.NEUTRAL_COLOR
    assert roster.role("toy_sgd") == "candidate"
    assert roster.display_label("lehibrid") == "LEHIBrid"
    assert roster.display_label("lehibrid", "lehi") == "lehibrid"  # relabelled LEHI: as given
    assert roster.display_label("fast", "adam") == "fast"
    ordered = sorted(
        [("zz", "zz"), ("fast", "adam"), ("lehi", "lehi"), ("adam", "adam")],
        key=lambda p: roster.rank(*p),
    )
    assert ordered == [("adam", "adam"), ("fast", "adam"), ("lehi", "lehi"), ("zz", "zz")]


def test_no_progress_runs_are_diverged(tree: Path) -> None:
    # an older summary (no initial loss): judged from metrics.csv's step-0 validation row
    old = write_run(tree, "adamw", 1e-2, 0, 0.40)
    csv = old / "metrics.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], "0,0,val,0.3,0.7,0.01,0.1,0.0,0", *lines[1:]]) + "\n")
    # a new summary that records its initial validation loss
    new = write_run(tree, "adamw", 1e-2, 1, 0.41)
    data = json.loads((new / "summary.json").read_text())
    data["initial"] = {"val_loss": 0.2}
    (new / "summary.json").write_text(json.dumps(data))
    fine = write_run(tree, "adamw", 1e-2, 2, 0.42)
    data = json.loads((fine / "summary.json").read_text())
    data["initial"] = {"val_loss": 2.3}
    (fine / "summary.json").write_text(json.dumps(data))
    assert not R.load_runs(tree).set_index("run").loc["toy/adamw/lr=0.01/seed=0", "diverged"]
    res = R.collect(tree)
    runs = res.runs[res.runs["optimizer"] == "adamw"].set_index("seed")
    assert runs["divergence"].tolist() == ["no_progress", "no_progress", ""]
    assert runs["diverged"].tolist() == [True, True, False]
    assert runs["counted"].tolist() == [False, False, True]
    assert runs.loc[0, "initial_val_loss"] == 0.3
    cell = res.cells.set_index("optimizer").loc["adamw"]
    assert cell["n_diverged"] == 2 and not cell["eligible"]


def test_summary_reports_last_eval_and_commits(tree: Path) -> None:
    for path in tree.glob("toy/*/lr=*/seed=*/"):
        (path / "env.json").write_text(json.dumps({"git_commit": "abcdef0123", "git_dirty": True}))
    md = R.render_markdown(R.collect(tree))
    lehi_row = next(line for line in md.splitlines() if line.startswith("| LEHI |"))
    last = [b + OFFSETS[-1] for b in GRID[("lehi", 1e-3)]]  # validation loss of the last eval
    assert f"| {np.mean(last):.4g} ± {np.std(last, ddof=1):.2g} |" in lehi_row
    assert "last eval val loss (mean ± std)" in md
    n = sum(len(b) for b in GRID.values()) + 1  # + the failed Sophia run
    assert f"Made at commit(s): `abcdef0` ({n} runs, {n} from a dirty tree)" in md


def git_head() -> str:
    """HEAD's commit; skips outside a git checkout, and where lehi/ is not at the checkout's
    root (mutmut's copy under mutants/), since the training-code pathspecs are root-relative."""
    head = record.git("rev-parse", "HEAD")
    if head is None:
        pytest.skip("not a git checkout")
    top = record.git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != record.REPO:
        pytest.skip(f"lehi/ is not at the root of the checkout {top}")
    return head


def test_check_lists_untrustworthy_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    head = git_head()
    first = record.git("rev-list", "--max-parents=0", "HEAD").split()[0]
    root = tmp_path / "results"
    envs = {
        0: {"git_commit": head, "git_dirty": False},  # trustworthy
        1: {"git_commit": head, "git_dirty": True},
        2: {"git_commit": "0" * 40, "git_dirty": False},
        3: {"git_commit": first, "git_dirty": False},  # lehi/ did not even exist then
    }
    for seed, env in envs.items():
        run = write_run(root, "adam", 1e-3, seed, 0.5)
        (run / "env.json").write_text(json.dumps(env))
    write_run(root, "adam", 1e-3, 4, 0.5)  # no env.json
    assert R.main(["check", "--root", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    listed = {line.split(":")[0].split("seed=")[1]: line for line in out[:-1]}
    assert sorted(listed) == ["1", "2", "3", "4"]
    assert "dirty tree" in listed["1"]
    assert "unknown here" in listed["2"]
    assert "changed between" in listed["3"]
    assert "no dirty flag" in listed["4"]
    assert out[-1].startswith("4 of 5 run(s)")

    clean = tmp_path / "clean"
    run = write_run(clean, "adam", 1e-3, 0, 0.5)
    (run / "env.json").write_text(json.dumps(envs[0]))
    assert R.main(["check", "--root", str(clean)]) == 0
    assert "all current at HEAD" in capsys.readouterr().out
    # Completed above its initial validation loss: a judgement of lehi.results from the rows
    # (diverged, no_progress), not a provenance problem.
    data = json.loads((run / "summary.json").read_text())
    data["initial"] = {"val_loss": 0.1}
    (run / "summary.json").write_text(json.dumps(data))
    assert R.main(["check", "--root", str(clean)]) == 0
    judged = R.collect(clean).runs.iloc[0]
    assert judged["diverged"] and judged["divergence"] == "no_progress" and not judged["trained"]


def test_a_passing_verification_at_heads_training_code_carries_a_stale_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    git_head()
    first = record.git("rev-list", "--max-parents=0", "HEAD").split()[0]
    root = tmp_path / "results"
    for label in ("adam", "lehi"):
        run = write_run(root, label, 1e-3, 0, 0.5)
        (run / "env.json").write_text(json.dumps({"git_commit": first, "git_dirty": False}))
    verified = root / "toy" / "verified.json"
    document = {
        "training_code": record.training_code_digest(experiment="toy"),
        "training_code_dirty": False,
        "labels": {"adam": True, "lehi": False},
    }
    verified.write_text(json.dumps(document))
    provenance.code_state.cache_clear()
    assert R.main(["check", "--root", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "/lehi/" in out[0] and "verification failed for lehi" in out[0]
    verified.write_text(json.dumps({**document, "training_code": "0" * 16}))
    assert R.main(["check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert out.count("other training code than HEAD's") == 2
    verified.write_text(json.dumps({**document, "training_code_dirty": True}))
    assert R.main(["check", "--root", str(root)]) == 1
    assert capsys.readouterr().out.count("uncommitted training code") == 2


def test_step_cost_benchmark_writes_what_collect_reads(tmp_path: Path) -> None:
    """benchmarks/step_cost.py on the digits preset (tiny budget): the file's format and the
    curvature passes it counts; the timings themselves are not asserted."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "results" / "digits" / "step_cost.json"
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "step_cost.py"), "--experiment", "digits",
         "--optimizers", "adam", "lehi", "--repeats", "2", "--steps", "2", "--warmup", "1",
         "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = stepcost.read(tmp_path / "results", "digits")
    assert data["experiment"] == "digits" and data["threads"] == 1
    assert list(data["optimizers"]) == ["adam", "lehi"]
    assert [len(v["ms_per_step"]) for v in data["optimizers"].values()] == [2, 2]
    assert data["optimizers"]["adam"]["curvature_passes_per_step"] == 0
    assert data["optimizers"]["lehi"]["curvature_passes_per_step"] == 1  # hessian_every: 1
    assert f"wrote {out}" in proc.stdout


def test_a_roster_entry_sets_role_order_and_colour(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # adding an optimizer = its module, its config and one roster entry: here a baseline
    toy = roster.Entry("toy_sgd", "Toy SGD", "#123456", "baseline", -1)
    monkeypatch.setattr(roster, "ROSTER", (*roster.ROSTER, toy))
    for seed, base in enumerate((0.55, 0.56, 0.57)):
        relabel(write_run(tree, "toy_sgd", 1e-3, seed, base), "toy_sgd", "toy_sgd")
    res = R.collect(tree)
    assert res.best["optimizer"].iloc[0] == "toy_sgd"  # order -1: first
    pairs = set(map(tuple, res.significance[["optimizer", "baseline"]].to_numpy()))
    assert {("lehi", "toy_sgd"), ("lehibrid", "toy_sgd")} <= pairs
    assert "| Toy SGD | 0.001 |" in R.render_markdown(res)
    assert roster.color("toy_sgd") == "#123456"


def test_headings_state_the_budget_in_epochs_or_steps():
    from lehi.results.markdown import budget_label, experiment_heading

    assert budget_label(9380, 20.0) == "20 epochs (9,380 steps)"
    assert budget_label(664, 664 / 1327) == "664 steps (0.5 epoch)"
    assert budget_label(None, None) == ""
    heading = experiment_heading("ptb_small", "small", "ptb", "perplexity", 664, 664 / 1327)
    assert heading == (
        "ptb_small — scale: small (CPU variant) · dataset: ptb · 664 steps (0.5 epoch) · "
        "metric: perplexity"
    )


def test_a_spike_that_left_the_run_untrained_is_a_blow_up_not_a_recovery(tree: Path) -> None:
    """Each run spiked to 50 × its initial training loss (factor 10): one ended 20 % below its
    initial validation loss (recovered: counted, unstable), one a hair below it (at chance:
    blown up); an untrained run that never spiked stays counted, and an unknown initial loss
    decides nothing."""

    def run(seed: int, base: float, initial: float | None, spike: float) -> None:
        path = write_run(tree, "lehi", 7e-3, seed, base)  # an LR the tree has no runs at
        data = json.loads((path / "summary.json").read_text())
        data["max_spike"] = spike
        if initial is not None:
            data["initial"] = {"val_loss": initial}
        (path / "summary.json").write_text(json.dumps(data))
        cfg = path / "config.yaml"
        cfg.write_text(cfg.read_text() + "trainer:\n  divergence_factor: 10.0\n")

    final = 0.4 + OFFSETS[-1]  # write_run's last validation loss for base 0.4
    run(0, 0.4, final / 0.8, 50.0)  # recovered and trained
    run(1, 0.4, final + 1e-3, 50.0)  # blown up, left at its start
    run(2, 0.4, final + 1e-3, 5.0)  # never spiked, never trained
    run(3, 0.4, None, 50.0)  # no initial loss recorded
    runs = R.collect(tree).runs.set_index("seed")
    runs = runs[(runs["optimizer"] == "lehi") & (runs["lr"] == 7e-3)].sort_index()
    assert runs["divergence"].fillna("").tolist() == ["", "blown_up", "", ""]
    assert runs["diverged"].tolist() == [False, True, False, False]
    assert runs["trained"].tolist() == [True, False, False, False]
    assert runs["counted"].tolist() == [True, False, True, True]
