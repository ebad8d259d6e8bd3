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


# --- the prompt is the unit: images of one prompt (its seeds) are correlated ---------------------------------

PROMPTS, SEEDS = 12, 4


def correlated_case(seed: int = 0):
    """Paired scores of PROMPTS prompts x SEEDS seeds (rows prompt-major, as ``dpojax eval`` orders them): a
    per-prompt random effect shared by both models (within-prompt correlation 0.5) and a per-prompt gain of the
    model, so a prompt's seeds tend to win or lose together; three exact ties."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(0.0, 1.0, (PROMPTS, 1))
    gain = rng.normal(0.3, 0.8, (PROMPTS, 1))
    reference = 0.5 + effect + rng.normal(0.0, 1.0, (PROMPTS, SEEDS))
    model = reference + gain + rng.normal(0.0, 0.3, (PROMPTS, SEEDS))
    model[0, 0], model[3, 1:3] = reference[0, 0], reference[3, 1:3]
    prompts = np.repeat([f"prompt {i}" for i in range(PROMPTS)], SEEDS)
    return model.ravel(), reference.ravel(), prompts


def wilson_written_out(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson (1927), in the (k + z^2/2) / (n + z^2) form, independent of dpojax's."""
    z = scipy.stats.norm.ppf(0.5 + level / 2)
    center = (successes + z * z / 2) / (n + z * z)
    half = z * np.sqrt(n) / (n + z * z) * np.sqrt(successes / n * (1 - successes / n) + z * z / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)


def t_interval_of(values):
    values = np.asarray(values, np.float64)
    return scipy.stats.t.interval(0.95, values.size - 1, loc=values.mean(), scale=scipy.stats.sem(values))


def test_mean_interval_is_over_per_prompt_means():
    model, reference, prompts = correlated_case()
    for values in (model, reference):
        per_prompt = values.reshape(PROMPTS, SEEDS).mean(axis=1)
        interval = mean_interval(values, prompts=prompts)
        assert interval.mean == pytest.approx(per_prompt.mean(), rel=1e-12)
        assert (interval.low, interval.high) == pytest.approx(t_interval_of(per_prompt), rel=1e-10)
        assert (interval.n_prompts, interval.n_images, interval.method) == (
            PROMPTS, PROMPTS * SEEDS, "Student t over per-prompt means")
        naive = t_interval_of(values)  # images as independent: too narrow
        assert interval.high - interval.low > 1.2 * (naive[1] - naive[0])
        # the rows' order does not matter
        order = np.random.default_rng(1).permutation(values.size)
        shuffled = mean_interval(values[order], prompts=prompts[order])
        assert (shuffled.low, shuffled.high) == pytest.approx((interval.low, interval.high), rel=1e-12)


def test_win_rate_is_over_per_prompt_win_fractions():
    model, reference, prompts = correlated_case()
    result = win_rate(model, reference, prompts=prompts)
    points = (model > reference) + 0.5 * (model == reference)
    fractions = points.reshape(PROMPTS, SEEDS).mean(axis=1)
    assert fractions.min() < fractions.max()  # the case has spread, so the t interval applies
    wins, losses = int(np.sum(model > reference)), int(np.sum(model < reference))
    assert (result.wins, result.losses, result.ties, result.n) == (wins, losses, 3, PROMPTS * SEEDS)
    assert (result.n_prompts, result.n_images) == (PROMPTS, PROMPTS * SEEDS)
    assert result.method == "Student t over per-prompt win fractions"
    assert result.rate == pytest.approx(fractions.mean(), rel=1e-12) == pytest.approx((wins + 1.5) / 48, rel=1e-12)
    low, high = t_interval_of(fractions)
    assert (result.low, result.high) == pytest.approx((max(low, 0.0), min(high, 1.0)), rel=1e-10)
    naive_low, naive_high = wilson_written_out(wins + 1.5, PROMPTS * SEEDS)  # images as independent
    assert result.high - result.low > 1.2 * (naive_high - naive_low)


def test_win_rate_t_interval_is_clipped_to_0_1():
    # 5 prompts x 4 seeds: four prompts win every seed, one wins 1 of 4; the t interval passes 1
    model = np.ones(20)
    model[16:19] = -1.0
    result = win_rate(model, np.zeros(20), prompts=np.repeat(np.arange(5), 4))
    low, high = t_interval_of([1, 1, 1, 1, 0.25])
    assert high > 1.0 and result.high == 1.0 and result.low == pytest.approx(low, rel=1e-10)
    assert result.method == "Student t over per-prompt win fractions"


def test_one_seed_per_prompt_is_todays_numbers():
    rng = np.random.default_rng(0)  # the case of test_win_rate_and_intervals_match_scipy: 18 wins, 6 losses, 6 ties
    reference = rng.normal(0.4, 0.05, 30)
    model = reference + np.r_[np.full(18, 0.01), np.full(6, -0.02), np.zeros(6)]
    prompts = np.arange(30)
    grouped = win_rate(model, reference, prompts=prompts)
    assert grouped == win_rate(model, reference)  # exactly today's
    assert grouped.method == "Wilson score" and (grouped.n_prompts, grouped.n_images) == (30, 30)
    assert grouped.rate == 21 / 30
    assert (grouped.low, grouped.high) == pytest.approx(wilson_written_out(21, 30), rel=1e-12)
    for values in (model, reference):
        interval = mean_interval(values, prompts=prompts)
        assert interval == mean_interval(values)
        assert (interval.low, interval.high) == pytest.approx(t_interval_of(values), rel=1e-10)
        assert (interval.n_prompts, interval.n_images) == (30, 30)


def test_degenerate_prompt_cases():
    prompts = np.repeat(np.arange(6), 8)
    # every prompt wins every seed: the t interval would have no width; the Wilson interval over prompts instead
    all_wins = win_rate(np.ones(48), np.zeros(48), prompts=prompts)
    expected = scipy.stats.binomtest(6, 6).proportion_ci(0.95, method="wilson")
    assert all_wins.rate == 1.0 and all_wins.method == "Wilson score over per-prompt win fractions"
    assert (all_wins.low, all_wins.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert 0.5 < all_wins.low < 0.7 and all_wins.high == 1.0
    # every prompt half won (4 of 8, or all ties): the same
    half = win_rate(np.tile(np.r_[np.ones(4), np.zeros(4)], 6), np.full(48, 0.5), prompts=prompts)
    ties = win_rate(np.zeros(48), np.zeros(48), prompts=prompts)
    expected = scipy.stats.binomtest(3, 6).proportion_ci(0.95, method="wilson")
    for result in (half, ties):
        assert result.rate == 0.5 and result.method == "Wilson score over per-prompt win fractions"
        assert (result.low, result.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert (ties.wins, ties.losses, ties.ties) == (0, 0, 48)
    # one prompt: no mean interval (as for one value); the win rate's Wilson interval over that one prompt
    one = np.array([0.1, 0.4, 0.2, 0.9])
    single = mean_interval(one, prompts=["a cat"] * 4)
    assert (single.mean, single.low, single.high, single.n_prompts, single.n_images) == (0.4, None, None, 1, 4)
    won = win_rate(one, np.full(4, 0.3), prompts=["a cat"] * 4)
    assert won.rate == 0.5 and won.n_prompts == 1 and won.method == "Wilson score over per-prompt win fractions"
    assert (won.low, won.high) == pytest.approx(wilson_written_out(0.5, 1), rel=1e-12)
    # every prompt's mean equal: a zero-width mean interval, as for equal values today
    flat = mean_interval(np.tile([0.25, 0.75], 6), prompts=prompts[::4])
    assert flat.low == flat.high == flat.mean == 0.5
    with pytest.raises(ValueError, match="prompt labels"):
        mean_interval([1.0, 2.0], prompts=[0])
