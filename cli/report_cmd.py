"""`diffit-pipe report`: one self-contained HTML page about a training run (`pipeline.report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.logs import setup_logging

REPORT_HELP = """Write one self-contained HTML page about a training run: loss / lr / images-per-second /
data-wait / grad-norm curves, the sample grids over training side by side, FID against the step (when the run
logged it), evaluation metrics, and the lineage dataset manifest -> run config -> checkpoints -> export ->
metrics with their hashes.

\b
  diffit-pipe report runs/xl2
  diffit-pipe report runs/xl2 --export models/xl2 --eval eval/xl2 --out xl2.html
\b
The page embeds its images (data: URIs) and fetches nothing: it opens offline and can be mailed around.
Anything the run directory lacks is shown as "not present". Exports and evaluations kept inside the run
directory (RUN/export*, RUN/eval*) are found without the flags."""

OUT_HELP = "Where to write the page (default: RUN/report.html)."
EXPORT_HELP = "An exported model directory (`diffit-pipe export` output) to link into the lineage (repeatable)."
EVAL_HELP = "An evaluate output directory (its metrics.json) to show and link into the lineage (repeatable)."
VERIFY_HELP = "Re-hash every checkpoint file against its files.json (default: compare sizes only)."


def report(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="The run directory (`diffit-pipe train --run-dir`)."),
    out: Path | None = typer.Option(None, "--out", metavar="FILE", help=OUT_HELP),
    export: list[Path] = typer.Option([], "--export", metavar="DIR", help=EXPORT_HELP),
    eval_dirs: list[Path] = typer.Option([], "--eval", metavar="DIR", help=EVAL_HELP),
    verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
) -> None:
    setup_logging()
    from pipeline.report import ReportOptions, run_report

    path = run_report(ReportOptions(run_dir, out, exports=list(export), evaluations=list(eval_dirs), verify=verify))
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add `report` to the main app."""
    app.command("report", help=REPORT_HELP)(report)
