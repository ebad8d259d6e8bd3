"""Confidence intervals for an evaluation: the mean score of one model, and the win rate of one model over another.

Pure NumPy and the standard library, so ``dpojax eval`` needs no SciPy at run time:

- the mean's interval is Student's t; its quantile is found by bisection on the t distribution's CDF, which for
  an integer number of degrees of freedom is a finite trigonometric series (Abramowitz & Stegun 26.7.3-4), so it
  is exact to floating-point precision for any sample size;
- the win rate counts a tie as half a win, and its interval is the Wilson score interval (which, unlike the
  normal approximation, stays inside [0, 1] and behaves at rates near 0 or 1).

The unit of both is the prompt: the images of one prompt (its seeds) are correlated, so treating them as
independent makes the intervals too narrow (about 1.6x at 4 seeds with a within-prompt correlation of 0.5). Given
``prompts`` (a label per value; None: every value is its own prompt):

- the mean is the mean over prompts of each prompt's mean over its images, with the Student t interval on those
  per-prompt means (n = prompts, df = prompts - 1); with one image per prompt this is the plain t interval;
- with one image per prompt, the win rate and its Wilson interval are as above, on the image pairs; with several,
  the win rate is the mean over prompts of each prompt's win fraction (wins + ties/2 over its images), with the
  Student t interval on those fractions, clipped to [0, 1]. Where that interval cannot be formed or has no width
  (one prompt, or every prompt's fraction equal, e.g. all wins) it is the Wilson score interval over prompts
  (successes = the sum of the fractions, n = prompts): a fraction in [0, 1] with mean p varies at most as a
  Bernoulli(p) does, so this bounds the spread the t interval would put at zero, and keeps some width.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np

WIN_RATE_INTERVAL = "Wilson score"  # one image per prompt: on the image pairs
WIN_RATE_PROMPT_INTERVAL = "Student t over per-prompt win fractions"
WIN_RATE_PROMPT_FALLBACK = "Wilson score over per-prompt win fractions"  # one prompt, or all fractions equal
MEAN_INTERVAL = "Student t over per-prompt means"


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (a positive integer) degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)), (df-1)/2 terms
        k = np.arange(1, (df - 1) // 2)
        series = 1.0 + np.cumprod(2 * k / (2 * k + 1) * c2).sum() if df > 1 else 0.0
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    k = np.arange(1, df // 2)  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), df/2 terms
    return math.sin(theta) * (1.0 + np.cumprod((2 * k - 1) / (2 * k) * c2).sum())


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level``: the half-width factor of a two-sided ``level`` interval."""
    low, high = 0.0, 1.0
    while t_central_probability(high, df) < level:
        low, high = high, 2 * high
    while high - low > 1e-13 * high:  # the CDF is increasing in t
        mid = (low + high) / 2
        low, high = (mid, high) if t_central_probability(mid, df) < level else (low, mid)
    return (low + high) / 2


def prompt_means(values, prompts=None) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's mean of ``values`` and its number of values, in the sorted order of the labels ``prompts``
    (one per value, e.g. the prompt index; None: every value is its own prompt)."""
    values = np.asarray(values, np.float64).ravel()
    if prompts is None:
        return values, np.ones(values.size, np.int64)
    prompts = np.asarray(prompts).ravel()
    if prompts.shape != values.shape:
        raise ValueError(f"{prompts.size} prompt labels for {values.size} values")
    _, inverse = np.unique(prompts, return_inverse=True)
    counts = np.bincount(inverse)
    return np.bincount(inverse, weights=values) / counts, counts


@dataclasses.dataclass(frozen=True)
class MeanInterval:
    """Mean over prompts of each prompt's mean score, with a two-sided interval over prompts (``low``/``high``
    None for a single prompt: no spread to use)."""

    mean: float
    low: float | None
    high: float | None
    n_prompts: int
    n_images: int
    level: float
    method: str = MEAN_INTERVAL

    @property
    def n(self) -> int:
        """The number of images (as ``WinRate.n``); the interval's sample size is ``n_prompts``."""
        return self.n_images


def mean_interval(values, level: float = 0.95, prompts=None) -> MeanInterval:
    """Mean of the per-prompt means of ``values`` (``prompts``: a label per value; None: one value per prompt)
    and its Student t interval over prompts, mean +- t * s / sqrt(n_prompts)."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        raise ValueError("no values to average")
    means, _ = prompt_means(values, prompts)
    mean = float(means.mean())
    if means.size == 1:
        return MeanInterval(mean, None, None, 1, int(values.size), level)
    half = t_quantile(level, means.size - 1) * float(means.std(ddof=1)) / math.sqrt(means.size)
    return MeanInterval(mean, mean - half, mean + half, int(means.size), int(values.size), level)


@dataclasses.dataclass(frozen=True)
class WinRate:
    """How often the model beats the reference on paired scores; a tie counts as half a win."""

    rate: float
    low: float
    high: float
    wins: int
    losses: int
    ties: int
    n_prompts: int
    n_images: int
    level: float
    method: str = WIN_RATE_INTERVAL

    @property
    def n(self) -> int:
        """The number of image pairs."""
        return self.wins + self.losses + self.ties


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; ``successes`` may be fractional (ties as halves)."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(model, reference, level: float = 0.95, prompts=None) -> WinRate:
    """Win rate of ``model`` over ``reference`` (paired scores, higher is better), ties counted as half a win,
    with its interval over prompts (``prompts``: a label per pair; None: one pair per prompt). One pair per
    prompt: the Wilson interval on the pairs. Several: the mean of the per-prompt win fractions with their
    Student t interval, or the Wilson interval over prompts where that has no width (see the module's doc)."""
    model, reference = np.asarray(model, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
    if model.shape != reference.shape or model.size == 0:
        raise ValueError(f"win rate needs paired scores, got {model.size} and {reference.size}")
    won, lost = model > reference, model < reference
    wins, losses = int(won.sum()), int(lost.sum())
    ties = model.size - wins - losses  # neither higher (NaN scores included)
    fractions, counts = prompt_means(np.where(won, 1.0, np.where(lost, 0.0, 0.5)), prompts)
    n_prompts = int(fractions.size)
    counts_and_level = (wins, losses, ties, n_prompts, int(model.size), level)
    if counts.max() == 1:  # one pair per prompt: independent pairs
        successes = wins + ties / 2
        low, high = wilson_interval(successes, model.size, level)
        return WinRate(successes / model.size, low, high, *counts_and_level, WIN_RATE_INTERVAL)
    rate = float(fractions.mean())
    if n_prompts > 1 and fractions.max() > fractions.min():
        half = t_quantile(level, n_prompts - 1) * float(fractions.std(ddof=1)) / math.sqrt(n_prompts)
        return WinRate(rate, max(0.0, rate - half), min(1.0, rate + half), *counts_and_level,
                       WIN_RATE_PROMPT_INTERVAL)
    low, high = wilson_interval(float(fractions.sum()), n_prompts, level)
    return WinRate(rate, low, high, *counts_and_level, WIN_RATE_PROMPT_FALLBACK)
