"""Each early-stop reason of the divergence rule, on a real run built to reach it, at its edge.

README, "Divergence": a run is diverged when every training-loss window of a whole
evaluation interval stays above ``trainer.divergence_factor`` × the first step's loss
(``held_above_factor``), or when a training-loss window turns non-finite (``non_finite``,
at once, without waiting for the interval to end). The expected outcome is computed here
from the recorded rows with that rule, independently of lehi.divergence.

Below them, the monitor fed hand-made losses and validation_summary fed hand-made
metrics.csv rows, each figure worked by hand (the edges the runs cannot reach cheaply).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from conftest import compose_config

from lehi.divergence import DivergenceMonitor
from lehi.record import find_runs
from lehi.runner import run
from lehi.summary import LAST_WINDOW, validation_summary

#: digits with Adam at lr 0.3: the loss jumps ~90× in the first interval, then falls back
#: to 2–6× the initial loss in the second and below 2× in the third, finite throughout.
#: A train row every step, an evaluation every 4 steps (at 4, 8 and 12).
HELD = [
    "optimizer=adam",
    "optimizer.lr=0.3",
    "trainer.max_steps=12",
    "trainer.eval_every=4",
    "trainer.log_every=1",
]
#: SophiaG at lr 1e3 on digits: the loss grows ~10⁶× a step and overflows at step 6.
NON_FINITE = [
    "optimizer=sophia",
    "optimizer.lr=1e3",
    "trainer.max_steps=12",
    "trainer.eval_every=4",
    "trainer.log_every=1",
]


def train(root: Path, *overrides: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = run(compose_config(["logger=files", f"paths.results_dir={root}", *overrides]))
    (record,) = find_runs(root)
    return summary, record.read_metrics()


def without_clocks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("wall_time", "train_time")} for r in rows]


def interval_ratios(rows: list[dict[str, Any]], initial: float) -> dict[int, list[float]]:
    """Evaluation step -> the ratios to the initial loss of the train windows it closes."""
    out: dict[int, list[float]] = {}
    previous = 0
    for row in rows:
        if row["split"] == "val" and row["step"] > 0:
            out[row["step"]] = [
                r["loss"] / initial
                for r in rows
                if r["split"] == "train" and previous < r["step"] <= row["step"]
            ]
            previous = row["step"]
    return out


def first_held(ratios: dict[int, list[float]], factor: float) -> int | None:
    """The first evaluation whose interval had every window above ``factor``."""
    return next((step for step, r in ratios.items() if r and min(r) > factor), None)


def test_held_above_factor_flips_at_the_smallest_window_of_the_interval(tmp_path, one_thread):
    # The trajectory, never judged diverged (the factor only judges, it never steers).
    reference, rows = train(tmp_path / "reference", *HELD, "trainer.divergence_factor=1e30")
    assert reference["steps"] == 12 and all(math.isfinite(r["loss"]) for r in rows)
    ratios = interval_ratios(rows, reference["initial"]["train_loss"])
    assert list(ratios) == [4, 8, 12] and [len(r) for r in ratios.values()] == [4, 4, 4]
    first, second, third = ratios.values()
    # The run built for it: the first interval holds the first step itself (ratio 1) beside
    # windows far above the second's, and the third falls below the second's smallest.
    assert min(first) == 1.0 < min(second) < max(first) and max(third) < min(second)
    edge = min(second)

    factor = math.nextafter(edge, 0.0)  # the largest float below: every window is above it
    below, below_rows = train(tmp_path / "below", *HELD, f"trainer.divergence_factor={factor!r}")
    assert first_held(ratios, factor) == 8
    assert (below["status"], below["divergence"], below["diverged_at_step"]) == (
        "diverged",
        "held_above_factor",
        8,
    )
    assert without_clocks(below_rows) == without_clocks([r for r in rows if r["step"] <= 8])

    at, _ = train(tmp_path / "at", *HELD, f"trainer.divergence_factor={edge!r}")
    assert first_held(ratios, edge) is None
    assert at["steps"] == 12 and at["divergence"] != "held_above_factor"
    assert at["max_spike"] == reference["max_spike"] == max(max(r) for r in ratios.values())


def test_non_finite_stops_at_the_first_non_finite_window(tmp_path, one_thread):
    summary, rows = train(tmp_path, *NON_FINITE)
    initial = summary["initial"]["train_loss"]
    train_rows = [r for r in rows if r["split"] == "train"]
    last = train_rows[-1]
    assert not math.isfinite(last["loss"]) and all(math.isfinite(r["loss"]) for r in rows[:-1])
    assert (summary["status"], summary["divergence"]) == ("diverged", "non_finite")
    # It stops at that very window, between evaluations, not at the interval's end.
    assert summary["diverged_at_step"] == summary["steps"] == last["step"] == 6
    assert rows[-1] is last
    # The window before it was finite and far above the factor: alone, not divergence.
    assert train_rows[-2]["loss"] / initial > 1e6 * 10.0


# ------------------------------------------------------------------------------------------
# The monitor itself, fed hand-made losses: each decision is the README rule worked by hand.
# ------------------------------------------------------------------------------------------


def fed(factor: float, initial: float, *windows: float) -> DivergenceMonitor:
    monitor = DivergenceMonitor(factor)
    monitor.first_loss(initial)
    for loss in windows:
        assert monitor.train_window(loss) is None
    return monitor


def test_monitor_first_interval_held_with_a_single_window():
    """Rule by hand: 3.0 > 2 × 1.0 and 2.5 > 2, so every window of the interval is above."""
    assert fed(2.0, 1.0, 3.0, 2.5).evaluation(1.0) == "held_above_factor"
    assert fed(2.0, 1.0, 3.0).evaluation(1.0) == "held_above_factor"  # one window is a whole
    assert fed(2.0, 1.0, 3.0, 2.0).evaluation(1.0) is None  # 2.0 is not above 2 × 1.0
    # An evaluation closes the interval: the next one starts afresh, and one with no window
    # (as the evaluation at step 0) has nothing above the factor.
    monitor = fed(2.0, 1.0, 1.5)
    assert monitor.evaluation(1.0) is None
    assert monitor.evaluation(1.0) is None
    assert monitor.train_window(2.5) is None
    assert monitor.evaluation(1.0) == "held_above_factor"
    assert monitor.evaluation(1.0) is None


def test_monitor_compares_with_factor_times_a_first_loss_below_one_or_zero():
    """Rule by hand: 0.6 > 1.1 × 0.5 = 0.55 but 0.5 is not; any positive loss > 10 × 0."""
    assert fed(1.1, 0.5, 0.6).evaluation(0.4) == "held_above_factor"
    assert fed(1.1, 0.5, 0.5).evaluation(0.4) is None
    zero = fed(10.0, 0.0, 1e-6)
    assert zero.evaluation(0.0) == "held_above_factor"
    assert zero.max_spike == 1e-6 / 1e-12  # the guard's floor stands in for the 0 divisor


def test_monitor_max_spike_is_the_largest_window_ratio_or_one():
    """Ratios by hand: 3/2 and 2.5/2 -> 1.5; windows all below the first loss -> 1 (none)."""
    assert fed(10.0, 2.0, 3.0, 2.5, 1.0).max_spike == 1.5
    assert fed(10.0, 2.0, 1.5, 1.0).max_spike == 1.0


def test_monitor_non_finite_validation_loss_stops_at_once():
    """A non-finite validation loss is ``non_finite`` even in an interval not held."""
    for loss in (math.nan, math.inf):
        assert fed(2.0, 1.0, 1.0).evaluation(loss) == "non_finite"
    assert fed(2.0, 1.0).train_window(math.nan) == "non_finite"


def test_monitor_resumed_from_its_state_decides_as_by_hand():
    """A checkpoint in mid-interval (the trainer saves state_dict, a resume loads it): the
    resumed monitor keeps the first loss, the spike and the interval so far."""
    before = fed(2.0, 1.0, 3.0)  # the interval so far: one window at 3 × the first loss
    held = DivergenceMonitor(2.0)
    held.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert held.initial_loss == 1.0 and held.max_spike == 3.0
    assert held.train_window(2.5) is None
    assert held.evaluation(1.0) == "held_above_factor"  # 3 and 2.5 both above 2

    broken = DivergenceMonitor(2.0)
    broken.load_state_dict(fed(2.0, 1.0, 3.0, 1.5).state_dict())  # 1.5 is not above 2
    assert broken.train_window(2.5) is None
    assert broken.evaluation(1.0) is None
    assert broken.max_spike == 3.0


# ------------------------------------------------------------------------------------------
# validation_summary on hand-made metrics.csv rows; every figure is worked by hand.
# ------------------------------------------------------------------------------------------


def row(step: int, split: str, loss: float, metric: float = 0.5) -> dict[str, Any]:
    """A metrics.csv row as RunRecord.read_metrics returns it."""
    return {
        "step": step,
        "epoch": step / 4,
        "split": split,
        "loss": loss,
        "metric": metric,
        "lr": 0.1,
        "wall_time": float(step),
        "train_time": float(step),
        "curvature_passes": 0,
    }


def logged_run() -> list[dict[str, Any]]:
    """A run's rows in the trainer's order: val at 0, then per step a train row, and at the
    evaluation steps the val (every 4th) or val_subset row right after it."""
    val = {0: (2.5, 0.1), 4: (1.25, 0.6), 8: (0.5, 0.8), 12: (1.0, 0.7), 16: (0.75, 0.72)}
    rows = [row(0, "val", *val[0])]
    for step in range(1, 17):
        rows.append(row(step, "train", 2.0 - step / 16, 0.4))  # the last one: 1.0
        if step in val:
            rows.append(row(step, "val", *val[step]))
        elif step % 2 == 0:
            rows.append(row(step, "val_subset", 0.125, 0.99))  # lowest of all: never counts
    return rows


def test_validation_summary_of_a_run_by_hand():
    """Full val rows only: first (step 0), last, lowest, and the last 3 (0.5, 1.0, 0.75):
    mean 2.25 / 3 = 0.75, sample std sqrt((0.0625 + 0.0625 + 0) / 2) = 0.25."""
    summary = validation_summary(logged_run())
    assert summary == {
        "initial": {"val_loss": 2.5},
        "final": {"val_loss": 0.75, "val_metric": 0.72, "train_loss": 1.0, "step": 16},
        "best": {"val_loss": 0.5, "val_metric": 0.8, "step": 8},
        "last3": {"val_loss_mean": 0.75, "val_loss_std": 0.25, "n": 3},
    }
    assert LAST_WINDOW == 3 and statistics.stdev([0.5, 1.0, 0.75]) == 0.25


def test_validation_summary_of_a_diverged_run_by_hand():
    """A non-finite last evaluation: it is the final one and spoils the last-3 mean, but the
    best is the lowest finite loss; two evaluations after step 0 are the whole window."""
    rows = [row(0, "val", 2.0, 0.1), row(4, "train", 1.75), row(4, "val", 1.5, 0.3)]
    rows += [row(8, "train", math.inf), row(8, "val", math.nan, 0.0)]
    summary = validation_summary(rows)
    assert summary["initial"] == {"val_loss": 2.0}
    assert summary["best"] == {"val_loss": 1.5, "val_metric": 0.3, "step": 4}
    final = summary["final"]
    assert math.isnan(final.pop("val_loss")) and math.isinf(final.pop("train_loss"))
    assert final == {"val_metric": 0.0, "step": 8}
    last3 = summary["last3"]
    assert last3["n"] == 3 and math.isnan(last3["val_loss_mean"])
    assert math.isnan(last3["val_loss_std"])
    # Every evaluation non-finite: no best.
    none_finite = validation_summary([row(0, "val", math.inf), row(4, "val", math.nan)])
    assert none_finite["best"] == {"val_loss": None, "val_metric": None, "step": None}


def assert_nan_window(last3: dict[str, Any], n: int, mean: float | None = None) -> None:
    assert last3["n"] == n and math.isnan(last3["val_loss_std"])
    assert math.isnan(last3["val_loss_mean"]) if mean is None else last3["val_loss_mean"] == mean


def test_validation_summary_of_few_rows_by_hand():
    """No val rows: every figure None (nan for the window); one: its own mean, no std; a
    first evaluation after step 0 is no initial loss."""
    nothing = {"val_loss": None, "val_metric": None, "step": None}
    for rows, train_loss in (([], None), ([row(1, "train", 2.0), row(2, "val_subset", 1.5)], 2.0)):
        summary = validation_summary(rows)
        assert summary["initial"] == {"val_loss": None}
        assert summary["final"] == {**nothing, "train_loss": train_loss}
        assert summary["best"] == nothing
        assert_nan_window(summary["last3"], 0)

    one = validation_summary([row(0, "val", 2.25, 0.2)])
    assert one["initial"] == {"val_loss": 2.25} and one["best"]["step"] == 0
    assert_nan_window(one["last3"], 1, mean=2.25)

    late = validation_summary([row(4, "train", 1.0), row(4, "val", 1.5), row(8, "val", 1.0)])
    assert late["initial"] == {"val_loss": None}
    assert late["last3"]["val_loss_mean"] == 1.25 and late["last3"]["n"] == 2
    assert late["last3"]["val_loss_std"] == math.sqrt(2 * 0.25**2 / 1)
