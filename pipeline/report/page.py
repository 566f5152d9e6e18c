"""The report page: one self-contained HTML document (inline CSS, images as data: URIs, no script, nothing
fetched: its Content-Security-Policy forbids every outside resource).

Every string that comes from the run's files -- paths, config text, metric names, failure reasons -- passes
through `esc` (html.escape) before it reaches the page: a run directory may come from anyone.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

from pipeline.report.collect import Checkpoint, Dataset, Evaluation, Export, RunFiles, mapping
from pipeline.train import CHECKPOINTS_DIR, METRICS, SAMPLES_DIR

# The sections of the page, in order: (anchor, title). Tests and readers look for these titles.
SECTIONS = (
    ("curves", "Training curves"),
    ("samples", "Samples over training"),
    ("fid", "FID during training"),
    ("evaluation", "Evaluation"),
    ("lineage", "Lineage"),
    ("skipped", "Skipped files"),
)
# The lineage, from the data to the numbers (the "Lineage" section's steps, in order).
LINEAGE = ("Dataset manifest", "Run config", "Checkpoints", "Export", "Metrics")
NOT_PRESENT = "not present"
# Nothing but inline styles and data: images; no script, no fetch, no form.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #212529;
       background: #fff; margin: 0 auto; padding: 16px 24px 48px; max-width: 1220px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; border-bottom: 2px solid #dee2e6;
     padding-bottom: 4px; margin-top: 32px; } h3 { font-size: 15px; margin: 14px 0 6px; }
nav a { margin-right: 14px; } .meta { color: #6c757d; margin: 0 0 10px; }
table { border-collapse: collapse; margin: 6px 0; } td, th { border: 1px solid #dee2e6; padding: 3px 8px;
        text-align: left; vertical-align: top; } th { background: #f1f3f5; font-weight: 600; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
code.hash { word-break: break-all; } pre { background: #f8f9fa; padding: 8px; overflow-x: auto; }
.absent { color: #868e96; font-style: italic; } .ok { color: #2b8a3e; } .bad { color: #c92a2a; font-weight: 600; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 8px; }
.charts img { width: 560px; max-width: 100%; border: 1px solid #e9ecef; }
.grids { display: flex; gap: 12px; overflow-x: auto; padding-bottom: 6px; }
.grids figure { margin: 0; flex: 0 0 auto; text-align: center; }
.grids img { width: 256px; image-rendering: pixelated; border: 1px solid #dee2e6; }
.node { border: 1px solid #ced4da; border-radius: 6px; padding: 4px 12px 10px; margin: 0; }
.arrow { text-align: center; color: #868e96; font-size: 20px; margin: 2px 0; }
"""


def esc(value: Any) -> str:
    """Any value as HTML text (quotes escaped too, so it is safe inside attributes)."""
    return html.escape(fmt(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers to 6 significant digits, None as a dash, everything else as str()."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def absent(what: Any) -> str:
    return f'<p class="absent">{NOT_PRESENT}: {esc(what)}</p>'


def problem(what: Any, why: str) -> str:
    return f'<p class="bad">{esc(what)}: {esc(why)}</p>'


def facts(rows: list[tuple[str, Any]]) -> str:
    """A two-column table of (name, value); values that are already HTML are wrapped in `Html`."""
    cells = "".join(f"<tr><th>{esc(name)}</th><td>{cell(value)}</td></tr>" for name, value in rows)
    return f"<table>{cells}</table>"


class Html(str):
    """A string that is HTML already (built here from escaped parts): `cell` does not escape it again."""


def cell(value: Any) -> str:
    return value if isinstance(value, Html) else esc(value)


def digest(value: Any) -> Html:
    """A sha256 (or any hash) in monospace, wrapping anywhere."""
    return Html(f'<code class="hash">{esc(value)}</code>')


def check(ok: bool, text: str) -> Html:
    """A link of the lineage that holds (✓, green) or does not (✗, red)."""
    return Html(f'<span class="{"ok" if ok else "bad"}">{"✓" if ok else "✗"} {esc(text)}</span>')


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def section(anchor: str, body: str) -> str:
    title = dict(SECTIONS)[anchor]
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>\n{body}\n</section>'


# ---------------------------------------------------------------------------------------------------------------
# Header and the picture sections


def summary_rows(run: RunFiles) -> list[tuple[str, Any]]:
    """The run at a glance: model, data, how far it got."""
    state = run.checkpoints[-1].state if run.checkpoints else {}
    model = mapping(state.get("model")).get("name")
    dataset = mapping(mapping(run.run_info.data).get("dataset")) or mapping(state.get("dataset"))
    data = None
    if dataset:
        data = f"{dataset.get('kind')} at {dataset.get('resolution')} px, {dataset.get('samples')} samples"
    return [
        ("run directory", str(run.run_dir.resolve())),
        ("model", model),
        ("data", data),
        ("last logged step", run.records[-1]["step"] if run.records else None),
        ("images seen", latest(run.records, "images_seen")),
        ("last loss", latest(run.records, "loss")),
        ("checkpoints", len(run.checkpoints)),
        ("sample grids", len(run.grids)),
        ("exports / evaluations", f"{len(run.exports)} / {len(run.evaluations)}"),
    ]


def latest(records: list[dict[str, Any]], key: str) -> Any:
    """The value of `key` in the last record that has it (records of other kinds, e.g. FID, may come after)."""
    return next((record[key] for record in reversed(records) if key in record), None)


def header(run: RunFiles, created: str, version: str) -> str:
    links = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in SECTIONS)
    return (
        f"<header><h1>Run report: {esc(run.run_dir.resolve().name)}</h1>"
        f'<p class="meta">written {esc(created)} by diffit-pipe {esc(version)}</p>'
        f"{facts(summary_rows(run))}<nav>{links}</nav></header>"
    )


def curves_section(run: RunFiles, charts: list[tuple[str, bytes | None]]) -> str:
    """The training curves: one PNG per metric; a metric no record holds is "not present"."""
    metrics_file = run.run_dir / METRICS
    if not run.records:
        return section("curves", absent(f"{metrics_file} (no metrics records)"))
    images, missing = [], []
    for title, png in charts:
        if png is None:
            missing.append(title)
        else:
            images.append(f'<img src="{data_uri(png)}" alt="{esc(title)}">')
    body = f'<p>{len(run.records)} records of {esc(metrics_file)}.</p><div class="charts">{"".join(images)}</div>'
    if missing:
        body += absent(", ".join(missing) + " (no record holds a value)")
    if run.skipped_lines:
        body += problem(metrics_file, f"{run.skipped_lines} line(s) that are not metrics records were skipped")
    return section("curves", body)


def samples_section(run: RunFiles, grids: list[tuple[int, bytes | None, str | None]]) -> str:
    """The EMA sample grids side by side, oldest left (a subset when there are many)."""
    if not run.grids:
        return section("samples", absent(f"{run.run_dir / SAMPLES_DIR}/step-*.png (sample.every was 0?)"))
    figures = []
    for step, png, why in grids:
        picture = f'<img src="{data_uri(png)}" alt="samples at step {step}">' if png else problem("grid", why)
        figures.append(f"<figure>{picture}<figcaption>step {step}</figcaption></figure>")
    shown = f"{len(grids)} of {len(run.grids)} grids" if len(grids) < len(run.grids) else f"{len(grids)} grids"
    text = f"<p>EMA samples with fixed seeds, {shown} of {esc(run.run_dir / SAMPLES_DIR)}, oldest first.</p>"
    return section("samples", f'{text}<div class="grids">{"".join(figures)}</div>')


def fid_section(
    run: RunFiles, pngs: list[tuple[str, bytes]], keys: list[str], plumbing: list[str], notes: list[str]
) -> str:
    """FID (and FD_DINOv2) against the step, from the `fid_*` (`fd_dinov2_*`) keys of the metrics records (metrics
    during training), the plumbing-only values (`plumbing`: listed, not plotted) and the text those keys hold
    instead of numbers (`notes`: e.g. that the values are plumbing-only)."""
    labels = "".join(f'<p class="bad">{esc(note)}</p>' for note in notes)
    rows = [[record["step"], key, record[key]] for record in run.records for key in keys + plumbing if key in record]
    if not rows:
        what = "fid_* / fd_dinov2_* values in metrics.jsonl (FID during training was not run)"
        return section("fid", absent(what) + labels)
    images = "".join(f'<img src="{data_uri(png)}" alt="{esc(title)}">' for title, png in pngs)
    charts = f'<div class="charts">{images}</div>' if images else ""
    return section("fid", charts + labels + table(["step", "key", "value"], rows))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluation_block(evaluation: Evaluation) -> str:
    """One evaluate output: the metric values (marked when plumbing-only) and how it sampled."""
    title = f"<h3>{esc(evaluation.path)}</h3>"
    record = evaluation.record
    if not record.present:
        return title + absent(record.path)
    if record.problem:
        return title + problem(record.path, record.problem)
    data = record.data
    sampling = mapping(data.get("sampling"))
    reportable = data.get("reportable")
    values = mapping(data.get("metrics")) if reportable else mapping(data.get("plumbing_only_metrics"))
    if "label" not in data:
        metrics = absent("metric values (this evaluation only sampled: no reference or no metrics asked for)")
    else:
        label = check(bool(reportable), str(data.get("label")))
        metrics = facts([("label", label), *sorted(values.items())])
    rows = [
        ("model", mapping(data.get("model")).get("path")),
        ("samples", data.get("num_samples")),
        ("sampler", f"{sampling.get('sampler')}, {sampling.get('steps')} steps"),
        ("guidance", f"{sampling.get('guidance_scale')} {sampling.get('guidance_schedule')}"),
        ("created", data.get("created")),
        ("seconds", mapping(data.get("timings_s")).get("total")),
    ]
    return title + metrics + facts(rows)


def evaluation_section(run: RunFiles) -> str:
    if not run.evaluations:
        return section("evaluation", absent("evaluation metrics (pass --eval DIR, or keep them as RUN/eval*)"))
    return section("evaluation", "".join(evaluation_block(evaluation) for evaluation in run.evaluations))


# ---------------------------------------------------------------------------------------------------------------
# Lineage: dataset manifest -> run config -> checkpoints -> export -> metrics


def node(step: int, body: str) -> str:
    arrow = '<div class="arrow">↓</div>' if step > 0 else ""
    return f'{arrow}<div class="node"><h3>{step + 1}. {esc(LINEAGE[step])}</h3>{body}</div>'


def dataset_node(dataset: Dataset) -> str:
    """The manifest: where the data came from, through which VAE, how many items, which failed; and whether it
    is still the manifest the run trained on."""
    if dataset.path is None:
        return absent("the dataset (RUN/run.json and the checkpoints name none)")
    manifest = dataset.manifest
    if not manifest.present:
        return absent(manifest.path)
    if manifest.problem:
        return problem(manifest.path, manifest.problem)
    data = manifest.data
    link = check(False, f"the run recorded {dataset.recorded_hash}: the manifest changed since")
    if dataset.recorded_hash is None:
        link = check(False, "the run recorded no manifest hash")
    elif manifest.sha256 == dataset.recorded_hash:
        link = check(True, "the manifest the run recorded")
    source, vae, counts = mapping(data.get("source")), mapping(data.get("vae")), mapping(data.get("counts"))
    rows = [
        ("manifest", str(manifest.path)),
        ("sha256", digest(manifest.sha256)),
        ("trained on", link),
        ("kind", f"{data.get('kind')} at {data.get('resolution')} px, {data.get('num_classes')} classes"),
        ("source", f"{source.get('root')} ({source.get('layout')}, {source.get('items')} items)" if source else None),
        ("VAE", f"{vae.get('id')} (scaling factor {fmt(vae.get('scaling_factor'))})" if vae else "none (images)"),
        ("counts", ", ".join(f"{key} {fmt(counts[key])}" for key in ordered(counts, ("seen", "written", "failed")))),
        ("created", f"{fmt(data.get('created'))} by {fmt(data.get('command'))}"),
    ]
    if vae.get("path_hash"):  # sha256 over the VAE's config.json and weights (pipeline.core.vae)
        rows.insert(6, ("VAE sha256", digest(vae["path_hash"])))
    return facts(rows) + failures_table(dataset)


def ordered(values: dict[str, Any], first: tuple[str, ...]) -> list[str]:
    """The keys of `values`: those in `first` in that order, then the others as they come."""
    return [key for key in first if key in values] + [key for key in values if key not in first]


def failures_table(dataset: Dataset) -> str:
    failed = mapping(dataset.manifest.data.get("counts")).get("failed")
    if not dataset.failures:
        return f"<p>failures: {esc(failed if failed is not None else 0)}</p>"
    rows = [[failure.get("index"), failure.get("path"), failure.get("reason")] for failure in dataset.failures]
    return f"<p>failures: {esc(failed)} (the first {len(rows)}):</p>" + table(["index", "path", "reason"], rows)


def config_node(run: RunFiles) -> str:
    """RUN/config.yaml (hashed, and compared with the copy in the newest checkpoint) and RUN/run.json."""
    config = run.config
    if not config.present:
        body = absent(config.path)
    elif config.problem:
        body = problem(config.path, config.problem)
    else:
        rows: list[tuple[str, Any]] = [("config", str(config.path)), ("sha256", digest(config.sha256))]
        if run.checkpoints:
            copy = mapping(run.checkpoints[-1].files.get("config.yaml")).get("sha256")
            name = run.checkpoints[-1].path.name
            same = check(True, f"{name} holds this config") if copy == config.sha256 else None
            rows.append(("checkpoints", same or check(False, f"{name} was written with another config")))
        body = facts(rows) + f"<details><summary>config.yaml</summary><pre>{esc(config.data)}</pre></details>"
    info = mapping(run.run_info.data)
    if info:
        keys = ("world_size", "per_device_batch_size", "accumulation_steps", "mixed_precision", "resumed_from")
        command = info.get("command")
        command = " ".join(map(str, command)) if isinstance(command, list) else command
        body += facts([*((key, info.get(key)) for key in keys), ("command", command)])
    else:
        body += absent(run.run_info.path)
    return body


def weights_file(checkpoint: Checkpoint) -> str | None:
    """The name of the trained model's weights among a checkpoint's files (accelerate's model*.safetensors)."""
    names = sorted(name for name in checkpoint.files if name.startswith("model") and name.endswith(".safetensors"))
    return names[0] if names else None


def checkpoints_node(run: RunFiles) -> str:
    """One row per checkpoint: step, status against files.json, the EMA and model hashes; every file's below."""
    if not run.checkpoints:
        return absent(f"{run.run_dir / CHECKPOINTS_DIR}/step-* (no complete checkpoint)")
    rows = []
    for checkpoint in run.checkpoints:
        ema, model = checkpoint.files.get("ema.safetensors", {}), checkpoint.files.get(weights_file(checkpoint), {})
        ok = checkpoint.status.startswith(("sizes match", "verified"))
        name = checkpoint.path.name + (" (latest)" if checkpoint.latest else "")
        rows.append([name, checkpoint.state.get("images_seen"), check(ok, checkpoint.status)])
        rows.append([Html("ema.safetensors"), "", digest(ema.get("sha256"))])
        rows.append([Html(esc(weights_file(checkpoint))), "", digest(model.get("sha256"))])
    details = "".join(checkpoint_files(checkpoint) for checkpoint in run.checkpoints)
    return table(["checkpoint", "images seen", "files.json"], rows) + details


def checkpoint_files(checkpoint: Checkpoint) -> str:
    rows = [[name, entry.get("bytes"), digest(entry.get("sha256"))] for name, entry in checkpoint.files.items()]
    return (
        f"<details><summary>{esc(checkpoint.path.name)}: {len(rows)} files in files.json</summary>"
        f"{table(['file', 'bytes', 'sha256'], rows)}</details>"
    )


def export_node(run: RunFiles) -> str:
    """Each export: its hashes, the checkpoint it came from (one of this run's?) and the data it names."""
    if not run.exports:
        return absent("an export (pass --export DIR, or keep it as RUN/export*)")
    return "".join(export_block(run, export) for export in run.exports)


def export_block(run: RunFiles, export: Export) -> str:
    config = export.config
    if not config.present:
        return f"<h3>{esc(export.path)}</h3>" + absent(config.path)
    if config.problem:
        return f"<h3>{esc(export.path)}</h3>" + problem(config.path, config.problem)
    train, dataset = mapping(config.data.get("train")), mapping(config.data.get("dataset"))
    source = Path(str(train.get("checkpoint")))
    ours = {os.path.realpath(checkpoint.path) for checkpoint in run.checkpoints}
    if os.path.realpath(source) in ours:
        origin = check(True, f"{source.name} of this run")
    else:
        origin = check(False, f"{source} is not a checkpoint of this run (rotated away, or another run)")
    same_data = dataset.get("manifest_hash") == run.dataset.recorded_hash
    rows = [
        ("config.json sha256", digest(config.sha256)),
        ("model.safetensors sha256", digest(export.weights.sha256) if export.weights.present else NOT_PRESENT),
        ("model", mapping(config.data.get("model")).get("name")),
        ("step", train.get("step")),
        ("from checkpoint", origin),
        ("weights", ema_link(run, export)),
        ("dataset", check(same_data, f"manifest {dataset.get('manifest_hash')}")),
    ]
    return f"<h3>{esc(export.path)}</h3>" + facts(rows)


def ema_link(run: RunFiles, export: Export) -> Any:
    """Which checkpoint's EMA the exported weights are, byte for byte (same sha256); when none, plain text: an
    export written another way (other metadata) holds the same tensors in other bytes."""
    for checkpoint in reversed(run.checkpoints):
        ema = mapping(checkpoint.files.get("ema.safetensors")).get("sha256")
        if ema is not None and ema == export.weights.sha256:
            return check(True, f"the EMA of {checkpoint.path.name} (ema.safetensors, same sha256)")
    return "not byte-identical to the EMA file of any checkpoint listed above"


def metrics_node(run: RunFiles) -> str:
    """Each evaluation's metrics.json: its hash, and which export's weights it sampled (by sha256)."""
    if not run.evaluations:
        return absent("metrics.json of an evaluation (pass --eval DIR, or keep it as RUN/eval*)")
    exports = {export.weights.sha256: export.path for export in run.exports if export.weights.present}
    blocks = []
    for evaluation in run.evaluations:
        record = evaluation.record
        if not record.usable:
            blocks.append(absent(record.path) if not record.present else problem(record.path, record.problem))
            continue
        model = mapping(record.data.get("model"))
        weights = model.get("weights_sha256") if isinstance(model.get("weights_sha256"), str) else None
        if weights in exports:
            link = check(True, f"the weights of {exports[weights]}")
        else:
            link = check(False, "the weights of no export in this report")
        rows = [("metrics.json", str(record.path)), ("sha256", digest(record.sha256))]
        rows += [("model weights sha256", digest(weights)), ("sampled", link)]
        blocks.append(facts(rows))
    return "".join(blocks)


def lineage_section(run: RunFiles) -> str:
    nodes = (dataset_node(run.dataset), config_node(run), checkpoints_node(run), export_node(run), metrics_node(run))
    return section("lineage", "".join(node(step, body) for step, body in enumerate(nodes)))


def skipped_section(run: RunFiles) -> str:
    """The paths the report refused to read (symbolic links out of the run, non-regular files), with why; the
    link targets are not shown (they name places outside the run)."""
    if not run.skipped:
        return section("skipped", '<p class="absent">none: every file shown was read from inside the run</p>')
    rows = [[relative(run, path), why] for path, why in sorted(run.skipped.items())]
    return section("skipped", table(["path", "why"], rows))


def relative(run: RunFiles, path: str) -> str:
    """`path` relative to the run directory when it is under it (as met, links not resolved), else as is."""
    try:
        return "RUN/" + Path(path).relative_to(run.run_dir).as_posix()
    except ValueError:
        return path


def document(title: str, sections: list[str]) -> str:
    """The whole page."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
