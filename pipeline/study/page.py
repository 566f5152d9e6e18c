"""The study page: one self-contained HTML document in the run report's style (inline CSS, charts as data: URIs,
no script, a Content-Security-Policy that forbids every outside resource). Every string from the study's files
is escaped."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text_atomic

STUDY_HTML = "study.html"
SECTIONS = (("table", "Results"), ("curves", "Curves"), ("variants", "Variants"), ("budget", "Budget"))
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
# The run report's style sheet (pipeline/report/page.py), the parts this page uses.
STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #212529;
       background: #fff; margin: 0 auto; padding: 16px 24px 48px; max-width: 1220px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; border-bottom: 2px solid #dee2e6;
     padding-bottom: 4px; margin-top: 32px; } h3 { font-size: 15px; margin: 14px 0 6px; }
nav a { margin-right: 14px; } .meta { color: #6c757d; margin: 0 0 10px; }
table { border-collapse: collapse; margin: 6px 0; } td, th { border: 1px solid #dee2e6; padding: 3px 8px;
        text-align: left; vertical-align: top; } th { background: #f1f3f5; font-weight: 600; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.absent { color: #868e96; font-style: italic; } .ok { color: #2b8a3e; } .bad { color: #c92a2a; font-weight: 600; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 8px; }
.charts img { width: 560px; max-width: 100%; border: 1px solid #e9ecef; }
"""
COLOURS = ("#1f6fb4", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#495057")


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
    body = _table(header + ["values by seed"], rows) if rows else '<p class="absent">no metrics</p>'
    return _section("table", body + notes)


def _chart(title: str, lines: dict[str, tuple[list[int], list[float]]]) -> bytes:
    """A PNG of one line per variant against the step (matplotlib, imported here only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (label, (steps, values)) in enumerate(lines.items()):
        axes.plot(steps, values, marker="o", markersize=3, linewidth=1.4, label=label, color=COLOURS[index % 6])
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("step")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


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
        png = base64.b64encode(_chart(f"{key} (mean over seeds)", lines)).decode("ascii")
        images.append(f'<img alt="{esc(key)}" src="data:image/png;base64,{png}">')
    body = f'<div class="charts">{"".join(images)}</div>' if images else '<p class="absent">no curves</p>'
    return _section("curves", body)


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


def budget_section(study: dict[str, Any]) -> str:
    rows = [[esc(k), esc(v)] for k, v in study["budget"].items()] + [["seeds", esc(study["seeds"])]]
    return _section("budget", _table(["setting", "value (every run)"], rows))


def _section(anchor: str, body: str) -> str:
    title = dict(SECTIONS)[anchor]
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def document(study: dict[str, Any]) -> str:
    """The whole page."""
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in SECTIONS)
    head = (
        f"<h1>Study {esc(study['name'])}</h1><p class='meta'>{esc(study['description'])} — base preset "
        f"<code>{esc(study['base'])}</code>, baseline <b>{esc(study['baseline'])}</b>, scale "
        f"{esc(study['scale'] or 'unspecified')}</p><nav>{nav}</nav>"
    )
    sections = [head, table_section(study), curves_section(study), variants_section(study), budget_section(study)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Study {esc(study['name'])}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_page(study: dict[str, Any], path: Path) -> Path:
    return write_text_atomic(path, document(study))
