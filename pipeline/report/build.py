"""`run_report`: a run directory -> one self-contained HTML page (`diffit-pipe report RUN`).

Read the run (`collect`), draw its curves and re-encode its sample grids (`charts`), lay out the page (`page`)
and write it atomically: a reader of the report never sees half of it.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import __version__
from pipeline.core.atomic import write_text_atomic
from pipeline.report import charts, page
from pipeline.report.collect import RunFiles, read_run

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
# More sample grids than this are thinned to this many, evenly over the run (first and last always shown).
MAX_GRIDS = 12


@dataclass
class ReportOptions:
    """What `diffit-pipe report` is asked to do."""

    run_dir: str | Path
    out: str | Path | None = None  # the page; None: RUN/report.html
    # Export and evaluate output directories to link into the lineage, besides any RUN/export* / RUN/eval*.
    exports: list[Path] = field(default_factory=list)
    evaluations: list[Path] = field(default_factory=list)
    verify: bool = False  # re-hash every checkpoint file (otherwise sizes are compared)


def run_report(options: ReportOptions) -> Path:
    """Write the report of `options.run_dir` and return its path. Raises ReportError (a PipelineError) when the
    run directory is not a directory; anything missing inside it is shown as "not present"."""
    run = read_run(options.run_dir, list(options.exports), list(options.evaluations), options.verify)
    out = Path(options.out) if options.out is not None else run.run_dir / REPORT_NAME
    write_text_atomic(out, render(run))
    logger.info("wrote the report of %s to %s", run.run_dir, out)
    return out


def render(run: RunFiles) -> str:
    """The page of a run that was read: every section, in order."""
    curves = [(curve.title, charts.curve_png(run.records, curve)) for curve in charts.CURVES]
    chosen = [run.grids[index] for index in charts.evenly_spaced(len(run.grids), MAX_GRIDS)]
    grids = [(step, *charts.grid_png(path)) for step, path in chosen]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sections = [
        page.header(run, created, __version__),
        page.curves_section(run, curves),
        page.samples_section(run, grids),
        page.fid_section(
            run,
            charts.fid_pngs(run.records),
            charts.fid_keys(run.records),
            charts.plumbing_keys(run.records),
            charts.fid_notes(run.records),
        ),
        page.evaluation_section(run),
        page.lineage_section(run),
        page.skipped_section(run),
    ]
    return page.document(f"Run report: {run.run_dir.resolve().name}", sections)
