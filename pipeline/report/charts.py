"""The report's pictures as PNG bytes: training curves from metrics.jsonl (matplotlib, Agg) and sample grids
re-encoded through Pillow.

matplotlib is imported here only, inside the functions, so that nothing else pays for it (`diffit-pipe --help`
stays fast). Figures are drawn on their own Agg canvas, never through pyplot's global state.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.report.collect import is_number, open_admitted

# A figure is 5.6 x 3.2 inches at 100 dpi: 560 x 320 px, two side by side on the page.
FIGURE_SIZE = (5.6, 3.2)
DPI = 100
# Sample grids wider or taller than this are scaled down before they are embedded (the page stays small).
MAX_GRID_SIDE = 768
LINE_COLOURS = ("#1f6fb4", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#495057")


@dataclass(frozen=True)
class Curve:
    """One training curve: which key of the metrics records it plots, and how."""

    key: str
    title: str
    ylabel: str
    percent: bool = False  # a fraction shown as 0-100 %
    log_when_wide: bool = False  # log y-axis when the values span more than a factor of 20 (`use_log_scale`)


# The curves of the "Training curves" section, in order (keys written by `pipeline.train` progress records).
CURVES = (
    Curve("loss", "Loss", "loss (mean over the log window)", log_when_wide=True),
    Curve("lr", "Learning rate", "lr"),
    Curve("images_per_s", "Images per second", "images / s"),
    Curve("data_wait_fraction", "Data wait", "% of step time waiting for data", percent=True),
    Curve("grad_norm", "Gradient norm", "grad-norm (before clipping)"),
)
# Metrics during training (`pipeline.train.fid`): the prefix of their keys (`fid_5k`, `fd_dinov2_5k`) and their
# name on the page. Plumbing-only values are logged under `plumbing_only_*` keys, which no prefix here matches.
TRAINING_METRICS = {"fid_": "FID", "fd_dinov2_": "FD_DINOv2"}
PLUMBING_PREFIX = "plumbing_only_"


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a finite number under `key` (NaN grad-norms are left out)."""
    points = [(record["step"], float(record[key])) for record in records if is_number(record.get(key))]
    return [step for step, _ in points], [value for _, value in points]


def fid_keys(records: list[dict[str, Any]], prefixes: tuple[str, ...] = tuple(TRAINING_METRICS)) -> list[str]:
    """The keys of metrics during training (`fid_5k`, `fd_dinov2_5k`) that hold a number in some record, sorted."""
    return sorted({key for record in records for key in record if key.startswith(prefixes) and is_number(record[key])})


def plumbing_keys(records: list[dict[str, Any]]) -> list[str]:
    """The `plumbing_only_fid_*` / `plumbing_only_fd_dinov2_*` keys holding a number: listed, never plotted as the
    metric (random or unrecognised weights)."""
    prefixes = tuple(PLUMBING_PREFIX + prefix for prefix in TRAINING_METRICS)
    return sorted({key for record in records for key in record if key.startswith(prefixes) and is_number(record[key])})


def fid_notes(records: list[dict[str, Any]]) -> list[str]:
    """Text the keys of metrics during training hold instead of numbers (e.g. a plumbing-only label), each once, in
    order."""
    notes = []
    for record in records:
        for key, value in record.items():
            if key.startswith(tuple(TRAINING_METRICS)) and isinstance(value, str) and f"{key}: {value}" not in notes:
                notes.append(f"{key}: {value}")
    return notes


def use_log_scale(values: list[float]) -> bool:
    """Log y-axis for positive values spanning more than a factor of 20 (a loss falling from 1 to 0.02)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def line_chart(title: str, ylabel: str, lines: dict[str, tuple[list[int], list[float]]], log_y: bool = False) -> bytes:
    """A PNG of one or more lines against the optimizer step (markers while there are few points)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (label, (steps, values)) in enumerate(lines.items()):
        marker = "o" if len(steps) <= 40 else None
        axes.plot(steps, values, marker=marker, markersize=3, linewidth=1.4, label=label, color=_colour(index))
    if log_y:
        axes.set_yscale("log")
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if len(lines) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _colour(index: int) -> str:
    return LINE_COLOURS[index % len(LINE_COLOURS)]


def curve_png(records: list[dict[str, Any]], curve: Curve) -> bytes | None:
    """The PNG of one training curve, or None when no record holds a number under its key."""
    steps, values = series(records, curve.key)
    if not steps:
        return None
    if curve.percent:
        values = [100 * value for value in values]
    log_y = curve.log_when_wide and use_log_scale(values)
    return line_chart(curve.title, curve.ylabel, {curve.key: (steps, values)}, log_y)


def fid_pngs(records: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    """(title, PNG) of one chart per metric during training (FID, FD_DINOv2: their scales differ), a line per key."""
    charts = []
    for prefix, metric in TRAINING_METRICS.items():
        keys = fid_keys(records, (prefix,))
        if keys:
            title = f"{metric} during training"
            charts.append(
                (title, line_chart(title, f"{metric} (lower is better)", {k: series(records, k) for k in keys}))
            )
    return charts


def evenly_spaced(count: int, keep: int) -> list[int]:
    """`keep` indices of `count` items spread evenly, always with the first and the last (all when few)."""
    if count <= keep:
        return list(range(count))
    if keep == 1:
        return [count - 1]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def grid_png(path: Path) -> tuple[bytes | None, str | None]:
    """A sample grid decoded and re-encoded as PNG (scaled down to `MAX_GRID_SIDE`): only a real image reaches
    the page. Returns (PNG bytes, None), or (None, why it cannot be shown)."""
    from PIL import Image, UnidentifiedImageError

    try:
        # By its resolved path, refusing a link swapped in since `collect` admitted it.
        with open_admitted(path) as handle, Image.open(handle) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        return None, f"not a readable image ({type(error).__name__})"
    if max(image.size) > MAX_GRID_SIDE:
        scale = MAX_GRID_SIDE / max(image.size)
        size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue(), None
