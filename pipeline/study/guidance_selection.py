"""Each variant at its own best guidance scale, chosen without looking at the seed it is scored on.

A study compares variants at one guidance scale when `evaluate.guidance_scale` is shared; a variant whose optimum
lies elsewhere then loses for the scale, not for its design (the paper's Fig. 7a: rankings move with the scale).
With

    guidance_selection:
      scales: [1.0, 1.5, 2.0, 3.0, 4.0]   # every variant and seed is evaluated at each
      metric: FD_demo                     # the scale is chosen on this metric (the better end: LOWER_IS_BETTER)
      rule: leave-one-seed-out            # the one rule (the default)

every (variant, seed) is evaluated at every scale (`evals/VARIANT/guidance-G/seed-S`, `spec.Study.units`), and
the value a variant reports for seed s is its evaluation at the scale whose mean `metric` over the variant's
*other* seeds is best (ties: the smaller scale). Choosing on the same seeds that are then compared would favour
every variant by the luck of the choice (the minimum of noisy means is biased low), the more so the more scales
there are; a choice made on held-out seeds is an honest estimate of "this variant at a scale a user would pick
from other runs", so the paired intervals and verdicts that follow mean what they say. Every metric of the table
is read at the chosen scale of its seed. The study's `evaluate.guidance_scale` must be one of the scales: the
curve and the sample grids are drawn at it.

This module holds the rule and the parsing of the block; the runner evaluates the extra scales like any
evaluation, and `aggregate` reports the sweep (`sweep_summary`) beside the table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.core.errors import brief
from pipeline.study.spec import StudyError

SELECTION_KEYS = ("scales", "metric", "rule")
RULES = ("leave-one-seed-out",)
MAX_SCALES = 32
MAX_SCALE = 1000.0


def parse_guidance_selection(value: Any, path: Path, evaluate: dict[str, Any], variants, seeds: list[int]):
    """The checked `guidance_selection` block ({scales, metric, rule}), or None when the file has none."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise StudyError(f"{path}: guidance_selection: {message}")

    if value is None:
        return None
    need(isinstance(value, dict), f"expected a mapping of {', '.join(SELECTION_KEYS)}, got {brief(value)}")
    unknown = [key for key in value if key not in SELECTION_KEYS]
    need(not unknown, f"unknown key {brief(unknown[0]) if unknown else ''}; keys: {', '.join(SELECTION_KEYS)}")
    scales = value.get("scales")
    need(
        isinstance(scales, list) and 2 <= len(scales) <= MAX_SCALES,
        f"scales must be a list of 2 to {MAX_SCALES} guidance scales, got {brief(scales)}",
    )
    bad = [s for s in scales if not _is_scale(s)]
    need(not bad, f"a scale must be a number in [0, {MAX_SCALE:g}], got {brief(bad[0]) if bad else ''}")
    scales = [float(s) for s in scales]
    need(len(set(scales)) == len(scales), f"scales repeat: {brief(scales)}")
    metric = value.get("metric")
    need(isinstance(metric, str) and bool(metric), f"metric must name the metric to choose on, got {brief(metric)}")
    rule = value.get("rule", RULES[0])
    need(rule in RULES, f"rule must be one of {', '.join(RULES)}, got {brief(rule)}")
    need(len(seeds) >= 2, "the leave-one-seed-out rule needs at least 2 seeds (a seed's scale is chosen on the rest)")
    setting = [v.name for v in variants if "guidance_scale" in v.evaluate]
    need(not setting, f"variant {setting[0] if setting else ''!r} sets evaluate.guidance_scale; the sweep chooses it")
    shown = evaluate.get("guidance_scale")
    need(
        _is_scale(shown) and float(shown) in scales,
        f"evaluate.guidance_scale (the scale of the curve and the sample grids) must be one of the scales "
        f"{brief(scales)}, got {brief(shown)}",
    )
    return {"scales": sorted(scales), "metric": metric, "rule": rule}


def _is_scale(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_SCALE
    )


def best_scale(means: dict[float, float], lower_is_better: bool) -> float:
    """The scale of the best mean (ties: the smaller scale)."""
    sign = 1.0 if lower_is_better else -1.0
    return min(sorted(means), key=lambda scale: sign * means[scale])


def leave_one_seed_out(by_scale: dict[float, dict[int, float]], lower_is_better: bool) -> dict[int, float]:
    """seed -> the scale chosen for it: the best mean of the metric over the variant's other seeds.

    `by_scale`: scale -> seed -> metric value; a seed missing at some scale is an error of the caller (every
    evaluation has a result before a study aggregates)."""
    seeds = sorted(set.intersection(*(set(values) for values in by_scale.values())))
    chosen = {}
    for seed in seeds:
        others = [s for s in seeds if s != seed]
        means = {scale: sum(values[s] for s in others) / len(others) for scale, values in by_scale.items()}
        chosen[seed] = best_scale(means, lower_is_better)
    return chosen


def sweep_summary(
    selection: dict[str, Any], by_variant: dict[str, dict[float, dict[int, float]]], lower_is_better: bool
) -> dict[str, Any]:
    """What study.json reports of the sweep: the rule, and per variant the metric at each scale (mean and 95%
    interval over seeds), the scale chosen for each seed, and the in-sample best scale (for reading only: the
    table uses the held-out choices)."""
    from pipeline.study.stats import interval

    per_variant = {}
    for variant, by_scale in by_variant.items():
        chosen = leave_one_seed_out(by_scale, lower_is_better)
        stats = {f"{scale:g}": interval([v for _, v in sorted(values.items())]) for scale, values in by_scale.items()}
        means = {scale: stats[f"{scale:g}"]["mean"] for scale in by_scale}
        per_variant[variant] = {
            "by_scale": stats,
            "chosen_scale": {str(seed): scale for seed, scale in chosen.items()},
            "best_in_sample": best_scale(means, lower_is_better),
        }
    return {**selection, "lower_is_better": lower_is_better, "per_variant": per_variant}
