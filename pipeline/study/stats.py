"""The arithmetic of a study's table: mean and Student-t 95% interval over seeds, paired differences.

For values x_1..x_n (one per seed) the mean is m = sum(x) / n and the 95% interval m ± t_{0.975, n-1} · s / sqrt(n),
with s the sample standard deviation (n - 1 in the denominator). One value has no interval (None). The paired
difference of a variant to the baseline uses the seeds both have: d_i = x_i(variant) - x_i(baseline), and the
same interval over the d_i; pairing removes the part of the seed-to-seed spread that both runs of a seed share
(same initialisation stream, same data order, same sampling noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

CONFIDENCE = 0.95


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The Student-t quantile (scipy's), e.g. t_{0.975, 2} = 4.302652729911275."""
    from scipy.stats import t

    return float(t.ppf(probability, degrees_of_freedom))


def interval(values: Sequence[float]) -> dict[str, Any]:
    """{n, mean, std, half_width, low, high} of `values` (the 95% t-interval; None entries when n < 2)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "half_width": None, "low": None, "high": None}
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "half_width": None, "low": None, "high": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "low": mean - half, "high": mean + half}


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[str, Any]:
    """The interval of value - baseline over the seeds both have (`seeds` lists them)."""
    seeds = sorted(set(values) & set(baseline))
    result = interval([values[s] - baseline[s] for s in seeds])
    result["seeds"] = seeds
    return result


def paired_t_test(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of the one-sample t-test of mean(differences) = 0 (the paired t-test); None for fewer
    than 2 values. Differences that are all equal give 0 (or 1 when they are all 0): no spread, no doubt."""
    from scipy.stats import t

    values = [float(v) for v in differences]
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    statistic = mean / (std / math.sqrt(n))
    return float(2 * t.sf(abs(statistic), n - 1))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None entries stay None and do not count): sorted
    ascending, p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the adjusted value is
    below alpha controls the family-wise error rate at alpha (Holm 1979)."""
    order = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    m = len(order)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def seeds_for_power(
    std: float, difference: float, comparisons: int = 1, power: float = 0.8, alpha: float = 1 - CONFIDENCE
) -> int | None:
    """The fewest seeds n >= 2 at which a two-sided paired t-test at level alpha / comparisons (Bonferroni: the
    first step of Holm's) detects a true mean difference `difference` with `power`, when the paired differences
    have standard deviation `std` (noncentral t: power = P(|T| > t_crit), T ~ nct(n - 1, difference / (std /
    sqrt(n)))). None when `difference` is 0 or more than 10,000 seeds would be needed."""
    from scipy.stats import nct, t

    if std <= 0:
        return 2
    if difference == 0:
        return None
    level = alpha / max(1, comparisons)
    for n in range(2, 10_001):
        critical = t.ppf(1 - level / 2, n - 1)
        shift = abs(difference) / (std / math.sqrt(n))
        achieved = nct.sf(critical, n - 1, shift) + nct.cdf(-critical, n - 1, shift)
        if achieved >= power:
            return n
    return None
