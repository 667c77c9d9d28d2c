"""The verdict statistics against independent computations: brute force, hand-worked Holm,
a profile area counted by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lehi.results import verdicts as V


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_expected_best_equals_the_mean_over_every_k_subset(k):
    values = [0.9, 0.31, 0.5, 2.3, 0.31]  # a tie, and a diverged LR scored at its start
    subsets = list(itertools.combinations(values, k))
    brute = sum(min(s) for s in subsets) / len(subsets)
    assert V.expected_best(values, k) == pytest.approx(brute, rel=1e-12)


def test_expected_best_refuses_a_budget_outside_the_grid():
    with pytest.raises(ValueError, match="k=4 must be between 1"):
        V.expected_best([1.0, 2.0, 3.0], 4)


def test_holm_matches_a_hand_computed_case():
    # sorted p: 0.01, 0.02, 0.04, 0.3 → ×4, ×3, ×2, ×1 = 0.04, 0.06, 0.08, 0.3, then running max
    p = [0.04, 0.01, 0.3, 0.02]
    np.testing.assert_allclose(V.holm(p), [0.08, 0.04, 0.3, 0.06])
    assert math.isnan(V.holm([0.01, math.nan])[1]) and V.holm([0.01, math.nan])[0] == 0.01


def test_profile_area_of_hand_made_ratios():
    # ρ(τ) over τ ∈ [1, 4] for ratios 1 (best), 2, and a failure: (3 + 2 + 0) / 3 / 3
    assert V.profile_area([1.0, 2.0, math.inf]) == pytest.approx(5 / 9)
    assert V.profile_area([1.0, 1.0]) == 1.0
    assert V.profile_area([4.0, 9.0, math.inf]) == 0.0


def test_compare_counts_a_diverged_run_as_the_worst_and_reports_power():
    cand = np.array([0.10, 0.11, 0.12, 0.13, np.inf])
    base = np.array([0.20, 0.21, 0.22, 0.23, 0.24])
    row = V.compare(cand, base)
    assert row["n_diverged"] == 1 and row["candidate_mean"] == pytest.approx(0.115)
    # 4 of the candidate's 5 runs beat all 5 baseline runs; the diverged one beats none.
    assert row["p_improvement"] == pytest.approx(20 / 25)
    assert row["ci_low"] < row["mean_diff"] < row["ci_high"] < 0
    # Power: with n = 4 and 5 and this spread, the detectable difference is a few pooled sds.
    pooled = math.sqrt((3 * np.var(cand[:4], ddof=1) + 4 * np.var(base, ddof=1)) / 7)
    assert 1.5 * pooled < row["detectable"] < 3 * pooled


def test_verdicts_and_figures_from_hand_made_tuning_and_confirmation_runs(tmp_path):
    from helpers.results import write_run

    from lehi.results import collect
    from lehi.results.verdict_report import render_markdown
    from plots import verdicts as P

    root = tmp_path / "results"
    for seed in (0, 1):  # tuning: the best LR is 1e-2 for both
        for name in ("adam", "lehi"):
            write_run(root, name, 1e-3, seed, 0.5, experiment="toy")
            write_run(root, name, 1e-2, seed, 0.3, experiment="toy")
    for seed in range(2, 10):  # confirmation: LEHI clearly lower on every fresh seed
        write_run(root, "adam", 1e-2, seed, 0.30 + seed / 1000, experiment="confirm_toy")
        write_run(root, "lehi", 1e-2, seed, 0.20 + seed / 1000, experiment="confirm_toy")
    results = collect(root)
    table = V.verdict_table(results)
    row = table.set_index(["candidate", "baseline"]).loc[("lehi", "adam")]
    assert row["verdict"] == "better" and row["p_improvement"] == 1.0 and row["n"] == 8
    budget = V.tuning_budget(results, draws=50)
    adam = budget[budget["reading"] == "adam"].set_index("k")
    assert adam.loc[2, "expected_best"] < adam.loc[1, "expected_best"]
    paths = P.make(results, tmp_path / "figures")
    names = {p.name for p in paths}
    assert {"tuning_budget_toy.png", "performance_profile.png"} <= names
    assert "| toy | LEHI | Adam |" in render_markdown(results)
