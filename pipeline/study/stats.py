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
