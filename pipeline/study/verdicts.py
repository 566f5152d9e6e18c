"""Verdicts computed, not written: the paper's claims as data, judged by the study's paired comparisons.

A study file may carry the paper's claims (`paper.claims`), each naming the metric the study measures it with:

    paper:
      claims:
        - source: "Table 6 F/G/H (CIFAR-10 FID)"
          metric: FD_demo                 # a metric of the study's table
          values: {tmsa: 1.95, bias: 3.97, mlp: 3.81, decoupled: 2.28}   # the paper's numbers, where it gives them
          worse: [adaln]                  # variants the paper finds worse than the baseline without a number
          better: []                      # ... or better
          baseline: tmsa                  # optional: the claim's own reference variant (default: the study's)

The family: every comparison of a variant with the baseline, for every metric of the table (the paired
differences of `stats.paired_difference`), and the comparisons a claim with its own `baseline` asks for (Table 5:
VE with TMSA against VE, VP with TMSA against VP, in one study). Each has the paired t-test's p-value; Holm's
step-down adjustment over the whole family (`stats.holm`) controls the chance of any false "resolved" at 5%. A
claim's verdict per variant:

- `reproduced`: the Holm-adjusted p < 0.05 and the measured difference has the paper's sign (in the metric's
  "better" direction);
- `opposite`: adjusted p < 0.05 and the other sign;
- `not resolved`: otherwise (or fewer than 2 paired seeds);
- `not measured`: the metric or the variant is not in the table.

Beside each verdict: the relative change measured ((variant - baseline) / |baseline|, means over seeds) and the
paper's, and the seeds a paired t-test at the family's first Holm level would need to resolve the measured
difference at 80% power with the measured spread (`stats.seeds_for_power`).
"""

from __future__ import annotations

from typing import Any

from pipeline.study.stats import CONFIDENCE, holm, interval, paired_t_test, seeds_for_power

ALPHA = 1 - CONFIDENCE
CLAIM_KEYS = ("source", "metric", "values", "worse", "better", "baseline")
VERDICTS = ("reproduced", "opposite", "not resolved", "not measured")
METHOD = (
    "paired t-test per (variant, metric) against the baseline over the seeds both have; Holm's step-down "
    "adjustment over every such comparison of the study (family-wise error 5%); resolved where the adjusted p < 0.05"
)


def claim_problems(paper: Any, variants: list[str], baseline: str) -> list[str]:
    """What is wrong with `paper.claims` of a study file (empty: nothing)."""
    if not isinstance(paper, dict) or paper.get("claims") is None:
        return []
    claims = paper["claims"]
    if not isinstance(claims, list):
        return ["paper.claims must be a list of claims"]
    problems = []
    for number, claim in enumerate(claims):
        where = f"paper.claims[{number}]"
        if not isinstance(claim, dict):
            problems.append(f"{where} must be a mapping")
            continue
        unknown = sorted(map(str, set(claim) - set(CLAIM_KEYS)))
        if unknown:
            problems.append(f"{where}: unknown key {unknown[0][:40]!r}; known: {', '.join(CLAIM_KEYS)}")
        if not isinstance(claim.get("metric"), str):
            problems.append(f"{where}: 'metric' must name a metric of the study's table")
        values = claim.get("values") or {}
        named = list(values) + list(claim.get("worse") or []) + list(claim.get("better") or [])
        reference = claim.get("baseline", baseline)
        if reference not in variants:
            problems.append(
                f"{where}: baseline {str(reference)[:40]!r} is not a variant; variants: {', '.join(variants)}"
            )
            continue
        if not isinstance(values, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()
        ):
            problems.append(f"{where}: 'values' must map variants to the paper's numbers")
        elif values and reference not in values:
            problems.append(f"{where}: 'values' must include the baseline {reference!r} (a difference needs it)")
        for name in named:
            if name not in variants:
                problems.append(f"{where}: {str(name)[:40]!r} is not a variant; variants: {', '.join(variants)}")
    return problems


def claim_pairs(paper: Any, baseline: str) -> list[tuple[str, str]]:
    """(variant, reference) of every claim with its own `baseline` other than the study's."""
    pairs: list[tuple[str, str]] = []
    if not isinstance(paper, dict) or not paper.get("claims"):
        return pairs
    for claim in paper["claims"]:
        reference = claim.get("baseline", baseline)
        if reference == baseline:
            continue
        named = list(claim.get("values") or {}) + list(claim.get("worse") or []) + list(claim.get("better") or [])
        pairs += [
            (variant, reference) for variant in named if variant != reference and (variant, reference) not in pairs
        ]
    return pairs


def comparisons(
    table: list[dict[str, Any]], baseline: str, pairs: list[tuple[str, str]] | tuple = ()
) -> list[dict[str, Any]]:
    """Every (metric, variant) comparison with the baseline, and every (metric, variant, reference) of `pairs`:
    mean difference, p-value and Holm-adjusted p (Holm over all of them)."""
    rows = {(row["metric"], row["variant"]): row for row in table}
    wanted = [(row["metric"], row["variant"], baseline) for row in table if row["variant"] != baseline]
    metrics = list(dict.fromkeys(row["metric"] for row in table))
    wanted += [(metric, variant, reference) for metric in metrics for variant, reference in pairs]
    family = []
    for metric, variant, reference in wanted:
        row, reference_row = rows.get((metric, variant)), rows.get((metric, reference))
        if row is None or reference_row is None:
            continue
        seeds = sorted(set(row["values"]) & set(reference_row["values"]), key=int)
        if not seeds:
            continue
        paired = [row["values"][s] - reference_row["values"][s] for s in seeds]
        difference = interval(paired)
        family.append(
            {
                "metric": metric,
                "variant": variant,
                "baseline": reference,
                "n": difference["n"],
                "mean_difference": difference["mean"],
                "std_difference": difference["std"],
                "p": paired_t_test(paired),
                "relative_change": _relative(row["mean"], reference_row["mean"]),
            }
        )
    for entry, adjusted in zip(family, holm([entry["p"] for entry in family])):
        entry["p_holm"] = adjusted
    return family


def _direction(signed_difference: float) -> str:
    return "better" if signed_difference > 0 else "worse" if signed_difference < 0 else "equal"


def _relative(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / abs(reference)


def verdicts(
    paper: Any, family: list[dict[str, Any]], baseline: str, lower_is_better: tuple[str, ...]
) -> list[dict[str, Any]]:
    """One entry per (claim, variant the claim names other than the baseline): the verdict and its evidence."""
    if not isinstance(paper, dict) or not paper.get("claims"):
        return []
    found = []
    comparisons_count = sum(1 for entry in family if entry["p"] is not None)
    for claim in paper["claims"]:
        metric = claim["metric"]
        sign = -1.0 if metric in lower_is_better else 1.0  # "better" = lower for a distance
        values = claim.get("values") or {}
        reference = claim.get("baseline", baseline)
        expected = {v: _direction(sign * (x - values[reference])) for v, x in values.items()}
        expected.update({v: "worse" for v in claim.get("worse") or []})
        expected.update({v: "better" for v in claim.get("better") or []})
        for variant, paper_direction in expected.items():
            if variant == reference:
                continue
            entry = next(
                (
                    e
                    for e in family
                    if (e["metric"], e["variant"], e.get("baseline", baseline)) == (metric, variant, reference)
                ),
                None,
            )
            record = {
                "source": claim.get("source"),
                "metric": metric,
                "variant": variant,
                "baseline": reference,
                "paper": paper_direction,
                "paper_relative_change": _relative(values.get(variant), values.get(reference)),
            }
            if entry is None:
                found.append({**record, "verdict": "not measured"})
                continue
            measured = "better" if sign * entry["mean_difference"] > 0 else "worse"
            resolved = entry["p_holm"] is not None and entry["p_holm"] < ALPHA
            # A paper that finds no difference ("equal") is never reproduced by a resolved one.
            verdict = "not resolved" if not resolved else ("reproduced" if measured == paper_direction else "opposite")
            needed = None
            if entry["std_difference"] is not None:
                needed = seeds_for_power(entry["std_difference"], entry["mean_difference"], comparisons_count)
            found.append(
                {
                    **record,
                    "verdict": verdict,
                    "measured": measured if entry["mean_difference"] != 0 else "equal",
                    "mean_difference": entry["mean_difference"],
                    "relative_change": entry["relative_change"],
                    "p": entry["p"],
                    "p_holm": entry["p_holm"],
                    "n": entry["n"],
                    "seeds_for_80_percent_power": needed,
                }
            )
    return found


POWER_KEYS = ("metric", "expected_sd", "difference")


def power_problems(power: Any) -> list[str]:
    """What is wrong with a study file's `power` entry (empty: nothing)."""
    if power is None:
        return []
    if not isinstance(power, dict):
        return ["power must be a mapping {metric, expected_sd, difference}"]
    unknown = sorted(map(str, set(power) - set(POWER_KEYS)))
    problems = [f"power: unknown key {unknown[0][:40]!r}; known: {', '.join(POWER_KEYS)}"] if unknown else []
    if not isinstance(power.get("metric"), str):
        problems.append("power.metric must name a metric of the study's table")
    for key in ("expected_sd", "difference"):
        value = power.get(key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e12):
            problems.append(f"power.{key} must be a positive number, got {str(value)[:40]!r}")
    return problems


def power_lines(power: Any, family: list[dict[str, Any]] | None, variants: int) -> list[str]:
    """What `study --plan` says about seeds: from the study file's `power` (an expected spread of the paired
    differences and the difference to resolve) and, after a pilot, from each measured comparison."""
    comparisons_count = max(1, variants - 1)
    lines = []
    if isinstance(power, dict) and not power_problems(power):
        needed = seeds_for_power(power["expected_sd"], power["difference"], comparisons_count)
        lines.append(
            f"power: to resolve a {power['metric']} difference of {power['difference']:g} with paired differences of "
            f"SD {power['expected_sd']:g} at 80% power (Holm over {comparisons_count} comparisons): "
            f"{needed if needed is not None else 'more than 10000'} seeds"
        )
    measured = [entry for entry in family or [] if entry["std_difference"] is not None]
    count = sum(1 for entry in family or [] if entry["p"] is not None)
    for entry in measured:
        needed = seeds_for_power(entry["std_difference"], entry["mean_difference"], count)
        lines.append(
            f"pilot: {entry['metric']} {entry['variant']} - baseline = {entry['mean_difference']:.4g} (SD of the "
            f"paired differences {entry['std_difference']:.4g}, {entry['n']} seeds, Holm p {entry['p_holm']:.3g}): "
            f"{needed if needed is not None else 'more than 10000'} seeds resolve it at 80% power"
        )
    return lines
