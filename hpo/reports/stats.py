"""Statistics over seeds and trials: per-seed scores in; bootstrap intervals that stay
inside the data's range, the probability that one trial beats another, and the expected
best score as a function of how many trials were run (Dodge et al. 2019).

numpy only: scipy.stats would give the same percentile bootstrap but costs 0.6 s of
imports on every `hpo report`, for what is one vectorised resample here.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
# Fixed, so the same scores always print the same interval and probability.
_RNG_SEED = 20190905


def _finite(values: Sequence[float | None]) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return a[np.isfinite(a)]


def _resampled_means(a: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    return a[idx].mean(axis=1)


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test of two samples (each at least two values, not both constant): (t, p)."""
    # scipy.special rather than scipy.stats: the same t distribution without half a
    # second of imports on every `hpo report`.
    from scipy.special import stdtr

    n_a, n_b = len(a), len(b)
    var_a, var_b = float(np.var(a, ddof=1)), float(np.var(b, ddof=1))
    se_a, se_b = var_a / n_a, var_b / n_b
    t = (float(np.mean(a)) - float(np.mean(b))) / math.sqrt(se_a + se_b)
    df = (se_a + se_b) ** 2 / (se_a**2 / (n_a - 1) + se_b**2 / (n_b - 1))
    return t, float(2 * stdtr(df, -abs(t)))


def bootstrap_ci(scores: Sequence[float | None], level: float = LEVEL,
                 resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean over seeds: (low, high).

    The bounds are quantiles of resampled means, so they lie between the smallest and the
    largest score: a non-negative metric never gets a negative bound, unlike mean ± t·s/√n.
    With fewer than two finite scores both bounds are NaN.
    """
    a = _finite(scores)
    if len(a) < 2:
        return math.nan, math.nan
    if np.all(a == a[0]):
        return float(a[0]), float(a[0])
    means = _resampled_means(a, np.random.default_rng(_RNG_SEED), resamples)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def p_improvement(best: Sequence[float | None], other: Sequence[float | None], direction: str = "minimize",
                  resamples: int = RESAMPLES) -> float:
    """Bootstrap probability that `best`'s mean is better than `other`'s (ties count half).

    Each trial's seeds are resampled on their own (the trials need not share seeds);
    0.5 means the seeds cannot order them, 1.0 that every resample puts `best` ahead.
    NaN when either has no finite score.
    """
    a, b = _finite(best), _finite(other)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    rng = np.random.default_rng(_RNG_SEED)
    ma, mb = _resampled_means(a, rng, resamples), _resampled_means(b, rng, resamples)
    wins = (ma < mb) if direction == "minimize" else (ma > mb)
    return float(wins.mean() + 0.5 * (ma == mb).mean())


def p_improvement_words(p: float, best: str = "the winner", other: str = "the runner-up") -> str:
    """P(improvement) as a sentence a person reads in a second."""
    if not math.isfinite(p):
        return f"cannot say whether {best} beats {other}: too few scores"
    pct = f"{100 * p:.0f}%"
    if p >= 0.95:
        return f"{best} beats {other} in {pct} of resamples: a clear winner"
    if p >= 0.75:
        return f"{best} beats {other} in {pct} of resamples: likely better, not certain"
    return f"{best} beats {other} in only {pct} of resamples: the seeds cannot tell them apart"


def expected_best(values: Sequence[float | None], direction: str = "minimize",
                  max_trials: int | None = None) -> np.ndarray:
    """Expected best validation score of n trials, for n = 1..max_trials (Dodge et al. 2019).

    Treats the finished trials as draws from the search's score distribution: with the N
    values sorted from worst to best, P(best of n is the i-th) = (i/N)^n - ((i-1)/N)^n.
    A curve still falling (minimize) at n = N says more trials would still help.
    """
    v = _finite(values)
    if len(v) == 0:
        return np.array([])
    # Worst first: descending for a loss, ascending for a score to maximise.
    v = np.sort(v)[::-1] if direction == "minimize" else np.sort(v)
    n_total = len(v)
    ns = np.arange(1, (max_trials or n_total) + 1)[:, None]
    i = np.arange(1, n_total + 1)[None, :]
    weights = (i / n_total) ** ns - ((i - 1) / n_total) ** ns
    return weights @ v
