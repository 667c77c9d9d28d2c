"""Each early-stop reason of the divergence rule, on a real run built to reach it, at its edge.

README, "Divergence": a run is diverged when every training-loss window of a whole
evaluation interval stays above ``trainer.divergence_factor`` × the first step's loss
(``held_above_factor``), or when a training-loss window turns non-finite (``non_finite``,
at once, without waiting for the interval to end). The expected outcome is computed here
from the recorded rows with that rule, independently of lehi.divergence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from conftest import compose_config

from lehi.record import find_runs
from lehi.runner import run

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
