"""lehi.results.stats on small hand-made tables: every expected number is worked out by hand
(or with plain numpy) from the rows written here, never taken from the code under test."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lehi.results import stats, stepcost
from lehi.results.store import EXP_KEYS

NAN = math.nan
TOTALS = [
    "n_lrs",
    "n_stable_lrs",
    "n_trained_lrs",
    "n_runs_total",
    "n_diverged_total",
    "n_failed_total",
]


def run(
    optimizer: str,
    lr: float,
    seed: int,
    val_loss: float,
    *,
    status: str = "completed",
    diverged: bool = False,
    trained: bool = True,
    max_spike: float | None = NAN,
    factor: float | None = 2.0,
    metric_name: str = "accuracy",
    last3_std: float = 0.01,
    final: float | None = None,
    metric: float = NAN,
    steps: float = 100.0,
    passes: float = 0.0,
    steps_to_target: float = NAN,
    experiment: str = "toy",
    commit: str = "",
    dirty: bool | None = None,
) -> dict:
    """One row of the runs table (the columns stats reads); ``final`` defaults to val_loss."""
    return {
        "experiment": experiment,
        "scale": "small",
        "dataset": "digits",
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        "optimizer_name": optimizer,
        "status": status,
        "diverged": diverged,
        "trained": trained,
        "max_spike": max_spike,
        "divergence_factor": factor,
        "metric_name": metric_name,
        "val_loss": val_loss,
        "val_loss_last3_std": last3_std,
        "final_val_loss": val_loss if final is None else final,
        "final_val_metric": metric,
        "steps": steps,
        "curvature_passes": passes,
        "steps_to_target": steps_to_target,
        "git_commit": commit,
        "git_dirty": dirty,
        "run": f"{experiment}/{optimizer}/lr={lr:g}/seed={seed}",
    }


def sample_std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------- which runs count


def test_counts_leaves_out_failed_diverged_and_non_finite_runs() -> None:
    runs = pd.DataFrame(
        [
            run("adam", 1e-3, 0, 0.5),
            run("adam", 1e-3, 1, 0.5, status="failed"),  # a loss was recorded, still failed
            run("adam", 1e-3, 2, 0.5, diverged=True),
            run("adam", 1e-3, 3, NAN),
            run("adam", 1e-3, 4, math.inf),
        ]
    )
    assert stats.counts(runs).tolist() == [True, False, False, False, False]


def test_unstable_is_a_counted_run_strictly_above_its_divergence_factor() -> None:
    runs = pd.DataFrame(
        [
            run("adam", 1e-3, 0, 0.5, max_spike=3.0, factor=2.0),
            run("adam", 1e-3, 1, 0.5, max_spike=2.0, factor=2.0),  # at the factor: not above
            run("adam", 1e-3, 2, 0.5, max_spike=5.0, diverged=True),  # not counted
            run("adam", 1e-3, 3, NAN, max_spike=5.0, status="failed"),  # not counted
            run("adam", 1e-3, 4, 0.5, max_spike=NAN),  # unknown spike: stable
            run("adam", 1e-3, 5, 0.5, max_spike=9.0, factor=NAN),  # unknown factor: stable
        ]
    )
    assert stats.unstable(runs).tolist() == [True, False, False, False, False, False]


# ---------------------------------------------------------------- mean and std


def test_mean_std_is_the_sample_std_and_nan_below_two_values_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy "degrees of freedom" warning behind the NaN
        empty = stats.mean_std(np.array([]))
        one = stats.mean_std(np.array([2.5]))
    assert all(math.isnan(v) for v in empty)
    assert one[0] == 2.5 and math.isnan(one[1])
    mean, std = stats.mean_std(np.array([1.0, 2.0, 4.0]))
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )


# ---------------------------------------------------------------- cells


def cell_runs_by_hand() -> pd.DataFrame:
    return pd.DataFrame(
        [
            # adam 1e-3: three counted seeds, one failed, one diverged -> not eligible
            run("adam", 1e-3, 0, 0.5, final=0.52, metric=0.8),
            run("adam", 1e-3, 1, 0.6, final=0.61, metric=0.7, max_spike=3.0, trained=False),
            run("adam", 1e-3, 2, 0.7, final=0.73, metric=NAN),
            run("adam", 1e-3, 3, NAN, status="failed", trained=False, final=NAN),
            run("adam", 1e-3, 4, NAN, status="diverged", diverged=True, trained=False, final=NAN),
            # adam 1e-2: one counted seed (no metric name on its row) and a failed one
            run("adam", 1e-2, 0, 0.4, last3_std=0.03, metric=0.9, metric_name=""),
            run("adam", 1e-2, 1, NAN, status="failed", trained=False, final=NAN),
            # lehi 1e-3: nothing counted and no metric name at all
            run(
                "lehi",
                1e-3,
                0,
                NAN,
                status="diverged",
                diverged=True,
                trained=False,
                final=NAN,
                metric_name="",
            ),
        ]
    )


def test_aggregate_cell_statistics_by_hand() -> None:
    cells = stats.aggregate(cell_runs_by_hand())
    assert list(cells.columns) == list(stats.CELL_COLUMNS)
    assert [(o, lr) for o, lr in zip(cells["optimizer"], cells["lr"])] == [
        ("adam", 1e-3),
        ("adam", 1e-2),
        ("lehi", 1e-3),
    ]
    a, b, c = (cells.iloc[i] for i in range(3))

    counts = ("n_runs", "n_seeds", "n_diverged", "n_trained", "n_failed", "n_unstable")
    assert [a[k] for k in counts] == [5, 3, 1, 2, 1, 1]  # seeds 0 and 2 trained
    assert a["metric_name"] == "accuracy"
    assert a["val_loss_mean"] == pytest.approx(0.6)
    assert a["val_loss_std"] == pytest.approx(0.1)
    assert a["val_loss_spread"] == pytest.approx(0.2)
    assert a["last_val_loss_mean"] == pytest.approx((0.52 + 0.61 + 0.73) / 3)
    assert a["last_val_loss_std"] == pytest.approx(sample_std([0.52, 0.61, 0.73]))
    assert a["metric_mean"] == pytest.approx(0.75)  # the NaN metric is left out
    assert a["metric_std"] == pytest.approx(sample_std([0.8, 0.7]))
    assert not a["eligible"]

    assert [b[k] for k in counts] == [2, 1, 0, 1, 1, 0]
    assert b["metric_name"] == "accuracy"
    assert b["val_loss_mean"] == pytest.approx(0.4) and math.isnan(b["val_loss_std"])
    assert b["val_loss_spread"] == pytest.approx(2 * 0.03)  # twice its own last-3 std
    assert b["metric_mean"] == pytest.approx(0.9) and math.isnan(b["metric_std"])
    assert b["eligible"]

    assert [c[k] for k in counts] == [1, 0, 1, 0, 0, 0]
    assert c["metric_name"] == ""
    for col in ("val_loss_mean", "val_loss_std", "val_loss_spread", "last_val_loss_mean"):
        assert math.isnan(c[col])
    assert not c["eligible"]


def test_statistics_read_object_columns_and_unknowns_stored_as_none() -> None:
    """Tables whose columns hold Python objects (None for an unknown spike or factor, as an
    older summary gives) yield the same numbers as float columns."""
    runs = cell_runs_by_hand().astype(object)
    runs.loc[0, "max_spike"] = None
    runs.loc[1, "divergence_factor"] = None
    assert stats.counts(runs).tolist() == [True, True, True, False, False, True, False, False]
    assert not stats.unstable(runs).any()
    cells = stats.aggregate(runs).set_index(["optimizer", "lr"])
    assert cells.loc[("adam", 1e-3), "n_seeds"] == 3
    assert cells.loc[("adam", 1e-3), "n_unstable"] == 0
    assert cells.loc[("adam", 1e-3), "val_loss_mean"] == pytest.approx(0.6)
    assert cells.loc[("adam", 1e-3), "last_val_loss_mean"] == pytest.approx(
        (0.52 + 0.61 + 0.73) / 3
    )
    assert cells.loc[("adam", 1e-3), "metric_mean"] == pytest.approx(0.75)

    best = pd.DataFrame(
        {
            "experiment": ["toy", "toy", "other"],
            "scale": "small",
            "dataset": "digits",
            "optimizer": ["adam", "lehi", "lehi"],
            "val_loss_mean": [NAN, 0.4, 0.3],
        }
    ).astype(object)
    targets = stats.resolve_targets(best).set_index("experiment")["target"]
    assert targets["toy"] == pytest.approx(0.4 * 1.05)  # Adam has no finite loss here
    assert targets["other"] == pytest.approx(0.3 * 1.05)


# ---------------------------------------------------------------- best LRs


def best_lr_runs() -> pd.DataFrame:
    rows = []
    # adam: (lr, val losses, trained flags); 1e-1 has a diverged seed
    for lr, losses, trained in (
        (1e-4, [0.55, 0.57], [True, True]),
        (1e-3, [0.50, 0.52], [True, True]),
        (1e-2, [0.40, 0.42], [True, False]),
    ):
        for seed, (loss, ok) in enumerate(zip(losses, trained)):
            rows.append(run("adam", lr, seed, loss, trained=ok))
    rows.append(run("adam", 1e-1, 0, 0.30))
    rows.append(run("adam", 1e-1, 1, NAN, status="diverged", diverged=True, trained=False))
    # lehi: no eligible LR; its one cell has a diverged, an unstable and a failed seed
    rows.append(run("lehi", 1e-2, 0, NAN, status="diverged", diverged=True, trained=False))
    rows.append(run("lehi", 1e-2, 1, 0.35, max_spike=4.0, metric=0.6))
    rows.append(run("lehi", 1e-2, 2, NAN, status="failed", trained=False))
    return pd.DataFrame(rows)


def test_best_lrs_picks_the_lowest_eligible_mean_and_counts_the_grid() -> None:
    cells = stats.aggregate(best_lr_runs())
    best = stats.best_lrs(cells)
    assert list(best.columns) == [*(c for c in stats.CELL_COLUMNS if c != "eligible"), *TOTALS]
    assert best["optimizer"].tolist() == ["adam", "lehi"]
    adam, lehi = best.iloc[0], best.iloc[1]

    assert adam["lr"] == 1e-2  # 0.41; 1e-1's 0.30 has a diverged seed
    assert adam["val_loss_mean"] == pytest.approx(0.41)
    assert [adam[k] for k in ("n_runs", "n_seeds", "n_diverged", "n_trained")] == [2, 2, 0, 1]
    # 4 LRs, 3 without a diverged seed, 2 of those with every seed trained (1e-4, 1e-3)
    assert [adam[k] for k in TOTALS] == [4, 3, 2, 8, 1, 0]

    assert math.isnan(lehi["lr"])
    for col in ("val_loss_mean", "val_loss_std", "val_loss_spread", "metric_mean"):
        assert math.isnan(lehi[col])
    counts = ("n_runs", "n_seeds", "n_diverged", "n_trained", "n_failed", "n_unstable")
    assert [lehi[k] for k in counts] == [0] * 6  # no best cell: nothing counted in it
    assert [lehi[k] for k in TOTALS] == [1, 0, 0, 3, 1, 1]


def test_best_lrs_with_no_eligible_cell_anywhere_is_nan() -> None:
    cells = stats.aggregate(best_lr_runs().query("optimizer == 'lehi'"))
    # one counted seed of three: its spread is twice its own last-3 std
    assert cells["val_loss_spread"].tolist() == [pytest.approx(2 * 0.01)]
    nothing = stats.aggregate(best_lr_runs().query("optimizer == 'lehi' and seed == 0"))
    for col in ("val_loss_mean", "val_loss_std", "val_loss_spread", "metric_mean"):
        assert nothing[col].dtype == float and math.isnan(nothing[col].iloc[0])
    best = stats.best_lrs(cells)
    assert len(best) == 1
    for col in ("lr", "val_loss_mean", "last_val_loss_mean", "metric_mean"):
        assert math.isnan(best[col].iloc[0])
    assert best["lr"].dtype == float


def test_no_runs_give_empty_tables_with_their_columns() -> None:
    runs = pd.DataFrame(columns=list(run("adam", 1e-3, 0, 0.5)))
    cells = stats.aggregate(runs)
    assert cells.empty and list(cells.columns) == list(stats.CELL_COLUMNS)
    best = stats.best_lrs(cells)
    assert best.empty
    assert list(best.columns) == [*(c for c in stats.CELL_COLUMNS if c != "eligible"), *TOTALS]
    with pytest.raises(ValueError, match="unknown experiment 'toy'; experiments here: none"):
        stats.resolve_targets(best, {"toy": 0.5})


# ---------------------------------------------------------------- targets


def best_table(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    """A best-LR table with the columns resolve_targets reads: (experiment, optimizer, loss)."""
    return pd.DataFrame(
        {
            "experiment": [r[0] for r in rows],
            "scale": "small",
            "dataset": "digits",
            "optimizer": [r[1] for r in rows],
            "val_loss_mean": [r[2] for r in rows],
        }
    )


def test_resolve_targets_rules() -> None:
    best = best_table(
        [
            ("a", "adam", 0.40),
            ("a", "lehi", 0.30),
            ("b", "adam", NAN),  # Adam has no eligible LR: the worst best-LR loss rules
            ("b", "lehi", 0.50),
            ("b", "sophia", 0.60),
            ("b", "lehibrid", NAN),
            ("c", "adam", NAN),
            ("c", "lehi", NAN),
            ("d", "lehi", 0.45),
        ]
    )
    targets = stats.resolve_targets(best, {"d": 0.25}, factor=1.1)
    assert list(targets.columns) == [*EXP_KEYS, "target", "target_rule"]
    t = targets.set_index("experiment")
    assert t.loc["a", "target"] == pytest.approx(0.40 * 1.1)
    assert t.loc["a", "target_rule"] == "best Adam final val loss × 1.1"
    assert t.loc["b", "target"] == pytest.approx(0.60 * 1.1)
    assert t.loc["b", "target_rule"] == "worst best-LR final val loss × 1.1 (no eligible Adam LR)"
    assert math.isnan(t.loc["c", "target"])
    assert t.loc["c", "target_rule"] == "no optimizer has an eligible learning rate"
    assert t.loc["d", "target"] == 0.25
    assert t.loc["d", "target_rule"] == "set explicitly"


def test_a_target_factor_below_one_is_allowed() -> None:
    targets = stats.resolve_targets(best_table([("a", "adam", 0.40)]), factor=0.5)
    assert targets["target"].iloc[0] == pytest.approx(0.20)


@pytest.mark.parametrize("factor", [0.0, -1.0, math.inf, math.nan])
def test_a_target_factor_must_be_finite_and_positive(factor) -> None:
    best = best_table([("a", "adam", 0.40)])
    with pytest.raises(ValueError, match=rf"target factor {factor!r} must be a finite number > 0"):
        stats.resolve_targets(best, factor=factor)


def test_bad_explicit_targets_name_the_key_and_what_is_allowed() -> None:
    best = best_table([("a", "adam", 0.40), ("b", "adam", 0.50)])
    with pytest.raises(ValueError, match="unknown experiment 'nope'; experiments here: a, b$"):
        stats.resolve_targets(best, {"nope": 0.3})
    for value in (math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"target for 'a' is {value!r}; expected a finite"):
            stats.resolve_targets(best, {"a": value})


# ---------------------------------------------------------------- steps to target


def test_steps_to_target_is_the_first_validation_step_at_or_below_the_target() -> None:
    def rows(name: str, experiment: str, split: str, losses: dict[int, float]) -> list[dict]:
        return [
            {
                "experiment": experiment,
                "scale": "small",
                "dataset": "digits",
                "run": name,
                "split": split,
                "step": float(s),
                "loss": v,
            }
            for s, v in losses.items()
        ]

    metrics = pd.DataFrame(
        rows("r2", "a", "val", {30: 0.4, 10: 0.9, 20: 0.5})  # out of order; 0.5 == target
        + rows("r2", "a", "train", {5: 0.1})  # training loss never counts
        + rows("r1", "a", "val", {10: 0.8, 20: 0.6, 30: 0.55})  # never reaches 0.5
        + rows("r3", "b", "val", {10: 0.7, 20: 0.65, 30: 0.6})  # b's own target 0.7
    )
    targets = pd.DataFrame(
        {"experiment": ["a", "b"], "scale": "small", "dataset": "digits", "target": [0.5, 0.7]}
    )
    out = stats.steps_to_target(metrics, targets)
    assert list(out.columns) == ["run", "steps_to_target"]
    assert out.index.tolist() == [0, 1]
    assert out["run"].tolist() == ["r2", "r3"]
    assert out["steps_to_target"].tolist() == [20.0, 10.0]


def test_select_experiment_matches_all_three_keys() -> None:
    frame = pd.DataFrame(
        {
            "experiment": ["a", "b", "a", "a"],
            "scale": ["small", "small", "large", "small"],
            "dataset": ["d1", "d1", "d1", "d2"],
            "value": [1, 2, 3, 4],
        }
    )
    out = stats.select_experiment(frame, {"experiment": "a", "scale": "small", "dataset": "d1"})
    assert out["value"].tolist() == [1]


# ---------------------------------------------------------------- step cost and cost to target


def write_cost(root: Path, experiment: str, ms: dict[str, list[float]]) -> None:
    stepcost.write(
        stepcost.path_for(root, experiment),
        {
            "format": stepcost.FORMAT,
            "experiment": experiment,
            "method": stepcost.METHOD,
            "device": "cpu",
            "threads": 2,
            "torch": "2.x",
            "optimizers": {k: {"name": k, "ms_per_step": v} for k, v in ms.items()},
        },
    )


def test_step_costs_quartiles_and_overhead_by_hand(tmp_path: Path) -> None:
    write_cost(tmp_path, "x", {"adam": [10, 20, 30, 40], "lehi": [15, 20, 45, 60]})
    write_cost(tmp_path, "y", {"lehi": [5.0, 7.0]})  # no reference optimizer measured
    costs = stats.step_costs(tmp_path, ["x", "y", "z"])  # z: never measured
    assert list(costs.columns) == list(stats.STEP_COST_COLUMNS)
    assert list(zip(costs["experiment"], costs["optimizer"])) == [
        ("x", "adam"),
        ("x", "lehi"),
        ("y", "lehi"),
    ]
    adam, lehi, alone = (costs.iloc[i] for i in range(3))
    # linear-interpolated percentiles of 4 sorted values: position 3p
    assert (adam["ms_per_step_q1"], adam["ms_per_step"], adam["ms_per_step_q3"]) == (
        17.5,
        25.0,
        32.5,
    )
    assert (lehi["ms_per_step_q1"], lehi["ms_per_step"], lehi["ms_per_step_q3"]) == (
        18.75,
        32.5,
        48.75,
    )
    assert adam["overhead_pct"] == 0.0
    assert lehi["overhead_pct"] == pytest.approx(50.0)  # ratios 1.5, 1, 1.5, 1.5
    assert alone["ms_per_step"] == 6.0 and math.isnan(alone["overhead_pct"])
    assert alone["n_repeats"] == 2 and alone["measured_on"] == "cpu, 2 threads, torch 2.x"


def cost_runs() -> pd.DataFrame:
    return pd.DataFrame(
        [
            # adam: best LR 1e-3; two of three seeds reached the target
            run("adam", 1e-3, 0, 0.50, steps_to_target=40.0),
            run("adam", 1e-3, 1, 0.52, steps_to_target=60.0),
            run("adam", 1e-3, 2, 0.54),
            run("adam", 1e-2, 0, 0.60, steps_to_target=80.0),  # not its best LR
            # lehi: passes per step over its counted runs of every LR: 1/1 and 2/4
            run("lehi", 1e-3, 0, 0.45, steps=1.0, passes=1.0, steps_to_target=30.0),
            run("lehi", 1e-2, 0, 0.48, steps=4.0, passes=2.0),
            run("lehi", 1e-1, 0, NAN, status="diverged", diverged=True, steps=10.0, passes=10.0),
            # sophia: no eligible LR
            run("sophia", 1e-3, 0, NAN, status="diverged", diverged=True, steps=10.0),
            # another experiment's lehi runs make 3 passes a step
            run("lehi", 1e-3, 0, 0.1, steps=10.0, passes=30.0, experiment="big"),
        ]
    )


def test_add_cost_steps_passes_and_time_to_target_by_hand() -> None:
    runs = cost_runs()
    best = stats.best_lrs(stats.aggregate(runs))
    targets = pd.DataFrame(
        {
            "experiment": ["big", "toy"],
            "scale": "small",
            "dataset": "digits",
            "target": [0.2, 0.55],
            "target_rule": "set explicitly",
        }
    )
    costs = pd.DataFrame(
        [["toy", "adam", 10.0, 9.0, 11.0, 0.0, 3, "cpu"]], columns=list(stats.STEP_COST_COLUMNS)
    )
    out = stats.add_cost(best, runs, targets, costs)
    extra = [
        "steps_to_target_mean",
        "steps_to_target_std",
        "n_reached",
        "curvature_passes_per_step",
    ]
    assert list(out.columns) == [
        *best.columns,
        "target",
        "target_rule",
        *extra,
        *stats.STEP_COST_COLUMNS[2:],
        "time_to_target_mean",
        "time_to_target_std",
    ]
    rows = {(r["experiment"], r["optimizer"]): r for r in out.to_dict("records")}
    assert set(rows) == {("big", "lehi"), ("toy", "adam"), ("toy", "lehi"), ("toy", "sophia")}

    adam = rows[("toy", "adam")]
    assert adam["target"] == 0.55
    assert (adam["steps_to_target_mean"], adam["n_reached"]) == (50.0, 2)
    assert adam["steps_to_target_std"] == pytest.approx(math.sqrt(200))
    assert adam["curvature_passes_per_step"] == 0.0
    assert adam["time_to_target_mean"] == pytest.approx(50 * 0.010)
    assert adam["time_to_target_std"] == pytest.approx(math.sqrt(200) * 0.010)

    lehi = rows[("toy", "lehi")]
    assert lehi["lr"] == 1e-3
    assert (lehi["steps_to_target_mean"], lehi["n_reached"]) == (30.0, 1)
    assert math.isnan(lehi["steps_to_target_std"])
    assert lehi["curvature_passes_per_step"] == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert math.isnan(lehi["time_to_target_mean"])  # its step cost was not measured

    sophia = rows[("toy", "sophia")]
    assert math.isnan(sophia["lr"])
    assert sophia["n_reached"] == 0 and math.isnan(sophia["steps_to_target_mean"])
    assert math.isnan(sophia["curvature_passes_per_step"])  # no counted run

    assert rows[("big", "lehi")]["curvature_passes_per_step"] == 3.0


def test_add_cost_keeps_rows_whose_experiment_has_no_target() -> None:
    runs = cost_runs()
    best = stats.best_lrs(stats.aggregate(runs))
    targets = pd.DataFrame(
        {
            "experiment": ["toy"],
            "scale": "small",
            "dataset": "digits",
            "target": [0.55],
            "target_rule": "set explicitly",
        }
    )
    costs = pd.DataFrame(columns=list(stats.STEP_COST_COLUMNS))
    out = stats.add_cost(best, runs, targets, costs)
    assert len(out) == len(best) == 4
    big = out[out["experiment"] == "big"].iloc[0]
    assert math.isnan(big["target"])
    assert big["curvature_passes_per_step"] == 3.0


def test_add_cost_reads_object_columns() -> None:
    runs = cost_runs()
    best = stats.best_lrs(stats.aggregate(runs))
    targets = stats.resolve_targets(best, {"toy": 0.55, "big": 0.2})
    costs = pd.DataFrame(columns=list(stats.STEP_COST_COLUMNS))
    out = stats.add_cost(best, runs.astype(object), targets, costs)
    adam = out[(out["experiment"] == "toy") & (out["optimizer"] == "adam")].iloc[0]
    assert (adam["steps_to_target_mean"], adam["n_reached"]) == (50.0, 2)


def test_commits_are_sorted_with_dirty_and_unknown_counts() -> None:
    runs = pd.DataFrame(
        [
            run("adam", 1e-3, 0, 0.5, commit="bbb", dirty=True),
            run("adam", 1e-3, 1, 0.5, commit="bbb", dirty=None),
            run("adam", 1e-3, 2, 0.5, commit="aaa", dirty=False),
            run("adam", 1e-3, 3, 0.5, commit="bbb", dirty=False),
        ]
    )
    out = stats.commits(runs)
    assert list(out.columns) == ["git_commit", "n_runs", "n_dirty", "n_unknown"]
    assert out.values.tolist() == [["aaa", 1, 0, 0], ["bbb", 3, 1, 1]]


# ---------------------------------------------------------------- curves


def curve_rows(seed: int, losses: dict[int, float], split: str = "val", run_id: str = "") -> list:
    return [
        {"run": run_id or f"s{seed}", "seed": seed, "split": split, "step": s, "loss": v}
        for s, v in losses.items()
    ]


def test_seed_curve_by_hand() -> None:
    rows = pd.DataFrame(
        curve_rows(0, {10: 1.0, 20: 0.6, 30: 0.3})
        + curve_rows(1, {10: 2.0, 20: 9.0})
        + curve_rows(1, {20: 0.8, 30: 0.5})  # step 20 logged again (resumed): the last counts
        + curve_rows(2, {10: 3.0, 20: 1.0})  # seed 2 has no step 30: left out of the curve
    )
    curve = stats.seed_curve(rows)
    assert list(curve.columns) == ["step", "loss_mean", "loss_std", "n_seeds"]
    assert curve["step"].dtype == float
    assert curve["step"].tolist() == [10.0, 20.0]
    np.testing.assert_allclose(curve["loss_mean"], [2.0, 0.8])
    np.testing.assert_allclose(curve["loss_std"], [1.0, 0.2])  # sample std of (1,2,3), (.6,.8,1)
    assert curve["n_seeds"].tolist() == [3, 3]


def test_seed_curve_of_two_seeds_and_of_one() -> None:
    two = stats.seed_curve(pd.DataFrame(curve_rows(0, {10: 1.0}) + curve_rows(1, {10: 2.0})))
    assert two["loss_mean"].tolist() == [1.5]
    assert two["loss_std"].tolist() == pytest.approx([math.sqrt(0.5)])
    one = stats.seed_curve(pd.DataFrame(curve_rows(4, {10: 1.0, 20: 0.5, 30: 0.25})))
    assert one["step"].tolist() == [10.0, 20.0, 30.0]
    assert one["loss_mean"].tolist() == [1.0, 0.5, 0.25]
    assert one["loss_std"].isna().all() and one["loss_std"].dtype == float
    assert one["n_seeds"].tolist() == [1, 1, 1]


def test_cell_curve_uses_the_counted_runs_of_the_cell_and_one_split() -> None:
    runs = pd.DataFrame(
        [
            run("adam", 1e-3, 0, 0.5),
            run("adam", 1e-3, 1, 0.5),
            run("adam", 1e-3, 2, NAN, status="diverged", diverged=True),  # not counted
            run("adam", 1e-2, 0, 0.5),  # another cell
        ]
    )
    ids = runs["run"].tolist()
    metrics = pd.DataFrame(
        curve_rows(0, {10: 1.0, 20: 0.4}, run_id=ids[0])
        + curve_rows(1, {10: 3.0, 20: 0.6}, run_id=ids[1])
        + curve_rows(2, {10: 50.0, 20: 90.0}, run_id=ids[2])
        + curve_rows(0, {10: 7.0, 20: 7.0}, run_id=ids[3])
        + curve_rows(0, {5: 1.5, 15: 1.1}, split="train", run_id=ids[0])
        + curve_rows(1, {5: 2.5, 15: 1.3}, split="train", run_id=ids[1])
    )
    cell = {"experiment": "toy", "scale": "small", "dataset": "digits", "optimizer": "adam"}
    val = stats.cell_curve(runs, metrics, {**cell, "lr": 1e-3}, "val")
    assert val["step"].tolist() == [10.0, 20.0]
    np.testing.assert_allclose(val["loss_mean"], [2.0, 0.5])
    np.testing.assert_allclose(val["loss_std"], [math.sqrt(2), math.sqrt(0.02)])
    assert val["n_seeds"].tolist() == [2, 2]
    train = stats.cell_curve(runs, metrics, {**cell, "lr": 1e-3}, "train")
    assert train["step"].tolist() == [5.0, 15.0]
    np.testing.assert_allclose(train["loss_mean"], [2.0, 1.2])
    other = stats.cell_curve(runs, metrics, {**cell, "lr": 1e-2}, "val")
    assert other["loss_mean"].tolist() == [7.0, 7.0] and other["n_seeds"].tolist() == [1, 1]
