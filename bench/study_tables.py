"""Markdown tables of finished studies for docs/studies.md: per metric and variant the mean ± 95% t half-width
over seeds, the paired difference to the baseline with its interval, and whether that difference is resolved
(its interval excludes 0) and in which direction.

    python bench/study_tables.py studies/time_conditioning studies/guidance_scale ...

Reads each STUDY_DIR/study.json (written by `diffit-pipe study`); prints one table per study and the curve points
(`FD_demo @ N samples` against the step) per variant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def with_interval(entry: dict | None) -> str:
    if entry is None:
        return "baseline"
    if entry["half_width"] is None:
        return f"{number(entry['mean'])} (n = {entry['n']})"
    return f"{number(entry['mean'])} ± {number(entry['half_width'], 2)}"


def verdict(row: dict, lower_is_better: bool) -> str:
    difference = row["difference_to_baseline"]
    if difference is None:
        return ""
    if difference["half_width"] is None:
        return "no interval"
    if difference["low"] <= 0 <= difference["high"]:
        return "not resolved (interval holds 0)"
    better = (difference["mean"] < 0) == lower_is_better
    return "better than baseline" if better else "worse than baseline"


def study_table(study: dict) -> str:
    lines = [
        f"**{study['name']}** (baseline `{study['baseline']}`, seeds {study['seeds']}, "
        f"{study['budget']['max_steps']} steps x {study['budget']['global_batch_size']}, "
        f"{study['budget']['num_samples']} samples, {study['budget']['sampler']} {study['budget']['sampling_steps']})",
        "",
        "| metric | variant | mean ± 95% half-width | paired difference to baseline | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in study["table"]:
        lower = row["metric"] in study["lower_is_better"]
        lines.append(
            f"| {row['metric']} ({'lower' if lower else 'higher'} is better) | {row['variant']} | "
            f"{with_interval(row)} | {with_interval(row['difference_to_baseline'])} | {verdict(row, lower)} |"
        )
    curves = {
        (variant, key): curve
        for variant, per_variant in study["curves"].items()
        for key, curve in per_variant.items()
        if key.startswith("FD_demo @")
    }
    if curves:
        steps = sorted({step for curve in curves.values() for step in curve["step"]})
        lines += ["", "| curve (mean over seeds) | " + " | ".join(f"step {s}" for s in steps) + " |"]
        lines.append("|---|" + "---|" * len(steps))
        for (variant, key), curve in curves.items():
            values = dict(zip(curve["step"], curve["mean"]))
            lines.append(f"| {key}, {variant} | " + " | ".join(number(values.get(s)) for s in steps) + " |")
    return "\n".join(lines)


def main(directories: list[str]) -> None:
    for directory in directories:
        print(study_table(json.loads((Path(directory) / "study.json").read_text())))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
