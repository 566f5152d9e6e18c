"""What the loop reports: the progress bar, the per-window statistics and `RUN/metrics.jsonl`.

Every `train.log_every` steps (and at the last step) one record -- mean loss and grad-norm over the steps since
the previous record, the lr of the last step, images/s, the fraction of step time spent waiting for data, images
seen -- goes to the trackers and, on the main process, to `RUN/metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text_atomic

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


class MetricsLog:
    """`RUN/metrics.jsonl`, one JSON object per logged step (main process). On resume, entries after the
    checkpoint's step (written by the interrupted run) are dropped so the file describes one history, and so
    are lines that are not JSON records (a line cut short by a kill mid-write), with a warning."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text(errors="replace").splitlines() if _keep(line, resume_step, path)]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "a")  # an append-only log: each record is one flushed line

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _keep(line: str, resume_step: int, path: Path) -> bool:
    """Whether a line of an existing metrics log stays on resume: a record of a step up to the checkpoint's."""
    if not line.strip():
        return False
    try:
        record = json.loads(line)
        return int(record.get("step", 0)) <= resume_step
    except (ValueError, TypeError, AttributeError):
        logger.warning("%s: dropping a line that is not a metrics record: %.80r", path, line)
        return False


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last record."""

    steps: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    seconds: float = 0.0
    waited: float = 0.0

    def add(self, loss: float, grad_norm: float, seconds: float, waited: float) -> None:
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.seconds += seconds
        self.waited += waited

    def record(self, step: int, lr: float, images_seen: int, global_batch_size: int) -> dict[str, Any]:
        """The metrics record of this window, ending at `step`."""
        return {
            "step": step,
            "loss": self.loss / self.steps,
            "lr": lr,
            "grad_norm": self.grad_norm / self.steps,
            "images_per_s": self.steps * global_batch_size / self.seconds,
            "data_wait_fraction": self.waited / self.seconds,
            "images_seen": images_seen,
        }


class Progress:
    """The progress bar (main process only) and the window of statistics behind the next metrics record."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True
        )
        self.window = LogWindow()

    def step_done(self, loss: float, grad_norm: float, seconds: float, waited: float) -> None:
        """Count one optimizer step: its loss, gradient norm, duration and time spent waiting for data."""
        self.window.add(loss, grad_norm, seconds, waited)
        self.bar.update(1)

    def take_record(self, step: int, lr: float, images_seen: int, global_batch_size: int) -> dict[str, Any]:
        """The record of the steps since the last one (the window starts again)."""
        record = self.window.record(step, lr, images_seen, global_batch_size)
        self.window = LogWindow()
        return record

    def show(self, record: dict[str, Any]) -> None:
        """Loss, images/s and data wait of the latest record beside the bar."""
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            ips=f"{record['images_per_s']:.1f}",
            wait=f"{record['data_wait_fraction']:.0%}",
        )

    def close(self) -> None:
        self.bar.close()
