"""The study page: one self-contained HTML document in the run report's style (inline CSS, charts as data: URIs,
no script, a Content-Security-Policy that forbids every outside resource). Every string from the study's files
is escaped."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text_atomic
from pipeline.report import CSP, STYLE, line_chart

STUDY_HTML = "study.html"
SECTIONS = (
    ("verdicts", "Verdicts"),
    ("table", "Results"),
    ("guidance", "Guidance selection"),
    ("curves", "Curves"),
    ("samples", "Samples"),
    ("variants", "Variants"),
    ("cost", "Cost"),
    ("budget", "Budget"),
)


def esc(value: Any) -> str:
    """Any value as HTML text; numbers to 6 significant digits, None as a dash."""
    if value is None:
        return "—"
    return html.escape(f"{value:.6g}" if isinstance(value, float) else str(value), quote=True)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _interval(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return '<span class="absent">baseline</span>'
    if entry["half_width"] is None:
        return f"{esc(entry['mean'])} (n = {entry['n']}, no interval)"
    significant = entry["low"] > 0 or entry["high"] < 0
    text = f"{esc(entry['mean'])} ± {esc(entry['half_width'])} [{esc(entry['low'])}, {esc(entry['high'])}]"
    return f'<span class="{"bad" if significant else ""}">{text}</span>' if significant else text


def table_section(study: dict[str, Any]) -> str:
    """The metric table: mean ± 95% interval per variant, paired difference to the baseline."""
    rows = []
    adjusted = {
        (c["metric"], c["variant"]): c["p_holm"]
        for c in study.get("comparisons", [])
        if c.get("baseline", study["baseline"]) == study["baseline"]
    }
    for row in study["table"]:
        values = ", ".join(f"{esc(s)}: {esc(v)}" for s, v in row["values"].items())
        direction = "lower is better" if row["metric"] in study["lower_is_better"] else ""
        rows.append(
            [
                f"<code>{esc(row['metric'])}</code> <span class='meta'>{direction}</span>",
                esc(row["variant"]),
                str(row["n"]),
                _interval(row) if row["n"] > 1 else esc(row["mean"]),
                _interval(row["difference_to_baseline"]),
                esc(adjusted.get((row["metric"], row["variant"]))),
                values,
            ]
        )
    notes = "".join(
        f"<p class='meta'><code>{esc(name)}</code>: "
        + ", ".join(f"{esc(k)} {esc(v)}" for k, v in detail.items())
        + "</p>"
        for name, detail in study["metric_details"].items()
    )
    header = ["metric", "variant", "seeds", "mean ± 95% t-interval", f"paired difference to {study['baseline']}"]
    body = _table(header + ["Holm p", "values by seed"], rows) if rows else '<p class="absent">no metrics</p>'
    return _section("table", body + notes)


def verdicts_section(study: dict[str, Any]) -> str:
    """Each claim of the paper the study carries, per variant: the verdict its Holm-adjusted comparison gives."""
    rows = [
        [
            esc(v["source"]),
            f"<code>{esc(v['metric'])}</code>",
            f"{esc(v['variant'])} vs {esc(v.get('baseline', study['baseline']))}",
            f"{esc(v['paper'])} ({esc(_percent(v['paper_relative_change']))})",
            f"{esc(v.get('measured'))} ({esc(_percent(v.get('relative_change')))})",
            esc(v.get("p_holm")),
            f"<b>{esc(v['verdict'])}</b>",
            esc(v.get("seeds_for_80_percent_power")),
        ]
        for v in study.get("verdicts", [])
    ]
    header = ["claim", "metric", "variant", "paper vs baseline", "measured vs baseline", "Holm p", "verdict"]
    header.append("seeds for 80% power")
    method = f"<p class='meta'>{esc(study.get('verdict_method', ''))}</p>"
    body = _table(header, rows) + method if rows else '<p class="absent">the study file carries no claims</p>'
    return _section("verdicts", body)


def guidance_section(study: dict[str, Any]) -> str:
    """With a guidance sweep: the selection metric per variant and scale, and the scale each seed was read at."""
    selection = study.get("guidance_selection")
    if not selection:
        return _section("guidance", '<p class="absent">no guidance sweep: every variant at the budget\'s scale</p>')
    scales = [f"{scale:g}" for scale in selection["scales"]]
    header = ["variant", *(f"scale {s}" for s in scales), "scale per seed (chosen on the others)", "best in sample"]
    rows = [
        [
            esc(variant),
            *(_mean_and_half_width(entry["by_scale"][s]) for s in scales),
            esc(", ".join(f"{seed}: {scale:g}" for seed, scale in entry["chosen_scale"].items())),
            esc(entry["best_in_sample"]),
        ]
        for variant, entry in selection["per_variant"].items()
    ]
    better = "lower" if selection["lower_is_better"] else "higher"
    note = (
        f"<p class='meta'>{esc(selection['metric'])} ({better} is better), mean ± 95% half-width over seeds; "
        f"rule {esc(selection['rule'])}: each seed's values in the results are read at the scale best on the "
        "variant's other seeds</p>"
    )
    return _section("guidance", _table(header, rows) + note)


def _mean_and_half_width(entry: dict[str, Any]) -> str:
    half_width = entry["half_width"]
    return f"{esc(entry['mean'])} ± {esc(half_width)}" if half_width is not None else esc(entry["mean"])


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:+.1f}%"


def curves_section(study: dict[str, Any]) -> str:
    """One chart per training metric, a line per variant (the mean over seeds)."""
    keys = sorted({key for per_variant in study["curves"].values() for key in per_variant})
    images = []
    for key in keys:
        lines = {
            variant: (curves[key]["step"], curves[key]["mean"])
            for variant, curves in study["curves"].items()
            if key in curves
        }
        png = base64.b64encode(line_chart(f"{key} (mean over seeds)", key, lines)).decode("ascii")
        images.append(f'<img alt="{esc(key)}" src="data:image/png;base64,{png}">')
    body = f'<div class="charts">{"".join(images)}</div>' if images else '<p class="absent">no curves</p>'
    return _section("curves", body)


def samples_section(study: dict[str, Any], grids: dict[str, Path]) -> str:
    """Each variant's grid of its first samples with the first seed (equal seeds across variants)."""
    figures = []
    for variant, path in grids.items():
        png = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img alt="{esc(variant)} samples" src="data:image/png;base64,{png}">'
            f"<figcaption>{esc(variant)}</figcaption></figure>"
        )
    seed = study["seeds"][0]
    note = f"<p class='meta'>the first samples of each variant's evaluation with seed {esc(seed)}, class under each</p>"
    return _section("samples", note + "".join(figures) if figures else '<p class="absent">no grids</p>')


def variants_section(study: dict[str, Any]) -> str:
    rows = [
        [
            esc(v["name"]),
            esc(v["run"]),
            f"<code>{esc(v['train_overrides'])}</code>",
            f"<code>{esc(v['evaluate_overrides'])}</code>",
        ]
        for v in study["variants"]
    ]
    return _section("variants", _table(["variant", "training run", "training overrides", "evaluate overrides"], rows))


def cost_section(study: dict[str, Any]) -> str:
    """Per variant: parameters, GFLOPs per forward, the guidance it was sampled with, measured times."""
    header = ["variant", "model", "parameters", "GFLOPs / forward", "guidance", "sampler, steps"]
    header += ["train s", "train img/s", "evaluate s", "sampling img/s"]
    rows = [
        [
            esc(name),
            esc(entry["model"]),
            esc(entry["params"]),
            esc(entry["gflops"]),
            esc(entry["guidance_scale"]),
            f"{esc(entry['sampler'])}, {esc(entry['sampling_steps'])}",
            esc(entry["train_seconds"]),
            esc(entry["train_images_per_s"]),
            esc(entry["evaluate_seconds"]),
            esc(entry["sampling_images_per_s"]),
        ]
        for name, entry in (study.get("cost") or {}).items()
    ]
    note = "<p class='meta'>times: means over seeds, measured on the machine that ran each unit</p>"
    return _section("cost", _table(header, rows) + note if rows else '<p class="absent">no cost recorded</p>')


def budget_section(study: dict[str, Any]) -> str:
    rows = [[esc(k), esc(v)] for k, v in study["budget"].items()] + [["seeds", esc(study["seeds"])]]
    return _section("budget", _table(["setting", "value (every run)"], rows))


def _section(anchor: str, body: str) -> str:
    title = dict(SECTIONS)[anchor]
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def document(study: dict[str, Any], grids: dict[str, Path] | None = None) -> str:
    """The whole page (`grids`: variant -> its sample grid PNG, embedded)."""
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in SECTIONS)
    head = (
        f"<h1>Study {esc(study['name'])}</h1><p class='meta'>{esc(study['description'])} — base preset "
        f"<code>{esc(study['base'])}</code>, baseline <b>{esc(study['baseline'])}</b>, scale "
        f"{esc(study['scale'] or 'unspecified')}</p><nav>{nav}</nav>"
    )
    sections = [head, verdicts_section(study), table_section(study), guidance_section(study), curves_section(study)]
    sections += [samples_section(study, grids or {})]
    sections += [variants_section(study), cost_section(study), budget_section(study)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Study {esc(study['name'])}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_page(study: dict[str, Any], path: Path, grids: dict[str, Path] | None = None) -> Path:
    return write_text_atomic(path, document(study, grids))
