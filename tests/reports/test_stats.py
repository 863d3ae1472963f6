import numpy as np
import pytest

from hpo.reports.stats import bootstrap_ci, expected_best, p_improvement, p_improvement_words


def test_bootstrap_interval_never_goes_below_zero_for_a_non_negative_metric():
    # Two near-zero losses and one large one: mean - t*s/sqrt(n) is far below zero here.
    scores = [0.001, 0.002, 0.9]
    mean, std = np.mean(scores), np.std(scores, ddof=1)
    assert mean - 4.303 * std / np.sqrt(3) < 0
    low, high = bootstrap_ci(scores)
    assert 0.001 <= low <= mean <= high <= 0.9
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_ci([0.5])))


def test_p_improvement_is_a_coin_toss_for_one_distribution_and_certain_for_separated_ones():
    rng = np.random.default_rng(1)
    scores = rng.normal(1.0, 0.1, 10)
    assert p_improvement(scores, scores[::-1]) == pytest.approx(0.5, abs=0.03)
    # Over many pairs drawn from one distribution it averages a coin toss.
    pairs = [p_improvement(rng.normal(1.0, 0.1, 5), rng.normal(1.0, 0.1, 5), resamples=2000) for _ in range(40)]
    assert 0.4 < np.mean(pairs) < 0.6
    assert p_improvement([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]) == 1.0
    assert p_improvement([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], direction="maximize") == 1.0
    assert "clear winner" in p_improvement_words(1.0)
    assert "cannot tell them apart" in p_improvement_words(0.55)


def test_expected_best_matches_the_formula_and_reaches_the_best_value():
    values = [3.0, 1.0, 2.0]
    curve = expected_best(values, "minimize", max_trials=3)
    assert curve[0] == pytest.approx(2.0)  # one draw: the mean
    # two draws: min over 9 equally likely ordered pairs = (1*5 + 2*3 + 3*1) / 9
    assert curve[1] == pytest.approx(14 / 9)
    assert np.all(np.diff(curve) <= 0)
    assert expected_best(values, "maximize", max_trials=50)[-1] == pytest.approx(3.0, abs=1e-6)
