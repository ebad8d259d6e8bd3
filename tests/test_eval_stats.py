"""The statistics of ``dpojax eval`` equal SciPy's on a constructed case with ties: the Student t quantile and
the mean's interval, and the win rate (a tie is half a win) with its Wilson score interval."""

import numpy as np
import pytest
import scipy.stats

from dpojax.evaluate.stats import mean_interval, t_quantile, win_rate


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 47, 200, 5001])
def test_t_quantile_matches_scipy(df):
    for level in (0.9, 0.95, 0.99):
        assert t_quantile(level, df) == pytest.approx(scipy.stats.t.ppf(0.5 + level / 2, df), rel=1e-10)


def test_win_rate_and_intervals_match_scipy():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.4, 0.05, 30)
    # 18 wins, 6 losses, 6 exact ties: 18 + 6/2 = 21 successes of 30
    model = reference + np.r_[np.full(18, 0.01), np.full(6, -0.02), np.zeros(6)]
    result = win_rate(model, reference)
    assert (result.wins, result.losses, result.ties, result.n) == (18, 6, 6, 30)
    assert result.rate == 21 / 30
    expected = scipy.stats.binomtest(21, 30).proportion_ci(0.95, method="wilson")
    assert (result.low, result.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert result.method == "Wilson score"

    for values in (model, reference):
        interval = mean_interval(values)
        low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=scipy.stats.sem(values))
        assert interval.mean == pytest.approx(values.mean(), rel=1e-12)
        assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-10)


def test_edge_cases():
    assert mean_interval([0.3]).low is None  # one value: no spread to build an interval from
    assert win_rate([1.0, 1.0], [1.0, 1.0]).rate == 0.5
    all_wins = win_rate([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])  # Wilson stays inside [0, 1]
    assert all_wins.high == 1.0 and 0.0 < all_wins.low < 1.0
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0, 2.0], [1.0])
