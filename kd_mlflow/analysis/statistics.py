"""The statistics of a comparison: Student-t quantiles and CDF (scipy.stats), Welch's and
the paired confidence interval of a difference in means, and Holm's adjustment."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


def t_cdf(t: float, df: float) -> float:
    """Student-t CDF for real df > 0 (``scipy.stats.t.cdf``)."""
    from scipy import stats

    return float(stats.t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile, ``scipy.stats.t.ppf`` (scipy comes with mlflow): Welch's
    non-integer degrees of freedom need no table or normal approximation."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


@dataclass
class Interval:
    diff: float
    low: float
    high: float
    df: float
    p: float = math.nan  # two-sided Welch t-test p-value of "no difference"


def welch_interval(a, b, confidence: float = CONFIDENCE) -> Interval | None:
    """CI of mean(a) - mean(b) without assuming equal variances (Welch-Satterthwaite df);
    None unless both samples have >= 2 values."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se2 = va + vb
    if se2 == 0.0:
        return Interval(diff, diff, diff, math.inf, 1.0 if diff == 0 else 0.0)
    df = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, df) * math.sqrt(se2)
    p = 2.0 * t_cdf(-abs(diff) / math.sqrt(se2), df)
    return Interval(diff, diff - half, diff + half, df, min(1.0, p))


def paired_interval(a: dict, b: dict, confidence: float = CONFIDENCE) -> Interval | None:
    """CI of the mean of a[seed] - b[seed] over the seeds both have (a paired t interval,
    df = n - 1): the design when seed k of every mode trains on the same split in the same
    batch order. None unless at least 2 seeds match."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [float(a[s]) - float(b[s]) for s in seeds]
    n, mean = len(d), statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(n)
    if se == 0.0:
        return Interval(mean, mean, mean, n - 1, 1.0 if mean == 0 else 0.0)
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * se
    p = 2.0 * t_cdf(-abs(mean) / se, n - 1)
    return Interval(mean, mean - half, mean + half, n - 1, min(1.0, p))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (NaN ones are left out and stay NaN):
    the i-th smallest becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m, adjusted, running = len(order), [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
