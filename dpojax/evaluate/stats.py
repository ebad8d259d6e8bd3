"""Confidence intervals for an evaluation: the mean score of one model, and the win rate of one model over another.

Pure NumPy and the standard library, so ``dpojax eval`` needs no SciPy at run time:

- the mean's interval is Student's t; its quantile is found by bisection on the t distribution's CDF, which for
  an integer number of degrees of freedom is a finite trigonometric series (Abramowitz & Stegun 26.7.3-4), so it
  is exact to floating-point precision for any sample size;
- the win rate counts a tie as half a win, and its interval is the Wilson score interval (which, unlike the
  normal approximation, stays inside [0, 1] and behaves at rates near 0 or 1).
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np

WIN_RATE_INTERVAL = "Wilson score"
MEAN_INTERVAL = "Student t"


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


@dataclasses.dataclass(frozen=True)
class MeanInterval:
    """Sample mean with a two-sided interval (``low``/``high`` None for a single value: no spread to use)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float
    method: str = MEAN_INTERVAL


def mean_interval(values, level: float = 0.95) -> MeanInterval:
    """Mean of ``values`` and its Student-t interval, mean +- t * s / sqrt(n)."""
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        raise ValueError("no values to average")
    mean = float(values.mean())
    if values.size == 1:
        return MeanInterval(mean, None, None, 1, level)
    half = t_quantile(level, values.size - 1) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return MeanInterval(mean, mean - half, mean + half, int(values.size), level)


@dataclasses.dataclass(frozen=True)
class WinRate:
    """How often the model beats the reference on paired scores; a tie counts as half a win."""

    rate: float
    low: float
    high: float
    wins: int
    losses: int
    ties: int
    level: float
    method: str = WIN_RATE_INTERVAL

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; ``successes`` may be fractional (ties as halves)."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(model, reference, level: float = 0.95) -> WinRate:
    """Win rate of ``model`` over ``reference`` (paired scores, higher is better), ties counted as half a win,
    with its Wilson interval."""
    model, reference = np.asarray(model, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
    if model.shape != reference.shape or model.size == 0:
        raise ValueError(f"win rate needs paired scores, got {model.size} and {reference.size}")
    wins, losses = int(np.sum(model > reference)), int(np.sum(model < reference))
    ties = model.size - wins - losses
    successes = wins + ties / 2
    low, high = wilson_interval(successes, model.size, level)
    return WinRate(successes / model.size, low, high, wins, losses, ties, level)
