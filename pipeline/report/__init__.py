"""The report stage: a training run -> one self-contained HTML page to look at and to pass around.

`collect` reads what the train, export and evaluate stages wrote (metrics.jsonl, sample grids, config,
checkpoints with their files.json, exports, metrics.json) and how they link by hash, `charts` draws the curves
(matplotlib, imported only here) and re-encodes the grids, `page` lays out the HTML (everything from the run's
files escaped), `build.run_report` writes it atomically. Other packages use what this package exports.
"""

from pipeline.report.build import REPORT_NAME, ReportOptions, run_report
from pipeline.report.charts import line_chart
from pipeline.report.collect import ReportError
from pipeline.report.page import CSP, LINEAGE, NOT_PRESENT, SECTIONS, STYLE

__all__ = [
    "CSP",
    "LINEAGE",
    "NOT_PRESENT",
    "REPORT_NAME",
    "SECTIONS",
    "STYLE",
    "ReportError",
    "line_chart",
    "ReportOptions",
    "run_report",
]
