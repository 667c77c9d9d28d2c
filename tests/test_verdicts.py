"""The verdict statistics against independent computations: brute force, hand-worked Holm,
a profile area counted by hand, Welch's test and the noncentral-t power worked out here,
scipy's bootstrap and Mann–Whitney called directly, and results trees written by hand whose
tables follow from the bases (tests/helpers/results.py)."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pandas.testing as pd_testing
import pytest
from helpers.results import EVAL_STEPS, OFFSETS
from scipy import optimize, stats

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


# ------------------------------------------------------------------ independent references
def _welch_p(x, y):
    """Welch's two-sided p by hand: t over the unpooled standard error, Welch–Satterthwaite df."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    return 2 * stats.t.sf(abs(t), df)


def _p_improvement(cand, base):
    """P(candidate < baseline) counted over every pair, ties (inf against inf) as one half."""
    pairs = [(c, b) for c in cand for b in base]
    return sum((b > c) + 0.5 * (b == c) for c, b in pairs) / len(pairs)


def _holm(p):
    """Holm by hand: the i-th smallest of m p-values × (m − i), then a running maximum."""
    order = np.argsort(p)
    out, running = np.empty(len(p)), 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (len(p) - i) * p[j]))
        out[j] = running
    return out


def _detectable(a, b):
    """The effect d with power 0.8 of a two-sided t-test at α = 0.05 (noncentral t, solved by
    root finding), times the pooled standard deviation worked from sums of squares."""
    n1, n2 = len(a), len(b)
    df = n1 + n2 - 2
    crit = stats.t.isf(0.025, df)

    def power(d):
        nc = d * math.sqrt(n1 * n2 / (n1 + n2))
        return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)

    effect = optimize.brentq(lambda d: power(d) - 0.8, 0.01, 8.0)
    ss = sum((x - np.mean(a)) ** 2 for x in a) + sum((x - np.mean(b)) ** 2 for x in b)
    return effect * math.sqrt(ss / df)


def _scipy_bca(a, b):
    """The documented interval: scipy's BCa bootstrap, 9,999 resamples, 95 %, seed 0."""
    res = stats.bootstrap(
        (a, b),
        lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
        n_resamples=9999,
        confidence_level=0.95,
        method="BCa",
        rng=np.random.default_rng(0),
    )
    return res.confidence_interval.low, res.confidence_interval.high


def _edit_summary(run, **fields):
    """Add fields to a run's summary.json (write_run records no initial loss)."""
    path = run / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return run


def _initial(run, loss):
    return _edit_summary(run, initial={"val_loss": loss})


def _first_reach(base, target):
    """Hand rule: the first evaluation whose loss base + offset is ≤ target (inf: never)."""
    hits = [s for s, o in zip(EVAL_STEPS, OFFSETS, strict=True) if base + o <= target]
    return float(hits[0]) if hits else math.inf


# ---------------------------------------------------------------------------- compare()
def test_detectable_difference_solves_the_noncentral_t_power_equation():
    """Against the power equation solved here (noncentral t, root finding) × the pooled sd."""
    # unequal sizes and spreads: the ratio of the sizes and each sample's own weight matter
    a = np.array([0.30, 0.34, 0.29, 0.41])
    b = np.array([0.50, 0.52, 0.49, 0.51, 0.53, 0.58, 0.47])
    assert V.detectable_difference(a, b) == pytest.approx(_detectable(a, b), rel=1e-6)
    assert V.detectable_difference(b, a) == pytest.approx(_detectable(b, a), rel=1e-6)
    # two seeds a side is the smallest design with a spread
    two = np.array([0.2, 0.25]), np.array([0.4, 0.31])
    assert V.detectable_difference(*two) == pytest.approx(_detectable(*two), rel=1e-6)


@pytest.mark.parametrize("a", [[], [0.3]])
def test_detectable_difference_needs_two_values_a_side(a):
    """Fewer than two values on a side have no spread: NaN, without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(V.detectable_difference(np.array(a), np.array([0.4, 0.5, 0.45])))
        assert math.isnan(V.detectable_difference(np.array([0.4, 0.5, 0.45]), np.array(a)))


def test_compare_small_samples_against_welch_and_scipy_bca_by_hand():
    """Two seeds a side: Welch's p by hand, the BCa interval from scipy called as documented,
    the detectable difference from the noncentral t."""
    cand, base = np.array([0.30, 0.40]), np.array([0.50, 0.75])
    row = V.compare(cand, base)
    assert row["welch_p"] == pytest.approx(_welch_p(cand, base), rel=1e-9)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(_scipy_bca(cand, base), rel=1e-12)
    assert row["detectable"] == pytest.approx(_detectable(cand, base), rel=1e-6)
    assert row["mean_diff"] == pytest.approx(0.35 - 0.625)
    assert row["p_improvement"] == 1.0


@pytest.mark.parametrize(
    ("cand", "base"),
    [
        # a general case: the seed, the resample count and the statistic all show
        ([0.31, 0.35, 0.29, 0.40, 0.33], [0.41, 0.38, 0.45, 0.39, 0.50, 0.42]),
        # one constant side still has an interval (the other side has spread 1)
        ([0.3, 0.3, 0.3], [0.0, 0.5, 1.0]),
        ([0.0, 1.0, 0.25], [0.6, 0.6, 0.6, 0.6]),
    ],
)
def test_bootstrap_interval_is_scipys_bca_with_the_documented_settings(cand, base):
    """Against scipy.stats.bootstrap called here as the module docstring specifies."""
    row = V.compare(np.array(cand), np.array(base))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(_scipy_bca(cand, base), rel=1e-12)
    assert row["ci_low"] < np.mean(cand) - np.mean(base) < row["ci_high"]


@pytest.mark.parametrize(
    ("cand", "base"),
    [([0.1, 0.2, 0.3], [0.5]), ([0.5], [0.1, 0.2, 0.3]), ([0.2, 0.2], [0.4, 0.4, 0.4])],
)
def test_no_interval_without_two_values_a_side_or_any_spread(cand, base):
    """One value on a side, or no spread on either: no interval (scipy would refuse or NaN)."""
    row = V.compare(np.array(cand), np.array(base))
    assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])


def test_compare_with_every_run_of_one_side_diverged_is_quiet_and_nan():
    """All diverged: no mean, no interval, no Welch test (and no warning); the rank statistics
    still count every pair (brute force) and agree with scipy's Mann–Whitney."""
    finite, diverged = np.array([0.30, 0.31, 0.32]), np.full(3, np.inf)
    for cand, base in ((diverged, finite), (finite, diverged)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            row = V.compare(cand, base)
        assert row["n_diverged"] == sum(x == math.inf for x in cand)
        assert row["n_diverged_baseline"] == sum(x == math.inf for x in base)
        for key in ("mean_diff", "ci_low", "ci_high", "welch_p", "detectable"):
            assert math.isnan(row[key]), key
        assert row["p_improvement"] == _p_improvement(cand, base)
        assert row["mwu_p"] == stats.mannwhitneyu(base, cand).pvalue
    assert math.isnan(V.compare(diverged, finite)["candidate_mean"])
    assert math.isnan(V.compare(finite, diverged)["baseline_mean"])


def test_compare_without_runs_on_one_side():
    """No runs at all on one side: the counts, and NaN for all that needs both sides."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = V.compare(np.array([]), np.array([0.3, 0.4]))
    assert row["n"] == 0 and row["n_baseline"] == 2 and row["baseline_mean"] == 0.35
    for key in ("candidate_mean", "mean_diff", "p_improvement", "welch_p", "mwu_p"):
        assert math.isnan(row[key]), key


def test_compare_with_one_finite_run_has_no_welch_test():
    """One finite value: no Welch test (NaN, quietly); P(improvement) counted over pairs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = V.compare(np.array([0.3, np.inf]), np.array([0.5, 0.7, 0.6]))
    assert math.isnan(row["welch_p"]) and row["candidate_mean"] == 0.3
    assert row["p_improvement"] == pytest.approx(_p_improvement([0.3, np.inf], [0.5, 0.7, 0.6]))


@pytest.mark.parametrize(
    ("p_holm", "p_improvement", "word"),
    [
        (0.01, 0.9, "better"),
        (0.01, 0.1, "worse"),
        (0.01, 0.5, "no detectable difference"),  # significant but a coin flip: no side
        (0.05, 0.9, "no detectable difference"),  # p must be below α = 0.05
        (0.2, 0.7, "no detectable difference"),
        (math.nan, 0.9, "no detectable difference"),
    ],
)
def test_verdict_word_follows_the_documented_rule(p_holm, p_improvement, word):
    """The module docstring's rule: Holm p < 0.05 and P(improvement) ≠ 0.5 pick a side."""
    assert V._word(p_holm, p_improvement) == word


# ------------------------------------------------------------------------ verdict_table()
def test_verdict_table_counts_diverged_runs_and_holm_corrects_over_the_table(tmp_path):
    """Losses listed by hand (a diverged run is inf, a failed run is left out); each row's
    P(improvement) counted over pairs, Welch's p by hand, Mann–Whitney p from scipy, and both
    Holm-corrected by hand over the four rows of the table."""
    from helpers.results import write_run

    from lehi.results import collect

    root, exp = tmp_path / "results", "confirm_toy"
    adam = [0.30, 0.31, 0.32, 0.33, 0.34, 0.35]
    for seed, base in enumerate(adam):
        write_run(root, "adam", 1e-2, seed, base, experiment=exp)
    # lehi has no confirmation runs: lehibrid and lehi_update_clip still get rows
    for seed, base in enumerate([0.20, 0.21, 0.22]):
        write_run(root, "lehibrid", 1e-2, seed, base, experiment=exp)
    write_run(root, "lehibrid", 1e-2, 3, None, experiment=exp)  # stopped: diverged
    # ran to the end but its last evaluation (0.14) is above its start (0.1): diverged
    _initial(write_run(root, "lehibrid", 1e-2, 4, 0.19, experiment=exp), 0.1)
    write_run(root, "lehibrid", 1e-2, 5, None, status="failed", experiment=exp)
    clip = [0.50, 0.51, 0.52, 0.53, 0.54, 0.55]
    for seed, base in enumerate(clip):
        write_run(root, "lehi_update_clip", 1e-2, seed, base, experiment=exp)
    sophia = [0.25, 0.26, 0.27]
    for seed, base in enumerate(sophia):
        write_run(root, "sophia", 1e-2, seed, base, experiment=exp)
    write_run(root, "sophia", 1e-2, 3, None, experiment=exp)

    table = V.verdict_table(collect(root))
    losses = {
        "adam": adam,
        "sophia": [*sophia, math.inf],
        "lehibrid": [0.20, 0.21, 0.22, math.inf, math.inf],
        "lehi_update_clip": clip,
    }
    keys = [(c, b) for c in ("lehibrid", "lehi_update_clip") for b in ("adam", "sophia")]
    assert list(zip(table["candidate"], table["baseline"], strict=True)) == keys
    assert set(table["workload"]) == {"toy"}
    mwu = [stats.mannwhitneyu(losses[b], losses[c]).pvalue for c, b in keys]
    finite = {k: [x for x in v if math.isfinite(x)] for k, v in losses.items()}
    welch = [_welch_p(finite[c], finite[b]) for c, b in keys]
    for i, (c, b) in enumerate(keys):
        row = table.iloc[i]
        fin_c, fin_b = finite[c], finite[b]
        assert row["n"] == len(losses[c]) and row["n_baseline"] == len(losses[b])
        assert row["n_diverged"] == len(losses[c]) - len(fin_c)
        assert row["n_diverged_baseline"] == len(losses[b]) - len(fin_b)
        assert row["candidate_mean"] == pytest.approx(np.mean(fin_c))
        assert row["baseline_mean"] == pytest.approx(np.mean(fin_b))
        assert row["p_improvement"] == pytest.approx(_p_improvement(losses[c], losses[b]))
        assert row["mwu_p"] == pytest.approx(mwu[i], rel=1e-9)
        assert row["welch_p"] == pytest.approx(welch[i], rel=1e-6)
    np.testing.assert_allclose(table["mwu_p_holm"], _holm(mwu), rtol=1e-9)
    np.testing.assert_allclose(table["welch_p_holm"], _holm(welch), rtol=1e-6)
    # lehi_update_clip loses every pair against Adam: exact p = 2 / C(12, 6), × 4 rows by Holm
    assert table.iloc[2]["mwu_p_holm"] == pytest.approx(4 * 2 / math.comb(12, 6))
    assert list(table["verdict"]) == [
        "no detectable difference",
        "no detectable difference",
        "worse",
        "no detectable difference",
    ]


def test_an_ablations_nominee_is_judged_against_the_workloads_confirmed_baselines(tmp_path):
    """confirm_ablation_toy's runs join confirm_toy's: one workload, one more candidate, and
    the Holm correction runs over its rows too."""
    from helpers.results import write_run

    from lehi.results import collect

    root = tmp_path / "results"
    adam, lehi, eps = [0.30, 0.31, 0.32, 0.33], [0.35, 0.36, 0.37, 0.38], [0.2, 0.21, 0.22, 0.23]
    for seed, (a, b) in enumerate(zip(adam, lehi, strict=True), start=2):
        write_run(root, "adam", 1e-2, seed, a, experiment="confirm_toy")
        write_run(root, "lehi", 1e-3, seed, b, experiment="confirm_toy")
    for seed, base in enumerate(eps, start=2):
        write_run(root, "lehi_eps_inside", 3e-3, seed, base, experiment="confirm_ablation_toy")

    results = collect(root)
    assert V.workloads(results) == ["toy"]
    table = V.verdict_table(results)
    assert list(zip(table["workload"], table["candidate"], table["baseline"], strict=True)) == [
        ("toy", "lehi", "adam"),
        ("toy", "lehi_eps_inside", "adam"),
    ]
    row = table.iloc[1]
    assert row["n"] == row["n_baseline"] == 4
    assert row["mean_diff"] == pytest.approx(np.mean(eps) - np.mean(adam))
    assert row["p_improvement"] == 1.0
    mwu = [stats.mannwhitneyu(adam, x).pvalue for x in (lehi, eps)]
    np.testing.assert_allclose(table["mwu_p_holm"], _holm(mwu), rtol=1e-9)


def test_holm_of_integer_p_values_is_a_float_array():
    # p = 1 and p = 0 written as ints: Holm leaves them (0 × 3 = 0, 1 capped at 1), as floats
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = V.holm([1, 0, 1])
    assert out.dtype == np.float64 and out.tolist() == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------ performance profiles
def test_profile_area_integrates_the_step_function_numerically():
    """ρ(τ) = fraction of ratios ≤ τ, integrated over [1, r_max] on a fine grid; a ratio below
    1 counts from τ = 1 on, like a ratio of 1."""
    for ratios, r_max in (([0.5, 2.0, 3.5], 4.0), ([1.0, 1.5, math.inf, 2.5], 2.0)):
        tau = np.linspace(1.0, r_max, 300_001)
        rho = np.mean(np.asarray(ratios)[:, None] <= tau[None, :], axis=0)
        area = np.trapezoid(rho, tau) / (r_max - 1.0)
        assert V.profile_area(ratios, r_max) == pytest.approx(area, abs=1e-4)


def test_profiles_ratio_to_the_best_per_workload_for_time_and_steps():
    """Ratios worked by hand from a made-up times table: each workload's best reading has
    ratio 1, a reading that never reached the target (inf) or has no runs (absent) ratio inf,
    and the score is Σ (4 − min(ratio, 4)) / 3 / workloads."""
    import pandas as pd

    inf = math.inf
    times = pd.DataFrame(
        [
            # workload, reading, seconds, steps (the workloads' scales differ 100-fold)
            ("w1", "adam", 10.0, 100.0),
            ("w1", "lehi", 20.0, 50.0),
            ("w1", "sophia", inf, inf),
            ("w2", "adam", 3000.0, 3000.0),
            ("w2", "lehi", 1000.0, 2000.0),
            ("w2", "sophia", 2500.0, 1500.0),
            ("w3", "adam", 150.0, 400.0),
            ("w3", "lehi", 100.0, 100.0),
        ],
        columns=["workload", "reading", "seconds_to_target", "steps_to_target"],
    )
    out = V.profiles(times).set_index(["measure", "reading"])
    expected = {
        ("time", "adam"): [1.0, 3.0, 1.5],
        ("time", "lehi"): [2.0, 1.0, 1.0],
        ("time", "sophia"): [inf, 2.5, inf],  # w3: no sophia runs
        ("steps", "adam"): [2.0, 2.0, 4.0],
        ("steps", "lehi"): [1.0, 4 / 3, 1.0],
        ("steps", "sophia"): [inf, 1.0, inf],
    }
    assert sorted(out.index) == sorted(expected)
    for key, ratios in expected.items():
        assert out.loc[key, "ratios"] == pytest.approx(dict(zip(["w1", "w2", "w3"], ratios)))
        area = sum(4 - min(r, 4) for r in ratios) / 3 / 3
        assert out.loc[key, "score"] == pytest.approx(area), key
    # by hand: time adam (3 + 1 + 2.5) / 9, steps adam (2 + 2 + 0) / 9
    assert out.loc[("time", "adam"), "score"] == pytest.approx(6.5 / 9)
    assert out.loc[("steps", "adam"), "score"] == pytest.approx(4 / 9)


def _step_cost(root, experiment, ms):
    """A step_cost.json in lehi.results.stepcost's format with given per-repeat ms/step."""
    from lehi.results import stepcost

    optimizers = {k: {"name": k, "ms_per_step": v} for k, v in ms.items()}
    data = {"format": stepcost.FORMAT, "experiment": experiment, "optimizers": optimizers}
    stepcost.write(stepcost.path_for(root, experiment), data)


def test_time_to_target_from_hand_made_confirmation_runs(tmp_path):
    """Steps to target by the hand rule (first evaluation with base + offset ≤ 1.05 × the
    median Adam loss), the median over seeds, × the median ms/step of step_cost.json."""
    from helpers.results import write_run

    from lehi.results import collect

    root, exp = tmp_path / "results", "confirm_toy"
    # the tuning sweep (its step_cost.json is the workload's); its runs are not judged
    for seed in (0, 1):
        write_run(root, "adam", 1e-2, seed, 0.2, experiment="toy")
        write_run(root, "lehi", 1e-2, seed, 0.2, experiment="toy")
    _step_cost(
        root,
        "toy",
        {
            "adam": [10.0, 12.0, 11.0],
            "lehi": [20.0, 26.0, 22.0],
            "lehibrid": [15.0, 17.0, 15.0],
            "sophia": [11.0, 13.0, 12.0],
        },
    )
    ms = {"adam": 11.0, "lehi": 22.0, "lehibrid": 15.0, "sophia": 12.0, "lehi_update_clip": 22.0}
    # Adam's median final loss is 2.0, so the target is 2.1; the 2.4 seed never gets there
    bases = {
        "adam": [1.6, 2.0, 2.4],
        "lehi": [1.0, 1.2],  # + a seed that reached the target, then diverged (below)
        "lehibrid": [1.95],  # one seed, at the target exactly at step 20: 1.95 + 0.15 == 2.1
        "sophia": [None, None],  # both diverged
        "lehi_update_clip": [1.4, 1.9, 2.6],  # LEHI with an option: LEHI's step cost
    }  # no adamw runs
    for reading, values in bases.items():
        for seed, base in enumerate(values):
            run = write_run(root, reading, 1e-2, seed, base, experiment=exp)
            if reading == "lehi_update_clip":
                _edit_summary(run, optimizer_name="lehi")
    # completed, but its last evaluation (1.05) is above its start (0.9): diverged
    _initial(write_run(root, "lehi", 1e-2, 2, 1.1, experiment=exp), 0.9)
    # the ablation's nominee is judged on this workload but not profiled (no other workload
    # confirms it, so it would count as failing there)
    write_run(root, "lehi_eps_inside", 1e-2, 0, 1.0, experiment="confirm_ablation_toy")
    # a workload (sorted first) whose Adam median diverged has no target: no rows
    write_run(root, "adam", 1e-2, 0, 0.5, experiment="confirm_a_bad")
    for seed in (1, 2):
        write_run(root, "adam", 1e-2, seed, None, experiment="confirm_a_bad")

    times = V.time_to_target(collect(root)).set_index("reading")
    assert set(times["workload"]) == {"toy"}
    assert list(times.index) == ["adam", "lehi", "lehibrid", "sophia", "lehi_update_clip"]
    target = 1.05 * 2.0
    assert 1.95 + 0.15 == target  # the lehibrid seed's second evaluation, in floating point
    assert times["target"].to_numpy() == pytest.approx([target] * 5, rel=1e-12)
    steps = {r: [_first_reach(b, target) if b else math.inf for b in v] for r, v in bases.items()}
    steps["lehi"].append(math.inf)  # the diverged seed counts as never reaching it
    assert steps["adam"] == [10.0, 30.0, math.inf] and steps["lehi"] == [10.0, 10.0, math.inf]
    assert steps["lehibrid"] == [20.0]
    for reading, s in steps.items():
        row = times.loc[reading]
        assert row["n_seeds"] == len(s)
        assert row["n_reached"] == sum(math.isfinite(x) for x in s)
        assert row["steps_to_target"] == np.median(s)
        assert row["seconds_to_target"] == pytest.approx(np.median(s) * ms[reading] / 1000)
    assert times.loc["sophia", "seconds_to_target"] == math.inf


# ------------------------------------------------------------------------ tuning budget
def _expected_min(values, k):
    """E[min of k of ``values`` drawn without replacement], averaged over every k-subset."""
    subsets = list(itertools.combinations(values, k))
    return sum(min(s) for s in subsets) / len(subsets)


def test_tuning_budget_scores_trials_from_the_tuning_and_ablation_sweeps(tmp_path):
    """Per-LR losses listed by hand (a diverged seed scores its initial loss, a failed run is
    left out, lehi_update_clip comes from ablation_<exp>); the expected best by brute force
    over LR subsets, the band inside the range of the enumerated bootstrap distribution."""
    from helpers.results import write_run

    from lehi.results import collect

    root = tmp_path / "results"
    write_run(root, "adam", 1e-2, 0, 0.9, experiment="confirm_toy")  # not a tuning trial
    trials = {  # reading -> {lr: per-seed losses as the trial scores them}
        "adam": {1e-3: [0.60, 0.62], 1e-2: [0.50, 0.54]},
        "lehi": {1e-3: [0.40, 2.3], 1e-2: [0.30, 0.28]},
        "sophia": {1e-3: [0.70]},
        "lehi_update_clip": {1e-3: [0.45, 0.47], 1e-2: [0.50]},
    }  # no adamw
    for reading in ("adam", "sophia"):
        for lr, losses in trials[reading].items():
            for seed, base in enumerate(losses):
                write_run(root, reading, lr, seed, base, experiment="toy")
    write_run(root, "lehi", 1e-3, 0, 0.40, experiment="toy")
    _initial(write_run(root, "lehi", 1e-3, 1, None, experiment="toy"), 2.3)  # stopped
    write_run(root, "lehi", 1e-2, 0, 0.30, experiment="toy")
    # completed (last3 mean 0.35) with its last evaluation 0.30 above its start 0.28: diverged
    _initial(write_run(root, "lehi", 1e-2, 1, 0.35, experiment="toy"), 0.28)
    _initial(write_run(root, "lehi", 1e-1, 0, None, status="failed", experiment="toy"), 0.25)
    for lr, losses in trials["lehi_update_clip"].items():
        for seed, base in enumerate(losses):
            write_run(root, "lehi_update_clip", lr, seed, base, experiment="ablation_toy")

    budget = V.tuning_budget(collect(root), draws=200)
    assert set(budget["workload"]) == {"toy"}
    assert list(dict.fromkeys(budget["reading"])) == list(trials)
    for reading, by_lr in trials.items():
        rows = budget[budget["reading"] == reading].set_index("k")
        source = "ablation_toy" if reading == "lehi_update_clip" else "toy"
        assert set(rows["tuning_experiment"]) == {source}
        means = [float(np.mean(v)) for v in by_lr.values()]
        assert list(rows.index) == list(range(1, len(means) + 1))
        assert set(rows["n_lrs"]) == {len(means)}
        for k in rows.index:
            assert rows.loc[k, "expected_best"] == pytest.approx(_expected_min(means, k))
            # one seed per LR: every bootstrap sample is one of these
            support = [_expected_min(s, k) for s in itertools.product(*by_lr.values())]
            assert min(support) - 1e-12 <= rows.loc[k, "low"] <= rows.loc[k, "high"]
            assert rows.loc[k, "high"] <= max(support) + 1e-12


def test_tuning_budget_band_is_the_2_5_and_97_5_percentile_of_the_bootstrap(tmp_path):
    """Three LRs with 2, 5 and 10 seeds: 100 equally likely one-seed-per-LR samples, whose
    means (k = 1) are all different. Enumerated, the 2.5 % quantile is the 3rd smallest and
    the 97.5 % quantile the 98th (each 0.5 % from the next); 20,000 draws find them."""
    from helpers.results import write_run

    from lehi.results import collect

    root = tmp_path / "results"
    write_run(root, "adam", 1e-2, 0, 0.9, experiment="confirm_toy")
    by_lr = {
        1e-4: [1.0, 1.1],
        1e-3: [0.60, 0.61, 0.62, 0.63, 0.64],
        1e-2: [0.300 + i / 1000 for i in range(10)],
    }
    for lr, losses in by_lr.items():
        for seed, base in enumerate(losses):
            write_run(root, "adam", lr, seed, base, experiment="toy")
    results = collect(root)

    budget = V.tuning_budget(results, draws=20_000).set_index("k")
    support = sorted(np.mean(s) for s in itertools.product(*by_lr.values()))
    assert len(set(np.round(support, 9))) == 100
    assert budget.loc[1, "low"] == pytest.approx(support[2], abs=1e-9)
    assert budget.loc[1, "high"] == pytest.approx(support[97], abs=1e-9)
    means = [float(np.mean(v)) for v in by_lr.values()]
    for k in (1, 2, 3):
        assert budget.loc[k, "expected_best"] == pytest.approx(_expected_min(means, k))


def test_tuning_budget_band_default_draws_and_a_seed_per_workload_and_reading(tmp_path):
    """As documented: 2,000 draws by default (the same table as asking for 2,000), seeded per
    workload and reading, so adding a workload (sorted first) and a reading (drawn first)
    leaves the band as it was. Ten seeds per LR of spread-out losses make the bootstrap
    distribution nearly continuous, so another number of draws or seed moves the band."""
    from helpers.results import write_run

    from lehi.results import collect

    root = tmp_path / "results"
    write_run(root, "adam", 1e-2, 0, 0.9, experiment="confirm_toy")
    losses = np.random.default_rng(1).uniform(0.3, 0.5, size=(3, 10))
    for lr, row in zip((1e-4, 1e-3, 1e-2), losses, strict=True):
        for seed, base in enumerate(row):
            write_run(root, "lehi", lr, seed, float(base), experiment="toy")
    results = collect(root)
    before = V.tuning_budget(results)
    pd_testing.assert_frame_equal(before, V.tuning_budget(results, draws=2000))

    write_run(root, "adam", 1e-2, 0, 0.9, experiment="confirm_abc")
    for lr, row in zip((1e-4, 1e-3, 1e-2), losses, strict=True):
        for seed, base in enumerate(row):
            write_run(root, "lehi", lr, seed, float(base), experiment="abc")
            write_run(root, "adam", lr, seed, float(base) + 0.1, experiment="toy")
    after = V.tuning_budget(collect(root))
    assert sorted(set(zip(after["workload"], after["reading"]))) == [
        ("abc", "lehi"),
        ("toy", "adam"),
        ("toy", "lehi"),
    ]
    again = after[(after["workload"] == "toy") & (after["reading"] == "lehi")]
    pd_testing.assert_frame_equal(again.reset_index(drop=True), before)
