"""probe.uncertainty against closed forms, published worked examples and brute force."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from probe.uncertainty import (Comparison, adjust, holm, mean_interval, paired_comparison, proportion_interval,
                               proportions_comparison, sign_flip_p)


def test_mean_interval_is_students_t():
    x = np.array([2.1, 3.4, 1.9, 5.0, 4.2, 3.3])
    e = mean_interval(x)
    se = x.std(ddof=1) / math.sqrt(len(x))
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=se)
    assert e.value == pytest.approx(x.mean()) and (e.low, e.high) == pytest.approx((lo, hi))
    assert e.n == 6 and e.method == "t"


def test_mean_interval_of_one_value_has_no_bounds_and_json_has_nulls():
    e = mean_interval([0.7])
    assert e.value == 0.7 and math.isnan(e.low) and math.isnan(e.high)
    assert e.to_dict()["low"] is None and e.to_dict()["value"] == 0.7


def test_wilson_matches_the_published_values():
    # Brown, Cai & DasGupta (2001) / Wilson (1927): 0 of 10 -> [0, 0.2775]; 81 of 263 -> [0.2553, 0.3662] (Newcombe 1998 table I)
    e = proportion_interval(0, 10)
    assert (e.low, e.high) == pytest.approx((0.0, 0.2775), abs=1e-4)
    e = proportion_interval(81, 263)
    assert (e.low, e.high) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    for n in range(1, 60):  # the bounds hold k/n exactly at the ends (no 1 - 1e-16 above a share of 1)
        assert proportion_interval(n, n).high == 1.0 and proportion_interval(0, n).low == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        proportion_interval(3, 2)


def test_newcombe_difference_matches_the_paper():
    # Newcombe (1998), table II example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    c = proportions_comparison(56, 70, 48, 80)
    assert c.effect == pytest.approx(0.2)
    assert (c.low, c.high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert c.p == pytest.approx(stats.fisher_exact([[56, 14], [48, 32]]).pvalue)


def test_sign_flip_p_exact_equals_brute_force():
    d = np.array([0.3, -0.1, 0.45, 0.2, 0.05, -0.02, 0.31])
    hits = sum(abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in itertools.product((1, -1), repeat=len(d)))
    assert sign_flip_p(d) == pytest.approx(hits / 2 ** len(d))
    # all positive with n = 5: only the all-plus and all-minus patterns are as extreme
    assert sign_flip_p(np.ones(5)) == pytest.approx(2 / 32)


def test_sign_flip_p_monte_carlo_is_close_to_the_exact_value():
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, 24)
    # the exact value via the normal approximation is not exact; compare to a large Monte Carlo instead
    p1 = sign_flip_p(d, resamples=20_000, seed=0)
    p2 = sign_flip_p(d, resamples=20_000, seed=1)
    assert abs(p1 - p2) < 0.02 and 0 < p1 <= 1


def test_paired_comparison_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 16)
    c = paired_comparison(a + 1.0, a)
    assert c.effect == pytest.approx(1.0) and c.p < 0.001 and c.distinguishable()
    calls = [paired_comparison(rng.normal(0, 1, 16), rng.normal(0, 1, 16), seed=s).distinguishable() for s in range(40)]
    assert sum(calls) <= 6  # about 5% false positives (2 expected of 40)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1, 2], [1])


def test_holm_matches_the_hand_worked_example():
    # p sorted: 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, max(0.03, 2*0.03), max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm([0.2, float("nan")])[1]) and holm([0.2, float("nan")])[0] == pytest.approx(0.2)
    cs = adjust([Comparison(1, 0.5, 2, 0.02, 5, "t"), Comparison(1, 0.5, 2, 0.04, 5, "t")])
    assert [c.p_adjusted for c in cs] == pytest.approx([0.04, 0.04])
    assert cs[0].to_dict()["distinguishable"] is True
    assert Comparison(1, 0.5, 2, 0.02, 5, "t", p_adjusted=0.2).distinguishable() is False


def test_a_verdict_needs_both_the_test_and_the_interval():
    # six pairs of one sign: exact sign-flip p = 2/64 < 0.05, but the t interval of these differences covers 0
    c = paired_comparison([0.1, 0.2, 0.15, 3.0, 0.05, 2.5], [0.0] * 6)
    assert c.p == pytest.approx(2 / 64) and c.low < 0 < c.high
    assert not c.distinguishable() and c.to_dict()["distinguishable"] is False
    assert Comparison.from_dict(c.to_dict()) == c
    tight = paired_comparison([1.0, 1.1, 0.9, 1.05, 0.95, 1.0], [0.0] * 6)
    assert tight.low > 0 and tight.distinguishable()


def test_se_interval_is_the_t_interval_of_a_mean_given_its_standard_error():
    from probe.uncertainty import mean_interval, se_interval

    x = np.random.default_rng(3).normal(0.7, 0.1, 9)
    want = mean_interval(x)
    got = se_interval(float(x.mean()), float(x.std(ddof=1) / np.sqrt(9)), 8)
    assert (got.value, got.low, got.high, got.n) == pytest.approx((want.value, want.low, want.high, want.n))
    assert np.isnan(se_interval(0.5, 0.1, 0).low)  # one piece: no interval


def test_se_difference_is_welchs_t_test_from_summary_statistics():
    from scipy import stats

    from probe.uncertainty import se_difference

    a, b = np.random.default_rng(4).normal(0.8, 0.05, 6), np.random.default_rng(5).normal(0.7, 0.1, 4)
    se_a, se_b = a.std(ddof=1) / np.sqrt(6), b.std(ddof=1) / np.sqrt(4)
    c = se_difference(a.mean(), se_a, b.mean(), se_b, 5, 3)
    welch = stats.ttest_ind(a, b, equal_var=False)
    assert c.effect == pytest.approx(a.mean() - b.mean()) and c.p == pytest.approx(welch.pvalue)
    ci = welch.confidence_interval(0.95)
    assert (c.low, c.high) == pytest.approx((ci.low, ci.high))
