"""Intervals and paired tests of eval/stats.py against textbook values and their defining properties."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from unified.eval.stats import (
    compare_paired,
    compare_pooled,
    mcnemar_exact,
    mean_interval,
    non_inferior,
    paired_difference,
    wilson_interval,
)


def test_wilson_interval_contains_the_rate_and_shrinks_with_n():
    for k, n in [(0, 10), (3, 10), (10, 10), (30, 100)]:
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert np.diff(wilson_interval(30, 100)) < np.diff(wilson_interval(3, 10))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-3)  # the textbook value for 10/10
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mean_interval_is_student_t():
    lo, hi = mean_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    # t(0.975, 3 degrees of freedom) = 3.182
    assert lo < 2.5 < hi and hi - lo == pytest.approx(2 * 3.1824 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-3)
    assert mean_interval(np.array([5.0])) == (5.0, 5.0) and mean_interval(np.full(4, 2.0)) == (2.0, 2.0)


def test_mcnemar_exact_counts_only_the_discordant_pairs():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 1], bool)
    b = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    result = mcnemar_exact(a, b)
    assert (result["only_first"], result["only_second"]) == (6, 0)
    assert result["p_value"] == pytest.approx(2 * 0.5**6)  # two-sided exact binomial, 6 of 6 discordant
    # Concordant pairs change nothing; no discordant pair: no evidence at all.
    padded = mcnemar_exact(np.r_[a, np.ones(50, bool)], np.r_[b, np.ones(50, bool)])
    assert padded["p_value"] == result["p_value"]
    assert mcnemar_exact(a, a)["p_value"] == 1.0


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=60))
def test_paired_difference_interval_holds_the_difference(pairs):
    a, b = (np.array(x, float) for x in zip(*pairs))
    result = paired_difference(a, b)
    lo, hi = result["ci95"]
    assert result["difference"] == pytest.approx((a - b).mean())
    assert -1.0 <= lo <= result["difference"] + 1e-12 and result["difference"] - 1e-12 <= hi <= 1.0


def test_pairing_uses_the_seed_and_the_non_inferiority_margin():
    def report(outcomes):
        return {"episodes": [{"scenario": "s", "seed": seed, "success": ok} for seed, ok in outcomes]}

    teacher = report([(1, True), (2, True), (3, False), (4, True)])
    student = report([(4, True), (3, True), (2, True), (1, False), (9, True)])  # another order, one extra seed
    comparison = compare_paired(teacher, student)
    assert comparison["pairs"] == 4 and comparison["first_rate"] == 0.75 and comparison["second_rate"] == 0.75
    assert comparison["mcnemar"]["only_first"] == 1 and comparison["mcnemar"]["only_second"] == 1
    assert compare_paired(teacher, report([(7, True)])) is None
    sure = {"difference": {"difference": 0.0, "ci95": [-0.05, 0.05]}}
    unsure = {"difference": {"difference": 0.0, "ci95": [-0.3, 0.3]}}
    assert non_inferior(sure, 0.8, 0.9) and not non_inferior(unsure, 0.8, 0.9)


def test_a_lever_on_several_training_runs_pools_their_pairs():
    def report(outcomes):
        return {"episodes": [{"scenario": "s", "seed": seed, "success": ok} for seed, ok in outcomes]}

    # Run 0: the lever wins 3 episodes and loses none; run 1: it wins 2 and loses 1; each pairs on its own seeds.
    base0 = report([(1, False), (2, False), (3, False), (4, True)])
    lever0 = report([(1, True), (2, True), (3, True), (4, True)])
    base1, lever1 = report([(1, False), (2, False), (3, True)]), report([(3, False), (2, True), (1, True)])
    result = compare_pooled([(base0, lever0), (base1, lever1)])
    assert [r["pairs"] for r in result["runs"]] == [4, 3]
    assert result["runs"][0]["difference"]["difference"] == pytest.approx(0.75)
    pooled = result["pooled"]
    assert pooled["pairs"] == 7 and pooled["difference"]["difference"] == pytest.approx(4 / 7)
    # Discordant pairs add up over the runs: 5 for the lever (the second), 1 against, the exact binomial p of 1 in 6.
    assert (pooled["mcnemar"]["only_first"], pooled["mcnemar"]["only_second"]) == (5, 1)
    assert pooled["mcnemar"]["p_value"] == pytest.approx(mcnemar_exact([1] * 5 + [0], [0] * 5 + [1])["p_value"])
    with pytest.raises(ValueError, match="run 1: the two reports share no episode"):
        compare_pooled([(base0, lever0), (base1, report([(9, True)]))])
