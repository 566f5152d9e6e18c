"""Markdown tables of finished studies for docs/studies.md, regenerated from their `study.json` (per-seed values
included, so every number on the page can be checked): per metric and variant the mean ± 95% t half-width over
seeds and the paired difference to the baseline, with the Holm-adjusted p of that comparison and whether it is
resolved (adjusted p < 0.05) and in which direction; the verdicts on the paper's claims; the guidance sweep when
the study chose each variant's scale; the curve points per variant.

    python bench/study_tables.py docs/studies/data/time_conditioning_demo.json studies/recipe_demo ...

Each argument is a `study.json` or a study directory holding one (written by `diffit-pipe study`). Nothing here
ranks variants beyond what the Holm-adjusted paired comparisons resolve.
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


def resolved(comparison: dict | None, lower_is_better: bool) -> str:
    """What the Holm-adjusted paired comparison says (the only ranking the tables make)."""
    if comparison is None:
        return ""
    if comparison["p_holm"] is None:
        return "no test (n < 2)"
    if comparison["p_holm"] >= 0.05:
        return f"not resolved (Holm p {number(comparison['p_holm'], 2)})"
    better = (comparison["mean_difference"] < 0) == lower_is_better
    return f"{'better' if better else 'worse'} than baseline (Holm p {number(comparison['p_holm'], 2)})"


def header(study: dict) -> str:
    budget = study["budget"]
    sampler = f"{budget['sampler']} {budget['sampling_steps']}"
    if budget["sampler"] == budget["sampling_steps"] == "per variant":
        sampler = "sampler and steps per variant"
    return (
        f"**{study['name']}** (baseline `{study['baseline']}`, seeds {study['seeds']}, {budget['max_steps']} steps x "
        f"{budget['global_batch_size']}, {budget['num_samples']} samples, {sampler}, guidance "
        f"{budget['guidance_scale']})"
    )


def metric_rows(study: dict) -> list[str]:
    comparisons = {
        (c["metric"], c["variant"]): c
        for c in study.get("comparisons", [])
        if c.get("baseline", study["baseline"]) == study["baseline"]
    }
    lines = [
        "| metric | variant | mean ± 95% half-width | paired difference to baseline | Holm-adjusted comparison |",
        "|---|---|---|---|---|",
    ]
    for row in study["table"]:
        lower = row["metric"] in study["lower_is_better"]
        comparison = comparisons.get((row["metric"], row["variant"]))
        lines.append(
            f"| {row['metric']} ({'lower' if lower else 'higher'} is better) | {row['variant']} | "
            f"{with_interval(row)} | {with_interval(row['difference_to_baseline'])} | {resolved(comparison, lower)} |"
        )
    return lines


def verdict_rows(study: dict) -> list[str]:
    if not study.get("verdicts"):
        return []
    lines = [
        "",
        "| paper's claim | variant vs baseline | paper | measured | Holm p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in study["verdicts"]:
        paper_change = v.get("paper_relative_change")
        measured_change = v.get("relative_change")
        paper = v["paper"] + (f" ({100 * paper_change:+.1f}%)" if paper_change is not None else "")
        measured = (v.get("measured") or "—") + (f" ({100 * measured_change:+.1f}%)" if measured_change else "")
        lines.append(
            f"| {v['source']} | {v['variant']} vs {v.get('baseline', study['baseline'])} | {paper} | {measured} | "
            f"{number(v.get('p_holm'), 2)} | **{v['verdict']}** |"
        )
    return lines


def selection_rows(study: dict) -> list[str]:
    selection = study.get("guidance_selection")
    if not selection:
        return []
    scales = [f"{scale:g}" for scale in selection["scales"]]
    lines = [
        "",
        f"Guidance per variant ({selection['metric']} by scale, mean ± 95% half-width; each seed read at the scale "
        f"best on the variant's other seeds, rule {selection['rule']}):",
        "",
        "| variant | " + " | ".join(f"scale {s}" for s in scales) + " | scale chosen per seed |",
        "|---|" + "---|" * (len(scales) + 1),
    ]
    for variant, entry in selection["per_variant"].items():
        chosen = ", ".join(f"{seed}: {scale:g}" for seed, scale in entry["chosen_scale"].items())
        cells = " | ".join(with_interval(entry["by_scale"][s]) for s in scales)
        lines.append(f"| {variant} | {cells} | {chosen} |")
    return lines


def curve_rows(study: dict) -> list[str]:
    curves = {
        (variant, key): curve
        for variant, per_variant in study["curves"].items()
        for key, curve in per_variant.items()
        if key.startswith("FD_demo @")
    }
    if not curves:
        return []
    steps = sorted({step for curve in curves.values() for step in curve["step"]})
    lines = ["", "| curve (mean over seeds) | " + " | ".join(f"step {s}" for s in steps) + " |"]
    lines.append("|---|" + "---|" * len(steps))
    for (variant, key), curve in sorted(curves.items()):
        values = dict(zip(curve["step"], curve["mean"]))
        lines.append(f"| {key}, {variant} | " + " | ".join(number(values.get(s)) for s in steps) + " |")
    return lines


def study_table(study: dict) -> str:
    lines = [header(study), ""] + metric_rows(study) + verdict_rows(study) + selection_rows(study)
    return "\n".join(lines + curve_rows(study))


# The study.json format these tables read (`pipeline.study.aggregate.FORMAT_VERSION`): comparisons with their
# baselines, verdicts, the guidance scale in the budget.
READS_FORMAT = 4


def read_study(argument: str) -> dict:
    path = Path(argument)
    path = path / "study.json" if path.is_dir() else path
    study = json.loads(path.read_text(encoding="utf-8"))
    version = study.get("format_version") if isinstance(study, dict) else None
    if not isinstance(version, int) or version < READS_FORMAT:
        raise SystemExit(
            f"error: {path}: study.json format {version}, these tables need format >= {READS_FORMAT}; rewrite it with "
            "`diffit-pipe study STUDY_FILE --out DIR --aggregate-only` (the runs are reused)"
        )
    return study


def main(arguments: list[str]) -> None:
    for argument in arguments:
        print(study_table(read_study(argument)))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
