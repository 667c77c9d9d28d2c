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
